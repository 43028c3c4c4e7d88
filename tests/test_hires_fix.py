"""Hires fix (issue 20): A1111's two-pass txt2img in the pipeline (clipdiffusion.hires), the infotext, the CLI and
the A1111 server route.

The equivalence tests are bit-exact (``assert_array_equal``): a pixel-upscaler hires fix is, by construction, our
txt2img, the upscale of its PNG-ready image, and our img2img of that image with the same seed; a latent mode is the
txt2img's sampled latents interpolated, noised with the seed's noise at the second pass's first sigma and sampled.
All on random tiny weights (``testing.tiny_pipeline``: latent factor 2, 16x16 to 32x32 first passes).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from clipdiffusion import hires
from clipdiffusion.infotext import from_infotext, parse_infotext, to_infotext
from clipdiffusion.request import (HR_UPSCALERS, LATENT_UPSCALE_MODES, LIMITS, GenerationRequest, RequestError,
                                   hires_schedule_steps, hires_size)


@pytest.fixture(scope="module")
def pipe():
    from clipdiffusion.testing import tiny_pipeline

    torch.set_num_threads(1)
    return tiny_pipeline(seed=0)


PROMPT = "a red circle"


# -- sizes and steps, A1111's arithmetic ----------------------------------------------------------------------


def test_hires_size_follows_a1111():
    # hr_scale: int(side * scale)
    assert hires_size(512, 512, 1.5) == (768, 768, 768, 768)
    assert hires_size(500, 300, 1.7, factor=8) == (850, 510, 848, 504)  # the target is whole latent pixels
    # one side of the resize: the other by the aspect ratio, integer division
    assert hires_size(512, 768, 2, 1000, 0, 8)[:2] == (1000, 1500)
    assert hires_size(512, 768, 2, 0, 1000, 8)[:2] == (666, 1000)
    # both: cover the box, then cut the excess in whole latent pixels (A1111's truncate_x/y)
    assert hires_size(512, 768, 2, 1024, 1024, 8) == (1024, 1536, 1024, 1024)
    assert hires_size(768, 512, 2, 1024, 1024, 8) == (1536, 1024, 1024, 1024)


def test_second_pass_runs_exactly_the_hires_steps():
    # A1111 setup_img2img_steps(p, steps): the schedule is int(steps / min(strength, 0.999)), t_enc = steps - 1
    assert hires_schedule_steps(10, 0.5) == 20
    assert hires_schedule_steps(10, 0.7) == 14
    assert hires_schedule_steps(10, 1.0) == 10
    plan = hires.plan(GenerationRequest(steps=7, width=32, height=32, enable_hr=True, hr_strength=0.3), 2)
    assert (plan.steps, plan.schedule_steps, plan.upscaler, plan.target) == (7, 23, "Latent", (64, 64))


# -- the pipeline --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 2])
def test_pixel_hires_equals_txt2img_then_img2img(pipe, batch):
    """Lanczos, another sampler and prompt for the second pass: the same as running the two generations by hand
    (PIL's Lanczos from 16 to 32 px is A1111's Lanczos upscaler at x2). Bit for bit for one image; image i of a
    batch of 2 against its own seed's img2img within 1e-5 (the UNet runs a batch of 2 there: float sums in
    another order, 4e-6 measured), and its 8-bit image equal."""
    common = dict(guidance=5.0, seed=11, width=16, height=16)
    result = pipe.generate(PROMPT, steps=2, batch_size=batch, enable_hr=True, hr_upscaler="Lanczos",
                           hr_second_pass_steps=2, hr_strength=0.5, hr_sampler="euler_a",
                           hr_prompt="a blue circle", **common)
    assert [im.size for im in result.images] == [(32, 32)] * batch and result.seeds == [11, 12][:batch]
    first = pipe.generate(PROMPT, steps=2, batch_size=batch, **common)
    for i, image in enumerate(first.images):
        upscaled = image.resize((32, 32), resample=Image.Resampling.LANCZOS)
        # our img2img runs int(4 * 0.5) = 2 steps of a 4-step schedule: A1111's hires pass of 2 steps at 0.5
        second = pipe.generate("a blue circle", init_image=upscaled, steps=4, strength=0.5, sampler="euler_a",
                               guidance=5.0, seed=11 + i, width=32, height=32)
        if batch == 1:
            np.testing.assert_array_equal(result.pixels[i], second.pixels[0])
        else:
            np.testing.assert_allclose(result.pixels[i], second.pixels[0], rtol=0, atol=1e-5)
            assert np.abs(np.asarray(result.images[i], int) - np.asarray(second.image, int)).max() <= 1
    assert "Hires upscaler: Lanczos" in result.infotexts[-1] and "Size: 16x16" in result.infotexts[-1]
    assert f"Seed: {10 + batch}" in result.infotexts[-1]


def test_latent_hires_is_the_interpolated_latents_noised_with_the_seed(pipe):
    """"Latent" (bilinear): the second pass starts at interpolate(txt2img latents) + seed noise * sigma, the last
    hires steps of its schedule; the same sampling from that start gives the same image."""
    from clipdiffusion.diffusion.denoiser import Denoiser
    from clipdiffusion.diffusion.samplers import get_schedule

    common = dict(seed=3, width=16, height=24)
    result = pipe.generate(PROMPT, steps=2, enable_hr=True, hr_second_pass_steps=3, hr_strength=0.75, **common)
    assert result.image.size == (32, 48)
    first = pipe.generate(PROMPT, steps=2, **common)
    up = torch.nn.functional.interpolate(first.latents, size=(24, 16), mode="bilinear")
    sigmas = get_schedule("normal")(Denoiser(pipe.unet, pipe.alphas_cumprod, pipe.prediction).sigmas, 4)[1:]
    x = up + torch.randn((1, 4, 24, 16), generator=torch.Generator().manual_seed(3)) * sigmas[0]
    second_request = GenerationRequest(prompt=PROMPT, steps=4, seed=3, width=32, height=48)
    seen = []
    again = pipe._generate(second_request, None, None, start=lambda g, s: (seen.append(len(s)) or x, sigmas))
    assert seen == [5]  # the schedule of int(3 / 0.75) = 4 steps
    np.testing.assert_array_equal(result.pixels, again.pixels)
    # and not just any start: the first pass's own latents decide the image
    assert not np.array_equal(result.pixels, pipe.generate(PROMPT, steps=2, enable_hr=True, hr_second_pass_steps=3,
                                                           hr_strength=0.75, seed=4, width=16, height=24).pixels)


@pytest.mark.parametrize("upscaler", HR_UPSCALERS)
def test_each_upscaler_gives_the_target_size(pipe, upscaler):
    r = pipe.generate(PROMPT, steps=1, seed=1, width=16, height=12, enable_hr=True, hr_upscaler=upscaler,
                      hr_second_pass_steps=1, hr_scale=1.5)
    assert r.image.size == (24, 18) and r.latents.shape == (1, 4, 9, 12)
    assert np.isfinite(r.pixels).all() and r.pixels.std() > 0
    assert f"Hires upscaler: {upscaler}" in r.infotexts[0]


def test_upscaler_modes_differ_and_resize_cuts(pipe):
    latents = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(0))
    odd = {name: hires.upscale_latents(latents, name, (40, 30), (40, 30), 2) for name in LATENT_UPSCALE_MODES}
    assert all(o.shape == (1, 4, 15, 20) for o in odd.values())
    assert len({o.numpy().tobytes() for o in odd.values()}) == len(odd)  # x2.5: six different interpolations
    outs = {name: hires.upscale_latents(latents, name, (32, 24), (32, 24), 2) for name in LATENT_UPSCALE_MODES}
    np.testing.assert_array_equal(outs["Latent (nearest)"][..., ::2, ::2], latents)
    # both resize sides: cover, then cut half on each side (A1111's samples[..., t//2 : H - (t+1)//2, ...])
    cut = hires.upscale_latents(latents, "Latent", (32, 24), (32, 16), 2)
    np.testing.assert_array_equal(cut, outs["Latent"][:, :, 2:10, :])
    image = Image.fromarray(np.arange(16 * 12 * 3, dtype=np.uint8).reshape(12, 16, 3))
    assert hires.upscale_image(image, "Nearest", 32, 24).tobytes() == image.resize((32, 24), Image.NEAREST).tobytes()
    r = pipe.generate(PROMPT, steps=1, seed=1, width=16, height=12, enable_hr=True, hr_resize_x=32, hr_resize_y=16,
                      hr_second_pass_steps=1, hr_upscaler="Lanczos")
    assert r.image.size == (32, 16) and "Hires resize: 32x16" in r.infotexts[0]
    assert "Hires upscale:" not in r.infotexts[0]


def test_interrupt_in_the_first_pass_returns_the_first_pass(pipe):
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 1

    r = pipe.generate(PROMPT, steps=2, seed=1, width=16, height=16, enable_hr=True, should_stop=stop)
    assert r.interrupted and r.image.size == (16, 16)


def test_progress_counts_both_passes(pipe):
    seen = []
    pipe.generate(PROMPT, steps=2, seed=1, width=16, height=16, enable_hr=True, hr_second_pass_steps=3,
                  callback=lambda step, total, x: seen.append((step, total)))
    assert seen == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]


# -- bad values ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, name, words", [
    ({"hr_scale": 0}, "hr_scale", "(0.0, 8.0]"), ({"hr_scale": -1.0}, "hr_scale", "finite"),
    ({"hr_scale": math.nan}, "hr_scale", "finite"), ({"hr_scale": math.inf}, "hr_scale", "finite"),
    ({"hr_scale": 8.5}, "hr_scale", "8.0"), ({"hr_upscaler": "ESRGAN_4x"}, "hr_upscaler", "unknown upscaler"),
    ({"hr_upscaler": "latent"}, "hr_upscaler", "Latent (nearest-exact)"), ({"hr_strength": 0.0}, "hr_strength", "(0, 1]"),
    ({"hr_strength": 0.001}, "hr_strength", "schedule of 20000 steps"),
    ({"hr_scale": 6.0, "width": 2048, "height": 2048}, "hr_scale", "over the limits"),
    ({"hr_resize_x": 8000, "hr_resize_y": 4, "width": 64, "height": 2048}, "hr_resize_x", "over the limits"),
    ({"hr_second_pass_steps": -1}, "hr_second_pass_steps", "integer")])
def test_bad_hires_values_name_the_field(fields, name, words):
    with pytest.raises(RequestError) as info:
        GenerationRequest(prompt="p", steps=20, enable_hr=True, **fields)
    assert info.value.field == name and words in str(info.value), str(info.value)


def test_engine_checks_the_target_at_the_model_size(pipe):
    with pytest.raises(RequestError, match="too small") as info:  # 16 * 0.1 = 1 px: under one latent pixel
        pipe.generate(PROMPT, steps=1, width=16, height=16, enable_hr=True, hr_scale=0.1)
    assert info.value.field == "hr_scale"
    with pytest.raises(RequestError, match="txt2img"):
        GenerationRequest(enable_hr=True, init_image=Image.new("RGB", (8, 8)))


# -- infotext ------------------------------------------------------------------------------------------------


def test_infotext_round_trip():
    r = GenerationRequest(prompt="a cat", negative_prompt="dog", steps=12, seed=5, width=64, height=48,
                          sampler="euler", schedule="normal", enable_hr=True, hr_scale=1.5,
                          hr_upscaler="Latent (nearest-exact)", hr_second_pass_steps=3, hr_strength=0.4,
                          hr_prompt="a cat, detailed", hr_negative_prompt="blurry: dog", hr_sampler="euler_a",
                          hr_schedule="karras")
    text = to_infotext(r)
    assert ("Denoising strength: 0.4, Hires upscale: 1.5, Hires steps: 3, Hires upscaler: Latent (nearest-exact), "
            "Hires sampler: Euler a, Hires schedule type: Karras, Hires prompt: \"a cat, detailed\", "
            "Hires negative prompt: \"blurry: dog\"") in text
    assert from_infotext(text) == r
    resized = r.replace(hr_resize_x=128, hr_resize_y=0, hr_scale=2.0, hr_upscaler=None, hr_sampler="euler",
                        hr_prompt="a cat")
    text = to_infotext(resized)
    assert "Hires resize: 128x0" in text and "Hires upscale" not in text and "Hires upscaler" not in text
    assert "Hires sampler" not in text and "Hires prompt" not in text  # the same as the first pass: left out
    assert from_infotext(text) == resized.replace(hr_sampler=None, hr_prompt="")


def test_a1111_infotext_reads_as_a_hires_request():
    text = ("a castle\nNegative prompt: fog\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, "
            "Seed: 1234, Size: 512x768, Model hash: abc, Model: v15, Denoising strength: 0.55, Hires upscale: 2, "
            "Hires steps: 10, Hires upscaler: Latent (bicubic antialiased), Hires sampler: Euler a, "
            "Hires schedule type: Uniform, Version: v1.10.1")
    r = from_infotext(text)
    assert (r.enable_hr, r.hr_scale, r.hr_second_pass_steps, r.hr_upscaler, r.hr_strength, r.strength) == (
        True, 2.0, 10, "Latent (bicubic antialiased)", 0.55, 0.75)
    assert (r.hr_sampler, r.hr_schedule, r.width, r.height) == ("euler_a", "normal", 512, 768)
    with pytest.raises(RequestError) as info:
        from_infotext(text.replace("Hires upscaler: Latent (bicubic antialiased)", "Hires upscaler: 4x-UltraSharp"))
    assert info.value.field == "hr_upscaler" and "4x-UltraSharp" in str(info.value)


def test_png_parameters_reproduce_the_hires_image(pipe):
    r = pipe.generate(PROMPT, steps=2, seed=21, width=16, height=16, enable_hr=True, hr_upscaler="Nearest",
                      hr_second_pass_steps=1, hr_strength=0.6, hr_scale=1.5)
    request = from_infotext(r.infotexts[0])
    assert parse_infotext(r.infotexts[0]).extra["Hires upscaler"] == "Nearest"
    np.testing.assert_array_equal(pipe.generate(request).pixels, r.pixels)


# -- CLI -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory, pipe):
    from clipdiffusion.checkpoints.save import save_checkpoint

    path = tmp_path_factory.mktemp("model") / "tiny-random.safetensors"
    save_checkpoint(pipe, path)
    return path


@pytest.mark.slow  # loads the model from a file twice (the first load in a process imports much of torch)
def test_cli_hires(model, tmp_path, capsys):
    from clipdiffusion.cli import main

    out = tmp_path / "hr.png"
    assert main(["generate", PROMPT, "--model", str(model), "--width", "16", "--height", "16", "--steps", "2",
                 "--seed", "4", "--hr-scale", "2", "--hr-upscaler", "Latent", "--hr-steps", "1",
                 "--denoising-strength", "0.5", "--hr-prompt", "a blue circle", "-o", str(out)]) == 0
    image = Image.open(out)
    text = image.text["parameters"]
    assert image.size == (32, 32)
    assert "Size: 16x16" in text and "Hires upscale: 2, Hires steps: 1, Hires upscaler: Latent" in text
    assert "Denoising strength: 0.5" in text and "Hires prompt: a blue circle" in text
    same = pipe_generate_from(model, text)
    assert np.array_equal(np.asarray(image), np.asarray(same))
    capsys.readouterr()
    assert main(["generate", PROMPT, "--model", str(model), "--hr-upscaler", "SwinIR 4x", "-o", str(out)]) == 2
    assert "hr_upscaler='SwinIR 4x'" in capsys.readouterr().err
    assert main(["generate", PROMPT, "--model", str(model), "--denoising-strength", "0.5", "-o", str(out)]) == 2
    assert "--denoising-strength" in capsys.readouterr().err
    assert main(["generate", PROMPT, "--model", str(model), "--hr-scale", "0", "-o", str(out)]) == 2
    assert "hr_scale=0.0" in capsys.readouterr().err


def pipe_generate_from(model, text):
    from clipdiffusion.pipeline import Pipeline

    return Pipeline.from_file(model).generate(from_infotext(text)).image


# -- server --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    from server_fixtures import ServerThread

    from clipdiffusion.server.app import create_app
    from clipdiffusion.server.settings import ModelEntry, ServerSettings
    from clipdiffusion.testing import tiny_pipeline

    settings = ServerSettings(models=(ModelEntry("tiny"),), max_width=64, max_height=64)
    with ServerThread(create_app(lambda name: tiny_pipeline(seed=0), settings)) as served:
        yield served


def _post(server, body):
    import httpx

    return httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=60)


def _field_error(response, field):
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert any(field in ".".join(map(str, d["loc"])) for d in detail), detail
    return " ".join(d["msg"] for d in detail)


def test_server_chat_front_end_hires_txt2img(server, pipe):
    """What chat front ends send (enable_hr with hr_scale, hr_upscaler, hr_second_pass_steps, denoising_strength,
    clip_skip, save_images, restore_faces): hires fix done, A1111's info fields, the image our pipeline makes."""
    import base64
    import io

    body = {"prompt": PROMPT, "negative_prompt": "", "steps": 2, "seed": 8, "width": 16, "height": 16,
            "cfg_scale": 7, "sampler_name": "Euler", "enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent",
            "hr_second_pass_steps": 1, "denoising_strength": 0.5, "clip_skip": 1, "save_images": False,
            "restore_faces": False, "hr_sampler_name": "Use same sampler", "hr_prompt": "", "hr_resize_x": 0,
            "hr_resize_y": 0, "firstphase_width": 0, "firstphase_height": 0}
    r = _post(server, body)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert image.size == (32, 32) and (info["width"], info["height"]) == (16, 16)  # the first pass's, as A1111
    assert info["denoising_strength"] == 0.5 and info["ignored_fields"] == []
    assert info["extra_generation_params"]["Hires upscale"] == "2"
    assert info["extra_generation_params"]["Hires upscaler"] == "Latent"
    assert "Hires steps: 1, Hires upscaler: Latent" in info["infotexts"][0]
    expected = pipe.generate(PROMPT, steps=2, seed=8, width=16, height=16, enable_hr=True, hr_upscaler="Latent",
                             hr_second_pass_steps=1, hr_strength=0.5)
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected.image))
    # the hires sampler and scheduler by A1111's names
    r = _post(server, {**body, "hr_sampler_name": "Euler a", "hr_scheduler": "Karras", "hr_upscaler": "Lanczos"})
    assert r.status_code == 200, r.text
    text = json.loads(r.json()["info"])["infotexts"][0]
    assert "Hires sampler: Euler a, Hires schedule type: Karras" in text and "Hires upscaler: Lanczos" in text


