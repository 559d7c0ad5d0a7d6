"""Learning benchmark (issue 12): does every model beat its trivial baseline on cases it never trained on?

    python benchmarks/learning.py [--rows all|vqgan_phantoms,perx2ct_phantoms,...] [--threads 2]
                                  [--work outputs/benchmarks/learning_work] [--out outputs/benchmarks/learning.json]
                                  [--split test] [--smoke] [--merge a.json,b.json]

Each model is trained and evaluated through its bundle's own configs, as a user runs them:
``monai.bundle run training`` with ``train.json`` + ``configs/cpu_small.json`` (+ the dataset), then
``monai.bundle run evaluating`` with ``train.json`` + ``evaluate.json`` + ``cpu_small.json`` on the **test**
split. The figures are those of the bundle's own ``metrics_report.json``: model and the task's baseline
(:mod:`common.baselines`) on the same cases, in the same conventions; a report whose cases overlap the
training split (``smoke_test``) fails the row.

* phantoms (``data_prep.phantom``, 48 patients, 32^3 at 12 mm, PA + lateral DRRs 64^2 in the ``perx2ct``
  geometry; split 24 training / 12 validation / 12 test, per patient): vqgan_3d_patch (baseline: box
  average by the latent factor + trilinear upsampling), perx2ct, progressive_cascade and latent_ddpm (on
  the phantom VQ-GAN; baseline for the three: the mean training CT, which ignores the X-rays);
* real CT, one patient held out: the two crops of ``../shared/data/ct`` (one patient, TotalSegmentator)
  are the test cases; training uses the example chest CT (``data_prep.example_ct``, LIDC-IDRI-0001):
  vqgan_3d_patch on its lower three quarters (validation: the upper quarter) at 3 mm, perx2ct on
  augmented crops (144 mm cubes at random positions in the chest, 32^3 at 4.5 mm, DRR pairs by
  ``data_prep.build_pairs`` with a 250 mm detector; validation: other random cubes of the same CT).

* 64^3 at 5 mm (the papers' 320 mm field of view), PA + lateral DRRs 128^2 in the ``perx2ct`` geometry
  (issue 21 item 3), 24 training / 12 validation / 12 test each, with each bundle's ``cpu_64.json`` overlay:
  perx2ct, progressive_cascade, vqgan_3d_patch and latent_ddpm (on that dataset's VQ-GAN) on ``cohort64``
  (``data_prep.cohort`` from the example chest CT and its labels: same-source, the reports say so) and on
  ``phantoms64`` (``data_prep.phantom``: no shared patient, the cross-source check). Baselines: the mean
  training CT and the extent-scaled mean CT, with paired bootstrap intervals and the anatomy metrics. The
  ``cpu_64.json`` recipes were cut to one loaded 2-core session and run on validation, then scored once on
  test (``--evaluate_only``): the cohort64 figures are in docs/LEARNING.md (issue 21 item 4).

Recipes (the ``cpu_small.json`` overlays) were chosen on the validation splits only (``--split validation``
scores that split instead; such figures choose recipes and are not results). The table gives PSNR in the
xray2ct convention (HU [-1024, 2048] -> [0, 1], data range 1, per volume, mean over the cases); the JSON
also holds SSIM, MAE (HU) and the X2CT-GAN / PerX2CT conventions per case (the bundles' reports). Minutes
are wall-clock of training + evaluation; the machine may be shared, so the process CPU minutes (all threads)
are given beside them (an idle machine needs about CPU / threads minutes).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import fire
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.atomic import atomic_write_text  # noqa: E402
from common.io import load_volume, save_volume  # noqa: E402
from common.volume import Volume  # noqa: E402
from xray2ct import driver  # noqa: E402

ROWS = (  # run in this order (latent_ddpm needs the VQ-GAN of its dataset)
    "vqgan_phantoms",
    "perx2ct_phantoms",
    "latent_ddpm_phantoms",
    "vqgan_real",
    "perx2ct_real",
    "cascade_phantoms",
    # issue 21 item 3: 64^3 at 5 mm (320 mm field), X-rays 128^2, cpu_64.json overlays
    "perx2ct_cohort64",
    "cascade_cohort64",
    "vqgan_cohort64",
    "latent_ddpm_cohort64",
    "perx2ct_phantoms64",
    "cascade_phantoms64",
    "vqgan_phantoms64",
    "latent_ddpm_phantoms64",
)
NEEDS_VQGAN = {"latent_ddpm_phantoms": "vqgan_phantoms", "latent_ddpm_cohort64": "vqgan_cohort64",
               "latent_ddpm_phantoms64": "vqgan_phantoms64"}  # fmt: skip
METRIC = "psnr_xray2ct"
TARGET_DB = 1.0
BUDGET_MIN = 60.0  # issue 21: at most 60 minutes in all on 2 cores (issue 12's 32^3 rows: 20 minutes)
PHANTOMS = dict(n_cases=48, size=32, spacing=12.0, geometry="perx2ct", drr_pixels=64, seed=0)
# 64^3 at 5 mm: the papers' 320 mm field of view, X-rays 128^2; 24 training / 12 validation / 12 test each
PHANTOMS64 = dict(n_cases=48, size=64, spacing=5.0, geometry="perx2ct", drr_pixels=128, seed=0)
COHORT64 = dict(n_cases=48, size=64, spacing=5.0, geometry="perx2ct", drr_pixels=128, seed=0, val_fraction=0.25,
                test_fraction=0.25)  # fmt: skip
OVERLAY, OVERLAY_64 = "cpu_small.json", "cpu_64.json"
REAL_SPACING_VQ = 3.0
# one training volume: 6 iterations of 4 patches per epoch, as the phantom row (24 volumes, batch 4)
REAL_VQ_OVERRIDES = {"patches_per_volume": 4, "epoch_length": 6}
CUBE = dict(size=32, spacing=4.5, n_train=40, n_val=8, seed=0)
CUBE_GEOMETRY = dict(
    name="cube", sad=700.0, sid=949.0, detector_pixels=[64, 64], detector_size_mm=[250.0, 250.0]
)


# ----------------------------------------------------------------------------------------------- helpers
SMOKE: dict = {}  # --smoke: a few steps per model, to check the pipeline (its figures mean nothing)
EVALUATE_ONLY: dict = {}  # --evaluate_only: score the models an earlier run trained in the same --work
# ({"evaluate_only": True}: every row; {"rows": {...}}: those rows only, e.g. the VQ-GAN under a latent_ddpm row)


def train_and_evaluate(
    bundle: str, dataset: Path, work_dir: Path, split: str, stages: tuple = (None,), overlay: str = OVERLAY,
    overrides: dict | None = None,
) -> dict:  # fmt: skip
    """:func:`xray2ct.driver.train_and_evaluate` in this process with ``--smoke``'s overrides: train (each of
    ``stages``) with train.json + ``overlay`` (cpu_small.json, or cpu_64.json for the 64^3 rows), evaluate
    ``split`` with evaluate.json. Returns the bundle's metrics report with the timings."""
    trained = EVALUATE_ONLY.get("evaluate_only") or Path(work_dir).name in EVALUATE_ONLY.get("rows", ())
    stages = () if trained else stages  # --evaluate_only: the checkpoints of an earlier run in --work
    return driver.train_and_evaluate(bundle, dataset, work_dir, overlay, {**(overrides or {}), **SMOKE}, stages, split)


