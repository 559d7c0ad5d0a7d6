"""Training hardening as a user meets it (issue 14 items 16-18), through ``python -m monai.bundle run training``.

Each test reproduces a failure of the earlier code: a failed resume overwrote ``models/model_final.pt`` with
untrained weights; a datalist naming a missing file ended in a long traceback from a loader thread (or
SIGABRT); one NaN voxel trained to ``train_loss: nan`` and exit 0. The pe_classifier bundle (tiny overlay) is
the patient, but the plumbing is common/ and wired the same way in every bundle.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "pe_classifier" / "configs"
REPO = Path(__file__).resolve().parents[1]


def train(dataset: Path, root: Path, *extra: str) -> subprocess.CompletedProcess:
    files = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'cpu_tiny.json'}']"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", files,
           "--dataset_dir", str(dataset), "--bundle_root", str(root), "--output_dir", str(root / "out"),
           "--max_epochs", "1", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


@pytest.fixture
def dataset(phantom_pairs, tmp_path) -> Path:
    """A private copy of the 8 phantom pairs (the tests break files in it)."""
    copy = tmp_path / "data"
    shutil.copytree(phantom_pairs["root"], copy)
    return copy


def _training_case(dataset: Path) -> str:
    return json.loads((dataset / "dataset.json").read_text())["training"][0]["id"]


@pytest.mark.slow
def test_failed_resume_leaves_the_final_checkpoint_alone(dataset, tmp_path):
    root = tmp_path / "bundle"
    done = train(dataset, root)
    assert done.returncode == 0, done.stderr[-2000:]
    final = root / "models" / "model_final.pt"
    before = final.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(before[: len(before) // 3])
    failed = train(dataset, root, "--resume_from", str(truncated), "--max_epochs", "2")
    assert failed.returncode != 0
    assert f"{truncated}: cannot read the checkpoint" in failed.stderr
    assert final.read_bytes() == before  # not overwritten with the untrained network


@pytest.mark.slow
def test_missing_file_stops_before_training_with_one_message(dataset, tmp_path):
    case = _training_case(dataset)
    os.remove(dataset / case / "ct.nii.gz")
    failed = train(dataset, tmp_path / "bundle")
    assert failed.returncode == 1  # an error, not SIGABRT (134) from a loader thread
    last = failed.stderr.strip().splitlines()[-1]  # the run ends with the cause, not a traceback
    assert last.startswith("error: ") and last.endswith(
        f"case '{case}' (training split of {dataset / 'dataset.json'}): ct file not found"
    )
    assert not (tmp_path / "bundle" / "models" / "model_final.pt").exists()


@pytest.mark.slow
def test_nan_voxel_is_refused_or_stops_training_naming_the_case(dataset, tmp_path):
    case = _training_case(dataset)
    path = dataset / case / "ct.nii.gz"
    img = nib.load(path)
    array = np.asarray(img.dataobj, dtype=np.float32)
    array[16, 16, 16] = np.nan
    nib.save(nib.Nifti1Image(array, img.affine), path)
    refused = train(dataset, tmp_path / "a")  # the datalist check reads every voxel first
    last = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 1 and f"case '{case}'" in last and "ct has 1 NaN or infinite value(s)" in last
    stopped = train(dataset, tmp_path / "b", "--check_datalist_values", "False")
    assert stopped.returncode == 1
    message = next(line for line in stopped.stderr.splitlines() if line.startswith("common.handlers.NonFiniteLossError"))
    assert "non-finite training loss" in message and case in message
    assert not (tmp_path / "b" / "models" / "model_final.pt").exists()
