"""VQ-GAN whole-volume reconstruction by sliding windows at full size: time, blending overhead, peak memory.

    python benchmarks/vqgan_sliding_window.py                 # tiny network, 512x512x604 volume, CPU
    python benchmarks/vqgan_sliding_window.py --network full --device cuda --amp True   # the bundle's network

The volume is the size this bundle exists for (512x512x604), the windows are the bundle's (256x256x128,
overlap 0.25, from ``configs/inference.json``) and the output is accumulated on the CPU (the bundle's
``accumulate_device``). The network is the bundle's ``network_def`` (``--network tiny`` adds the
``cpu_tiny.json`` overlay: same architecture, 8/8/16 channels). Methods, each in its own process so that its
peak resident memory is its own:

- ``network_only``: the network on exactly the windows MONAI visits (same slices of the same volume, same copy
  to ``sw_device``), outputs discarded: the floor that any blending can reach.
- ``monai_gaussian`` / ``monai_constant``: the bundle's path (``codec.reconstruct_volume``, i.e. MONAI's
  ``SlidingWindowInferer``) with gaussian or constant blending.
- ``monai_gaussian_buffered`` (on request): MONAI's ``buffer_steps=1`` (slabs of windows blended on
  ``sw_device``, one host update per slab): the option meant for GPU windows with a host output.
- ``naive_linear_loop`` (on request): the seed's Python loop with tent weights.

``blending_overhead`` = method time / ``network_only`` time (target < 1.15 for gaussian). ``peak_copies`` =
(peak RSS - RSS before the input volume existed) / volume bytes: the input counts as one copy (target <= 4).
``--profile`` adds one more gaussian run under ``torch.profiler(profile_memory=True)``: every allocation of at
least 1 % of the volume by operator (MONAI's output and count map, importance map, window outputs, padding
copies) and the peak of live bytes in volume copies. Prints tables and writes JSON (``--out``).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

MIB = 2**20
FULL_VOLUME = (512, 512, 604)
BUNDLE_ROI = (256, 256, 128)
METHODS = ("network_only", "monai_gaussian", "monai_constant", "monai_gaussian_buffered", "naive_linear_loop")


def build_network(network: str = "tiny", device: str | torch.device = "cpu") -> torch.nn.Module:
    """The bundle's inference network (``full``) or the same with the ``cpu_tiny.json`` overlay (``tiny``)."""
    from monai.bundle import ConfigParser

    if network not in ("tiny", "full"):
        raise ValueError(f"network must be 'tiny' or 'full', got {network!r}")
    configs = REPO / "bundles" / "vqgan_3d_patch" / "configs"
    parser = ConfigParser()
    parser.read_config(
        [str(configs / "inference.json")] + ([str(configs / "cpu_tiny.json")] if network == "tiny" else [])
    )
    torch.manual_seed(0)
    return parser.get_parsed_content("network_def").to(device).eval()


def monai_windows(size: Sequence[int], roi: Sequence[int], overlap: float) -> list[tuple[slice, ...]]:
    """The windows MONAI's ``sliding_window_inference`` visits, in its order (volume at least ``roi``)."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    interval = _get_scan_interval(tuple(size), tuple(roi), len(size), (overlap,) * len(size))
    return dense_patch_slices(tuple(size), tuple(roi), interval)


def reconstruction_fn(net: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(x: torch.Tensor) -> torch.Tensor:
        out = net(x)
        return out[0] if isinstance(out, (tuple, list)) else out

    return fn


def naive_linear_blend(fn, volume: torch.Tensor, roi, overlap: float, sw_device) -> torch.Tensor:
    """The seed's way: a Python loop over windows, linear (tent) weights, accumulators beside the volume."""
    size = volume.shape[2:]
    ramps = [torch.minimum(torch.arange(1, r + 1), torch.arange(r, 0, -1)).float() for r in roi]
    weight = ramps[0][:, None, None] * ramps[1][None, :, None] * ramps[2][None, None, :]
    out = torch.zeros_like(volume)
    norm = torch.zeros(size)
    for sl in monai_windows(size, roi, overlap):
        pred = fn(volume[(slice(None), slice(None), *sl)].to(sw_device)).float().cpu()
        out[(slice(None), slice(None), *sl)] += pred * weight
        norm[sl] += weight
    return out / norm