@pytest.mark.parametrize("change, field, words", [
    ({"hr_scale": 0}, "hr_scale", "(0.0, 8.0]"), ({"hr_scale": -2}, "hr_scale", ""),
    ({"hr_scale": "NaN"}, "hr_scale", "finite"), ({"hr_scale": 8}, "hr_scale", "over the limits"),
    ({"hr_resize_x": 64, "height": 32}, "hr_resize_x", "over the limits"),
    ({"hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler", "R-ESRGAN 4x+"),
    ({"denoising_strength": 0}, "denoising_strength", "(0, 1]"),
    ({"hr_sampler_name": "Nope"}, "hr_sampler_name", "unknown sampler"),
    ({"hr_second_pass_steps": 500}, "hr_second_pass_steps", "")])
def test_server_refuses_bad_hires_values(server, change, field, words):
    body = {"prompt": "p", "steps": 1, "width": 16, "height": 16, "enable_hr": True, **change}
    message = _field_error(_post(server, body), field)
    assert words in message, message


def test_server_nan_literal_and_img2img_ignores_enable_hr(server):
    import httpx

    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", timeout=60, headers={"content-type": "application/json"},
                   content=b'{"prompt": "p", "steps": 1, "width": 16, "height": 16, "enable_hr": true, '
                           b'"hr_scale": NaN}')
    assert "finite" in _field_error(r, "hr_scale")
    import base64
    import io

    png = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(png, format="PNG")
    r = httpx.post(f"{server.url}/sdapi/v1/img2img", timeout=60, json={
        "prompt": "p", "steps": 2, "width": 16, "height": 16, "enable_hr": True, "denoising_strength": 0.5,
        "init_images": [base64.b64encode(png.getvalue()).decode()]})
    assert r.status_code == 200, r.text
    assert "enable_hr" in json.loads(r.json()["info"])["ignored_fields"]


def test_limits_are_the_request_limits():
    assert LIMITS.max_width >= 64  # the engine's; the server's tighten them (max_width=64 above)
