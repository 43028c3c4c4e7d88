"""Single-file and diffusers-folder loading at tiny size: exact round trips, strictness, ignored keys, shards."""

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

from clipdiffusion.checkpoints.load import load_checkpoint, load_diffusers
from clipdiffusion.checkpoints.safetensors_io import load_file, read_header, save_file
from clipdiffusion.checkpoints.save import save_checkpoint, save_diffusers
from clipdiffusion.errors import CheckpointError

PROMPT = "a red circle"


def tiny_model(layout="tiny", seed=0):
    """Random tiny components in one of the three layouts: "tiny" (SD1-like), "sd2" (OpenCLIP), "sdxl" (two towers)."""
    from clipdiffusion.diffusion import unet as U
    from clipdiffusion.diffusion import vae as V
    from clipdiffusion.text.clip import CLIPTextConfig, CLIPTextModel
    from clipdiffusion.text.conditioning import EncoderSpec, TextEncoder

    torch.manual_seed(seed)
    if layout == "tiny":
        specs = [EncoderSpec("clip_l", CLIPTextModel(CLIPTextConfig(width=32, layers=2, heads=4)), 49407, True, 1)]
        unet_cfg, vae_cfg = U.TINY, V.TINY
    elif layout == "sd2":
        cfg = CLIPTextConfig(width=32, layers=3, heads=2, activation="gelu", projection_dim=32)
        specs = [EncoderSpec("clip_h", CLIPTextModel(cfg), 0, True, 2)]
        unet_cfg, vae_cfg = U.TINY_SD2, V.TINY
    else:
        # context = 8 (CLIP-L) + 24 (bigG) = 32; y = pooled 24 + 6 size embeddings x 8 = 72. The towers' widths
        # differ, as 768 and 1280 do: diffusers' single-file reader tells them apart by width.
        l_cfg = CLIPTextConfig(width=8, layers=2, heads=2)
        g_cfg = CLIPTextConfig(width=24, layers=3, heads=2, activation="gelu", projection_dim=24)
        specs = [EncoderSpec("clip_l", CLIPTextModel(l_cfg), 49407, False, 2),
                 EncoderSpec("clip_g", CLIPTextModel(g_cfg), 0, False, 2)]  # fmt: skip
        unet_cfg = dataclasses.replace(U.TINY_SDXL, adm_in_channels=72)
        vae_cfg = V.VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, scale_factor=0.13025)
    family = "tiny" if layout == "tiny" else layout
    return SimpleNamespace(
        family=family, prediction="v" if layout == "sd2" else "eps",
        text_encoder=TextEncoder(family, [s for s in specs]), unet=U.UNetModel(unet_cfg).eval(),
        vae=V.AutoencoderKL(vae_cfg).eval(),
    )  # fmt: skip


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def assert_same_model(original, loaded):
    assert loaded.family == original.family and loaded.prediction == original.prediction
    assert loaded.unet_config == original.unet.config and loaded.vae_config == original.vae.config
    assert_same_weights(original.unet, loaded.unet)
    assert_same_weights(original.vae, loaded.vae)
    for spec, back in zip(original.text_encoder.encoders, loaded.text_encoder.encoders, strict=True):
        assert back.model.config == spec.model.config
        assert (back.name, back.pad_id, back.final_norm, back.default_clip_skip) == (
            spec.name, spec.pad_id, spec.final_norm, spec.default_clip_skip)  # fmt: skip
        assert_same_weights(spec.model, back.model)


@pytest.fixture(scope="module", params=["tiny", "sd2", "sdxl"])
def layout(request):
    return request.param


@pytest.fixture(scope="module")
def model(layout):
    return tiny_model(layout)


def test_single_file_round_trip_is_exact(model, tmp_path):
    path = save_checkpoint(model, tmp_path / "m.safetensors", {"note": "hi"})
    meta = read_header(path).metadata
    assert meta["clipdiffusion.family"] == model.family and meta["note"] == "hi"
    loaded = load_checkpoint(path)
    assert_same_model(model, loaded)
    assert loaded.ignored_keys == () and loaded.metadata["note"] == "hi"


