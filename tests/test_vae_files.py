"""Separate VAE files (issue 20 part 6): the layouts read (LDM with and without ``first_stage_model.``, as
safetensors and as a weights-only ``.ckpt``; diffusers AutoencoderKL folder and file), decode parity with diffusers'
``AutoencoderKL`` on the same weights (max abs difference < ATOL = 1e-4 in fp32, as tests/test_vae.py), the model's
scale factor kept, swap and bit-exact restore, A1111's "VAE"/"VAE hash" infotext, hostile files refused with the
file named, and the server: ``GET /sdapi/v1/sd-vae``, ``POST /sdapi/v1/refresh-vae``, the ``sd_vae`` option and
``override_settings.sd_vae``, ``serve --vae/--vae-dir`` and ``generate --vae``."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import pickle

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from clipdiffusion.checkpoints.diffusers_vae import vae_diffusers_to_ldm
from clipdiffusion.checkpoints.safetensors_io import save_file
from clipdiffusion.checkpoints.vae_files import VaeLibrary, load_vae_file, scan_vae_folder, vae_hash
from clipdiffusion.diffusion import vae as V
from clipdiffusion.errors import CheckpointError
from clipdiffusion.infotext import format_infotext, parse_infotext
from clipdiffusion.testing import tiny_pipeline

ATOL = 1e-4  # fp32, against diffusers' AutoencoderKL on the same weights
LAYOUTS = ("ldm", "prefixed", "ckpt", "diffusers_folder", "diffusers_file", "pipeline_folder")


def _reference(seed=0):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    ref = diffusers.AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=0.13025).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ref


@pytest.fixture(scope="module")
def ref():
    return _reference()


@pytest.fixture(scope="module")
def files(ref, tmp_path_factory):
    """The reference VAE's weights in every layout a VAE file comes in."""
    root = tmp_path_factory.mktemp("vaes")
    ldm = vae_diffusers_to_ldm(ref.state_dict(), V.TINY)
    out = {"ldm": root / "vae-ft-tiny.safetensors", "prefixed": root / "prefixed.safetensors",
           "ckpt": root / "vae-ft-tiny.vae.ckpt"}
    save_file(ldm, out["ldm"])
    # A1111 skips the training checkpoint's loss.* and model_ema scalars
    extra = {"loss.logvar": torch.zeros(()), "model_ema.decay": torch.tensor(0.999)}
    save_file({**{f"first_stage_model.{k}": v for k, v in ldm.items()}, **extra}, out["prefixed"])
    torch.save({"state_dict": {f"first_stage_model.{k}": v for k, v in ldm.items()}, "global_step": 840000},
               out["ckpt"])
    folder = root / "tiny-vae-diffusers"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(ref.config)))
    save_file(dict(ref.state_dict()), folder / "diffusion_pytorch_model.safetensors")
    out["diffusers_folder"] = folder
    out["diffusers_file"] = folder / "diffusion_pytorch_model.safetensors"
    pipeline = root / "pipeline"
    (pipeline / "vae").mkdir(parents=True)
    (pipeline / "model_index.json").write_text("{}")
    (pipeline / "vae" / "config.json").write_text(json.dumps(dict(ref.config)))
    save_file(dict(ref.state_dict()), pipeline / "vae" / "diffusion_pytorch_model.safetensors")
    out["pipeline_folder"] = pipeline
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_decodes_and_encodes_as_diffusers(layout, files, ref):
    pipe = tiny_pipeline(0)
    own_scale = pipe.vae.config.scale_factor
    pipe.replace_vae(files[layout])
    assert pipe.vae.config.scale_factor == own_scale == 0.18215  # the model's, not the file's 0.13025
    latents = torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(2))
    pixels = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        got, expected = pipe.vae.decode(latents), ref.decode(latents).sample
        mean, expected_mean = pipe.vae.encode(pixels).mean, ref.encode(pixels).latent_dist.mean
    assert got.shape == (2, 3, 12, 20)
    assert (got - expected).abs().max() < ATOL
    assert (mean - expected_mean).abs().max() < ATOL


def test_loader_reports_layout_ignored_keys_and_the_scale_note(files):
    loaded = load_vae_file(files["prefixed"], V.TINY)
    assert loaded.layout == "ldm" and loaded.ignored == ("loss.logvar", "model_ema.decay")
    diffusers = load_vae_file(files["diffusers_folder"], V.TINY)
    assert diffusers.layout == "diffusers" and diffusers.path == files["diffusers_file"]
    assert any("scaling_factor 0.13025" in n and "0.18215 is kept" in n for n in diffusers.notes)
    assert not any(str(files["diffusers_folder"]) in n for n in diffusers.notes)  # served to clients: no paths
    # an SDXL-style model (scale 0.13025) keeps its own factor with any VAE file
    sdxl = load_vae_file(files["ldm"], dataclasses.replace(V.TINY, scale_factor=0.13025))
    assert sdxl.vae.config.scale_factor == 0.13025 and sdxl.notes == ()


