"""Benchmark: vectorised bootstrap AUC CI vs the naive Python loop, and PE classifier inference throughput.

    python benchmarks/pe_bootstrap.py [--n_cases 200] [--n_resamples 1000] [--gpu] [--out outputs/benchmarks/pe_bootstrap.json]

CPU defaults finish in well under a minute; ``--gpu`` times the full-size (128^3, resnet18) CT classifier.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from bundles.pe_classifier.scripts.networks import build_pe_classifier
from common.atomic import atomic_write_text
from common.classification_metrics import bootstrap_auc_ci, bootstrap_auc_naive


def _time(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_bootstrap(n_cases: int, n_resamples: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n_cases)
    s = rng.normal(size=n_cases) + y
    fast = bootstrap_auc_ci(y, s, n_resamples, seed=seed)
    naive = bootstrap_auc_naive(y, s, n_resamples, seed=seed)
    t_fast = _time(lambda: bootstrap_auc_ci(y, s, n_resamples, seed=seed), repeats=3)
    t_naive = _time(lambda: bootstrap_auc_naive(y, s, n_resamples, seed=seed))
    return {
        "n_cases": n_cases,
        "n_resamples": n_resamples,
        "vectorised_s": t_fast,
        "naive_loop_s": t_naive,
        "speedup": t_naive / t_fast,
        "same_ci": bool(np.isclose(fast.low, naive.low) and np.isclose(fast.high, naive.high)),
    }


def bench_inference(size: int, arch: str, width: float, batch: int, device: str, iters: int = 5) -> dict:
    net = build_pe_classifier("ct", arch, ct_width=width).to(device).eval()
    x = torch.rand(batch, 1, size, size, size, device=device)
    with torch.no_grad():
        net(x)  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = _time(lambda: (net(x), torch.cuda.synchronize() if device.startswith("cuda") else None), iters)
    return {
        "size": size,
        "arch": arch,
        "width": width,
        "batch": batch,
        "device": device,
        "volumes_per_s": batch / t,
    }


def main(
    n_cases: int = 200,
    n_resamples: int = 1000,
    gpu: bool = False,
    out: str = "outputs/benchmarks/pe_bootstrap.json",
):
    torch.set_num_threads(1)
    boot = [bench_bootstrap(n, n_resamples) for n in (50, n_cases)]
    print("| cases | resamples | vectorised (s) | naive loop (s) | speedup | same CI |")
    print("|---|---|---|---|---|---|")
    for r in boot:
        print(
            f"| {r['n_cases']} | {r['n_resamples']} | {r['vectorised_s']:.4f} | {r['naive_loop_s']:.3f} | "
            f"{r['speedup']:.0f}x | {r['same_ci']} |"
        )
    cases = [(32, "resnet10", 0.125, 8, "cpu"), (64, "resnet10", 0.25, 2, "cpu")]
    if gpu and torch.cuda.is_available():
        cases += [(128, "resnet18", 1.0, 4, "cuda"), (128, "resnet10", 1.0, 4, "cuda")]
    infer = [bench_inference(*c) for c in cases]
    print("\n| CT size | arch | width | batch | device | volumes/s |")
    print("|---|---|---|---|---|---|")
    for r in infer:
        print(
            f"| {r['size']}^3 | {r['arch']} | {r['width']} | {r['batch']} | {r['device']} | {r['volumes_per_s']:.1f} |"
        )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_write_text(out, json.dumps({"bootstrap": boot, "inference": infer, "threads": 1}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
