"""The VLM's parts: chat template and labels, the Gemma-style tokenizer, splicing, strict LLM loading, the feature
cache."""

from __future__ import annotations

import json

import pytest
import torch

from hilight.data.conversations import (
    IGNORE_INDEX,
    VIDEO_TOKEN_INDEX,
    ConversationError,
    Turn,
    encode,
    encode_prompt,
    parse_conversation,
    render,
)
from hilight.data.feature_cache import FeatureCache, fill_cache
from hilight.models.checkpoints import CheckpointError
from hilight.models.token_mining import TokenMining, TokenMiningConfig
from hilight.models.tokenizers import TokenizerError, build_gemma_tokenizer, load_llm_tokenizer
from hilight.models.vlm import HiLightVLM, SpliceError, build_llm, gemma_config, load_llm

CONV = [{"from": "human", "value": "What color is the square?\n<video>"}, {"from": "gpt", "value": "The square is white."},
        {"from": "human", "value": "Which way does it move?"}, {"from": "gpt", "value": "It moves downwards."}]
CORPUS = ["A white square moves downwards", "The white cue ball hits the black ball", "Two shapes are moving.",
          render(parse_conversation(CONV))]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_gemma_tokenizer(CORPUS * 3, tmp_path_factory.mktemp("tok"), vocab_size=320)


@pytest.fixture(scope="module")
def vlm(tok):
    llm = build_llm(gemma_config("tiny", vocab_size=len(tok), pad_token_id=0, eos_token_id=1, bos_token_id=2), seed=0)
    torch.manual_seed(0)
    tm = TokenMining(TokenMiningConfig(video_dim=24, image_dim=16, llm_dim=64, expand=4))
    return HiLightVLM(llm, tm).eval()


def feats(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1 + 3 * 9, 24, generator=g), torch.randn(n, 3, 16, generator=g)


# ------------------------------------------------------------------------------------------------ template


def test_render_is_the_reference_gemma_format():
    turns = parse_conversation(CONV)
    assert turns[0].question == "<video>\nWhat color is the square?"  # marker moved to the front of its turn
    assert render(turns) == ("<bos><start_of_turn>user\n<video>\nWhat color is the square?<end_of_turn>\n"
                             "<start_of_turn>model\nThe square is white.<end_of_turn>\n<eos>"
                             "<start_of_turn>user\nWhich way does it move?<end_of_turn>\n"
                             "<start_of_turn>model\nIt moves downwards.<end_of_turn>\n<eos>")


def test_tokenizer_has_gemma_specials_and_round_trips(tok, tmp_path):
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    for marker in ("<start_of_turn>", "<end_of_turn>"):
        assert len(tok(marker, add_special_tokens=False)["input_ids"]) == 1
    ids = tok("Zebra é A white square")["input_ids"]  # unseen characters: byte fallback, nothing unknown
    assert ids[0] == 2 and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "Zebra é A white square"
    again = build_gemma_tokenizer(CORPUS * 3, tmp_path / "again", vocab_size=320)
    assert again.get_vocab() == tok.get_vocab()  # deterministic
    with pytest.raises(TokenizerError, match="does not exist"):
        load_llm_tokenizer(tmp_path / "nowhere")
    (tmp_path / "merged").mkdir()  # e.g. a merged HiLight model directory saved without its tokenizer
    (tmp_path / "merged" / "config.json").write_text("{}")
    with pytest.raises(TokenizerError, match=r"merged holds no tokenizer files .*; point llm.dir \(or llm.tokenizer_dir"):
        load_llm_tokenizer(tmp_path / "merged")


def test_labels_supervise_only_answers_and_match_whole_string_tokenisation(tok):
    enc = encode(parse_conversation(CONV), tok, video_tokens=8)
    # the reference tokenises the rendered string split at <video>: the same ids
    head, tail = render(parse_conversation(CONV)).split("<video>")
    assert enc.input_ids == (tok(head, add_special_tokens=False)["input_ids"] + [VIDEO_TOKEN_INDEX]
                             + tok(tail, add_special_tokens=False)["input_ids"])
    supervised = [i for i, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE_INDEX]
    assert tok.decode(supervised) == ("The square is white.<end_of_turn>\n<eos>"
                                      "It moves downwards.<end_of_turn>\n<eos>")
    assert enc.labels[enc.input_ids.index(VIDEO_TOKEN_INDEX)] == IGNORE_INDEX and enc.num_videos == 1
    assert enc.spliced_length(8) == len(enc.input_ids) + 7