def test_generation_decodes_its_latents_with_the_file_and_the_model_scale(files, ref):
    """End to end: the image is diffusers' decode of the sampler's final latents / the model's scale factor."""
    pipe = tiny_pipeline(0)
    pipe.replace_vae(files["ckpt"])
    seen = []
    result = pipe.generate("a red circle", steps=2, seed=5, callback=lambda step, total, x: seen.append(x.clone()))
    with torch.no_grad():
        expected = (ref.decode(seen[-1] / 0.18215).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(result.pixels - expected).max() < ATOL


def test_swap_and_restore_bit_exact(files):
    pipe = tiny_pipeline(0)
    own = pipe.vae
    weights = {k: v.clone() for k, v in own.state_dict().items()}
    before = pipe.generate("a cat", steps=2, seed=1)
    pipe.replace_vae(files["ldm"])
    swapped = pipe.generate("a cat", steps=2, seed=1)
    assert np.abs(swapped.pixels - before.pixels).max() > 0.05  # another VAE, another image
    pipe.replace_vae(files["diffusers_folder"])  # file to file: the checkpoint's own is still the one kept
    pipe.replace_vae(None)
    after = pipe.generate("a cat", steps=2, seed=1)
    assert pipe.vae is own and all(torch.equal(v, own.state_dict()[k]) for k, v in weights.items())
    assert np.array_equal(after.pixels, before.pixels)
    assert after.infotexts == before.infotexts and not any("VAE" in n for n in after.notes)


def test_infotext_names_the_file_and_its_a1111_hash(files):
    pipe = tiny_pipeline(0)
    pipe.replace_vae(files["ldm"])
    result = pipe.generate("a cat", steps=1, seed=3)
    digest = hashlib.sha256(files["ldm"].read_bytes()).hexdigest()[:10]
    last = result.infotexts[0].splitlines()[-1]
    assert f"Model: tiny-random-sd1, VAE hash: {digest}, VAE: vae-ft-tiny.safetensors" in last
    assert vae_hash(files["ldm"]) == digest == pipe.vae_hash
    parsed = parse_infotext(result.infotexts[0])
    assert parsed.extra["VAE"] == "vae-ft-tiny.safetensors" and parsed.extra["VAE hash"] == digest
    assert format_infotext(parsed) == result.infotexts[0]  # A1111's order survives a round trip
    assert "VAE: vae-ft-tiny.safetensors replaces the model's own" in result.notes


# --- hostile files ---------------------------------------------------------------------------------------------


def _ldm(pipe):
    return {k: v.clone() for k, v in pipe.vae.state_dict().items()}


def _refused(pipe, path, *needles):
    own = pipe.vae
    with pytest.raises(CheckpointError) as info:
        pipe.replace_vae(path)
    assert str(path) in str(info.value), str(info.value)
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    assert pipe.vae is own  # nothing changed
    return str(info.value)


def test_wrong_shapes_missing_and_stray_keys_are_refused(tmp_path):
    pipe = tiny_pipeline(0)
    sd = _ldm(pipe)
    sd["decoder.conv_in.weight"] = torch.zeros(64, 8, 3, 3)  # 8 latent channels: another model's VAE
    save_file(sd, tmp_path / "shapes.safetensors")
    _refused(pipe, tmp_path / "shapes.safetensors", "wrong shape", "decoder.conv_in.weight", "[64, 8, 3, 3]")
    sd = _ldm(pipe)
    del sd["post_quant_conv.bias"]
    save_file(sd, tmp_path / "missing.safetensors")
    _refused(pipe, tmp_path / "missing.safetensors", "missing", "post_quant_conv.bias")
    bigger = V.AutoencoderKL(dataclasses.replace(V.TINY, ch_mult=(1, 2, 2)))  # a level more: x4
    save_file(bigger.state_dict(), tmp_path / "deeper.safetensors")
    _refused(pipe, tmp_path / "deeper.safetensors", "unexpected (28)", "decoder.up.2.block.0")
    sd = {f"first_stage_model.{k}": v for k, v in _ldm(pipe).items()}
    sd["model.diffusion_model.out.2.weight"] = torch.zeros(4, 4, 3, 3)  # a whole checkpoint is not a VAE file
    save_file(sd, tmp_path / "checkpoint.safetensors")
    _refused(pipe, tmp_path / "checkpoint.safetensors", "not a VAE file", "model.diffusion_model.out.2.weight")
    sd = _ldm(pipe)
    sd["quant_conv.weight"] = sd["quant_conv.weight"].to(torch.int32)
    save_file(sd, tmp_path / "ints.safetensors")
    _refused(pipe, tmp_path / "ints.safetensors", "quant_conv.weight (I32)")
    diffusers = vae_diffusers_to_ldm  # noqa: F841 (the diffusers layout goes through the same key check)
    folder = tmp_path / "d"
    folder.mkdir()
    save_file({"encoder.down_blocks.0.resnets.0.conv1.weight": torch.zeros(32, 32, 3, 3),
               "encoder.down_blocks.9.resnets.0.conv1.weight": torch.zeros(32, 32, 3, 3)},
              folder / "diffusion_pytorch_model.safetensors")
    _refused(pipe, folder, "does not fit this model's VAE")


def test_nan_truncated_and_pickled_code_are_refused(tmp_path):
    pipe = tiny_pipeline(0)
    sd = _ldm(pipe)
    sd["decoder.conv_out.bias"][1] = float("nan")
    save_file(sd, tmp_path / "nan.safetensors")
    _refused(pipe, tmp_path / "nan.safetensors", "non-finite", "decoder.conv_out.bias")
    save_file(_ldm(pipe), tmp_path / "whole.safetensors")
    data = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    _refused(pipe, tmp_path / "truncated.safetensors")
    (tmp_path / "header.safetensors").write_bytes(data[:5])
    _refused(pipe, tmp_path / "header.safetensors")

    class Payload:
        def __reduce__(self):
            import os

            return os.system, ("echo pwned > " + str(tmp_path / "pwned"),)

    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}, "x": Payload()}, tmp_path / "evil.ckpt")
    message = _refused(pipe, tmp_path / "evil.ckpt", "weights-only")
    assert not (tmp_path / "pwned").exists(), message
    (tmp_path / "plain.pt").write_bytes(pickle.dumps({"encoder.conv_in.weight": [1, 2]}))
    _refused(pipe, tmp_path / "plain.pt")
    _refused(pipe, tmp_path / "absent.safetensors", "no such file")


