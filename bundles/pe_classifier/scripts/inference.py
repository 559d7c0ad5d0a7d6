"""Python inference API: the probability of pulmonary embolism for one CT (real or generated) or X-ray.

    from bundles.pe_classifier.scripts.inference import PEClassifierInference
    classifier = PEClassifierInference.from_checkpoint("models/model.pt")     # built from its record
    p = classifier.probability(ct="generated_ct.nii.gz")                      # sigmoid(logit) in [0, 1]

CT files go through the config's ``ct_transforms`` (HU window, resize to ``ct_size``), as in training and
evaluation; X-rays (paths or model-domain arrays) through :func:`common.xray.load_view` at ``xray_size``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from bundles.pe_classifier.scripts.evaluation import threshold_from_report
from common.checkpoint import build_for_inference
from common.errors import InputError
from common.xray import load_view

BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PEClassifierInference:
    """A trained PE classifier: ``probability(ct=..., xray=...)`` for its modality (``ct``, ``xray``, ``fusion``)."""

    def __init__(
        self,
        network: torch.nn.Module,
        modality: str,
        ct_transform,
        xray_size: Sequence[int],
        device: str | torch.device = "cpu",
        threshold: float | None = None,
        record: dict | None = None,
        ct_key: str = "ct",
    ):
        """``ct_transform`` reads a CT file path under ``ct_key`` (inference.json's ``ct_key``)."""
        self.device = torch.device(device)
        self.ct_key = ct_key
        self.network = network.to(self.device).eval()
        self.modality = modality
        self.ct_transform = ct_transform
        self.xray_size = int(xray_size[0] if isinstance(xray_size, (list, tuple)) else xray_size)
        self.threshold = threshold
        self.record = record

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | os.PathLike,
        config_files: Sequence[str] | None = None,
        device: str | torch.device = "cpu",
        threshold_report: str | None = None,
        bundle_root: str = BUNDLE_ROOT,
        **overrides,
    ) -> PEClassifierInference:
        """The classifier of ``checkpoint`` built from its record (architecture, modality, input sizes).

        ``threshold_report``: the classifier's ``metrics_report.json`` (or its folder), whose operating
        threshold (Youden's J on validation) classifies a probability; without it no class is given.
        Pretrained-weights paths recorded in the network definition are not needed (the checkpoint holds the
        weights) and are not read.
        """
        network, record, parser, _ = build_for_inference(
            checkpoint,
            config_files=config_files,
            default_config_files=[os.path.join(bundle_root, "configs", "inference.json")],
            expected_bundle="pe_classifier",
            input_ids=("hu_window", "ct_size", "xray_size", "modality"),
            overrides=overrides,
            settings={"bundle_root": bundle_root},
            build_arguments={"ct_pretrained": None, "xray_pretrained": None},
            device=device,
        )
        inputs = (record or {}).get("inputs") or {}
        for key in ("modality", "ct_size", "xray_size", "hu_window"):
            if key in inputs:
                parser[key] = inputs[key] if key != "hu_window" else inputs[key]["name"]
        modality = parser.get_parsed_content("modality")
        from monai.transforms import Compose

        ct_transform = Compose(parser.get_parsed_content("ct_transforms")) if modality != "xray" else None
        threshold = threshold_from_report(threshold_report) if threshold_report else None
        xray_size = parser.get_parsed_content("xray_size")
        ct_key = parser.get_parsed_content("ct_key") if "ct_key" in parser else "ct"
        return cls(network, modality, ct_transform, xray_size, device, threshold, record, ct_key=ct_key)

    @property
    def training_prevalence(self) -> float | None:
        """The PE rate of the training split: every case's probability under the trivial baseline."""
        value = ((self.record or {}).get("inputs") or {}).get("training_prevalence")
        return None if value is None else float(value)

    @property
    def needs(self) -> tuple[str, ...]:
        """What :meth:`probability` needs: ``("ct",)``, ``("xray",)`` or both."""
        return {"ct": ("ct",), "xray": ("xray",), "fusion": ("ct", "xray")}[self.modality]

    def _ct(self, ct: str | os.PathLike) -> torch.Tensor:
        data = self.ct_transform({self.ct_key: os.fspath(ct)})
        return torch.as_tensor(data[self.ct_key]).as_subclass(torch.Tensor).float()[None]

    def _xray(self, xray) -> torch.Tensor:
        return torch.from_numpy(load_view(xray, self.xray_size, "xray"))[None, None]

    @torch.no_grad()
    def probability(self, ct: str | os.PathLike | None = None, xray: str | np.ndarray | None = None) -> float:
        """sigmoid(logit) for a CT file (HU volume: NIfTI, HDF5...) and/or a frontal X-ray, per the modality."""
        missing = [k for k, v in (("ct", ct), ("xray", xray)) if k in self.needs and v is None]
        if missing:
            raise InputError(None, f"the {self.modality} PE classifier needs a {' and a '.join(missing)}")
        if self.modality == "ct":
            logit = self.network(self._ct(ct).to(self.device))
        elif self.modality == "xray":
            logit = self.network(self._xray(xray).to(self.device))
        else:
            logit = self.network(self._ct(ct).to(self.device), self._xray(xray).to(self.device))
        value = float(torch.sigmoid(logit.float()).reshape(-1)[0])
        if not np.isfinite(value):
            raise InputError(None, "the PE classifier returned a non-finite probability")
        return value