# ----------------------------------------------------------------------------------------------- data
def phantom_dataset(work: Path) -> Path:
    from data_prep.phantom import make_phantom_dataset

    root = work / "phantoms"
    make_phantom_dataset(root, **PHANTOMS)
    return root


def phantom64_dataset(work: Path) -> Path:
    from data_prep.phantom import make_phantom_dataset

    root = work / "phantoms64"
    make_phantom_dataset(root, **PHANTOMS64)
    return root


def cohort64_dataset(work: Path) -> Path:
    """The realistic cohort (``data_prep.cohort``) from the example chest CT: one source, so same-source."""
    from data_prep.cohort import make_cohort

    root = work / "cohort64"
    make_cohort(root, **COHORT64)
    return root


def _crop_mm(vol: Volume, centre_mm: np.ndarray, size_mm: float) -> Volume:
    """Sub-volume of a canonical volume: the voxels within ``size_mm / 2`` of ``centre_mm`` (RAS mm)."""
    inv = np.linalg.inv(vol.affine)
    lo = inv @ np.append(centre_mm - size_mm / 2, 1.0)
    hi = inv @ np.append(centre_mm + size_mm / 2, 1.0)
    start = np.maximum(np.floor(np.minimum(lo, hi)[:3]).astype(int), 0)
    stop = np.minimum(np.ceil(np.maximum(lo, hi)[:3]).astype(int) + 1, vol.shape)
    array = vol.array[start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]]
    affine = vol.affine.copy()
    affine[:3, 3] = (vol.affine @ np.append(start, 1.0))[:3]
    return Volume(np.ascontiguousarray(array), affine)


