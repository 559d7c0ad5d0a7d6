"""The main job: every bundle trained at CPU size and scored on cases it never saw, beside its baseline.

Run through ``bash bin/demo.sh`` (which sets up .venv first); ``--only=perx2ct,pe_classifier`` or
``--skip=...`` select bundles, ``--lanes 1`` runs the steps one after the other.

Data (per-patient splits; no case is in two splits):

* ``cohort`` (``data_prep.cohort`` from the example chest CT LIDC-IDRI-0001 and its TotalSegmentator labels):
  48 generated patients, **32^3 at 10 mm** (the papers' 320 mm field of view), PA + lateral DRRs 64^2 in the
  ``perx2ct`` geometry, label maps (body, lungs, heart, bone) for the anatomy metrics; split 24 training /
  12 validation / 12 test by generated patient. The X-ray -> CT bundles (vqgan_3d_patch, perx2ct,
  progressive_cascade, latent_ddpm) train on it. All cases share one source patient, so every report says
  **same-source** (the test cases share that patient's vessels and textures: the figure measures how well
  the X-rays steer the shape; the phantom rows of ``benchmarks/learning.py`` are the cross-source check).
  Size: 32^3 is the largest that fits the 15-minute budget on 2 cores (measured 5.6 minutes for the 32^3
  phantom demo on an idle machine, docs/LEARNING.md, about 8 with the generated-CT PE row, estimated from the
  per-bundle times; the X-ray -> CT training cost grows with the voxels, about 3.4x at 48^3, which would put
  the perx2ct + progressive_cascade lane alone at about 16 minutes, and 8x at 64^3, which
  ``benchmarks/learning.py`` runs instead);
* ``phantoms_4d``: 64 phantom breathing cycles (32 training / 16 validation / 16 test) (4 phases, 32^3 at 12 mm): average CT -> end-inhale phase;
* ``phantoms_pe``: CTPA crops (32^3 at 4 mm around the central pulmonary arteries) of 48 patients, each with
  and without 3 emboli (``data_prep.phantom.make_pe_dataset``): 24 training / 8 validation / 16 test patients.
  (pe_classifier reads the datalist ``label`` as the PE flag, so it keeps this dataset.)

X-ray2CTPA's claim as a row (pe_classifier): besides the real-CT and the X-ray-only classifiers, a
progressive_cascade is trained on the ``phantoms_pe`` training pairs (DRRs -> CT crop), generates the CT crop
of **every** case (all splits) from its two DRRs, and a classifier is trained and tested on those generated
CTs (``phantoms_pe_generated``): the same patients, the same test cases, the same bootstrap intervals. The
phantoms' clots are not visible on the radiographs, so "generated = X-ray-only = chance" is the expected,
honest answer here.

Each bundle trains with ``train.json + configs/cpu_small.json`` (the recipes, chosen on the validation split)
and is evaluated with ``evaluate.json`` on the **test** split through ``monai.bundle run``, in a subprocess
with one thread (two lanes run side by side on two cores). Its own ``metrics_report.json`` gives the model,
the task's baseline (:mod:`common.baselines`) on the same cases, the split and the case ids; previews
(model | baseline | ground truth) are written beside it. ``<out>/summary.json`` and the printed table
collect them: PSNR in the xray2ct convention (HU [-1024, 2048] -> [0, 1], data range 1) for the image
bundles, ROC AUC for pe_classifier. For the cohort bundles every row also gives the model minus **both**
baselines (the mean training CT and the extent-scaled mean CT, which uses the X-rays' body extent) with paired
bootstrap 95 % intervals over the test cases, and the anatomy metrics (lung and body Dice, heart centroid
error in mm; :mod:`common.anatomy`) of the model and each baseline.
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from xray2ct import driver  # noqa: E402

COHORT = dict(n_cases=48, size=32, spacing=10.0, geometry="perx2ct", drr_pixels=64, seed=0, val_fraction=0.25,
              test_fraction=0.25)  # fmt: skip
PHANTOMS_4D = dict(n_cases=64, size=32, spacing=12.0, geometry="perx2ct", drr_pixels=32, n_phases=4, seed=1)
PHANTOMS_PE = dict(n_patients=(24, 8, 16), size=32, spacing=4.0, emboli=3, geometry="x2ctgan", drr_pixels=32)
IMAGE_METRIC, PE_METRIC = "psnr_xray2ct", "auc"
OVERLAY = "cpu_small.json"  # every bundle's CPU-size recipe, chosen on the validation split
ANATOMY_KEYS = ("lung_dice", "body_dice", "heart_centroid_error_mm")
# the X-ray -> CT model that generates the PE crops from their DRRs: progressive_cascade (cpu_small) on the
# phantoms_pe training pairs, half of cpu_small's stage epochs (48 training crops instead of 24 phantoms)
PE_GENERATOR = {"bundle": "progressive_cascade", "train": [{"stage": s, "stage_epochs": [30, 15, 10]} for s in (1, 2, 3)]}
PE_EXPECTED = ("the phantoms' clots are not visible on the radiographs, so a CT generated from them cannot show "
               "them: generated = X-ray-only = chance (AUC about 0.5) is the expected answer here")  # fmt: skip

# bundle -> dataset, training runs (the overrides of each, on top of train.json + cpu_small.json), headline metric
STEPS: dict[str, dict] = {
    "vqgan_3d_patch": {"data": "cohort", "train": [{}], "metric": IMAGE_METRIC},
    "perx2ct": {"data": "cohort", "train": [{}], "metric": IMAGE_METRIC},
    "progressive_cascade": {"data": "cohort", "train": [{"stage": s} for s in (1, 2, 3)], "metric": IMAGE_METRIC},
    # latent_ddpm cannot beat the mean CT at this size (its VQ-GAN's reconstruction is its ceiling, docs/LEARNING.md):
    # the demo trains it 80 of cpu_small's 150 epochs to stay within 15 minutes
    "latent_ddpm": {"data": "cohort", "train": [{"max_epochs": 80}], "metric": IMAGE_METRIC},
    "pix2pix_phase": {"data": "phantoms_4d", "train": [{}], "metric": IMAGE_METRIC},
    "pe_classifier": {"data": "phantoms_pe", "train": [{}], "metric": PE_METRIC},
}
LANES = (  # two lanes of about equal length; latent_ddpm needs the VQ-GAN of the same lane
    ("vqgan_3d_patch", "latent_ddpm", "pe_classifier"),
    ("perx2ct", "progressive_cascade", "pix2pix_phase"),
)


def make_datasets(out: Path, selected: list[str] | None = None) -> dict[str, Path]:
    """The datasets the ``selected`` bundles need (all by default), under ``<out>/data``."""
    from data_prep.cohort import make_cohort
    from data_prep.phantom import make_pe_dataset, make_phantom_dataset

    needed = {STEPS[n]["data"] for n in (selected or STEPS)}
    roots = {name: out / "data" / name for name in ("cohort", "phantoms_4d", "phantoms_pe") if name in needed}
    if "cohort" in roots:
        make_cohort(roots["cohort"], **COHORT)
    if "phantoms_4d" in roots:
        make_phantom_dataset(roots["phantoms_4d"], **PHANTOMS_4D)
    if "phantoms_pe" in roots:
        make_pe_dataset(roots["phantoms_pe"], **PHANTOMS_PE)
    return roots


def runner(log: Path, threads: int) -> driver.Runner:
    """How the demo runs ``monai.bundle``: a subprocess with ``threads`` threads, its output appended to ``log``."""
    return driver.Subprocess(log, threads)


def generate_pe_cts(checkpoint: Path, source: Path, target: Path, threads: int = 1) -> Path:
    """The generated-CT twin of the PE dataset: every case's CT crop replaced by the X-ray -> CT model's CT.

    ``checkpoint``: a progressive_cascade checkpoint trained on ``source``'s training pairs. Each case of every
    split gets ``<target>/<case>/ct.nii.gz`` (HU, the last trained stage, ``size``^3 over the crop's field of
    view) generated from its own PA + lateral DRRs, which are copied beside it; ids, splits and the 0/1 PE
    labels are those of ``source``, so the classifier on generated CTs is tested on the same patients.
    Returns ``target``.
    """
    import shutil

    import torch

    from bundles.progressive_cascade.scripts.inference import CascadePredictor
    from common.atomic import atomic_write_text
    from common.io import save_volume

    torch.set_num_threads(max(1, int(threads)))
    cascade = CascadePredictor.from_checkpoint(str(checkpoint), device="cpu")
    meta = json.loads((source / "dataset.json").read_text())
    for split in ("training", "validation", "test"):
        for entry in meta.get(split, []):
            case = target / str(entry["id"])
            case.mkdir(parents=True, exist_ok=True)
            for key in ("pa", "lateral"):
                shutil.copyfile(source / entry[key], target / entry[key])
            volumes = cascade.predict_volumes(str(source / entry["pa"]), str(source / entry["lateral"]))
            save_volume(volumes[f"stage{cascade.stage}"], target / entry["ct"])
    meta["description"] = (f"CTs generated by progressive_cascade ({checkpoint}) from the DRRs of {source} "
                           "(bin/demo.py: X-ray2CTPA's generated-CT classifier)")  # fmt: skip
    meta["generated_from"] = {"dataset": str(source), "checkpoint": str(checkpoint), "model": "progressive_cascade"}
    atomic_write_text(target / "dataset.json", json.dumps(meta, indent=2))
    return target


def run_pe_generated(out: Path, data: dict[str, Path], xray_report: Path, log: Path, threads: int) -> dict:
    """X-ray2CTPA's claim on the PE phantoms: a classifier trained and tested on CTs generated from the DRRs.

    The generator (:data:`PE_GENERATOR`) trains on the PE training pairs only; the classifier (cpu_small, CT
    modality) on the generated training CTs, its threshold on the generated validation CTs; its report is
    compared with the X-ray-only classifier's on the same test cases. Returns the summary's ``generated_ct``.
    """
    t0 = time.time()
    run = runner(log, threads)
    gen, bundle = out / "pe_classifier" / "generator", PE_GENERATOR["bundle"]
    driver.train(bundle, data["phantoms_pe"], gen, OVERLAY, stages=PE_GENERATOR["train"], runner=run)
    generated = generate_pe_cts(driver.checkpoint_path(bundle, gen), data["phantoms_pe"],
                                out / "data" / "phantoms_pe_generated", threads)  # fmt: skip
    work = out / "pe_classifier" / "generated_ct"
    source = "generated CTPA (progressive_cascade from the phantom DRRs)"
    report = driver.train_and_evaluate(
        "pe_classifier", generated, work, OVERLAY, eval_overrides=driver.ids(source=source, xray_report=xray_report),
        runner=run, require_unseen=False,
    )["report"]  # fmt: skip
    xray = report.get("comparisons", {}).get("xray_only", {})
    return {
        "status": "ok", "source": source, "generator": PE_GENERATOR, "dataset": str(generated),
        "report": str(work / "eval" / "metrics_report.json"), "n_cases": report["n_cases"],
        "case_ids": report["case_ids"], "auc": report.get("auc"), "accuracy": report.get("accuracy"),
        "xray_only_metrics": xray.get("metrics"), "seconds": round(time.time() - t0, 1), "expected": PE_EXPECTED,
    }  # fmt: skip


def _interval(ci: dict | None) -> dict | None:
    """``{"estimate", "low", "high"}`` of a report interval (None when absent)."""
    if not ci:
        return None
    return {k: ci.get(k) for k in ("estimate", "low", "high")}


def baseline_rows(report: dict, metric: str) -> dict:
    """Model minus each baseline of an image report: the metric and the anatomy metrics, with the paired
    bootstrap 95 % intervals over the test cases (``report["baselines"][name]["difference_ci"]``)."""
    rows = {}
    for name, block in (report.get("baselines") or {}).items():
        ci = block.get("difference_ci") or {}
        metrics = block.get("metrics") or {}
        rows[name] = {
            "description": block.get("description"),
            metric: metrics.get(metric),
            "difference": (block.get("difference") or {}).get(metric),
            "difference_ci": _interval(ci.get(metric)),
            **{k: metrics.get(k) for k in ANATOMY_KEYS},
            **{f"{k}_difference_ci": _interval(ci.get(k)) for k in ANATOMY_KEYS},
        }
    return rows


def run_bundle(name: str, out: Path, data: dict[str, Path], threads: int) -> dict:
    """Train then evaluate one bundle on the test split; returns its summary row."""
    step = STEPS[name]
    work = out / name
    work.mkdir(parents=True, exist_ok=True)
    log = work / "demo.log"
    log.write_text("")
    run, dataset = runner(log, threads), data[step["data"]]
    over = {}
    if name == "latent_ddpm":  # decodes with the VQ-GAN of the same lane
        over = driver.ids(vqgan_checkpoint=driver.checkpoint_path("vqgan_3d_patch", out / "vqgan_3d_patch"))
    t0 = time.time()
    row: dict = {"bundle": name, "data": step["data"], "outputs": str(work), "training_overrides": step["train"]}
    try:
        evaluate = {}
        if name == "pe_classifier":  # the X-ray-only classifier on the same cases, compared in the report
            driver.train_and_evaluate(
                name, dataset, work / "xray_only", OVERLAY, driver.ids(modality="xray"),
                eval_overrides=driver.ids(source="phantom DRR (X-ray only)"), runner=run, require_unseen=False,
            )  # fmt: skip
            evaluate = driver.ids(xray_report=work / "xray_only" / "eval", source="phantom CTPA crops")  # not "real CTPA"
        result = driver.train_and_evaluate(name, dataset, work, OVERLAY, over, step["train"], "test", evaluate, run,
                                           require_unseen=False)  # fmt: skip
        report, t_train = result["report"], result["train_wall_s"]
    except Exception as e:  # one failing bundle must not hide the others
        return {**row, "status": f"failed: {e}", "seconds": round(time.time() - t0, 1)}
    if name == "pe_classifier":  # the generated-CT row; its failure keeps the real-CT and X-ray-only rows
        try:
            row["generated_ct"] = run_pe_generated(out, data, work / "xray_only" / "eval", log, threads)
        except Exception as e:
            row["generated_ct"] = {"status": f"failed: {e}", "expected": PE_EXPECTED}
    metric = step["metric"]
    model, baseline = report["model"], report["baseline"]["metrics"]
    row.update(
        status="ok", seconds=round(time.time() - t0, 1), train_seconds=round(t_train, 1), metric=metric,
        split=report["split"], n_cases=report["n_cases"], case_ids=report["case_ids"],
        smoke_test=report["smoke_test"], model=model.get(metric), baseline=baseline.get(metric),
        difference=report["difference"].get(metric), baseline_name=report["baseline"]["name"],
        model_metrics=model, baseline_metrics=baseline, report=str(work / "eval" / "metrics_report.json"),
        previews=sorted(str(p) for p in (work / "eval").rglob("*.png")),
    )  # fmt: skip
    if step["data"] == "cohort":  # both baselines with intervals, the anatomy metrics, same-source
        row.update(
            baselines=baseline_rows(report, metric), anatomy={k: model.get(k) for k in ANATOMY_KEYS},
            same_source=report.get("same_source"), same_source_note=report.get("same_source_note"),
        )  # fmt: skip
    if name == "vqgan_3d_patch":  # a collapsed codebook (one code) decodes one fixed volume: show it
        row["codebook"] = {k: model.get(k) for k in ("codebook_usage", "perplexity")}
    if name == "pe_classifier":
        xray_only = report.get("comparisons", {}).get("xray_only", {}).get("metrics", {})
        row["xray_only"] = {k: xray_only.get(k) for k in ("auc", "accuracy")}
        row["accuracy"] = {"model": model.get("accuracy"), "baseline": baseline.get("accuracy")}
    print(f"[demo] {format_row(row)}", flush=True)
    return row


def format_row(r: dict) -> str:
    if r.get("status") != "ok":
        return f"{r['bundle']:<21}{r['status']}"
    unit = "dB" if r["metric"].startswith("psnr") else ""
    text = (f"{r['bundle']:<21}{r['metric']:<14}{r['split']:<6}{r['n_cases']:>3}  model {r['model']:7.3f}{unit:<2} "
            f"baseline {r['baseline']:7.3f}{unit:<2} ({r['baseline_name']}) diff {r['difference']:+7.3f}  "
            f"{r['seconds'] / 60:4.1f} min")  # fmt: skip
    if r["bundle"] == "pe_classifier":
        acc = r["accuracy"]
        text += f"\n{'':<21}accuracy {acc['model']:.3f} vs {acc['baseline']:.3f}"
        if r["xray_only"].get("auc") is not None:
            text += f"; X-ray-only classifier AUC {r['xray_only']['auc']:.3f}, accuracy {r['xray_only']['accuracy']:.3f}"
        gen = r.get("generated_ct")
        if gen is not None:
            text += "\n" + format_generated(gen)
    if r["bundle"] == "vqgan_3d_patch" and r.get("codebook", {}).get("codebook_usage") is not None:
        text += f"  codebook usage {r['codebook']['codebook_usage']:.2f}"
    if r["smoke_test"]:
        text += "  [SMOKE TEST: training cases]"
    if r.get("baselines"):
        text += "\n" + format_baselines(r)
    return text


def _fmt_ci(ci: dict | None, digits: int = 2, sign: str = "+") -> str:
    if not ci or ci.get("estimate") is None:
        return "n/a"
    bounds = "" if ci.get("low") is None or ci.get("high") is None else \
        f" [{ci['low']:{sign}.{digits}f}, {ci['high']:{sign}.{digits}f}]"  # fmt: skip
    return f"{ci['estimate']:{sign}.{digits}f}{bounds}"


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_baselines(r: dict) -> str:
    """Model vs each baseline (PSNR difference and lung Dice difference with 95 % intervals) and the anatomy."""
    unit = "dB" if r["metric"].startswith("psnr") else ""
    a = r.get("anatomy") or {}
    lines = []
    if any(v is not None for v in a.values()):  # the VQ-GAN (CT -> CT) has no anatomy metrics
        lines.append(f"{'':<21}anatomy of the model: lung Dice {_fmt(a.get('lung_dice'), '.3f')}, body Dice "
                     f"{_fmt(a.get('body_dice'), '.3f')}, heart centroid error "
                     f"{_fmt(a.get('heart_centroid_error_mm'), '.1f')} mm")  # fmt: skip
    for name, b in r["baselines"].items():
        anatomy = any(b.get(k) is not None for k in ANATOMY_KEYS)
        lines.append(
            f"{'':<21}vs {name:<22} {r['metric']} {_fmt(b.get(r['metric']), '.3f')}{unit}, model - baseline "
            f"{_fmt_ci(b.get('difference_ci'))}{unit}"
            + (f"; lung Dice {_fmt(b.get('lung_dice'), '.3f')} (diff {_fmt_ci(b.get('lung_dice_difference_ci'), 3)}), "
               f"body Dice {_fmt(b.get('body_dice'), '.3f')}, heart centroid "
               f"{_fmt(b.get('heart_centroid_error_mm'), '.1f')} mm" if anatomy else "")
        )  # fmt: skip
    if r.get("same_source"):
        lines.append(f"{'':<21}same-source: {r.get('same_source_note')}")
    elif r.get("same_source_note"):
        lines.append(f"{'':<21}{r['same_source_note']}")
    return "\n".join(lines)


def format_generated(g: dict) -> str:
    """The PE classifier on generated CTs beside the X-ray-only classifier (same test cases)."""
    if g.get("status") != "ok":
        return f"{'':<21}generated-CT classifier: {g.get('status')} (expected: {g['expected']})"
    xray = g.get("xray_only_metrics") or {}
    acc = (g.get("accuracy") or {}).get("estimate")
    return (f"{'':<21}generated-CT classifier ({g['source']}): AUC {_fmt_ci(g.get('auc'), 3, '')}, accuracy "
            f"{_fmt(acc, '.3f')}; X-ray-only AUC {_fmt(xray.get('auc'), '.3f')} on the same {g['n_cases']} cases\n"
            f"{'':<21}  expected: {g['expected']}")  # fmt: skip


def main(out: str = "outputs/demo", only: tuple | str = (), skip: tuple | str = (), lanes: int = 2) -> None:
    """Run the main job; writes ``<out>/summary.json`` and prints the model vs baseline table."""
    only = set(only.split(",") if isinstance(only, str) else only) - {""}
    skip = set(skip.split(",") if isinstance(skip, str) else skip) - {""}
    unknown = (only | skip) - set(STEPS)
    if unknown:
        raise SystemExit(f"unknown bundles {sorted(unknown)}; choose from {list(STEPS)}")
    selected = [n for n in STEPS if (not only or n in only) and n not in skip]
    out_path = (REPO / out) if not Path(out).is_absolute() else Path(out)
    out_path.mkdir(parents=True, exist_ok=True)
    load_before, t0 = os.getloadavg(), time.time()
    data = make_datasets(out_path, selected)
    print(f"[demo] datasets: {', '.join(str(p) for p in data.values())} ({time.time() - t0:.0f} s)", flush=True)
    if "latent_ddpm" in selected and "vqgan_3d_patch" not in selected:
        if not driver.checkpoint_path("vqgan_3d_patch", out_path / "vqgan_3d_patch").is_file():
            selected.insert(0, "vqgan_3d_patch")  # the latent model decodes with the demo's VQ-GAN
    lanes = max(1, int(lanes))
    queues = [[n for n in lane if n in selected] for lane in LANES] if lanes > 1 else [selected]
    threads = max(1, (os.cpu_count() or 1) // len(queues)) if lanes > 1 else min(2, os.cpu_count() or 1)

    def run_lane(queue: list[str]) -> list[dict]:
        return [run_bundle(n, out_path, data, threads) for n in queue]

    with ThreadPoolExecutor(len(queues)) as pool:
        rows = {r["bundle"]: r for lane in pool.map(run_lane, queues) for r in lane}
    results = [rows[n] for n in STEPS if n in rows]
    summary = {
        "command": "bash bin/demo.sh " + " ".join(sys.argv[1:]),
        "seconds": round(time.time() - t0, 1),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "lanes": len(queues),
        "threads_per_lane": threads,
        "datasets": {name: {**settings, "root": str(data[name])} for name, settings in
                     (("cohort", COHORT), ("phantoms_4d", PHANTOMS_4D), ("phantoms_pe", PHANTOMS_PE)) if name in data},
        "cohort_size": "32^3 at 10 mm (320 mm field of view), X-rays 64^2: the largest that fits the 15-minute "
                       "budget on 2 cores (benchmarks/learning.py runs 64^3 at 5 mm)",  # fmt: skip
        "conventions": {
            IMAGE_METRIC: "PSNR, HU [-1024, 2048] -> [0, 1], data range 1, per volume, mean over the test cases",
            PE_METRIC: "ROC AUC over the test cases (prevalence baseline: 0.5 by construction)",
            "intervals": "paired percentile bootstrap 95 % intervals of model - baseline over the test cases "
                         "(common.handlers.MetricsReport); AUC: bootstrap over the test cases",
            "anatomy": "lung and body Dice, heart centroid error in mm (common.anatomy; truth from the label maps)",
            "same_source": "the cohort's cases share one source patient (LIDC-IDRI-0001): its figures are "
                           "same-source (how well the X-rays steer the shape), not cross-patient generalisation",
        },  # fmt: skip
        "bundles": results,
    }
    from common.atomic import atomic_write_text

    atomic_write_text(out_path / "summary.json", json.dumps(summary, indent=2, default=float) + "\n")
    print("\n[demo] model vs baseline on unseen test cases (per bundle: metric, split, n cases):")
    for r in results:
        print("  " + format_row(r))
    print(f"[demo] done in {summary['seconds'] / 60:.1f} min ({len(queues)} lane(s) x {threads} thread(s); load "
          f"average {load_before[0]:.1f} -> {summary['load_average_after'][0]:.1f}); summary: "
          f"{out_path / 'summary.json'}")  # fmt: skip
    pngs = sorted(str(p.relative_to(out_path)) for p in out_path.rglob("*.png") if "data" not in p.parts[-4:-1])
    print(f"[demo] pictures ({len(pngs)} PNG) under {out_path}:")
    for p in pngs:
        print(f"    {p}")
    if any(r["status"] != "ok" for r in results):
        sys.exit(1)


if __name__ == "__main__":
    fire.Fire(main)
