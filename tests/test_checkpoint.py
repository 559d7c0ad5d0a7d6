"""common.checkpoint: self-describing records, the one loader, and savers that never keep a worse file."""

from __future__ import annotations

import json

import pytest
import torch
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import ValidationHandler

from common.checkpoint import (
    CheckpointLoader,
    CheckpointRecord,
    CheckpointSaver,
    allow_network,
    build_from_checkpoint,
    build_network,
    load_weights,
    network_description,
    network_differences,
    read_checkpoint,
    read_record,
    unwrap,
)
from common.errors import InputError

# classes of these tests, off the bundles' allow-list: registered by code, as a plug-in would
for _name in ("monai.networks.nets.unet.UNet", "monai.networks.nets.segresnet.SegResNet", "torch.nn.modules.conv.Conv2d"):
    allow_network(_name)
UNET = dict(spatial_dims=2, in_channels=1, out_channels=1, channels=(4, 8), strides=(2,), num_res_units=0)


def _unet(**kw):
    torch.manual_seed(0)
    return build_network("UNet", **{**UNET, **kw})


def test_build_network_records_its_definition():
    net = _unet()
    description = network_description(net)
    assert description["_target_"] == "monai.networks.nets.unet.UNet" and description["channels"] == [4, 8]
    wrapped = torch.nn.DataParallel(net)
    assert unwrap(wrapped) is net and network_description(wrapped) == description
    assert network_differences(description, {"_target_": "UNet", **UNET}) == []
    assert network_differences(description, {**description, "act": "PRELU"}) == []  # PRELU is UNet's default
    diff = network_differences(description, {**description, "channels": [4, 16]})
    assert diff == ["channels=[4, 8] (checkpoint) vs [4, 16] (config)"]
    assert "network class" in network_differences(description, {"_target_": "SegResNet"})[0]
    assert torch.jit.script(net)  # the record lives beside the module: TorchScript never sees it


def test_record_rebuilds_the_network_and_refuses_a_contradicting_config(tmp_path):
    net = _unet()
    (tmp_path / "dataset.json").write_text("{}")
    record = CheckpointRecord("demo", network=net, inputs={"hu_window": "xray2ct", "size": (32, 32)},
                              datalist=tmp_path / "dataset.json", version="1.2.3")  # fmt: skip
    path = tmp_path / "model.pt"
    torch.save({"model": net.state_dict(), "record": record.state_dict()}, path)
    rebuilt, saved = build_from_checkpoint(path, expected_bundle="demo")
    assert saved["version"] == "1.2.3" and saved["inputs"]["hu_window"]["hu_max"] == 2048.0
    assert saved["inputs"]["size"] == [32, 32] and len(saved["datalist"]["sha256"]) == 64
    x = torch.rand(1, 1, 16, 16)
    torch.testing.assert_close(rebuilt(x), net.eval()(x))
    with pytest.raises(InputError, match="is a 'demo' checkpoint, not 'perx2ct'"):
        build_from_checkpoint(path, expected_bundle="perx2ct")
    with pytest.raises(InputError, match=r"contradicts the checkpoint's record: channels=\[4, 8\]"):
        load_weights(_unet(channels=(4, 16)), path)
    assert load_weights(_unet(), path)["bundle"] == "demo"
    written = record.write(tmp_path / "models")
    assert json.loads(open(written).read())["network_def"]["channels"] == [4, 8]
    assert json.loads((tmp_path / "models" / "network_args.json").read_text())["network_def#channels"] == [4, 8]


def test_old_checkpoints_load_through_the_config_with_a_warning(tmp_path):
    net = _unet()
    path = tmp_path / "bare.pt"
    torch.save(net.state_dict(), path)  # ignite's one-entry layout: the bare state dict
    assert set(read_checkpoint(path)) == {"model"}
    with pytest.warns(UserWarning, match="no record"):
        assert load_weights(_unet(), path) is None
    with pytest.raises(InputError, match="no record of its network"):
        build_from_checkpoint(path)
    with pytest.warns(UserWarning, match="no record"):
        built, record = build_from_checkpoint(path, network_def={"_target_": "UNet", **UNET})
    assert record is None and isinstance(built, torch.nn.Module)


def test_truncated_checkpoint_is_an_input_error_naming_the_file(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"model": _unet().state_dict()}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(InputError, match=r"model.pt: cannot read the checkpoint .*truncated"):
        read_checkpoint(path)


