"""The VQ-GAN's engines: one training step as a MONAI ``Trainer``, whole-volume evaluation, dead-code restarts.

The trainer is an ignite engine, so every MONAI handler works on it.

Why not MONAI's GanTrainer / AdversarialTrainer: GanTrainer feeds the generator random latent codes, and
AdversarialTrainer expects the generator to return one tensor and has no place for the VQ commitment loss,
an optional perceptual term, or an adversarial term that only starts after a warm-up step. This step does
exactly what the VQ-GAN recipe needs and writes everything to ``engine.state.output`` for the handlers.

Generator loss = L1(recon, x) + commitment (MONAI's VQVAE, already weighted by ``commitment_cost``)
               + perceptual_weight * perceptual(recon, x)            [only when a perceptual loss is given]
               + adversarial_weight * adv_G(D(recon))                [only after ``adversarial_start`` steps]
Discriminator loss (same step, after ``adversarial_start``) = (adv(D(x), real) + adv(D(recon), fake)) / 2.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from monai.engines import SupervisedEvaluator
from monai.utils import CommonKeys as Keys

from bundles.vqgan_3d_patch.scripts.losses import discriminator_loss, generator_adversarial_loss
from common.checkpoint import unwrap
from common.codec import CodecInferer
from common.engines import StepTrainer

SCALAR_KEYS = (
    "loss",
    "recon_loss",
    "quantization_loss",
    "perceptual_loss",
    "g_adv_loss",
    "d_loss",
    "perplexity",
    "codes_restarted",
)


def scalar_terms(output: dict) -> dict[str, float]:
    """The scalar loss terms of one step (for StatsHandler / TensorBoardStatsHandler ``output_transform``)."""
    return {k: float(output[k]) for k in SCALAR_KEYS if k in output}


class VQGANTrainer(StepTrainer):
    """Trainer for a VQVAE generator with an optional patch discriminator."""

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        generator: torch.nn.Module,
        g_optimizer: torch.optim.Optimizer,
        recon_loss_function: Callable,
        discriminator: torch.nn.Module | None = None,
        d_optimizer: torch.optim.Optimizer | None = None,
        adversarial_loss_function: Callable | None = None,
        adversarial_weight: float = 0.01,
        adversarial_start: int = 10000,
        perceptual_loss_function: Callable | None = None,
        perceptual_weight: float = 0.0,
        code_restart_interval: int = 0,
        code_restart_min_size: float = 1.0,
        **trainer_args,
    ) -> None:
        """``trainer_args``: the other :class:`common.engines.StepTrainer` arguments (epoch_length, prepare_batch,
        train_handlers, key_train_metric, additional_metrics, non_blocking, inferer)."""
        super().__init__(device, max_epochs, train_data_loader, **trainer_args)
        if discriminator is not None and (d_optimizer is None or adversarial_loss_function is None):
            raise ValueError("a discriminator needs d_optimizer and adversarial_loss_function")
        self.generator = generator
        self.g_optimizer = g_optimizer
        self.recon_loss_function = recon_loss_function
        self.discriminator = discriminator
        self.d_optimizer = d_optimizer
        self.adversarial_loss_function = adversarial_loss_function
        self.adversarial_weight = float(adversarial_weight)
        self.adversarial_start = int(adversarial_start)
        self.perceptual_loss_function = perceptual_loss_function
        self.perceptual_weight = float(perceptual_weight)
        self.code_restart_interval = int(code_restart_interval)
        self.code_restart_min_size = float(code_restart_min_size)
        # latents and code indices of the latest forward, captured without a second quantisation (works in DDP)
        self._latents: torch.Tensor | None = None
        self._indices: torch.Tensor | None = None
        unwrap(generator).quantizer.quantizer.register_forward_hook(self._capture_codes)

    def _capture_codes(self, module, inputs, outputs) -> None:
        self._latents = inputs[0].detach()
        self._indices = outputs[2].detach()

    def restart_due(self, iteration: int) -> bool:
        """Dead codes are restarted after the first step (data-dependent init) and every ``interval`` steps."""
        return self.code_restart_interval > 0 and (
            iteration == 1 or iteration % self.code_restart_interval == 0
        )

    def adversarial_active(self, iteration: int) -> bool:
        """The adversarial terms are on from step ``adversarial_start + 1`` (steps count from 1)."""
        return (
            self.discriminator is not None
            and self.adversarial_weight > 0
            and iteration > self.adversarial_start
        )

    def _iteration(self, engine: VQGANTrainer, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        images = batch[0]
        adversarial = engine.adversarial_active(engine.state.iteration)

        engine.generator.train()
        engine.g_optimizer.zero_grad(set_to_none=True)
        recon, quantization_loss = engine.inferer(images, engine.generator)  # train#inferer
        recon_loss = engine.recon_loss_function(recon, images)
        loss = recon_loss + quantization_loss
        out: dict = {Keys.IMAGE: images, Keys.LABEL: images, Keys.PRED: recon.detach()}
        if engine.perceptual_loss_function is not None and engine.perceptual_weight > 0:
            perceptual = engine.perceptual_loss_function(recon.float(), images.float())
            loss = loss + engine.perceptual_weight * perceptual
            out["perceptual_loss"] = perceptual.detach()
        if adversarial:
            engine.discriminator.train()
            g_adv = generator_adversarial_loss(engine.discriminator, engine.adversarial_loss_function, recon)
            loss = loss + engine.adversarial_weight * g_adv
            out["g_adv_loss"] = g_adv.detach()
        loss.backward()
        engine.g_optimizer.step()

        if adversarial:
            engine.d_optimizer.zero_grad(set_to_none=True)
            d_loss = discriminator_loss(engine.discriminator, engine.adversarial_loss_function, images, recon)
            d_loss.backward()
            engine.d_optimizer.step()
            out["d_loss"] = d_loss.detach()

        if engine.restart_due(engine.state.iteration):
            quantizer = unwrap(engine.generator).quantizer.quantizer
            out["codes_restarted"] = restart_dead_codes(
                quantizer, engine._latents, engine.code_restart_min_size
            )

        out.update(
            loss=loss.detach(),
            recon_loss=recon_loss.detach(),
            quantization_loss=quantization_loss.detach(),
            perplexity=unwrap(engine.generator).quantizer.perplexity.detach(),
            indices=engine._indices,
        )
        return out


@torch.no_grad()
def restart_dead_codes(
    quantizer: torch.nn.Module, latents: torch.Tensor, min_cluster_size: float = 1.0
) -> int:
    """Move codes whose EMA cluster size fell below ``min_cluster_size`` onto random encoder outputs.

    MONAI's EMAQuantizer starts from N(0, 1) codes that are far from the encoder's outputs, so few codes
    ever win and the rest never move (codebook collapse). Restarting dead codes on current latents (as in
    Jukebox / SoundStream) keeps the codebook in use; own code, MONAI has none. ``quantizer`` is the
    ``EMAQuantizer`` (``vqvae.quantizer.quantizer``), ``latents`` the encoder output (B, D, ...).
    Returns the number of codes restarted (identical on every DDP rank: rank 0's choice is broadcast).
    """
    dead = quantizer.ema_cluster_size < min_cluster_size
    n = int(dead.sum())
    if n:
        flat = latents.detach().movedim(1, -1).reshape(-1, latents.shape[1]).float()
        picks = flat[torch.randint(flat.shape[0], (n,), device=flat.device)]
        picks = picks.to(quantizer.embedding.weight.device)
        quantizer.embedding.weight.data[dead] = picks
        # restarted with exactly the threshold mass: a code used fewer than ``min_cluster_size`` times per step
        # (EMA) since its restart falls below it again and is restarted at the next call
        mass = max(float(min_cluster_size), 1e-3)
        quantizer.ema_w.data[dead] = picks * mass
        quantizer.ema_cluster_size.data[dead] = mass
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for tensor in (
            quantizer.embedding.weight.data,
            quantizer.ema_w.data,
            quantizer.ema_cluster_size.data,
        ):
            torch.distributed.broadcast(tensor, src=0)
    return n


class VQGANEvaluator(SupervisedEvaluator):
    """SupervisedEvaluator of whole volumes by the latent path, whose output also holds the code indices.

    The reconstruction comes from the :class:`common.codec.CodecInferer` (blend -> quantise -> decode); the
    ``indices`` (B, X', Y', Z') of the codebook metrics are those of the same blended latent, so each latent
    voxel counts once. With ``compare_per_window`` the per-window reconstruction is computed too and added
    as ``pred_per_window`` only when it differs from the latent path (max difference above ``tolerance``).
    """

    def __init__(self, *args, compare_per_window: bool = False, tolerance: float = 1e-6, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.inferer, CodecInferer):
            raise TypeError("VQGANEvaluator needs a common.codec.CodecInferer (its windows define the latent)")
        self.compare_per_window = bool(compare_per_window)
        self.tolerance = float(tolerance)

    def _iteration(self, engine: VQGANEvaluator, batchdata: dict) -> dict:
        output = super()._iteration(engine, batchdata)
        with torch.no_grad():
            image = output[Keys.IMAGE]
            latents = engine.inferer.last_latents  # the latents the reconstruction was decoded from
            output["indices"] = (latents or engine.inferer.latents(image, engine.network)).indices
            if engine.compare_per_window:
                other = engine.inferer.per_window(image, engine.network)
                pred = torch.as_tensor(output[Keys.PRED]).as_subclass(torch.Tensor)
                if float((other.as_subclass(torch.Tensor) - pred.to(other.device)).abs().max()) > engine.tolerance:
                    output["pred_per_window"] = other
        return output
