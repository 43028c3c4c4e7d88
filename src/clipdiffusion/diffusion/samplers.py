"""Samplers as pure functions over a denoiser D(x, sigma) -> denoised, and noise schedules as separate functions.

Every sampler has the signature ``sample_<name>(denoiser, x, sigmas, *, generator=None, callback=None,
should_stop=None) -> x``: ``x`` is the starting latent already scaled to ``sigmas[0]``, ``sigmas`` is decreasing
and ends with 0. The formulation is k-diffusion's (variance-exploding, x = x0 + sigma * noise), so the same
functions serve eps- and v-prediction models through ``denoiser.Denoiser``.

``generator`` is a CPU ``torch.Generator`` or a list of them, one per batch row (diffusers' convention), for the
ancestral noise. ``callback(step, total, x)`` runs after each step (step counts from 1). ``should_stop()`` is
polled before each step; when it says True the sampler returns its latest denoised estimate.
"""

from __future__ import annotations

import math

import torch

from ..errors import ClipDiffusionError
from .denoiser import t_to_sigma


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


# ---- schedules ---------------------------------------------------------------------------------------------------

def get_sigmas_normal(denoiser_sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    """k-diffusion's discrete schedule (``DiscreteSchedule.get_sigmas``): timesteps evenly spaced from the last to
    the first training step, log-linear sigma interpolation between integer timesteps, then 0.

    diffusers' ``EulerDiscreteScheduler(timestep_spacing="linspace")`` uses the same timesteps but interpolates
    sigma linearly; the two agree exactly when every timestep is an integer ((steps - 1) divides len - 1).
    """
    t = torch.linspace(len(denoiser_sigmas) - 1, 0, steps, dtype=torch.float64)
    return _append_zero(t_to_sigma(t, denoiser_sigmas)).float()


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: sigmas evenly spaced in sigma^(1/rho) from sigma_max to sigma_min, then 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho).float()


