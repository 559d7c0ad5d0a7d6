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


def test_a_resnet_101_file_names_values_ct_arch_accepts(tmp_path):
    """MedicalNet also released ResNet-101/152/200; ct_arch does not take them, so the fix is not 'resnet101'."""
    state = {"conv1.weight": torch.zeros(1, 1, 1, 1, 1)}
    for layer, blocks in enumerate((3, 4, 23, 3), start=1):
        for i in range(blocks):
            state[f"layer{layer}.{i}.conv3.weight"] = torch.zeros(1)
    path = tmp_path / "resnet_101.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)
    with pytest.raises(InputError) as err:
        networks.build_encoder("resnet50", 3, 1, 0.25, pretrained_path=str(path))
    message = str(err.value)
    assert "resnet_101.pth" in message and "ResNet-101" in message
    assert "set ct_arch to resnet101" not in message and "resnet10, resnet18, resnet34, resnet50" in message


def test_medicalnet_normalisation_is_their_formula():
    """Tencent/MedicalNet datasets/brains18.py __itensity_normalize_one_volume__, by hand on 6 voxels."""
    from bundles.pe_classifier.scripts.data import medicalnet_normalize

    volume = torch.tensor([0.0, 2.0, 4.0, -3.0, 6.0, 0.0])
    noise = torch.tensor([0.5, 9.0, 9.0, 9.0, 9.0, -1.5])
    # voxels > 0: 2, 4, 6 -> mean 4, population std sqrt(8/3); the negative voxel is scaled but not counted
    std = (8.0 / 3.0) ** 0.5
    expected = torch.tensor([0.5, -2.0 / std, 0.0, -7.0 / std, 2.0 / std, -1.5])
    torch.testing.assert_close(medicalnet_normalize(volume, noise), expected, rtol=0, atol=1e-6)
    with pytest.raises(InputError, match="at least two voxels > 0"):
        medicalnet_normalize(torch.tensor([0.0, -1.0, 5.0]), torch.zeros(3))


def test_ct_normalisation_follows_the_weights(caplog):
    from monai.transforms import Identityd, ScaleIntensityRanged

    from bundles.pe_classifier.scripts import data

    assert data.resolve_ct_normalization("auto", None) == "hu_window"
    assert data.resolve_ct_normalization("auto", "resnet_10_23dataset.pth") == "medicalnet"
    assert data.resolve_ct_normalization("hu_window", "resnet_10_23dataset.pth") == "hu_window"
    with pytest.raises(ValueError, match="ct_normalization"):
        data.resolve_ct_normalization("zscore")
    assert isinstance(data.ct_window_transform("ct", "xray2ct", "auto", None), ScaleIntensityRanged)
    assert isinstance(data.ct_window_transform("ct", "xray2ct", "auto", "w.pth"), Identityd)
    with caplog.at_level(logging.INFO, logger=data.__name__):
        zscore = data.ct_zscore_transform("ct", "auto", "w.pth")
    assert "MedicalNet weights are loaded" in caplog.text
    assert isinstance(data.ct_zscore_transform("ct", "auto", None), Identityd)
    with caplog.at_level(logging.WARNING, logger=data.__name__):
        data.ct_zscore_transform("ct", "hu_window", "w.pth")
    assert "pretrained on z-scored volumes" in caplog.text
    # seeded noise in the zeros, the formula elsewhere
    volume = torch.zeros(1, 4, 4, 4)
    volume[0, 1:3, 1:3, 1:3] = torch.arange(1.0, 9.0).reshape(2, 2, 2)
    zscore.set_random_state(seed=7)
    a = zscore({"ct": volume})["ct"]
    zscore.set_random_state(seed=7)
    b = zscore({"ct": volume})["ct"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    inner = a[0, 1:3, 1:3, 1:3].flatten()
    torch.testing.assert_close(inner.mean(), torch.tensor(0.0), rtol=0, atol=1e-6)
    torch.testing.assert_close(inner.std(unbiased=False), torch.tensor(1.0), rtol=0, atol=1e-6)
    assert float(a[0, 0].std()) > 0.3  # noise, not zeros


def test_bundle_configs_wire_the_normalisation():
    import json
    import os

    from monai.bundle import ConfigParser

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("train.json", "inference.json"):
        parser = ConfigParser(json.load(open(os.path.join(here, "bundles/pe_classifier/configs", name))))
        assert parser["ct_normalization"] == "auto"
        parser["network_def"]["ct_pretrained"] = "resnet_10_23dataset.pth"
        chain = parser.get_parsed_content("ct_transforms")
        assert type(chain[-1]).__name__ == "MedicalNetNormalized", name