def _voxel_mm(vol: Volume, index) -> np.ndarray:
    return (vol.affine @ np.append(np.asarray(index, dtype=float), 1.0))[:3]


def real_volumes() -> dict:
    """Canonical HU volumes: the example chest CT (training patient) and the two shared crops (test patient)."""
    from data_prep.example_ct import fetch_example_ct

    shared = REPO.parent / "shared" / "data" / "ct"
    crops = [shared / "ctpa_crop_pulmonary.nii.gz", shared / "ctpa_crop_aorta.nii.gz"]
    missing = [str(c) for c in crops if not c.is_file()]
    if missing:
        raise FileNotFoundError(f"real CT crops not found: {missing} (../shared/data/ct)")
    example = load_volume(fetch_example_ct()["ct"]).to_canonical()
    example = example.with_array(np.clip(example.array, -1024, 3071).astype(np.float32))  # -2048 outside FOV
    return {
        "example": example,
        "crops": {c.name.split(".")[0]: load_volume(str(c)).to_canonical() for c in crops},
    }


def _resampled(vol: Volume, spacing: float) -> Volume:
    from monai.data import MetaTensor
    from monai.transforms import Spacing

    array = np.ascontiguousarray(vol.array, dtype=np.float32)[None]  # canonical views may have negative strides
    img = MetaTensor(torch.from_numpy(array), affine=torch.from_numpy(np.ascontiguousarray(vol.affine)))
    img = Spacing(pixdim=(spacing,) * 3, mode="bilinear", padding_mode="border")(img)
    return Volume(np.asarray(img.array[0], np.float32), np.asarray(img.affine, np.float64))


def vq_real_dataset(work: Path, volumes: dict) -> Path:
    """VQ-GAN real-CT datalist: example CT lower 3/4 (training), upper 1/4 (validation), the crops (test)."""
    root = work / "vq_real"
    root.mkdir(parents=True, exist_ok=True)
    example = _resampled(volumes["example"], REAL_SPACING_VQ)
    cut = int(example.shape[2] * 0.75)
    paths = {}
    for name, part in (("train", example.array[:, :, :cut]), ("val", example.array[:, :, cut:])):
        affine = example.affine.copy()
        if name == "val":
            affine[:3, 3] = _voxel_mm(example, (0, 0, cut))
        paths[name] = save_volume(Volume(np.ascontiguousarray(part), affine), root / f"example_{name}.nii.gz")
    tests = [
        {"id": name, "ct": save_volume(_resampled(v, REAL_SPACING_VQ), root / f"{name}.nii.gz")}
        for name, v in volumes["crops"].items()
    ]
    datalist = {
        "training": [{"id": "example_train", "ct": paths["train"]}],
        "validation": [{"id": "example_val", "ct": paths["val"]}],
        "test": tests,
        "description": "vqgan real CT: LIDC-IDRI-0001 (train/val by z), the shared crops (test, other patient)",
    }
    atomic_write_text(root / "dataset.json", json.dumps(datalist, indent=2))
    return root