def get_sigmas_ddim(denoiser_sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    """DDIM's uniform integer timesteps (Song et al. 2021), as SD uses them: t = 1 + k * (N // steps),
    k = 0..steps-1 (diffusers ``timestep_spacing="leading", steps_offset=1``; A1111's "DDIM" schedule), then 0.

    diffusers' DDIMScheduler with ``set_alpha_to_one=False`` (the SD scheduler config) ends at sigma(t=0) instead
    of 0 and so leaves a trace of noise in the result; this schedule ends at 0 like A1111.
    """
    ratio = max(len(denoiser_sigmas) // steps, 1)
    # unique: with steps >= N the clamp would repeat the last timestep, a zero-length step
    t = torch.unique((torch.arange(steps) * ratio + 1).clamp(max=len(denoiser_sigmas) - 1)).flip(0)
    return _append_zero(denoiser_sigmas[t]).float()


def _karras_from_table(denoiser_sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    return get_sigmas_karras(steps, float(denoiser_sigmas[0]), float(denoiser_sigmas[-1]))


# name -> (denoiser_sigmas, steps) -> sigmas. Feeds the CLI choices and the error messages.
SCHEDULES = {
    "normal": get_sigmas_normal,
    "karras": _karras_from_table,
    "ddim": get_sigmas_ddim,
}


def get_schedule(name: str):
    try:
        return SCHEDULES[name]
    except (KeyError, TypeError):
        raise ClipDiffusionError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}") from None


# ---- helpers -----------------------------------------------------------------------------------------------------

def _randn_like(x: torch.Tensor, generator) -> torch.Tensor:
    """Noise drawn on the CPU so that a seed means the same image on every device."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
        rows = [torch.randn((1, *x.shape[1:]), generator=g, dtype=x.dtype) for g in generator]
        return torch.cat(rows).to(x.device)
    return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)


def _to_d(x, sigma, denoised):
    """The probability-flow ODE derivative dx/dsigma (Karras et al. 2022, eq. 3 with sigma(t) = t)."""
    return (x - denoised) / sigma


def _ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step to sigma_to into a deterministic step to sigma_down plus fresh noise of size sigma_up, so the
    marginal variance is sigma_to^2. eta=1 is ancestral DDPM sampling; eta=0 is the ODE."""
    if sigma_to == 0 or eta == 0:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    sigma_down = math.sqrt(sigma_to**2 - sigma_up**2)
    return sigma_down, sigma_up


class _Loop:
    """Shared step bookkeeping: sigma values as floats, stop polling, callback, last denoised."""

    def __init__(self, x, sigmas, callback, should_stop):
        self.sigmas = [float(s) for s in sigmas]
        self.total = len(self.sigmas) - 1
        self.callback = callback
        self.should_stop = should_stop
        self.last_denoised = x
        self.s_in = x.new_ones([x.shape[0]])

    def steps(self):
        for i in range(self.total):
            if self.should_stop is not None and self.should_stop():
                return
            yield i, self.sigmas[i], self.sigmas[i + 1]

    def denoise(self, denoiser, x, sigma):
        self.last_denoised = denoiser(x, sigma * self.s_in)
        return self.last_denoised

    def done(self, i, x):
        if self.callback is not None:
            self.callback(i + 1, self.total, x)


def _finish(loop: _Loop, x, completed: int):
    # Interrupted: the current x still carries noise; the denoised estimate is the useful image.
    return x if completed == loop.total else loop.last_denoised


# ---- samplers ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_euler(denoiser, x, sigmas, *, generator=None, callback=None, should_stop=None):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without the 2nd-order
    correction and without churn)."""
    loop, completed = _Loop(x, sigmas, callback, should_stop), 0
    for i, sigma, sigma_next in loop.steps():
        denoised = loop.denoise(denoiser, x, sigma)
        x = x + _to_d(x, sigma, denoised) * (sigma_next - sigma)
        completed = i + 1
        loop.done(i, x)
    return _finish(loop, x, completed)


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, *, generator=None, callback=None, should_stop=None, eta=1.0):
    """Ancestral sampling with Euler steps (Karras et al. 2022 describe the split; with eta=1 each step is the
    DDPM ancestral step of Ho et al. 2020): step deterministically to sigma_down, then add fresh noise sigma_up."""
    loop, completed = _Loop(x, sigmas, callback, should_stop), 0
    for i, sigma, sigma_next in loop.steps():
        denoised = loop.denoise(denoiser, x, sigma)
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next, eta)
        x = x + _to_d(x, sigma, denoised) * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + _randn_like(x, generator) * sigma_up
        completed = i + 1
        loop.done(i, x)
    return _finish(loop, x, completed)


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, generator=None, callback=None, should_stop=None):
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1): an Euler step, then the trapezoidal correction
    with the derivative at the end point; the last step to sigma = 0 is plain Euler (no derivative at 0)."""
    loop, completed = _Loop(x, sigmas, callback, should_stop), 0
    for i, sigma, sigma_next in loop.steps():
        denoised = loop.denoise(denoiser, x, sigma)
        d = _to_d(x, sigma, denoised)
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = _to_d(x_2, sigma_next, loop.denoise(denoiser, x_2, sigma_next))
            x = x + (d + d_2) / 2 * dt
        completed = i + 1
        loop.done(i, x)
    return _finish(loop, x, completed)


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, *, generator=None, callback=None, should_stop=None):
    """DPM-Solver++(2M), Lu et al. 2022 ("DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
    Models", Algorithm 2), in k-diffusion's sigma form: exponential integrator in lambda = -log sigma with a
    multistep 2nd-order correction from the previous denoised; first order on the first step and on the last
    step to sigma = 0 (where it returns the denoised estimate exactly)."""
    loop, completed = _Loop(x, sigmas, callback, should_stop), 0
    old_denoised, h_last = None, None
    for i, sigma, sigma_next in loop.steps():
        denoised = loop.denoise(denoiser, x, sigma)
        if sigma_next == 0:
            x = denoised
        elif sigma_next != sigma:
            h = math.log(sigma) - math.log(sigma_next)  # lambda_next - lambda
            if old_denoised is None:
                denoised_d = denoised
            else:
                r = h_last / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - math.expm1(-h) * denoised_d
            h_last = h
        old_denoised = denoised
        completed = i + 1
        loop.done(i, x)
    return _finish(loop, x, completed)


@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, *, generator=None, callback=None, should_stop=None, eta=0.0):
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12) in sigma form:
    x_next = denoised + sigma_down * eps + sigma_up * noise. Dividing eq. 12 by sqrt(alpha_prev) turns DDIM's
    sigma_t(eta) into exactly the ancestral split of ``_ancestral_step``; with eta=0 the update is the same as an
    Euler step, and the method is defined by its schedule (``get_sigmas_ddim``)."""
    loop, completed = _Loop(x, sigmas, callback, should_stop), 0
    for i, sigma, sigma_next in loop.steps():
        denoised = loop.denoise(denoiser, x, sigma)
        eps = (x - denoised) / sigma
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next, eta)
        x = denoised + eps * sigma_down
        if sigma_up > 0:
            x = x + _randn_like(x, generator) * sigma_up
        completed = i + 1
        loop.done(i, x)
    return _finish(loop, x, completed)


# name -> sampler. Feeds the CLI choices and the error messages; infotext.py maps these to A1111 display names.
SAMPLERS = {
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "ddim": sample_ddim,
}


def get_sampler(name: str):
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        raise ClipDiffusionError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}") from None
