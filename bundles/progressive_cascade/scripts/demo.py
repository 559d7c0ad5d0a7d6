"""Demo: train the tiny cascade briefly (stages 1 -> 2 -> 3) and write metrics and previews.

    python -m bundles.progressive_cascade.scripts.demo --output_dir outputs/demo/progressive_cascade \
        [--dataset_dir <data_prep dataset>] [--epochs 3]

Without ``--dataset_dir`` a phantom dataset (32^3, 32x32 DRRs) is written under the output folder.
With a dataset of another size the tiny overlay's last stage / X-ray size follow the dataset's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import fire
import torch
from monai.bundle import run

from bundles.progressive_cascade.scripts.data import read_dataset_info

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _files(*names: str) -> list[str]:
    return [str(CONFIGS / "train.json"), *(str(CONFIGS / n) for n in names), str(CONFIGS / "cpu_tiny.json")]


def main(
    output_dir: str = "outputs/demo/progressive_cascade", dataset_dir: str | None = None, epochs: int = 3
) -> str:
    """Train all three stages for ``epochs`` each on CPU, evaluate every stage, return the report path."""
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    out = Path(output_dir).resolve()
    if dataset_dir is None:
        from data_prep.phantom import make_phantom_dataset

        dataset_dir = os.path.dirname(
            make_phantom_dataset(out / "phantom_dataset", n_cases=8, size=32, drr_pixels=32)
        )
    info = read_dataset_info(os.path.join(dataset_dir, "dataset.json"))
    size = min(info["size"])
    sizes = [max(4, size // 4), max(8, size // 2), size]
    xray = min(64, 2 ** (int(info["geometry"].detector_pixels[0]).bit_length() - 1))
    shape = {"volume_sizes": sizes, "xray_size": xray, "feature_sizes": [xray // 4, xray // 2, xray]}
    with open(os.path.join(dataset_dir, "dataset.json")) as f:
        has_val = bool(json.load(f).get("validation"))
    split = {} if has_val else {"validate#datalist": "$@train#datalist"}  # one-case datasets: validate on it
    common = dict(dataset_dir=dataset_dir, bundle_root=str(out), output_dir=str(out), device="cpu", **shape)
    for stage in (1, 2, 3):
        run("training", config_file=_files(), stage=stage, max_epochs=epochs, **split, **common)
    has_test = bool(json.load(open(os.path.join(dataset_dir, "dataset.json"))).get("test"))
    run(
        "evaluating",
        config_file=_files("evaluate.json"),
        eval_split="test" if has_test else ("validation" if has_val else "training"),
        **{**common, "output_dir": str(out / "eval")},
    )
    report = out / "eval" / "metrics_report.json"
    print(f"[progressive_cascade] metrics: {report}; previews: {out / 'eval' / 'previews'}")
    return str(report)


if __name__ == "__main__":
    fire.Fire(main)
