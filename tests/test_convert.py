"""Our layouts are the real ones: diffusers reads what we write (single file and folder) and we read what diffusers
writes, with weights compared exactly; plus the `info` and `convert` commands."""

import json

import pytest
import torch

from clipdiffusion.commands.convert import convert
from clipdiffusion.checkpoints.load import load_checkpoint, load_diffusers
from clipdiffusion.checkpoints.save import save_checkpoint, save_diffusers
from clipdiffusion.cli import main
from test_checkpoint_load import assert_same_model, assert_same_weights, sd1_shaped_pickle, tiny_model

PIPELINE = {"tiny": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


def diffusers_pipeline_class(layout):
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    return getattr(diffusers, PIPELINE[layout])


def components(pipe):
    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if getattr(pipe, "text_encoder_2", None) else [])
    return {name: getattr(pipe, name).state_dict() for name in names}


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), f"{name}.{k}"


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tiny", "sd2", "sdxl"])
def test_diffusers_reads_our_single_file_like_our_folder(layout, tmp_path):
    """diffusers converts our single file with its own LDM tables (from_single_file) and reads our folder
    (from_pretrained): both must give the same tensors, and those must be ours."""
    cls = diffusers_pipeline_class(layout)
    model = tiny_model(layout)
    folder = save_diffusers(model, tmp_path / "folder")
    single = save_checkpoint(model, tmp_path / "model.safetensors")
    from_folder = cls.from_pretrained(str(folder), local_files_only=True)
    from_single = cls.from_single_file(str(single), config=str(folder), local_files_only=True)
    assert_same_state(components(from_folder), components(from_single))
    # text towers have our parameter names (HF CLIPTextModel's), so compare them to ours directly
    text = components(from_single)
    for spec, name in zip(model.text_encoder.encoders, ["text_encoder", "text_encoder_2"]):
        ours = spec.model.state_dict()
        theirs = {k.removeprefix("text_model."): v for k, v in text[name].items() if "position_ids" not in k}
        if layout == "sd2":  # diffusers' SD2 tower keeps 23 of 24 layers and no projection
            last = spec.model.config.layers - 1
            ours = {k: v for k, v in ours.items() if not k.startswith((f"encoder.layers.{last}.", "text_projection"))}
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # and the tokenizer files we generate tokenize like our tokenizer
    from clipdiffusion.text.tokenizer import CLIPTokenizer

    prompt = "A photo of an astronaut riding a horse, 4k, (masterpiece:1.2) naïve café"
    assert from_folder.tokenizer(prompt).input_ids[1:-1] == CLIPTokenizer().encode(prompt)


