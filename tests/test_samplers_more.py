"""The samplers and schedules of issue 20 against their references, on one analytic model function.

The model is the exact denoiser of a per-element two-Gaussian mixture (weights 1/2 at -1 and +1, std 0.3), a
non-linear D(x, sigma), so a sampler that evaluates the model at a wrong point or combines the evaluations wrongly
gives a different result.

References (test-only, ``dev`` extra): k-diffusion 0.1.1 ``sampling.py`` (what A1111 runs; loaded from its file with
its package ``__init__`` and ``utils`` stubbed, because they import torchvision), with scipy and torchsde; diffusers'
UniPCMultistepScheduler and LCMScheduler. SDE and ancestral samplers get one noise sampler injected into both sides
(``BrownianNoise``, deterministic in its arguments), so the comparison is exact; what our Brownian noise shares with
k-diffusion's ``BrownianTreeNoiseSampler`` and what it does not is in ``samplers_noise``'s docstring: the interval,
query points, sign and per-row seeding are checked here, the random values differ by design (torchsde's PRNG).
"""

import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from clipdiffusion.diffusion import samplers as S
from clipdiffusion.diffusion.denoiser import sd_alphas_cumprod, sigmas_from_alphas_cumprod
from clipdiffusion.diffusion.samplers_noise import BrownianNoise, GeneratorNoise
from clipdiffusion.diffusion.scheduled import SECOND_ORDER
from clipdiffusion.request import RequestError
from clipdiffusion.server import sampler_names as names

TABLE = sigmas_from_alphas_cumprod(sd_alphas_cumprod())
SIGMA_MIN, SIGMA_MAX = float(TABLE[0]), float(TABLE[-1])
S2 = 0.3**2


