"""VAE: parity with diffusers' AutoencoderKL (encode mean/logvar, decode) on identical random weights, sampling,
tiled decoding, config recovery, the full-size parameter count, and input validation."""

import pytest
import torch

from clipdiffusion.checkpoints.diffusers_vae import vae_config_from_diffusers, vae_diffusers_to_ldm
from clipdiffusion.diffusion import vae as V
from clipdiffusion.errors import ClipDiffusionError

ATOL = 1e-4  # fp32 parity tolerance against diffusers


@pytest.fixture(scope="module")
def pair():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    cfg = vae_config_from_diffusers(dict(ref.config))
    ours = V.AutoencoderKL(cfg).eval()
    ours.load_state_dict(vae_diffusers_to_ldm(ref.state_dict(), cfg), strict=True)
    return ref, ours


def test_encode_parity(pair):
    ref, ours = pair
    pixels = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1  # odd multiple of 8
    with torch.no_grad():
        expected = ref.encode(pixels).latent_dist
        got = ours.encode(pixels)
    assert got.mean.shape == (2, 4, 8, 12)
    assert (got.mean - expected.mean).abs().max() < ATOL
    assert (got.logvar - expected.logvar).abs().max() < ATOL
    assert torch.equal(got.mode(), got.mean)


def test_decode_parity(pair):
    ref, ours = pair
    latents = torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref.decode(latents).sample
        got = ours.decode(latents)
    assert got.shape == (2, 3, 12, 20)
    assert (got - expected).abs().max() < ATOL


def test_sample_is_seeded_mean_plus_std_noise(pair):
    _, ours = pair
    with torch.no_grad():
        posterior = ours.encode(torch.zeros(1, 3, 16, 16))
    a = posterior.sample(torch.Generator().manual_seed(7))
    b = posterior.sample(torch.Generator().manual_seed(7))
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert torch.allclose(a, posterior.mean + posterior.std * noise)
    assert not torch.equal(a, posterior.sample(torch.Generator().manual_seed(8)))


def test_tiled_decode_exact_when_one_tile():
    torch.manual_seed(0)
    vae = V.AutoencoderKL(V.TINY).eval()
    latents = torch.randn(1, 4, 12, 20)
    with torch.no_grad():
        assert torch.equal(vae.decode_tiled(latents, tile=20, overlap=4), vae.decode(latents))


def test_tiled_decode_close_to_untiled():
    torch.manual_seed(0)
    vae = V.AutoencoderKL(V.TINY).eval()
    latents = torch.randn(1, 4, 40, 56)
    with torch.no_grad():
        full = vae.decode(latents)
        tiled = vae.decode_tiled(latents, tile=32, overlap=16)  # 2x2 tiles
        coarse = vae.decode_tiled(latents, tile=16, overlap=4)  # 3x4 tiles, thin overlap
    assert tiled.shape == full.shape
    # Tiles see their own GroupNorm statistics and mid-attention context, so they cannot match exactly. Measured
    # on this random tiny model: mean |diff| ~6% of mean |pixel| (max 0.13); the bound leaves room for seeds.
    scale = full.abs().mean()
    assert (tiled - full).abs().mean() < 0.12 * scale
    assert (tiled - full).abs().max() < 0.5
    # more overlap and bigger tiles are closer: the blend, not luck, does the work
    assert (tiled - full).abs().mean() < (coarse - full).abs().mean()


@pytest.mark.parametrize("preset", [V.TINY, V.SD1])
def test_from_weights_recovers_config(preset):
    sd = V.AutoencoderKL(preset, device="meta").state_dict()
    assert V.VAEConfig.from_weights(sd) == preset
    prefixed = {"first_stage_model." + k: v for k, v in sd.items()}
    sdxl_like = V.VAEConfig.from_weights(prefixed, scale_factor=0.13025)
    assert sdxl_like.scale_factor == 0.13025 and sdxl_like.ch == preset.ch


def test_full_size_parameter_count_and_keys():
    vae = V.AutoencoderKL(V.SD1, device="meta")
    sd = vae.state_dict()
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert len(sd) == 248
    assert sd["encoder.conv_out.weight"].shape == (8, 512, 3, 3)
    assert sd["quant_conv.weight"].shape == (8, 8, 1, 1)
    assert sd["decoder.up.1.block.0.nin_shortcut.weight"].shape == (256, 512, 1, 1)
    assert sd["decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert "decoder.up.0.upsample.conv.weight" not in sd and "encoder.down.3.downsample.conv.weight" not in sd


def test_bad_input_names_the_field():
    vae = V.AutoencoderKL(V.TINY)
    with pytest.raises(ClipDiffusionError, match="pixels"):
        vae.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ClipDiffusionError, match="multiples of 2"):
        vae.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ClipDiffusionError, match="latents"):
        vae.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ClipDiffusionError, match="overlap"):
        vae.decode_tiled(torch.zeros(1, 4, 8, 8), tile=8, overlap=8)


def test_config_survives_json_round_trip():
    import dataclasses
    import json

    for preset in V.PRESETS.values():
        assert V.VAEConfig(**json.loads(json.dumps(dataclasses.asdict(preset)))) == preset


def test_channels_last_model_gives_the_same_output():
    torch.manual_seed(0)
    vae = V.AutoencoderKL(V.TINY).eval()
    pixels = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        a, za = vae.decode(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))), vae.encode(pixels).mean
        vae.to(memory_format=torch.channels_last)
        b, zb = vae.decode(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))), vae.encode(pixels).mean
    assert b.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(za, zb, atol=1e-5)