# --- the file list -------------------------------------------------------------------------------------------


def test_folder_scan_names_files_and_diffusers_folders(files, tmp_path):
    names = [e.name for e in scan_vae_folder(files["ldm"].parent)]
    assert names == ["pipeline", "prefixed.safetensors", "tiny-vae-diffusers", "vae-ft-tiny.safetensors",
                     "vae-ft-tiny.vae.ckpt"]
    library = VaeLibrary([files["ldm"].parent], files=[files["ldm"]])
    assert library.get("vae-ft-tiny.safetensors").describe() == {"model_name": "vae-ft-tiny.safetensors",
                                                                "filename": "vae-ft-tiny.safetensors"}
    assert library.resolve("None") is None and library.resolve("Automatic") is None
    assert library.resolve("Automatic", default="/x.safetensors") == "/x.safetensors"
    checkpoint = files["ldm"].parent / "vae-ft-tiny.safetensors"  # a checkpoint with a .vae.ckpt beside it
    assert library.resolve("Automatic", model_path=checkpoint) == str(files["ckpt"])
    with pytest.raises(Exception) as info:
        library.resolve("nope.pt", field="override_settings.sd_vae")
    assert "override_settings.sd_vae" in str(info.value) and "'nope.pt'" in str(info.value)
    assert "vae-ft-tiny.safetensors" in str(info.value)


# --- server and command line ---------------------------------------------------------------------------------


@pytest.fixture
def served(files, tmp_path):
    from server_fixtures import ServerThread

    from clipdiffusion.server.app import create_app
    from clipdiffusion.server.settings import ServerSettings

    folder = tmp_path / "VAE"
    folder.mkdir()
    (folder / "ft.safetensors").write_bytes(files["ldm"].read_bytes())
    settings = ServerSettings(vae_dirs=(str(folder),), samplers=("euler",), schedules=("normal",))
    pipes = {}

    def factory(name):
        pipes[name] = tiny_pipeline(seed=0)
        return pipes[name]

    with ServerThread(create_app(factory, settings)) as server, \
            httpx.Client(base_url=server.url, timeout=120) as client:
        yield client, folder, pipes


