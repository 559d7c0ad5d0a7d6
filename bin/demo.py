"""The main job: real example chest CT -> paired dataset -> each bundle's short CPU demo.

Run through ``bash bin/demo.sh`` (which sets up .venv first). Every step writes under ``--out`` and the
summary at the end lists where the volumes, metrics and pictures are.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]

# bundle -> CLI arguments of its scripts/demo.py ({out}: the bundle's output folder, {data}: the dataset)
BUNDLE_DEMOS = {
    "vqgan_3d_patch": ["--output_dir={out}", "--dataset_dir={data}"],
    "perx2ct": ["--work_dir={out}"],  # builds its own 64^3 pairs from the example CT
    "progressive_cascade": [
        "--output_dir={out}",
        "--epochs=1",
    ],  # tiny phantom cascade (128^3 stage 3 is GPU work)
    # its own tiny phantom pairs: training needs a validation split, the one-case example CT has none
    "latent_ddpm": ["--output_dir={out}", "--epochs=20"],
}


def prepare_data(out: Path, size: int, spacing: float, drr_pixels: int) -> Path:
    """Fetch the example CT and build its CT + PA/lateral DRR pair with previews."""
    from data_prep.build_pairs import build_pairs
    from data_prep.example_ct import fetch_example_ct

    ct = fetch_example_ct()["ct"]
    print(f"[demo] example CT: {ct}")
    dataset = out / "dataset"
    build_pairs(
        [ct],
        str(dataset),
        size=size,
        spacing=spacing,
        geometry="x2ctgan",
        drr_pixels=drr_pixels,
        val_fraction=0.0,
        test_fraction=0.0,
        previews=True,
    )
    return dataset


def run_bundle_demo(name: str, out: Path, dataset: Path, extra: list[str]) -> dict:
    module = f"bundles.{name}.scripts.demo"
    if importlib.util.find_spec(module) is None:
        return {"bundle": name, "status": "not available yet"}
    args = [a.format(out=out / name, data=dataset) for a in extra]
    cmd = [sys.executable, "-m", module, *args]
    print(f"[demo] {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    res = subprocess.run(cmd, cwd=REPO)
    status = "ok" if res.returncode == 0 else f"failed (exit {res.returncode})"
    return {
        "bundle": name,
        "status": status,
        "seconds": round(time.time() - t0, 1),
        "outputs": str(out / name),
    }


def main(
    out: str = "outputs/demo",
    size: int = 128,
    spacing: float = 2.5,
    drr_pixels: int = 128,
    skip: tuple | str = (),
    only: tuple | str = (),
) -> None:
    """Run the main job. ``--skip=perx2ct,pe_classifier`` or ``--only=vqgan_3d_patch`` select bundles."""
    skip = set(skip.split(",") if isinstance(skip, str) else skip)
    only = set(only.split(",") if isinstance(only, str) else only)
    out_path = (REPO / out).resolve() if not Path(out).is_absolute() else Path(out)
    out_path.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    dataset = prepare_data(out_path, size, spacing, drr_pixels)
    results = [{"bundle": "data_prep", "status": "ok", "outputs": str(dataset)}]
    for name, extra in BUNDLE_DEMOS.items():
        if name in skip or (only and name not in only):
            continue
        results.append(run_bundle_demo(name, out_path, dataset, extra))
    summary = {"seconds": round(time.time() - t0, 1), "steps": results}
    (out_path / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n[demo] done in {:.0f} s. Outputs:".format(summary["seconds"]))
    for r in results:
        print(f"  {r['bundle']:<22}{r['status']:<22}{r.get('outputs', '')}")
    pngs = sorted(str(p.relative_to(out_path)) for p in out_path.rglob("*.png"))
    print(f"  pictures ({len(pngs)} PNG) under {out_path}, e.g.:")
    for p in pngs[:12]:
        print(f"    {p}")
    print(f"  summary: {out_path / 'summary.json'}")
    if any(r["status"].startswith("failed") for r in results):
        sys.exit(1)


if __name__ == "__main__":
    fire.Fire(main)