@pytest.mark.slow
def test_unet_output_matches_diffusers_on_our_weights(tmp_path):
    """Layout and math together: diffusers' UNet on the weights it converted from our file gives our output."""
    cls = diffusers_pipeline_class("tiny")
    model = tiny_model("tiny")
    folder = save_diffusers(model, tmp_path / "folder", tokenizer=False)
    single = save_checkpoint(model, tmp_path / "model.safetensors")
    pipe = cls.from_single_file(str(single), config=str(folder), local_files_only=True, tokenizer=None)
    g = torch.Generator().manual_seed(0)
    x, t, context = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 900]), torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        ours = model.unet(x, t, context)
        theirs = pipe.unet(x, t, encoder_hidden_states=context).sample
        pixels = model.vae.decode(x[:1])
        their_pixels = pipe.vae.decode(x[:1]).sample
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)  # fp32, different op order
    torch.testing.assert_close(pixels, their_pixels, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tiny", "sdxl"])
def test_we_read_what_diffusers_save_pretrained_wrote(layout, tmp_path):
    """diffusers writes a folder its own way (its config fields, transformers' flat text keys); we load it, write
    a single file, and diffusers' own single-file reader gets back exactly the tensors it started with."""
    cls = diffusers_pipeline_class(layout)
    model = tiny_model(layout, seed=3)
    pipe = cls.from_pretrained(str(save_diffusers(model, tmp_path / "ours")), local_files_only=True)
    pipe.save_pretrained(str(tmp_path / "theirs"))
    # Tiny sizes match no public family, so name it the way our own folders do; everything else is diffusers'.
    index_path = tmp_path / "theirs" / "model_index.json"
    index = json.loads(index_path.read_text())
    assert "_clipdiffusion_family" not in index
    index_path.write_text(json.dumps(dict(index, _clipdiffusion_family=model.family)))
    loaded = load_diffusers(tmp_path / "theirs")
    assert loaded.family == model.family
    assert_same_weights(model.unet, loaded.unet)
    single = save_checkpoint(loaded, tmp_path / "back.safetensors")
    again = cls.from_single_file(str(single), config=str(tmp_path / "theirs"), local_files_only=True)
    assert_same_state(components(pipe), components(again))


# --- the commands ------------------------------------------------------------------------------------------


def test_convert_file_to_folder_and_back(tmp_path, capsys):
    model = tiny_model("tiny")
    src = save_checkpoint(model, tmp_path / "in.safetensors")
    assert main(["convert", str(src), str(tmp_path / "folder")]) == 0
    assert (tmp_path / "folder" / "tokenizer" / "vocab.json").is_file()
    assert (tmp_path / "folder" / "model_index.json").is_file()
    assert main(["convert", str(tmp_path / "folder"), str(tmp_path / "out.safetensors"), "--dtype", "fp32"]) == 0
    assert "wrote single file" in capsys.readouterr().out
    assert_same_model(model, load_checkpoint(tmp_path / "out.safetensors"))


def test_convert_ckpt_to_safetensors(tmp_path):
    from clipdiffusion.checkpoints.safetensors_io import load_file

    tensors = sd1_shaped_pickle(tmp_path / "old.ckpt")
    out = convert(tmp_path / "old.ckpt", tmp_path / "new.safetensors", dtype="fp16")
    written = load_file(out)
    assert written.keys() == tensors.keys()
    assert all(torch.equal(written[k], tensors[k]) for k in tensors)  # fp16 -> fp32 -> fp16 is exact
    assert load_checkpoint(out).family == "sd1"


def test_convert_to_half(tmp_path):
    model = tiny_model("tiny")
    src = save_checkpoint(model, tmp_path / "in.safetensors")
    out = convert(src, tmp_path / "half.safetensors", dtype="fp16")
    loaded = load_checkpoint(out, dtype=None)
    assert {p.dtype for p in loaded.unet.parameters()} == {torch.float16}


def test_convert_refuses_bad_paths(tmp_path, capsys):
    src = save_checkpoint(tiny_model("tiny"), tmp_path / "in.safetensors")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["convert", str(src), str(tmp_path / "full")]) == 2
    assert main(["convert", str(tmp_path / "missing.safetensors"), str(tmp_path / "o.safetensors")]) == 2
    assert main(["convert", str(src), str(src)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("clipdiffusion convert: error:") for line in err)


def test_info_text_and_json(tmp_path, capsys):
    src = save_checkpoint(tiny_model("sdxl"), tmp_path / "xl.safetensors")
    assert main(["info", str(src)]) == 0
    text = capsys.readouterr().out
    assert "family:     sdxl" in text and "prediction: eps" in text and "unet" in text
    assert main(["info", str(src), "--json", "--prediction", "v"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "sdxl" and info["prediction"] == "v" and info["prediction_source"] == "user override"
    model = tiny_model("sdxl")
    n_unet = sum(p.numel() for p in model.unet.parameters())
    assert info["components"]["unet"]["parameters"] == n_unet
    assert info["components"]["text"]["dtypes"] == {"F32": info["components"]["text"]["tensors"]}
    folder = save_diffusers(model, tmp_path / "folder", tokenizer=False)
    assert main(["info", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "sdxl" and set(info["components"]) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert info["components"]["unet"]["parameters"] == n_unet


def test_info_on_refused_files_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 8 + b"{}")
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(b"\x80\x04cos\nsystem\n(S'echo hi'\ntR.")
    for path in (bad, evil, tmp_path / "nowhere.safetensors"):
        assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("clipdiffusion info: error:") for line in err)
    assert "Traceback" not in "".join(err)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_full_size_single_file_layout_matches_diffusers(family):
    """At full size, on the meta device (no memory): diffusers' own single-file code recognises the model type of
    the file we would write, and its LDM converters turn every one of our keys into exactly the keys and shapes of
    its models (UNet, VAE, each text tower), so real SD1.5/SD2.1/SDXL files and ours are the same layout."""
    from types import SimpleNamespace

    diffusers_pipeline_class("tiny")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as S
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel as HFText
    from transformers import CLIPTextModelWithProjection as HFTextProjected

    from clipdiffusion.checkpoints.detect import detect_family
    from clipdiffusion.checkpoints.diffusers_unet import unet_config_to_diffusers
    from clipdiffusion.checkpoints.diffusers_vae import vae_config_to_diffusers
    from clipdiffusion.checkpoints.save import checkpoint_state_dict
    from clipdiffusion.diffusion import unet as U
    from clipdiffusion.diffusion import vae as V
    from clipdiffusion.text import clip as C

    towers = {"sd1": [C.SD1_CLIP_L], "sd2": [C.SD2_OPENCLIP_H], "sdxl": [C.SDXL_CLIP_L, C.SDXL_OPENCLIP_BIGG]}
    model = SimpleNamespace(
        family=family, prediction="eps", unet=U.UNetModel(U.PRESETS[family], device="meta"),
        vae=V.AutoencoderKL(V.PRESETS[family], device="meta"),
        text_encoder=SimpleNamespace(encoders=[SimpleNamespace(model=C.CLIPTextModel(c, device="meta"))
                                               for c in towers[family]]),
    )  # fmt: skip
    ckpt = checkpoint_state_dict(model)

    def shapes(sd):
        return {k.removeprefix("text_model."): tuple(v.shape) for k, v in sd.items() if "position_ids" not in k}

    assert S.infer_diffusers_model_type(ckpt) == {"sd1": "v1", "sd2": "v2", "sdxl": "xl_base"}[family]
    assert detect_family(shapes(ckpt)).name == family
    unet_cfg = {k: v for k, v in unet_config_to_diffusers(U.PRESETS[family]).items() if k != "_class_name"}
    vae_cfg = {k: v for k, v in vae_config_to_diffusers(V.PRESETS[family]).items() if k != "_class_name"}
    clip_l = HFConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                      hidden_act="quick_gelu")  # fmt: skip
    with torch.device("meta"):
        pairs = [(UNet2DConditionModel(**unet_cfg), S.convert_ldm_unet_checkpoint(ckpt, unet_cfg)),
                 (AutoencoderKL(**vae_cfg), S.convert_ldm_vae_checkpoint(ckpt, vae_cfg))]  # fmt: skip
        if family == "sd1":
            pairs.append((HFText(clip_l), S.convert_ldm_clip_checkpoint(ckpt)))
        elif family == "sd2":  # diffusers keeps 23 of OpenCLIP-H's 24 layers
            h = HFText(HFConfig(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                                num_hidden_layers=23, hidden_act="gelu"))  # fmt: skip
            pairs.append((h, S.convert_open_clip_checkpoint(h, ckpt)))
        else:
            g = HFTextProjected(HFConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                                         num_hidden_layers=32, hidden_act="gelu", projection_dim=1280))  # fmt: skip
            pairs.append((HFText(clip_l), S.convert_ldm_clip_checkpoint(ckpt, "conditioner.embedders.0.transformer.")))
            pairs.append((g, S.convert_open_clip_checkpoint(g, ckpt, prefix="conditioner.embedders.1.model.")))
    for theirs, converted in pairs:
        assert shapes(converted) == shapes(theirs.state_dict()), type(theirs).__name__
