"""Pick the network inputs from a batch by modality (MONAI's default reads only ``image``/``label``)."""

from __future__ import annotations

from typing import Any

import torch
from monai.engines import PrepareBatch


class PEPrepareBatch(PrepareBatch):
    """``ct``: network(ct); ``xray``: network(pa); ``fusion``: network(ct, pa). Label None when absent."""

    def __init__(self, modality: str = "ct", label_key: str = "label"):
        if modality not in ("ct", "xray", "fusion"):
            raise ValueError(f"modality must be ct, xray or fusion, got {modality!r}")
        self.modality, self.label_key = modality, label_key

    def __call__(
        self,
        batchdata: dict,
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple, dict]:
        def get(key: str) -> torch.Tensor:
            return torch.as_tensor(batchdata[key]).to(device=device, non_blocking=non_blocking, **kwargs)

        image = get("pa" if self.modality == "xray" else "ct")
        label = get(self.label_key) if self.label_key in batchdata else None
        args = (get("pa"),) if self.modality == "fusion" else ()
        return image, label, args, {}
