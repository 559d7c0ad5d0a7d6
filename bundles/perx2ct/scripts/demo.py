"""CPU demo: build PA/lateral DRR pairs from the real example chest CT, train PerX2CT briefly, reconstruct.

    python -m bundles.perx2ct.scripts.demo --work_dir outputs/perx2ct_demo [--steps 200] [--size 64]

There is one real CT, so this is a memorisation demo (train = validation = test case): it shows the
whole pipeline (data_prep -> monai.bundle training/evaluation/inference -> metrics and previews), not
generalisation. It also runs the model on the real PA + lateral radiographs of ../shared/data/cxr/pairs
(when present); a model trained on DRRs of one CT is not expected to give a faithful CT from them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from monai.bundle import run

from common.atomic import atomic_write_text

BUNDLE = Path(__file__).resolve().parents[1]
CONFIGS = BUNDLE / "configs"


def _overrides(size: int, steps: int) -> dict:
    return {
        "volume_size": size,
        "image_size": size,
        "network_def#feature_res": size // 4,
        "max_epochs": steps,  # one case: an epoch is one iteration
        "val_interval": max(1, steps // 4),
        "save_interval": max(1, steps // 4),
        "slices_per_sample": 8,
        "learning_rate": 0.002,
    }


def demo(
    work_dir: str = "outputs/perx2ct_demo",
    steps: int = 200,
    size: int = 64,
    spacing: float = 6.0,
    shared_data: str | None = None,
) -> dict:
    """Run the demo; returns the metrics and the files written."""
    from data_prep.build_pairs import build_pairs
    from data_prep.example_ct import fetch_example_ct

    work = Path(work_dir).resolve()
    data, bundle_root, out = work / "data", work / "bundle", work / "outputs"
    ct = fetch_example_ct()["ct"]
    build_pairs([ct], str(data), size=size, spacing=spacing, geometry="perx2ct", drr_pixels=size)
    meta = json.loads((data / "dataset.json").read_text())
    case = next(e for key in ("training", "validation", "test") for e in meta.get(key, []))
    meta.update(training=[case], validation=[case], test=[case])  # one CT: memorisation demo
    atomic_write_text(data / "dataset.json", json.dumps(meta, indent=2))

    configs = [str(CONFIGS / "train.json"), str(CONFIGS / "cpu_tiny.json")]
    common = dict(
        dataset_dir=str(data), bundle_root=str(bundle_root), output_dir=str(out), **_overrides(size, steps)
    )
    run("training", config_file=configs, **common)
    run("evaluating", config_file=[configs[0], str(CONFIGS / "evaluate.json"), configs[1]], **common)
    inf = {**common, "output_dir": str(out / "inference")}
    run("inference", config_file=[str(CONFIGS / "inference.json"), configs[1]], **inf)

    written = sorted(str(p) for p in (out / "inference").glob("*"))
    pairs = Path(shared_data) if shared_data else BUNDLE.parents[2] / "shared" / "data" / "cxr" / "pairs"
    if pairs.is_dir():
        from bundles.perx2ct.scripts.inference import PerX2CTInference
        from common.predictor import write_prediction

        api = PerX2CTInference.from_bundle(
            str(BUNDLE), str(bundle_root / "models" / "model.pt"), [str(CONFIGS / "inference.json"), configs[1]],
            **{"network_def#feature_res": size // 4, "volume_size": size, "image_size": size},
        )  # fmt: skip
        for pa in sorted(pairs.glob("*-PA.*")):
            lateral = next(iter(sorted(pairs.glob(pa.name.split("-PA.")[0] + "-L.*"))), None)
            if lateral is None:
                continue
            prediction = api.infer({"pa": str(pa), "lateral": str(lateral)})  # the one inference path and writer
            files = write_prediction(prediction, out / "real_xrays", pa.name.split("-PA.")[0])
            written += [files["ct"], files["preview"], files["gif"]]  # <case>_ct.nii.gz, _preview.png, _axial.gif
    report = json.loads((out / "metrics_report.json").read_text())
    summary = {
        "metrics": report["metrics"],
        "files": written,
        "metrics_report": str(out / "metrics_report.json"),
    }
    atomic_write_text(work / "demo_summary.json", json.dumps(summary, indent=2))
    print(json.dumps(report["metrics"], indent=2))
    return {"metrics_report": summary["metrics_report"], "n_files": len(written)}


if __name__ == "__main__":
    import fire

    os.environ.setdefault("OMP_NUM_THREADS", "2")
    fire.Fire(demo)