def test_inference_prompt_is_the_training_prefix(tok):
    enc = encode(parse_conversation(CONV), tok, video_tokens=8)
    prompt = encode_prompt("What color is the square?", tok, video_tokens=8)
    assert enc.input_ids[:len(prompt.input_ids)] == prompt.input_ids
    assert tok.decode(enc.input_ids[len(prompt.input_ids)]) == tok.decode(tok("The")["input_ids"][1])
    assert prompt.answer_tokens == 0


def test_truncation_is_explicit(tok):
    turns = parse_conversation(CONV)
    full = encode(turns, tok, video_tokens=8)
    first_turn = encode(turns[:1], tok, video_tokens=8)
    dropped = encode(turns, tok, video_tokens=8, max_length=first_turn.spliced_length(8) + 3)
    assert dropped.truncated and dropped.dropped_turns == 1 and dropped.input_ids == first_turn.input_ids
    cut = encode(turns, tok, video_tokens=8, max_length=first_turn.spliced_length(8) - 2)
    assert cut.truncated and cut.answer_tokens == first_turn.answer_tokens - 2
    assert cut.spliced_length(8) == first_turn.spliced_length(8) - 2 <= full.spliced_length(8)
    with pytest.raises(ConversationError, match="prompt alone is .* raise max_length"):
        encode(turns, tok, video_tokens=8, max_length=12)


@pytest.mark.parametrize(("conv", "match"), [
    ([{"from": "system", "value": "x"}, {"from": "gpt", "value": "y"}], "role 'system'"),
    ([{"from": "human", "value": "q"}], "alternate"),
    ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}], "alternate"),
    ([], "empty"),
])
def test_bad_conversations_are_named(conv, match):
    with pytest.raises(ConversationError, match=match):
        parse_conversation(conv)


# ------------------------------------------------------------------------------------------------ splicing


def _batch(tok, convs, video_tokens):
    encs = [encode(parse_conversation(c), tok, video_tokens=video_tokens) for c in convs]
    width = max(len(e.input_ids) for e in encs)
    ids = torch.tensor([e.input_ids + [0] * (width - len(e.input_ids)) for e in encs])
    mask = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in encs])
    labels = torch.tensor([e.labels + [IGNORE_INDEX] * (width - len(e.input_ids)) for e in encs])
    return ids, mask, labels


def test_splice_places_video_blocks_and_ignores_their_labels(tok, vlm):
    short = [CONV[0], CONV[1]]
    ids, mask, labels = _batch(tok, [CONV, short], 12)
    video = vlm.token_mining(*feats(2))  # [2, 12, 64]
    s = vlm.splice(ids, mask, video, labels)
    slot = ids[0].tolist().index(VIDEO_TOKEN_INDEX)
    scale = 64 ** 0.5  # Gemma's embedding scale applies to the video tokens too (the reference's numerics)
    assert torch.allclose(s.inputs_embeds[0, slot:slot + 12], video[0] * scale)
    assert torch.allclose(s.inputs_embeds[1, slot:slot + 12], video[1] * scale)
    assert (s.labels[:, slot:slot + 12] == IGNORE_INDEX).all()
    n0, n1 = int(mask[0].sum()) + 11, int(mask[1].sum()) + 11
    assert s.attention_mask.sum(1).tolist() == [n0, n1] and s.inputs_embeds.shape[1] == n0
    assert torch.equal(s.labels[0, slot + 12:n0], labels[0, slot + 1:int(mask[0].sum())])
    assert (s.labels[1, n1:] == IGNORE_INDEX).all() and (s.inputs_embeds[1, n1:] == 0).all()


