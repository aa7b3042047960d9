"""Merge a stage-2 export into a standalone HiLight model (hilight-reference §5.1, without its bugs).

``merge_stage2`` rebuilds the model the adapter was trained on from ``stage2.json`` (towers, base LLM, and the
TokenMining saved *with* the adapter), loads the adapter with peft, folds it into the base weights with
``merge_and_unload`` (W ← W + B·A·alpha/r) and proves the fold: the merged model's logits on a probe batch (text
plus a video block) must equal the adapter model's within a tolerance, or the merge fails.

Precision: the fold is done in float32 whatever dtype the LLM runs in (bf16 for Gemma-2B), and the check compares
float32 logits of the float32 adapter model and the float32 merged model; the merged weights are then cast to the
LLM's dtype once, for saving. Folding in bf16 would round W + ΔW to 8 bits of mantissa and the check would measure
that rounding (2e-2 on a toy 4-layer model), not the correctness of the merge. In float32 the two computations
differ only by summation order, hence ``MERGE_TOLERANCE`` (1e-4 on logits of order 1–10, about 100× the float32
noise seen on tiny and 2B-shaped models); a wrong or corrupted fold changes logits by orders of magnitude more.
The merge runs on the GPU when there is one (``device``). The result is written
by ``save_vlm_dir``. (The reference merged a stage-1 TokenMining that the adapter had never seen, and its
``load_state_dict(strict=False)`` step matched no key.)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel

from hilight.data.conversations import VIDEO_TOKEN_INDEX
from hilight.models.checkpoints import CheckpointError, directory_digest
from hilight.models.export import GenerationSpec, default_device, save_vlm_dir
from hilight.train.lora import STAGE2_FILE
from hilight.train.vlm_parts import DTYPES, LLMSpec, TokenMiningSpec, VisionSpec, build_vlm_parts

log = logging.getLogger(__name__)


@dataclass
class MergeResult:
    out_dir: Path
    max_abs_logit_diff: float
    digest: str  # content hash of the whole merged directory
    meta: dict  # stage2.json


def probe_logits(vlm, vocab: int, video_tokens: int, seed: int = 0) -> torch.Tensor:
    """Logits of a fixed random batch: two prompts of random ids with a video block in each."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 12), generator=g)
    ids[:, 3] = VIDEO_TOKEN_INDEX
    width = vlm.token_mining.config.llm_dim
    tokens = torch.randn(2, video_tokens, width, generator=g) * 0.02
    device = next(vlm.llm.parameters()).device
    with torch.no_grad():
        return vlm(ids.to(device), torch.ones_like(ids).to(device), video_tokens=tokens.to(device)).logits.float()


MERGE_TOLERANCE = 1e-4  # max |logit difference|, float32 vs float32 (see the module docstring)


def merge_stage2(stage2_dir: str | Path, out_dir: str | Path, *, generation: GenerationSpec, prompt: str,
                 lineage: dict | None = None, tolerance: float = MERGE_TOLERANCE,
                 device: str | torch.device | None = None) -> MergeResult:
    stage2_dir = Path(stage2_dir)
    meta_path = stage2_dir / STAGE2_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{stage2_dir} is not a stage-2 export ({STAGE2_FILE} is missing); point at "
                              "<lora output_dir>/best")
    meta = json.loads(meta_path.read_text())
    tm_spec = TokenMiningSpec.model_validate({**meta["token_mining"], "init": str(stage2_dir / "token_mining")})
    llm_spec = LLMSpec.model_validate(meta["llm"])
    parts = build_vlm_parts(VisionSpec.model_validate(meta["vision"]), llm_spec, tm_spec)
    vlm = parts.to(torch.device(device) if device is not None else default_device()).vlm.eval()
    changed = [k for k in ("llm", "clipvip", "longclip") if parts.digests[k] != meta["digests"][k]]
    if changed:
        raise CheckpointError(f"the {changed} weights now at {meta['llm']['dir']} / {meta['vision']['clipvip']} are not "
                              f"the ones the adapter in {stage2_dir} was trained with (digests differ); restore them "
                              "or re-run stage 2")
    vlm.llm.float()  # exact upcast of the stored weights; fold and check in float32 (see the module docstring)
    vlm.llm = PeftModel.from_pretrained(vlm.llm, str(stage2_dir / "adapter"), is_trainable=False).eval()
    n_tokens = vlm.token_mining.config.num_tokens(parts.num_frames)
    vocab = vlm.llm.get_input_embeddings().num_embeddings
    before = probe_logits(vlm, vocab, n_tokens)
    vlm.llm = vlm.llm.merge_and_unload()
    after = probe_logits(vlm, vocab, n_tokens)
    diff = float((before - after).abs().max())
    if not diff <= tolerance:
        raise RuntimeError(f"merged logits differ from the adapter model's by {diff:.3g} (> {tolerance:g}); the merge "
                           "is wrong, not saving it")
    log.info("merged %s: max |logit difference| %.3g (float32)", stage2_dir, diff)
    vlm.llm.to(DTYPES[llm_spec.dtype])
    lineage = {**(lineage or {}), "stage2_run_key": meta["run_key"], "data_fingerprint": meta["data_fingerprint"],
               "clipvip": meta["vision"]["clipvip"], "llm_base": meta["llm"]["dir"], "stage2_step": meta["step"]}
    save_vlm_dir(vlm, parts.tokenizer, out_dir, hidden_act=llm_spec.hidden_act, prompt=prompt, generation=generation,
                 lineage=lineage)
    return MergeResult(Path(out_dir), diff, directory_digest(out_dir), meta)
