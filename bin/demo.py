"""The main job: every bundle trained at CPU size and scored on cases it never saw, beside its baseline.

Run through ``bash bin/demo.sh`` (which sets up .venv first); ``--only=perx2ct,pe_classifier`` or
``--skip=...`` select bundles, ``--lanes 1`` runs the steps one after the other.

Data (``data_prep.phantom``, per-patient splits; no case is in two splits):

* ``phantoms``: 48 phantom chests (32^3 at 12 mm, PA + lateral DRRs 64^2 in the ``perx2ct`` geometry, half
  of them with pulmonary emboli), split 24 training / 12 validation / 12 test, as ``benchmarks/learning.py``;
* ``phantoms_4d``: 64 phantom breathing cycles (32 training / 16 validation / 16 test) (4 phases, 32^3 at 12 mm): average CT -> end-inhale phase;
* ``phantoms_pe``: CTPA crops (32^3 at 4 mm around the central pulmonary arteries) of 48 patients, each with
  and without 3 emboli (``data_prep.phantom.make_pe_dataset``): 24 training / 8 validation / 16 test patients.

Each bundle trains with ``train.json + configs/cpu_small.json`` (the recipes, chosen on the validation split)
and is evaluated with ``evaluate.json`` on the **test** split through ``monai.bundle run``, in a subprocess
with one thread (two lanes run side by side on two cores). Its own ``metrics_report.json`` gives the model,
the task's baseline (:mod:`common.baselines`) on the same cases, the split and the case ids; previews
(model | baseline | ground truth) are written beside it. ``<out>/summary.json`` and the printed table
collect them: PSNR in the xray2ct convention (HU [-1024, 2048] -> [0, 1], data range 1) for the image
bundles, ROC AUC for pe_classifier.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PHANTOMS = dict(n_cases=48, size=32, spacing=12.0, geometry="perx2ct", drr_pixels=64, seed=0)
PHANTOMS_4D = dict(n_cases=64, size=32, spacing=12.0, geometry="perx2ct", drr_pixels=32, n_phases=4, seed=1)
PHANTOMS_PE = dict(n_patients=(24, 8, 16), size=32, spacing=4.0, emboli=3, geometry="x2ctgan", drr_pixels=32)
IMAGE_METRIC, PE_METRIC = "psnr_xray2ct", "auc"

# bundle -> dataset, training runs (the overrides of each, on top of train.json + cpu_small.json), headline metric
STEPS: dict[str, dict] = {
    "vqgan_3d_patch": {"data": "phantoms", "train": [{}], "metric": IMAGE_METRIC},
    "perx2ct": {"data": "phantoms", "train": [{}], "metric": IMAGE_METRIC},
    "progressive_cascade": {"data": "phantoms", "train": [{"stage": s} for s in (1, 2, 3)], "metric": IMAGE_METRIC},
    # latent_ddpm cannot beat the mean CT at this size (its VQ-GAN's reconstruction is its ceiling, docs/LEARNING.md):
    # the demo trains it 80 of cpu_small's 150 epochs to stay within 15 minutes
    "latent_ddpm": {"data": "phantoms", "train": [{"max_epochs": 80}], "metric": IMAGE_METRIC},
    "pix2pix_phase": {"data": "phantoms_4d", "train": [{}], "metric": IMAGE_METRIC},
    "pe_classifier": {"data": "phantoms_pe", "train": [{}], "metric": PE_METRIC},
}
LANES = (  # two lanes of about equal length; latent_ddpm needs the VQ-GAN of the same lane
    ("vqgan_3d_patch", "latent_ddpm", "pe_classifier"),
    ("perx2ct", "progressive_cascade", "pix2pix_phase"),
)


def make_datasets(out: Path) -> dict[str, Path]:
    from data_prep.phantom import make_pe_dataset, make_phantom_dataset

    roots = {name: out / "data" / name for name in ("phantoms", "phantoms_4d", "phantoms_pe")}
    make_phantom_dataset(roots["phantoms"], **PHANTOMS)
    make_phantom_dataset(roots["phantoms_4d"], **PHANTOMS_4D)
    make_pe_dataset(roots["phantoms_pe"], **PHANTOMS_PE)
    return roots


def configs(bundle: str, *names: str) -> list[str]:
    return [str(REPO / "bundles" / bundle / "configs" / n) for n in names]


def bundle_run(run_id: str, files: list[str], overrides: dict, log: Path, threads: int) -> None:
    """``monai.bundle run <run_id>`` in a subprocess with ``threads`` threads; its output goes to ``log``."""
    args = log.with_suffix(f".{run_id}.json")
    args.write_text(json.dumps(overrides))
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", json.dumps(files),
           "--args_file", str(args)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        res = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        raise RuntimeError(f"{run_id} failed (exit {res.returncode}); log: {log}")


def run_bundle(name: str, out: Path, data: dict[str, Path], threads: int) -> dict:
    """Train then evaluate one bundle on the test split; returns its summary row."""
    step = STEPS[name]
    work = out / name
    work.mkdir(parents=True, exist_ok=True)
    log = work / "demo.log"
    log.write_text("")
    base = {"dataset_dir": str(data[step["data"]]), "bundle_root": str(work), "output_dir": str(work / "eval")}
    if name == "latent_ddpm":
        base["vqgan_checkpoint"] = str(out / "vqgan_3d_patch" / "models" / "model.pt")
    t0 = time.time()
    row: dict = {"bundle": name, "data": step["data"], "outputs": str(work), "training_overrides": step["train"]}
    try:
        for over in step["train"]:
            bundle_run("training", configs(name, "train.json", "cpu_small.json"), {**base, **over}, log, threads)
        t_train = time.time() - t0
        files = configs(name, "train.json", "evaluate.json", "cpu_small.json")
        evaluate = {**base, "eval_split": "test"}
        if name == "pe_classifier":  # the X-ray-only classifier on the same cases, compared in the report
            xray = {**base, "modality": "xray", "bundle_root": str(work / "xray_only"),
                    "output_dir": str(work / "xray_only" / "eval")}  # fmt: skip
            bundle_run("training", configs(name, "train.json", "cpu_small.json"), xray, log, threads)
            bundle_run("evaluating", files, {**xray, "eval_split": "test", "source": "phantom DRR (X-ray only)"}, log,
                       threads)  # fmt: skip
            evaluate.update(xray_report=xray["output_dir"], source="phantom CTPA crops")  # not "real CTPA"
        bundle_run("evaluating", files, evaluate, log, threads)
        report = json.loads((work / "eval" / "metrics_report.json").read_text())
    except Exception as e:  # one failing bundle must not hide the others
        return {**row, "status": f"failed: {e}", "seconds": round(time.time() - t0, 1)}
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
    if r["bundle"] == "vqgan_3d_patch" and r.get("codebook", {}).get("codebook_usage") is not None:
        text += f"  codebook usage {r['codebook']['codebook_usage']:.2f}"
    if r["smoke_test"]:
        text += "  [SMOKE TEST: training cases]"
    return text


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
    data = make_datasets(out_path)
    print(f"[demo] datasets: {', '.join(str(p) for p in data.values())} ({time.time() - t0:.0f} s)", flush=True)
    if "latent_ddpm" in selected and "vqgan_3d_patch" not in selected:
        if not (out_path / "vqgan_3d_patch" / "models" / "model.pt").is_file():
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
        "datasets": {"phantoms": {**PHANTOMS, "root": str(data["phantoms"])},
                     "phantoms_4d": {**PHANTOMS_4D, "root": str(data["phantoms_4d"])},
                     "phantoms_pe": {**PHANTOMS_PE, "root": str(data["phantoms_pe"])}},  # fmt: skip
        "conventions": {
            IMAGE_METRIC: "PSNR, HU [-1024, 2048] -> [0, 1], data range 1, per volume, mean over the test cases",
            PE_METRIC: "ROC AUC over the test cases (prevalence baseline: 0.5 by construction)",
        },
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
