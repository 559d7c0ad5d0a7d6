"""Volume translation time of the pix2pix_phase generator: slices batched (MONAI SliceInferer) vs one at a time.

    python benchmarks/pix2pix_inference.py [--size 128] [--slices 32] [--base_channels 32] [--batch_sizes "[1,8,32]"] [--gpu]
        [--out outputs/benchmarks/pix2pix_inference.json]

The naive way is a Python loop feeding one axial slice per forward pass (what the seed code did); the
bundle's way is ``SliceInferer(roi_size=(-1, -1), spatial_dim=2, sw_batch_size=N)``. Both translate
the same random volume with the same untrained generator (timing does not depend on the weights);
outputs are checked to agree. ``--gpu`` uses CUDA, the clinical size (512 x 512 x 128) and the full generator (base 64) by default.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import time

import fire
import torch
from monai.inferers import SliceInferer
from tqdm import tqdm

from bundles.pix2pix_phase.scripts.networks import PhaseGenerator
from common.atomic import atomic_write_text


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_slice_at_a_time(net: torch.nn.Module, volume: torch.Tensor) -> torch.Tensor:
    """Naive loop: (1, 1, X, Y, Z) -> one forward pass per axial slice."""
    return torch.stack([net(volume[..., z]) for z in range(volume.shape[-1])], dim=-1)


def _time_interleaved(fns: dict, device: torch.device, repeats: int) -> tuple[dict, dict]:
    """Median seconds per method; methods alternate within each round so machine-load drift hits all alike."""
    outputs = {name: fn() for name, fn in fns.items()}  # warm-up (allocator, cudnn autotune)
    times: dict = {name: [] for name in fns}
    for _ in tqdm(range(repeats), desc="rounds", unit="round"):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            outputs[name] = fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}, outputs


def main(
    size: int | None = None,
    slices: int | None = None,
    base_channels: int | None = None,
    batch_sizes: tuple | list = (1, 8, 32),
    repeats: int = 5,
    gpu: bool = False,
    threads: int = 1,
    out: str = "outputs/benchmarks/pix2pix_inference.json",
) -> dict:
    """Print a table of seconds per volume and the speed-up over the naive loop; write JSON to ``out``."""
    device = torch.device("cuda" if gpu else "cpu")
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu given but CUDA is not available")
    torch.set_num_threads(threads)
    size = size or (512 if gpu else 128)
    slices = slices or (128 if gpu else 32)
    base_channels = base_channels or (64 if gpu else 32)
    torch.manual_seed(0)
    net = PhaseGenerator(size, base_channels=base_channels).to(device).eval()
    volume = torch.rand(1, 1, size, size, slices, device=device) * 2 - 1
    fns = {0: lambda: one_slice_at_a_time(net, volume)}
    for bs in batch_sizes:
        inferer = SliceInferer(roi_size=(-1, -1), spatial_dim=2, sw_batch_size=int(bs), progress=False)
        fns[int(bs)] = lambda inferer=inferer: inferer(volume, net)
    with torch.inference_mode():
        seconds, outputs = _time_interleaved(fns, device, repeats)
    naive_s, reference = seconds[0], outputs[0]
    rows = [{"method": "python loop, 1 slice/pass", "sw_batch_size": 1, "seconds": naive_s}]
    for bs in (int(b) for b in batch_sizes):
        max_diff = float((torch.as_tensor(outputs[bs]) - reference).abs().max())
        rows.append(
            {"method": "SliceInferer", "sw_batch_size": bs, "seconds": seconds[bs], "max_abs_diff": max_diff}
        )
    for r in rows:
        r["slices_per_s"] = slices / r["seconds"]
        r["speedup_vs_naive"] = naive_s / r["seconds"]
    print(
        f"\npix2pix_phase generator, volume {size}x{size}x{slices}, base {base_channels}, {device}, {threads} thread(s)"
    )
    print(f"{'method':<28}{'batch':>6}{'s/volume':>10}{'slices/s':>10}{'speed-up':>10}")
    for r in rows:
        print(
            f"{r['method']:<28}{r['sw_batch_size']:>6}{r['seconds']:>10.3f}{r['slices_per_s']:>10.1f}"
            f"{r['speedup_vs_naive']:>9.2f}x"
        )
    result = {
        "benchmark": "pix2pix_inference",
        "volume": [size, size, slices],
        "generator": {"image_size": size, "base_channels": base_channels, "downsamplings": net.n_down},
        "device": str(device) if not gpu else torch.cuda.get_device_name(device),
        "threads": threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "repeats": repeats,
        "statistic": "median seconds per volume after one warm-up, methods interleaved per round",
        "rows": rows,
    }
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {os.path.abspath(out)}")
    return result


@functools.wraps(main)  # fire reads main's signature, so --help works
def cli(*args, **kwargs) -> None:
    """fire entry point (prints the table, not the returned dict)."""
    main(*args, **kwargs)


if __name__ == "__main__":
    fire.Fire(cli)
