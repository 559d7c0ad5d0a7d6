"""A small conditional-GAN (pix2pix) trainer on MONAI's ``Trainer`` base (an ignite Engine).

Why not ``monai.engines.AdversarialTrainer``: its discriminator sees ``inputs`` as the real images
(``AdversarialKeys.REALS = inputs``) and only ever the generator output as fake, without the
conditioning image. pix2pix needs the *target* as the real sample and the discriminator to judge
(input, output) pairs: D(cat(avg, phase0)) real vs D(cat(avg, G(avg))) fake. Everything else (device,
prepare_batch, handlers, metrics, checkpoint state) comes from MONAI's ``Workflow`` (via
:class:`common.engines.StepTrainer`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from monai.losses import PatchAdversarialLoss
from monai.utils import CommonKeys as Keys
from torch import nn

from bundles.pix2pix_phase.scripts.data import PairBatch
from common.engines import StepTrainer


class ConditionalGanTrainer(StepTrainer):
    """One iteration = one discriminator step then one generator step (pix2pix order).

    Generator loss = adversarial(D(x, G(x)) -> real) + ``lambda_recon`` * recon(G(x), y);
    discriminator loss = 0.5 * (adversarial(D(x, y) -> real) + adversarial(D(x, G(x)) -> fake)).
    ``engine.state.output`` holds floats ``loss`` (generator total), ``g_adv``, ``g_recon``, ``d_loss``
    and the tensors ``image``, ``label``, ``pred`` for image handlers.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        g_network: nn.Module,
        g_optimizer: torch.optim.Optimizer,
        d_network: nn.Module,
        d_optimizer: torch.optim.Optimizer,
        adversarial_loss: Callable | None = None,
        recon_loss: Callable | None = None,
        lambda_recon: float = 100.0,
        prepare_batch: Callable | None = None,
        **trainer_args,
    ) -> None:
        """``trainer_args``: the other :class:`common.engines.StepTrainer` arguments (handlers, metrics, inferer...)."""
        super().__init__(device, max_epochs, train_data_loader, prepare_batch=prepare_batch or PairBatch(), **trainer_args)
        self.g_network, self.g_optimizer = g_network, g_optimizer
        self.d_network, self.d_optimizer = d_network, d_optimizer
        # pix2pix's "vanilla" GAN loss: BCE on logits (MONAI applies the sigmoid inside for criterion "bce")
        self.adversarial_loss = adversarial_loss or PatchAdversarialLoss(criterion="bce", reduction="mean")
        self.recon_loss = recon_loss or nn.L1Loss()
        self.lambda_recon = float(lambda_recon)

    def _discriminate(self, inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        logits = self.d_network(torch.cat([inputs, outputs], dim=1))
        return (
            logits[-1] if isinstance(logits, (list, tuple)) else logits
        )  # PatchDiscriminator returns features too

    def _iteration(self, engine: ConditionalGanTrainer, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        inputs, targets = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)[:2]
        engine.g_network.train()
        engine.d_network.train()
        fakes = engine.inferer(inputs, engine.g_network)  # train#inferer

        # discriminator step on real (x, y) and detached fake (x, G(x)) pairs
        engine.d_network.requires_grad_(True)
        engine.d_optimizer.zero_grad(set_to_none=True)
        d_real = engine.adversarial_loss(engine._discriminate(inputs, targets), True, True)
        d_fake = engine.adversarial_loss(engine._discriminate(inputs, fakes.detach()), False, True)
        d_loss = 0.5 * (d_real + d_fake)
        d_loss.backward()
        engine.d_optimizer.step()

        # generator step: fool D (frozen) and stay close to the target
        engine.d_network.requires_grad_(False)
        engine.g_optimizer.zero_grad(set_to_none=True)
        g_adv = engine.adversarial_loss(engine._discriminate(inputs, fakes), True, False)
        g_recon = engine.recon_loss(fakes, targets)
        g_loss = g_adv + engine.lambda_recon * g_recon
        g_loss.backward()
        engine.g_optimizer.step()
        engine.d_network.requires_grad_(True)

        return {
            Keys.IMAGE: inputs,
            Keys.LABEL: targets,
            Keys.PRED: fakes.detach(),
            Keys.LOSS: g_loss.item(),
            "g_adv": g_adv.item(),
            "g_recon": g_recon.item(),
            "d_loss": d_loss.item(),
        }
