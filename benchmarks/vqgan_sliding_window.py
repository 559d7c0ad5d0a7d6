"""Benchmark of the VQ-GAN's whole-volume paths: blending overhead, naive loop, training and loader throughput.

    python benchmarks/vqgan_sliding_window.py                 # CPU size (tiny network, 256x256x151 volume)
    python benchmarks/vqgan_sliding_window.py --full --device cuda   # 512x512x604, the full network

Prints a table and writes JSON (``--out``, default outputs/benchmarks/vqgan_sliding_window.json).
Each timing runs in its own process so ``peak_rss_mb`` is that method's own peak host memory.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import tempfile
import time

import fire
import numpy as np
import torch
from ignite.engine import Events

from common.atomic import atomic_write_text

TINY = dict(channels=(8, 8, 16), num_res_layers=1, num_embeddings=32, embedding_dim=8)
FULL = dict(channels=(128, 192, 256), num_res_layers=2, num_embeddings=512, embedding_dim=64)


def _net(cfg: dict, device: str):
    from bundles.vqgan_3d_patch.scripts.networks import ReconstructionVQVAE

    torch.manual_seed(0)
    net = ReconstructionVQVAE(
        spatial_dims=3, in_channels=1, out_channels=1, num_res_channels=cfg["channels"], **cfg
    )
    return net.to(device).eval()


def _window_starts(size: int, roi: int, stride: int) -> list[int]:
    starts = list(range(0, max(size - roi, 0) + 1, stride))
    if starts[-1] + roi < size:
        starts.append(size - roi)
    return starts


def naive_linear_blend(net, volume: torch.Tensor, roi, overlap: float, device: str) -> torch.Tensor:
    """The seed's way: a Python loop over windows, linear (tent) weights, accumulators on the host."""
    size = volume.shape[2:]
    strides = [max(1, int(r * (1 - overlap))) for r in roi]
    ramps = [torch.minimum(torch.arange(1, r + 1), torch.arange(r, 0, -1)).float() for r in roi]
    weight = ramps[0][:, None, None] * ramps[1][None, :, None] * ramps[2][None, None, :]
    out = torch.zeros_like(volume)
    norm = torch.zeros(size)
    for x in _window_starts(size[0], roi[0], strides[0]):
        for y in _window_starts(size[1], roi[1], strides[1]):
            for z in _window_starts(size[2], roi[2], strides[2]):
                sl = (slice(x, x + roi[0]), slice(y, y + roi[1]), slice(z, z + roi[2]))
                with torch.no_grad():
                    pred = net(volume[(slice(None), slice(None), *sl)].to(device)).cpu()
                out[(slice(None), slice(None), *sl)] += pred * weight
                norm[sl] += weight
    return out / norm


def _n_windows(size, roi, overlap) -> int:
    """Windows MONAI places (stride ``int(roi * (1 - overlap))``, last window flush with the end)."""
    counts = [
        len(_window_starts(s, r, max(1, int(r * (1 - overlap))) if r < s else r)) for s, r in zip(size, roi)
    ]
    return int(np.prod(counts))


def _measure(kind: str, cfg: dict, size, roi, overlap: float, device: str, queue) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2) if device == "cpu" else 1)
    from common.codec import reconstruct_per_window
    from common.sliding_window import LatentSlidingWindowInferer

    def windows(mode: str) -> LatentSlidingWindowInferer:
        return LatentSlidingWindowInferer(roi, overlap=overlap, mode=mode, sw_device=device, device="cpu")

    net = _net(cfg, device)
    volume = torch.rand(1, 1, *size)
    with torch.no_grad():
        net(torch.rand(1, 1, *roi, device=device))  # warm-up
    t = time.perf_counter()
    if kind == "network_only":
        window = volume[(slice(None), slice(None), *(slice(0, r) for r in roi))].contiguous()
        with torch.no_grad():
            for _ in range(_n_windows(size, roi, overlap)):
                net(window.to(device)).cpu()
    elif kind == "sliding_window_gaussian":
        reconstruct_per_window(net, volume, windows("gaussian"))
    elif kind == "sliding_window_constant":
        reconstruct_per_window(net, volume, windows("constant"))
    else:
        naive_linear_blend(net, volume, roi, overlap, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    queue.put((seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0))


def _in_child(kind, *args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(kind, *args, queue))
    proc.start()
    try:
        return queue.get(timeout=3600)
    finally:
        proc.join(timeout=60)


def training_throughput(cfg: dict, patch, steps: int, device: str) -> float:
    from monai.losses import PatchAdversarialLoss
    from monai.networks.nets import VQVAE, PatchDiscriminator

    from bundles.vqgan_3d_patch.scripts.data import PrepareCTBatch
    from bundles.vqgan_3d_patch.scripts.engines import VQGANTrainer

    net = VQVAE(spatial_dims=3, in_channels=1, out_channels=1, num_res_channels=cfg["channels"], **cfg).to(
        device
    )
    disc = PatchDiscriminator(spatial_dims=3, channels=8, in_channels=1, num_layers_d=2).to(device)
    batch = {"ct": torch.rand(2, 1, *patch)}
    trainer = VQGANTrainer(
        device=device, max_epochs=1, epoch_length=steps + 1, train_data_loader=[batch] * (steps + 1), generator=net,
        g_optimizer=torch.optim.Adam(net.parameters()), recon_loss_function=torch.nn.L1Loss(), discriminator=disc,
        d_optimizer=torch.optim.Adam(disc.parameters()), adversarial_loss_function=PatchAdversarialLoss(),
        adversarial_start=0, prepare_batch=PrepareCTBatch("ct"),
    )  # fmt: skip
    times = []
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: times.append(time.perf_counter()))
    trainer.run()
    return 2 * steps / (time.perf_counter() - times[1])  # first step is warm-up