def mixture_denoiser(x, sigma):
    """E[x0 | x] for x0 ~ 1/2 N(-1, 0.3^2) + 1/2 N(1, 0.3^2) per element, x = x0 + sigma n."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    var = S2 + sigma**2
    logits = torch.stack([-((x - m) ** 2) / (2 * var) for m in (-1.0, 1.0)])
    w = torch.softmax(logits, dim=0)
    means = torch.stack([m + S2 / var * (x - m) for m in (-1.0, 1.0)])
    return (w * means).sum(0)


def start(shape=(2, 3, 6, 6), seed=0, sigma=SIGMA_MAX, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0).to(dtype)
    return x0 + sigma * torch.randn(shape, generator=g, dtype=dtype)


# ---- k-diffusion, loaded as a reference ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kd():
    pytest.importorskip("scipy")
    pytest.importorskip("torchsde")
    pytest.importorskip("tqdm")
    spec = importlib.util.find_spec("k_diffusion")  # finds the package without running its __init__
    if spec is None or spec.origin is None:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion==0.1.1.post1)")
    folder = Path(spec.origin).parent
    name = "_kdiffusion_reference"
    pkg = types.ModuleType(name)
    pkg.__path__ = [str(folder)]
    utils = types.ModuleType(f"{name}.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    stubs = {name: pkg, f"{name}.utils": utils}
    if importlib.util.find_spec("torchdiffeq") is None:  # only log_likelihood uses it
        stubs["torchdiffeq"] = types.SimpleNamespace(odeint=None)
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        modules = {}
        for part in ("sampling", "external"):
            s = importlib.util.spec_from_file_location(f"{name}.{part}", folder / f"{part}.py")
            module = modules[part] = importlib.util.module_from_spec(s)
            sys.modules[s.name] = module
            s.loader.exec_module(module)
            setattr(pkg, part, module)
    finally:
        for k, v in saved.items():
            if k == "torchdiffeq":
                sys.modules.pop(k) if v is None else sys.modules.__setitem__(k, v)
    return types.SimpleNamespace(**modules)


# ours, k-diffusion function, its keyword arguments, takes noise
KD_SAMPLERS = {
    "lms": ("sample_lms", {}, False),
    "dpm2": ("sample_dpm_2", {}, False),
    "dpm2_a": ("sample_dpm_2_ancestral", {}, True),
    "dpmpp_2s_a": ("sample_dpmpp_2s_ancestral", {}, True),
    "dpmpp_sde": ("sample_dpmpp_sde", {}, True),
    "dpmpp_2m_sde": ("sample_dpmpp_2m_sde", {}, True),
    "dpmpp_2m_sde_heun": ("sample_dpmpp_2m_sde", {"solver_type": "heun"}, True),
    "heun": ("sample_heun", {}, False),
    "dpmpp_2m": ("sample_dpmpp_2m", {}, False),
}


@pytest.mark.parametrize("schedule,steps", [("karras", 7), ("exponential", 5)])
@pytest.mark.parametrize("name", sorted(KD_SAMPLERS))
def test_sampler_matches_k_diffusion(kd, name, schedule, steps):
    """Tolerance 1e-9 absolute (float64 on both sides; only the order of float operations differs; k-diffusion's
    LMS integrates its cubic by Gauss-Kronrod quadrature, ours exactly)."""
    sigmas = S.sampler_sigmas(name, schedule, TABLE, steps).double()
    x = start(sigma=float(sigmas[0]))
    func, kwargs, noisy = KD_SAMPLERS[name]
    ours_kw, ref_kw = {}, dict(kwargs)
    if noisy:
        noise = BrownianNoise(x, float(sigmas[-2]), float(sigmas[0]), [11, 12])
        ours_kw["noise_sampler"] = ref_kw["noise_sampler"] = noise
    calls = []

    def counted(x, sigma):
        calls.append(1)
        return mixture_denoiser(x, sigma)

    ours = S.SAMPLERS[name](counted, x, sigmas, **ours_kw)
    ref = getattr(kd.sampling, func)(mixture_denoiser, x, sigmas, disable=True, **ref_kw)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-9)
    assert not torch.allclose(ours, x) and torch.isfinite(ours).all()
    # A1111's "second_order": two model calls per step but the last (Euler to 0)
    assert len(calls) == (2 * steps - 1 if name in SECOND_ORDER else steps)


@pytest.mark.parametrize("name", ["dpmpp_sde", "dpmpp_2m_sde"])
def test_sde_default_noise_is_one_brownian_path_per_row_seeded_by_the_image_seed(kd, name):
    """The default noise equals k-diffusion's sampler fed our BrownianNoise over [smallest positive sigma, largest
    sigma] with the rows' seeds: A1111's BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=image seeds),
    with our path in place of torchsde's."""
    sigmas = S.sampler_sigmas(name, "karras", TABLE, 6).double()
    x = start(sigma=float(sigmas[0]))
    ours = S.SAMPLERS[name](mixture_denoiser, x, sigmas, generator=[torch.Generator().manual_seed(s) for s in (5, 9)])
    noise = BrownianNoise(x, float(sigmas[-2]), float(sigmas[0]), [5, 9])
    ref = getattr(kd.sampling, KD_SAMPLERS[name][0])(mixture_denoiser, x, sigmas, disable=True, noise_sampler=noise)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-9)


def test_schedules_match_k_diffusion_formulas(kd):
    """Tolerance 1e-6 relative (our float64 schedule cast to float32 against k-diffusion's float32)."""
    ks = kd.sampling
    for n in (1, 4, 13):
        torch.testing.assert_close(S.SCHEDULES["exponential"](TABLE, n),
                                   ks.get_sigmas_exponential(n, SIGMA_MIN, SIGMA_MAX), rtol=1e-6, atol=0)
        torch.testing.assert_close(S.SCHEDULES["polyexponential"](TABLE, n),
                                   ks.get_sigmas_polyexponential(n, SIGMA_MIN, SIGMA_MAX), rtol=1e-6, atol=0)
        torch.testing.assert_close(S.get_sigmas_polyexponential(n, SIGMA_MIN, SIGMA_MAX, rho=2.5),
                                   ks.get_sigmas_polyexponential(n, SIGMA_MIN, SIGMA_MAX, rho=2.5), rtol=1e-6, atol=0)
        torch.testing.assert_close(S.SCHEDULES["karras"](TABLE, n), ks.get_sigmas_karras(n, SIGMA_MIN, SIGMA_MAX),
                                   rtol=1e-6, atol=0)


