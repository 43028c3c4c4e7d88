"""UNet: parity with diffusers' UNet2DConditionModel on identical random weights, the attention recorder,
config recovery from weights, full-size parameter counts (on the meta device), and input validation."""

import dataclasses

import pytest
import torch

from clipdiffusion.checkpoints.diffusers_unet import unet_config_from_diffusers, unet_diffusers_to_ldm
from clipdiffusion.diffusion import unet as U
from clipdiffusion.errors import ClipDiffusionError

# fp32 parity tolerance against diffusers: same math, different op order.
ATOL = 1e-4

# Tiny diffusers configs in the three SD styles: SD1 (fixed 8 heads, conv projections), SD2 (64-wide heads scaled
# down to 16, linear projections), SDXL (no attention at level 0, depth [1,2] read as (0,2), mid depth 2, text_time
# vector y = pooled 16 + 6 sizes x 8).
TINY_DIFFUSERS = {
    "sd1": dict(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=32, attention_head_dim=8,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "sd2": dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=(2, 4),
                use_linear_projection=True, down_block_types=("CrossAttnDownBlock2D",) * 2,
                up_block_types=("CrossAttnUpBlock2D",) * 2),
    "sdxl": dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=(2, 4),
                 use_linear_projection=True, transformer_layers_per_block=(1, 2),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), addition_embed_type="text_time",
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8),
}


def _diffusers_pair(style):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(sample_size=8, **TINY_DIFFUSERS[style]).eval()
    with torch.no_grad():  # default init leaves some tensors at exactly 0/1; move every weight off it
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    cfg = unet_config_from_diffusers(dict(ref.config))
    ours = U.UNetModel(cfg).eval()
    ours.load_state_dict(unet_diffusers_to_ldm(ref.state_dict(), cfg), strict=True)
    return ref, ours, cfg


@pytest.mark.parametrize("style", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("tokens", [77, 154])
def test_parity_with_diffusers(style, tokens):
    ref, ours, cfg = _diffusers_pair(style)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([3.0, 811.5])  # fractional timesteps occur with k-diffusion samplers
    context = torch.randn(2, tokens, 32, generator=g)
    kwargs, y = {}, None
    if cfg.adm_in_channels:
        pooled = torch.randn(2, 16, generator=g)
        size_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 1344, 16, 32, 1024, 1024]])
        kwargs = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": size_ids}}
        y = U.sdxl_vector(pooled, size_ids, cfg.size_embed_dim)
    with torch.no_grad():
        expected = ref(x, t, context, **kwargs).sample
        got = ours(x, t, context, y)
    assert got.shape == expected.shape == x.shape
    assert (got - expected).abs().max().item() < ATOL


@pytest.mark.parametrize("height,width", [(13, 16), (9, 11)])
def test_parity_with_diffusers_at_sizes_that_do_not_divide(height, width):
    """Latent sizes that do not divide by the UNet's downsampling (SD1 at 520 px is 65 latents): the upsampling
    lands on each skip connection's size, as diffusers' forward_upsample_size does. Tolerance 1e-4."""
    ref, ours, _ = _diffusers_pair("sd1")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, height, width, generator=g)
    context = torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        expected = ref(x, torch.tensor([500.0]), context).sample
        got = ours(x, torch.tensor([500.0]), context)
    assert got.shape == expected.shape == x.shape
    assert (got - expected).abs().max().item() < ATOL


def test_timestep_embedding_matches_diffusers():
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    t = torch.tensor([0.0, 1.0, 250.25, 999.0])
    expected = embeddings.get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.allclose(U.timestep_embedding(t, 320), expected, atol=1e-6)
    assert torch.allclose(U.timestep_embedding(t, 320)[:, 0], torch.cos(t))  # cos first, frequency 1


def _tiny_inputs(cfg, batch=2, tokens=77, size=8):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(batch, cfg.adm_in_channels, generator=g) if cfg.adm_in_channels else None
    return (torch.randn(batch, cfg.in_channels, size, size, generator=g), torch.tensor([5.0, 600.0][:batch]),
            torch.randn(batch, tokens, cfg.context_dim, generator=g), y)


