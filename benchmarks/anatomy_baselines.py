"""How much stronger is the X-ray extent baseline than the mean training CT? (issue 21, item 1)

    python benchmarks/anatomy_baselines.py [--datalist PATH] [--split test] [--n_cases 40] [--size 64]
        [--spacing 5] [--drr_pixels 128] [--geometry perx2ct] [--work outputs/benchmarks/anatomy_work]
        [--out outputs/benchmarks/anatomy_baselines.json]

No model is trained: on the unseen cases of ``split`` the extent-scaled mean CT
(:class:`common.baselines.ExtentScaledMeanCT`) is scored as the "model" beside the mean training CT
(:class:`common.baselines.MeanTrainingCT`) with the bundles' own per-case metrics (:class:`common.metrics.CTMetrics`,
:class:`common.anatomy.AnatomyMetrics`) and report (:func:`common.handlers.build_report`: paired bootstrap
95 % intervals). Without ``--datalist`` it writes ``n_cases`` phantoms (``data_prep.phantom``, no emboli) at
``size``^3 / ``spacing`` mm with ``drr_pixels``^2 DRRs, split 50 / 20 / 30 %. Any datalist made by
``xray2ct-build-pairs`` or the cohort tool works (label maps under ``label`` are used where present).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import fire
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.anatomy import AnatomyMetrics  # noqa: E402
from common.baselines import ExtentScaledMeanCT, MeanTrainingCT  # noqa: E402
from common.datalist import case_id, datalist_field, load_split  # noqa: E402
from common.handlers import MetricsReport, build_report, write_json  # noqa: E402
from common.intensity import XRAY2CT  # noqa: E402
from common.io import load_volume  # noqa: E402
from common.metrics import CTMetrics  # noqa: E402
from common.xray import load_view  # noqa: E402

KEYS = ("psnr_xray2ct", "ssim_xray2ct", "body_dice", "lung_dice", "lung_volume_error_ml", "heart_dice")


def compare_baselines(
    datalist: str | None = None,
    split: str = "test",
    n_cases: int = 40,
    size: int = 64,
    spacing: float = 5.0,
    drr_pixels: int = 128,
    geometry: str = "perx2ct",
    work: str = "outputs/benchmarks/anatomy_work",
    out: str = "outputs/benchmarks/anatomy_baselines.json",
) -> dict:
    """Score both baselines on ``split``; print the table, write the report JSON to ``out``; returns it."""
    t0 = time.time()
    if datalist is None:
        from data_prep.phantom import make_phantom_dataset

        datalist = make_phantom_dataset(
            REPO / work / f"phantoms_{size}", n_cases, size, spacing, geometry, drr_pixels,
            emboli_fraction=0.0, val_fraction=0.2, test_fraction=0.3,
        )  # fmt: skip
    train, cases = load_split(datalist, "training"), load_split(datalist, split)
    geometry = datalist_field(datalist, "geometry", geometry)
    extent = ExtentScaledMeanCT(geometry, train)
    report = MetricsReport(
        "unused.json", "anatomy_baselines", split, [CTMetrics(), AnatomyMetrics(spacing=extent.spacing)],
        MeanTrainingCT(train), progress=False,
        training_sources=[str(i["source"]) for i in train if i.get("source")],
    )  # fmt: skip
    scored, transforms = [], {}
    for index, item in enumerate(cases):
        label = XRAY2CT.to_unit(torch.from_numpy(np.asarray(load_volume(item["ct"]).to_canonical().array)))[None]
        image = torch.from_numpy(np.stack([load_view(item[v], drr_pixels) for v in ("pa", "lateral")]))
        pred = extent(label, {"image": image})
        transforms[case_id(item, index)] = extent.last_transform
        scored.append(report.score_case({"pred": pred, "label": label, "image": image}, item, index))
    result = build_report(
        "anatomy_baselines", split, scored, baseline={"name": "mean_training_ct", "description": MeanTrainingCT.description},
        conventions=report.conventions, training_cases=[str(i.get("id")) for i in train],
        extra={"model_is": "extent_scaled_mean_ct (no trained model)", "datalist": str(datalist),
               "transforms": transforms, "wall_s": time.time() - t0},
        training_sources=report.training_sources,
    )  # fmt: skip
    out_path = REPO / out if not Path(out).is_absolute() else Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(out_path, result)
    print(f"{len(scored)} unseen cases of {datalist} ({split}); extent-scaled mean CT vs mean training CT")
    print(f"{'metric':<24}{'extent':>10}{'mean CT':>10}   {'extent - mean [95% CI]':<30}")
    for key in KEYS:
        if key not in result["model"]:
            continue
        ci = result["difference_ci"].get(key, {})
        bounds = "n/a" if ci.get("low") is None else f"{ci['estimate']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}]"
        print(f"{key:<24}{result['model'][key]:>10.3f}{result['baseline']['metrics'][key]:>10.3f}   {bounds}")
    scales = np.asarray([t["scale"] for t in transforms.values()])
    print(f"scale per axis (X, Y, Z) over the cases: min {scales.min(0).round(3)}, max {scales.max(0).round(3)}")
    print(f"same_source: {result['same_source']}; {time.time() - t0:.0f} s; JSON: {out_path}")
    return result


def main(**kwargs) -> None:
    """Command line: :func:`compare_baselines` (its arguments), printing the table only."""
    compare_baselines(**kwargs)


if __name__ == "__main__":
    fire.Fire(compare_baselines if "--help" in sys.argv else main)
