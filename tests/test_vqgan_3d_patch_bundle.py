"""The vqgan_3d_patch bundle end to end on phantom CTs: configs parse, train/evaluate/infer/export/DDP run."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, run
from numerics import network_atol

from bundles.vqgan_3d_patch.scripts.networks import count_parameters
from common.checkpoint import build_from_checkpoint, read_record

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "vqgan_3d_patch"
CONFIGS = BUNDLE / "configs"
TRAIN, EVALUATE, INFERENCE = (
    str(CONFIGS / "train.json"),
    str(CONFIGS / "evaluate.json"),
    str(CONFIGS / "inference.json"),
)
MULTI_GPU, TINY = str(CONFIGS / "multi_gpu_train.json"), str(CONFIGS / "cpu_tiny.json")


def parser_for(*files: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(list(files))
    parser.update(overrides)
    parser.parse()
    return parser


def test_every_config_parses_with_full_size_defaults():
    train = parser_for(TRAIN)
    assert train["patch_size"] == [256, 256, 128] and train["val_overlap"] == 0.25
    assert train["blend_mode"] == "gaussian" and train["training"] and train["run"] == "@training"
    net = train.get_parsed_content("network_def")
    assert net.num_embeddings == 512 and net.embedding_dim == 64
    assert 35e6 < count_parameters(net) < 37e6  # the seed's baseline: ~36M parameters
    evaluate = parser_for(TRAIN, EVALUATE)
    assert evaluate["eval_split"] == "test" and evaluate["run"] == "@evaluating"
    inference = parser_for(INFERENCE)
    assert inference["roi_size"] == "@patch_size" and "network_def" in inference.config
    multi = parser_for(TRAIN, MULTI_GPU)
    assert multi["train#sampler"]["_target_"] == "DistributedSampler" and "finalize" in multi.config
    assert multi["network"]["_target_"] == "torch.nn.parallel.DistributedDataParallel"
    tiny = parser_for(TRAIN, TINY)
    assert tiny["patch_size"] == [32, 32, 32]


def _scalar_tags(run_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in glob.glob(str(run_dir / "events.out.tfevents.*")):
        acc = EventAccumulator(events)
        acc.Reload()
        tags |= set(acc.Tags()["scalars"]) | {f"image:{t}" for t in acc.Tags()["images"]}
    return tags


@pytest.mark.slow
def test_train_evaluate_infer_export_resume(phantom_pairs, tmp_path):
    root = str(phantom_pairs["root"])
    bundle_root, out = tmp_path / "bundle", tmp_path / "out"
    common = dict(dataset_dir=root, bundle_root=str(bundle_root), output_dir=str(out))
    run("training", config_file=[TRAIN, TINY], **common)
    models = bundle_root / "models"
    assert (models / "model.pt").exists() and (models / "checkpoint_final.pt").exists()
    best = torch.load(models / "model.pt", weights_only=True)
    assert set(best) == {"model", "record"} and "quantizer.quantizer.embedding.weight" in best["model"]
    record = read_record(models / "model.pt")
    assert record["bundle"] == "vqgan_3d_patch" and record["network_def"]["embedding_dim"] == 8
    assert record["inputs"]["latent_factor"] == 8 and record["progress"]["key_metric"]["name"] == "val_psnr"
    assert (models / "checkpoint_record.json").is_file() and (models / "network_args.json").is_file()
    tags = _scalar_tags(out / "runs")
    for tag in (
        "recon_loss",
        "quantization_loss",
        "g_adv_loss",
        "d_loss",
        "perplexity",
        "val_psnr",
        "val_ssim",
    ):
        assert tag in tags, (tag, tags)
    assert {"codebook_usage", "train_codebook_usage", "val_mae_hu"} <= tags
    assert any(t.startswith("image:") for t in tags)  # previews

    # resume: one more epoch from the final checkpoint continues at epoch 3
    run(
        "training",
        config_file=[TRAIN, TINY],
        resume_from=str(models / "checkpoint_final.pt"),
        max_epochs=3,
        **common,
    )
    state = torch.load(models / "checkpoint_final.pt", weights_only=False)
    assert state["trainer"]["max_epochs"] == 3
    assert state["trainer"]["iteration"] == 3 * state["trainer"]["epoch_length"]  # 2 epochs restored + 1 run

    run("evaluating", config_file=[TRAIN, EVALUATE, TINY], **common)
    report = json.loads((out / "metrics_report.json").read_text())
    for key in ("psnr_xray2ct", "ssim_xray2ct", "mae_hu", "psnr_x2ctgan", "codebook_usage", "perplexity"):
        assert key in report["metrics"]
    assert 0 < report["metrics"]["codebook_usage"] <= 1 and report["metrics"]["perplexity"] >= 1
    test_ids = [Path(i["id"]).name for i in json.loads(Path(phantom_pairs["datalist"]).read_text())["test"]]
    assert report["split"] == "test" and sorted(report["case_ids"]) == sorted(test_ids) and report["n_cases"] == 2
    assert report["baseline"]["name"] == "box_down_up" and not report["smoke_test"]
    assert "psnr_xray2ct" in report["baseline"]["metrics"] and "psnr_xray2ct" in report["difference"]
    ci = report["difference_ci"]["psnr_xray2ct"]  # the paired bootstrap interval of model - box
    assert ci["n_cases"] == 2 and ci["low"] <= ci["estimate"] <= ci["high"]
    assert report["latent_factor"] == 8
    assert "xray2ct" in report["conventions"] and "codebook_usage" in report["conventions"]
    assert len(glob.glob(str(out / "reconstructions" / "*_ct.nii.gz"))) == 2

    infer_out = tmp_path / "infer"
    run(
        "run",
        config_file=[INFERENCE, TINY],
        dataset_dir=root,
        bundle_root=str(bundle_root),
        output_dir=str(infer_out),
    )
    written = sorted(glob.glob(str(infer_out / "*_ct.nii.gz")))
    assert len(written) == 2 and glob.glob(str(infer_out / "*_preview.png"))
    test_items = json.loads(Path(phantom_pairs["datalist"]).read_text())["test"]
    source = nib.load(
        os.path.join(root, test_items[0]["ct"])
        if not os.path.isabs(test_items[0]["ct"])
        else test_items[0]["ct"]
    )
    recon = nib.load([w for w in written if Path(w).name.startswith(test_items[0]["id"])][0])
    assert recon.shape == source.shape
    np.testing.assert_allclose(recon.affine, source.affine, atol=1e-4)  # phantoms are canonical RAS already
    assert -1024 - 1e-3 <= float(recon.get_fdata().min()) and float(recon.get_fdata().max()) <= 2048 + 1e-3

    # export: TorchScript (traced) of the reconstruction path, same output as the eager network
    ts = tmp_path / "model.ts"
    export = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts),
              "--ckpt_file", str(models / "model.pt"), "--meta_file", str(CONFIGS / "metadata.json"),
              "--config_file", f"['{INFERENCE}','{TINY}']", "--key_in_ckpt", "model", "--use_trace", "True",
              "--input_shape", "[1,1,32,32,32]"]  # fmt: skip
    subprocess.run(export, check=True, capture_output=True, cwd=tmp_path)
    verify = [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def", "--meta_file",
              str(CONFIGS / "metadata.json"), "--config_file", f"['{INFERENCE}','{TINY}']"]  # fmt: skip
    subprocess.run(verify, check=True, capture_output=True, cwd=tmp_path)
    scripted = torch.jit.load(str(ts))
    eager, _ = build_from_checkpoint(models / "model.pt", "vqgan_3d_patch", parser_for(INFERENCE, TINY).get_parsed_content("network_def"))
    x = torch.rand(1, 1, 40, 32, 24)
    with torch.no_grad():
        want = eager(x)  # TorchScript may fuse and reorder float32 sums (tests/numerics.py)
        torch.testing.assert_close(scripted(x), want, rtol=0, atol=network_atol(eager, want, torch.float32))


@pytest.mark.slow
def test_ddp_training_with_gloo_on_two_processes(phantom_pairs, tmp_path):
    # --standalone: torchrun's agent binds port 0 and its workers share that store. A port picked before the launch
    # (free_port) can be taken by another test in between (CI failed once on EADDRINUSE).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "monai.bundle", "run", "training", "--config_file", f"['{TRAIN}','{MULTI_GPU}','{TINY}']",
           "--dataset_dir", str(phantom_pairs["root"]), "--bundle_root", str(tmp_path / "b"),
           "--output_dir", str(tmp_path / "out"), "--max_epochs", "2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "b" / "models" / "model.pt", weights_only=True)["model"]
    assert ckpt and not any(k.startswith("module.") for k in ckpt)  # saved unwrapped from DDP
    assert "d_loss" in proc.stdout + proc.stderr  # the adversarial step ran under DDP