@pytest.mark.parametrize("n", [3, 10, 25])
def test_sgm_uniform_and_uniform_match_a1111_on_k_diffusion_discrete_schedule(kd, n):
    """A1111's sgm_uniform and uniform written over k-diffusion's DiscreteSchedule (sigma_to_t / t_to_sigma /
    get_sigmas). Tolerance 1e-5 relative (k-diffusion's float32 table)."""
    model = kd.external.DiscreteSchedule(TABLE.float(), quantize=False)
    start_t, end_t = model.sigma_to_t(torch.tensor(SIGMA_MAX)), model.sigma_to_t(torch.tensor(SIGMA_MIN))
    ref = torch.tensor([float(model.t_to_sigma(t)) for t in torch.linspace(start_t, end_t, n + 1)[:-1]] + [0.0])
    torch.testing.assert_close(S.SCHEDULES["sgm_uniform"](TABLE, n), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(S.SCHEDULES["normal"](TABLE, n), model.get_sigmas(n), rtol=1e-5, atol=0)


diffusers = pytest.importorskip("diffusers")
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.parametrize("n", [4, 10, 20, 25])
def test_simple_matches_diffusers_trailing_timesteps(n):
    """"Simple" takes every (1000/n)-th training sigma from the top: diffusers' "trailing" spacing when n divides
    1000 (exact table values; tolerance 1e-5 relative for diffusers' float32 table)."""
    sched = diffusers.EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="trailing")
    sched.set_timesteps(n)
    torch.testing.assert_close(S.SCHEDULES["simple"](TABLE, n), sched.sigmas.float(), rtol=1e-5, atol=0)


def test_kl_optimal_is_evenly_spaced_in_arctan_sigma():
    for n in (2, 5, 12):
        sigmas = S.SCHEDULES["kl_optimal"](TABLE, n).double()
        assert len(sigmas) == n + 1 and sigmas[-1] == 0
        angles = torch.atan(sigmas[:-1])
        torch.testing.assert_close(angles[0], torch.tensor(math.atan(SIGMA_MAX), dtype=torch.float64))
        torch.testing.assert_close(angles[-1], torch.tensor(math.atan(SIGMA_MIN), dtype=torch.float64))
        steps = angles[:-1] - angles[1:]
        torch.testing.assert_close(steps, steps.mean().expand_as(steps), rtol=1e-5, atol=0)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_lcm_schedule_matches_diffusers_lcm_timesteps(n):
    sched = diffusers.LCMScheduler(**SD_SCHEDULE)
    sched.set_timesteps(n)
    expected = TABLE[sched.timesteps].float()
    torch.testing.assert_close(S.SCHEDULES["lcm"](TABLE, n)[:-1], expected)


