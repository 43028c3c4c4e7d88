"""The UNet wrapped once into a denoiser D(x, sigma) -> denoised, and classifier-free guidance as a second wrapper.

Samplers work in k-diffusion's variance-exploding form (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models"): x = x0 + sigma * noise. A Stable Diffusion UNet was trained in the
variance-preserving form x_t = sqrt(a) x0 + sqrt(1 - a) noise at integer timesteps t with a = alphas_cumprod[t].
Both describe the same states: sigma = sqrt((1 - a) / a) and x_t = x / sqrt(sigma^2 + 1). This module hides that
mapping, the eps / v parameterizations and the sigma <-> timestep interpolation, following k-diffusion's
``external.DiscreteSchedule`` / ``CompVisDenoiser`` / ``CompVisVDenoiser``.
"""

from __future__ import annotations

import math

import torch

from ..errors import ClipDiffusionError

PREDICTIONS = ("eps", "v")


def sd_alphas_cumprod(steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """The SD 1/2/XL training schedule: LDM "linear" (diffusers "scaled_linear"), betas linear in sqrt(beta).

    Computed in float64 so sigma_max (~14.6146) and sigma_min (~0.029167) carry no float32 cumprod drift.
    """
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    return ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()


def sigma_to_t(sigma: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Continuous timestep for sigma, interpolating linearly in log sigma between the table's neighbours.

    ``sigmas`` is the increasing per-timestep table. Values outside the table clamp to t = 0 or t = len - 1, as in
    k-diffusion's ``DiscreteSchedule.sigma_to_t``.
    """
    log_sigmas = sigmas.log()
    log_sigma = torch.as_tensor(sigma, dtype=log_sigmas.dtype, device=log_sigmas.device).log()
    low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
    return low.to(log_sigmas.dtype) + w


def t_to_sigma(t: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Inverse of ``sigma_to_t``: log sigma is linear between integer timesteps."""
    log_sigmas = sigmas.log()
    t = torch.as_tensor(t, dtype=log_sigmas.dtype, device=log_sigmas.device).clamp(0, len(log_sigmas) - 1)
    low = t.floor().long().clamp(max=len(log_sigmas) - 2)
    w = t - low
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp()


def _unet_dtype(unet) -> torch.dtype:
    for p in unet.parameters():
        return p.dtype
    return torch.float32


class Denoiser:
    """D(x, sigma) -> denoised for a discrete-time eps- or v-prediction UNet.

    ``alphas_cumprod`` defaults to the SD schedule. ``sigmas`` (increasing, one per training timestep) is what the
    schedules in ``samplers`` read.
    """

    def __init__(self, unet, alphas_cumprod=None, prediction: str = "eps"):
        if prediction not in PREDICTIONS:
            raise ClipDiffusionError(f"unknown prediction {prediction!r}; choose from {', '.join(PREDICTIONS)}")
        self.unet = unet
        self.prediction = prediction
        if alphas_cumprod is None:
            alphas_cumprod = sd_alphas_cumprod()
        self.sigmas = sigmas_from_alphas_cumprod(alphas_cumprod)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma):
        return sigma_to_t(sigma, self.sigmas)

    def t_to_sigma(self, t):
        return t_to_sigma(t, self.sigmas)

    def __call__(self, x, sigma, context, y=None, attention_recorder=None):
        """x [B,C,H,W] at noise level sigma (scalar or [B]) -> denoised [B,C,H,W] in x's dtype."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        timesteps = self.sigma_to_t(sigma).to(device=x.device, dtype=torch.float32)
        s = sigma.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)  # [B,1,1,1]
        c_in = 1.0 / (s**2 + 1.0).sqrt()
        dtype = _unet_dtype(self.unet)
        kwargs = {"attention_recorder": attention_recorder} if attention_recorder is not None else {}
        out = self.unet(
            (x * c_in).to(dtype),
            timesteps,
            context.to(dtype),
            None if y is None else y.to(dtype),
            **kwargs,
        ).to(x.dtype)
        if self.prediction == "eps":
            return x - s * out
        # v = sqrt(a) eps - sqrt(1-a) x0 in VP units; in sigma units that gives these scalings (sigma_data = 1).
        c_skip = 1.0 / (s**2 + 1.0)
        c_out = -s / (s**2 + 1.0).sqrt()
        return x * c_skip + out * c_out


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022): uncond + guidance * (cond - uncond), as a D(x, sigma).

    Cond and uncond run as one batch when their token lengths match. When they differ (a long prompt against a
    short negative prompt) they run as two UNet calls, which is exact; padding either side would change results.
    With guidance 1 (or no negative context) uncond is not computed at all. The attention recorder, when given,
    sees only the cond half.

    One fixed cond/uncond pair. The pipeline samples with ``scheduled.ScheduledCFGDenoiser`` (prompt editing,
    alternation, AND), which for a plain prompt makes these very calls with this very arithmetic (bit-identical
    images, checked in tests/test_scheduled_sampling.py).
    """

    def __init__(self, denoiser, context, negative_context=None, guidance: float = 7.0, y=None, negative_y=None):
        self.denoiser = denoiser
        self.context = context
        self.negative_context = negative_context
        self.guidance = float(guidance)
        self.y = y
        self.negative_y = negative_y
        self.attention_recorder = None

    @property
    def sigmas(self):
        return self.denoiser.sigmas

    def _cond_only(self) -> bool:
        return self.negative_context is None or math.isclose(self.guidance, 1.0)

    def __call__(self, x, sigma):
        recorder = self.attention_recorder
        if self._cond_only():
            return self.denoiser(x, sigma, self.context, self.y, attention_recorder=recorder)
        B = x.shape[0]
        sigma = torch.as_tensor(sigma)
        if sigma.ndim == 0:
            sigma = sigma.expand(B)
        if self.context.shape[1] == self.negative_context.shape[1]:
            # uncond first, as diffusers orders its batch
            context = torch.cat([self.negative_context, self.context])
            y = None if self.y is None else torch.cat([self.negative_y, self.y])
            cond_recorder = None
            if recorder is not None:

                def cond_recorder(name, probs):  # probs [2B,heads,HW,T]: keep the cond rows
                    recorder(name, probs[B:])

            both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), context, y,
                                 attention_recorder=cond_recorder)
            uncond, cond = both[:B], both[B:]
        else:
            uncond = self.denoiser(x, sigma, self.negative_context, self.negative_y)
            cond = self.denoiser(x, sigma, self.context, self.y, attention_recorder=recorder)
        return uncond + self.guidance * (cond - uncond)
