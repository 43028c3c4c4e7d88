"""diffusers <-> LDM rename tables and config conversions: full-size key/shape agreement with diffusers' own
models (built on the meta device, so no memory or time is spent), round trips, and strictness."""

import pytest
import torch

from clipdiffusion.checkpoints import diffusers_unet as DU
from clipdiffusion.checkpoints import diffusers_vae as DV
from clipdiffusion.diffusion import unet as U
from clipdiffusion.diffusion import vae as V
from clipdiffusion.errors import CheckpointError, ClipDiffusionError

# The published `unet/config.json` files of runwayml SD 1.5, stabilityai SD 2.1 and SDXL base 1.0 (the fields that
# matter; diffusers fills the rest with its defaults), written out here so the test does not trust our own writer.
_COMMON = {"act_fn": "silu", "center_input_sample": False, "downsample_padding": 1, "flip_sin_to_cos": True,
           "freq_shift": 0, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
           "norm_eps": 1e-05, "norm_num_groups": 32}
PUBLISHED_UNET = {
    "sd1": (U.SD1, dict(_COMMON, sample_size=64, attention_head_dim=8, cross_attention_dim=768,
                        block_out_channels=[320, 640, 1280, 1280],
                        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)),
    "sd2": (U.SD2, dict(_COMMON, sample_size=96, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                        block_out_channels=[320, 640, 1280, 1280], use_linear_projection=True, upcast_attention=True,
                        dual_cross_attention=False, num_class_embeds=None, only_cross_attention=False,
                        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)),
    "sdxl": (U.SDXL, dict(_COMMON, sample_size=128, attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
                          block_out_channels=[320, 640, 1280], use_linear_projection=True,
                          transformer_layers_per_block=[1, 2, 10], addition_embed_type="text_time",
                          addition_embed_type_num_heads=64, addition_time_embed_dim=256,
                          projection_class_embeddings_input_dim=2816, class_embed_type=None, num_class_embeds=None,
                          down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                          up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])),
    "sdxl_refiner": (U.SDXL_REFINER, dict(_COMMON, sample_size=128, attention_head_dim=[6, 12, 24, 24],
                                          cross_attention_dim=1280, block_out_channels=[384, 768, 1536, 1536],
                                          use_linear_projection=True, transformer_layers_per_block=4,
                                          addition_embed_type="text_time", addition_time_embed_dim=256,
                                          projection_class_embeddings_input_dim=2560,
                                          down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2
                                          + ["DownBlock2D"],
                                          up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"])),
}
PUBLISHED_VAE = {"act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "in_channels": 3, "out_channels": 3,
                 "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 512,
                 "scaling_factor": 0.18215, "down_block_types": ["DownEncoderBlock2D"] * 4,
                 "up_block_types": ["UpDecoderBlock2D"] * 4}


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "sdxl_refiner"])
def test_published_unet_config_reads_as_preset(family):
    preset, published = PUBLISHED_UNET[family]
    assert DU.unet_config_from_diffusers(published) == preset
    assert DU.unet_config_from_diffusers(DU.unet_config_to_diffusers(preset)) == preset


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "sdxl_refiner"])
def test_full_size_unet_keys_and_shapes_match_diffusers(family):
    diffusers = pytest.importorskip("diffusers")
    preset, published = PUBLISHED_UNET[family]
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**published)
    ours = _shapes(U.UNetModel(preset, device="meta").state_dict())
    theirs = ref.state_dict()
    assert _shapes(DU.unet_diffusers_to_ldm(theirs, preset)) == ours
    assert _shapes(DU.unet_ldm_to_diffusers(U.UNetModel(preset, device="meta").state_dict(), preset)) == \
        _shapes(theirs)


def test_full_size_vae_keys_and_shapes_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    cfg = DV.vae_config_from_diffusers(PUBLISHED_VAE)
    assert cfg == V.SD1
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(**PUBLISHED_VAE)
    ours = V.AutoencoderKL(cfg, device="meta").state_dict()
    assert _shapes(DV.vae_diffusers_to_ldm(ref.state_dict(), cfg)) == _shapes(ours)
    assert _shapes(DV.vae_ldm_to_diffusers(ours, cfg)) == _shapes(ref.state_dict())
    assert DV.vae_config_from_diffusers(DV.vae_config_to_diffusers(cfg)) == cfg


@pytest.mark.parametrize("cfg", [U.TINY, U.TINY_SD2, U.TINY_SDXL])
def test_unet_round_trip_is_identity(cfg):
    torch.manual_seed(0)
    sd = U.UNetModel(cfg).state_dict()
    there = DU.unet_ldm_to_diffusers(sd, cfg)
    assert len(there) == len(sd) and not set(there) & {k for k in sd if not k.startswith(("conv", "time"))}
    back = DU.unet_diffusers_to_ldm(there, cfg)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], v) for k, v in sd.items())


def test_vae_round_trip_is_identity_and_reshapes_attention():
    torch.manual_seed(0)
    sd = V.AutoencoderKL(V.TINY).state_dict()
    there = DV.vae_ldm_to_diffusers(sd, V.TINY)
    assert there["decoder.mid_block.attentions.0.to_q.weight"].shape == (64, 64)
    assert there["encoder.mid_block.attentions.0.group_norm.weight"].shape == (64,)
    assert "decoder.up_blocks.0.upsamplers.0.conv.weight" in there  # lowest resolution first in diffusers
    back = DV.vae_diffusers_to_ldm(there, V.TINY)
    assert set(back) == set(sd) and all(torch.equal(back[k], v) for k, v in sd.items())


