"""Pipeline.generate end to end on tiny random models: seeds, batch, validation, callbacks, img2img, attention."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from clipdiffusion.diffusion.samplers import SAMPLERS, SCHEDULES
from clipdiffusion.errors import ClipDiffusionError
from clipdiffusion.infotext import parse_infotext
from clipdiffusion.testing import tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(0)


def gen(pipe, prompt="a red circle", **kw):
    kw = {"steps": 2, "seed": 1, **kw}
    return pipe.generate(prompt, **kw)


def test_result_shape_seeds_and_infotext(pipe):
    r = gen(pipe, negative_prompt="blurry", seed=42, batch_size=2, clip_skip=2, guidance=5.5)
    assert len(r.images) == 2 and r.image.size == (32, 32) and r.image.mode == "RGB"
    assert r.seeds == [42, 43] and r.pixels.shape == (2, 32, 32, 3)
    p = parse_infotext(r.infotexts[1])
    assert (p.prompt, p.negative_prompt, p.seed, p.steps, p.guidance, p.clip_skip) == (
        "a red circle", "blurry", 43, 2, 5.5, 2)
    assert (p.sampler, p.schedule, p.width, p.height, p.model) == ("euler", "normal", 32, 32, "tiny-random-sd1")


def test_same_seed_same_image_and_batch_rows_equal_single_runs(pipe):
    batch = gen(pipe, seed=7, batch_size=2)
    single = gen(pipe, seed=8)
    again = gen(pipe, seed=7)
    # tolerance: float32 kernels may sum in another order for another batch size
    np.testing.assert_allclose(batch.pixels[1], single.pixels[0], atol=1e-5)
    np.testing.assert_array_equal(again.pixels[0], gen(pipe, seed=7).pixels[0])
    assert np.abs(batch.pixels[0] - batch.pixels[1]).max() > 1e-3


def test_random_seed_is_recorded_and_reproduces(pipe):
    r = gen(pipe, seed=-1)
    assert 0 <= r.seeds[0] < 2**32 and f"Seed: {r.seeds[0]}" in r.infotexts[0]
    np.testing.assert_array_equal(gen(pipe, seed=r.seeds[0]).pixels, r.pixels)


def test_initial_noise_is_diffusers_randn_scaled_by_sigma_max(pipe):
    seen = []

    def watch(x, sigma):
        seen.append(x.clone())
        return torch.zeros_like(x)

    from clipdiffusion.diffusion import samplers

    real = samplers.SAMPLERS["euler"]
    samplers.SAMPLERS["euler"] = lambda den, x, sigmas, **kw: real(watch, x, sigmas, **kw)
    try:
        gen(pipe, seed=5, steps=1)
    finally:
        samplers.SAMPLERS["euler"] = real
    expected = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(5)) * 14.6146
    torch.testing.assert_close(seen[0], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs, message", [
    ({"width": 31}, r"width=31: must be a multiple of \d+ for this model"),
    ({"height": 0}, r"height=0"),
    ({"width": 16384}, r"width=16384"),
    ({"width": 8192, "height": 8192}, r"size=8192x8192"),
    ({"steps": 0}, r"steps=0"),
    ({"steps": 2.5}, r"steps=2.5"),
    ({"guidance": -1}, r"guidance=-1"),
    ({"guidance": math.nan}, r"guidance=nan"),
    ({"sampler": "nosuch"}, r"unknown sampler 'nosuch'; choose from euler"),
    ({"schedule": "beta"}, r"unknown schedule 'beta'"),
    ({"batch_size": 0}, r"batch_size=0"),
    ({"seed": -2}, r"seed=-2"),
    ({"seed": 2**64}, r"seed="),
    ({"init_image": "x.png"}, r"init_image"),
    ({"init_image": Image.new("RGB", (32, 32)), "strength": 0}, r"strength=0"),
    ({"callback": 3}, r"callback"),
])
def test_bad_input_names_field_and_value(pipe, kwargs, message):
    with pytest.raises(ClipDiffusionError, match=message):
        gen(pipe, **kwargs)


def test_callback_and_interrupt(pipe):
    calls = []
    gen(pipe, steps=3, callback=lambda i, n, lat: calls.append((i, n, tuple(lat.shape))))
    assert calls == [(1, 3, (1, 4, 16, 16)), (2, 3, (1, 4, 16, 16)), (3, 3, (1, 4, 16, 16))]
    polls = []
    r = gen(pipe, steps=5, should_stop=lambda: polls.append(1) or len(polls) > 2)
    assert r.interrupted and len(r.images) == 1
    assert not gen(pipe).interrupted


# every sampler on two schedules and every schedule under two samplers (DPM2 drops a sigma), not the whole product
SAMPLER_SCHEDULES = sorted({(s, k) for s in SAMPLERS for k in ("normal", "karras")}
                           | {(s, k) for s in ("euler", "dpm2") for k in SCHEDULES})


@pytest.mark.parametrize("sampler,schedule", SAMPLER_SCHEDULES)
def test_every_sampler_and_schedule_runs(pipe, sampler, schedule):
    r = gen(pipe, sampler=sampler, schedule=schedule)
    assert np.isfinite(r.pixels).all()
    assert parse_infotext(r.infotexts[0]).sampler == sampler


def test_guidance_changes_the_image_and_one_skips_uncond(pipe):
    a, b = gen(pipe, guidance=1.0).pixels, gen(pipe, guidance=7.0).pixels
    assert np.abs(a - b).max() > 1e-3
    # with guidance 1 the negative prompt has no effect
    np.testing.assert_array_equal(a, gen(pipe, guidance=1.0, negative_prompt="something else").pixels)


def test_long_prompt_against_short_negative_runs_cond_and_uncond_separately(pipe):
    long = " ".join(["red circle"] * 60)  # > 75 tokens: two chunks, 154 rows, against a 77-row negative
    r = gen(pipe, long, negative_prompt="blue", guidance=3.0)
    assert np.isfinite(r.pixels).all()


def test_img2img_runs_strength_times_steps_and_depends_on_the_image(pipe):
    white, black = Image.new("RGB", (32, 32), "white"), Image.new("RGB", (32, 32), "black")
    calls = []
    r = gen(pipe, steps=4, init_image=white, strength=0.5, callback=lambda *a: calls.append(a[:2]))
    assert calls == [(1, 2), (2, 2)]
    assert "Denoising strength: 0.5" in r.infotexts[0]
    other = gen(pipe, steps=4, init_image=black, strength=0.5)
    assert np.abs(r.pixels - other.pixels).max() > 1e-3
    # size taken from the image when width/height are not given
    assert gen(pipe, init_image=Image.new("RGB", (40, 24)), strength=0.3).image.size == (40, 24)


def test_attention_maps_per_prompt_token(pipe):
    r = gen(pipe, "a red circle", attention_maps=True, batch_size=2)
    att = r.attention
    assert att.tokens == ["a", "red", "circle"]
    assert att.maps.shape == (3, 16, 16) and att.maps.dtype == np.float32
    assert (att.maps >= 0).all() and (att.maps.sum(axis=0) <= 1 + 1e-5).all()
    assert gen(pipe).attention is None


@pytest.mark.parametrize("prompt", ["", "   ", "BREAK", "\u0000"])
def test_attention_maps_of_a_prompt_without_tokens_are_empty(pipe, prompt):
    r = gen(pipe, prompt, attention_maps=True)
    assert r.attention.tokens == [] and r.attention.maps.shape == (0, 16, 16)
    assert r.attention.maps.dtype == np.float32
    # nothing was recorded: the image is the one generated without attention maps
    np.testing.assert_array_equal(r.pixels, gen(pipe, prompt).pixels)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_other_families_and_v_prediction(family, prediction):
    p = tiny_pipeline(1, family, prediction)
    r = p.generate("a cat", steps=2, seed=3, negative_prompt="dog" if family == "sd2" else "")
    assert np.isfinite(r.pixels).all() and r.image.size == (32, 32)


def test_sdxl_size_conditioning_reaches_the_unet():
    p = tiny_pipeline(2, "sdxl")
    seen = []
    forward = p.unet.forward
    p.unet.forward = lambda x, t, c, y=None, **kw: seen.append(y) or forward(x, t, c, y, **kw)
    p.generate("a cat", steps=1, seed=0, width=32, height=16, guidance=1.0)
    from clipdiffusion.diffusion.unet import sdxl_vector

    cond = p.text_encoder.encode("a cat", "", equalize=False)
    expected = sdxl_vector(cond.pooled, torch.tensor([[16.0, 32.0, 0.0, 0.0, 16.0, 32.0]]), 8)
    torch.testing.assert_close(seen[0], expected)


def test_default_pipeline_reports_a_missing_embedded_model(monkeypatch, tmp_path):
    import clipdiffusion.pipeline as pl

    monkeypatch.setattr(pl, "TINY_DATA", tmp_path)
    with pytest.raises(ClipDiffusionError, match="embedded tiny model is missing"):
        pl.Pipeline.default()


def test_clip_skip_default_is_the_family_default_and_only_other_values_are_recorded(pipe):
    assert "Clip skip" not in gen(pipe).infotexts[0]
    assert "Clip skip" not in gen(pipe, clip_skip=1).infotexts[0]
    assert np.abs(gen(pipe, clip_skip=2).pixels - gen(pipe).pixels).max() > 1e-4
    xl = tiny_pipeline(1, "sdxl")
    default, last = xl.generate("a cat", steps=1, seed=0), xl.generate("a cat", steps=1, seed=0, clip_skip=1)
    assert "Clip skip" not in default.infotexts[0] and "Clip skip: 1" in last.infotexts[0]
    np.testing.assert_array_equal(default.pixels, xl.generate("a cat", steps=1, seed=0, clip_skip=2).pixels)
    with pytest.raises(ClipDiffusionError, match="clip_skip=9"):
        gen(pipe, clip_skip=9)


def test_infotext_reproduces_the_generation(pipe):
    from clipdiffusion.infotext import from_infotext

    first = gen(pipe, "a (red:1.2) circle", negative_prompt="dark, blurry", seed=-1, sampler="heun",
                schedule="karras", guidance=4.0, clip_skip=2, long_prompt="window", weighting="comfy", steps=3)
    again = pipe.generate(from_infotext(first.infotexts[0]))
    np.testing.assert_array_equal(first.pixels, again.pixels)
    assert again.infotexts == first.infotexts


def test_generate_takes_a_request_and_refuses_what_it_does_not_honour(pipe):
    from clipdiffusion.request import GenerationRequest, RequestError

    request = GenerationRequest(prompt="a red circle", steps=2, seed=9, batch_size=2, n_iter=2)
    result = pipe.generate(request)
    assert result.seeds == [9, 10, 11, 12] and len(result.images) == len(result.infotexts) == 4
    np.testing.assert_array_equal(result.pixels[2:], gen(pipe, seed=11, batch_size=2).pixels)
    assert parse_infotext(result.infotexts[3]).seed == 12
    with pytest.raises(RequestError, match="not both") as info:
        pipe.generate(request, steps=3)
    assert info.value.field == "steps"
    with pytest.raises(RequestError, match=r"not implemented yet \(styles\)") as info:  # hires fix is (issue 20)
        pipe.generate(request.replace(styles=("s",)))
    assert info.value.field == "styles"
