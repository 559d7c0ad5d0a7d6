"""VQ-GAN training pieces: codebook statistics by hand, dead-code restarts, the adversarial switch, overfitting."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import VQVAE, PatchDiscriminator

from bundles.vqgan_3d_patch.scripts.data import PrepareCTBatch
from bundles.vqgan_3d_patch.scripts.engines import VQGANTrainer, restart_dead_codes
from bundles.vqgan_3d_patch.scripts.evaluation import CodebookMetric, codebook_stats
from common.codec import reconstruct_volume
from common.intensity import XRAY2CT
from common.sliding_window import LatentSlidingWindowInferer


def test_codebook_stats_by_hand():
    stats = codebook_stats(torch.tensor([[0, 0], [1, 3]]), num_embeddings=4)
    assert stats["codebook_usage"] == pytest.approx(3 / 4)
    # p = (1/2, 1/4, 0, 1/4): entropy = 1.5 ln 2 -> perplexity 2^1.5
    assert stats["perplexity"] == pytest.approx(2**1.5)
    assert codebook_stats(torch.zeros(10, dtype=torch.long), 8) == {
        "codebook_usage": 1 / 8,
        "perplexity": 1.0,
    }
    metric = CodebookMetric(4, "perplexity", output_transform=lambda x: x)
    metric.reset()
    metric.update(torch.tensor([0, 0]))
    metric.update(torch.tensor([1, 3]))
    assert metric.compute() == pytest.approx(2**1.5)
    with pytest.raises(ValueError):
        codebook_stats(torch.tensor([4]), 4)


def test_restart_dead_codes_moves_only_dead_codes_onto_latents():
    torch.manual_seed(0)
    net = VQVAE(spatial_dims=3, in_channels=1, out_channels=1, channels=(4, 4, 4), num_res_channels=4,
                num_res_layers=1, num_embeddings=6, embedding_dim=3)  # fmt: skip
    q = net.quantizer.quantizer
    q.ema_cluster_size.data = torch.tensor([5.0, 0.0, 2.0, 0.01, 3.0, 0.0])
    before = q.embedding.weight.detach().clone()
    latents = torch.randn(2, 3, 2, 2, 2) + 100.0  # far from every initial code
    assert restart_dead_codes(q, latents, min_cluster_size=1.0) == 3
    after = q.embedding.weight.detach()
    alive, dead = [0, 2, 4], [1, 3, 5]
    torch.testing.assert_close(after[alive], before[alive])
    flat = latents.movedim(1, -1).reshape(-1, 3)
    for k in dead:  # each restarted code is one of the latent vectors
        assert torch.cdist(after[k][None], flat).min() < 1e-5
    assert torch.all(q.ema_cluster_size[dead] == 1.0)


def _tiny_trainer(
    data, steps, adversarial_start=10_000, with_discriminator=False, restart=5, channels=(16, 16, 32)
):
    torch.manual_seed(0)
    net = VQVAE(spatial_dims=3, in_channels=1, out_channels=1, channels=channels, num_res_channels=channels,
                num_res_layers=1, num_embeddings=32, embedding_dim=8, decay=0.99)  # fmt: skip
    disc = (
        PatchDiscriminator(spatial_dims=3, channels=4, in_channels=1, num_layers_d=2)
        if with_discriminator
        else None
    )
    trainer = VQGANTrainer(
        device="cpu",
        max_epochs=1,
        epoch_length=steps,
        train_data_loader=data,
        generator=net,
        g_optimizer=torch.optim.Adam(net.parameters(), lr=2e-3),
        recon_loss_function=torch.nn.L1Loss(),
        discriminator=disc,
        d_optimizer=torch.optim.Adam(disc.parameters(), lr=1e-3) if disc is not None else None,
        adversarial_loss_function=PatchAdversarialLoss(criterion="least_squares")
        if disc is not None
        else None,
        adversarial_start=adversarial_start,
        code_restart_interval=restart,
        code_restart_min_size=1.0,
        prepare_batch=PrepareCTBatch("ct"),
    )
    return trainer, net


def test_adversarial_terms_start_after_the_configured_step():
    data = [{"ct": torch.rand(1, 1, 16, 16, 16)}] * 3
    trainer, _ = _tiny_trainer(data, 3, adversarial_start=2, with_discriminator=True, channels=(4, 4, 4))
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append("d_loss" in e.state.output))
    trainer.run()
    assert seen == [False, False, True]
    assert math.isfinite(float(trainer.state.output["g_adv_loss"]))


def _psnr(net, x) -> float:
    net.eval()
    recon = reconstruct_volume(net, x, LatentSlidingWindowInferer(tuple(x.shape[2:]))).clamp(0, 1)
    return float(10 * torch.log10(1.0 / ((recon - x) ** 2).mean()))


@pytest.mark.slow
def test_tiny_model_overfits_a_real_ct_crop(shared_data):
    """Fixed 32^3 crop of the real CTPA scan: PSNR (xray2ct window) must pass 17 dB within 60 steps."""
    hu = np.asarray(nib.load(shared_data / "ct" / "ctpa_crop_pulmonary.nii.gz").dataobj, dtype=np.float32)
    x = torch.from_numpy(XRAY2CT.to_unit(hu[40:72, 30:62, 40:72]))[None, None]
    trainer, net = _tiny_trainer([{"ct": x}] * 60, 60)
    before = _psnr(net, x)
    losses = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["recon_loss"]))
    )
    trainer.run()
    after = _psnr(net, x)
    print(
        f"PSNR before {before:.2f} dB, after 60 steps {after:.2f} dB; L1 {losses[0]:.4f} -> {losses[-1]:.4f}"
    )
    assert after > 17.0 and after > before + 6.0
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    with torch.no_grad():
        usage = codebook_stats(net.index_quantize(x), 32)["codebook_usage"]
    assert usage >= 0.2  # dead-code restarts keep the codebook in use (without them: 1 code of 32)