def _png_pixels(b64):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_server_sd_vae_routes_options_and_overrides(served, files):
    client, folder, _ = served
    assert client.get("/sdapi/v1/sd-vae").json() == [{"model_name": "ft.safetensors", "filename": "ft.safetensors"}]
    body = {"prompt": "a cat", "steps": 2, "seed": 4, "width": 32, "height": 32, "sampler_name": "Euler"}
    own = client.post("/sdapi/v1/txt2img", json=body).json()
    info = json.loads(own["info"])
    assert info["sd_vae_name"] is None and "VAE" not in info["infotexts"][0]
    assert client.get("/sdapi/v1/options").json()["sd_vae"] == "Automatic"

    bad = client.post("/sdapi/v1/options", json={"sd_vae": "missing.safetensors"})
    assert bad.status_code == 422 and "sd_vae" in bad.text and "missing.safetensors" in bad.text
    assert client.post("/sdapi/v1/options", json={"sd_vae": "ft.safetensors"}).json()["updated"] == ["sd_vae"]
    swapped = client.post("/sdapi/v1/txt2img", json=body).json()
    info = json.loads(swapped["info"])
    digest = hashlib.sha256(files["ldm"].read_bytes()).hexdigest()[:10]
    assert (info["sd_vae_name"], info["sd_vae_hash"]) == ("ft.safetensors", digest)
    assert f"VAE hash: {digest}, VAE: ft.safetensors" in info["infotexts"][0]
    assert not np.array_equal(_png_pixels(swapped["images"][0]), _png_pixels(own["images"][0]))

    # override_settings.sd_vae wins for one request; "None" is the checkpoint's own VAE, bit for bit
    back = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_vae": "None"}}).json()
    assert json.loads(back["info"])["sd_vae_name"] is None
    assert "override_settings.sd_vae" not in json.loads(back["info"])["ignored_fields"]
    assert np.array_equal(_png_pixels(back["images"][0]), _png_pixels(own["images"][0]))
    unknown = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_vae": "x.pt"}})
    assert unknown.status_code == 422
    assert unknown.json()["detail"][0]["loc"] == ["body", "override_settings", "sd_vae"] and "x.pt" in unknown.text

    (folder / "sub").mkdir()
    (folder / "sub" / "second.ckpt").write_bytes(files["ckpt"].read_bytes())
    assert client.post("/sdapi/v1/refresh-vae").status_code == 200
    listed = client.get("/sdapi/v1/sd-vae").json()
    assert {"model_name": "second.ckpt", "filename": "sub/second.ckpt"} in listed
    again = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_vae": "second.ckpt"}}).json()
    assert json.loads(again["info"])["sd_vae_name"] == "second.ckpt"
    assert np.array_equal(_png_pixels(again["images"][0]), _png_pixels(swapped["images"][0]))  # same weights

    # a broken file in the folder: a 422 naming it by its listed name (the server's paths stay private)
    pipe = tiny_pipeline(0)
    sd = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    sd["decoder.conv_out.weight"][0, 0, 0, 0] = float("inf")
    save_file(sd, folder / "broken.safetensors")
    client.post("/sdapi/v1/refresh-vae")
    broken = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_vae": "broken.safetensors"}})
    assert broken.status_code == 422 and "broken.safetensors" in broken.text and "non-finite" in broken.text
    assert str(folder) not in broken.text
    assert broken.json()["detail"][0]["loc"] == ["body", "override_settings", "sd_vae"]
    after = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_vae": "None"}}).json()
    assert np.array_equal(_png_pixels(after["images"][0]), _png_pixels(own["images"][0]))


def test_serve_flags_build_settings(files, tmp_path):
    import argparse

    from clipdiffusion.commands import serve
    from clipdiffusion.errors import ClipDiffusionError

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args(["--vae-path", str(files["ldm"]), "--vae-dir", str(tmp_path)])
    settings = serve.build_settings(args)
    assert settings.vae == str(files["ldm"]) and settings.vae_dirs == (str(tmp_path),)
    with pytest.raises(ClipDiffusionError, match="--vae-dir"):
        serve.build_settings(parser.parse_args(["--vae-dir", str(tmp_path / "none")]))
    with pytest.raises(ClipDiffusionError, match="--vae"):
        serve.build_settings(parser.parse_args(["--vae", str(tmp_path / "none.pt")]))


def test_generate_vae_flag(files, tmp_path, capsys):
    from clipdiffusion.checkpoints.save import save_checkpoint
    from clipdiffusion.cli import main

    model = tmp_path / "tiny.safetensors"
    save_checkpoint(tiny_pipeline(0), model)
    out = tmp_path / "out.png"
    args = ["generate", "--model", str(model), "--steps", "1", "--seed", "2", "a cat", "-o", str(out)]
    assert main([*args, "--vae", str(files["diffusers_folder"])]) == 0
    parsed = parse_infotext(Image.open(out).text["parameters"])
    assert parsed.extra["VAE"] == "tiny-vae-diffusers"
    assert parsed.extra["VAE hash"] == hashlib.sha256(files["diffusers_file"].read_bytes()).hexdigest()[:10]
    assert "VAE: tiny-vae-diffusers replaces the model's own" in capsys.readouterr().err
    assert main([*args, "--vae", str(tmp_path / "missing.safetensors")]) == 2
    assert "--vae" in capsys.readouterr().err
