"""Stage-3 training step of the progressive cascade with and without gradient checkpointing.

Each setting runs in its own subprocess so peak memory is that setting's alone: peak RSS
(``ru_maxrss``) on CPU, ``torch.cuda.max_memory_allocated`` on GPU (``--gpu``, default size 256).
Prints a table and writes JSON (``--out``). The naive way is the same step without checkpointing.

    python benchmarks/cascade_memory.py                 # CPU, stage-3 size 64 (feature maps 128^2)
    python benchmarks/cascade_memory.py --gpu --size 256
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import fire


def _child(size: int, checkpointing: bool, steps: int, device: str, threads: int) -> dict:
    import torch

    from bundles.progressive_cascade.scripts.losses import CascadeStageLoss
    from bundles.progressive_cascade.scripts.networks import ProgressiveCascade

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    fov = (384.0, 384.0, 384.0)
    sizes = (size // 4, size // 2, size)
    net = ProgressiveCascade(
        "x2ctgan",
        fov,
        volume_sizes=sizes,
        xray_size=2 * size,
        feature_sizes=(size // 2, size, 2 * size),
        gradient_checkpointing=(False, False, checkpointing),
        stage=3,
    ).to(dev)
    loss_fn = CascadeStageLoss(3, "x2ctgan", fov, perceptual_weight=0.0)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    xrays = torch.rand(1, 2, 2 * size, 2 * size, device=dev)
    target = {
        "ct": torch.rand(1, 1, size, size, size, device=dev),
        "pa": xrays[:, :1],
        "lateral": xrays[:, 1:],
    }
    times = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated() / 2**20
    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    for _ in range(steps):
        t0 = time.perf_counter()
        net.train()
        opt.zero_grad()
        with torch.autocast(dev.type, enabled=dev.type == "cuda"):
            loss = loss_fn(net(xrays), target)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if dev.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    )
    return {
        "size": size,
        "checkpointing": checkpointing,
        "device": device,
        "peak_mib": peak,
        "step_peak_mib": peak - baseline,
        "step_s": statistics.median(times[1:] if len(times) > 1 else times),
        "steps": steps,
    }


def main(
    size: int | None = None,
    gpu: bool = False,
    steps: int = 3,
    threads: int = 1,
    out: str = "outputs/benchmarks/cascade_memory.json",
    _child_args: str | dict | None = None,
) -> None:
    if _child_args:  # fire already parses the JSON argument into a dict
        kwargs = json.loads(_child_args) if isinstance(_child_args, str) else _child_args
        print(json.dumps(_child(**kwargs)))
        return
    size = size or (256 if gpu else 64)
    device = "cuda" if gpu else "cpu"
    rows = []
    for checkpointing in (False, True):
        args = json.dumps(
            {
                "size": size,
                "checkpointing": checkpointing,
                "steps": steps,
                "device": device,
                "threads": threads,
            }
        )
        res = subprocess.run(
            [sys.executable, __file__, "--_child_args", args], capture_output=True, text=True
        )
        if res.returncode != 0:
            rows.append(
                {"size": size, "checkpointing": checkpointing, "error": res.stderr.strip().splitlines()[-1]}
            )
            continue
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(f"{'stage-3 size':>12} {'checkpointing':>13} {'peak MiB':>10} {'step MiB':>9} {'step s':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['size']:>12} {str(r['checkpointing']):>13}  failed: {r['error']}")
        else:
            print(
                f"{r['size']:>12} {str(r['checkpointing']):>13} {r['peak_mib']:>10.0f} {r['step_peak_mib']:>9.0f} {r['step_s']:>8.2f}"
            )
    result = {
        "device": device,
        "rows": rows,
        "memory_measure": "cuda max_memory_allocated" if gpu else "peak RSS",
    }
    if all("error" not in r for r in rows):
        result["peak_ratio_naive_over_checkpointed"] = rows[0]["peak_mib"] / rows[1]["peak_mib"]
        result["step_peak_ratio_naive_over_checkpointed"] = (
            rows[0]["step_peak_mib"] / rows[1]["step_peak_mib"]
        )
        result["time_ratio_checkpointed_over_naive"] = rows[1]["step_s"] / rows[0]["step_s"]
        print(
            f"peak memory naive / checkpointed = {result['peak_ratio_naive_over_checkpointed']:.2f}x "
            f"(above the model's baseline: {result['step_peak_ratio_naive_over_checkpointed']:.2f}x), "
            f"step time checkpointed / naive = {result['time_ratio_checkpointed_over_naive']:.2f}x"
        )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    from common.atomic import atomic_write_text

    atomic_write_text(out, json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    fire.Fire(main)
