"""Device and dtype placement (issue 19 part 1): ``devices.resolve`` on faked CPUs and faked CUDA, the family
table's fp16 VAE rule, every dtype path on tiny random models against fp32, the seed's noise on every dtype, and
the ``--device``/``--dtype`` flags.

Nothing here depends on the CPU the tests run on: CPU capability comes from a faked cpuinfo file, CUDA from
monkeypatched ``torch.cuda`` functions. Speed is never asserted.

Bounds against fp32, measured on ``tiny_pipeline(0)`` (32x32, euler, 2 steps, seed 3, torch 2.13 CPU), as mean
|pixel difference| in [0, 1] units (max in brackets): sd1 bf16 everywhere 0.0048 (0.031), fp16 everywhere 0.0006
(0.005), bf16 UNet/VAE with an fp32 text encoder (auto on an AMX CPU) 0.0048 (0.027); sdxl bf16 0.0046 (0.032).
The tests allow mean < 0.01 for bf16 and < 0.002 for fp16 (about 2-3x), and require a difference > 0, so a path
that silently ran in fp32 fails.
"""

import dataclasses

import numpy as np
import pytest
import torch

from clipdiffusion import devices, families
from clipdiffusion.cli import main
from clipdiffusion.errors import ClipDiffusionError
from clipdiffusion.testing import tiny_pipeline

EPYC_AVX2 = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 ht syscall nx mmxext lm avx avx2 fma bmi2 sha_ni"
XEON_AMX = EPYC_AVX2 + " avx512f avx512bw avx512vl avx512_bf16 amx_bf16 amx_tile amx_int8"
ZEN4 = EPYC_AVX2 + " avx512f avx512bw avx512vl avx512_bf16"
PROMPT = dict(prompt="a red circle", steps=2, seed=3, width=32, height=32)


