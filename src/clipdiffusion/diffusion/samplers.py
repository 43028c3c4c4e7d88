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
from dataclasses import dataclass

import torch

from ..errors import ClipDiffusionError
from .denoiser import t_to_sigma
from .samplers_noise import BrownianNoise, GeneratorNoise, randn_like as _randn_like, row_seeds


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


def get_sigmas_exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Sigmas evenly spaced in log sigma from sigma_max to sigma_min, then 0 (k-diffusion
    ``get_sigmas_exponential``; A1111 "Exponential")."""
    log_sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64)
    return _append_zero(log_sigmas.exp()).float()


def get_sigmas_polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    """log sigma = log sigma_min + ramp^rho (log sigma_max - log sigma_min) with ramp from 1 to 0, then 0
    (k-diffusion ``get_sigmas_polyexponential``; A1111 "Polyexponential", rho 1 = exponential)."""
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    log_min, log_max = math.log(sigma_min), math.log(sigma_max)
    return _append_zero((ramp * (log_max - log_min) + log_min).exp()).float()


def get_sigmas_sgm_uniform(denoiser_sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    """SGM's discretization (A1111/ComfyUI "SGM Uniform"): ``steps + 1`` timesteps evenly spaced from the last
    training timestep to the first, the last dropped, sigma interpolated in log sigma, then 0."""
    t = torch.linspace(len(denoiser_sigmas) - 1, 0, steps + 1, dtype=torch.float64)[:-1]
    return _append_zero(t_to_sigma(t, denoiser_sigmas)).float()


def get_sigmas_kl_optimal(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """The KL-optimal schedule (Sabour et al. 2024, "Align Your Steps", eq. for the Gaussian case): sigmas evenly
    spaced in arctan(sigma) from sigma_max to sigma_min, then 0. A1111's ``kl_optimal`` returns the n + 1 values
    ending at sigma_min (the image keeps sigma_min of noise); we end at 0 like every other schedule (ComfyUI
    does the same)."""
    i = torch.arange(n, dtype=torch.float64) / max(n - 1, 1)
    a_min, a_max = math.atan(sigma_min), math.atan(sigma_max)
    return _append_zero(torch.tan(i * a_min + (1 - i) * a_max)).float()


def get_sigmas_simple(denoiser_sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    """ComfyUI's "simple" (A1111 "Simple"): every (len/steps)-th training sigma counted down from the last,
    truncated to an integer index, then 0."""
    stride = len(denoiser_sigmas) / steps
    index = [len(denoiser_sigmas) - 1 - int(k * stride) for k in range(steps)]
    return _append_zero(denoiser_sigmas[index]).float()


def get_sigmas_lcm(denoiser_sigmas: torch.Tensor, steps: int, original_steps: int = 50) -> torch.Tensor:
    """The LCM timesteps (diffusers ``LCMScheduler.set_timesteps``, strength 1): the distillation grid
    k - 1, 2k - 1, ..., N - 1 (k = N // original_steps, N training steps), ``steps`` of them taken from the top
    at floor(linspace) indices, as sigmas, then 0."""
    k = max(len(denoiser_sigmas) // original_steps, 1)
    grid = [(j + 1) * k - 1 for j in range(len(denoiser_sigmas) // k)][::-1]
    picks = [grid[int(math.floor(j * len(grid) / steps))] for j in range(min(steps, len(grid)))]
    return _append_zero(denoiser_sigmas[picks]).float()


def _from_range(fn):
    def schedule(denoiser_sigmas: torch.Tensor, steps: int) -> torch.Tensor:
        return fn(steps, float(denoiser_sigmas[0]), float(denoiser_sigmas[-1]))

    schedule.__name__ = f"{fn.__name__}_from_table"
    schedule.__doc__ = fn.__doc__
    return schedule


# name -> (denoiser_sigmas, steps) -> sigmas. Feeds the CLI choices and the error messages. A1111's "Uniform" and
# "Normal" are both our "normal" (server/sampler_names.py); "Align Your Steps" (tabulated per model family),
# "Beta" (needs the inverse regularized incomplete beta function) and "Karras Exponential" are not implemented.
SCHEDULES = {
    "normal": get_sigmas_normal,
    "karras": _karras_from_table,
    "ddim": get_sigmas_ddim,
    "exponential": _from_range(get_sigmas_exponential),
    "polyexponential": _from_range(get_sigmas_polyexponential),
    "sgm_uniform": get_sigmas_sgm_uniform,
    "kl_optimal": _from_range(get_sigmas_kl_optimal),
    "simple": get_sigmas_simple,
    "lcm": get_sigmas_lcm,
}


def get_schedule(name: str):
    try:
        return SCHEDULES[name]
    except (KeyError, TypeError):
        raise ClipDiffusionError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}") from None


# ---- helpers -----------------------------------------------------------------------------------------------------


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


# ---- more k-diffusion samplers (A1111's list) ----------------------------------------------------------------------

def _noise_or(noise_sampler, x, generator):
    return GeneratorNoise(x, generator) if noise_sampler is None else noise_sampler


def _brownian_or(noise_sampler, x, sigmas, generator):
    """The SDE samplers' default noise: one Brownian path per row over the schedule's (smallest positive, largest)
    sigma, seeded from each row's generator seed (``samplers_noise.BrownianNoise``)."""
    if noise_sampler is not None:
        return noise_sampler
    positive = [float(s) for s in sigmas if float(s) > 0]
    lo, hi = min(positive), max(positive)
    if not hi > lo:  # one step: any interval holding the one level serves
        lo = hi / 2
    return BrownianNoise(x, lo, hi, row_seeds(generator, x.shape[0]))


def _lms_coefficient(ts: list[float], i: int, j: int, order: int) -> float:
    """Integral over [ts[i], ts[i+1]] of the Lagrange basis polynomial that is 1 at ts[i-j] and 0 at the other
    nodes ts[i-k], k < order (exact: the polynomial is integrated term by term)."""
    poly = [1.0]  # coefficients, lowest degree first
    for k in range(order):
        if k == j:
            continue
        denom = ts[i - j] - ts[i - k]
        # multiply by (tau - ts[i-k]) / denom
        shifted = [0.0] + poly
        scaled = [-ts[i - k] * c for c in poly] + [0.0]
        poly = [(a + b) / denom for a, b in zip(shifted, scaled)]
    a, b = ts[i], ts[i + 1]
    return sum(c * (b ** (n + 1) - a ** (n + 1)) / (n + 1) for n, c in enumerate(poly))


@torch.no_grad()
def sample_lms(denoiser, x, sigmas, *, generator=None, callback=None, should_stop=None, order=4):
    """Linear multistep (Adams-Bashforth in sigma) on the probability-flow ODE, order 4 with lower orders while the
    history fills (k-diffusion ``sample_lms``; A1111 "LMS"). The coefficients integrate the Lagrange polynomial
    through the last ``order`` derivatives over the step, exactly."""
    loop, completed = _Loop(x, sigmas, callback, should_stop), 0
    ds = []
    for i, sigma, sigma_next in loop.steps():
        denoised = loop.denoise(denoiser, x, sigma)
        ds.append(_to_d(x, sigma, denoised))
        del ds[:-order]
        cur = min(i + 1, order)
        coeffs = [_lms_coefficient(loop.sigmas, i, j, cur) for j in range(cur)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        completed = i + 1
        loop.done(i, x)
    return _finish(loop, x, completed)


def _log_midpoint(a: float, b: float) -> float:
    return math.exp((math.log(a) + math.log(b)) / 2)


@torch.no_grad()
def sample_dpm2(denoiser, x, sigmas, *, generator=None, callback=None, should_stop=None):
    """DPM-Solver-2 steps in sigma (k-diffusion ``sample_dpm_2``, without churn; A1111 "DPM2"): an Euler half step
    to the geometric midpoint sigma_mid = sqrt(sigma sigma_next), then the full step with the midpoint's
    derivative; the last step to 0 is Euler. A1111 drops the next-to-last sigma of the schedule for it
    (``sampler_sigmas``)."""
    loop, completed = _Loop(x, sigmas, callback, should_stop), 0
    for i, sigma, sigma_next in loop.steps():
        denoised = loop.denoise(denoiser, x, sigma)
        d = _to_d(x, sigma, denoised)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
        else:
            sigma_mid = _log_midpoint(sigma, sigma_next)
            x_2 = x + d * (sigma_mid - sigma)
            d_2 = _to_d(x_2, sigma_mid, loop.denoise(denoiser, x_2, sigma_mid))
            x = x + d_2 * (sigma_next - sigma)
        completed = i + 1
        loop.done(i, x)
    return _finish(loop, x, completed)


@torch.no_grad()
def sample_dpm2_ancestral(denoiser, x, sigmas, *, generator=None, callback=None, should_stop=None, eta=1.0,
                          noise_sampler=None):
    """Ancestral sampling with DPM-Solver-2 steps (k-diffusion ``sample_dpm_2_ancestral``; A1111 "DPM2 a"): the
    DPM2 step to sigma_down, then noise of size sigma_up (``_ancestral_step``)."""
    noise = _noise_or(noise_sampler, x, generator)
    loop, completed = _Loop(x, sigmas, callback, should_stop), 0
    for i, sigma, sigma_next in loop.steps():
        denoised = loop.denoise(denoiser, x, sigma)
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next, eta)
        d = _to_d(x, sigma, denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma)
        else:
            sigma_mid = _log_midpoint(sigma, sigma_down)
            x_2 = x + d * (sigma_mid - sigma)
            d_2 = _to_d(x_2, sigma_mid, loop.denoise(denoiser, x_2, sigma_mid))
            x = x + d_2 * (sigma_down - sigma)
            x = x + noise(sigma, sigma_next) * sigma_up
        completed = i + 1
        loop.done(i, x)
    return _finish(loop, x, completed)


def _exp_step(x, sigma: float, sigma_to: float, denoised):
    """The first-order exponential-integrator step in lambda = -log sigma from sigma to sigma_to with the data
    prediction held fixed: (sigma_to / sigma) x - expm1(-h) denoised, h = log(sigma / sigma_to)."""
    h = math.log(sigma) - math.log(sigma_to)
    return (sigma_to / sigma) * x - math.expm1(-h) * denoised


@torch.no_grad()
def sample_dpmpp_2s_ancestral(denoiser, x, sigmas, *, generator=None, callback=None, should_stop=None, eta=1.0,
                              noise_sampler=None):
    """Ancestral sampling with DPM-Solver++(2S) steps (Lu et al. 2022, single-step 2nd order; k-diffusion
    ``sample_dpmpp_2s_ancestral``; A1111 "DPM++ 2S a"): to sigma_down through the lambda midpoint, then noise of
    size sigma_up; Euler on the last step."""
    noise = _noise_or(noise_sampler, x, generator)
    loop, completed = _Loop(x, sigmas, callback, should_stop), 0
    for i, sigma, sigma_next in loop.steps():
        denoised = loop.denoise(denoiser, x, sigma)
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = x + _to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            sigma_s = _log_midpoint(sigma, sigma_down)  # lambda midpoint (r = 1/2)
            x_2 = _exp_step(x, sigma, sigma_s, denoised)
            denoised_2 = loop.denoise(denoiser, x_2, sigma_s)
            x = _exp_step(x, sigma, sigma_down, denoised_2)
        if sigma_next > 0:
            x = x + noise(sigma, sigma_next) * sigma_up
        completed = i + 1
        loop.done(i, x)
    return _finish(loop, x, completed)


@torch.no_grad()
def sample_dpmpp_sde(denoiser, x, sigmas, *, generator=None, callback=None, should_stop=None, eta=1.0,
                     noise_sampler=None, r=0.5):
    """DPM-Solver++ (stochastic, single-step 2nd order; k-diffusion ``sample_dpmpp_sde``; A1111 "DPM++ SDE"): an
    ancestral exponential step to the lambda point s = t + r h, then the full ancestral step with the blended data
    prediction (1 - 1/(2r)) D_t + 1/(2r) D_s. Noise is Brownian by default (``_brownian_or``)."""
    noise = _brownian_or(noise_sampler, x, sigmas, generator)
    loop, completed = _Loop(x, sigmas, callback, should_stop), 0
    fac = 1 / (2 * r)
    for i, sigma, sigma_next in loop.steps():
        denoised = loop.denoise(denoiser, x, sigma)
        if sigma_next == 0:
            x = x + _to_d(x, sigma, denoised) * (sigma_next - sigma)
        else:
            h = math.log(sigma) - math.log(sigma_next)
            sigma_s = math.exp(-(-math.log(sigma) + r * h))
            sd, su = _ancestral_step(sigma, sigma_s, eta)
            x_2 = _exp_step(x, sigma, sd, denoised) + noise(sigma, sigma_s) * su
            denoised_2 = loop.denoise(denoiser, x_2, sigma_s)
            sd, su = _ancestral_step(sigma, sigma_next, eta)
            x = _exp_step(x, sigma, sd, (1 - fac) * denoised + fac * denoised_2)
            x = x + noise(sigma, sigma_next) * su
        completed = i + 1
        loop.done(i, x)
    return _finish(loop, x, completed)


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser, x, sigmas, *, generator=None, callback=None, should_stop=None, eta=1.0,
                        noise_sampler=None, solver_type="midpoint"):
    """DPM-Solver++(2M) SDE (k-diffusion ``sample_dpmpp_2m_sde``; A1111 "DPM++ 2M SDE", midpoint; "heun" is
    A1111's "DPM++ 2M SDE Heun"): the SDE's exponential step with eta h of extra decay, a multistep correction
    from the previous data prediction, and noise sigma_next sqrt(1 - exp(-2 eta h)); the last step to 0 returns
    the denoised estimate. Noise is Brownian by default."""
    if solver_type not in ("midpoint", "heun"):
        raise ClipDiffusionError(f"unknown solver_type {solver_type!r}; choose from midpoint, heun")
    noise = _brownian_or(noise_sampler, x, sigmas, generator)
    loop, completed = _Loop(x, sigmas, callback, should_stop), 0
    old_denoised, h_last = None, None
    for i, sigma, sigma_next in loop.steps():
        denoised = loop.denoise(denoiser, x, sigma)
        h = None
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            eta_h = eta * h
            phi = -math.expm1(-h - eta_h)
            x = (sigma_next / sigma) * math.exp(-eta_h) * x + phi * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + (phi / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * phi * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + noise(sigma, sigma_next) * (sigma_next * math.sqrt(-math.expm1(-2 * eta_h)))
        old_denoised, h_last = denoised, h
        completed = i + 1
        loop.done(i, x)
    return _finish(loop, x, completed)


def sample_dpmpp_2m_sde_heun(denoiser, x, sigmas, *, generator=None, callback=None, should_stop=None, eta=1.0,
                             noise_sampler=None):
    """``sample_dpmpp_2m_sde`` with solver_type "heun" (A1111 "DPM++ 2M SDE Heun")."""
    return sample_dpmpp_2m_sde(denoiser, x, sigmas, generator=generator, callback=callback, should_stop=should_stop,
                               eta=eta, noise_sampler=noise_sampler, solver_type="heun")


@torch.no_grad()
def sample_lcm(denoiser, x, sigmas, *, generator=None, callback=None, should_stop=None, noise_sampler=None):
    """Latent Consistency Model sampling (Luo et al. 2023, multistep consistency sampling; A1111/ComfyUI
    ``sample_lcm``): jump to the model's denoised estimate, then re-noise it to the next sigma with fresh noise.
    Meant for LCM-distilled models (few steps, guidance about 1-2). Not applied here: A1111's LCM denoiser also
    scales the output by LCM's boundary condition (c_skip = 0.25 / ((10 t)^2 + 0.25), below 7e-6 for every
    timestep it uses) and snaps timesteps to the 50-step LCM grid (schedule "lcm" gives those sigmas)."""
    noise = _noise_or(noise_sampler, x, generator)
    loop, completed = _Loop(x, sigmas, callback, should_stop), 0
    for i, sigma, sigma_next in loop.steps():
        x = loop.denoise(denoiser, x, sigma)
        if sigma_next > 0:
            x = x + noise(sigma, sigma_next) * sigma_next
        completed = i + 1
        loop.done(i, x)
    return _finish(loop, x, completed)


def _unipc_update(x, ms, lambdas, lambda_t: float, order: int, variant: str, m_t=None):
    """One UniP predictor step (``m_t`` None) or UniC corrector step (``m_t`` = data prediction at the predicted
    point) from the point s0 = last of ``ms``/``lambdas`` to lambda_t, in sigma form (alpha = 1): Zhao et al. 2023,
    "UniPC", Algorithms 1-2 with B(h) = h (bh1) or expm1(h) (bh2), data prediction."""
    m0, lambda_s0 = ms[-1], lambdas[-1]
    h = lambda_t - lambda_s0
    rks, d1s = [], []
    for k in range(1, order):
        rk = (lambdas[-(k + 1)] - lambda_s0) / h
        rks.append(rk)
        d1s.append((ms[-(k + 1)] - m0) / rk)
    rks.append(1.0)
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rows, b = [], []
    for k in range(1, order + 1):
        rows.append([rk ** (k - 1) for rk in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    x_t = math.exp(hh) * x - h_phi_1 * m0  # sigma_t / sigma_s0 = exp(-h)
    R = torch.tensor(rows, dtype=torch.float64)
    b = torch.tensor(b, dtype=torch.float64)
    if m_t is None:
        if d1s:
            rhos = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
            x_t = x_t - b_h * sum(rho * d for rho, d in zip(rhos, d1s))
        return x_t
    rhos = [0.5] if order == 1 else torch.linalg.solve(R, b).tolist()
    correction = sum(rho * d for rho, d in zip(rhos[:-1], d1s)) if d1s else 0
    return x_t - b_h * (correction + rhos[-1] * (m_t - m0))


@torch.no_grad()
def sample_unipc(denoiser, x, sigmas, *, generator=None, callback=None, should_stop=None, order=3,
                 variant="bh1", lower_order_final=True):
    """UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework"), multistep, data prediction, on
    any sigma schedule: a UniP predictor of ``order`` (lower while the history fills and, with
    ``lower_order_final``, over the last steps) and after every model call a UniC correction of the previous
    prediction with that call's output (no extra model call). A1111's defaults: order 3, variant bh1 (diffusers'
    UniPCMultistepScheduler: order 2, bh2). The last step to sigma = 0 returns the denoised estimate (first order;
    A1111's own UniPC schedule stops at sigma_min instead)."""
    if variant not in ("bh1", "bh2"):
        raise ClipDiffusionError(f"unknown UniPC variant {variant!r}; choose from bh1, bh2")
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 3:
        raise ClipDiffusionError(f"UniPC order must be 1, 2 or 3, got {order!r}")
    loop, completed = _Loop(x, sigmas, callback, should_stop), 0
    ms, lambdas = [], []
    x_s0, prev_order = None, None
    for i, sigma, sigma_next in loop.steps():
        denoised = loop.denoise(denoiser, x, sigma)
        lam = -math.log(sigma)
        if x_s0 is not None:  # UniC: correct the last prediction with the model output at it
            x = _unipc_update(x_s0, ms, lambdas, lam, prev_order, variant, m_t=denoised)
        ms.append(denoised)
        lambdas.append(lam)
        del ms[:-order], lambdas[:-order]
        this_order = min(order, loop.total - i) if lower_order_final else order
        this_order = min(this_order, i + 1)
        x_s0, prev_order = x, this_order
        if sigma_next == 0:
            x = denoised
        else:
            x = _unipc_update(x, ms, lambdas, -math.log(sigma_next), this_order, variant)
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
    "lms": sample_lms,
    "dpm2": sample_dpm2,
    "dpm2_a": sample_dpm2_ancestral,
    "dpmpp_2s_a": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_heun": sample_dpmpp_2m_sde_heun,
    "unipc": sample_unipc,
    "lcm": sample_lcm,
}


@dataclass(frozen=True)
class SamplerTraits:
    """What A1111's sampler options say about a sampler (``sd_samplers_kdiffusion``): ``second_order`` (prompt
    schedules span 2 x steps), ``discard_next_to_last_sigma`` (the schedule is built for steps + 1 and its
    next-to-last sigma dropped), ``noise`` ("none", "ancestral": fresh generator noise per step, "brownian": one
    seeded Brownian path per image)."""

    second_order: bool = False
    discard_next_to_last_sigma: bool = False
    noise: str = "none"


SAMPLER_TRAITS = {
    "euler": SamplerTraits(),
    "euler_a": SamplerTraits(noise="ancestral"),
    "heun": SamplerTraits(second_order=True),
    "dpmpp_2m": SamplerTraits(),
    "ddim": SamplerTraits(),
    "lms": SamplerTraits(),
    "dpm2": SamplerTraits(second_order=True, discard_next_to_last_sigma=True),
    "dpm2_a": SamplerTraits(second_order=True, discard_next_to_last_sigma=True, noise="ancestral"),
    "dpmpp_2s_a": SamplerTraits(second_order=True, noise="ancestral"),
    "dpmpp_sde": SamplerTraits(second_order=True, noise="brownian"),
    "dpmpp_2m_sde": SamplerTraits(noise="brownian"),
    "dpmpp_2m_sde_heun": SamplerTraits(noise="brownian"),
    "unipc": SamplerTraits(),
    "lcm": SamplerTraits(noise="ancestral"),
}


def sampler_sigmas(sampler: str, schedule: str, denoiser_sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    """The sigmas ``sampler`` runs for ``steps`` steps of ``schedule``: the schedule itself, or for the samplers
    A1111 marks ``discard_next_to_last_sigma`` (DPM2, DPM2 a) the schedule of steps + 1 without its
    next-to-last value, so the step count stays ``steps`` and the last step is not a tiny one."""
    make = get_schedule(schedule)
    traits = SAMPLER_TRAITS.get(sampler, SamplerTraits())
    if not traits.discard_next_to_last_sigma:
        return make(denoiser_sigmas, steps)
    sigmas = make(denoiser_sigmas, steps + 1)
    return torch.cat([sigmas[:-2], sigmas[-1:]])


def get_sampler(name: str):
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        raise ClipDiffusionError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}") from None
