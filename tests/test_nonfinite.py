"""Hostile weights (issue 14): NaN/Inf in a model is a `NonFiniteError` naming the stage, never a black image.

Tiny random pipelines with one poisoned value: the pipeline (each stage, each sampler at the right step), the CLI
(`generate` exits 2 and writes nothing; `info --check` names the tensor), and the server (500 with the message;
an empty prompt's attention maps are empty, not a 500).
"""

import json
import math

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from clipdiffusion.cli import main
from clipdiffusion.diffusion.samplers import SAMPLERS
from clipdiffusion.errors import ClipDiffusionError, NonFiniteError
from clipdiffusion.testing import tiny_pipeline

UNET_KEY = "input_blocks.0.0.weight"  # the UNet's first conv: one NaN there reaches every output value


def poison(module, name, value=math.nan, index=0):
    with torch.no_grad():
        dict(module.named_parameters())[name].view(-1)[index] = value


def gen(pipe, prompt="a red circle", **kw):
    return pipe.generate(prompt, **{"steps": 2, "seed": 1, **kw})


def test_one_nan_in_one_unet_tensor_names_the_unet_at_step_1():
    pipe = tiny_pipeline(0)
    poison(pipe.unet, UNET_KEY)
    with pytest.raises(NonFiniteError, match=r"UNet output at step 1 of 2 has non-finite values") as info:
        gen(pipe)
    assert (info.value.stage, info.value.step, info.value.total) == ("UNet", 1, 2)
    assert "clipdiffusion info --check" in str(info.value)
    assert isinstance(info.value, ClipDiffusionError)


def test_nan_text_encoder_names_the_text_encoder():
    pipe = tiny_pipeline(0)
    poison(pipe.text_encoder.encoders[0].model, "encoder.layers.0.self_attn.q_proj.weight")
    with pytest.raises(NonFiniteError, match=r"^text encoder output has non-finite values") as info:
        gen(pipe)
    assert info.value.stage == "text encoder" and info.value.step is None


def test_inf_in_vae_decoder_conv_out_names_vae_decode():
    pipe = tiny_pipeline(0)
    poison(pipe.vae, "decoder.conv_out.weight", math.inf)
    with pytest.raises(NonFiniteError, match=r"^VAE decode output has non-finite values") as info:
        gen(pipe)
    assert info.value.stage == "VAE decode"


def test_nan_vae_encoder_names_vae_encode_for_img2img():
    pipe = tiny_pipeline(0)
    poison(pipe.vae, "encoder.conv_in.weight")
    with pytest.raises(NonFiniteError, match=r"^VAE encode output") as info:
        gen(pipe, init_image=Image.new("RGB", (32, 32), "white"), strength=0.5)
    assert info.value.stage == "VAE encode"
    gen(pipe)  # txt2img does not use the encoder


def _nan_from_step(pipe, first_bad_call=None):
    """Make the UNet return NaN once the sampler has finished step 1 (or from its `first_bad_call`-th call)."""
    state = {"calls": 0, "bad": False}
    forward = pipe.unet.forward

    def unet(x, t, c, y=None, **kw):
        state["calls"] += 1
        out = forward(x, t, c, y, **kw)
        bad = state["bad"] if first_bad_call is None else state["calls"] >= first_bad_call
        return torch.full_like(out, math.nan) if bad else out

    def after_step(step, total, x):
        state["bad"] = step >= 1

    pipe.unet.forward = unet
    return after_step


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_names_the_step_whose_model_call_failed(sampler):
    pipe = tiny_pipeline(0)
    seen = []
    after_step = _nan_from_step(pipe)
    callback = lambda step, total, x: seen.append(step) or after_step(step, total, x)  # noqa: E731
    with pytest.raises(NonFiniteError, match=r"UNet output at step 2 of 3") as info:
        gen(pipe, steps=3, sampler=sampler, callback=callback)
    assert (info.value.stage, info.value.step, info.value.total) == ("UNet", 2, 3)
    assert seen == [1]  # the user's callback still runs, once per completed step


def test_heun_second_call_names_its_own_step():
    pipe = tiny_pipeline(0)
    _nan_from_step(pipe, first_bad_call=2)  # Heun's correction call within step 1
    with pytest.raises(NonFiniteError, match=r"at step 1 of 3"):
        gen(pipe, steps=3, sampler="heun")


def test_img2img_steps_count_from_the_first_step_run():
    pipe = tiny_pipeline(0)
    after_step = _nan_from_step(pipe)
    with pytest.raises(NonFiniteError, match=r"at step 2 of 2"):
        gen(pipe, steps=4, init_image=Image.new("RGB", (32, 32), "white"), strength=0.5, callback=after_step)


def test_healthy_generation_is_unchanged_by_the_checks():
    pipe = tiny_pipeline(0)
    calls = []
    r = gen(pipe, steps=3, sampler="heun", callback=lambda *a: calls.append(a[:2]))
    assert calls == [(1, 3), (2, 3), (3, 3)] and np.isfinite(r.pixels).all()
    # the checks only read: the same images as driving the sampler with the bare CFG denoiser
    from clipdiffusion.diffusion import samplers

    real, seen = samplers.SAMPLERS["heun"], []

    def bare(den, x, sigmas, **kw):
        seen.append(type(den).__name__)
        return real(den.denoiser, x, sigmas, **kw)

    samplers.SAMPLERS["heun"] = bare
    try:
        again = gen(pipe, steps=3, sampler="heun")
    finally:
        samplers.SAMPLERS["heun"] = real
    assert seen == ["_FiniteDenoiser"]
    np.testing.assert_array_equal(again.pixels, r.pixels)