def loader_throughput(patch, n_volumes: int, vol_size, samples: int) -> dict[str, float]:
    """Patches/s: CacheDataset + RandSpatialCropSamplesd against re-reading the NIfTI for every patch."""
    import nibabel as nib
    from monai.data import CacheDataset, Dataset
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        RandSpatialCropd,
        RandSpatialCropSamplesd,
    )

    from common.transforms import hu_window_transform

    with tempfile.TemporaryDirectory() as tmp:
        items = []
        for i in range(n_volumes):
            path = os.path.join(tmp, f"ct{i}.nii.gz")
            nib.save(
                nib.Nifti1Image(np.random.randint(-1024, 2000, vol_size).astype(np.int16), np.eye(4)), path
            )
            items.append({"ct": path})
        load = [LoadImaged("ct", image_only=True), EnsureChannelFirstd("ct"), hu_window_transform("ct")]
        cached = CacheDataset(items, Compose([*load, RandSpatialCropSamplesd("ct", patch, samples, random_size=False)]),
                              progress=False)  # fmt: skip
        t = time.perf_counter()
        n = sum(len(cached[i]) for i in range(n_volumes))
        cached_rate = n / (time.perf_counter() - t)
        naive = Dataset(items, Compose([*load, RandSpatialCropd("ct", patch, random_size=False)]))
        t = time.perf_counter()
        for i in range(n_volumes * samples):
            naive[i % n_volumes]
        naive_rate = n_volumes * samples / (time.perf_counter() - t)
    return {
        "cached_patches_per_s": cached_rate,
        "reread_patches_per_s": naive_rate,
        "speedup": cached_rate / naive_rate,
    }


def main(
    full: bool = False,
    device: str = "cpu",
    overlap: float = 0.25,
    train_steps: int = 3,
    out: str | None = None,
):
    """Run every measurement; ``--full`` uses 512x512x604 and the ~36M-parameter network (GPU)."""
    cfg = FULL if full else TINY
    size = (512, 512, 604) if full else (256, 256, 151)
    roi = (256, 256, 128) if full else (64, 64, 32)
    patch = roi if full else (32, 32, 32)
    rows = {}
    for kind in ("network_only", "sliding_window_gaussian", "sliding_window_constant", "naive_linear_loop"):
        seconds, rss = _in_child(kind, cfg, size, roi, overlap, device)
        rows[kind] = {"seconds": seconds, "peak_rss_mb": rss}
    base = rows["network_only"]["seconds"]
    for row in rows.values():
        row["ratio_to_network"] = row["seconds"] / base
    result = {
        "device": device,
        "volume": list(size),
        "window": list(roi),
        "overlap": overlap,
        "n_windows": _n_windows(size, roi, overlap),
        "network": cfg,
        "volume_mb_float32": float(np.prod(size)) * 4 / 2**20,
        "reconstruction": rows,
        "blending_overhead_gaussian": rows["sliding_window_gaussian"]["ratio_to_network"],
        "naive_over_monai": rows["naive_linear_loop"]["seconds"] / rows["sliding_window_gaussian"]["seconds"],
        "training_patches_per_s": training_throughput(cfg, patch, train_steps, device),
        "loader": loader_throughput(patch, 2, (96, 96, 64), 8),
    }
    print(f"volume {size}, window {roi}, overlap {overlap}, {result['n_windows']} windows, device {device}")
    print(f"{'method':28s} {'seconds':>9s} {'x network':>10s} {'peak RSS MB':>12s}")
    for kind, row in rows.items():
        print(f"{kind:28s} {row['seconds']:9.2f} {row['ratio_to_network']:10.3f} {row['peak_rss_mb']:12.0f}")
    print(
        f"training: {result['training_patches_per_s']:.2f} patches/s (patch {patch}, batch 2, with discriminator)"
    )
    ld = result["loader"]
    print(f"loader: cached {ld['cached_patches_per_s']:.1f} patches/s, re-read {ld['reread_patches_per_s']:.1f} "
          f"patches/s ({ld['speedup']:.1f}x)")  # fmt: skip
    out = out or os.path.join("outputs", "benchmarks", "vqgan_sliding_window.json")
    atomic_write_text(out, json.dumps(result, indent=2))
    print(f"wrote {out}")
    return None


if __name__ == "__main__":
    fire.Fire(main)
