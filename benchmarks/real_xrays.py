"""Real radiographs through xray2ct-pipeline, before and after each preparation step (issue 22, item 7).

    python benchmarks/real_xrays.py [--data ../shared/data/cxr] [--work outputs/benchmarks/real_xrays_work]
                                    [--out outputs/benchmarks/real_xrays.json] [--epochs 3] [--threads 1]
                                    [--pairs_checkpoint ckpt.pt] [--frontal_checkpoint ckpt.pt]

Models: by default small checkpoints trained here in a minute (``cpu_tiny`` overlays, phantom chests 32^3 at
10 mm with 32^2 DRRs in the x2ctgan geometry): progressive_cascade (3 stages) for the PA + lateral pairs of
``<data>/pairs`` and latent_ddpm (on a random VQ-GAN) for the frontals of ``<data>/frontal``; pass the main
job's checkpoints instead with ``--pairs_checkpoint`` / ``--frontal_checkpoint`` (they must record the DRR
quantiles and statistics, i.e. be trained after issue 22, for the matched rows and the gap's range).

Rows, per case: ``legacy`` (centred square crop, the old path), ``legacy+match``, ``geometry`` (the film's scale
mapped onto the training DRRs', centred on the body), ``geometry+match`` (the default). Columns: domain gap
(mean |z| of structure statistics vs the training DRRs; :mod:`common.domain_gap`), its warnings, plausibility
warnings of the CT (:mod:`common.plausibility`), fixed-reference agreement (Spearman rho of the CT's DRRs with
the geometry-aligned film, beside the mean training CT's; :mod:`common.agreement`) and, for contrast, the
gameable DRR-consistency PSNR against the prepared input. The tiny models' CTs are not chests; the figures
show what each step does to the inputs and to the checks, not reconstruction quality.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import fire
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.atomic import atomic_write_text  # noqa: E402

BUNDLES = REPO / "bundles"
STEPS = {"legacy": ("legacy", "none"), "legacy+match": ("legacy", "match"),
         "geometry": ("geometry", "none"), "geometry+match": ("geometry", "match")}  # fmt: skip


def _train(bundle: str, epochs: int, **overrides) -> None:
    from monai.bundle import run

    configs = BUNDLES / bundle / "configs"
    run("training", config_file=[str(configs / "train.json"), str(configs / "cpu_tiny.json")],
        meta_file=str(configs / "metadata.json"), logging_file=str(configs / "logging.conf"),
        max_epochs=int(epochs), **overrides)  # fmt: skip


def tiny_models(work: Path, epochs: int) -> dict:
    """The cascade and latent_ddpm checkpoints of the benchmark (trained once, reused from ``work``)."""
    from bundles.latent_ddpm.scripts.demo import random_vqgan
    from data_prep.phantom import make_phantom_dataset

    cascade, ldm = work / "cascade" / "models" / "stage3_model.pt", work / "ldm" / "model.pt"
    data = work / "data"
    if not (cascade.is_file() and ldm.is_file()):
        make_phantom_dataset(data, n_cases=12, size=32, spacing=10.0, geometry="x2ctgan", drr_pixels=32, seed=0)
    common = {"dataset_dir": str(data)}
    if not cascade.is_file():
        for stage in (1, 2, 3):
            _train("progressive_cascade", epochs, stage=stage, bundle_root=str(work / "cascade"),
                   output_dir=str(work / "cascade_out"), device="cpu", **common)  # fmt: skip
    if not ldm.is_file():
        vqgan = random_vqgan(str(work / "vqgan.pt"))
        _train("latent_ddpm", epochs, bundle_root=str(BUNDLES / "latent_ddpm"), output_dir=str(work / "ldm_out"),
               ckpt_dir=str(work / "ldm"), vqgan_checkpoint=str(vqgan), sampling_steps=2, **common)  # fmt: skip
    return {"pairs": str(cascade), "frontal": str(ldm)}


def _row(report: dict) -> dict:
    gap, plausible = report["domain_gap"], report["plausibility"]
    agreement = report["agreement"] or {}
    views = report["preparation"]["views"]
    return {
        "domain_gap": gap["score"],
        "gap_warnings": len(gap["warnings"]),
        "plausibility_warnings": len(plausible["warnings"]),
        "lung_volume_l": plausible["measures"]["lung_volume_l"],
        "cardiothoracic_ratio": plausible["measures"]["cardiothoracic_ratio"],
        "agreement_ct": (agreement.get("ct") or {}).get("mean"),
        "agreement_mean_ct": (agreement.get("mean_ct") or {}).get("mean"),
        "drr_psnr_prepared": (report["drr_consistency"] or {}).get("drr_psnr"),
        "scale_source": {v: info["scale_source"] for v, info in views.items()},
        "p5_p95": {v: [s["p5"], s["p95"]] for v, s in report["preparation"]["intensity"]["before"].items()},
    }


def main(
    data: str = str(REPO.parent / "shared" / "data" / "cxr"),
    work: str = "outputs/benchmarks/real_xrays_work",
    out: str = "outputs/benchmarks/real_xrays.json",
    epochs: int = 3,
    threads: int = 1,
    pairs_checkpoint: str | None = None,
    frontal_checkpoint: str | None = None,
) -> dict:
    from xray2ct.pipeline import pipeline

    torch.set_num_threads(int(threads))
    work_dir = Path(work)
    work_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    models = {} if (pairs_checkpoint and frontal_checkpoint) else tiny_models(work_dir, epochs)
    models.update({k: v for k, v in (("pairs", pairs_checkpoint), ("frontal", frontal_checkpoint)) if v})
    results: dict = {"models": models, "data": data, "rows": []}
    for kind, folder in (("pairs", Path(data) / "pairs"), ("frontal", Path(data) / "frontal")):
        for step, (preparation, intensity) in STEPS.items():
            target = work_dir / "runs" / kind / step
            summary = pipeline(models[kind], str(target), inputs=str(folder), preparation=preparation,
                               intensity=intensity, sampling_steps=2 if kind == "frontal" else None,
                               overwrite=True)  # fmt: skip
            for case in summary["cases_detail"]:
                row = {"kind": kind, "case": case["case"], "step": step, "status": case["status"]}
                if case["status"] == "written":
                    row.update(_row(json.loads((target / case["folder"] / "report.json").read_text())))
                else:
                    row["error"] = case["error"]
                results["rows"].append(row)
    results["minutes"] = round((time.perf_counter() - start) / 60, 2)
    results["means"] = {}
    for step in STEPS:
        rows = [r for r in results["rows"] if r["step"] == step and r["status"] == "written"]
        keys = ("domain_gap", "gap_warnings", "plausibility_warnings", "agreement_ct", "agreement_mean_ct",
                "drr_psnr_prepared")  # fmt: skip
        results["means"][step] = {k: float(np.nanmean([np.nan if r[k] is None else r[k] for r in rows]))
                                  for k in keys}  # fmt: skip
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(results, indent=2))
    print(table(results))
    return {"out": out, "minutes": results["minutes"]}


def table(results: dict) -> str:
    head = (f"{'kind':7} {'case':44} {'step':15} {'gap':>6} {'gapW':>4} {'plW':>3} {'lungL':>6} {'CTR':>5} "
            f"{'rho CT':>7} {'rho mean':>8} {'PSNR':>5}  scale source (PA)")  # fmt: skip
    lines = [head, "-" * len(head)]

    def f(v, spec):
        return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)

    for r in results["rows"]:
        if r["status"] != "written":
            lines.append(f"{r['kind']:7} {r['case'][:44]:44} {r['step']:15} failed: {r.get('error')}")
            continue
        lines.append(
            f"{r['kind']:7} {r['case'][:44]:44} {r['step']:15} {f(r['domain_gap'], '6.2f')} {r['gap_warnings']:4d} "
            f"{r['plausibility_warnings']:3d} {f(r['lung_volume_l'], '6.2f')} {f(r['cardiothoracic_ratio'], '5.2f')} "
            f"{f(r['agreement_ct'], '7.3f')} {f(r['agreement_mean_ct'], '8.3f')} {f(r['drr_psnr_prepared'], '5.1f')}  "
            f"{r['scale_source']['pa'][:60]}"
        )  # fmt: skip
    lines.append("")
    for step, m in results["means"].items():
        lines.append(f"mean {step:15} gap {m['domain_gap']:.2f}  gap warnings {m['gap_warnings']:.1f}  plausibility "
                     f"warnings {m['plausibility_warnings']:.1f}  rho CT {m['agreement_ct']:.3f}  rho mean CT "
                     f"{m['agreement_mean_ct']:.3f}  PSNR {m['drr_psnr_prepared']:.1f}")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    fire.Fire(main)