@pytest.mark.parametrize("cfg", [U.TINY, U.TINY_SD2, U.TINY_SDXL])
def test_recorder_probs_and_output_match_sdpa(cfg):
    torch.manual_seed(0)
    model = U.UNetModel(cfg).eval()
    x, t, context, y = _tiny_inputs(cfg, tokens=154)
    seen = []

    def recorder(name, probs):
        seen.append((name, probs))

    with torch.no_grad():
        plain = model(x, t, context, y)
        recorded = model(x, t, context, y, attention_recorder=recorder)
    assert torch.allclose(plain, recorded, atol=1e-5)
    names = [n for n, _ in model.named_modules() if n.endswith("attn2")]
    assert [n for n, _ in seen] == names  # every cross-attention, in execution order, self-attention never
    for name, probs in seen:
        heads = model.get_submodule(name).heads
        assert probs.shape[:2] == (2, heads) and probs.shape[3] == 154
        assert probs.shape[2] in (64, 16)  # HW at 8x8 or 4x4
        assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
        assert (probs >= 0).all()


def test_context_length_changes_output_but_not_shape():
    torch.manual_seed(0)
    model = U.UNetModel(U.TINY).eval()
    x, t, context, _ = _tiny_inputs(U.TINY)
    with torch.no_grad():
        a = model(x, t, context)
        b = model(x, t, torch.cat([context, context], dim=1))  # duplicated tokens: same attention average
        c = model(x, t, torch.randn_like(context))
    assert torch.allclose(a, b, atol=1e-5)
    assert (a - c).abs().max() > 1e-3


def test_scalar_timestep_broadcasts_and_dtype_argument():
    torch.manual_seed(0)
    model = U.UNetModel(U.TINY).eval()
    model64 = U.UNetModel(U.TINY, dtype=torch.float64).eval()
    model64.load_state_dict(model.state_dict())
    assert model64.input_blocks[0][0].weight.dtype == torch.float64
    x, _, context, _ = _tiny_inputs(U.TINY)
    with torch.no_grad():
        a = model(x, torch.tensor(400.0), context)
        b = model(x, torch.tensor([400.0, 400.0]), context)
        c = model64(x, torch.tensor([400.0, 400.0]), context)
    assert torch.equal(a, b)
    assert c.dtype == torch.float64 and torch.allclose(c.float(), a, atol=1e-4)


def test_bfloat16_model_runs_close_to_fp32():
    torch.manual_seed(0)
    model = U.UNetModel(U.TINY_SDXL).eval()
    half = U.UNetModel(U.TINY_SDXL, dtype=torch.bfloat16).eval()
    half.load_state_dict(model.state_dict())
    x, t, context, y = _tiny_inputs(U.TINY_SDXL)
    with torch.no_grad():
        a = model(x, t, context, y)
        b = half(x, t, context, y)
    # bf16 keeps ~3 significant digits; outputs here are O(1)
    assert b.dtype == torch.bfloat16 and (b.float() - a).abs().max() < 0.1


@pytest.mark.parametrize("preset", [U.TINY, U.TINY_SD2, U.TINY_SDXL, U.SD1, U.SD2, U.SDXL, U.SDXL_REFINER,
                                    dataclasses.replace(U.SD1, in_channels=9)])
def test_from_weights_recovers_config(preset):
    sd = U.UNetModel(preset, device="meta").state_dict()
    assert U.UNetConfig.from_weights(sd, **_heads(preset), size_embed_dim=preset.size_embed_dim) == preset
    prefixed = {"model.diffusion_model." + k: v for k, v in sd.items()}
    prefixed["first_stage_model.encoder.conv_in.weight"] = torch.empty(128, 3, 3, 3, device="meta")
    assert U.UNetConfig.from_weights(prefixed, **_heads(preset), size_embed_dim=preset.size_embed_dim) == preset


def _heads(cfg):
    return {"num_heads": cfg.num_heads} if cfg.num_heads else {"head_channels": cfg.head_channels}


