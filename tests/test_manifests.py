"""A typo or a failed validation run never replaces the manifest training reads; readers refuse bad manifests."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from hilight.config import ConfigError, load_config
from hilight.data.captions import read_caption_manifest
from hilight.data.contracts import load_contracts
from hilight.data.ingest import DataRejectedError, DataValidationConfig, run_ingest
from hilight.data.manifest import ManifestError, latest_version, prune_versions
from hilight.data.qa import read_qa_manifest
from hilight.retrain import dataset_fingerprints
from tests.conftest import REPO

CONFIG = """pipeline: data_validation
datasets:
  - {{name: billiards, root: {root}, {captions_key}: [captions.json], qa: [qa.json]}}
output_dir: {out}
probe: {{workers: 1}}
progress: false
{extra}"""


def _config(tmp_path, root, *, captions_key="captions", extra="") -> DataValidationConfig:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG.format(root=root, out=tmp_path / "out", captions_key=captions_key, extra=extra))
    return load_config(path, DataValidationConfig)


def _ingest(config: DataValidationConfig, **kw):
    return run_ingest(config, load_contracts(REPO / "data_contracts"), **kw)


def test_a_typo_and_a_failed_run_leave_the_last_good_manifest_in_place(tmp_path, dataset_copy):
    out = tmp_path / "out"
    good = _ingest(_config(tmp_path, dataset_copy))
    assert good.status == "passed" and good.current == good.output_dir
    before = read_caption_manifest(out)
    before_qa = read_qa_manifest(out).rows
    assert len(before.rows) > 0

    # 1. a typo in the dataset block is an error naming the right key, before anything is written
    with pytest.raises(ConfigError, match="did you mean `captions`"):
        _config(tmp_path, dataset_copy, captions_key="capions")

    # 2. a failed run (a quarter of the clips truncated to 0 bytes): reported, kept aside, not published
    zeroed = sorted((dataset_copy / "videos").glob("*.mp4"))[:6]
    for p in zeroed:
        p.write_bytes(b"")
    with pytest.raises(DataRejectedError) as err:
        _ingest(_config(tmp_path, dataset_copy))
    failed = latest_version(out)
    msg = str(err.value)
    assert failed.name.endswith("_failed") and str(failed / "report.md") in msg
    assert f"the last good manifest, {good.output_dir}, stays current" in msg
    assert json.loads((failed / "manifest.json").read_text())["status"] == "failed"

    # what training reads is still the good manifest: same rows, same fingerprint
    after = read_caption_manifest(out)
    pd.testing.assert_frame_equal(after.rows, before.rows)
    assert after.fingerprint == before.fingerprint == good.fingerprints["combined"]
    pd.testing.assert_frame_equal(read_qa_manifest(out).rows, before_qa)
    assert dataset_fingerprints(out) == {"billiards": good.fingerprints["billiards"]}
    meta = json.loads((out / "manifest.json").read_text())  # the stable top-level path follows `current`
    assert meta["status"] == "passed" and meta["contracts"]["videos"]["version"] == "1.1.0"
    assert meta["data_fingerprint"] == good.fingerprints["combined"]

    # the failed run itself is refused by every reader, with where the good one is
    for read in (read_caption_manifest, read_qa_manifest, dataset_fingerprints):
        with pytest.raises(ManifestError, match="is a failed validation run") as refused:
            read(failed)
        assert f"The last good manifest is {good.output_dir}" in str(refused.value)

    # 3. accepting the partial dataset is explicit: the manifest says so, and it becomes current
    partial = _ingest(_config(tmp_path, dataset_copy, extra="allow_rejects: true\n"))
    assert partial.status == "accepted_with_rejects" and partial.current == partial.output_dir
    n_lost = int(before.rows["video_file"].isin([str(p) for p in zeroed]).sum())
    assert partial.problems[0] == "videos/billiards: 6/24 rejected (25.0% > 10%)"
    assert partial.problems[1].startswith(f"captions/billiards: {n_lost}/{len(before.rows)} rejected")
    assert len(read_caption_manifest(out).rows) == len(before.rows) - n_lost


def test_a_dataset_with_no_accepted_row_is_an_error_even_when_rejects_are_allowed(tmp_path, dataset_copy):
    config = _config(tmp_path, dataset_copy, extra="allow_rejects: true\n")
    config.datasets[0].captions, config.datasets[0].qa = [], []
    with pytest.raises(DataRejectedError, match="dataset billiards yielded 0 accepted rows") as err:
        _ingest(config)
    assert "there is no validated manifest yet" in str(err.value)
    with pytest.raises(ManifestError, match="holds no validated manifest; its latest validation run, .*_failed, did not"):
        read_caption_manifest(tmp_path / "out")


def test_missing_and_status_less_manifests_are_refused(tmp_path):
    with pytest.raises(ManifestError, match="does not exist; run `hilight run data_validation"):
        read_caption_manifest(tmp_path / "nowhere")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "manifest.json").write_text(json.dumps({"data_fingerprint": "x", "files": {"captions": "c.parquet"}}))
    with pytest.raises(ManifestError, match="has no validation status"):
        read_qa_manifest(legacy)


def test_old_runs_are_pruned_but_never_the_current_one(tmp_path, dataset_copy):
    out = tmp_path / "out"
    good = _ingest(_config(tmp_path, dataset_copy))
    for name in ("20990101T000000_000000Z_failed", "20990102T000000_000000Z_failed"):
        (out / "versions" / name).mkdir()
    prune_versions(out, keep=1)
    assert sorted(p.name for p in (out / "versions").iterdir()) == sorted([good.output_dir.name,
                                                                           "20990102T000000_000000Z_failed"])
    assert read_caption_manifest(out).fingerprint == good.fingerprints["combined"]
