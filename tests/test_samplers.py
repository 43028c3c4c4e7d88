"""Samplers on an analytic denoiser, and schedules against diffusers' schedulers.

The data distribution is a Gaussian N(mu, s^2) per element, so the exact denoiser is closed-form:
E[x0 | x0 + sigma n = x] = mu + s^2 / (s^2 + sigma^2) (x - mu), and the probability-flow ODE from sigma_max to 0
maps x_T to mu + s / sqrt(s^2 + sigma_max^2) (x_T - mu).
"""

import math

import pytest
import torch

from clipdiffusion.diffusion.denoiser import sd_alphas_cumprod, sigmas_from_alphas_cumprod
from clipdiffusion.diffusion.samplers import (
    SAMPLERS,
    SCHEDULES,
    get_sampler,
    get_schedule,
    get_sigmas_ddim,
    get_sigmas_karras,
    get_sigmas_normal,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
)
from clipdiffusion.errors import ClipDiffusionError

MU, S = 0.7, 0.5
TABLE = sigmas_from_alphas_cumprod(sd_alphas_cumprod())


def gaussian_denoiser(x, sigma):
    s2 = S**2
    sigma = sigma.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return MU + s2 / (s2 + sigma**2) * (x - MU)


def start(n=20000, seed=0, sigma_max=None):
    sigma_max = float(TABLE[-1]) if sigma_max is None else sigma_max
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((4, n // 4), generator=g, dtype=torch.float64)
    return MU + math.sqrt(S**2 + sigma_max**2) * noise, g


def exact_ode(x_T, sigma_max):
    return MU + S / math.sqrt(S**2 + sigma_max**2) * (x_T - MU)


# LCM (re-noising, not a solver of the flow: it does not reach the data distribution with an exact denoiser) and
# the SDE samplers (Brownian noise; 2M SDE needs more than 100 "normal" steps) are checked in test_samplers_more.py
@pytest.mark.parametrize("name", sorted(set(SAMPLERS) - {"lcm", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun"}))
@pytest.mark.parametrize("schedule", ["normal", "karras"])
def test_samplers_reach_the_data_distribution(name, schedule):
    sigmas = get_schedule(schedule)(TABLE, 100).double()
    x, g = start(sigma_max=float(sigmas[0]))
    out = SAMPLERS[name](gaussian_denoiser, x, sigmas, generator=g)
    assert abs(out.mean().item() - MU) < 0.03
    assert abs(out.std().item() - S) < 0.03


def ode_error(sampler, steps):
    sigmas = get_sigmas_karras(steps, 0.03, 14.6).double()
    x, _ = start(n=4000)
    out = sampler(gaussian_denoiser, x, sigmas)
    return (out - exact_ode(x, 14.6)).abs().max().item()


def test_ode_samplers_follow_the_exact_flow_with_their_order_of_accuracy():
    # doubling the steps halves a first-order method's error and quarters (or better) a second-order one's
    e_euler = [ode_error(sample_euler, n) for n in (10, 20)]
    assert 1.7 < e_euler[0] / e_euler[1] < 2.3
    for sampler in (sample_heun, sample_dpmpp_2m):
        e = [ode_error(sampler, n) for n in (20, 40)]
        assert e[0] / e[1] > 3.5, sampler.__name__
        assert e[1] < 0.01 < e_euler[1]


def test_ancestral_noise_comes_from_the_generator_rows():
    sigmas = get_sigmas_normal(TABLE, 5).double()
    x = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    run = lambda gens: sample_euler_ancestral(gaussian_denoiser, x, sigmas, generator=gens)
    a = run([torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    b = run([torch.Generator().manual_seed(1), torch.Generator().manual_seed(3)])
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])
    single = sample_euler_ancestral(gaussian_denoiser, x[:1], sigmas, generator=[torch.Generator().manual_seed(1)])
    assert torch.equal(single[0], a[0])


def test_callback_and_should_stop():
    sigmas = get_sigmas_normal(TABLE, 6)
    x, _ = start(n=64)
    seen = []
    sample_euler(gaussian_denoiser, x.float(), sigmas, callback=lambda i, n, lat: seen.append((i, n, lat.shape)))
    assert [s[:2] for s in seen] == [(i, 6) for i in range(1, 7)]
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 2

    den = []
    out = sample_euler(lambda x, s: den.append(gaussian_denoiser(x, s)) or den[-1], x.float(), sigmas,
                       should_stop=stop)
    assert len(den) == 2 and torch.equal(out, den[-1])  # interrupted: the latest denoised estimate comes back


def test_unknown_names_list_the_choices():
    with pytest.raises(ClipDiffusionError, match=r"unknown sampler 'eulr'; choose from euler, euler_a"):
        get_sampler("eulr")
    with pytest.raises(ClipDiffusionError, match=r"unknown schedule 'foo'; choose from normal, karras"):
        get_schedule("foo")


# ---- schedules vs diffusers --------------------------------------------------------------------------------------

diffusers = pytest.importorskip("diffusers")
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_training_sigma_range():
    assert math.isclose(float(TABLE[0]), 0.029167, rel_tol=1e-4)
    assert math.isclose(float(TABLE[-1]), 14.6146, rel_tol=1e-4)


@pytest.mark.parametrize("steps", [2, 4, 10, 28])
def test_normal_matches_diffusers_euler_linspace_when_timesteps_are_integers(steps):
    sched = diffusers.EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="linspace")
    sched.set_timesteps(steps)
    # tolerance: diffusers' float32 schedule vs our float64 one
    torch.testing.assert_close(get_sigmas_normal(TABLE, steps), sched.sigmas.float(), rtol=1e-5, atol=1e-6)
    assert math.isclose(float(sched.init_noise_sigma), float(get_sigmas_normal(TABLE, steps)[0]), rel_tol=1e-5)


def test_normal_differs_from_diffusers_only_by_interpolation_between_timesteps():
    # diffusers interpolates sigma linearly in t, k-diffusion log sigma; at 20 steps they differ < 0.5 %
    sched = diffusers.EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="linspace")
    sched.set_timesteps(20)
    torch.testing.assert_close(get_sigmas_normal(TABLE, 20), sched.sigmas.float(), rtol=5e-3, atol=1e-6)


@pytest.mark.parametrize("steps", [3, 8, 20])
def test_karras_matches_diffusers_euler_karras(steps):
    sched = diffusers.EulerDiscreteScheduler(**SD_SCHEDULE, use_karras_sigmas=True)
    sched.set_timesteps(steps)
    torch.testing.assert_close(SCHEDULES["karras"](TABLE, steps), sched.sigmas.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("steps", [4, 10])
def test_ddim_schedule_matches_diffusers_ddim_leading_timesteps(steps):
    sched = diffusers.DDIMScheduler(**SD_SCHEDULE, steps_offset=1, set_alpha_to_one=True, clip_sample=False)
    sched.set_timesteps(steps)
    expected = TABLE[sched.timesteps]
    torch.testing.assert_close(get_sigmas_ddim(TABLE, steps)[:-1], expected.float())
    assert get_sigmas_ddim(TABLE, steps)[-1] == 0


def test_ddim_schedule_never_repeats_a_timestep():
    sigmas = get_sigmas_ddim(TABLE, 1000)
    assert bool((sigmas[:-1] > sigmas[1:]).all())
    x, _ = start(n=64)
    out = sample_dpmpp_2m(gaussian_denoiser, x, sigmas.double())
    assert torch.isfinite(out).all()
