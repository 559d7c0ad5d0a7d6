"""The base of engines that write their own training step (the bundles' GAN steps).

MONAI's ``Trainer`` takes ``data_loader``/``handlers``/``key_metric`` while ``SupervisedTrainer`` (what configs
wire) names them ``train_data_loader``/``train_handlers``/``key_train_metric``; :class:`StepTrainer` gives
custom steps the ``SupervisedTrainer`` names, so the configs of every bundle wire trainers the same way.
Subclasses implement ``_iteration`` and return batched tensors (no decollation); they run the generator's
forward through ``engine.inferer`` (``train#inferer``, MONAI's training property: a ``SimpleInferer`` calls the
network as it is, so the step's arithmetic is that of a direct call).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from monai.engines import Trainer
from monai.engines.utils import default_prepare_batch
from monai.inferers import Inferer, SimpleInferer


class StepTrainer(Trainer):
    """``monai.engines.Trainer`` with ``SupervisedTrainer``'s argument names, for a hand-written ``_iteration``."""

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = default_prepare_batch,
        train_handlers: Sequence | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        inferer: Inferer | None = None,
    ) -> None:
        """``inferer``: how the step calls the generator (default :class:`monai.inferers.SimpleInferer`)."""
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            handlers=train_handlers,
            decollate=False,
        )
        self.inferer = SimpleInferer() if inferer is None else inferer
