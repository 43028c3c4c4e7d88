"""Family and prediction detection from full-size key/shape tables (UNet built on the meta device: no memory)."""

import pytest

from clipdiffusion.checkpoints.detect import detect_family, family_from_diffusers, is_ignored_key
from clipdiffusion.errors import CheckpointError

U = "model.diffusion_model."
TEXT = {
    "sd1": {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
            "cond_stage_model.transformer.text_model.embeddings.position_ids": (1, 77)},
    "sd2": {"cond_stage_model.model.token_embedding.weight": (49408, 1024),
            "cond_stage_model.model.logit_scale": ()},
    "sdxl": {"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
             "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
             "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,)},
}  # fmt: skip


def unet_shapes(family):
    from clipdiffusion.diffusion import unet

    model = unet.UNetModel(unet.PRESETS[family], device="meta")
    return {U + k: tuple(v.shape) for k, v in model.state_dict().items()}


def full_shapes(family, **extra):
    shapes = unet_shapes(family)
    shapes["first_stage_model.decoder.conv_out.weight"] = (3, 128, 3, 3)
    shapes.update(TEXT[family])
    shapes.update(extra)
    return shapes


@pytest.mark.parametrize("family,prediction", [("sd1", "eps"), ("sd2", "v"), ("sdxl", "eps")])
def test_full_size_families(family, prediction):
    fam = detect_family(full_shapes(family))
    assert fam.name == family and fam.prediction == prediction
    assert fam.prediction_source == f"{family} default"
    assert fam.in_channels == 4 and fam.model_channels == 320
    assert fam.context_dim == {"sd1": 768, "sd2": 1024, "sdxl": 2048}[family]
    assert fam.adm_in_channels == (2816 if family == "sdxl" else None)
    assert (family == "sd2") == any("SD2 prediction type" in n for n in fam.notes)


def test_ignored_keys_are_listed_not_loaded():
    shapes = full_shapes("sd1", alphas_cumprod=(1000,), betas=(1000,), logvar=(1000,))
    shapes["model_ema.decay"] = ()
    shapes["model_ema.diffusion_modelinput_blocks00weight"] = (320, 4, 3, 3)
    fam = detect_family(shapes)
    assert "cond_stage_model.transformer.text_model.embeddings.position_ids" in fam.ignored_keys
    assert {"alphas_cumprod", "betas", "logvar", "model_ema.decay"} <= set(fam.ignored_keys)
    assert any("EMA" in n for n in fam.notes)
    assert not is_ignored_key(U + "input_blocks.0.0.weight")


def test_prediction_order_user_metadata_marker_default():
    shapes = full_shapes("sd2")
    assert detect_family(shapes, prediction="eps").prediction_source == "user override"
    m = detect_family(shapes, {"modelspec.prediction_type": "epsilon"})
    assert (m.prediction, m.prediction_source) == ("eps", "metadata modelspec.prediction_type")
    a = detect_family(shapes, {"modelspec.architecture": "stable-diffusion-v2-512"})
    assert a.prediction == "eps" and not a.notes
    ours = detect_family(shapes, {"clipdiffusion.prediction": "eps"}, prediction="v")
    assert ours.prediction == "v"  # the user always wins
    marked = detect_family(full_shapes("sdxl", v_pred=()))
    assert (marked.prediction, marked.prediction_source) == ("v", "marker key v_pred")
    assert "v_pred" in marked.ignored_keys
    with pytest.raises(CheckpointError, match="prediction"):
        detect_family(shapes, prediction="x0")


def test_sd2_saved_in_sgm_layout():
    shapes = unet_shapes("sd2")
    shapes["first_stage_model.encoder.conv_in.weight"] = (128, 3, 3, 3)
    shapes["conditioner.embedders.0.model.token_embedding.weight"] = (49408, 1024)
    assert detect_family(shapes).name == "sd2"


@pytest.mark.parametrize(
    "change,words",
    [
        ({U + "input_blocks.0.0.weight": (320, 8, 3, 3)}, "pix2pix"),
        ({U + "input_blocks.0.0.weight": (320, 5, 3, 3)}, "depth"),
        ({"edm_mean": (1, 4, 1, 1)}, "EDM"),
        ({"scaled_fp8": ()}, "fp8"),
    ],
)
def test_unsupported_variants_are_named(change, words):
    family = "sdxl" if "edm_mean" in change else "sd1"
    with pytest.raises(CheckpointError, match=words) as info:
        detect_family(full_shapes(family, **change))
    assert "in_channels=" in str(info.value)


def test_refiner_is_refused_by_name():
    shapes = {k: ((v[0], 1280) if k.endswith("attn2.to_k.weight") else v) for k, v in unet_shapes("sdxl").items()}
    shapes[U + "label_emb.0.0.weight"] = (1280, 2560)
    shapes["conditioner.embedders.0.model.token_embedding.weight"] = (49408, 1280)
    with pytest.raises(CheckpointError, match="refiner"):
        detect_family(shapes)


def test_unknown_family_lists_what_was_found():
    shapes = {k: ((v[0], 512) if k.endswith("attn2.to_k.weight") else v) for k, v in full_shapes("sd1").items()}
    with pytest.raises(CheckpointError, match="unknown model family") as info:
        detect_family(shapes)
    msg = str(info.value)
    assert "context_dim=512" in msg and "model_channels=320" in msg and "cond_stage_model" in msg


def test_missing_components_and_foreign_layouts():
    with pytest.raises(CheckpointError, match="no LDM UNet"):
        detect_family({"encoder.conv_in.weight": (128, 3, 3, 3)})
    with pytest.raises(CheckpointError, match="diffusers"):
        detect_family({"conv_in.weight": (320, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)})
    no_text = {k: v for k, v in full_shapes("sd1").items() if not k.startswith("cond_stage_model.")}
    with pytest.raises(CheckpointError, match="no text encoder"):
        detect_family(no_text)
    no_vae = {k: v for k, v in full_shapes("sdxl").items() if not k.startswith("first_stage_model.")}
    with pytest.raises(CheckpointError, match="no VAE"):
        detect_family(no_vae)
    half_xl = {k: v for k, v in full_shapes("sdxl").items() if not k.startswith("conditioner.embedders.1")}
    with pytest.raises(CheckpointError):
        detect_family(half_xl)


def test_metadata_family_must_agree_with_weights():
    with pytest.raises(CheckpointError, match="metadata says"):
        detect_family(full_shapes("sd1"), {"clipdiffusion.family": "sdxl"})
    with pytest.raises(CheckpointError, match="not one of"):
        detect_family(full_shapes("sd1"), {"clipdiffusion.family": "sd9"})


def test_tiny_comes_from_our_metadata():
    from clipdiffusion.diffusion import unet

    model = unet.UNetModel(unet.TINY, device="meta")
    shapes = {U + k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes["first_stage_model.decoder.conv_out.weight"] = (3, 32, 3, 3)
    shapes["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = (49408, 32)
    with pytest.raises(CheckpointError, match="unknown model family"):
        detect_family(shapes)
    fam = detect_family(shapes, {"clipdiffusion.family": "tiny"})
    assert fam.name == "tiny" and fam.context_dim == 32 and fam.prediction == "eps"


def test_family_from_diffusers_config():
    assert family_from_diffusers({"cross_attention_dim": 768}, False) == "sd1"
    assert family_from_diffusers({"cross_attention_dim": 1024}, False) == "sd2"
    assert family_from_diffusers({"cross_attention_dim": 2048, "addition_embed_type": "text_time"}, True) == "sdxl"
    with pytest.raises(CheckpointError, match="refiner"):
        family_from_diffusers({"cross_attention_dim": 1280, "addition_embed_type": "text_time"}, True)
    # inpainting UNets (latent 4 + mask 1 + masked-image latent 4) belong to their base family (issue 20)
    assert family_from_diffusers({"cross_attention_dim": 768, "in_channels": 9}, False) == "sd1"
    with pytest.raises(CheckpointError, match="in_channels=8"):
        family_from_diffusers({"cross_attention_dim": 768, "in_channels": 8}, False)


def test_detect_needs_no_tensor_data():
    # shapes may come straight from a safetensors header: plain lists, no torch tensors involved
    shapes = {k: list(v) for k, v in full_shapes("sd1").items()}
    assert detect_family(shapes).name == "sd1"
