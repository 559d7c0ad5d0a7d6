"""Sampling cost of the latent DDPM: DDPM-1000 (the naive way) vs DDIM-50/20/10, one run, same network.

CPU default: the cpu_tiny network on a (8, 4, 4, 4) latent. ``--gpu``: the full-size network at the seed's
latent size (4 x 32 x 32 x 64) with AMP, reported as volumes/hour (sampling only, decoding excluded).
``python benchmarks/latent_ddpm_sampling.py [--gpu] [--out outputs/benchmarks/latent_ddpm.json]``
"""

from __future__ import annotations

import json
import os
import time

import fire
import torch

from bundles.latent_ddpm.scripts.inference import make_scheduler, sample_latents
from bundles.latent_ddpm.scripts.networks import XrayConditionedUNet
from common.atomic import atomic_write_text

TINY = dict(
    channels=(16, 32), attention_levels=(False, True), num_res_blocks=1, num_head_channels=8, norm_num_groups=8,
    cross_attention_dim=16, xray_init_features=8, xray_growth_rate=8, xray_block_config=(2, 2), xray_token_grid=None,
)  # fmt: skip


class CountingNet(torch.nn.Module):
    """Counts network evaluations (samples x calls) during sampling."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x, timesteps, context=None):
        self.calls += x.shape[0]
        return self.net(x, timesteps, context=context)


def main(gpu: bool = False, out: str = "outputs/benchmarks/latent_ddpm.json", threads: int = 1) -> dict:
    torch.set_num_threads(threads)
    device = torch.device("cuda" if gpu else "cpu")
    if gpu:
        net = XrayConditionedUNet(
            4, channels=(64, 128, 256, 512), num_head_channels=32, cross_attention_dim=256
        )
        latent, xray_size, configs = (4, 32, 32, 64), 256, [("ddim", 50), ("ddim", 20), ("ddpm", 1000)]
    else:
        net = XrayConditionedUNet(8, **TINY)
        latent, xray_size, configs = (
            (8, 4, 4, 4),
            32,
            [("ddpm", 1000), ("ddim", 50), ("ddim", 20), ("ddim", 10)],
        )
    counting = CountingNet(net.to(device).eval())
    xray = torch.rand(1, 1, xray_size, xray_size, device=device)
    rows = []
    for kind, steps in configs:
        scheduler = make_scheduler(kind, 1000, steps)
        counting.calls = 0
        with torch.autocast(device.type, enabled=gpu):
            if gpu:
                torch.cuda.synchronize()
            start = time.perf_counter()
            sample_latents(counting, xray, latent, scheduler, 1.0, generator=torch.Generator().manual_seed(0))
            if gpu:
                torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        rows.append(dict(sampler=f"{kind}-{steps}", seconds=seconds, network_evals=counting.calls,
                         volumes_per_hour=3600.0 / seconds))  # fmt: skip
    base = rows[0]["seconds"] if not gpu else next(r["seconds"] for r in rows if r["sampler"] == "ddpm-1000")
    print(f"{'sampler':<12}{'seconds':>10}{'net evals':>11}{'vol/hour':>12}{'speed-up':>10}")
    for r in rows:
        r["speedup_vs_ddpm1000"] = base / r["seconds"]
        print(f"{r['sampler']:<12}{r['seconds']:>10.2f}{r['network_evals']:>11}{r['volumes_per_hour']:>12.0f}"
              f"{r['speedup_vs_ddpm1000']:>10.1f}")  # fmt: skip
    result = dict(device=str(device), latent_shape=list(latent), amp=gpu, rows=rows)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    return result


def cli(gpu: bool = False, out: str = "outputs/benchmarks/latent_ddpm.json", threads: int = 1) -> None:
    main(gpu, out, threads)


if __name__ == "__main__":
    fire.Fire(cli)