def monai_buffered(
    fn, volume: torch.Tensor, roi, overlap: float, sw_device, accumulate_device
) -> torch.Tensor:
    """MONAI's own option for windows on the GPU and the output in host memory: ``buffer_steps=1`` blends each
    slab of windows (one window thick along the last axis) on ``sw_device`` and adds it to the host output
    once, instead of once per window. Same input check and blending as the bundle's path otherwise."""
    from monai.inferers import sliding_window_inference

    if not torch.isfinite(volume).all():
        raise ValueError("volume contains NaN or infinite values")
    return sliding_window_inference(
        volume, tuple(roi), 1, fn, overlap, mode="gaussian", padding_mode="replicate", sw_device=sw_device,
        device=accumulate_device, buffer_steps=1, buffer_dim=-1,
    )  # fmt: skip


def _autocast(device_type: str, amp: bool):
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def run_method(
    method: str,
    net: torch.nn.Module,
    volume: torch.Tensor,
    roi: Sequence[int],
    overlap: float,
    sw_device: str | torch.device,
    accumulate_device: str | torch.device,
    amp: bool = False,
) -> float:
    """Seconds for one whole-volume pass of ``method`` (device work synchronised)."""
    from common.codec import reconstruct_per_window
    from common.sliding_window import LatentSlidingWindowInferer

    sw_device = torch.device(sw_device)
    fn = reconstruction_fn(net)
    with _autocast(sw_device.type, amp):
        _sync(sw_device)
        t0 = time.perf_counter()
        if method == "network_only":
            for sl in monai_windows(volume.shape[2:], roi, overlap):
                fn(volume[(slice(None), slice(None), *sl)].to(sw_device))
        elif method in ("monai_gaussian", "monai_constant"):
            # per-window quantise + decode, blended: the same windows as network_only, so the ratio is the
            # blending overhead (the latent path, common.codec.reconstruct_volume, decodes other windows)
            inferer = LatentSlidingWindowInferer(
                roi, overlap=overlap, mode=method.split("_")[1], sw_device=sw_device, device=accumulate_device
            )
            reconstruct_per_window(net, volume, inferer)
        elif method == "monai_gaussian_buffered":
            monai_buffered(fn, volume, roi, overlap, sw_device, accumulate_device)
        elif method == "naive_linear_loop":
            naive_linear_blend(fn, volume, roi, overlap, sw_device)
        else:
            raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
        _sync(sw_device)
    return time.perf_counter() - t0


def current_rss_bytes() -> int:
    """Resident set size now (Linux ``/proc/self/statm``; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def allocation_profile(fn: Callable[[], None], volume_bytes: int, min_fraction: float = 0.01) -> dict:
    """Allocations of ``fn`` on the CPU (``torch.profiler`` memory events): big ones by operator, live peak."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    groups: dict[tuple[str, int], int] = {}
    for e in prof.events():
        nbytes = int(getattr(e, "self_cpu_memory_usage", 0) or 0)
        if nbytes >= min_fraction * volume_bytes:
            chain, parent = [e.name], e.cpu_parent
            while parent is not None and len(chain) < 3:  # e.g. aten::empty <- aten::zeros: who allocated
                chain.append(parent.name)
                parent = parent.cpu_parent
            key = (" <- ".join(chain), nbytes)
            groups[key] = groups.get(key, 0) + 1
    memory = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    live = peak = 0
    for e in memory:
        live += e.nbytes()
        peak = max(peak, live)
    rows = [
        {"op": op, "mib_each": n / MIB, "count": c, "volume_copies_each": n / volume_bytes}
        for (op, n), c in sorted(groups.items(), key=lambda kv: -kv[0][1] * kv[1])
    ]
    return {"allocations": rows, "live_peak_volume_copies": peak / volume_bytes, "live_peak_mib": peak / MIB}