def test_padded_batch_gives_each_sample_its_unpadded_logits(tok, vlm):
    ids, mask, labels = _batch(tok, [CONV, [CONV[0], CONV[1]]], 12)
    vf, ff = feats(2)
    with torch.no_grad():
        both = vlm(ids, mask, labels, video_features=vf, frame_features=ff).logits
        n = int(mask[1].sum())
        alone = vlm(ids[1:, :n], mask[1:, :n], labels[1:, :n], video_features=vf[1:], frame_features=ff[1:]).logits
    assert torch.allclose(both[1, :alone.shape[1]], alone[0], atol=1e-5)
    # the training loss and the evaluation's summed token loss: the padded batch's are the two samples' own
    with torch.no_grad():
        per = [vlm.token_loss(ids[i:i + 1, :int(mask[i].sum())], mask[i:i + 1, :int(mask[i].sum())],
                              labels[i:i + 1, :int(mask[i].sum())], vlm.token_mining(vf[i:i + 1], ff[i:i + 1]))
               for i in (0, 1)]
        total, count = vlm.token_loss(ids, mask, labels, vlm.token_mining(vf, ff))
        loss = vlm(ids, mask, labels, video_features=vf, frame_features=ff).loss
    assert count == sum(n for _, n in per) and total == pytest.approx(sum(s for s, _ in per), rel=1e-5)
    assert float(loss) == pytest.approx(total / count, rel=1e-5)


def test_several_videos_in_one_sample_and_mismatches(tok, vlm):
    two = [{"from": "human", "value": "<video>\nFirst?"}, {"from": "gpt", "value": "A."},
           {"from": "human", "value": "<video>\nSecond?"}, {"from": "gpt", "value": "B."}]
    ids, mask, labels = _batch(tok, [two], 12)
    video = torch.randn(2, 12, 64)
    s = vlm.splice(ids, mask, video, labels)
    slots = [i for i, t in enumerate(ids[0].tolist()) if t == VIDEO_TOKEN_INDEX]
    assert torch.allclose(s.inputs_embeds[0, slots[0]:slots[0] + 12], video[0] * 8)
    assert torch.allclose(s.inputs_embeds[0, slots[1] + 11:slots[1] + 23], video[1] * 8)  # after the first block
    with pytest.raises(SpliceError, match=r"2 <video> placeholders \(per sample \[2\]\) but 1 videos"):
        vlm.splice(ids, mask, video[:1], labels)
    text = tok(["Two shapes are moving."], return_tensors="pt")
    assert vlm.splice(text["input_ids"], text["attention_mask"], None).inputs_embeds.shape[1] == text["input_ids"].shape[1]


def test_dtype_follows_the_model(tok, vlm):
    import copy

    half = copy.deepcopy(vlm).to(torch.bfloat16)
    ids, mask, labels = _batch(tok, [CONV], 12)
    s = half.splice(ids, mask, torch.randn(1, 12, 64), labels)  # fp32 video tokens are cast, not fp16-forced
    assert s.inputs_embeds.dtype == torch.bfloat16


def test_batched_generation_with_left_padding_matches_single(tok, vlm):
    prompts = [encode_prompt("What color is the square?", tok, video_tokens=12),
               encode_prompt("Which way does the white square move?", tok, video_tokens=12)]
    width = max(len(p.input_ids) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p.input_ids)) + p.input_ids for p in prompts])
    mask = torch.tensor([[0] * (width - len(p.input_ids)) + [1] * len(p.input_ids) for p in prompts])
    video = vlm.token_mining(*feats(2, seed=3))
    kw = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    batched = vlm.generate(ids, mask, video_tokens=video, **kw)
    for i, p in enumerate(prompts):
        single = vlm.generate(torch.tensor([p.input_ids]), torch.ones(1, len(p.input_ids), dtype=torch.long),
                              video_tokens=video[i:i + 1], **kw)
        assert batched.sequences[i].tolist() == single.sequences[0].tolist()
        for step_batched, step_single in zip(batched.scores, single.scores, strict=True):  # same logits each step
            assert torch.allclose(step_batched[i], step_single[0], atol=1e-4)


# ------------------------------------------------------------------------------------------------ LLM loading