def perx_real_dataset(work: Path, volumes: dict) -> Path:
    """Pairs of 144 mm cubes: random cubes of the example CT (training, validation), the crops' centres (test)."""
    from data_prep.build_pairs import build_pairs

    root = work / "perx_real"
    if (root / "dataset.json").is_file():
        return root
    cubes = work / "perx_real_cubes"
    cubes.mkdir(parents=True, exist_ok=True)
    side = CUBE["size"] * CUBE["spacing"]
    example = volumes["example"]
    rng = np.random.default_rng(CUBE["seed"])
    body = np.argwhere(example.array[::8, ::8, ::4] > -300) * np.array([8, 8, 4])
    lo_mm = _voxel_mm(example, body.min(0)) + side / 2
    hi_mm = _voxel_mm(example, body.max(0)) - side / 2
    names: dict[str, list[str]] = {"training": [], "validation": [], "test": []}
    for k in range(CUBE["n_train"] + CUBE["n_val"]):
        centre = rng.uniform(np.minimum(lo_mm, hi_mm), np.maximum(lo_mm, hi_mm))
        name = f"example_cube{k:02d}"
        save_volume(_crop_mm(example, centre, side + 6), cubes / f"{name}.nii.gz")
        names["training" if k < CUBE["n_train"] else "validation"].append(name)
    for name, crop in volumes["crops"].items():
        centre = _voxel_mm(crop, (np.asarray(crop.shape) - 1) / 2)
        save_volume(_crop_mm(crop, centre, side + 6), cubes / f"{name}.nii.gz")
        names["test"].append(name)
    build_pairs(str(cubes), str(root), size=CUBE["size"], spacing=CUBE["spacing"], geometry=CUBE_GEOMETRY,
                drr_pixels=CUBE_GEOMETRY["detector_pixels"][0], val_fraction=0.0, test_fraction=0.0)  # fmt: skip
    meta = json.loads((root / "dataset.json").read_text())
    entries = {e["id"]: e for split in ("training", "validation", "test") for e in meta.get(split, [])}
    for split, ids in names.items():
        meta[split] = [entries[i] for i in ids if i in entries]
    meta["split"] = {
        "by": "patient: training/validation = LIDC-IDRI-0001 cubes, test = the other patient's crops"
    }
    atomic_write_text(root / "dataset.json", json.dumps(meta, indent=2))
    return root


# ----------------------------------------------------------------------------------------------- rows
def run_vqgan(
    dataset: Path, work: Path, name: str, split: str, extra: dict | None = None, overlay: str = OVERLAY
) -> dict:
    result = train_and_evaluate("vqgan_3d_patch", dataset, work / name, split, overlay=overlay, overrides=extra)
    result["checkpoint"] = str(driver.checkpoint_path("vqgan_3d_patch", work / name))
    return result


def run_perx2ct(dataset: Path, work: Path, name: str, split: str, overlay: str = OVERLAY) -> dict:
    return train_and_evaluate("perx2ct", dataset, work / name, split, overlay=overlay)


def run_cascade(dataset: Path, work: Path, name: str, split: str, overlay: str = OVERLAY) -> dict:
    return train_and_evaluate("progressive_cascade", dataset, work / name, split, stages=(1, 2, 3), overlay=overlay)


def run_latent_ddpm(dataset: Path, work: Path, name: str, split: str, vqgan: dict, overlay: str = OVERLAY) -> dict:
    over = driver.ids(vqgan_checkpoint=vqgan["checkpoint"])
    result = train_and_evaluate("latent_ddpm", dataset, work / name, split, overlay=overlay, overrides=over)
    # the ceiling: the VQ-GAN's own reconstruction of the same cases (the best a perfect sampler decodes)
    result["vqgan_ceiling_psnr"] = vqgan["report"]["model"][METRIC]
    return result