def test_single_file_keys_use_the_ldm_prefixes(model, tmp_path):
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    keys = set(read_header(path).tensors)
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "first_stage_model.decoder.conv_out.weight" in keys
    text = {
        "tiny": "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        "sd2": "cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight",
        "sdxl": "conditioner.embedders.1.model.text_projection",
    }[model.family]
    assert text in keys
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner."))
               for k in keys)  # fmt: skip


def test_conditioning_survives_both_round_trips(model, tmp_path):
    """Same prompt -> same context through a single file and through a diffusers folder (SD2's folder drops
    the unused last text layer, diffusers' convention, and must still condition identically)."""
    want = model.text_encoder.encode(PROMPT)
    single = load_checkpoint(save_checkpoint(model, tmp_path / "m.safetensors")).text_encoder.encode(PROMPT)
    from_folder = load_diffusers(save_diffusers(model, tmp_path / "d", tokenizer=False))
    folder = from_folder.text_encoder.encode(PROMPT)
    # and back from the folder to a single file (SD2: the 23-layer tower gets an identity block appended)
    back = load_checkpoint(save_checkpoint(from_folder, tmp_path / "back.safetensors")).text_encoder.encode(PROMPT)
    for got in (single, folder, back):
        torch.testing.assert_close(got.context, want.context, rtol=0, atol=1e-6)  # same weights, same math
        if want.pooled is not None:
            torch.testing.assert_close(got.pooled, want.pooled, rtol=0, atol=1e-6)


def test_diffusers_round_trip_is_exact(model, tmp_path):
    folder = save_diffusers(model, tmp_path / "d", tokenizer=False)
    index = json.loads((folder / "model_index.json").read_text())
    pipeline = "StableDiffusionXLPipeline" if model.family == "sdxl" else "StableDiffusionPipeline"
    assert index["_class_name"] == pipeline
    loaded = load_diffusers(folder)
    assert loaded.family == model.family and loaded.prediction == model.prediction
    assert_same_weights(model.unet, loaded.unet)
    assert_same_weights(model.vae, loaded.vae)
    if model.family != "sd2":  # sd2 is covered by the conditioning test above (23 of 24 layers kept)
        for spec, back in zip(model.text_encoder.encoders, loaded.text_encoder.encoders, strict=True):
            assert_same_weights(spec.model, back.model)


def test_native_size_round_trips_through_modelspec(tmp_path):
    model = tiny_model("tiny")
    assert load_checkpoint(save_checkpoint(model, tmp_path / "a.safetensors")).default_size is None
    model.default_size = 48
    path = save_checkpoint(model, tmp_path / "b.safetensors")
    assert read_header(path).metadata["modelspec.resolution"] == "48x48"
    assert load_checkpoint(path).default_size == 48


@pytest.mark.parametrize("prediction,native", [("v", 768), ("eps", 512)])
def test_diffusers_sample_size_is_the_family_native_size_for_the_prediction(tmp_path, prediction, native):
    # one value from the family table: SD2 768-v models are 768 px, 512-base (eps) models 512 px
    model = tiny_model("sd2")
    model.prediction = prediction
    folder = save_diffusers(model, tmp_path / "d", tokenizer=False, weights=False)
    assert json.loads((folder / "vae" / "config.json").read_text())["sample_size"] == native
    assert json.loads((folder / "unet" / "config.json").read_text())["sample_size"] == native // 8
    meta = save_checkpoint(model, tmp_path / "m.safetensors")
    assert read_header(meta).metadata["modelspec.architecture"] == {"v": "stable-diffusion-v2-768-v",
                                                                    "eps": "stable-diffusion-v2-512"}[prediction]


def test_dtype_and_prediction_override(tmp_path):
    model = tiny_model("tiny")
    path = save_checkpoint(model, tmp_path / "m.safetensors", dtype=torch.float16)
    assert {i.dtype for i in read_header(path).tensors.values()} == {"F16"}
    loaded = load_checkpoint(path, dtype=torch.bfloat16, prediction="v")
    assert loaded.prediction == "v"
    for module in (loaded.unet, loaded.vae, loaded.text_encoder.encoders[0].model):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
        assert not any(p.requires_grad for p in module.parameters())


