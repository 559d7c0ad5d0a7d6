"""pix2pix_phase as a MONAI bundle: configs parse, train/evaluate/infer run on the tiny overlay, geometry
survives inference, checkpoints carry a reproducible record, TorchScript export and verify_net_in_out pass."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ckpt_export, run, verify_net_in_out

from common.checkpoint import read_record
from common.io import load_volume, save_volume
from common.metrics import compute_ct_metrics
from common.volume import Volume

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "bundles", "pix2pix_phase", "configs")


def m_psnr(report: dict) -> float:
    return report["metrics"]["psnr_xray2ct"]


def cfg(*names: str) -> list[str]:
    return [os.path.join(CONFIGS, n) for n in names]


META = cfg("metadata.json")[0]
LOGGING = cfg("logging.conf")[0]
TINY = "cpu_tiny.json"


@pytest.fixture(scope="module")
def trained(phantom_4dct, tmp_path_factory):
    """Train the tiny bundle once (2 epochs on the phantom 4D CT) into a temporary bundle root."""
    root = tmp_path_factory.mktemp("p2p_bundle")
    bundle_root, output_dir = root / "bundle", root / "train_out"
    run(
        "training",
        config_file=cfg("train.json", TINY),
        meta_file=META,
        logging_file=LOGGING,
        dataset_dir=str(phantom_4dct["root"]),
        bundle_root=str(bundle_root),
        output_dir=str(output_dir),
    )
    return dict(root=root, bundle_root=bundle_root, output_dir=output_dir, data=phantom_4dct)


@pytest.mark.parametrize(
    "files",
    [
        ("train.json",),
        ("train.json", TINY),
        ("train.json", "evaluate.json"),
        ("inference.json", TINY),
        ("train.json", "multi_gpu_train.json"),
    ],
)
def test_configs_parse(files, tmp_path):
    parser = ConfigParser()
    parser.read_config(cfg(*files))
    parser.read_meta(META)
    for ids in ("imports", "network_def", "run", "initialize"):
        assert ids in parser, f"{files}: missing {ids}"
    parser["bundle_root"] = str(tmp_path)
    net = parser.get_parsed_content("network_def")
    assert net.n_down == (4 if TINY in files else 7)
    if "evaluate.json" in files:
        assert "evaluating" in parser and parser["run"] == "@evaluating"
    elif "train.json" in files:
        assert "training" in parser and parser["run"] == "@training"
    if "multi_gpu_train.json" in files:
        assert parser["train#dataloader#sampler"].replace("::", "#") == "@train#sampler"
        assert parser["network"]["_target_"].endswith("DistributedDataParallel")
        assert any("init_process_group" in s for s in parser["initialize"]) and "finalize" in parser


def test_training_writes_checkpoints_with_reproducible_record(trained):
    models = trained["bundle_root"] / "models"
    assert {"model.pt", "model_final.pt", "checkpoint_record.json", "network_args.json"} <= set(os.listdir(models))
    record = read_record(models / "model.pt")
    assert record["bundle"] == "pix2pix_phase" and record["network_def"]["image_size"] == 32
    assert record["training"]["lambda_l1"] == 100.0 and record["progress"]["key_metric"]["name"] == "psnr_xray2ct"
    ct = record["inputs"]["ct"]
    assert ct["hu_window"] == {"name": "xray2ct", "hu_min": -1024.0, "hu_max": 2048.0}
    np.testing.assert_allclose(ct["voxel_spacing"], trained["data"]["spacing"])
    assert ct["slice_thickness"] == pytest.approx(trained["data"]["spacing"][2])
    assert list(ct["cases"].values())[0]["shape"] == list(trained["data"]["size"])
    # the overrides rebuild the same generator from the default (GPU-size) config
    parser = ConfigParser()
    parser.read_config(cfg("train.json"))
    parser.update(json.loads((models / "network_args.json").read_text()))
    net = parser.get_parsed_content("network_def")
    state = torch.load(models / "model.pt", map_location="cpu", weights_only=True)["model"]
    net.load_state_dict(state, strict=True)
    runs = trained["output_dir"] / "runs"
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(runs))


def test_resume_continues_from_the_saved_epoch(trained, tmp_path):
    """checkpoint_epoch=2.pt carries trainer, optimizers and schedulers: resuming to 3 epochs runs only epoch 3."""
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    ckpt = trained["bundle_root"] / "models" / "checkpoint_epoch=2.pt"
    workflow = ConfigWorkflow(
        config_file=cfg("train.json", TINY),
        meta_file=META,
        logging_file=LOGGING,
        run_id="training",
        workflow_type="train",
        dataset_dir=str(trained["data"]["root"]),
        bundle_root=str(tmp_path / "bundle"),
        output_dir=str(tmp_path / "out"),
        max_epochs=3,
        resume_from=str(ckpt),
    )
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    epochs = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs.append(e.state.epoch))
    workflow.run()
    workflow.finalize()
    assert epochs == [3]
    assert workflow.parser.get_parsed_content("g_lr_scheduler").last_epoch == 3
    assert (tmp_path / "bundle" / "models" / "checkpoint_epoch=3.pt").exists()


def test_evaluate_writes_metrics_report(trained, tmp_path):
    run(
        "evaluating",
        config_file=cfg("train.json", "evaluate.json", TINY),
        meta_file=META,
        logging_file=LOGGING,
        dataset_dir=str(trained["data"]["root"]),
        bundle_root=str(trained["bundle_root"]),
        output_dir=str(tmp_path),
    )
    report = json.loads((tmp_path / "metrics_report.json").read_text())
    assert set(report["conventions"]) >= {"xray2ct", "x2ctgan", "mae_hu"}
    test_ids = [i["id"] for i in json.loads(trained["data"]["datalist"].read_text())["test"]]
    assert report["split"] == "test" and report["case_ids"] == test_ids and len(report["cases"]) == 1
    assert report["baseline"]["name"] == "copy_input" and not report["smoke_test"]
    # the baseline is the input average CT scored against the phase-0 CT, by hand
    item = next(c for c in trained["data"]["cases"] if c["id"] == test_ids[0])
    by_hand = compute_ct_metrics(load_volume(item["avg"]).array, load_volume(item["phase0"]).array)
    assert report["baseline"]["metrics"]["psnr_xray2ct"] == pytest.approx(by_hand["psnr_xray2ct"], abs=1e-3)
    assert report["difference"]["psnr_xray2ct"] == pytest.approx(m_psnr(report) - by_hand["psnr_xray2ct"], abs=1e-3)
    m = report["metrics"]
    assert 0 < m["psnr_xray2ct"] < 60 and 0 <= m["mae_hu"] <= 3072
    # per-volume and ignite (engine) values agree: same volumes, same conventions
    assert m["psnr_xray2ct"] == pytest.approx(report["engine_metrics"]["psnr_xray2ct"], rel=1e-4)
    assert m["mae_hu"] == pytest.approx(report["engine_metrics"]["mae_hu"], rel=1e-4)


def test_inference_keeps_the_input_affine(trained, tmp_path):
    src = trained["data"]["avg"][0]
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    ras = load_volume(src)
    save_volume(ras, in_dir / "ras_case.nii.gz")
    # the same scan stored L-P-S with an oblique-free but flipped affine: output must keep it
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = ras.shape[0] - 1, ras.shape[1] - 1
    lps = Volume(ras.array[::-1, ::-1].copy(), ras.affine @ flip)
    save_volume(lps, in_dir / "lps_case.nii.gz")
    run(
        "inference",
        config_file=cfg("inference.json", TINY),
        meta_file=META,
        logging_file=LOGGING,
        dataset_dir=str(in_dir),
        bundle_root=str(trained["bundle_root"]),
        output_dir=str(out_dir),
    )
    outs = {}
    for name in ("ras_case", "lps_case"):
        inp = nib.load(in_dir / f"{name}.nii.gz")
        out = nib.load(out_dir / f"{name}_ct.nii.gz")
        assert "".join(nib.aff2axcodes(inp.affine)) == ("LPS" if name == "lps_case" else "RAS")
        np.testing.assert_allclose(out.affine, inp.affine, atol=1e-5)
        assert out.shape == inp.shape and out.get_data_dtype() == np.float32
        assert (out_dir / f"{name}_preview.png").stat().st_size > 0
        assert (out_dir / f"{name}_axial.gif").stat().st_size > 0
        outs[name] = np.asarray(out.dataobj)
    # same anatomy, same world positions: the LPS result is the RAS result flipped back
    np.testing.assert_allclose(outs["lps_case"][::-1, ::-1], outs["ras_case"], atol=1.0)
    assert -1024.0 <= outs["ras_case"].min() and outs["ras_case"].max() <= 2048.0


def test_torchscript_export_and_verify_net_in_out(trained, tmp_path):
    ckpt = trained["bundle_root"] / "models" / "model.pt"
    ts = tmp_path / "generator.ts"
    ckpt_export(
        "network_def",
        filepath=str(ts),
        ckpt_file=str(ckpt),
        meta_file=META,
        config_file=cfg("train.json", TINY),
        key_in_ckpt="model",
    )
    scripted = torch.jit.load(str(ts))
    parser = ConfigParser()
    parser.read_config(cfg("train.json", TINY))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["model"])
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    torch.testing.assert_close(scripted(x), net.eval()(x))
    verify_net_in_out("network_def", meta_file=META, config_file=cfg("train.json", TINY), n=1)


def test_multi_gpu_overlay_trains_with_gloo_world_of_one(phantom_4dct, tmp_path, monkeypatch, free_port):
    """The DDP overlay on CPU: gloo backend, one process, DistributedSampler and DDP-wrapped networks."""
    for k, v in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port),
        "RANK": "0",
        "WORLD_SIZE": "1",
    }.items():
        monkeypatch.setenv(k, v)
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=cfg("train.json", TINY, "multi_gpu_train.json"),
        meta_file=META,
        logging_file=LOGGING,
        run_id="training",
        workflow_type="train",
        dataset_dir=str(phantom_4dct["root"]),
        bundle_root=str(tmp_path / "bundle"),
        output_dir=str(tmp_path / "out"),
        max_epochs=1,
    )
    workflow.initialize()
    assert torch.distributed.get_backend() == "gloo"
    workflow.run()
    parser = workflow.parser
    assert isinstance(parser.get_parsed_content("network"), torch.nn.parallel.DistributedDataParallel)
    assert isinstance(parser.get_parsed_content("train#sampler"), torch.utils.data.DistributedSampler)
    workflow.finalize()
    assert not torch.distributed.is_initialized()  # finalize destroyed the process group
    # ignite caches the native (distributed) context it detected during the run; put back the serial one so
    # later in-process tests in this pytest worker do not query the destroyed process group.
    from ignite.distributed import utils as idist_utils
    from ignite.distributed.comp_models import _SerialModel

    idist_utils._set_model(_SerialModel())
    # ignite's Checkpoint unwraps DDP: the saved generator loads into the bare network
    state = torch.load(
        tmp_path / "bundle" / "models" / "model_final.pt", map_location="cpu", weights_only=True
    )
    parser.get_parsed_content("network_def").load_state_dict(state["model"], strict=True)
