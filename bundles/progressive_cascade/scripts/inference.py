"""Single-case inference: a PA + lateral pair -> one NIfTI per stage (HU, spacing = FOV / size) + previews."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from bundles.progressive_cascade.scripts.evaluation import save_stage_montage
from common.checkpoint import load_weights, unwrap
from common.errors import InputError, require_file
from common.intensity import get_window
from common.io import save_volume
from common.preview import save_slice_gif
from common.volume import Volume


class CascadePredictor:
    """Callable ``(pa_file, lateral_file, output_dir, case_id) -> {name: path}``.

    Volumes are canonical RAS centred on the isocentre (origin 0, as the DRR geometry), with spacing
    ``fov_mm / size`` per stage. Writes ``<case>_stage<k>.nii.gz``, ``<case>_ct.nii.gz`` (last stage),
    ``<case>_stages.png`` (all stages beside the X-rays) and ``<case>_axial.gif``.
    """

    def __init__(self, network, preprocessing, fov_mm: Sequence[float], device="cpu", hu_window: str = "xray2ct"):
        """``preprocessing``: the config's X-ray transform chain (``{"pa", "lateral"}`` paths -> (1, S, S) each)."""
        self.network = network.eval()
        self.device = torch.device(device)
        self.fov_mm = tuple(float(f) for f in fov_mm)
        self.window = get_window(hu_window)
        self.transform = preprocessing

    @staticmethod
    def check_inputs(pa_file: str | None, lateral_file: str | None) -> None:
        """:class:`InputError` unless both radiographs are given and exist (before any model is loaded)."""
        if not pa_file or not lateral_file:
            raise InputError(None, "inference needs --pa_file and --lateral_file (a PA and a lateral radiograph)")
        require_file(pa_file)
        require_file(lateral_file)

    def load_checkpoint(self, path: str) -> CascadePredictor:
        """Load a cascade checkpoint (:func:`common.checkpoint.load_weights`: the record is checked)."""
        load_weights(self.network, path, expected_bundle="progressive_cascade")
        self.network.eval()
        return self

    @torch.no_grad()
    def predict(self, pa_file: str, lateral_file: str) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every stage's output (B=1, unit window, clamped) and the model-ready X-rays (1, 2, S, S)."""
        data = self.transform({"pa": require_file(pa_file), "lateral": require_file(lateral_file)})
        xrays = torch.cat((data["pa"], data["lateral"]), dim=0)[None].to(self.device)
        if not torch.isfinite(xrays).all():
            raise InputError(pa_file, "X-ray contains NaN or infinite values")
        return [o.clamp(0.0, 1.0) for o in unwrap(self.network).forward_all(xrays)], xrays

    def __call__(
        self, pa_file: str, lateral_file: str, output_dir: str, case_id: str = "case"
    ) -> dict[str, str]:
        self.check_inputs(pa_file, lateral_file)
        outputs, xrays = self.predict(pa_file, lateral_file)
        written: dict[str, str] = {}
        volumes = {}
        for k, out in enumerate(outputs, start=1):
            hu = self.window.from_unit(out[0, 0].float().cpu().numpy())
            vol = Volume.from_spacing(hu, tuple(f / n for f, n in zip(self.fov_mm, hu.shape)))
            volumes[f"stage{k}"] = vol
            written[f"stage{k}"] = save_volume(vol, os.path.join(output_dir, f"{case_id}_stage{k}.nii.gz"))
        written["ct"] = save_volume(vol, os.path.join(output_dir, f"{case_id}_ct.nii.gz"))
        preds = {f"stage{k}": o for k, o in enumerate(outputs, start=1)}
        written["montage"] = save_stage_montage(
            os.path.join(output_dir, f"{case_id}_stages.png"), preds, None, xrays, 0, self.fov_mm
        )
        written["gif"] = save_slice_gif(os.path.join(output_dir, f"{case_id}_axial.gif"), vol, axis="axial")
        return written
