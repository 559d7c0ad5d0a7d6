"""SLURM training jobs for any bundle: one node with several GPUs (``torchrun --standalone``) or several nodes.

Render a job script, read it, submit it::

    python -m xray2ct.slurm render --bundle perx2ct --dataset_dir /data/lidc_perx2ct --bundle_root runs/perx2ct \\
        --nodes 1 --gpus_per_node 4 --time 48:00:00 > perx2ct.sbatch
    sbatch perx2ct.sbatch                      # console script: xray2ct-slurm-train render ...

``render`` takes every argument of :func:`render` (``--overlays configs/a.json,configs/b.json``,
``--lr_scaling linear``, ``--partition gpu``, ``--extra '--max_epochs 10'``...).

Preemption: the job asks SLURM to be requeued (``--requeue``; ``--signal=B:USR1@300`` gives the script five
minutes' notice, which it turns into a requeue). Every (re)start resumes from the newest readable checkpoint in
``<bundle_root>/models`` through the one resume switch of the bundles (``--resume_from``; ``resume-arg`` below
prints it, or nothing on a first start), so a preempted run loses at most ``save_interval`` epochs.

Batch and learning rate across GPUs: every process loads the config's ``batch_size`` (per GPU), so the global
batch is ``batch_size x nodes x gpus_per_node``. By default the learning rate stays the config's (what the
papers' multi-GPU runs did: PerX2CT's 4-GPU PyTorch Lightning run, X-ray2CTPA's); ``--lr_scaling linear``
multiplies every learning-rate id of the bundle by the number of processes (Goyal et al. 2017, "Accurate,
Large Minibatch SGD"; use a warm-up with large factors), ``sqrt`` by its square root (a common choice for Adam).

The rendered script is plain bash: with SLURM's variables unset it runs one node with ``--gpus_per_node``
processes, which is how the test suite runs it on CPU (gloo).
"""

from __future__ import annotations

import math
import os
import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# the learning-rate ids of each bundle's train.json (scaled together by --lr_scaling; docs/ARCHITECTURE.md,
# "The bundle contract"): pix2pix_phase's learning_rate_d follows its learning_rate by reference
LR_IDS: dict[str, tuple[str, ...]] = {
    "vqgan_3d_patch": ("learning_rate", "learning_rate_d"),
    "latent_ddpm": ("learning_rate",),
    "perx2ct": ("learning_rate",),
    "progressive_cascade": ("learning_rate",),
    "pix2pix_phase": ("learning_rate",),
    "pe_classifier": ("learning_rate",),
}

_CHECKPOINT = re.compile(r"(?:.*_)?(?:epoch|iteration)=(\d+)\.pt$")