def _rewrite(path, change):
    """Load every tensor of a file, let ``change`` edit the dict, write it back with the same metadata."""
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, read_header(path).metadata)
    return path


def test_bad_arguments_name_the_field(tmp_path):
    from clipdiffusion.errors import ClipDiffusionError

    path = save_checkpoint(tiny_model("tiny"), tmp_path / "m.safetensors")
    with pytest.raises(ClipDiffusionError, match="dtype"):
        load_checkpoint(path, dtype="fp16")
    with pytest.raises(ClipDiffusionError, match="device"):
        load_checkpoint(path, device="gpu7")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="prediction"):
        load_checkpoint(path, prediction="x0")


def test_strict_loading_lists_every_problem_at_once(tmp_path):
    path = save_checkpoint(tiny_model("tiny"), tmp_path / "m.safetensors")

    def damage(t):
        del t["model.diffusion_model.out.2.bias"]
        del t["first_stage_model.quant_conv.weight"]
        t["model.diffusion_model.extra.weight"] = torch.zeros(1)
        t["model.diffusion_model.time_embed.0.weight"] = torch.zeros(3, 3)
        t["somewhere.else"] = torch.zeros(1)

    with pytest.raises(CheckpointError) as info:
        load_checkpoint(_rewrite(path, damage))
    msg = str(info.value)
    for part in ("out.2.bias", "quant_conv.weight", "model.diffusion_model.extra.weight",
                 "time_embed.0.weight [3, 3]", "somewhere.else"):  # fmt: skip
        assert part in msg, part


def test_text_encoder_problems_are_reported(tmp_path):
    path = save_checkpoint(tiny_model("tiny"), tmp_path / "m.safetensors")
    key = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    with pytest.raises(CheckpointError, match="final_layer_norm"):
        load_checkpoint(_rewrite(path, lambda t: t.pop(key)))


def test_ignored_keys_are_listed(tmp_path):
    path = save_checkpoint(tiny_model("tiny"), tmp_path / "m.safetensors")

    def add(t):
        t["alphas_cumprod"] = torch.linspace(1, 0, 1000)
        t["first_stage_model.loss.logvar"] = torch.zeros(())
        t["model_ema.decay"] = torch.tensor(0.9999)
        t["model_ema.diffusion_modelout2bias"] = torch.zeros(4)
        # some merges store position_ids as drifted floats: it is regenerated, never read
        t["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77.0).reshape(1, 77) + 0.3

    loaded = load_checkpoint(_rewrite(path, add))
    assert {"alphas_cumprod", "model_ema.decay", "first_stage_model.loss.logvar", "model_ema.diffusion_modelout2bias",
            "cond_stage_model.transformer.text_model.embeddings.position_ids"} <= set(loaded.ignored_keys)  # fmt: skip
    assert any("EMA" in n for n in loaded.notes)


def test_sd2_in_sgm_layout_loads(tmp_path):
    model = tiny_model("sd2")
    path = save_checkpoint(model, tmp_path / "m.safetensors")

    def move(t):
        for k in [k for k in t if k.startswith("cond_stage_model.model.")]:
            t["conditioner.embedders.0.model." + k.removeprefix("cond_stage_model.model.")] = t.pop(k)

    assert_same_model(model, load_checkpoint(_rewrite(path, move)))


def test_pickle_without_metadata_goes_through_detection(tmp_path):
    model = tiny_model("tiny")
    from clipdiffusion.checkpoints.save import checkpoint_state_dict

    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": checkpoint_state_dict(model), "global_step": 3}, path)
    with pytest.raises(CheckpointError, match="unknown model family") as info:
        load_checkpoint(path)  # tiny sizes match no public family, and a pickle has no metadata to say "tiny"
    assert "context_dim=32" in str(info.value)


def sd1_shaped_pickle(path):
    """A small pickle that has SD1's context width (768) and no metadata, as old .ckpt files have none."""
    from clipdiffusion.checkpoints.save import checkpoint_state_dict
    from clipdiffusion.diffusion import unet as U
    from clipdiffusion.text.clip import CLIPTextConfig, CLIPTextModel
    from clipdiffusion.text.conditioning import EncoderSpec, TextEncoder

    torch.manual_seed(1)
    model = tiny_model("tiny")
    model.family = "sd1"
    model.unet = U.UNetModel(U.UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                          transformer_depth=(1, 1), context_dim=768))  # fmt: skip
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=1000, width=768, layers=1, heads=12))
    model.text_encoder = TextEncoder("sd1", [EncoderSpec("clip_l", clip, 49407, True, 1)])
    tensors = {k: v.half() for k, v in checkpoint_state_dict(model).items()}
    torch.save({"state_dict": tensors, "global_step": 1}, path)
    return tensors


