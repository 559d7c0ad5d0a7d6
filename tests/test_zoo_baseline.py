"""The zoo form keeps the X-ray -> CT bundles' stored mean-CT baseline: ``X.baseline.pt`` beside the bare state dict,
bound by ``baseline_sha256`` in the record sidecar, read with ``weights_only`` (docs/ARCHITECTURE.md, "Zoo form")."""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from common.baselines import BASELINE_KEY, mean_ct_baseline
from common.checkpoint import (
    CheckpointRecord,
    baseline_path,
    build_network,
    export_bare,
    read_checkpoint,
    record_of,
)
from common.errors import InputError
from xray2ct.zoo import export_zoo_weights

TINY = {"image_size": 16, "base_channels": 4, "max_downsamplings": 2}  # the cheapest allow-listed network


def _baseline(fill: float = -700.0) -> dict:
    """A checkpoint's baseline entry as CheckpointSaver writes it (common.baselines.mean_ct_state)."""
    mean = torch.full((4, 5, 6), fill, dtype=torch.float32)
    mean[1, 2, 3] = 40.0
    spacing = torch.tensor([2.0, 2.5, 3.0], dtype=torch.float64)
    return {"mean_ct": mean, "spacing": spacing, "n_cases": 3, "datalist_sha256": "ab" * 32}


def _training_checkpoint(path: Path, baseline: dict | None) -> Path:
    net = build_network("bundles.pix2pix_phase.scripts.networks.PhaseGenerator", **TINY)
    contents = {"model": net.state_dict(), "record": CheckpointRecord("pix2pix_phase", network=net, version="0").state_dict()}
    if baseline is not None:
        contents[BASELINE_KEY] = baseline
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(contents, path)
    return path


def test_the_baseline_round_trips_through_the_zoo_form(tmp_path):
    src = _training_checkpoint(tmp_path / "train" / "model.pt", _baseline())
    weights, sidecar = export_bare(src, tmp_path / "models" / "model.pt")
    assert sorted(os.listdir(tmp_path / "models")) == ["model.baseline.pt", "model.pt", "model.record.json"]
    assert "mean_ct" not in torch.load(weights, weights_only=True)  # still the bare state dict MONAI loads
    contents = read_checkpoint(weights)
    stored = contents[BASELINE_KEY]
    assert torch.equal(stored["mean_ct"], _baseline()["mean_ct"]) and torch.equal(stored["spacing"], _baseline()["spacing"])
    assert (stored["n_cases"], stored["datalist_sha256"]) == (3, "ab" * 32)
    assert "baseline_sha256" not in record_of(contents)  # bookkeeping of the form, like weights_sha256
    assert record_of(contents) == record_of(read_checkpoint(src))
    report = mean_ct_baseline(record_of(contents), contents, weights)  # what the web app and the pipeline report
    assert report["volume"].array.shape == (4, 5, 6) and float(report["volume"].array[1, 2, 3]) == 40.0
    assert report["n_cases"] == 3 and "stored mean training CT" in report["source"]

    again, _ = export_bare(weights, weights)  # in place (export_zoo_weights): the baseline stays bound
    assert torch.equal(read_checkpoint(again)[BASELINE_KEY]["mean_ct"], stored["mean_ct"])


def test_export_zoo_weights_skips_a_listed_baseline(tmp_path):
    root = tmp_path / "bundle"
    _training_checkpoint(root / "models" / "model.pt", _baseline())
    (root / "large_files.yml").write_text('large_files:\n  - path: "models/model.pt"\n  - path: "models/model.baseline.pt"\n')
    [(weights, _)] = export_zoo_weights(root)
    assert export_zoo_weights(root) == [(weights, str(root / "models" / "model.record.json"))]
    assert BASELINE_KEY in read_checkpoint(weights)


def test_a_checkpoint_without_baseline_writes_none(tmp_path):
    weights, sidecar = export_bare(_training_checkpoint(tmp_path / "t.pt", None), tmp_path / "models" / "model.pt")
    assert not os.path.exists(baseline_path(weights)) and "baseline_sha256" not in json.loads(Path(sidecar).read_text())
    assert BASELINE_KEY not in read_checkpoint(weights)


def test_a_swapped_missing_or_pickled_baseline(tmp_path):
    weights, sidecar = export_bare(_training_checkpoint(tmp_path / "a.pt", _baseline()), tmp_path / "a" / "model.pt")
    other, _ = export_bare(_training_checkpoint(tmp_path / "b.pt", _baseline(-500.0)), tmp_path / "b" / "model.pt")
    os.replace(baseline_path(other), baseline_path(weights))  # another model's baseline beside these weights
    with pytest.raises(InputError, match=r"a/model.baseline.pt: belongs to other weights .*swapped baseline"):
        read_checkpoint(weights)

    os.remove(baseline_path(weights))  # published without it: loads, says so, reports no stored baseline
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert BASELINE_KEY not in read_checkpoint(weights)
    assert any("model.baseline.pt: not found" in str(w.message) for w in caught)

    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"mean_ct": Payload()}, baseline_path(weights), pickle_protocol=pickle.DEFAULT_PROTOCOL)
    record = json.loads(Path(sidecar).read_text())  # an attacker who also rewrites the sidecar's hash
    from common.checkpoint import file_sha256

    record["baseline_sha256"] = file_sha256(baseline_path(weights))
    Path(sidecar).write_text(json.dumps(record))
    with pytest.raises(InputError, match=r"a/model.baseline.pt: cannot read the stored baseline"):
        read_checkpoint(weights)
