"""MedicalNet (Tencent Med3D) initialisation of the PE classifier's 3D ResNet from a local ``.pth``.

No real weights here: files in MedicalNet's layout (``{"state_dict": {"module.conv1.weight", ...}}`` plus its
segmentation head ``module.conv_seg.*``, key names as in Tencent/MedicalNet ``models/resnet.py``) are written
from randomly initialised networks of each depth, then loaded; wrong depth, a foreign or truncated file
fail with the file name and the problem.
"""

from __future__ import annotations

import logging

import pytest
import torch

from bundles.pe_classifier.scripts import networks
from common.errors import InputError


def medicalnet_file(path, arch: str, seed: int = 0, width: float = 1.0, drop_bn_counters: bool = True):
    """A MedicalNet-style checkpoint of ``arch``: DataParallel ``module.`` keys, conv_seg head, no fc."""
    torch.manual_seed(seed)
    net, n_features = networks.build_encoder(arch, 3, 1, width)
    state = {}
    for key, value in net.state_dict().items():
        if drop_bn_counters and key.endswith("num_batches_tracked"):
            continue  # MedicalNet was trained with PyTorch 0.4, whose BN had no counter
        if key.endswith("running_var"):
            value = 0.5 + torch.rand_like(value)
        elif value.is_floating_point():
            value = value + 0.1 * torch.randn_like(value)
        state["module." + key] = value
    state["module.conv_seg.0.weight"] = torch.randn(n_features, 32, 2, 2, 2)
    state["module.conv_seg.1.weight"] = torch.ones(32)
    torch.save({"ecpoch": 200, "batch_id": 10, "state_dict": state}, path)
    return {k.removeprefix("module."): v for k, v in state.items()}


@pytest.mark.parametrize(
    "arch,keys",
    [
        ("resnet10", ["layer1.0.conv1.weight", "layer2.0.downsample.0.weight", "layer4.0.bn2.running_var"]),
        ("resnet18", ["layer1.1.conv2.weight", "layer4.1.bn2.weight"]),  # shortcut A: no downsample weights
        ("resnet34", ["layer3.5.conv2.weight"]),
        ("resnet50", ["layer1.0.conv3.weight", "layer4.2.bn3.bias", "layer1.0.downsample.1.running_mean"]),
    ],
)
def test_medicalnet_weights_load_and_run(tmp_path, caplog, arch, keys):
    width = 1.0 if arch == "resnet10" else 0.25  # full width once; narrower for the deep ones (CPU time)
    path = tmp_path / f"{arch}.pth"
    state = medicalnet_file(path, arch, width=width)
    for key in keys:
        assert key in state
    if arch == "resnet18":
        assert not any("downsample" in k for k in state)
    with caplog.at_level(logging.INFO, logger=networks.logger.name):
        net = networks.build_pe_classifier("ct", ct_arch=arch, ct_width=width, ct_pretrained=str(path)).eval()
    for key in keys + ["conv1.weight", "bn1.running_mean"]:
        torch.testing.assert_close(net.encoder.state_dict()[key], state[key])
    assert "loaded" in caplog.text and "conv_seg" in caplog.text  # the report names what was ignored
    report = networks.load_medicalnet_weights(networks.build_encoder(arch, 3, 1, width)[0], str(path), arch)
    assert report["missing"] == [] and report["ignored"] == ["conv_seg.0.weight", "conv_seg.1.weight"]
    assert len(report["loaded"]) == len(state) - 2
    with torch.no_grad():
        logit = net(torch.rand(1, 1, 32, 32, 32))
    assert logit.shape == (1, 1) and torch.isfinite(logit).all()


def test_wrong_depth_foreign_and_truncated_files_are_refused(tmp_path):
    r50 = tmp_path / "resnet_50.pth"
    medicalnet_file(r50, "resnet50", width=0.25)
    with pytest.raises(
        InputError,
        match=r"resnet_50.pth: checkpoint is ResNet-50 but the encoder is resnet10: set ct_arch to resnet50",
    ):
        networks.build_encoder("resnet10", 3, 1, 0.25, pretrained_path=str(r50))
    r10 = tmp_path / "resnet_10.pth"
    medicalnet_file(r10, "resnet10", width=0.25)
    with pytest.raises(InputError, match="resnet_10.pth: conv1 is .* width 1.0"):
        networks.build_encoder("resnet10", 3, 1, 0.5, pretrained_path=str(r10))
    foreign = tmp_path / "densenet.pth"  # another architecture's state dict
    torch.save({"state_dict": networks.build_encoder("densenet121", 3, 1, 0.125)[0].state_dict()}, foreign)
    with pytest.raises(InputError, match="densenet.pth: not a MedicalNet ResNet checkpoint"):
        networks.build_encoder("resnet10", 3, 1, 1.0, pretrained_path=str(foreign))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(r10.read_bytes()[:2000])
    with pytest.raises(InputError, match="truncated.pth: not a readable PyTorch weights file"):
        networks.build_encoder("resnet10", 3, 1, 0.25, pretrained_path=str(truncated))
    with pytest.raises(InputError, match="not found"):
        networks.build_encoder("resnet10", 3, 1, 0.25, pretrained_path=str(tmp_path / "none.pth"))
