"""latent_ddpm: the scheduler's ``prediction_type`` (epsilon / sample / v) from training target to DDIM sampling.

Why it matters (issue 12 item 4): the CPU-size epsilon model's noise estimate does not follow x_t, and DDIM turns
it into x0 through 1 / sqrt(alpha_bar_t) (~100 at t = T): its samples leave the unit-variance latent range
(std ~22) and every condition decodes alike. cpu_small.json trains an x0 ("sample") model instead.
"""

from __future__ import annotations

import os

import pytest
import torch
from monai.bundle import ConfigParser

from bundles.latent_ddpm.scripts.data import TargetPrepareBatch, check_prediction_type
from bundles.latent_ddpm.scripts.inference import make_scheduler, sample_latents
from common.errors import InputError

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "bundles", "latent_ddpm", "configs")
SHAPE = (4, 4, 4, 4)


def _batch(n: int = 2) -> dict:
    torch.manual_seed(0)
    return {"image": torch.randn(n, *SHAPE), "pa": torch.rand(n, 1, 8, 8)}


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
def test_training_target_follows_prediction_type(kind):
    scheduler = make_scheduler("ddpm", 1000, None, prediction_type=kind)
    prepare = TargetPrepareBatch(scheduler, 1000, condition_name="pa", prediction_type=kind)
    images, target, _, kwargs = prepare(_batch())
    noise, t = kwargs["noise"], kwargs["timesteps"]
    expected = {"epsilon": noise, "sample": images, "v_prediction": scheduler.get_velocity(images, noise, t)}[kind]
    torch.testing.assert_close(target, expected)
    assert kwargs["condition"].shape == (2, 1, 8, 8)


def test_prepare_batch_refuses_a_scheduler_of_another_prediction_type():
    with pytest.raises(ValueError, match="predicts 'epsilon'"):
        TargetPrepareBatch(make_scheduler("ddpm", 1000, None), 1000, prediction_type="sample")
    with pytest.raises(ValueError, match="prediction_type must be"):
        TargetPrepareBatch(make_scheduler("ddpm", 1000, None), 1000, prediction_type="x0")


def test_cpu_small_trains_and_samples_x0():
    parser = ConfigParser()
    parser.read_config([os.path.join(CONFIGS, n) for n in ("train.json", "cpu_small.json")])
    assert parser.get_parsed_content("scheduler").prediction_type == "sample"
    prepare = parser.get_parsed_content("prepare_batch")
    images, target, _, _ = prepare(_batch())
    torch.testing.assert_close(target, images)
    evaluate = ConfigParser()
    evaluate.read_config(
        [os.path.join(CONFIGS, n) for n in ("train.json", "evaluate.json", "cpu_small.json")]
    )
    assert evaluate.get_parsed_content("sampling_scheduler").prediction_type == "sample"


def test_sampling_another_target_than_the_checkpoint_learnt_is_refused():
    check_prediction_type({"prediction_type": "sample"}, "sample", "model.pt")
    with pytest.raises(InputError, match="trained with prediction_type 'sample'"):
        check_prediction_type({"prediction_type": "sample"}, "epsilon", "model.pt")
    with pytest.raises(InputError, match="'epsilon'"):  # records from before prediction_type: noise models
        check_prediction_type({}, "sample", "model.pt")


class _Oracle(torch.nn.Module):
    """Knows each condition's latent x0 (``means[c]``, c = the X-ray's first pixel); answers as ``kind`` asks."""

    def __init__(self, means: torch.Tensor, scheduler, kind: str):
        super().__init__()
        self.means, self.scheduler, self.kind = means, scheduler, kind

    def forward(self, x, timesteps, context=None):
        x0 = self.means[context.flatten(1)[:, 0].long()]
        if self.kind == "sample":
            return x0
        a = self.scheduler.alphas_cumprod[int(timesteps.reshape(-1)[0])]
        return (x - a.sqrt() * x0) / (1 - a).sqrt()  # the noise in x


@pytest.mark.parametrize("kind", ["epsilon", "sample"])
def test_ddim_samples_follow_the_condition_for_either_prediction_type(kind):
    """The sampler reads the network's output as its prediction_type: each condition gets its own latent."""
    means = torch.stack([torch.full(SHAPE, -0.5), torch.full(SHAPE, 0.5)])
    xray = torch.stack([torch.zeros(1, 8, 8), torch.ones(1, 8, 8)])
    noise = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1, -1)
    scheduler = make_scheduler("ddim", 1000, 20, prediction_type=kind)
    out = sample_latents(_Oracle(means, scheduler, kind), xray, SHAPE, scheduler, noise=noise)
    torch.testing.assert_close(out, means, atol=0.02, rtol=0)
    wrong = make_scheduler("ddim", 1000, 20, prediction_type="epsilon" if kind == "sample" else "sample")
    misread = sample_latents(_Oracle(means, wrong, kind), xray, SHAPE, wrong, noise=noise)
    assert (misread - means).abs().mean() > 0.3  # an x0 network sampled as a noise model (or back) fails