def _jobs64(key: str, label: str, dataset: Path | None, work: Path, split: str, results: dict) -> dict:
    """The 64^3 rows of one dataset (``<model>_<key>``), each with the bundle's cpu_64.json overlay."""
    o = OVERLAY_64
    return {
        f"perx2ct_{key}": ("perx2ct", label, lambda: run_perx2ct(dataset, work, f"perx2ct_{key}", split, o)),
        f"cascade_{key}": ("progressive_cascade", label, lambda: run_cascade(dataset, work, f"cascade_{key}", split, o)),
        f"vqgan_{key}": ("vqgan_3d_patch", label, lambda: run_vqgan(dataset, work, f"vqgan_{key}", split, overlay=o)),
        f"latent_ddpm_{key}": ("latent_ddpm", label, lambda: run_latent_ddpm(
            dataset, work, f"latent_ddpm_{key}", split, results[f"vqgan_{key}"], o)),
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------- main
def _format_table(rows: list[dict]) -> str:
    head = (f"{'model':<22}{'data':<16}{'split':<12}{'cases':>6}{'model':>8}{'baseline':>10}{'diff':>8}  "
            f"{'baseline name':<18}{'wall min':>9}{'CPU min':>9}")  # fmt: skip
    lines = ["PSNR dB, xray2ct convention (HU [-1024, 2048] -> [0, 1], data range 1), mean over cases", head,
             "-" * len(head)]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']:<22}{r['data']:<16}ERROR {r['error']}")
            continue
        lines.append(
            f"{r['model']:<22}{r['data']:<16}{r['split']:<12}{r['n_cases']:>6}{r['model_metrics'][METRIC]:>8.2f}"
            f"{r['baseline_metrics'][METRIC]:>10.2f}{r['difference'][METRIC]:>+8.2f}  {r['baseline_name']:<18}"
            f"{r['wall_s'] / 60:>9.1f}{r['cpu_s'] / 60:>9.1f}"
        )
    return "\n".join(lines)


def _ci(ci: dict | None) -> str:
    if not ci or ci.get("estimate") is None:
        return "n/a"
    low, high = ci.get("low"), ci.get("high")
    bounds = "n/a" if low is None or high is None else f"{low:+.2f}, {high:+.2f}"
    return f"{ci['estimate']:+.2f} [{bounds}]"


def _format_baselines_table(rows: list[dict]) -> str:
    """Model minus each baseline with paired bootstrap 95 % intervals over the cases, and lung Dice."""
    head = (f"{'model':<22}{'data':<16}{'baseline':<24}{'PSNR diff dB [95% CI]':>28}{'lung Dice':>11}"
            f"{'base':>7}{'lung Dice diff [95% CI]':>28}")  # fmt: skip
    lines = ["model - baseline, paired percentile bootstrap 95 % intervals over the test cases (2000 resamples)",
             head, "-" * len(head)]  # fmt: skip
    for r in rows:
        for name, b in (r.get("baselines") or {}).items():
            ci = b.get("difference_ci", {})
            lung_m, lung_b = r["model_metrics"].get("lung_dice"), b["metrics"].get("lung_dice")
            lung = f"{lung_m:>11.3f}{lung_b:>7.3f}" if lung_m is not None and lung_b is not None else f"{'n/a':>18}"
            lines.append(f"{r['model']:<22}{r['data']:<16}{name:<24}{_ci(ci.get(METRIC)):>28}{lung}"
                         f"{_ci(ci.get('lung_dice')):>28}")  # fmt: skip
        if r.get("same_source"):
            lines.append(f"{'':<38}same-source: {r.get('same_source_note', '')}")
    return "\n".join(lines)


def _row(key: str, model: str, data: str, threads: int, res: dict) -> dict:
    report = res["report"]
    return {
        "row": key, "model": model, "data": data, "threads": threads, "split": report["split"],
        "n_cases": report["n_cases"], "case_ids": report["case_ids"],
        "baseline_name": report["baseline"]["name"], "baseline_description": report["baseline"]["description"],
        "model_metrics": report["model"], "baseline_metrics": report["baseline"]["metrics"],
        "difference": report["difference"], "model_better": report["model_better"],
        "beats_target": report["difference"][METRIC] >= TARGET_DB, "smoke_test": report["smoke_test"],
        "cases": report["cases"],
        **{k: res[k] for k in ("wall_s", "cpu_s", "train_wall_s", "train_cpu_s", "eval_wall_s", "eval_cpu_s")},
        **{k: res[k] for k in ("vqgan_ceiling_psnr", "checkpoint") if k in res},
        **{k: report[k] for k in ("latent_factor",) if k in report},
        "baselines": report.get("baselines", {}), "same_source": report.get("same_source"),
        "same_source_note": report.get("same_source_note"),
    }  # fmt: skip


def main(
    rows: str | tuple = "all",
    threads: int = 2,
    work: str = "outputs/benchmarks/learning_work",
    out: str = "outputs/benchmarks/learning.json",
    split: str = "test",
    smoke: bool = False,
    merge: str | tuple = (),
    evaluate_only: bool | str | tuple = False,
) -> None:
    """Run the selected rows (``--rows vqgan_phantoms,perx2ct_phantoms``); print the table, write JSON.

    ``--split validation`` scores the validation split (how the recipes were chosen). ``--smoke`` trains
    every model for 2 epochs (one per cascade stage) to check the pipeline only. ``--merge a.json,b.json``
    runs nothing: it combines the rows of earlier runs into ``--out`` and prints the table.
    ``--evaluate_only`` trains nothing: it scores ``--split`` with the checkpoints an earlier run of the same
    rows left in ``--work`` (the recipe chosen on validation, scored once on test without retraining it;
    the train_* times are then 0: take them from the run that trained). ``--evaluate_only vqgan_cohort64``
    does so for the rows named only (the VQ-GAN a latent_ddpm row needs, trained by an earlier run).
    """
    if merge:
        merge_reports(list(merge.split(",") if isinstance(merge, str) else merge), out)
        return
    if evaluate_only is True:
        EVALUATE_ONLY.update(evaluate_only=True)
    elif evaluate_only:
        named = set(evaluate_only.split(",") if isinstance(evaluate_only, str) else evaluate_only)
        if named - set(ROWS):
            raise SystemExit(f"unknown --evaluate_only rows {sorted(named - set(ROWS))}; choose from {ROWS}")
        EVALUATE_ONLY.update(rows=named)
    if smoke:
        SMOKE.update(max_epochs=2, val_interval=1, save_interval=2, stage_epochs=[1, 1, 1])
    selected = list(ROWS) if rows == "all" else list(rows.split(",") if isinstance(rows, str) else rows)
    unknown = set(selected) - set(ROWS)
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; choose from {ROWS}")
    for latent, vqgan in NEEDS_VQGAN.items():  # the latent model needs the VQ-GAN of its dataset
        if latent in selected and vqgan not in selected:
            selected.insert(0, vqgan)
    threads = int(threads)
    torch.set_num_threads(threads)
    work_dir = (REPO / work) if not Path(work).is_absolute() else Path(work)
    work_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    t0, c0 = time.time(), time.process_time()
    phantoms = phantom_dataset(work_dir) if any(r.endswith("phantoms") for r in selected) else None
    volumes = real_volumes() if any(r.endswith("real") for r in selected) else None
    data64 = {"cohort64": cohort64_dataset, "phantoms64": phantom64_dataset}
    data64 = {key: make(work_dir) for key, make in data64.items() if any(r.endswith(key) for r in selected)}
    results: dict[str, dict] = {}
    jobs: dict[str, tuple[str, str, Callable[[], dict]]] = {
        "vqgan_phantoms": ("vqgan_3d_patch", "phantoms", lambda: run_vqgan(phantoms, work_dir, "vqgan_phantoms", split)),
        "perx2ct_phantoms": ("perx2ct", "phantoms", lambda: run_perx2ct(phantoms, work_dir, "perx2ct_phantoms", split)),
        "cascade_phantoms": ("progressive_cascade", "phantoms", lambda: run_cascade(phantoms, work_dir, "cascade_phantoms", split)),
        "latent_ddpm_phantoms": ("latent_ddpm", "phantoms", lambda: run_latent_ddpm(
            phantoms, work_dir, "latent_ddpm_phantoms", split, results["vqgan_phantoms"])),
        "vqgan_real": ("vqgan_3d_patch", "real CT", lambda: run_vqgan(
            vq_real_dataset(work_dir, volumes), work_dir, "vqgan_real", split, REAL_VQ_OVERRIDES)),
        "perx2ct_real": ("perx2ct", "real DRR pairs", lambda: run_perx2ct(
            perx_real_dataset(work_dir, volumes), work_dir, "perx2ct_real", split)),
    }  # fmt: skip
    for key, label in (("cohort64", "cohort 64^3"), ("phantoms64", "phantoms 64^3")):
        jobs.update(_jobs64(key, label, data64.get(key), work_dir, split, results))
    table_rows: list[dict] = []
    out_path = (REPO / out) if not Path(out).is_absolute() else Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def write_report() -> dict:
        report = {
            "command": "python benchmarks/learning.py " + " ".join(sys.argv[1:]),
            "smoke": bool(smoke),
            "evaluate_only": sorted(EVALUATE_ONLY["rows"]) if "rows" in EVALUATE_ONLY else bool(evaluate_only),
            "split": split,
            "complete": len(table_rows) == len([r for r in ROWS if r in selected]),
            "metric": METRIC,
            "target_db": TARGET_DB,
            "budget_min": BUDGET_MIN,
            "rows": table_rows,
            "total_wall_s": time.time() - t0,
            "total_cpu_s": time.process_time() - c0,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "threads": threads,
            "torch": torch.__version__,
            "phantoms": PHANTOMS,
            "phantoms64": PHANTOMS64,
            "cohort64": COHORT64,
            "real_cube": {**CUBE, "geometry": CUBE_GEOMETRY},
            "configs": "train.json + cpu_small.json (training), train.json + evaluate.json + cpu_small.json "
            "(evaluation); the *64 rows: cpu_64.json instead of cpu_small.json",
        }
        atomic_write_text(out_path, json.dumps(report, indent=2, default=float) + "\n")
        return report

    for key in [r for r in ROWS if r in selected]:
        model, data, job = jobs[key]
        print(f"[learning] {key} ...", flush=True)
        try:
            res = job()
        except Exception as e:  # one failing row must not hide the others
            table_rows.append({"row": key, "model": model, "data": data, "error": f"{type(e).__name__}: {e}"})
            print(f"[learning] {key} failed: {type(e).__name__}: {e}", flush=True)
            write_report()
            continue
        results[key] = res
        table_rows.append(_row(key, model, data, threads, res))
        print(_format_table(table_rows[-1:]), flush=True)
        print(_format_baselines_table(table_rows[-1:]), flush=True)
        write_report()
    report = write_report()
    print("\n" + _format_table(table_rows))
    print("\n" + _format_baselines_table(table_rows))
    print(f"\n[learning] {report['total_wall_s'] / 60:.1f} min wall in all (budget {BUDGET_MIN:.0f}), "
          f"{report['total_cpu_s'] / 60:.1f} CPU min on {threads} threads; load average "
          f"{load_before[0]:.1f} -> {report['load_average_after'][0]:.1f}; JSON: {out_path}")  # fmt: skip


def merge_reports(paths: list[str], out: str) -> dict:
    """One report from several runs' JSON (rows in ``ROWS`` order); prints the combined table."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    rows = sorted((r for rep in reports for r in rep["rows"]), key=lambda r: ROWS.index(r["row"]))
    merged = {**reports[0], "rows": rows, "merged_from": [str(p) for p in paths],
              "commands": [rep["command"] for rep in reports],
              "complete": {r["row"] for r in rows} == set(ROWS),
              "total_cpu_s": sum(rep.get("total_cpu_s", 0.0) for rep in reports),
              "total_wall_s": sum(rep["total_wall_s"] for rep in reports),
              "load_average_before": [rep["load_average_before"] for rep in reports],
              "load_average_after": [rep["load_average_after"] for rep in reports]}  # fmt: skip
    out_path = (REPO / out) if not Path(out).is_absolute() else Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_path, json.dumps(merged, indent=2, default=float) + "\n")
    print(_format_table(rows))
    print("\n" + _format_baselines_table(rows))
    print(f"\n[learning] merged {len(paths)} runs: {merged['total_wall_s'] / 60:.1f} min wall, "
          f"{merged['total_cpu_s'] / 60:.1f} CPU min in all; JSON: {out_path}")  # fmt: skip
    return merged


if __name__ == "__main__":
    fire.Fire(main)
