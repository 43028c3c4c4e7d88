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


LORA_LAYOUTS = ("kohya", "kohya_ldm", "peft")
ATTENTION_MLP = ("attn1.", "attn2.", "ff.net.", "self_attn.", "mlp.")  # kohya's default LoRA targets (by name)


def random_lora(pipe, *, layout: str = "kohya", rank: int = 4, seed: int = 0, unet: bool = True, text: bool = True,
                select=None, alpha: float | None = None, std: float = 0.05, dtype=None) -> dict:
    """Random LoRA tensors for ``pipe``'s weights, spelled as a real file would: ``layout`` "kohya" (SD1-style:
    ``lora_unet_<diffusers path>``), "kohya_ldm" (SDXL-style: ``lora_unet_<LDM path>``) or "peft" (``unet.<diffusers
    path>.lora_A.weight``); text towers as ``lora_te[N]_text_model_...`` / ``text_encoder[_N].text_model....``.
    ``select(parameter) -> bool`` picks the target weights (default: attention and MLP linears, kohya's default);
    conv targets get [r, in, kh, kw] down and [out, r, 1, 1] up factors. ``alpha`` None writes no alpha."""
    import torch

    from .checkpoints.lora import UNET, lora_targets

    if layout not in LORA_LAYOUTS:
        raise ValueError(f"layout={layout!r}: choose from {', '.join(LORA_LAYOUTS)}")
    select = select or (lambda parameter: any(part in parameter for part in ATTENTION_MLP))
    targets = lora_targets(pipe.unet, [spec.model for spec in pipe.text_encoder.encoders])
    spellings = {}
    for name, target in targets.names.items():
        spellings.setdefault(target, []).append(name)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for target, names in spellings.items():
        if not select(target.parameter) or not (unet if target.component == UNET else text):
            continue
        if target.component == UNET:
            kohya = [n for n in names if n.startswith("lora_unet_")]
            peft = [n for n in names if n.startswith("unet.")]
            if layout == "peft" and not peft:
                continue
            name = peft[0] if layout == "peft" else kohya[0] if layout == "kohya_ldm" else kohya[-1]
        else:
            name = names[2] if layout == "peft" else names[0]
        shape = target.shape
        r = min(rank, shape[0], shape[1])
        down_shape = (r, *shape[1:]) if len(shape) == 4 else (r, shape[1])
        up_shape = (shape[0], r, 1, 1) if len(shape) == 4 else (shape[0], r)
        down = torch.randn(down_shape, generator=g) * std
        up = torch.randn(up_shape, generator=g) * std
        if layout == "peft":
            out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = down, up
        else:
            out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
        if alpha is not None:
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    if dtype is not None:
        out = {k: v.to(dtype) for k, v in out.items()}
    return out