@pytest.mark.parametrize("steps", [3, 8])
def test_lcm_matches_diffusers_lcm_scheduler(steps):
    """diffusers' LCMScheduler with its boundary condition switched off (timestep_scaling 1e6: c_skip < 1e-12),
    the same generator for the re-noising: our x = D + sigma_next * noise is its VP step divided by sqrt(alpha).
    Tolerance 1e-5 (float32)."""
    sched = diffusers.LCMScheduler(**SD_SCHEDULE, timestep_scaling=1e6)
    sched.set_timesteps(steps)
    sigmas = S.SCHEDULES["lcm"](TABLE, steps)
    x = start(sigma=float(sigmas[0]), dtype=torch.float32)
    ours = S.sample_lcm(mixture_denoiser, x, sigmas, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    sample = x / math.sqrt(1 + float(sigmas[0]) ** 2)
    for i, t in enumerate(sched.timesteps):
        sigma = float(TABLE[t])
        x_ve = sample * math.sqrt(1 + sigma**2)
        eps = (x_ve - mixture_denoiser(x_ve, torch.tensor([sigma]))) / sigma
        sample = sched.step(eps, t, sample, generator=g).prev_sample
    torch.testing.assert_close(ours, sample, rtol=0, atol=1e-5)


def _diffusers_vp_loop(sched, x, sigmas_of_steps):
    """Run a diffusers multistep scheduler on the mixture model: VP sample = x / sqrt(1 + sigma^2), eps output;
    the result back in sigma units (x at the final sigma)."""
    sample = x / math.sqrt(1 + sigmas_of_steps[0] ** 2)
    for i, t in enumerate(sched.timesteps):
        sigma = sigmas_of_steps[i]
        x_ve = sample * math.sqrt(1 + sigma**2)
        eps = (x_ve - mixture_denoiser(x_ve, torch.tensor([sigma], dtype=x.dtype))) / sigma
        sample = sched.step(eps, t, sample).prev_sample
    return sample * math.sqrt(1 + float(sched.sigmas[-1]) ** 2)


@pytest.mark.parametrize("order,variant,steps", [(2, "bh2", 8), (3, "bh2", 16), (3, "bh2", 5)])
def test_unipc_matches_diffusers_unipc_multistep_on_karras_to_zero(order, variant, steps):
    """UniPC (predictor + corrector, data prediction, lower order while warming up and at the end) against
    diffusers' UniPCMultistepScheduler on Karras sigmas ending at 0 (its use_karras_sigmas equals our "karras").
    Tolerance 2e-5 absolute: diffusers works in float32 VP units. (bh1 cannot end at 0 in diffusers: its last
    step multiplies B(h) = -h = -inf by 0 and returns NaN; see the next test.)"""
    sched = diffusers.UniPCMultistepScheduler(**SD_SCHEDULE, solver_order=order, solver_type=variant,
                                              use_karras_sigmas=True, lower_order_final=True)
    sched.set_timesteps(steps)
    sigmas = S.SCHEDULES["karras"](TABLE, steps).double()
    torch.testing.assert_close(sched.sigmas.double(), sigmas, rtol=3e-5, atol=0)
    x = start(sigma=float(sigmas[0]), dtype=torch.float32)
    ours = S.sample_unipc(mixture_denoiser, x.double(), sigmas, order=order, variant=variant)
    ref = _diffusers_vp_loop(sched, x, [float(s) for s in sched.sigmas[:-1]])
    torch.testing.assert_close(ours.float(), ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize("order,variant,steps", [(3, "bh1", 8), (3, "bh1", 16), (2, "bh1", 6), (1, "bh1", 5),
                                                 (3, "bh2", 7)])
def test_unipc_matches_diffusers_unipc_multistep_ending_at_sigma_min(order, variant, steps):
    """A1111's variant bh1 (and bh2) on diffusers' integer "linspace" timesteps with final_sigmas_type
    "sigma_min": the same sigmas given to ours (the table at those timesteps, then sigma_min), so every step,
    the last included, is a UniPC step. Tolerance 2e-5 absolute (float32 VP units)."""
    sched = diffusers.UniPCMultistepScheduler(**SD_SCHEDULE, solver_order=order, solver_type=variant,
                                              final_sigmas_type="sigma_min", lower_order_final=True)
    sched.set_timesteps(steps)
    sigmas = torch.cat([TABLE[sched.timesteps], TABLE[:1]])
    torch.testing.assert_close(sched.sigmas.double(), sigmas, rtol=3e-5, atol=0)
    x = start(sigma=float(sigmas[0]), dtype=torch.float32)
    ours = S.sample_unipc(mixture_denoiser, x.double(), sigmas, order=order, variant=variant)
    ref = _diffusers_vp_loop(sched, x, [float(s) for s in sched.sigmas[:-1]])
    torch.testing.assert_close(ours.float(), ref, rtol=0, atol=2e-5)


def test_unipc_corrector_raises_the_order():
    """Against the exact probability-flow ODE of a single Gaussian: doubling the steps cuts UniPC-3's error by far
    more than a first-order method's factor 2."""
    mu, s = 0.7, 0.5

    def gaussian(x, sigma):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return mu + s**2 / (s**2 + sigma**2) * (x - mu)

    x = start(shape=(1, 400), sigma=14.6)
    exact = mu + s / math.sqrt(s**2 + 14.6**2) * (x - mu)
    errors = []
    for n in (8, 16):
        sigmas = S.get_sigmas_karras(n, 0.03, 14.6).double()
        sigmas = torch.cat([sigmas[:-1], torch.tensor([0.0], dtype=torch.float64)])
        errors.append((S.sample_unipc(gaussian, x, sigmas) - exact).abs().max().item())
    assert errors[0] / errors[1] > 4


# ---- reaching the data distribution (the samplers test_samplers.py leaves out) -------------------------------------

MU, SD = 0.7, 0.5


def gaussian_denoiser(x, sigma):
    sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return MU + SD**2 / (SD**2 + sigma**2) * (x - MU)


@pytest.mark.parametrize("name", ["dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "lms", "dpm2_a", "dpmpp_2s_a",
                                  "unipc"])
def test_samplers_reach_the_data_distribution_on_karras(name):
    sigmas = S.sampler_sigmas(name, "karras", TABLE, 40).double()
    g = torch.Generator().manual_seed(0)
    x = MU + math.sqrt(SD**2 + float(sigmas[0]) ** 2) * torch.randn((4, 1000), generator=g, dtype=torch.float64)
    out = S.SAMPLERS[name](gaussian_denoiser, x, sigmas, generator=[torch.Generator().manual_seed(i)
                                                                   for i in range(4)])
    assert abs(out.mean().item() - MU) < 0.03 and abs(out.std().item() - SD) < 0.03


# ---- Brownian noise --------------------------------------------------------------------------------------------------

def test_brownian_noise_is_a_deterministic_brownian_path():
    x = torch.zeros(2, 4000, dtype=torch.float64)
    a = BrownianNoise(x, 0.03, 14.6, [1, 2])
    # increments are standard normal and independent over disjoint intervals, per row
    n1, n2 = a(14.6, 3.0), a(3.0, 0.5)
    assert abs(n1.std().item() - 1) < 0.05 and abs(n2.std().item() - 1) < 0.05 and abs(n1.mean().item()) < 0.05
    assert abs((n1 * n2).mean().item()) < 0.05 and abs((n1[0] * n1[1]).mean().item()) < 0.05
    # one path: increments add up (W(c) - W(a) = (W(b) - W(a)) + (W(c) - W(b)))
    whole = a(14.6, 0.5) * math.sqrt(14.6 - 0.5)
    torch.testing.assert_close(whole, n1 * math.sqrt(14.6 - 3.0) + n2 * math.sqrt(3.0 - 0.5), rtol=0, atol=1e-9)
    # the sign follows the query order, as k-diffusion's BatchedBrownianTree
    torch.testing.assert_close(a(3.0, 14.6), -n1, rtol=0, atol=1e-12)
    # the same seed answers the same whatever was asked before; another seed answers differently
    b = BrownianNoise(x, 0.03, 14.6, [1, 2])
    b(0.7, 0.2), b(9.0, 8.0)
    assert torch.equal(b(3.0, 0.5), n2) and torch.equal(b(14.6, 3.0), n1)
    c = BrownianNoise(x, 0.03, 14.6, [1, 3])
    assert torch.equal(c(14.6, 3.0)[0], n1[0]) and not torch.allclose(c(14.6, 3.0)[1], n1[1])
    with pytest.raises(ValueError, match="2 seeds for a batch of 3"):
        BrownianNoise(torch.zeros(3, 2), 0.03, 14.6, [1, 2])


def test_generator_noise_draws_each_row_from_its_generator():
    x = torch.zeros(2, 5)
    noise = GeneratorNoise(x, [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    first = noise(1.0, 0.5)
    assert torch.equal(first[1], torch.randn((1, 5), generator=torch.Generator().manual_seed(2))[0])


# ---- sigmas, traits, pipeline --------------------------------------------------------------------------------------

def test_dpm2_drops_the_next_to_last_sigma_as_a1111():
    for name in ("dpm2", "dpm2_a"):
        sigmas = S.sampler_sigmas(name, "karras", TABLE, 5)
        full = S.SCHEDULES["karras"](TABLE, 6)
        assert len(sigmas) == 6 and torch.equal(sigmas, torch.cat([full[:-2], full[-1:]]))
    assert torch.equal(S.sampler_sigmas("lms", "karras", TABLE, 5), S.SCHEDULES["karras"](TABLE, 5))


def test_traits_cover_every_sampler_and_second_order_matches_the_prompt_schedules():
    assert set(S.SAMPLER_TRAITS) == set(S.SAMPLERS)
    assert SECOND_ORDER == {n for n, t in S.SAMPLER_TRAITS.items() if t.second_order}


@pytest.fixture(scope="module")
def pipe():
    from clipdiffusion.testing import tiny_pipeline

    return tiny_pipeline(0)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["dpmpp_sde", "dpmpp_2m_sde"])
def test_sde_samplers_reproduce_for_a_seed(pipe, sampler):
    run = lambda seed, n=1: pipe.generate("a red circle", steps=3, seed=seed, sampler=sampler, schedule="karras",
                                          width=32, height=32, batch_size=n).pixels  # noqa: E731
    a, b, c = run(5), run(5), run(6)
    assert np.array_equal(a, b) and np.abs(a - c).max() > 1e-3
    # each image of a batch is its own seed's: the second of seed 5's batch is seed 6 alone
    np.testing.assert_allclose(run(5, 2)[1], c[0], atol=2e-5)


def test_new_sampler_and_schedule_names_round_trip_the_infotext(pipe):
    from clipdiffusion.infotext import parse_infotext

    r = pipe.generate("x", steps=2, seed=1, sampler="dpmpp_2m_sde_heun", schedule="sgm_uniform", width=32, height=32)
    text = r.infotexts[0]
    assert "Sampler: DPM++ 2M SDE Heun" in text and "Schedule type: SGM Uniform" in text
    p = parse_infotext(text)
    assert (p.sampler, p.schedule) == ("dpmpp_2m_sde_heun", "sgm_uniform")
    assert parse_infotext("x\nSteps: 2, Sampler: DPM++ 2M SDE Exponential, Seed: 1, Size: 8x8").schedule == \
        "exponential"


# ---- A1111 names ---------------------------------------------------------------------------------------------------

ENGINE = tuple(S.SAMPLERS)
SCHEDS = tuple(S.SCHEDULES)


@pytest.mark.parametrize("name,expected", [
    ("DPM++ 2M SDE", ("dpmpp_2m_sde", "exponential")), ("DPM++ SDE", ("dpmpp_sde", "karras")),
    ("DPM++ 2S a", ("dpmpp_2s_a", "karras")), ("LMS", ("lms", None)), ("DPM2", ("dpm2", "karras")),
    ("DPM2 a", ("dpm2_a", "karras")), ("UniPC", ("unipc", None)), ("LCM", ("lcm", None)),
    ("k_lms", ("lms", None)), ("k_dpm_2_a", ("dpm2_a", "karras")), ("DPM++ 2M", ("dpmpp_2m", "karras")),
    ("DPM++ 2M SDE Heun", ("dpmpp_2m_sde_heun", "exponential")),
    # pre-1.9 names carry the schedule; any "<sampler> <schedule label>" is split as A1111 does
    ("DPM2 a Karras", ("dpm2_a", "karras")), ("LMS Karras", ("lms", "karras")),
    ("DPM++ 2M SDE Karras", ("dpmpp_2m_sde", "karras")), ("k_dpmpp_2m_sde_exp", ("dpmpp_2m_sde", "exponential")),
    ("Euler a Karras", ("euler_a", "karras")), ("UniPC SGM Uniform", ("unipc", "sgm_uniform")),
    ("dpmpp_2m_sde", ("dpmpp_2m_sde", None)), ("lcm", ("lcm", None)),
])  # fmt: skip
def test_a1111_sampler_names(name, expected):
    assert names.resolve_sampler(name, ENGINE) == expected


def test_automatic_takes_the_samplers_schedule_and_an_explicit_one_wins():
    sampler, implied = names.resolve_sampler("DPM++ 2M SDE", ENGINE)
    assert names.resolve_schedule(None, SCHEDS, implied) == "exponential"
    assert names.resolve_schedule("Automatic", SCHEDS, implied) == "exponential"
    assert names.resolve_schedule("Karras", SCHEDS, implied) == "karras"
    for spelling in ("SGM Uniform", "sgm_uniform", "SGMUniform", "sgm uniform"):
        assert names.resolve_schedule(spelling, SCHEDS, None) == "sgm_uniform"
    assert names.resolve_schedule("Uniform", SCHEDS, None) == "normal"
    assert names.resolve_schedule("KL Optimal", SCHEDS, None) == "kl_optimal"


@pytest.mark.parametrize("label", ["Align Your Steps", "beta", "Karras Exponential"])
def test_unsupported_a1111_schedules_are_refused_by_name(label):
    with pytest.raises(RequestError, match=rf"scheduler={label!r}: A1111 scheduler '.*' is not supported") as e:
        names.resolve_schedule(label, SCHEDS, None)
    assert "SGM Uniform" in str(e.value)


def test_unknown_names_list_the_choices():
    with pytest.raises(RequestError, match=r"sampler_name='DPM9': unknown sampler; available: DPM\+\+ 2M, .*LCM.*"
                                           r"\(or ours: euler, .*unipc"):
        names.resolve_sampler("DPM9", ENGINE)
    with pytest.raises(RequestError, match=r"scheduler='wobbly': unknown scheduler; available: Automatic, Uniform"):
        names.resolve_schedule("wobbly", SCHEDS, None)


def test_listings_show_only_what_we_run():
    listed = [item["name"] for item in names.scheduler_items(SCHEDS)]
    assert listed == ["automatic", "uniform", "karras", "exponential", "polyexponential", "sgm_uniform",
                      "kl_optimal", "simple", "normal", "ddim"]
    samplers = {item["name"]: item for item in names.sampler_items(ENGINE)}
    for name in ("DPM++ 2M SDE", "DPM++ SDE", "DPM++ 2S a", "LMS", "DPM2", "DPM2 a", "UniPC", "LCM"):
        assert name in samplers
    assert samplers["DPM++ SDE"]["options"] == {"scheduler": "karras", "second_order": True, "brownian_noise": True}
    assert samplers["DPM2"]["aliases"] == ["k_dpm_2", "dpm2"]


@pytest.mark.slow
def test_server_takes_the_new_names(monkeypatch):
    import httpx

    import server_fixtures
    from clipdiffusion.server.app import create_app
    from clipdiffusion.server.settings import ModelEntry, ServerSettings

    monkeypatch.setattr(server_fixtures, "FAKE_SAMPLERS", ENGINE)
    pipe = server_fixtures.FakePipeline()
    settings = ServerSettings(models=(ModelEntry("tiny-a"),))  # the engine's own tables
    app = create_app(server_fixtures.fake_factory(pipe), settings)
    with server_fixtures.ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        listed = [s["name"] for s in c.get("/sdapi/v1/schedulers").json()]
        assert "sgm_uniform" in listed and "align_your_steps" not in listed
        assert "DPM++ 2M SDE" in [s["name"] for s in c.get("/sdapi/v1/samplers").json()]
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "a", "steps": 2, "sampler_name": "DPM++ 2M SDE"})
        assert r.status_code == 200, r.text
        assert (pipe.calls[-1]["sampler"], pipe.calls[-1]["schedule"]) == ("dpmpp_2m_sde", "exponential")
        assert json.loads(r.json()["info"])["sampler_name"] == "DPM++ 2M SDE"
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "a", "steps": 2, "sampler_name": "UniPC",
                                               "scheduler": "SGM Uniform"})
        assert r.status_code == 200 and pipe.calls[-1]["schedule"] == "sgm_uniform"
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "a", "steps": 2, "scheduler": "Align Your Steps"})
        assert r.status_code == 422 and "Align Your Steps" in r.text and "not supported" in r.text


def test_cli_takes_a1111_spellings(tmp_path):
    from PIL import Image

    from clipdiffusion.checkpoints.save import save_checkpoint
    from clipdiffusion.cli import main
    from clipdiffusion.testing import tiny_pipeline

    model = tmp_path / "tiny.safetensors"
    save_checkpoint(tiny_pipeline(0), model)
    out = tmp_path / "a.png"
    assert main(["generate", "x", "--model", str(model), "--width", "32", "--height", "32", "--steps", "2",
                 "--sampler", "DPM++ 2M SDE", "--scheduler", "SGM Uniform", "-o", str(out)]) == 0
    text = Image.open(out).text["parameters"]
    assert "Sampler: DPM++ 2M SDE" in text and "Schedule type: SGM Uniform" in text
    assert main(["generate", "x", "--model", str(model), "--scheduler", "Beta", "-o", str(out)]) == 2
