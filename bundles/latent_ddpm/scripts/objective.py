"""X-ray2CTPA's training objective: epsilon prediction, L1 on the noise + 0.01 LPIPS on the x0 rebuilt from it.

NoaCahan/X-ray2CTPA ``ddpm/diffusion.py`` (``GaussianDiffusion.p_losses``, ``lpips_loss_fn``): the network's
output is the noise (``objective: pred_x0`` in ``config/model/ddpm.yaml`` is never read), the loss is
``l1_weight * L1(noise, pred) + perceptual_weight * LPIPS(x0_hat slice, x0 slice)`` with ``loss_type: l1_lpips``,
``l1_weight`` 1, ``perceptual_weight`` 0.01; ``x0_hat = sqrt(1 / a_t) x_t - sqrt(1 / a_t - 1) pred``
(``predict_start_from_noise``, ``a_t`` = alpha_bar_t); the LPIPS is MONAI's
``PerceptualLoss(spatial_dims=2, network_type="radimagenet_resnet50")`` on one random slice per sample along
the depth axis (their frame axis 2; our latents are (B, C, X, Y, Z), so Z). In the paper's CTPA setting those
slices are decoded by Stable Diffusion's VAE under ``torch.no_grad()``, so that LPIPS term sends no gradient;
with a VQ-GAN (ours) they are the latent slices themselves and it does (their ``vae is None`` branch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.errors import InputError

RADIMAGENET_FILE = "RadImageNet-ResNet50_notop.pth"
PERCEPTUAL_REPO = "Project-MONAI/perceptual-models:main"


def radimagenet_perceptual_loss(cache_dir: str | None = None) -> torch.nn.Module:
    """MONAI's ``PerceptualLoss(spatial_dims=2, network_type="radimagenet_resnet50")``, as X-ray2CTPA builds it.

    MONAI loads the network through ``torch.hub`` (``Project-MONAI/perceptual-models``) and its weights file
    ``RadImageNet-ResNet50_notop.pth`` from the hub cache (``cache_dir``, else torch's hub directory),
    downloading what is missing. Offline, put both there first; a failure names the directory.
    """
    from monai.losses import PerceptualLoss

    try:
        return PerceptualLoss(spatial_dims=2, network_type="radimagenet_resnet50", cache_dir=cache_dir)
    except Exception as e:  # no network, no cached repository or weights, a corrupt file
        where = cache_dir or torch.hub.get_dir()
        raise InputError(
            where,
            f"RadImageNet ResNet-50 perceptual network not loadable ({type(e).__name__}: {e}); put the "
            f"{PERCEPTUAL_REPO} hub repository and {RADIMAGENET_FILE} there, or set perceptual_weight to 0",
        ) from e


class EpsilonPerceptualLoss(torch.nn.Module):
    """``l1_weight * L1(pred, noise) + perceptual_weight * perceptual(x0_hat[..., z], x0[..., z])`` (a scalar).

    ``pred`` and ``target`` (B, C, X, Y, Z): the predicted and the true noise, as ``SupervisedTrainer`` passes
    them. The clean latent and the timesteps of the same batch come from ``prepare_batch`` (a
    :class:`~bundles.latent_ddpm.scripts.data.TargetPrepareBatch` with ``prediction_type`` ``"epsilon"``, which
    keeps its last batch); a target that is not that batch's noise is refused. ``perceptual``: a module taking
    (B, C, H, W) slices (MONAI ``PerceptualLoss``, :func:`radimagenet_perceptual_loss`; it takes channels
    2, 1, 0 as BGR, or repeats a single channel), None for the L1 term alone.
    """

    def __init__(
        self,
        scheduler,
        prepare_batch,
        l1_weight: float = 1.0,
        perceptual: torch.nn.Module | None = None,
        perceptual_weight: float = 0.01,
    ) -> None:
        super().__init__()
        if getattr(prepare_batch, "prediction_type", None) != "epsilon":
            raise ValueError("X-ray2CTPA's loss trains epsilon: prepare_batch must have prediction_type 'epsilon'")
        if getattr(scheduler, "prediction_type", "epsilon") != "epsilon":
            raise ValueError(f"the scheduler predicts {scheduler.prediction_type!r}, the loss needs 'epsilon'")
        self.scheduler = scheduler
        self.prepare_batch = prepare_batch
        self.l1_weight = float(l1_weight)
        self.perceptual_weight = float(perceptual_weight)
        self.perceptual = perceptual if self.perceptual_weight > 0 else None

    def rebuild_x0(self, x_t: torch.Tensor, pred: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x0_hat = sqrt(1 / a_t) x_t - sqrt(1 / a_t - 1) pred (a_t = alpha_bar_t of the scheduler), float32."""
        abar = self.scheduler.alphas_cumprod.to(device=x_t.device, dtype=torch.float32)[timesteps]
        abar = abar.reshape(-1, *(1,) * (x_t.ndim - 1))
        return torch.sqrt(1.0 / abar) * x_t.float() - torch.sqrt(1.0 / abar - 1.0) * pred.float()

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.l1_weight * F.l1_loss(pred.float(), target.float())
        if self.perceptual is None:
            return loss
        last = getattr(self.prepare_batch, "last_batch", None)
        if last is None or last[1].shape != target.shape or last[1].data_ptr() != target.data_ptr():
            raise RuntimeError("the loss's prepare_batch did not prepare this batch (configure both as one object)")
        x0, noise, timesteps = last
        x_t = self.scheduler.add_noise(original_samples=x0, noise=noise, timesteps=timesteps)
        x0_hat = self.rebuild_x0(x_t, pred, timesteps)
        b, c = x0.shape[:2]
        if c == 2:
            raise ValueError("the perceptual term needs 1 or >= 3 latent channels (RadImageNet reads 3 as BGR)")
        z = torch.randint(0, x0.shape[-1], (b,), device=x0.device)  # one slice per sample, as the original
        index = z.reshape(b, 1, 1, 1, 1).expand(b, c, *x0.shape[2:-1], 1)
        slices = torch.gather(x0.float(), -1, index).squeeze(-1)
        slices_hat = torch.gather(x0_hat, -1, index).squeeze(-1)
        return loss + self.perceptual_weight * self.perceptual(slices_hat, slices).mean()