def fake_cpu(monkeypatch, tmp_path, flags, name="cpuinfo"):
    path = tmp_path / name
    path.write_text(f"processor\t: 0\nvendor_id\t: Fake\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    monkeypatch.setattr(devices, "CPUINFO_PATH", str(path))


def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def fake_cuda(monkeypatch, count=1, bf16=True):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


# ---- resolve: CPU ---------------------------------------------------------------------------------------------

def test_auto_on_an_amx_cpu_is_bf16_unet_and_vae_with_an_fp32_text_encoder(monkeypatch, tmp_path):
    no_cuda(monkeypatch)
    fake_cpu(monkeypatch, tmp_path, XEON_AMX)
    p = devices.resolve("auto", "auto")
    assert (p.device, p.unet_dtype, p.text_dtype, p.vae_dtype) == ("cpu", "bf16", "fp32", "bf16")
    assert "amx_bf16" in p.reason and "no CUDA GPU" in p.reason
    assert p.torch_dtype("unet") is torch.bfloat16 and p.torch_dtype("text") is torch.float32


def test_auto_on_avx512_bf16_without_amx_is_bf16(monkeypatch, tmp_path):
    no_cuda(monkeypatch)
    fake_cpu(monkeypatch, tmp_path, ZEN4)
    assert devices.resolve("cpu", "auto").unet_dtype == "bf16"


def test_auto_on_an_avx2_only_epyc_is_fp32(monkeypatch, tmp_path):
    no_cuda(monkeypatch)
    fake_cpu(monkeypatch, tmp_path, EPYC_AVX2)
    p = devices.resolve("auto", "auto")
    assert (p.device, p.unet_dtype, p.text_dtype, p.vae_dtype) == ("cpu", "fp32", "fp32", "fp32")
    assert p.is_default and "no amx_bf16 or avx512_bf16" in p.reason


def test_unreadable_cpuinfo_without_lscpu_is_fp32(monkeypatch, tmp_path):
    no_cuda(monkeypatch)
    monkeypatch.setattr(devices, "CPUINFO_PATH", str(tmp_path / "missing"))
    monkeypatch.setattr(devices, "_lscpu_flags", lambda: frozenset())
    assert devices.resolve().unet_dtype == "fp32"


def test_explicit_dtypes_on_the_cpu(monkeypatch, tmp_path):
    fake_cpu(monkeypatch, tmp_path, EPYC_AVX2)
    assert devices.resolve("cpu", "fp32") == devices.Placement("cpu", "fp32", "fp32", "fp32", "as asked")
    bf16 = devices.resolve("cpu", "bf16")
    assert (bf16.unet_dtype, bf16.text_dtype, bf16.vae_dtype) == ("bf16",) * 3 and "emulated" in bf16.reason
    fp16 = devices.resolve("cpu", "fp16")  # allowed, with a note: torch runs fp16 on the CPU, slowly
    assert fp16.unet_dtype == "fp16" and "slow" in fp16.reason
    assert devices.resolve("cpu", torch.bfloat16).unet_dtype == "bf16"  # torch dtypes and their names too
    assert devices.resolve("cpu", "float16").unet_dtype == "fp16"


# ---- resolve: CUDA (faked) and the family table's VAE rule -----------------------------------------------------

@pytest.mark.parametrize("family", ["sd1", "sd2", "tiny"])
def test_auto_with_a_gpu_is_fp16(monkeypatch, family):
    fake_cuda(monkeypatch)
    p = devices.resolve("auto", "auto", family=family)
    assert (p.device, p.unet_dtype, p.text_dtype, p.vae_dtype) == ("cuda:0", "fp16", "fp16", "fp16")


@pytest.mark.parametrize("bf16, vae", [(True, "bf16"), (False, "fp32")])
def test_the_sdxl_vae_is_upcast_on_a_gpu(monkeypatch, bf16, vae):
    fake_cuda(monkeypatch, bf16=bf16)
    for dtype in ("auto", "fp16"):
        p = devices.resolve("cuda", dtype, family="sdxl")
        assert (p.unet_dtype, p.text_dtype, p.vae_dtype) == ("fp16", "fp16", vae)
        assert "sdxl VAE overflows in fp16" in p.reason
    assert devices.resolve("cuda", "auto").vae_dtype == "fp16"  # no family: no rule to apply
    assert devices.resolve("cuda", "bf16", family="sdxl").vae_dtype == "bf16"
    assert devices.resolve("cuda", "fp32", family="sdxl").vae_dtype == "fp32"


def test_the_vae_rule_is_read_from_the_family_record_not_its_name(monkeypatch):
    assert families.get_family("sdxl").vae_fp16_overflows
    assert not any(families.get_family(n).vae_fp16_overflows for n in ("sd1", "sd2", "tiny"))
    fake_cuda(monkeypatch)
    overflowing_sd1 = dataclasses.replace(families.SD1, vae_fp16_overflows=True)
    assert devices.resolve("auto", "auto", family=overflowing_sd1).vae_dtype == "bf16"


def test_cuda_device_indices(monkeypatch):
    fake_cuda(monkeypatch, count=2)
    assert devices.resolve("cuda:1", "auto").device == "cuda:1"
    assert devices.resolve("cuda", "auto").device == "cuda:0"
    with pytest.raises(ClipDiffusionError, match=r"device='cuda:2': there are 2 CUDA GPUs"):
        devices.resolve("cuda:2", "auto")


def test_cuda_without_a_gpu_is_an_error_naming_the_value(monkeypatch):
    no_cuda(monkeypatch)
    with pytest.raises(ClipDiffusionError, match=r"device='cuda': no CUDA GPU is available"):
        devices.resolve("cuda", "fp16")


@pytest.mark.parametrize("device", ["gpu", "mps", "cuda:x", "cuda:-1", "", None, 3])
def test_bad_devices_are_named(device):
    with pytest.raises(ClipDiffusionError, match=r"device=.*choose from auto, cpu, cuda"):
        devices.resolve(device, "fp32")


@pytest.mark.parametrize("dtype", ["int8", "fp64", "", None, torch.float64, torch.int8, 16])
def test_bad_dtypes_are_named(dtype):
    with pytest.raises(ClipDiffusionError, match=r"dtype=.*choose from auto, fp32, bf16, fp16"):
        devices.resolve("cpu", dtype)


# ---- generation in every dtype on tiny random models ----------------------------------------------------------

@pytest.fixture(scope="module")
def fp32_result():
    return tiny_pipeline(0).generate(**PROMPT)


def _dtypes(pipe):
    return tuple(next(m.parameters()).dtype for m in (pipe.unet, pipe.text_encoder.encoders[0].model, pipe.vae))


@pytest.mark.parametrize("dtype, bound", [("bf16", 0.01), ("fp16", 0.002)])
def test_half_precision_generation_is_close_to_fp32(fp32_result, monkeypatch, tmp_path, dtype, bound):
    fake_cpu(monkeypatch, tmp_path, EPYC_AVX2)
    pipe = tiny_pipeline(0)
    placement = pipe.place("cpu", dtype)
    half = getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[dtype])
    assert _dtypes(pipe) == (half, half, half) and pipe.placement is placement
    result = pipe.generate(**PROMPT)
    diff = np.abs(result.pixels - fp32_result.pixels)
    assert 0 < diff.mean() < bound, diff.mean()  # it really ran in half precision, and stayed close
    assert result.pixels.dtype == np.float32
    # the placement is in the notes; A1111's infotext has no key for it, so the infotext is fp32's
    assert any(n.startswith(f"placement: cpu {dtype}") for n in result.notes), result.notes
    assert result.infotexts == fp32_result.infotexts


