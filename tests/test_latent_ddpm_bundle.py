"""latent_ddpm bundle: every config parses; training, evaluation and inference run on the tiny overlay."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import check_anatomy_report
from monai.bundle import ConfigParser, run

from common.checkpoint import read_record
from common.io import load_volume

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "latent_ddpm"
CONFIGS = BUNDLE / "configs"


def _files(*names: str) -> list[str]:
    return [str(CONFIGS / n) for n in names]


@pytest.mark.parametrize(
    "names, section",
    [
        (("train.json",), "training"),
        (("train.json",), "run"),
        (("train.json", "evaluate.json"), "evaluating"),
        (("inference.json",), "inference"),
        (("train.json", "multi_gpu_train.json"), "training"),
        (("train.json", "cpu_tiny.json"), "network_def"),
    ],
)
def test_configs_parse(names, section):
    parser = ConfigParser()
    parser.read_config(_files(*names))
    assert parser.get(section) is not None
    assert parser.get("network_def")["target"].endswith("XrayConditionedUNet")


def test_metadata_and_license():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["context"]["value_range"] == [0, 1]
    assert "Apache License" in (BUNDLE / "LICENSE").read_text()


def test_network_def_builds_at_cpu_tiny_size():
    parser = ConfigParser()
    parser.read_config(_files("train.json", "cpu_tiny.json"))
    net = parser.get_parsed_content("network_def").eval()  # latent channels = the tiny VQ-GAN's embedding_dim
    out = net(torch.zeros(1, 8, 4, 4, 4), torch.tensor([5]), context=torch.rand(1, 1, 32, 32))
    assert out.shape == (1, 8, 4, 4, 4)


@pytest.mark.slow
def test_train_evaluate_infer_through_monai_bundle(phantom_pairs, tmp_path):
    from bundles.latent_ddpm.scripts.demo import random_vqgan

    vqgan_ckpt = random_vqgan(str(tmp_path / "vqgan.pt"))
    common = dict(
        dataset_dir=str(phantom_pairs["root"]),
        bundle_root=str(BUNDLE),
        output_dir=str(tmp_path / "out"),
        ckpt_dir=str(tmp_path / "models"),
        vqgan_checkpoint=str(vqgan_ckpt),
        logging_file=str(CONFIGS / "logging.conf"),
        meta_file=str(CONFIGS / "metadata.json"),
        max_epochs=2,
        sampling_steps=2,
    )
    run("training", config_file=_files("train.json", "cpu_tiny.json"), **common)
    assert (tmp_path / "models" / "model.pt").is_file()
    manifest = json.loads((tmp_path / "out" / "latent_cache" / "latents.json").read_text())
    assert manifest["latent_shape"] == [8, 4, 4, 4] and manifest["scale_factor"] > 0

    assert manifest["vqgan"]["sha256"] and manifest["vqgan"]["record"]["bundle"] == "vqgan_3d_patch"
    record = read_record(tmp_path / "models" / "model.pt")
    assert record["inputs"]["latent_shape"] == [8, 4, 4, 4] and record["inputs"]["vqgan"]["sha256"] == manifest["vqgan"]["sha256"]

    run("evaluating", config_file=_files("train.json", "evaluate.json", "cpu_tiny.json"), **common)
    report = json.loads((tmp_path / "out" / "metrics_report.json").read_text())
    for key in ("psnr_xray2ct", "ssim_xray2ct", "mae_hu", "drr_l1_pa", "drr_psnr_pa"):
        assert key in report["metrics"] and key in report["baseline"]["metrics"]
    assert 0.0 <= report["metrics"]["drr_l1_pa"] <= 1.0 and report["metrics"]["mae_hu"] > 0
    test_ids = [i["id"] for i in manifest["test"]]
    assert report["n_cases"] == 2 and report["split"] == "test" and sorted(report["case_ids"]) == sorted(test_ids)
    assert report["baseline"]["name"] == "mean_training_ct" and not report["smoke_test"]
    assert "drr_consistency" in report["conventions"]
    check_anatomy_report(report)  # anatomy metrics, both baselines, intervals

    run("inference", config_file=_files("inference.json", "cpu_tiny.json"), **common)  # inference.json alone
    predictions = sorted((tmp_path / "out" / "predictions").glob("*_ct.nii.gz"))
    assert len(predictions) == 2
    vol = load_volume(predictions[0])
    assert vol.shape == (32, 32, 32) and vol.spacing == pytest.approx((10.0, 10.0, 10.0))
    assert vol.array.min() >= -1024.5 and vol.array.max() <= 2048.5
    assert len(list((tmp_path / "out" / "predictions").glob("*_preview.png"))) == 2


@pytest.mark.slow
def test_changed_vqgan_reencodes_the_cache_or_stops(phantom_pairs, tmp_path):
    """A latent cache encoded by another VQ-GAN checkpoint is re-encoded (training) or refused, never decoded."""
    from bundles.latent_ddpm.scripts.demo import random_vqgan
    from bundles.latent_ddpm.scripts.extract_latents import check_latent_cache, extract_latents
    from common.errors import InputError
    from common.sliding_window import LatentSlidingWindowInferer

    first, second = random_vqgan(str(tmp_path / "a.pt"), seed=0), random_vqgan(str(tmp_path / "b.pt"), seed=1)
    windows = LatentSlidingWindowInferer([32, 32, 32])
    cache = tmp_path / "cache"
    manifest = extract_latents(str(phantom_pairs["root"]), first, str(cache), inferer=windows)
    item = json.loads(Path(manifest).read_text())["training"][0]
    before = (cache / item["latent"]).read_bytes()
    check_latent_cache(manifest, first)
    with pytest.raises(InputError, match="sha256"):
        check_latent_cache(manifest, second)
    with pytest.raises(InputError, match="stale"):
        extract_latents(str(phantom_pairs["root"]), second, str(cache), inferer=windows, on_stale="error")
    manifest = extract_latents(str(phantom_pairs["root"]), second, str(cache), inferer=windows)
    assert (cache / item["latent"]).read_bytes() != before  # re-encoded by the new codec
    check_latent_cache(manifest, second)