def _child(kind: str, cfg: dict, queue) -> None:
    """One method in a fresh process: seconds and memory (peak RSS relative to before the volume existed)."""
    try:
        torch.set_num_threads(int(cfg["threads"]))
        torch.manual_seed(0)
        sw_device = torch.device(cfg["device"])
        net = build_network(cfg["network"], sw_device)
        fn = reconstruction_fn(net)
        with torch.no_grad(), _autocast(sw_device.type, cfg["amp"]):
            fn(torch.rand(1, 1, *cfg["roi"], device=sw_device))  # warm-up
        if sw_device.type == "cuda":
            torch.cuda.synchronize(sw_device)
            torch.cuda.reset_peak_memory_stats(sw_device)
        rss_before = current_rss_bytes()
        volume = torch.rand(1, 1, *cfg["volume"])
        args = (net, volume, cfg["roi"], cfg["overlap"], sw_device, cfg["accumulate"], cfg["amp"])
        if kind == "profile":
            vbytes = volume.numel() * volume.element_size()
            result = allocation_profile(lambda: run_method("monai_gaussian", *args), vbytes)
        else:
            cpu0 = time.process_time()
            result = {"seconds": run_method(kind, *args)}
            result["cpu_seconds"] = time.process_time() - cpu0  # robust to other jobs on a shared machine
        result["rss_before_volume_mib"] = rss_before / MIB
        result["peak_rss_mib"] = peak_rss_bytes() / MIB
        result["peak_above_start_mib"] = (peak_rss_bytes() - rss_before) / MIB
        if sw_device.type == "cuda":
            result["peak_gpu_mib"] = torch.cuda.max_memory_allocated(sw_device) / MIB
        queue.put(result)
    except BaseException as e:  # reported by the parent, which keeps measuring the other methods
        queue.put({"error": f"{type(e).__name__}: {e}"})
        raise


def in_child(kind: str, cfg: dict, timeout_s: float = 3600) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(kind, cfg, queue))
    proc.start()
    try:
        return queue.get(timeout=timeout_s)
    except Exception as e:  # the child died without reporting (e.g. killed for memory)
        return {"error": f"no result from the {kind} process ({type(e).__name__}); exit code {proc.exitcode}"}
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()


# Not sliding-window figures, kept here because the bundle's README quotes them (``--throughput``).
THROUGHPUT_NETWORKS = {
    "tiny": dict(channels=(8, 8, 16), num_res_layers=1, num_embeddings=32, embedding_dim=8),
    "full": dict(channels=(128, 192, 256), num_res_layers=2, num_embeddings=512, embedding_dim=64),
}


def training_throughput(cfg: dict, patch, steps: int, device: str) -> float:
    """Training patches/s of the VQ-GAN (generator + discriminator steps, batch 2), the bundle's trainer."""
    from ignite.engine import Events
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
    import tempfile

    import nibabel as nib
    import numpy as np
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


def run(
    volume: Sequence[int] = FULL_VOLUME,
    roi: Sequence[int] = BUNDLE_ROI,
    overlap: float = 0.25,
    network: str = "tiny",
    device: str = "cpu",
    accumulate: str = "cpu",
    amp: bool = False,
    methods: Sequence[str] = METHODS[:3],
    profile: bool = True,
    threads: int = 1,
    repeats: int = 2,
    throughput: bool = False,
) -> dict:
    cfg = dict(volume=[int(v) for v in volume], roi=[int(r) for r in roi], overlap=float(overlap),
               network=network, device=device, accumulate=accumulate, amp=bool(amp), threads=int(threads))  # fmt: skip
    volume_bytes = 4 * int(torch.tensor(cfg["volume"]).prod())
    rows: dict[str, dict] = {}
    for _ in range(max(1, int(repeats))):  # interleaved: load changes on a shared machine hit every method
        for kind in methods:
            res = in_child(kind, cfg)
            row = rows.setdefault(kind, {"runs": []})
            row["runs"].append(res)
    for row in rows.values():
        ok = [r for r in row["runs"] if "error" not in r]
        if not ok:
            row["error"] = row["runs"][0]["error"]
            continue
        row["seconds"] = min(r["seconds"] for r in ok)  # least disturbed pass
        row["cpu_seconds"] = min(r["cpu_seconds"] for r in ok)
        for key in ("peak_above_start_mib", "peak_gpu_mib"):
            if key in ok[0]:
                row[key] = max(r[key] for r in ok)
    base = rows.get("network_only", {}).get("seconds")
    base_cpu = rows.get("network_only", {}).get("cpu_seconds")
    for row in rows.values():
        if "seconds" in row and base:
            row["blending_overhead"] = row["seconds"] / base
            row["blending_overhead_cpu_time"] = row["cpu_seconds"] / base_cpu
        if "peak_above_start_mib" in row:
            row["peak_copies"] = row["peak_above_start_mib"] * MIB / volume_bytes
    result = {
        "benchmark": "vqgan_sliding_window",
        **cfg,
        "n_windows": len(monai_windows(cfg["volume"], cfg["roi"], cfg["overlap"])),
        "volume_mib_float32": volume_bytes / MIB,
        "torch": torch.__version__,
        "repeats": int(repeats),
        "seconds_statistic": "minimum over repeats (interleaved, one fresh process per pass); cpu_seconds: "
        "process CPU time of the pass (what the pass computed, robust to other jobs on a shared machine)",
        "methods": rows,
        "targets": {"blending_overhead_gaussian": "< 1.15", "peak_copies": "<= 4"},
    }
    if profile:
        result["allocation_profile"] = in_child("profile", cfg)
    if throughput:
        torch.set_num_threads(int(threads))
        patch = tuple(cfg["roi"]) if network == "full" else (32, 32, 32)
        result["training_patches_per_s"] = training_throughput(THROUGHPUT_NETWORKS[network], patch, 3, device)
        result["training_patch"] = list(patch)
        result["loader"] = loader_throughput(patch, 2, (96, 96, 64), 8)
    return result


