"""Denoiser algebra (eps / v, sigma <-> timestep) with oracle UNets, and the CFG wrapper on a tiny real UNet."""

import math

import pytest
import torch

from clipdiffusion.diffusion.denoiser import (
    CFGDenoiser,
    Denoiser,
    sd_alphas_cumprod,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
    t_to_sigma,
)
from clipdiffusion.errors import ClipDiffusionError

TABLE = sigmas_from_alphas_cumprod(sd_alphas_cumprod())


class OracleUNet(torch.nn.Module):
    """Knows x0 and the noise; answers what a perfect eps- or v-model would, reading sigma back from t."""

    def __init__(self, x0, noise, prediction):
        super().__init__()
        self.x0, self.noise, self.prediction = x0, noise, prediction
        self.seen = []

    def forward(self, x_in, t, context, y=None):
        self.seen.append((x_in, t))
        sigma = t_to_sigma(t.double(), TABLE).float().view(-1, 1, 1, 1)
        sqrt_a = 1 / (sigma**2 + 1).sqrt()
        sqrt_1ma = sigma * sqrt_a
        if self.prediction == "eps":
            return self.noise
        return sqrt_a * self.noise - sqrt_1ma * self.x0  # v = sqrt(a) eps - sqrt(1-a) x0


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("t", [0.0, 137.0, 500.5, 999.0])
def test_denoised_is_x0_for_a_perfect_model(prediction, t):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    sigma = float(t_to_sigma(torch.tensor(t, dtype=torch.float64), TABLE))
    unet = OracleUNet(x0, noise, prediction)
    x = x0 + sigma * noise
    out = Denoiser(unet, prediction=prediction)(x, sigma, torch.zeros(2, 1, 4))
    torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-4)
    x_in, t_seen = unet.seen[0]
    # the UNet sees the variance-preserving input sqrt(a) x0 + sqrt(1-a) eps at its own timestep
    torch.testing.assert_close(x_in, x / math.sqrt(sigma**2 + 1))
    torch.testing.assert_close(t_seen, torch.full((2,), t), rtol=0, atol=1e-3)


def test_sigma_t_round_trip_and_clamping():
    t = torch.tensor([0.0, 0.25, 1.0, 410.7, 998.5, 999.0], dtype=torch.float64)
    torch.testing.assert_close(sigma_to_t(t_to_sigma(t, TABLE), TABLE), t)
    integer = torch.tensor([0, 1, 500, 999])
    torch.testing.assert_close(sigma_to_t(TABLE[integer], TABLE), integer.double())
    assert float(sigma_to_t(torch.tensor(1e-4), TABLE)) == 0.0
    assert float(sigma_to_t(torch.tensor(100.0), TABLE)) == 999.0


def test_unknown_prediction_names_the_value():
    with pytest.raises(ClipDiffusionError, match="unknown prediction 'x0'"):
        Denoiser(torch.nn.Identity(), prediction="x0")


class CountingDenoiser:
    """An affine function of x, sigma and the mean context, so guidance algebra is checkable."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, context, y=None, attention_recorder=None):
        self.calls.append((x.shape[0], context.shape[1]))
        if attention_recorder is not None:
            attention_recorder("layer", context[:, None, None, :, 0].expand(-1, 2, 5, -1))  # [B,heads,HW,T]
        return x * 0.5 + context.mean(dim=(1, 2)).view(-1, 1, 1, 1) + sigma.view(-1, 1, 1, 1)


def test_cfg_combines_uncond_and_cond_and_batches_equal_lengths():
    d = CountingDenoiser()
    x = torch.randn(2, 4, 3, 3)
    cond, uncond = torch.full((2, 77, 8), 1.0), torch.full((2, 77, 8), -1.0)
    recorded = []
    cfg = CFGDenoiser(d, cond, uncond, guidance=7.5)
    cfg.attention_recorder = lambda name, probs: recorded.append(probs)
    out = cfg(x, torch.tensor([2.0, 2.0]))
    u, c = x * 0.5 - 1 + 2, x * 0.5 + 1 + 2
    torch.testing.assert_close(out, u + 7.5 * (c - u))
    assert d.calls == [(4, 77)]  # one batched call
    assert recorded[0].shape == (2, 2, 5, 77) and bool((recorded[0] == 1.0).all())  # cond rows only


def test_cfg_runs_unequal_lengths_separately_and_skips_uncond_at_guidance_one():
    d = CountingDenoiser()
    x = torch.randn(1, 4, 3, 3)
    cond, uncond = torch.ones(1, 154, 8), -torch.ones(1, 77, 8)
    out = CFGDenoiser(d, cond, uncond, guidance=3.0)(x, torch.tensor([1.0]))
    assert sorted(d.calls) == [(1, 77), (1, 154)]
    torch.testing.assert_close(out, (x * 0.5) + 1 + (-1 + 3 * 2))
    d.calls.clear()
    CFGDenoiser(d, cond, uncond, guidance=1.0)(x, torch.tensor([1.0]))
    assert d.calls == [(1, 154)]


def test_cfg_batched_equals_separate_on_a_tiny_unet():
    from clipdiffusion.diffusion.unet import TINY, UNetModel

    torch.manual_seed(0)
    den = Denoiser(UNetModel(TINY).eval())
    x = torch.randn(1, 4, 8, 8) * 3
    cond, uncond = torch.randn(1, 77, 32), torch.randn(1, 77, 32)
    sigma = torch.tensor([3.0])
    with torch.no_grad():
        batched = CFGDenoiser(den, cond, uncond, guidance=5.0)(x, sigma)
        c, u = den(x, sigma, cond), den(x, sigma, uncond)
    # tolerance: batch-size-dependent float32 kernels
    torch.testing.assert_close(batched, u + 5.0 * (c - u), rtol=1e-4, atol=1e-4)