def test_auto_on_an_amx_cpu_generates_with_mixed_dtypes(fp32_result, monkeypatch, tmp_path):
    no_cuda(monkeypatch)
    fake_cpu(monkeypatch, tmp_path, XEON_AMX)
    pipe = tiny_pipeline(0)
    pipe.place("auto", "auto")
    assert _dtypes(pipe) == (torch.bfloat16, torch.float32, torch.bfloat16)
    result = pipe.generate(**PROMPT)
    assert 0 < np.abs(result.pixels - fp32_result.pixels).mean() < 0.01
    assert any("UNet bf16, text encoder fp32, VAE bf16" in n for n in result.notes)


def test_default_placement_adds_no_note(fp32_result):
    pipe = tiny_pipeline(0)
    pipe.place("cpu", "fp32")
    result = pipe.generate(**PROMPT)
    assert result.notes == () and np.array_equal(result.pixels, fp32_result.pixels)


def test_sdxl_in_bf16_on_the_cpu():
    ref = tiny_pipeline(0, family="sdxl").generate(**PROMPT)
    pipe = tiny_pipeline(0, family="sdxl")
    pipe.place("cpu", "bf16")
    out = pipe.generate(**PROMPT)
    assert 0 < np.abs(out.pixels - ref.pixels).mean() < 0.01


def _first_latents(monkeypatch, pipe, **kw):
    """The latents the sampler starts from (the seed's noise times the first sigma)."""
    from clipdiffusion.diffusion import samplers

    seen = []
    real = samplers.get_sampler

    def recording(name):
        sample = real(name)

        def run(denoiser, x, sigmas, **kwargs):
            seen.append(x.clone())
            return sample(denoiser, x, sigmas, **kwargs)

        return run

    monkeypatch.setattr(samplers, "get_sampler", recording)
    pipe.generate(**{**PROMPT, "steps": 1, **kw})
    return seen[0]


def test_a_seed_gives_the_same_initial_noise_in_every_dtype(monkeypatch):
    ref = _first_latents(monkeypatch, tiny_pipeline(0), batch_size=2)
    for dtype in ("bf16", "fp16"):
        pipe = tiny_pipeline(0)
        pipe.place("cpu", dtype)
        x = _first_latents(monkeypatch, pipe, batch_size=2)
        assert x.dtype == torch.float32 and torch.equal(x, ref)


def test_the_vae_posterior_noise_is_drawn_in_fp32():
    from clipdiffusion.diffusion.vae import DiagonalGaussian

    moments = torch.randn(1, 8, 4, 4, generator=torch.Generator().manual_seed(1))
    full = DiagonalGaussian(moments).sample(torch.Generator().manual_seed(7))
    half = DiagonalGaussian(moments.bfloat16()).sample(torch.Generator().manual_seed(7))
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    g = DiagonalGaussian(moments.bfloat16())
    assert half.dtype == torch.float32
    assert torch.allclose(half, g.mean.float() + g.std.float() * noise, atol=0, rtol=0)
    assert torch.allclose(full, half, atol=0.05)


# ---- loading placed ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    from clipdiffusion.checkpoints.save import save_checkpoint

    path = tmp_path_factory.mktemp("model") / "tiny-random.safetensors"
    save_checkpoint(tiny_pipeline(0), path)
    return path