def test_vae_accepts_legacy_attention_names():
    sd = V.AutoencoderKL(V.TINY, device="meta").state_dict()
    there = DV.vae_ldm_to_diffusers(sd, V.TINY)
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in there.items():
        for new, name in legacy.items():
            k = k.replace(f".{new}.", f".{name}.")
        old[k] = v
    assert any(".proj_attn." in k for k in old)
    assert _shapes(DV.vae_diffusers_to_ldm(old, V.TINY)) == _shapes(sd)


def test_linear_vs_conv_projection_is_reshaped_to_the_config():
    sd = U.UNetModel(U.TINY, device="meta").state_dict()
    there = DU.unet_ldm_to_diffusers(sd, U.TINY)
    key = "down_blocks.0.attentions.0.proj_in.weight"
    there[key] = there[key].reshape(there[key].shape[:2])  # a file that stored SD1's 1x1 conv as Linear
    assert DU.unet_diffusers_to_ldm(there, U.TINY)["input_blocks.1.1.proj_in.weight"].shape == (32, 32, 1, 1)


def test_unknown_keys_are_all_listed():
    sd = dict(U.UNetModel(U.TINY, device="meta").state_dict())
    sd["input_blocks.1.0.bogus.weight"] = torch.empty(1)
    sd["made_up.weight"] = torch.empty(1)
    sd["input_blocks.1.1.extra.weight"] = torch.empty(1)
    with pytest.raises(CheckpointError, match="3 UNet keys.*bogus.*made_up.*1.1.extra"):
        DU.unet_ldm_to_diffusers(sd, U.TINY)
    vae = DV.vae_ldm_to_diffusers(V.AutoencoderKL(V.TINY, device="meta").state_dict(), V.TINY)
    vae["decoder.up_blocks.9.resnets.0.conv1.weight"] = torch.empty(1)
    vae["decoder.up_blocks.0.resnets.0.conv3.weight"] = torch.empty(1)
    vae["quant_conv.extra.weight"] = torch.empty(1)
    with pytest.raises(CheckpointError, match="3 VAE keys"):
        DV.vae_diffusers_to_ldm(vae, V.TINY)


@pytest.mark.parametrize("field,value", [("resnet_time_scale_shift", "scale_shift"), ("flip_sin_to_cos", False),
                                         ("addition_embed_type", "text"), ("layers_per_block", [2, 1, 2, 2])])
def test_unsupported_diffusers_unet_config_names_the_field(field, value):
    published = dict(PUBLISHED_UNET["sd1"][1], **{field: value})
    with pytest.raises(ClipDiffusionError, match=field):
        DU.unet_config_from_diffusers(published)


def test_unsupported_diffusers_vae_config_names_the_field():
    with pytest.raises(ClipDiffusionError, match="latent_channels|use_quant_conv"):
        DV.vae_config_from_diffusers(dict(PUBLISHED_VAE, use_quant_conv=False))
    with pytest.raises(ClipDiffusionError, match="embed_dim"):
        DV.vae_config_to_diffusers(V.VAEConfig(embed_dim=8))


@pytest.mark.parametrize("cfg", [U.TINY, U.TINY_SD2, U.TINY_SDXL, U.SD1, U.SDXL])
def test_written_unet_config_builds_the_same_diffusers_model(cfg):
    diffusers = pytest.importorskip("diffusers")
    written = DU.unet_config_to_diffusers(cfg)
    assert written["_class_name"] == "UNet2DConditionModel"
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**{k: v for k, v in written.items() if not k.startswith("_")})
    ours = U.UNetModel(cfg, device="meta").state_dict()
    assert _shapes(DU.unet_ldm_to_diffusers(ours, cfg)) == _shapes(ref.state_dict())


@pytest.mark.parametrize("cfg", [V.TINY, V.SDXL])
def test_written_vae_config_builds_the_same_diffusers_model(cfg):
    diffusers = pytest.importorskip("diffusers")
    written = DV.vae_config_to_diffusers(cfg)
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(**{k: v for k, v in written.items() if not k.startswith("_")})
    assert ref.config.scaling_factor == cfg.scale_factor
    ours = V.AutoencoderKL(cfg, device="meta").state_dict()
    assert _shapes(DV.vae_ldm_to_diffusers(ours, cfg)) == _shapes(ref.state_dict())


@pytest.mark.parametrize("cfg", [
    U.UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(0, 1), context_dim=16,
                 num_heads=2, use_linear_in_transformer=True),  # one attention level: count and width both fit
    U.UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(0, 1), context_dim=16,
                 num_heads=None, head_channels=16),
    U.UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, transformer_depth=(1, 1, 0),
                 transformer_depth_middle=3, context_dim=16, num_heads=None, head_channels=8, norm_groups=8),
])
def test_config_round_trip_keeps_the_head_field(cfg):
    assert DU.unet_config_from_diffusers(DU.unet_config_to_diffusers(cfg)) == cfg


def test_middle_depth_that_diffusers_cannot_express_raises():
    cfg = U.UNetConfig(model_channels=32, channel_mult=(1, 2), transformer_depth=(1, 2), transformer_depth_middle=1,
                       context_dim=16, num_heads=2)
    with pytest.raises(ClipDiffusionError, match="transformer_depth_middle"):
        DU.unet_config_to_diffusers(cfg)