def checkpoints_newest_first(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Interval checkpoints (``*epoch=N.pt`` / ``*iteration=N.pt``) of ``ckpt_dir``, the newest first."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _CHECKPOINT.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path.stat().st_mtime, path))
    return [p for *_, p in sorted(found, reverse=True)]


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The newest interval checkpoint that reads back whole (a preemption can cut the newest file short;
    saves are atomic, but a copied or synced folder may not be)."""
    from common.checkpoint import read_checkpoint
    from common.errors import InputError

    for path in checkpoints_newest_first(ckpt_dir):
        try:
            read_checkpoint(path)
        except InputError:
            continue
        return path
    return None


def resume_arg(ckpt_dir: str) -> str:
    """``--resume_from <newest checkpoint>`` for the bundle's command line, or "" on a first start."""
    path = latest_checkpoint(ckpt_dir)
    return "" if path is None else f"--resume_from {shlex.quote(str(path))}"


def lr_overrides(bundle: str, processes: int, scaling: str) -> list[str]:
    """``--<lr id> <value>`` arguments scaling the bundle's learning rates for ``processes`` GPUs."""
    if scaling == "none" or processes == 1:
        return []
    factor = {"linear": float(processes), "sqrt": math.sqrt(processes)}.get(scaling)
    if factor is None:
        raise ValueError(f"--lr_scaling must be none, linear or sqrt, not {scaling!r}")
    import json

    config = json.loads((REPO / "bundles" / bundle / "configs" / "train.json").read_text())
    return [f"--{key} {float(config[key]) * factor:.6g}" for key in LR_IDS[bundle]]


def render(
    bundle: str,
    dataset_dir: str,
    bundle_root: str,
    nodes: int = 1,
    gpus_per_node: int = 4,
    overlays: tuple[str, ...] | list[str] | str = (),
    lr_scaling: str = "none",
    time: str = "24:00:00",
    partition: str | None = None,
    cpus_per_task: int = 8,
    mem: str = "64G",
    port: int = 29500,
    python: str = "python",
    extra: str = "",
) -> str:
    """The sbatch script (text) training ``bundle`` with ``train.json`` + ``multi_gpu_train.json`` + overlays.

    ``overlays``: further config files (e.g. ``configs/cpu_tiny.json``), relative to the bundle's folder or
    absolute. ``extra``: further ``monai.bundle run`` arguments (e.g. ``--max_epochs 10``).
    """
    if bundle not in LR_IDS:
        raise ValueError(f"unknown bundle {bundle!r}; one of {sorted(LR_IDS)}")
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError("nodes and gpus_per_node must be at least 1")
    configs = REPO / "bundles" / bundle / "configs"
    if isinstance(overlays, str):
        overlays = [o for o in overlays.split(",") if o]
    files = [str(configs / "train.json"), str(configs / "multi_gpu_train.json")]
    files += [o if os.path.isabs(o) else str((REPO / "bundles" / bundle / o).resolve()) for o in overlays]
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{f}: config file not found")
    config_arg = "[" + ",".join(f"'{f}'" for f in files) + "]"
    processes = nodes * gpus_per_node
    lr_args = " ".join(lr_overrides(bundle, processes, lr_scaling))
    q = shlex.quote
    ckpt_dir = os.path.join(bundle_root, "models")
    header = [
        "#!/usr/bin/env bash",
        f"#SBATCH --job-name=xray2ct-{bundle}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",  # one torchrun per node; it starts one process per GPU
        f"#SBATCH --gres=gpu:{gpus_per_node}",
        f"#SBATCH --cpus-per-task={cpus_per_task}",
        f"#SBATCH --mem={mem}",
        f"#SBATCH --time={time}",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@300",
        f"#SBATCH --output=xray2ct-{bundle}-%j.log",
    ]
    if partition:
        header.append(f"#SBATCH --partition={partition}")
    body = f"""
# Rendered by `python -m xray2ct.slurm render` for bundle {bundle}: {nodes} node(s) x {gpus_per_node} GPU(s),
# global batch = train.json batch_size x {processes}; learning-rate scaling: {lr_scaling}.
set -euo pipefail
cd {q(str(REPO))}
export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{max(1, cpus_per_task // gpus_per_node)}}}
# five minutes before the time limit or on preemption: requeue this job; the restart resumes
trap 'echo "[xray2ct] signal: requeueing ${{SLURM_JOB_ID:-}}"; [ -n "${{SLURM_JOB_ID:-}}" ] && scontrol requeue "$SLURM_JOB_ID"' USR1
RESUME=$({q(python)} -m xray2ct.slurm resume-arg {q(ckpt_dir)})
echo "[xray2ct] ${{RESUME:-first start}}"
NNODES=${{SLURM_NNODES:-1}}
if [ "$NNODES" -gt 1 ]; then
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  LAUNCH=(srun --kill-on-bad-exit=1 {q(python)} -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node {gpus_per_node}
          --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:{port}" --rdzv_id "${{SLURM_JOB_ID:-xray2ct}}")
else
  LAUNCH=({q(python)} -m torch.distributed.run --standalone --nproc_per_node {gpus_per_node})
fi
# shellcheck disable=SC2086  # RESUME and the learning rates are whole arguments on purpose
"${{LAUNCH[@]}}" -m monai.bundle run training --config_file {q(config_arg)} \\
    --dataset_dir {q(dataset_dir)} --bundle_root {q(bundle_root)} $RESUME {lr_args} {extra} &
wait $!
"""
    return "\n".join(header) + "\n" + body


class _CLI:
    """``render`` prints the sbatch script; ``resume-arg`` prints the resume switch (or nothing)."""

    @staticmethod
    def render(bundle: str, dataset_dir: str, bundle_root: str, **options) -> None:
        import sys

        try:
            print(render(bundle, dataset_dir, bundle_root, **options), end="")
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    @staticmethod
    def resume_arg(ckpt_dir: str) -> None:
        print(resume_arg(ckpt_dir))


if __name__ == "__main__":
    import fire

    fire.Fire(_CLI, name="xray2ct-slurm-train")