def test_from_file_places_the_model(model_file, monkeypatch, tmp_path):
    from clipdiffusion.pipeline import Pipeline

    assert _dtypes(Pipeline.from_file(model_file)) == (torch.float32,) * 3
    assert Pipeline.from_file(model_file).placement.reason == "as asked"
    assert _dtypes(Pipeline.from_file(model_file, dtype="bf16")) == (torch.bfloat16,) * 3
    no_cuda(monkeypatch)
    fake_cpu(monkeypatch, tmp_path, XEON_AMX)
    pipe = Pipeline.from_file(model_file, device="auto", dtype="auto")  # mixed: loaded, then placed
    assert _dtypes(pipe) == (torch.bfloat16, torch.float32, torch.bfloat16)
    assert pipe.placement.unet_dtype == "bf16"
    assert _dtypes(Pipeline.from_file(model_file, dtype=None)) == (torch.float32,) * 3  # the stored dtypes
    with pytest.raises(ClipDiffusionError, match="dtype='int4'"):
        Pipeline.from_file(model_file, dtype="int4")
    with pytest.raises(ClipDiffusionError, match="device='cuda'"):
        Pipeline.from_file(model_file, device="cuda")


# ---- command line and server ------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["generate", "eval", "serve"])
@pytest.mark.parametrize("flag, value", [("--dtype", "int8"), ("--device", "gpu")])
def test_bad_flag_values_exit_2_naming_flag_and_value(command, flag, value, capsys, monkeypatch, tmp_path):
    import clipdiffusion.commands.eval as ce
    import clipdiffusion.commands.generate as cg

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad flag was refused")

    monkeypatch.setattr(cg, "load_pipeline", refuse)
    monkeypatch.setattr(ce, "_load", refuse)
    args = {"generate": ["x", "-o", str(tmp_path / "x.png")], "eval": ["--out", str(tmp_path / "ev")],
            "serve": ["--port", "1"]}[command]
    assert main([command, *args, flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{flag}='{value}'" in err[0], err
    assert not (tmp_path / "ev").exists()


def test_generate_passes_the_flags_and_prints_the_placement(monkeypatch, tmp_path, capsys):
    import clipdiffusion.commands.generate as cg

    asked = {}

    def load(model, prediction=None, text_encoder=None, *, device, dtype, vae=None):
        asked.update(device=device, dtype=dtype)
        assert vae is None  # no --vae given
        pipe = tiny_pipeline(0)
        pipe.place(device, dtype)
        return pipe

    monkeypatch.setattr(cg, "load_pipeline", load)
    out = tmp_path / "x.png"
    assert main(["generate", "x", "--steps", "1", "--width", "32", "--height", "32", "--device", "CPU", "--dtype",
                 "bfloat16", "-o", str(out)]) == 0
    assert asked == {"device": "cpu", "dtype": "bf16"}
    assert "note: placement: cpu bf16" in capsys.readouterr().err
    from PIL import Image

    assert "bf16" not in Image.open(out).text["parameters"]


def test_serve_settings_and_api_info(monkeypatch):
    import argparse

    import httpx
    from server_fixtures import ServerThread, fake_factory

    from clipdiffusion.commands import serve
    from clipdiffusion.server.app import create_app
    from clipdiffusion.server.settings import ServerSettings

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    settings = serve.build_settings(parser.parse_args(["--device", "auto", "--dtype", "fp16"]))
    assert (settings.device, settings.dtype) == ("auto", "fp16")
    assert (ServerSettings().device, ServerSettings().dtype) == ("cpu", "fp32")
    with pytest.raises(ClipDiffusionError, match="dtype='fp8'"):
        ServerSettings(dtype="fp8")
    no_cuda(monkeypatch)
    with ServerThread(create_app(fake_factory(), settings)) as server, httpx.Client(base_url=server.url) as c:
        placement = c.get("/api/info").json()["placement"]
    assert placement["device"] == "auto" and placement["dtype"] == "fp16"
    assert placement["resolved"]["device"] == "cpu" and placement["resolved"]["unet_dtype"] == "fp16"


def test_info_says_what_auto_picks_here(model_file, monkeypatch, tmp_path, capsys):
    import json

    no_cuda(monkeypatch)
    fake_cpu(monkeypatch, tmp_path, XEON_AMX)
    assert main(["info", str(model_file), "--json"]) == 0
    auto = json.loads(capsys.readouterr().out)["auto_placement"]
    assert (auto["device"], auto["unet_dtype"], auto["text_dtype"]) == ("cpu", "bf16", "fp32")
    assert main(["info", str(model_file)]) == 0
    assert "auto:       cpu UNet bf16, text encoder fp32, VAE bf16" in capsys.readouterr().out
