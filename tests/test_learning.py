"""Issue 12: what makes the models learn at CPU size (mean-CT prior, noise schedule, stage init), and the
regression test that a tiny model beats the mean-CT baseline on unseen phantoms (benchmarks/learning.py
measures all models)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from numerics import network_atol

from bundles.perx2ct.scripts.networks import PerX2CTNet
from common.baselines import mean_training_ct, mean_training_ct_of_datalist, with_mean_prior
from common.checkpoint import CheckpointRecord, build_from_checkpoint, build_network
from common.intensity import XRAY2CT

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
PERX2CT = "bundles.perx2ct.scripts.networks.PerX2CTNet"
TINY = dict(
    volume_size=32, spacing=(12.0,) * 3, image_size=32, geometry="x2ctgan", feature_res=8,
    encoder_block="basic", encoder_layers=(1, 1), encoder_inplanes=(8, 16), latent_dim=16, pe_multires=4,
    decoder_channels=(8, 16, 16), decoder_res_blocks=1, norm_num_groups=8, attention=False,
)  # fmt: skip


def _configs(bundle: str, *names: str) -> list[str]:
    return [str(BUNDLES / bundle / "configs" / name) for name in names]


# ------------------------------------------------------------------------------------- perx2ct mean prior
def test_perx2ct_mean_prior_is_the_untrained_output_on_every_path_and_travels_in_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    net = build_network(PERX2CT, **TINY, mean_prior=True).eval()
    prior = torch.rand(32, 32, 32)
    net.set_mean_prior(prior)
    xrays = torch.rand(2, 2, 32, 32)
    with torch.no_grad():
        fused = net(xrays)  # eval: the decoder's first convolution applied before sampling (project_features)
        direct = net.reconstruct(xrays, fused=False)
        slices = net(xrays, torch.tensor([[3, 30], [7, 8]]), axis=1)
    for volume in (fused, direct):  # the output convolution starts at zero: exactly the prior
        torch.testing.assert_close(volume, prior.expand(2, 1, 32, 32, 32), rtol=0, atol=0)
    torch.testing.assert_close(slices[1, 0], prior[:, 7, :], rtol=0, atol=0)
    with torch.no_grad():  # once trained (non-zero output conv) both paths still agree and keep the prior
        net.decoder.blocks[-1].conv.weight.normal_(0, 0.1)
        fused_out = net(xrays)  # float32 reorderings of one network (tests/numerics.py)
        torch.testing.assert_close(
            fused_out, net.reconstruct(xrays, fused=False), rtol=0, atol=network_atol(net, fused_out, torch.float32)
        )
    path = tmp_path / "model.pt"
    record = CheckpointRecord("perx2ct", network=net)
    torch.save({"model": net.state_dict(), "record": record.state_dict()}, path)
    loaded, rec = build_from_checkpoint(path, expected_bundle="perx2ct")  # the record alone rebuilds it
    assert rec["network_def"]["mean_prior"] is True
    torch.testing.assert_close(loaded.prior, prior)
    with torch.no_grad():
        torch.testing.assert_close(loaded(xrays), net(xrays))
    with pytest.raises(ValueError, match="mean_prior"):
        PerX2CTNet(**TINY).load_state_dict(net.state_dict())
    with pytest.raises(ValueError, match="mean_prior"):
        PerX2CTNet(**TINY).set_mean_prior(prior)


def test_with_mean_prior_reads_the_training_split_through_the_datalist(phantom_pairs):
    meta = json.loads(phantom_pairs["datalist"].read_text())
    expected = mean_training_ct([phantom_pairs["root"] / item["ct"] for item in meta["training"]])
    np.testing.assert_allclose(mean_training_ct_of_datalist(phantom_pairs["datalist"]), expected)
    assert mean_training_ct_of_datalist(phantom_pairs["root"] / "absent.json") is None
    net = with_mean_prior(PerX2CTNet(**{**TINY, "spacing": (10.0,) * 3}, mean_prior=True), phantom_pairs["datalist"])
    np.testing.assert_allclose(net.prior.numpy(), XRAY2CT.to_unit(expected), atol=1e-6)
    plain = PerX2CTNet(**{**TINY, "spacing": (10.0,) * 3})
    assert with_mean_prior(plain, phantom_pairs["datalist"]) is plain  # no prior asked for: unchanged


def test_perx2ct_train_config_starts_at_the_mean_ct_with_cpu_small(phantom_pairs, tmp_path):
    """train.json + cpu_small.json build a network whose untrained output is the baseline of its report."""
    parser = ConfigParser()
    parser.read_config(_configs("perx2ct", "train.json", "cpu_small.json"))
    parser.update({"dataset_dir": str(phantom_pairs["root"]), "bundle_root": str(tmp_path), "image_size": 32})
    net = parser.get_parsed_content("network").eval()
    expected = XRAY2CT.to_unit(mean_training_ct_of_datalist(phantom_pairs["datalist"]))
    with torch.no_grad():
        out = net(torch.rand(1, 2, 32, 32))[0, 0].numpy()
    np.testing.assert_allclose(out, expected, atol=1e-5)


# ------------------------------------------------------------------------------------- cascade stage init
def test_untrained_cascade_is_white_without_prior_and_the_mean_ct_with_it(phantom_pairs):
    """The cause of the demo's white stage previews: an untrained stage 1 outputs sigmoid(0) = 0.5 = +512 HU
    everywhere, and stages 2-3 start as its upsampled copy. With the mean-CT prior every stage starts at
    the mean training CT (the baseline), i.e. shows anatomy before any training."""
    from bundles.progressive_cascade.scripts.data import read_dataset_info

    info = read_dataset_info(str(phantom_pairs["datalist"]))
    tiny = dict(
        target="bundles.progressive_cascade.scripts.networks.ProgressiveCascade", geometry=info["geometry"],
        fov_mm=list(info["fov_mm"]), volume_sizes=(8, 16, 32), xray_size=32, feature_sizes=(8, 16, 32),
        encoder_channels=(8, 8, 8), head_channels=4, refiner_channels=((8, 16), (8, 16), (4, 8)),
    )  # fmt: skip
    xrays = torch.rand(1, 2, 32, 32)
    torch.manual_seed(0)
    plain = build_network(**tiny).eval()
    with torch.no_grad():
        hu = [XRAY2CT.from_unit(out) for out in plain.forward_all(xrays)]
    for stage in hu:  # around +512 HU: above the lung window's white point (+150 HU) nearly everywhere
        assert float((stage > 150).float().mean()) > 0.75 and float((stage < -900).float().mean()) < 0.01
    torch.manual_seed(0)
    net = with_mean_prior(build_network(**tiny, mean_prior=True), phantom_pairs["datalist"]).eval()
    mean_ct = torch.from_numpy(XRAY2CT.to_unit(mean_training_ct_of_datalist(phantom_pairs["datalist"])))
    with torch.no_grad():
        outputs = net.forward_all(xrays)
    expected = torch.nn.functional.interpolate(mean_ct[None, None], size=(8,) * 3, mode="area")  # stage 1's grid
    for out in outputs:  # each later stage starts as the trilinear upsampling of the one before
        if out.shape != expected.shape:
            expected = torch.nn.functional.interpolate(expected, size=out.shape[2:], mode="trilinear")
        assert float((out - expected).abs().max()) < 2e-3  # the baseline (clamped to [1e-3, 1 - 1e-3])
        assert float(XRAY2CT.from_unit(out).std()) > 300  # air, lungs and body: anatomy, not a flat volume
    assert "stages.0.prior_logit" in net.state_dict()  # saved with the checkpoint (stages 2-3 and evaluation load it)


# ------------------------------------------------------------------------------------- latent_ddpm schedule
@pytest.mark.parametrize(
    "names, key",
    [
        (("train.json",), "scheduler"),
        (("train.json", "cpu_tiny.json"), "scheduler"),
        (("train.json", "evaluate.json", "cpu_tiny.json"), "sampling_scheduler"),
        (("train.json", "cpu_small.json"), "scheduler"),
        (("inference.json",), "sampling_scheduler"),
        (("inference.json", "cpu_tiny.json"), "sampling_scheduler"),
    ],
)
def test_every_latent_noise_chain_ends_in_noise(names, key):
    """Sampling starts from pure noise, so training's last step must be (nearly) pure noise too: the cpu_tiny
    chain of 100 steps with LDM's unscaled 1000-step betas ended at alpha_bar 0.41 (64 % signal)."""
    from bundles.latent_ddpm.scripts.inference import make_scheduler

    parser = ConfigParser()
    parser.read_config(_configs("latent_ddpm", *names))
    scheduler = parser.get_parsed_content(key)
    assert float(scheduler.alphas_cumprod[-1]) < 1e-3, (names, scheduler.num_train_timesteps)
    assert float(make_scheduler("ddpm", scheduler.num_train_timesteps, None).alphas_cumprod[-1]) < 1e-3


