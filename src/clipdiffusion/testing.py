"""Tiny random-weight pipelines for tests across the project (server, CLI, pipeline). Keep the signature stable.

The models are real (the same classes as SD, tiny configs), so everything runs end to end in well under a second
per image on a CPU; the images are noise-like because the weights are random.
"""

from __future__ import annotations

FAMILIES = ("sd1", "sd2", "sdxl", "tiny")
TINY_SIZE = 32  # pixels: 16x16 latents through the tiny VAE (x2) and 8x8 at the UNet's second level


def _clip(width, layers, heads, activation="quick_gelu", projection_dim=None):
    from .text.clip import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(width=width, layers=layers, heads=heads, activation=activation,
                            projection_dim=projection_dim)
    return CLIPTextModel(config).eval()


def _text_encoder(family):
    from .text.conditioning import EncoderSpec, TextEncoder

    if family in ("sd1", "tiny"):
        specs = [EncoderSpec("clip_l", _clip(32, 2, 2), pad_id=49407, final_norm=True)]
    elif family == "sd2":
        specs = [EncoderSpec("openclip_h", _clip(32, 3, 2, "gelu", 32), pad_id=0, final_norm=True,
                             default_clip_skip=2)]
    else:  # sdxl: context = CLIP-L 16 + bigG 16 = 32; pooled 16 + 6 size embeddings of 8 = adm 64
        specs = [EncoderSpec("clip_l", _clip(16, 2, 2), pad_id=49407, final_norm=False, default_clip_skip=2),
                 EncoderSpec("openclip_bigg", _clip(16, 3, 2, "gelu", 16), pad_id=0, final_norm=False,
                             default_clip_skip=2)]
    return TextEncoder(family, specs)


def tiny_pipeline(seed: int = 0, family: str = "sd1", prediction: str = "eps"):
    """A ``Pipeline`` with random tiny weights: the same ``seed`` gives the same weights (the global torch RNG is
    seeded for construction and restored afterwards).

    ``family``: "sd1" | "sd2" | "sdxl" | "tiny". Default image size ``TINY_SIZE``; width and height must be
    multiples of 4 (tiny VAE x2, tiny UNet x2).
    """
    import torch

    from .diffusion import unet as unet_mod
    from .diffusion import vae as vae_mod
    from .errors import ClipDiffusionError
    from .pipeline import Pipeline

    if family not in FAMILIES:
        raise ClipDiffusionError(f"family={family!r}: choose from {', '.join(FAMILIES)}")
    unet_config = {"sd1": unet_mod.TINY, "tiny": unet_mod.TINY, "sd2": unet_mod.TINY_SD2,
                   "sdxl": unet_mod.TINY_SDXL}[family]
    state = torch.random.get_rng_state()
    try:
        # module initialisers draw from the global RNG; restore it so tests do not perturb each other
        torch.manual_seed(seed)
        text_encoder = _text_encoder(family)
        unet = unet_mod.UNetModel(unet_config).eval()
        vae = vae_mod.AutoencoderKL(vae_mod.TINY).eval()
    finally:
        torch.random.set_rng_state(state)
    return Pipeline(text_encoder, unet, vae, family, prediction, name=f"tiny-random-{family}",
                    default_size=TINY_SIZE)