def test_from_weights_family_default_heads():
    sd1 = U.UNetModel(U.SD1, device="meta").state_dict()
    sdxl = U.UNetModel(U.SDXL, device="meta").state_dict()
    assert U.UNetConfig.from_weights(sd1) == U.SD1  # conv projections -> 8 heads
    assert U.UNetConfig.from_weights(sdxl) == U.SDXL  # linear projections -> 64-wide heads


@pytest.mark.parametrize("preset,total,keys", [(U.SD1, 859_520_964, 686), (U.SD2, 865_910_724, 686),
                                               (U.SDXL, 2_567_463_684, 1680)])
def test_full_size_parameter_counts(preset, total, keys):
    model = U.UNetModel(preset, device="meta")
    assert sum(p.numel() for p in model.parameters()) == total
    assert len(model.state_dict()) == keys


def test_full_size_key_spot_checks():
    sd1 = U.UNetModel(U.SD1, device="meta").state_dict()
    assert sd1["output_blocks.11.1.proj_in.weight"].shape == (320, 320, 1, 1)
    assert sd1["input_blocks.7.1.transformer_blocks.0.attn2.to_k.weight"].shape == (1280, 768)
    assert sd1["output_blocks.5.2.conv.weight"].shape == (1280, 1280, 3, 3)
    assert sd1["output_blocks.2.1.conv.weight"].shape == (1280, 1280, 3, 3)
    assert sd1["input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight"].shape == (2560, 320)
    sdxl = U.UNetModel(U.SDXL, device="meta").state_dict()
    assert sdxl["label_emb.0.0.weight"].shape == (1280, 2816)
    assert not any(k.startswith("input_blocks.9.") for k in sdxl)
    assert "input_blocks.1.1.norm.weight" not in sdxl
    assert "middle_block.1.transformer_blocks.9.attn2.to_v.weight" in sdxl


@pytest.mark.parametrize("field,call", [
    ("x", lambda m, x, t, c: m(x[:, :3], t, c)),
    ("spatial size", lambda m, x, t, c: m(x[:, :, :0, :], t, c)),
    ("context", lambda m, x, t, c: m(x, t, c[:, :, :16])),
    ("context", lambda m, x, t, c: m(x, t, c[:1])),
    ("timesteps", lambda m, x, t, c: m(x, torch.zeros(3), c)),
    ("y", lambda m, x, t, c: m(x, t, c, torch.zeros(2, 8))),
])
def test_bad_input_names_the_field(field, call):
    model = U.UNetModel(U.TINY)
    x, t, context, _ = _tiny_inputs(U.TINY)
    with pytest.raises(ClipDiffusionError, match=field):
        call(model, x, t, context)


def test_sdxl_model_requires_y():
    model = U.UNetModel(U.TINY_SDXL)
    x, t, context, _ = _tiny_inputs(U.TINY_SDXL)
    with pytest.raises(ValueError, match="y: expected"):
        model(x, t, context)


def test_bad_config_raises():
    with pytest.raises(ClipDiffusionError, match="num_heads"):
        U.UNetConfig(num_heads=8, head_channels=64)
    with pytest.raises(ClipDiffusionError, match="transformer_depth"):
        U.UNetConfig(channel_mult=(1, 2))
    with pytest.raises(ClipDiffusionError, match="num_heads=7"):
        U.UNetConfig(num_heads=7)
    with pytest.raises(ClipDiffusionError, match="head_channels=48"):
        U.UNetConfig(num_heads=None, head_channels=48)


def test_config_survives_json_round_trip():
    import json

    for preset in U.PRESETS.values():
        assert U.UNetConfig(**json.loads(json.dumps(dataclasses.asdict(preset)))) == preset


def test_channels_last_model_gives_the_same_output():
    torch.manual_seed(0)
    model = U.UNetModel(U.TINY_SD2).eval()
    x, t, context, _ = _tiny_inputs(U.TINY_SD2)
    with torch.no_grad():
        a = model(x, t, context)
        model.to(memory_format=torch.channels_last)
        b = model(x, t, context)
    assert b.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(a, b, atol=1e-5)