# ------------------------------------------------------------------------------------- VQ-GAN encoder collapse
def _vqgan_latents(ckpt: Path, cases: list[dict]) -> torch.Tensor:
    """Encoder outputs (B, D, X', Y', Z') of the cases' CTs (xray2ct unit intensities) by a trained VQ-GAN."""
    from common.io import load_volume

    parser = ConfigParser()
    parser.read_config(_configs("vqgan_3d_patch", "train.json", "cpu_small.json"))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(ckpt, weights_only=True, map_location="cpu")["model"])
    net.eval()
    vols = [load_volume(c["ct"]).to_canonical().array for c in cases]
    x = torch.from_numpy(np.stack([XRAY2CT.to_unit(np.asarray(v, np.float32)) for v in vols]))[:, None]
    with torch.no_grad():
        return net.encode(x.float())


def test_vqgan_cpu_small_encoder_does_not_collapse(phantom_pairs, tmp_path):
    """The cpu_small VQ-GAN's encoder keeps telling cases apart after training (its latents vary).

    At lr_g 0.002 (the earlier recipe) the ReLU encoder died on the 24-phantom demo set within ~60 steps: its
    output was one constant vector (std exactly 0 over cases and space), one code was used, and the decoder
    learned one fixed volume that only looked like learning (it beat box x4 by being a mean CT). The collapse is
    stochastic: on this 4-case fixture 0.002 did not collapse in 80 or 160 steps, so this test guards the
    property, not that run; the demo's summary prints the codebook usage of the real run.
    """
    from monai.bundle import run

    root = phantom_pairs["root"]
    over = dict(dataset_dir=str(root), bundle_root=str(tmp_path), output_dir=str(tmp_path / "eval"),
                max_epochs=80, val_interval=1000, save_interval=1000)  # fmt: skip
    run("training", config_file=_configs("vqgan_3d_patch", "train.json", "cpu_small.json"), **over)
    meta = json.loads(Path(phantom_pairs["datalist"]).read_text())
    cases = [{"ct": str(root / e["ct"])} for e in meta["training"] + meta["test"]]
    z = _vqgan_latents(tmp_path / "models" / "checkpoint_final.pt", cases)
    assert float(z.std(0).mean()) > 1e-3 and float(z.std((2, 3, 4)).mean()) > 1e-3