def test_sd1_detected_from_shapes_alone(tmp_path):
    """No metadata: family, configs and heads come from the weights and the family defaults."""
    path = tmp_path / "sd1.ckpt"
    sd1_shaped_pickle(path)
    loaded = load_checkpoint(path)
    assert (loaded.family, loaded.prediction) == ("sd1", "eps")
    assert loaded.unet_config.num_heads == 8 and loaded.unet_config.context_dim == 768
    assert loaded.vae_config.scale_factor == 0.18215
    assert loaded.text_encoder.encoders[0].model.config.heads == 12


# --- diffusers folder variants -----------------------------------------------------------------------------


def _shard(folder, stem="diffusion_pytorch_model", names=("a", "b")):
    """Split one component's weights into two shards plus an index, as large diffusers models are stored."""
    single = folder / f"{stem}.safetensors"
    tensors = load_file(single)
    keys = sorted(tensors)
    half = len(keys) // 2
    weight_map = {}
    for name, part in zip(names, (keys[:half], keys[half:])):
        file = f"{stem}-{name}.safetensors"
        save_file({k: tensors[k] for k in part}, folder / file)
        weight_map.update({k: file for k in part})
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    single.unlink()


def test_sharded_and_variant_weights(tmp_path):
    model = tiny_model("tiny")
    folder = save_diffusers(model, tmp_path / "d", tokenizer=False)
    _shard(folder / "unet")
    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    vae_file.rename(folder / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    # legacy pickled text encoder (pytorch_model.bin), read through the weights-only unpickler
    te_file = folder / "text_encoder" / "model.safetensors"
    torch.save(load_file(te_file), folder / "text_encoder" / "pytorch_model.bin")
    te_file.unlink()
    with pytest.raises(CheckpointError, match="variants present: fp16"):
        load_diffusers(folder)
    with pytest.raises(ValueError, match="variant"):
        load_diffusers(folder, variant="../../etc")
    loaded = load_diffusers(folder, variant="fp16")
    assert_same_weights(model.unet, loaded.unet)
    assert_same_weights(model.vae, loaded.vae)
    assert_same_weights(model.text_encoder.encoders[0].model, loaded.text_encoder.encoders[0].model)


def test_shard_names_cannot_leave_the_folder(tmp_path):
    folder = save_diffusers(tiny_model("tiny"), tmp_path / "d", tokenizer=False)
    _shard(folder / "unet")
    index = folder / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][next(iter(data["weight_map"]))] = "../../secret.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="invalid shard"):
        load_diffusers(folder)


def test_bad_folders_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="model_index.json"):
        load_diffusers(tmp_path)
    (tmp_path / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(CheckpointError, match="KandinskyPipeline"):
        load_diffusers(tmp_path)
    folder = save_diffusers(tiny_model("tiny"), tmp_path / "d", tokenizer=False)
    _rewrite(folder / "vae" / "diffusion_pytorch_model.safetensors", lambda t: t.pop("decoder.conv_out.bias"))
    with pytest.raises(CheckpointError, match="decoder.conv_out.bias"):
        load_diffusers(folder)
    with pytest.raises(CheckpointError, match="not empty"):
        save_diffusers(tiny_model("tiny"), folder)