def format_tables(result: dict) -> str:
    lines = [
        f"VQ-GAN ({result['network']} network) on {'x'.join(map(str, result['volume']))}, window "
        f"{'x'.join(map(str, result['roi']))}, overlap {result['overlap']}, {result['n_windows']} windows, "
        f"windows on {result['device']}, output on {result['accumulate']}, amp={result['amp']}, "
        f"volume {result['volume_mib_float32']:.0f} MiB",
        f"{'method':<20}{'seconds':>9}{'x network':>11}{'CPU s':>9}{'x network':>11}{'peak MiB':>10}{'copies':>8}",
    ]
    for kind, r in result["methods"].items():
        if "error" in r:
            lines.append(f"{kind:<20}  failed: {r['error']}")
            continue
        lines.append(
            f"{kind:<20}{r['seconds']:>9.2f}{r.get('blending_overhead', float('nan')):>11.3f}"
            f"{r['cpu_seconds']:>9.2f}{r.get('blending_overhead_cpu_time', float('nan')):>11.3f}"
            f"{r['peak_above_start_mib']:>10.0f}{r['peak_copies']:>8.2f}"
        )
    prof = result.get("allocation_profile")
    if prof and "error" not in prof:
        lines.append(f"allocations >= 1% of the volume during monai_gaussian (profiler); live peak "
                     f"{prof['live_peak_volume_copies']:.2f} volume copies")  # fmt: skip
        lines.append(f"{'operator <- caller':<64}{'MiB each':>10}{'count':>7}{'copies each':>13}")
        for a in prof["allocations"]:
            lines.append(
                f"{a['op'][:63]:<64}{a['mib_each']:>10.1f}{a['count']:>7}{a['volume_copies_each']:>13.3f}"
            )
    elif prof:
        lines.append(f"allocation profile failed: {prof['error']}")
    return "\n".join(lines)


def main(
    volume: Sequence[int] = FULL_VOLUME,
    roi: Sequence[int] = BUNDLE_ROI,
    overlap: float = 0.25,
    network: str = "tiny",
    device: str = "cpu",
    accumulate: str = "cpu",
    amp: bool = False,
    methods: Sequence[str] = METHODS[:3],
    profile: bool = True,
    threads: int = 1,
    repeats: int = 2,
    throughput: bool = False,
    out: str = "outputs/benchmarks/vqgan_sliding_window.json",
) -> None:
    """Measure every method (``--methods`` from network_only, monai_gaussian, monai_constant, naive_linear_loop)."""
    methods = [methods] if isinstance(methods, str) else list(methods)
    result = run(
        volume, roi, overlap, network, device, accumulate, amp, methods, profile, threads, repeats, throughput
    )
    print(format_tables(result))
    if throughput:
        ld = result["loader"]
        print(f"training: {result['training_patches_per_s']:.2f} patches/s (patch {result['training_patch']}, "
              f"batch 2, with discriminator); loader: cached {ld['cached_patches_per_s']:.1f} patches/s, "
              f"re-read {ld['reread_patches_per_s']:.1f} patches/s ({ld['speedup']:.1f}x)")  # fmt: skip
    from common.atomic import atomic_write_text

    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