# ------------------------------------------------------------------------------------- regression: beats the mean CT
ONE_STAGE = {  # the cpu_small cascade cut to its first stage (8^3): the cheapest X-ray -> CT model that learns
    "volume_sizes": [8], "feature_sizes": [16], "gradient_checkpointing": [False], "stage_epochs": [40],
    "network_def#refiner_channels": [[16, 32]], "network_def#stage": 1, "stage": 1, "val_interval": 40,
    "save_interval": 40,
}  # fmt: skip
MIN_MARGIN_DB = 1.0  # measured on the 8 test phantoms of dataset seeds 0 / 1 / 2: +6.8 / +4.4 / +5.3 dB


def cascade_stage1_margin(root: Path, work: Path) -> dict:
    """Train the one-stage cpu_small cascade on ``root``'s training split, score its test split; the report."""
    from monai.bundle import run

    files = _configs("progressive_cascade", "train.json", "cpu_small.json")
    over = dict(dataset_dir=str(root), bundle_root=str(work), output_dir=str(work / "eval"), **ONE_STAGE)
    run("training", config_file=files, **over)
    files = _configs("progressive_cascade", "train.json", "evaluate.json", "cpu_small.json")
    run("evaluating", config_file=files, checkpoint=str(work / "models" / "stage1_model.pt"), preview_cases=0,
        **over)  # fmt: skip
    return json.loads((work / "eval" / "metrics_report.json").read_text())