def test_load_llm_is_strict_and_pins_the_activation(tok, tmp_path):
    llm = build_llm(gemma_config("tiny", vocab_size=len(tok), hidden_act="gelu_pytorch_tanh"), seed=1)
    llm.save_pretrained(str(tmp_path / "ok"))
    loaded = load_llm(tmp_path / "ok", hidden_act="gelu")
    assert loaded.config.hidden_act == "gelu"
    assert torch.equal(loaded.model.layers[0].mlp.gate_proj.weight, llm.model.layers[0].mlp.gate_proj.weight)
    x = torch.randn(3, 5)
    assert torch.allclose(loaded.model.layers[0].mlp.act_fn(x), torch.nn.functional.gelu(x))  # exact, not tanh

    from safetensors.torch import load_file, save_file
    sd = load_file(tmp_path / "ok" / "model.safetensors")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    save_file({k: v for k, v in sd.items() if "layers.1.mlp.up_proj" not in k}, tmp_path / "broken" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"1 missing: \['model.layers.1.mlp.up_proj.weight'\]"):
        load_llm(tmp_path / "broken", hidden_act="gelu")

    # a merged HiLight directory: model_type hilight_gemma and TokenMining keys beside Gemma's
    (tmp_path / "merged").mkdir()
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text()) | {"model_type": "hilight_gemma"}
    (tmp_path / "merged" / "config.json").write_text(json.dumps(cfg))
    save_file({**sd, "model.token_mining.query_projector.0.weight": torch.ones(16)}, tmp_path / "merged" / "model.safetensors")
    assert load_llm(tmp_path / "merged", hidden_act="gelu").config.hidden_size == 64
    # MGM-2B (Mini-Gemini, the reference's starting point): its projector and "uni" modules are not the LLM's
    (tmp_path / "mgm").mkdir()
    (tmp_path / "mgm" / "config.json").write_text(json.dumps(cfg | {"model_type": "mgm_gemma", "mm_hidden_size": 8}))
    save_file({**sd, "model.mm_projector.0.weight": torch.ones(4), "model.vlm_uni_query_projector.1.bias": torch.ones(4),
               "model.vision_tower_aux.stem.weight": torch.ones(2)}, tmp_path / "mgm" / "model.safetensors")
    assert load_llm(tmp_path / "mgm", hidden_act="gelu").config.hidden_size == 64
    save_file({**sd, "model.mm_projector.0.weight": torch.ones(4), "model.extra.weight": torch.ones(2)},
              tmp_path / "mgm" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"1 unexpected: \['model.extra.weight'\]"):
        load_llm(tmp_path / "mgm", hidden_act="gelu")
    with pytest.raises(CheckpointError, match="model_type 'llama'"):
        (tmp_path / "merged" / "config.json").write_text(json.dumps(cfg | {"model_type": "llama"}))
        load_llm(tmp_path / "merged", hidden_act="gelu")


# ------------------------------------------------------------------------------------------------ feature cache


def test_feature_cache_round_trip_invalidation_and_partial_fill(tmp_path, billiards_dir):
    videos = {f"sha{i}": str(p) for i, p in enumerate(sorted((billiards_dir / "videos").glob("*.mp4"))[:5])}
    calls = []

    def encode_clips(clips):
        calls.append(len(clips))
        return {"video": clips.mean(dim=(2, 3, 4)).unsqueeze(-1).repeat(1, 1, 4), "frames": clips[:, :, 0, 0, :3]}

    key = {"clipvip": "a", "longclip": "b", "num_frames": 4, "image_size": 32}
    cache = FeatureCache(tmp_path, key)
    first = dict(list(videos.items())[:2])
    assert fill_cache(cache, first, encode_clips, num_frames=4, image_size=32, batch_size=2, progress=False) == \
        {"cached": 0, "computed": 2}
    (cache.dir / ".shard-dead.safetensors.tmp").write_bytes(b"half-written")  # a killed writer's leftover
    reopened = FeatureCache(tmp_path, key)
    assert len(reopened) == 2
    assert fill_cache(reopened, videos, encode_clips, num_frames=4, image_size=32, batch_size=2, progress=False) == \
        {"cached": 2, "computed": 3}
    assert calls == [2, 2, 1]  # only the missing clips were decoded and encoded
    from hilight.data.frames import load_clip_frames
    clip = load_clip_frames(videos["sha4"], 4, 32)
    video, frames = FeatureCache(tmp_path, key).get("sha4", ("video", "frames"))
    assert torch.allclose(video[:, 0], clip.mean(dim=(1, 2, 3)), atol=1e-6) and frames.shape == (4, 3)
    # any change of weights or frame sampling is a different cache
    for changed in ({**key, "clipvip": "other"}, {**key, "num_frames": 8}):
        other = FeatureCache(tmp_path, changed)
        assert other.dir != cache.dir and len(other) == 0
    assert json.loads((cache.dir / "key.json").read_text())["clipvip"] == "a"
    with pytest.raises(KeyError, match="not in the feature cache"):
        cache.get("unknown", ("video",))


def test_turn_with_open_answer_must_be_last(tok):
    with pytest.raises(ConversationError, match="only the last turn"):
        encode([Turn("<video>\nq", None), Turn("q2", "a")], tok, video_tokens=4)
