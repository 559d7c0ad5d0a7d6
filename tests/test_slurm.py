"""SLURM training templates: they render for every bundle, and the rendered script trains and resumes on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xray2ct.slurm import LR_IDS, checkpoints_newest_first, latest_checkpoint, lr_overrides, render

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("bundle", sorted(LR_IDS))
@pytest.mark.parametrize("nodes", [1, 2])
def test_template_renders_valid_bash(bundle, nodes, tmp_path):
    script = render(bundle, "/data/x", str(tmp_path / "run"), nodes=nodes, gpus_per_node=4)
    assert f"#SBATCH --nodes={nodes}" in script and "#SBATCH --requeue" in script
    assert "multi_gpu_train.json" in script and "-m xray2ct.slurm resume-arg" in script
    assert "--nproc_per_node 4" in script
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)  # syntax


def test_every_bundle_has_its_learning_rate_ids():
    import json

    bundles = sorted(p.name for p in (REPO / "bundles").iterdir() if (p / "configs" / "train.json").is_file())
    assert sorted(LR_IDS) == bundles
    for bundle, ids in LR_IDS.items():
        config = json.loads((REPO / "bundles" / bundle / "configs" / "train.json").read_text())
        for key in ids:
            assert isinstance(config[key], float), (bundle, key)


@pytest.mark.parametrize(
    "scaling, processes, factor", [("none", 8, 1.0), ("linear", 8, 8.0), ("sqrt", 4, 2.0), ("linear", 1, 1.0)]
)
def test_learning_rate_scaling_rule(scaling, processes, factor):
    args = lr_overrides("vqgan_3d_patch", processes, scaling)
    if factor == 1.0:
        assert args == []
    else:  # train.json: learning_rate = learning_rate_d = 1e-4
        assert args == [f"--learning_rate {1e-4 * factor:.6g}", f"--learning_rate_d {1e-4 * factor:.6g}"]


def test_unknown_bundle_and_missing_overlay_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown bundle"):
        render("nope", "/d", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        render("perx2ct", "/d", str(tmp_path), overlays="configs/missing.json")


def test_resume_takes_the_newest_readable_checkpoint(tmp_path):
    for epoch in (2, 10, 4):
        torch.save({"model": {"w": torch.zeros(1)}}, tmp_path / f"checkpoint_epoch={epoch}.pt")
    (tmp_path / "model.pt").write_bytes(b"")  # a key-metric file is not an interval checkpoint
    assert [p.name for p in checkpoints_newest_first(tmp_path)][:1] == ["checkpoint_epoch=10.pt"]
    (tmp_path / "checkpoint_epoch=10.pt").write_bytes(b"PK\x03\x04 cut short")  # preempted while copying
    assert latest_checkpoint(tmp_path).name == "checkpoint_epoch=4.pt"
    assert latest_checkpoint(tmp_path / "absent") is None


@pytest.mark.slow
def test_rendered_job_trains_on_two_cpu_processes_and_resumes(phantom_pairs, tmp_path, free_port):
    """The template's own command (torchrun, gloo on CPU) trains the tiny VQ-GAN, and a requeued job resumes."""
    root, out = tmp_path / "b", tmp_path / "out"

    def run(max_epochs: int) -> str:
        script = render(
            "vqgan_3d_patch", str(phantom_pairs["root"]), str(root), nodes=1, gpus_per_node=2,
            overlays="configs/cpu_tiny.json", port=free_port, python=sys.executable,
            extra=f"--max_epochs {max_epochs} --save_interval 1 --output_dir {out}",
        )  # fmt: skip
        job = tmp_path / "job.sbatch"
        job.write_text(script)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        proc = subprocess.run(["bash", str(job)], capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    first = run(1)
    assert "[xray2ct] first start" in first
    assert latest_checkpoint(root / "models").name.endswith("epoch=1.pt")
    second = run(2)  # as after a requeue: the same job, a later epoch budget
    assert "--resume_from" in second and "Restored all variables" in second
    assert latest_checkpoint(root / "models").name.endswith("epoch=2.pt")
