"""Main-job demo: train a CPU-size VQ-GAN briefly on the real example CT, rebuild it whole by sliding window.

    python -m bundles.vqgan_3d_patch.scripts.demo --output_dir outputs/demo/vqgan_3d_patch [--dataset_dir D]

With ``--dataset_dir`` (a data_prep dataset) its CTs are used; otherwise the example chest CT
(``data_prep.example_ct``, 512x512x133 at 0.70x0.70x2.5 mm) is reoriented to RAS and averaged 4x in-plane
(128x128x133, 2.8x2.8x2.5 mm) so a few minutes of CPU training show something. The same CT is
reconstructed (a VQ-GAN is a compressor: reconstructing its training volume is the point of the demo),
through the bundle's own configs (train.json + cpu_tiny.json + evaluate.json) so the demo exercises them.
Writes models/, metrics_report.json, the NIfTI reconstruction and PNG/GIF previews under ``output_dir``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import fire
import numpy as np
import torch

from common.atomic import atomic_write_text
from common.io import load_volume, save_volume
from common.volume import Volume

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def downsampled_example_ct(target: Path, factor: int = 4) -> str:
    """The example CT in RAS, ``factor``x average-pooled in-plane (affine scaled to match)."""
    from data_prep.example_ct import fetch_example_ct

    vol = load_volume(fetch_example_ct()["ct"]).to_canonical()
    arr = torch.from_numpy(np.ascontiguousarray(vol.array, dtype=np.float32))[None, None]
    pooled = torch.nn.functional.avg_pool3d(arr, (factor, factor, 1))[0, 0].numpy()
    affine = vol.affine.copy()
    affine[:3, :2] *= factor
    affine[:3, 3] += vol.affine[:3, :2].sum(axis=1) * (factor - 1) / 2.0  # keep voxel centres in place
    return save_volume(Volume(pooled, affine), target)


def demo_datalist(output_dir: Path, dataset_dir: str | None) -> Path:
    """A datalist whose training, validation and test splits are the demo CT(s)."""
    if dataset_dir:
        from monai.data import load_decathlon_datalist

        items = load_decathlon_datalist(
            os.path.join(dataset_dir, "dataset.json"), True, "training", dataset_dir
        )
        items = [{"id": Path(i["ct"]).parent.name, "ct": i["ct"]} for i in items]
    else:
        ct = downsampled_example_ct(output_dir / "data" / "example" / "ct.nii.gz")
        items = [{"id": "example", "ct": ct}]
    path = output_dir / "data" / "dataset.json"
    atomic_write_text(path, json.dumps({"training": items, "validation": items, "test": items}, indent=2))
    return path.parent


def main(
    output_dir: str = "outputs/demo/vqgan_3d_patch",
    dataset_dir: str | None = None,
    max_epochs: int = 150,
    patch: tuple[int, int, int] = (64, 64, 32),
    patches_per_volume: int = 8,
    val_interval: int = 50,
    overlap: float = 0.75,
) -> dict:
    """Train (cpu_tiny overlay, bigger patches), evaluate on whole volumes; returns the metrics.

    ``overlap`` 0.75: a model trained for two minutes is still weak at window borders, so the bundle's 25 %
    default shows seams every window; more overlap hides them (a trained model does not need it).
    """
    from monai.bundle import run

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    out = Path(output_dir).resolve()
    data = demo_datalist(out, dataset_dir)
    common = dict(dataset_dir=str(data), bundle_root=str(out), output_dir=str(out / "eval"))
    sizes = dict(patch_size=list(patch), patches_per_volume=patches_per_volume, batch_size=1, max_epochs=max_epochs,
                 val_interval=val_interval, save_interval=val_interval, val_overlap=overlap, adversarial_start=max_epochs // 2)  # fmt: skip
    t0 = time.time()
    train = [str(CONFIGS / "train.json"), str(CONFIGS / "cpu_tiny.json")]
    run("training", config_file=train, **common, **sizes)
    t_train = time.time() - t0
    evaluate = [str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json"), str(CONFIGS / "cpu_tiny.json")]
    run("evaluating", config_file=evaluate, **common, **sizes)
    report = json.loads((out / "eval" / "metrics_report.json").read_text())
    metrics = report["metrics"]
    print(f"[vqgan_3d_patch] trained {max_epochs} epochs in {t_train:.0f} s; whole-volume reconstruction: "
          f"PSNR {metrics['psnr_xray2ct']:.2f} dB (xray2ct), SSIM {metrics['ssim_xray2ct']:.3f}, "
          f"MAE {metrics['mae_hu']:.1f} HU, codebook usage {metrics['codebook_usage']:.2f}, "
          f"perplexity {metrics['perplexity']:.1f}")  # fmt: skip
    base = report["baseline"]["metrics"]
    label = "a smoke test: the case was trained on" if report["smoke_test"] else "unseen cases"
    print(f"[vqgan_3d_patch] baseline {report['baseline']['name']} (same cases): PSNR {base['psnr_xray2ct']:.2f} dB, "
          f"MAE {base['mae_hu']:.1f} HU; {label}")  # fmt: skip
    print(f"[vqgan_3d_patch] outputs: {out / 'eval'}")
    return metrics


if __name__ == "__main__":
    fire.Fire(main)
