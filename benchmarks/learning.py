"""Learning benchmark (issue 12): does every model beat its trivial baseline on cases it never trained on?

    python benchmarks/learning.py [--rows all|vqgan_phantoms,perx2ct_phantoms,...] [--threads 2]
                                  [--work outputs/benchmarks/learning_work] [--out outputs/benchmarks/learning.json]

Trains each model at CPU size through its bundle's own configs (``monai.bundle run training`` with
``train.json`` + ``configs/cpu_small.json`` + dataset overrides: what a user runs), then scores it on the
test split beside the baseline of its task (:mod:`common.baselines`), on the same cases, in the same
conventions:

* phantoms (``data_prep.phantom``, 48 patients, 32^3 at 12 mm, PA + lateral DRRs 64^2 in the ``perx2ct``
  geometry; split 24 training / 12 validation / 12 test, per patient): vqgan_3d_patch (baseline: box
  average by the latent factor + trilinear upsampling), perx2ct, progressive_cascade and latent_ddpm (on
  the phantom VQ-GAN; baseline for the three: the mean training CT, which ignores the X-rays);
* real CT, one patient held out: the two crops of ``../shared/data/ct`` (one patient, TotalSegmentator)
  are the test cases; training uses the example chest CT (``data_prep.example_ct``, LIDC-IDRI-0001):
  vqgan_3d_patch on its lower three quarters (validation: the upper quarter) at 3 mm, perx2ct on
  augmented crops (144 mm cubes at random positions in the chest, 32^3 at 4.5 mm, DRR pairs by
  ``data_prep.build_pairs`` with a 250 mm detector; validation: other random cubes of the same CT).

Recipes were chosen on the validation splits only. The table gives PSNR in the xray2ct convention
(HU [-1024, 2048] -> [0, 1], data range 1, per volume, mean over the test cases); the JSON also holds SSIM,
MAE (HU) and the X2CT-GAN / PerX2CT conventions per case. Train minutes are wall-clock; the machine
may be shared, so the CPU minutes and the contention ratio wall / (CPU / threads) are given too (an
idle machine needs about CPU / threads minutes, a lower bound when threads do not scale perfectly).
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
from common.baselines import BOX_DOWN_UP, MEAN_TRAINING_CT, box_down_up, compare, mean_training_ct  # noqa: E402
from common.intensity import XRAY2CT  # noqa: E402
from common.io import load_volume, save_volume  # noqa: E402
from common.metrics import CONVENTIONS, compute_ct_metrics  # noqa: E402
from common.volume import Volume  # noqa: E402

BUNDLES = REPO / "bundles"
ROWS = (  # run in this order (latent_ddpm needs the phantom VQ-GAN)
    "vqgan_phantoms",
    "perx2ct_phantoms",
    "latent_ddpm_phantoms",
    "vqgan_real",
    "perx2ct_real",
    "cascade_phantoms",
)
METRIC = "psnr_xray2ct"
TARGET_DB = 1.0
PHANTOMS = dict(n_cases=48, size=32, spacing=12.0, geometry="perx2ct", drr_pixels=64, seed=0)
REAL_SPACING_VQ = 3.0
# one training volume: 6 iterations of 4 patches per epoch, as the phantom row (24 volumes, batch 4)
# (24 patches in one batch per epoch gave only 150 optimizer steps and a validation PSNR still rising)
REAL_VQ_OVERRIDES = {"patches_per_volume": 4, "epoch_length": 6}
CUBE = dict(size=32, spacing=4.5, n_train=40, n_val=8, seed=0)
CUBE_GEOMETRY = dict(
    name="cube", sad=700.0, sid=949.0, detector_pixels=[64, 64], detector_size_mm=[250.0, 250.0]
)


# ----------------------------------------------------------------------------------------------- helpers
class Clock:
    """Wall and process CPU time (all threads) of a block."""

    def __enter__(self):
        self.t0, self.c0 = time.time(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.time() - self.t0, time.process_time() - self.c0


def configs(bundle: str, *names: str) -> list[str]:
    return [str(BUNDLES / bundle / "configs" / n) for n in names]


def parser_for(files: list[str], overrides: dict):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(files)
    parser.update(overrides)
    return parser


def load_state(path: str | Path) -> dict:
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return state["model"] if isinstance(state, dict) and "model" in state else state


def split_items(dataset_dir: str | Path, key: str) -> list[dict]:
    from monai.data import load_decathlon_datalist

    return load_decathlon_datalist(str(Path(dataset_dir) / "dataset.json"), True, key, str(dataset_dir))


def case_id(item: dict) -> str:
    return os.path.basename(os.path.normpath(str(item.get("id", item["ct"]))))


def gt_hu(path: str) -> np.ndarray:
    return np.asarray(load_volume(path).to_canonical().array, dtype=np.float32)


def score(cases: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], baseline: str) -> dict:
    """Per-case and mean metrics of the model and the baseline: ``cases`` = (id, pred, baseline, target) HU."""
    rows = []
    for cid, pred, base, target in cases:
        rows.append(
            {
                "id": cid,
                "model": compute_ct_metrics(pred, target),
                "baseline": compute_ct_metrics(base, target),
            }
        )
    keys = list(rows[0]["model"])
    model = {k: float(np.mean([r["model"][k] for r in rows])) for k in keys}
    base = {k: float(np.mean([r["baseline"][k] for r in rows])) for k in keys}
    return {
        "baseline_name": baseline,
        "model": model,
        "baseline": base,
        **compare(model, base),
        "cases": rows,
    }


SMOKE: dict = {}  # --smoke: a few steps per model, to check the pipeline (its figures mean nothing)


def train(bundle: str, files: list[str], overrides: dict, run_id: str = "training") -> dict:
    from monai.bundle import run

    with Clock() as clock:
        run(run_id, config_file=files, **{**overrides, **SMOKE})
    return {"wall_s": clock.wall, "cpu_s": clock.cpu}


# ----------------------------------------------------------------------------------------------- data
def phantom_dataset(work: Path) -> Path:
    from data_prep.phantom import make_phantom_dataset

    root = work / "phantoms"
    make_phantom_dataset(root, **PHANTOMS)
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
    names = {"training": [], "validation": [], "test": []}
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
    entries = {e["id"]: e for split in ("training", "validation", "test") for e in meta[split]}
    for split, ids in names.items():
        meta[split] = [entries[i] for i in ids if i in entries]
    meta["split"] = {
        "by": "patient: training/validation = LIDC-IDRI-0001 cubes, test = the other patient's crops"
    }
    atomic_write_text(root / "dataset.json", json.dumps(meta, indent=2))
    return root


# ----------------------------------------------------------------------------------------------- rows
def _mean_ct(dataset: Path) -> np.ndarray:
    return mean_training_ct([i["ct"] for i in split_items(dataset, "training")])


def run_vqgan(dataset: Path, work: Path, name: str, extra: dict | None = None) -> dict:
    from bundles.vqgan_3d_patch.scripts.codec import load_vqgan, reconstruct_volume
    from bundles.vqgan_3d_patch.scripts.networks import downsampling_factor

    files = configs("vqgan_3d_patch", "train.json", "cpu_small.json")
    over = dict(dataset_dir=str(dataset), bundle_root=str(work / name), output_dir=str(work / name / "eval"))
    over.update(extra or {})
    timing = train("vqgan_3d_patch", files, over)
    parser = parser_for(files, over)
    net = load_vqgan(work / name / "models" / "model.pt", parser.get_parsed_content("network_def"))
    roi, overlap = parser.get_parsed_content("val_roi_size"), parser.get_parsed_content("val_overlap")
    factor = downsampling_factor(net)
    cases = []
    for item in split_items(dataset, "test"):
        target = gt_hu(item["ct"])
        x = torch.from_numpy(XRAY2CT.to_unit(target))[None, None]
        pred = reconstruct_volume(net, x, roi, overlap).clamp(0, 1)
        cases.append((case_id(item), XRAY2CT.from_unit(pred[0, 0]).numpy(),
                      XRAY2CT.from_unit(box_down_up(x, factor)[0, 0]).numpy(), target))  # fmt: skip
    return {
        **score(cases, BOX_DOWN_UP),
        **timing,
        "latent_factor": factor,
        "checkpoint": str(work / name / "models" / "model.pt"),
    }


def run_perx2ct(dataset: Path, work: Path, name: str) -> dict:
    files = configs("perx2ct", "train.json", "cpu_small.json")
    over = dict(dataset_dir=str(dataset), bundle_root=str(work / name), output_dir=str(work / name / "out"))
    timing = train("perx2ct", files, over)
    parser = parser_for(files, over)
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(load_state(work / name / "models" / "model.pt"))
    net.eval()
    transform = parser.get_parsed_content("train#preprocessing")
    mean = _mean_ct(dataset)
    cases = []
    with torch.no_grad():
        for item in split_items(dataset, "test"):
            pred = net(transform(dict(item))["image"][None]).clamp(0, 1)[0, 0]
            cases.append((case_id(item), XRAY2CT.from_unit(pred).numpy(), mean, gt_hu(item["ct"])))
    return {**score(cases, MEAN_TRAINING_CT), **timing}


def run_cascade(dataset: Path, work: Path, name: str) -> dict:
    files = configs("progressive_cascade", "train.json", "cpu_small.json")
    over = dict(dataset_dir=str(dataset), bundle_root=str(work / name), output_dir=str(work / name / "out"))
    timing = {"wall_s": 0.0, "cpu_s": 0.0}
    for stage in (1, 2, 3):
        t = train("progressive_cascade", files, {**over, "stage": stage})
        timing = {k: timing[k] + t[k] for k in timing}
    parser = parser_for(files, {**over, "stage": 3})
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(load_state(work / name / "models" / "stage3_model.pt"))
    net.eval()
    transform = parser.get_parsed_content("preprocessing")
    mean = _mean_ct(dataset)
    cases, stages = [], []
    with torch.no_grad():
        for item in split_items(dataset, "test"):
            data = transform(dict(item))
            outs = net.forward_all(torch.cat((data["pa"], data["lateral"]), dim=0)[None])
            pred = outs[-1].clamp(0, 1)[0, 0]
            cases.append((case_id(item), XRAY2CT.from_unit(pred).numpy(), mean, gt_hu(item["ct"])))
            stages.append([float(XRAY2CT.from_unit(o.clamp(0, 1)).std()) for o in outs])
    return {**score(cases, MEAN_TRAINING_CT), **timing, "stage_output_std_hu": np.mean(stages, 0).tolist()}


def run_latent_ddpm(dataset: Path, work: Path, name: str, vqgan_checkpoint: str) -> dict:
    from bundles.latent_ddpm.scripts.data import LoadXrayd
    from bundles.vqgan_3d_patch.scripts.codec import decode_latents, encode_volume

    files = configs("latent_ddpm", "train.json", "cpu_small.json")
    over = dict(
        dataset_dir=str(dataset), bundle_root=str(BUNDLES / "latent_ddpm"), output_dir=str(work / name),
        ckpt_dir=str(work / name / "models"), vqgan_checkpoint=vqgan_checkpoint,
    )  # fmt: skip
    timing = train("latent_ddpm", files, over)
    parser = parser_for(configs("latent_ddpm", "train.json", "evaluate.json", "cpu_small.json"), over)
    net = parser.get_parsed_content("network")
    net.load_state_dict(load_state(work / name / "models" / "model.pt"))
    net.eval()
    sampler = parser.get_parsed_content("evaluate#inferer")
    load = LoadXrayd(keys="pa", size=parser.get_parsed_content("xray_size"))
    mean = _mean_ct(dataset)
    cases, ceiling = [], []
    with torch.no_grad():
        for item in split_items(dataset, "test"):
            xray = load({"pa": item["pa"]})["pa"][None].float()
            pred = sampler(xray, net)[0, 0]
            target = gt_hu(item["ct"])
            cases.append((case_id(item), XRAY2CT.from_unit(pred).numpy(), mean, target))
            # the ceiling: the VQ-GAN's own reconstruction of the test CT (the best a perfect sampler decodes)
            x = torch.from_numpy(XRAY2CT.to_unit(target))[None, None]
            latents = encode_volume(sampler.vqgan, x, roi=sampler.roi, overlap=sampler.overlap)
            recon = decode_latents(sampler.vqgan, latents, roi=sampler.roi, overlap=sampler.overlap).clamp(
                0, 1
            )
            ceiling.append(compute_ct_metrics(XRAY2CT.from_unit(recon[0, 0]).numpy(), target)[METRIC])
    return {**score(cases, MEAN_TRAINING_CT), **timing, "vqgan_checkpoint": vqgan_checkpoint,
            "vqgan_ceiling_psnr": float(np.mean(ceiling))}  # fmt: skip


# ----------------------------------------------------------------------------------------------- main
def _format_table(rows: list[dict]) -> str:
    head = (f"{'model':<22}{'data':<16}{'metric (convention)':<30}{'model':>8}{'baseline':>10}{'diff':>8}"
            f"  {'baseline name':<18}{'train min':>10}{'CPU min':>9}{'idle est':>9}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']:<22}{r['data']:<16}ERROR {r['error']}")
            continue
        lines.append(
            f"{r['model']:<22}{r['data']:<16}{'PSNR dB (xray2ct, range 1)':<30}{r['model_metrics'][METRIC]:>8.2f}"
            f"{r['baseline_metrics'][METRIC]:>10.2f}{r['difference'][METRIC]:>+8.2f}  {r['baseline_name']:<18}"
            f"{r['wall_s'] / 60:>10.1f}{r['cpu_s'] / 60:>9.1f}{r['cpu_s'] / 60 / r['threads']:>9.1f}"
        )
    return "\n".join(lines)


def main(
    rows: str | tuple = "all",
    threads: int = 2,
    work: str = "outputs/benchmarks/learning_work",
    out: str = "outputs/benchmarks/learning.json",
    smoke: bool = False,
    merge: str | tuple = (),
) -> None:
    """Run the selected rows (``--rows vqgan_phantoms,perx2ct_phantoms``); print the table, write JSON.

    ``--smoke`` trains every model for 2 epochs (one per cascade stage) to check the pipeline only.
    ``--merge a.json,b.json`` runs nothing: it combines the rows of earlier runs (e.g. rows run as
    separate processes) into ``--out`` and prints the table.
    """
    if merge:
        merge_reports(list(merge.split(",") if isinstance(merge, str) else merge), out)
        return
    if smoke:
        SMOKE.update(max_epochs=2, val_interval=1, save_interval=2, stage_epochs=[1, 1, 1])
    selected = list(ROWS) if rows == "all" else list(rows.split(",") if isinstance(rows, str) else rows)
    unknown = set(selected) - set(ROWS)
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; choose from {ROWS}")
    if "latent_ddpm_phantoms" in selected and "vqgan_phantoms" not in selected:
        selected.insert(0, "vqgan_phantoms")  # the latent model needs the phantom VQ-GAN
    torch.set_num_threads(int(threads))
    work_dir = (REPO / work) if not Path(work).is_absolute() else Path(work)
    work_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    t0 = time.time()
    phantoms = phantom_dataset(work_dir) if any(r.endswith("phantoms") for r in selected) else None
    volumes = real_volumes() if any(r.endswith("real") for r in selected) else None
    results: dict[str, dict] = {}
    jobs: dict[str, tuple[str, str, Callable[[], dict]]] = {
        "vqgan_phantoms": ("vqgan_3d_patch", "phantoms", lambda: run_vqgan(phantoms, work_dir, "vqgan_phantoms")),
        "perx2ct_phantoms": ("perx2ct", "phantoms", lambda: run_perx2ct(phantoms, work_dir, "perx2ct_phantoms")),
        "cascade_phantoms": ("progressive_cascade", "phantoms", lambda: run_cascade(phantoms, work_dir, "cascade_phantoms")),
        "latent_ddpm_phantoms": ("latent_ddpm", "phantoms", lambda: run_latent_ddpm(
            phantoms, work_dir, "latent_ddpm_phantoms", results["vqgan_phantoms"]["checkpoint"])),
        "vqgan_real": ("vqgan_3d_patch", "real CT", lambda: run_vqgan(vq_real_dataset(work_dir, volumes), work_dir, "vqgan_real", REAL_VQ_OVERRIDES)),
        "perx2ct_real": ("perx2ct", "real DRR pairs", lambda: run_perx2ct(perx_real_dataset(work_dir, volumes), work_dir, "perx2ct_real")),
    }  # fmt: skip
    table_rows: list[dict] = []
    out_path = (REPO / out) if not Path(out).is_absolute() else Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def write_report() -> dict:
        total = time.time() - t0
        train_cpu = sum(r.get("cpu_s", 0.0) for r in table_rows)
        report = {
            "command": "python benchmarks/learning.py " + " ".join(sys.argv[1:]),
            "smoke": bool(smoke),
            "complete": len(table_rows) == len([r for r in ROWS if r in selected]),
            "metric": METRIC,
            "target_db": TARGET_DB,
            "rows": table_rows,
            "total_wall_s": total,
            "train_cpu_s": train_cpu,
            "contention_ratio": total / max(1e-9, train_cpu / int(threads)),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "threads": int(threads),
            "torch": torch.__version__,
            "phantoms": PHANTOMS,
            "real_cube": {**CUBE, "geometry": CUBE_GEOMETRY},
            "conventions": CONVENTIONS,
            "baselines": {
                MEAN_TRAINING_CT: "common.baselines.mean_training_ct of the training split",
                BOX_DOWN_UP: "common.baselines.box_down_up by the VQ-GAN's latent factor",
            },  # fmt: skip
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
            print(f"[learning] {key} failed: {e}", flush=True)
            write_report()
            continue
        results[key] = res
        table_rows.append({
            "row": key, "model": model, "data": data, "threads": int(threads), "baseline_name": res["baseline_name"],
            "model_metrics": res["model"], "baseline_metrics": res["baseline"], "difference": res["difference"],
            "model_better": res["model_better"], "beats_target": res["difference"][METRIC] >= TARGET_DB,
            "wall_s": res["wall_s"], "cpu_s": res["cpu_s"], "n_test_cases": len(res["cases"]),
            "case_ids": [c["id"] for c in res["cases"]], "cases": res["cases"],
            **{k: res[k] for k in ("latent_factor", "stage_output_std_hu", "vqgan_ceiling_psnr") if k in res},
        })  # fmt: skip
        print(_format_table(table_rows[-1:]), flush=True)
        write_report()
    report = write_report()
    total, train_cpu = report["total_wall_s"], report["train_cpu_s"]
    print("\n" + _format_table(table_rows))
    print(f"\n[learning] {total / 60:.1f} min wall in all; training {train_cpu / 60:.1f} CPU min on {threads} threads "
          f"(idle estimate {train_cpu / 60 / int(threads):.1f} min; wall / idle estimate {report['contention_ratio']:.1f}); "
          f"load average {load_before[0]:.1f} -> {report['load_average_after'][0]:.1f}; JSON: {out_path}")  # fmt: skip


def merge_reports(paths: list[str], out: str) -> dict:
    """One report from several runs' JSON (rows in ``ROWS`` order); prints the combined table."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    rows = sorted((r for rep in reports for r in rep["rows"]), key=lambda r: ROWS.index(r["row"]))
    merged = {**reports[0], "rows": rows, "merged_from": [str(p) for p in paths],
              "commands": [rep["command"] for rep in reports],
              "complete": {r["row"] for r in rows} == set(ROWS),
              "train_cpu_s": sum(r.get("cpu_s", 0.0) for r in rows),
              "total_wall_s": max(rep["total_wall_s"] for rep in reports),
              "load_average_before": [rep["load_average_before"] for rep in reports],
              "load_average_after": [rep["load_average_after"] for rep in reports]}  # fmt: skip
    out_path = (REPO / out) if not Path(out).is_absolute() else Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_path, json.dumps(merged, indent=2, default=float) + "\n")
    print(_format_table(rows))
    print(
        f"\n[learning] merged {len(paths)} runs; training {merged['train_cpu_s'] / 60:.1f} CPU min in all; JSON: {out_path}"
    )
    return merged


if __name__ == "__main__":
    fire.Fire(main)