@pytest.mark.slow
def test_tiny_xray_to_ct_model_beats_the_mean_ct_on_unseen_phantoms(tmp_path):
    """The regression test of issue 12: a tiny X-ray -> CT model (the cascade's first stage, 8^3 from PA +
    lateral DRRs, mean-CT prior) beats the mean training CT by >= 1 dB PSNR on test phantoms it never saw.

    32 phantoms (16 training / 8 validation / 8 test, per patient), 40 epochs (160 steps). Margins measured for
    dataset seeds 0 / 1 / 2: +6.8 / +4.4 / +5.3 dB (model 38.4 / 36.7 / 37.6 dB vs mean CT 31.5 / 32.3 / 32.3 dB,
    PSNR xray2ct at 8^3), so the 1 dB threshold holds with room.
    """
    from data_prep.phantom import make_phantom_dataset

    root = tmp_path / "data"
    make_phantom_dataset(root, n_cases=32, size=32, spacing=12.0, geometry="perx2ct", drr_pixels=64, seed=0)
    report = cascade_stage1_margin(root, tmp_path / "bundle")
    assert report["split"] == "test" and not report["smoke_test"] and report["n_cases"] >= 6
    assert report["baseline"]["name"] == "mean_training_ct"
    assert report["difference"]["psnr_xray2ct"] >= MIN_MARGIN_DB, report["difference"]


# ------------------------------------------------------------------------------------- pix2pix residual, PE data, demo
def test_residual_phase_generator_starts_at_the_copy_baseline_and_learns():
    """``residual``: the untrained generator returns its input (the copy-input baseline) and still trains."""
    from bundles.pix2pix_phase.scripts.networks import PhaseGenerator

    torch.manual_seed(0)
    net = PhaseGenerator(32, base_channels=8, residual=True)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    assert torch.equal(net(x), x)
    loss = (net(x) - x.flip(-1)).abs().mean()
    loss.backward()
    assert sum(float(p.grad.abs().sum()) for p in net.parameters() if p.grad is not None) > 0
    assert not torch.equal(PhaseGenerator(32, base_channels=8)(x), x)  # the pix2pix default: tanh(UNet(x))


def test_pe_dataset_pairs_each_patient_with_and_without_emboli_in_one_split(tmp_path):
    from data_prep.phantom import make_pe_dataset

    meta = json.loads(Path(make_pe_dataset(tmp_path, n_patients=(2, 1, 1), size=16, drr_pixels=16)).read_text())
    patients = {s: {e["patient"] for e in meta[s]} for s in ("training", "validation", "test")}
    assert [len(meta[s]) for s in ("training", "validation", "test")] == [4, 2, 2]
    assert not (patients["training"] & patients["test"]) and not (patients["validation"] & patients["test"])
    for entry in meta["training"] + meta["test"]:
        label = json.loads((tmp_path / entry["id"] / "label.json").read_text())
        assert label["pe"] == entry["label"] == int(entry["id"].endswith("pe1"))
        assert (tmp_path / entry["pa"]).is_file() and (tmp_path / entry["ct"]).is_file()


def test_demo_runs_every_bundle_with_a_cpu_small_recipe():
    """bin/demo.py covers the six bundles, each once in a lane, each with its cpu_small overlay."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo", BUNDLES.parent / "bin" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert set(demo.STEPS) == {p.name for p in BUNDLES.iterdir() if (p / "configs" / "train.json").is_file()}
    lanes = [n for lane in demo.LANES for n in lane]
    assert sorted(lanes) == sorted(demo.STEPS)
    assert [n for n in demo.LANES[0] if n in ("vqgan_3d_patch", "latent_ddpm")] == ["vqgan_3d_patch", "latent_ddpm"]
    for name in demo.STEPS:
        assert (BUNDLES / name / "configs" / "cpu_small.json").is_file(), name
    row = {"bundle": "perx2ct", "status": "ok", "metric": "psnr_xray2ct", "split": "test", "n_cases": 12,
           "model": 25.0, "baseline": 23.0, "difference": 2.0, "baseline_name": "mean_training_ct",
           "seconds": 60.0, "smoke_test": False}  # fmt: skip
    assert "test" in demo.format_row(row) and "+2.000" in demo.format_row(row)
    assert "SMOKE TEST" in demo.format_row({**row, "smoke_test": True})
