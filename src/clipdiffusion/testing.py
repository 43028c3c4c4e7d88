"""Tiny random-weight pipelines for tests across the project (server, CLI, pipeline). Keep the signature stable.

The models are real (the same classes as SD, tiny configs), so everything runs end to end in well under a second
per image on a CPU; the images are noise-like because the weights are random.
"""

from __future__ import annotations

TINY_SIZE = 32  # pixels: 16x16 latents through the tiny VAE (x2) and 8x8 at the UNet's second level
# Tiny stand-ins per family (data): each text tower's (width, layers, heads, projection_dim; the activation is its
# tower's) and the UNet preset. SDXL: context = CLIP-L 16 + bigG 16 = 32; pooled 16 + 6 size embeddings of 8 = adm 64.
_TOWERS = {"sd1": ((32, 2, 2, None),), "tiny": ((32, 2, 2, None),), "sd2": ((32, 3, 2, 32),),
           "sdxl": ((16, 2, 2, None), (16, 3, 2, 16))}  # fmt: skip
_UNETS = {"sd1": "tiny", "tiny": "tiny", "sd2": "tiny_sd2", "sdxl": "tiny_sdxl"}


def _clip(width, layers, heads, activation="quick_gelu", projection_dim=None):
    from .text.clip import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(width=width, layers=layers, heads=heads, activation=activation,
                            projection_dim=projection_dim)
    return CLIPTextModel(config).eval()


def _text_encoder(family):
    """Random tiny towers that follow the family's recipes (pad id, final norm, default clip skip)."""
    from .checkpoints.text_layouts import TOWER_ACTIVATION
    from .text.conditioning import EncoderSpec, TextEncoder

    specs = [EncoderSpec(recipe.name, _clip(width, layers, heads, TOWER_ACTIVATION[recipe.name], projection),
                         pad_id=recipe.pad_id, final_norm=recipe.final_norm,
                         default_clip_skip=recipe.default_clip_skip)
             for recipe, (width, layers, heads, projection) in zip(family.towers, _TOWERS[family.name])]  # fmt: skip
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
    from .families import get_family
    from .pipeline import Pipeline

    record = get_family(family)  # a ClipDiffusionError naming the value for an unknown family
    unet_config = unet_mod.PRESETS[_UNETS[record.name]]
    state = torch.random.get_rng_state()
    try:
        # module initialisers draw from the global RNG; restore it so tests do not perturb each other
        torch.manual_seed(seed)
        text_encoder = _text_encoder(record)
        unet = unet_mod.UNetModel(unet_config).eval()
        vae = vae_mod.AutoencoderKL(vae_mod.TINY).eval()
    finally:
        torch.random.set_rng_state(state)
    return Pipeline(text_encoder, unet, vae, record.name, prediction, name=f"tiny-random-{record.name}",
                    default_size=TINY_SIZE)
