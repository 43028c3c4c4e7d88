"""Building components from checked tensors: configs that weights cannot reveal, strict key checks, modules.

Used by load.py (single files and diffusers folders). Hyperparameters that weights cannot reveal (head split,
norm groups, scale factor) come from our own metadata when we wrote the file, else from the family's presets.
Models are built on the meta device and adopt the loaded tensors, so no random weights are ever allocated.
"""

from __future__ import annotations

import dataclasses
import json

import torch

from ..errors import CheckpointError, ClipDiffusionError
from . import detect


# --- configs that weights cannot reveal --------------------------------------------------------------------


def config_from_json(cls, text, *, source, what):
    """A frozen config dataclass from our metadata JSON; lists become tuples, unknown fields are an error."""
    try:
        data = json.loads(text) if isinstance(text, str) else text
    except (ValueError, RecursionError):
        raise CheckpointError(source, f"metadata {what} is not valid JSON") from None
    if not isinstance(data, dict):
        raise CheckpointError(source, f"metadata {what} must be a JSON object")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise CheckpointError(source, f"metadata {what} has unknown fields {unknown}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    try:  # the config dataclasses check every field's type and range (__post_init__)
        return cls(**values)
    except (ClipDiffusionError, TypeError) as exc:
        raise CheckpointError(source, f"metadata {what}: {exc}") from None


def config_to_json(config) -> str:
    return json.dumps(dataclasses.asdict(config), separators=(",", ":"))


def _meta_shapes(sd: dict, prefix: str) -> dict:
    """Shape-only stand-ins for ``from_weights`` (which reads ``.shape`` and nothing else)."""
    return {k: torch.empty(v, device="meta") for k, v in sd.items() if k.startswith(prefix)}


# What ``from_weights`` raises on shapes a hostile file chose (a missing key, a rank-0 tensor, a zero width).
_SHAPE_ERRORS = (ClipDiffusionError, KeyError, IndexError, ValueError, ZeroDivisionError, TypeError)


def _exc_text(exc) -> str:
    text = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
    return " ".join(text.split())[:300]


def unet_config_for(family, shapes, metadata, source):
    from ..diffusion import unet

    if detect.META_UNET in metadata:
        return config_from_json(unet.UNetConfig, metadata[detect.META_UNET], source=source, what=detect.META_UNET)
    # The weights cannot reveal the head split: the family's preset has it (SD1 8 heads, SD2/SDXL 64-wide heads,
    # which is also from_weights' default for conv and linear projections; the tiny model its own).
    preset = unet.PRESETS[family]
    extra = dict(num_heads=preset.num_heads, head_channels=preset.head_channels)
    try:
        return unet.UNetConfig.from_weights(_meta_shapes(shapes, detect.UNET_PREFIX), **extra)
    except _SHAPE_ERRORS as exc:
        raise CheckpointError(source, f"UNet structure not recognised: {_exc_text(exc)}") from None


def vae_config_for(family, shapes, metadata, source):
    from ..diffusion import vae

    if detect.META_VAE in metadata:
        return config_from_json(vae.VAEConfig, metadata[detect.META_VAE], source=source, what=detect.META_VAE)
    try:
        return vae.VAEConfig.from_weights(_meta_shapes(shapes, detect.VAE_PREFIX),
                                          scale_factor=vae.PRESETS[family].scale_factor)  # fmt: skip
    except _SHAPE_ERRORS as exc:
        raise CheckpointError(source, f"VAE structure not recognised: {_exc_text(exc)}") from None


def text_configs_from_metadata(metadata, source):
    from ..text.clip import CLIPTextConfig

    if detect.META_TEXT not in metadata:
        return None
    try:
        items = json.loads(metadata[detect.META_TEXT])
    except (ValueError, RecursionError):
        raise CheckpointError(source, f"metadata {detect.META_TEXT} is not valid JSON") from None
    if not isinstance(items, list):
        raise CheckpointError(source, f"metadata {detect.META_TEXT} must be a JSON list")
    return [config_from_json(CLIPTextConfig, c, source=source, what=detect.META_TEXT) for c in items]


# --- strict module building --------------------------------------------------------------------------------


def key_problems(what, expected: dict, given: dict) -> list[str]:
    """Every missing, unexpected and mis-shaped key, by the names they have in the file."""
    missing = sorted(k for k in expected if k not in given)
    unexpected = sorted(k for k in given if k not in expected)
    bad = sorted(f"{k} {list(given[k])} (expected {list(expected[k])})"
                 for k in expected if k in given and tuple(given[k]) != tuple(expected[k]))  # fmt: skip
    out = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad)):
        if items:
            out.append(f"{what} {label} ({len(items)}): {', '.join(items)}")
    return out


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def integer_weights(dtypes: dict, keys) -> list[str]:
    """Weights stored as integers or bools (a module's parameters must be floating point): found from the header
    dtypes, before any tensor data is read."""
    bad = sorted(f"{k} ({dtypes[k]})" for k in keys if dtypes[k] not in _FLOAT_DTYPES)
    if not bad:
        return []
    shown = ", ".join(bad[:20]) + (f" (+{len(bad) - 20} more)" if len(bad) > 20 else "")
    return [f"weights stored with an integer or bool dtype ({len(bad)}; must be F16, BF16, F32 or F64): {shown}"]


def expected_shapes(model, prefix=""):
    return {prefix + k: tuple(v.shape) for k, v in model.state_dict().items()}


def build_module(cls, config, tensors: dict, *, dtype, device, model=None):
    """Adopt ``tensors`` (already checked) into a meta-device instance (``model``, or a new one): no random
    init, no extra copy."""
    model = model if model is not None else cls(config, device="meta")
    cast = {}
    for name, value in tensors.items():
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        cast[name] = value.to(device)
    model.load_state_dict(cast, strict=True, assign=True)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:  # a non-persistent buffer was created on meta: rebuild the ordinary way
        model = cls(config, device=device, dtype=dtype)
        model.load_state_dict(cast, strict=True)
    return model.eval().requires_grad_(False)
