"""Single-case inference: a PA + lateral pair -> one NIfTI per stage (HU, spacing = FOV / size) + previews."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from bundles.progressive_cascade.scripts.data import pair_transforms
from bundles.progressive_cascade.scripts.evaluation import save_stage_montage
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

    def __init__(
        self, network, xray_size: int, fov_mm: Sequence[float], device="cpu", hu_window: str = "xray2ct"
    ):
        self.network = network.eval()
        self.device = torch.device(device)
        self.fov_mm = tuple(float(f) for f in fov_mm)
        self.window = get_window(hu_window)
        self.transform = pair_transforms(
            volume_size=0, xray_size=xray_size, hu_window=hu_window, with_ct=False
        )

    @torch.no_grad()
    def predict(self, pa_file: str, lateral_file: str) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every stage's output (B=1, unit window, clamped) and the model-ready X-rays (1, 2, S, S)."""
        data = self.transform({"pa": require_file(pa_file), "lateral": require_file(lateral_file)})
        xrays = torch.cat((data["pa"], data["lateral"]), dim=0)[None].to(self.device)
        if not torch.isfinite(xrays).all():
            raise InputError(pa_file, "X-ray contains NaN or infinite values")
        net = self.network.module if hasattr(self.network, "module") else self.network
        return [o.clamp(0.0, 1.0) for o in net.forward_all(xrays)], xrays

    def __call__(
        self, pa_file: str, lateral_file: str, output_dir: str, case_id: str = "case"
    ) -> dict[str, str]:
        if not pa_file or not lateral_file:
            raise InputError(None, "inference needs --pa_file and --lateral_file")
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
