"""Sampling cost of the latent DDPM: DDPM-1000 (the naive way) against DDIM-50/20/10, one run, same network.

The network is the bundle's ``network_def`` (``configs/train.json``; on CPU with the ``cpu_tiny.json`` overlay)
and the schedule the bundle's full one (1000 training steps). CPU default: a (8, 4, 4, 4) latent from 32^2
X-rays. ``--gpu``: the full network at the seed's latent size (4 x 32 x 32 x 64, 256^2 X-rays), float32 as the
bundle samples (``--amp bfloat16`` for autocast). Sampling only (decoding excluded), guidance scale 1 (one
network evaluation per step, counted).

    python benchmarks/latent_ddpm_sampling.py [--gpu] [--amp bfloat16] [--out outputs/benchmarks/latent_ddpm.json]
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

CPU_SIZE = dict(latent_shape=(8, 4, 4, 4), xray_size=32)
GPU_SIZE = dict(latent_shape=(4, 32, 32, 64), xray_size=256)  # the seed's (X-ray2CTPA) latent
TRAIN_STEPS = 1000  # configs/train.json num_train_timesteps


class CountingNet(torch.nn.Module):
    """Counts network evaluations (samples x calls) during sampling."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x, timesteps, context=None):
        self.calls += x.shape[0]
        return self.net(x, timesteps, context=context)


def build_network(tiny: bool, device, latent_shape: Sequence[int], xray_size: int):
    """(network in eval mode, the config's num_train_timesteps) from the bundle's ``train.json`` (+ cpu_tiny)."""
    from monai.bundle import ConfigParser

    configs = REPO / "bundles" / "latent_ddpm" / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train.json")] + ([str(configs / "cpu_tiny.json")] if tiny else []))
    parser["latent_shape"] = [int(s) for s in latent_shape]  # normally read from the latent cache
    parser["xray_size"] = int(xray_size)
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def").to(device).eval()
    return net, int(parser.get_parsed_content("num_train_timesteps"))


def _autocast(device: torch.device, amp: str | None):
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, amp))


def warm_up(net, xray: torch.Tensor, latent_shape: Sequence[int], amp: str | None = None) -> None:
    with torch.no_grad(), _autocast(xray.device, amp):
        net(torch.randn(1, *latent_shape, device=xray.device), torch.tensor([0], device=xray.device), xray)


def time_sampler(net, xray: torch.Tensor, latent_shape, kind: str, steps: int, train_steps: int,
                 amp: str | None = None) -> dict:  # fmt: skip
    """Seconds to sample one latent with ``kind`` ("ddpm"/"ddim") in ``steps`` steps, network evaluations counted."""
    from bundles.latent_ddpm.scripts.inference import make_scheduler, sample_latents

    counting = CountingNet(net)
    scheduler = make_scheduler(kind, train_steps, steps)
    cuda = xray.device.type == "cuda"
    with _autocast(xray.device, amp):
        if cuda:
            torch.cuda.synchronize(xray.device)
        start = time.perf_counter()
        sample_latents(
            counting, xray, latent_shape, scheduler, 1.0, generator=torch.Generator().manual_seed(0)
        )
        if cuda:
            torch.cuda.synchronize(xray.device)
    seconds = time.perf_counter() - start
    return {"sampler": kind, "steps": int(steps), "amp": amp, "seconds": seconds, "network_evals": counting.calls,
            "seconds_per_step": seconds / steps, "volumes_per_hour": 3600.0 / seconds}  # fmt: skip


def main(gpu: bool = False, amp: str | None = None, out: str = "outputs/benchmarks/latent_ddpm.json",
         threads: int = 1) -> dict:  # fmt: skip
    torch.set_num_threads(threads)
    device = torch.device("cuda" if gpu else "cpu")
    size = GPU_SIZE if gpu else CPU_SIZE
    net, _ = build_network(not gpu, device, size["latent_shape"], size["xray_size"])
    xray = torch.rand(1, 1, size["xray_size"], size["xray_size"], generator=torch.Generator().manual_seed(0))
    xray = xray.to(device)
    warm_up(net, xray, size["latent_shape"], amp)
    plan = [("ddpm", TRAIN_STEPS), ("ddim", 50), ("ddim", 20), ("ddim", 10)]
    rows = [
        time_sampler(net, xray, size["latent_shape"], kind, steps, TRAIN_STEPS, amp) for kind, steps in plan
    ]
    base = rows[0]["seconds"]
    print(f"{'sampler':<12}{'seconds':>10}{'net evals':>11}{'vol/hour':>12}{'speed-up':>10}")
    for r in rows:
        r["speedup_vs_ddpm1000"] = base / r["seconds"]
        print(f"{r['sampler']}-{r['steps']:<7}{r['seconds']:>10.2f}{r['network_evals']:>11}"
              f"{r['volumes_per_hour']:>12.0f}{r['speedup_vs_ddpm1000']:>10.1f}")  # fmt: skip
    result = dict(device=str(device), network="train.json" + ("" if gpu else " + cpu_tiny.json"),
                  latent_shape=list(size["latent_shape"]), xray_size=size["xray_size"], amp=amp,
                  torch=torch.__version__, rows=rows)  # fmt: skip
    from common.atomic import atomic_write_text

    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


def cli(gpu: bool = False, amp: str | None = None, out: str = "outputs/benchmarks/latent_ddpm.json",
        threads: int = 1) -> None:  # fmt: skip
    main(gpu, amp, out, threads)


if __name__ == "__main__":
    import fire

    fire.Fire(cli)