# ----------------------------------------------------------------------------------------------- savers
def _trainer(tmp_path, epochs: int, data, loss=None, val_data=None, resume: str | None = None):
    """A tiny trainer with the bundles' saver layout: final on the trainer, best on the evaluator.

    The network is a 1x1 convolution set to the identity and never updated (lr 0), so the validation MAE is
    the value of the validation images.
    """
    net = build_network("torch.nn.modules.conv.Conv2d", in_channels=1, out_channels=1, kernel_size=1)
    with torch.no_grad():
        net.weight.fill_(1.0)
        net.bias.zero_()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # lr 0: every epoch scores the same, as a plateau
    (tmp_path / "dataset.json").write_text('{"training": []}')
    record = CheckpointRecord("demo", network=net, datalist=tmp_path / "dataset.json")
    trainer = SupervisedTrainer(
        "cpu", epochs, data, net, opt, loss or torch.nn.L1Loss(), prepare_batch=lambda b, d, n, **k: (b["image"], b["label"])
    )
    evaluator = None
    if val_data is not None:
        from monai.handlers import MeanAbsoluteError, from_engine

        evaluator = SupervisedEvaluator(
            "cpu", val_data, net, prepare_batch=lambda b, d, n, **k: (b["image"], b["label"]),
            key_val_metric={"val_mae": MeanAbsoluteError(output_transform=from_engine(["pred", "label"]))},
            val_handlers=[CheckpointSaver(str(tmp_path), {"model": net, "record": record}, save_key_metric=True,
                                          key_metric_filename="model.pt", key_metric_negative_sign=True)],
        )  # fmt: skip
        ValidationHandler(1, evaluator).attach(trainer)
    if resume:
        CheckpointLoader(resume, {"model": net, "optimizer": opt, "trainer": trainer}).attach(trainer)
    CheckpointSaver(str(tmp_path), {"model": net, "optimizer": opt, "trainer": trainer, "record": record},
                    save_final=True, final_filename="model_final.pt").attach(trainer)  # fmt: skip
    return trainer, net, evaluator


def _data(n=2, value=0.5):
    return [{"image": torch.full((1, 1, 8, 8), value), "label": torch.zeros(1, 1, 8, 8)} for _ in range(n)]


def test_exception_writes_no_final_checkpoint(tmp_path):
    trainer, _, _ = _trainer(tmp_path, 2, _data())
    trainer.run()
    final = tmp_path / "model_final.pt"
    before = final.read_bytes()
    assert read_record(final)["progress"]["iteration"] == 4

    def fail(*_):
        raise RuntimeError("boom")

    broken, _, _ = _trainer(tmp_path, 2, _data(), loss=fail)
    with pytest.raises(RuntimeError, match="boom"):
        broken.run()
    assert final.read_bytes() == before  # MONAI's saver would have written the untrained weights here


def test_failed_resume_keeps_the_final_checkpoint(tmp_path):
    trainer, _, _ = _trainer(tmp_path, 2, _data())
    trainer.run()
    final = tmp_path / "model_final.pt"
    before = final.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(before[: len(before) // 2])
    resumed, _, _ = _trainer(tmp_path, 3, _data(), resume=str(truncated))
    with pytest.raises(InputError, match="truncated.pt: cannot read the checkpoint"):
        resumed.run()
    assert final.read_bytes() == before


def test_shorter_comparable_run_writes_its_final_beside_the_longer_one(tmp_path):
    _trainer(tmp_path, 3, _data())[0].run()
    final = tmp_path / "model_final.pt"
    before = final.read_bytes()
    _trainer(tmp_path, 1, _data())[0].run()  # same network, same data, fewer iterations
    assert final.read_bytes() == before
    beside = tmp_path / "model_final.iteration=2.pt"
    assert read_record(beside)["progress"]["iteration"] == 2
    _trainer(tmp_path, 4, _data())[0].run()  # longer: replaces it
    assert read_record(final)["progress"]["iteration"] == 8


def test_best_checkpoint_is_only_replaced_by_a_better_score(tmp_path):
    trainer, _, _ = _trainer(tmp_path, 2, _data(), val_data=_data(1, value=0.25))
    trainer.run()
    best = tmp_path / "model.pt"
    metric = read_record(best)["progress"]["key_metric"]
    assert metric["name"] == "val_mae" and metric["value"] == pytest.approx(0.25)
    before = best.read_bytes()
    # a new run of the same network on the same data whose validation is worse keeps the better file
    worse, _, _ = _trainer(tmp_path, 1, _data(), val_data=_data(1, value=0.9))
    worse.run()
    assert best.read_bytes() == before
    better, _, _ = _trainer(tmp_path, 1, _data(), val_data=_data(1, value=0.0))
    better.run()
    assert read_record(best)["progress"]["key_metric"]["value"] == pytest.approx(0.0)