# ---- CLI --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from clipdiffusion.checkpoints.save import save_checkpoint

    root = tmp_path_factory.mktemp("nonfinite")
    clean = save_checkpoint(tiny_pipeline(0, "tiny"), root / "clean.safetensors")
    pipe = tiny_pipeline(0, "tiny")
    poison(pipe.unet, UNET_KEY, index=5)
    poisoned = save_checkpoint(pipe, root / "poisoned.safetensors")
    return root, clean, poisoned


def test_cli_generate_with_a_poisoned_unet_exits_2_naming_the_stage_and_writes_no_png(files, capsys):
    root, _, poisoned = files
    out = root / "out.png"
    assert main(["generate", "x", "--model", str(poisoned), "--steps", "2", "--seed", "1", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"clipdiffusion generate: error: {poisoned}: UNet output at step 1 of 2 has non-finite")
    assert f"info --check {poisoned}`" in err
    assert not out.exists()


def test_info_check_names_the_poisoned_tensor_and_exits_1(files, capsys):
    _, _, poisoned = files
    assert main(["info", str(poisoned), "--check"]) == 1
    out = capsys.readouterr().out
    assert "1 non-finite" in out
    assert f"model.diffusion_model.{UNET_KEY} (F32 32x4x3x3): 1 NaN, 0 Inf of 1152" in out
    assert main(["info", str(poisoned), "--check", "--json"]) == 1
    check = json.loads(capsys.readouterr().out)["check"]
    assert check["scanned"] and check["nonfinite_tensors"] == 1 and check["bytes"] > 0 and check["seconds"] >= 0
    assert check["nonfinite"] == [{"name": f"model.diffusion_model.{UNET_KEY}", "file": "poisoned.safetensors",
                                   "dtype": "F32", "shape": [32, 4, 3, 3], "nan": 1, "inf": 0, "numel": 1152}]


def test_info_check_on_a_clean_file_reports_zero_and_without_check_says_nothing_was_scanned(files, capsys):
    _, clean, poisoned = files
    assert main(["info", str(clean), "--check"]) == 0
    out = capsys.readouterr().out
    assert "0 non-finite" in out and "scanned " in out and " s: " in out
    assert main(["info", str(poisoned)]) == 0  # no scan, no verdict
    assert "weights not scanned for NaN/Inf (use --check)" in capsys.readouterr().out
    assert main(["info", str(poisoned), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["check"]["scanned"] is False


def test_info_check_on_a_diffusers_folder_names_file_and_tensor(files, capsys):
    from clipdiffusion.checkpoints.save import save_diffusers
    from clipdiffusion.pipeline import Pipeline

    root, _, poisoned = files
    folder = save_diffusers(Pipeline.from_file(poisoned), root / "poisoned-diffusers")
    assert main(["info", str(folder), "--check", "--json"]) == 1
    check = json.loads(capsys.readouterr().out)["check"]
    assert check["nonfinite_tensors"] == 1
    item = check["nonfinite"][0]
    assert item["file"] == "unet/diffusion_pytorch_model.safetensors" and item["name"] == "conv_in.weight"
    assert item["nan"] == 1


def test_info_check_scans_in_batches(files, capsys, monkeypatch):
    from clipdiffusion.commands import info as cli_info

    _, _, poisoned = files
    monkeypatch.setattr(cli_info, "SCAN_BATCH_BYTES", 4096)  # most tensors alone, the small ones together
    whole = cli_info.scan_nonfinite(poisoned)
    assert whole["nonfinite_tensors"] == 1 and whole["tensors"] > 100


# ---- server -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    from clipdiffusion.server.app import create_app
    from clipdiffusion.server.settings import ModelEntry, ServerSettings
    from server_fixtures import ServerThread

    def factory(name):
        pipe = tiny_pipeline(0)
        if name == "nan":
            poison(pipe.unet, UNET_KEY)
        return pipe

    settings = ServerSettings(models=(ModelEntry("tiny"), ModelEntry("nan")), max_width=64, max_height=64)
    with ServerThread(create_app(factory, settings)) as running, \
            httpx.Client(base_url=running.url, timeout=60) as client:
        yield client


@pytest.mark.parametrize("prompt", ["", "   ", "BREAK", "\u0000"])
def test_server_generate_with_an_empty_prompt_returns_empty_attention(server, prompt):
    r = server.post("/api/generate", json={"prompt": prompt, "steps": 2, "seed": 1, "attention_maps": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["attention"] == {"tokens": [], "maps": []} and len(body["images"]) == 1


def test_server_answers_500_naming_the_stage_for_a_poisoned_model(server):
    r = server.post("/api/generate", json={"prompt": "a cat", "steps": 2, "seed": 1, "model": "nan"})
    assert r.status_code == 500, r.text
    body = r.json()
    assert body["error"] == "NonFiniteError" and body["detail"].startswith("nan: UNet output at step 1 of 2")
    r = server.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 2, "seed": 1, "width": 32, "height": 32,
                                               "override_settings": {"sd_model_checkpoint": "nan"}})
    assert r.status_code == 500 and r.json()["error"] == "NonFiniteError", r.text
    # the worker goes on with the healthy model
    assert server.post("/api/generate", json={"prompt": "a cat", "steps": 2, "model": "tiny"}).status_code == 200
