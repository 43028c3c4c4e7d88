"""Which model is this? Family and prediction type from tensor names and shapes (no tensor data needed).

The decision follows checkpoints.md §6.2: the UNet's first conv gives in/model channels, the cross-attention
``attn2.to_k`` width gives the text context (768 SD1, 1024 SD2, 2048 SDXL, 1280 SDXL refiner), ``label_emb``
gives the extra-vector width (2816 SDXL). Text-encoder prefixes must agree with that guess. Families we do not run
(inpainting, refiner, unCLIP, depth, upscaler, EDM) are refused by name; anything else unknown is refused with the
measured values so the user can see what the file is.

Prediction type (eps or v) is not stored in the weights. Order: the caller's override, our metadata or
ModelSpec metadata, ComfyUI's ``v_pred`` marker key, then the family default. SD2 is ambiguous: the 768-v models
are v-prediction, the 512-base models are eps, and nothing in the tensors tells them apart reliably; like diffusers
we default SD2 to "v" and say so in ``Family.notes`` (pass ``prediction="eps"`` for 512-base).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .. import families
from ..errors import CheckpointError
from .text_layouts import tower_layouts

# What a family is (native size, default prediction, text prefixes, recipes) lives in clipdiffusion.families.
FAMILIES = families.NAMES
PREDICTIONS = families.PREDICTIONS

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# The public families by (in_channels, context_dim, adm_in_channels) of their UNet (checkpoints.md §6.2); the
# others (tiny) match no public sizes and are known only from our metadata.
_BY_SHAPES = {(4, 768, None): "sd1", (4, 1024, None): "sd2", (4, 2048, 2816): "sdxl"}
LATENT_CHANNELS = 4
INPAINT_IN_CHANNELS = 2 * LATENT_CHANNELS + 1  # SD/SDXL inpainting UNets: latent, mask, masked-image latent

# Metadata keys we write (save.py) and read.
META_FAMILY = "clipdiffusion.family"
META_PREDICTION = "clipdiffusion.prediction"
META_UNET = "clipdiffusion.unet_config"
META_VAE = "clipdiffusion.vae_config"
META_TEXT = "clipdiffusion.text_configs"
DIFFUSERS_FAMILY_KEY = "_clipdiffusion_family"  # in model_index.json of folders we write
_MODELSPEC_PREDICTION = {"epsilon": "eps", "eps": "eps", "v": "v", "v_prediction": "v"}
_MODELSPEC_ARCH = {  # ModelSpec architecture -> (family, prediction or None for any); read and written
    "stable-diffusion-v1": ("sd1", None),
    "stable-diffusion-v2-512": ("sd2", "eps"),
    "stable-diffusion-v2-768-v": ("sd2", "v"),
    "stable-diffusion-xl-v1-base": ("sdxl", None),
}


def modelspec_architecture(family: str, prediction: str) -> str | None:
    """The ModelSpec ``modelspec.architecture`` of a family and prediction type (None: there is none)."""
    return next((arch for arch, (name, pred) in _MODELSPEC_ARCH.items()
                 if name == family and pred in (None, prediction)), None)  # fmt: skip

# Keys that are not network weights (checkpoints.md §1.3): listed as ignored, never loaded, never an error.
_IGNORED_EXACT = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "scale_factor", "denoiser.sigmas", "v_pred", "ztsnr",
}  # fmt: skip
_IGNORED_PATTERNS = (
    re.compile(r"^model_ema\."),  # LDM LitEma shadow copy; "pruned"/"emaonly" files already moved it into model.*
    re.compile(r"(^|\.)position_ids$"),  # HF CLIP buffer, sometimes stored as drifted floats: always regenerated
    re.compile(r"(^|\.)logit_scale$"),  # OpenCLIP contrastive temperature, unused for generation
    re.compile(r"^first_stage_model\.loss\."),  # VAE training loss (LPIPS, discriminator) in training dumps
)


@dataclass(frozen=True)
class Family:
    name: str  # one of FAMILIES
    prediction: str  # "eps" | "v"
    prediction_source: str  # where the prediction type came from, for `info` and error messages
    in_channels: int
    model_channels: int
    context_dim: int
    adm_in_channels: int | None
    ignored_keys: tuple[str, ...]  # present in the file, deliberately not loaded
    notes: tuple[str, ...] = ()

    @property
    def record(self) -> families.ModelFamily:
        """The family's record in the family table."""
        return families.get_family(self.name)


def is_ignored_key(key: str) -> bool:
    return key in _IGNORED_EXACT or any(p.search(key) for p in _IGNORED_PATTERNS)


def _found(shapes, path, **measured) -> str:
    tops = sorted({k.split(".")[0] for k in shapes})
    parts = [f"{k}={v}" for k, v in measured.items()]
    return ", ".join(parts + [f"top-level prefixes {tops[:12]}", f"{len(shapes)} tensors"])


def _first(shapes, suffix, prefix=UNET_PREFIX):
    for key in sorted(shapes):
        if key.startswith(prefix) and key.endswith(suffix):
            return shapes[key]
    return None


def _refuse_unsupported(path, shapes, in_ch, context, adm, mc):
    """Families we recognise but do not run: refuse by name, with what was found."""
    found = _found(shapes, path, in_channels=in_ch, model_channels=mc, context_dim=context, adm_in_channels=adm)
    if any(k.startswith("depth_model.") for k in shapes) or in_ch == 5:
        raise CheckpointError(path, f"SD2 depth models are not supported ({found})")
    if in_ch == 8:
        raise CheckpointError(path, f"instruct-pix2pix models (8 input channels) are not supported ({found})")
    if in_ch == 7 or f"{UNET_PREFIX}input_blocks.10.0.skip_connection.bias" in shapes:
        raise CheckpointError(path, f"the x4 upscaler is not supported ({found})")
    # A refiner keeps only bigG, at embedders.0 (SD2 saved in SGM form also does, but with context 1024).
    bigg_first = any(k.startswith("conditioner.embedders.0.model.") for k in shapes) and not any(
        k.startswith("conditioner.embedders.1.") for k in shapes
    )
    if context == 1280 or adm == 2560 or (bigg_first and context != 1024):
        raise CheckpointError(path, f"the SDXL refiner is not supported ({found})")
    if "edm_mean" in shapes or any(k.startswith("edm_vpred.") for k in shapes):
        raise CheckpointError(
            path, f"EDM-parameterised models (Playground v2.5, EDM v-pred) are not supported ({found})"
        )
    if any(k.endswith(".scale_weight") for k in shapes) or "scaled_fp8" in shapes:
        raise CheckpointError(path, f"fp8-quantised checkpoints are not supported ({found})")
    if context == 1024 and adm in (1536, 2048):
        raise CheckpointError(path, f"SD2 unCLIP models are not supported ({found})")


def _family_from_shapes(path, shapes):
    if any(k.startswith("conv_in.") for k in shapes) and any(k.startswith("down_blocks.") for k in shapes):
        raise CheckpointError(path, "diffusers-named UNet weights: load the whole diffusers folder instead")
    first = shapes.get(f"{UNET_PREFIX}input_blocks.0.0.weight")
    if first is None or len(first) != 4:
        raise CheckpointError(path, f"no LDM UNet found under {UNET_PREFIX!r} ({_found(shapes, path)})")
    mc, in_ch = first[0], first[1]
    to_k = _first(shapes, ".attn2.to_k.weight")
    context = to_k[1] if to_k is not None and len(to_k) == 2 else None
    label = shapes.get(f"{UNET_PREFIX}label_emb.0.0.weight")
    adm = label[1] if label is not None and len(label) == 2 else None
    _refuse_unsupported(path, shapes, in_ch, context, adm, mc)
    measured = dict(in_channels=in_ch, model_channels=mc, context_dim=context, adm_in_channels=adm)
    # an inpainting UNet (9 = latent 4 + mask 1 + masked-image latent 4) belongs to its base family
    name = _BY_SHAPES.get((LATENT_CHANNELS if in_ch == INPAINT_IN_CHANNELS else in_ch, context, adm))
    if name is None:
        raise CheckpointError(path, f"unknown model family ({_found(shapes, path, **measured)})")
    return name, measured


def _check_components(path, shapes, family):
    if not any(k.startswith(VAE_PREFIX) for k in shapes):
        raise CheckpointError(path, f"{family.name}: no VAE under {VAE_PREFIX!r} ({_found(shapes, path)})")
    # every tower under one of its layouts' prefixes (SD2: LDM or SGM form)
    towers = tower_layouts(family)
    if not all(any(k.startswith(layout.prefix) for layout in layouts for k in shapes) for layouts in towers):
        want = " and ".join(" or ".join(layout.prefix for layout in layouts) for layouts in towers)
        raise CheckpointError(path, f"{family.name}: no text encoder under {want} ({_found(shapes, path)})")


def _prediction(path, name, shapes, metadata, override):
    if override is not None:
        if override not in PREDICTIONS:
            raise CheckpointError(path, f"prediction must be one of {PREDICTIONS}, got {override!r}")
        return override, "user override"
    ours = metadata.get(META_PREDICTION)
    if ours is not None:
        if ours not in PREDICTIONS:
            raise CheckpointError(path, f"metadata {META_PREDICTION}={ours!r} is not one of {PREDICTIONS}")
        return ours, f"metadata {META_PREDICTION}"
    spec = metadata.get("modelspec.prediction_type")
    if spec in _MODELSPEC_PREDICTION:
        return _MODELSPEC_PREDICTION[spec], "metadata modelspec.prediction_type"
    arch = _MODELSPEC_ARCH.get(metadata.get("modelspec.architecture", ""))
    if arch and arch[0] == name and arch[1]:
        return arch[1], "metadata modelspec.architecture"
    if "v_pred" in shapes:
        return "v", "marker key v_pred"
    return families.get_family(name).default_prediction, f"{name} default"


def detect_family(shapes: dict, metadata: dict | None = None, *, prediction: str | None = None, path="<state dict>"):
    """Identify a single-file LDM/SGM checkpoint from ``{key: shape}`` (and its safetensors metadata)."""
    metadata = dict(metadata or {})
    shapes = {k: tuple(v) for k, v in shapes.items()}
    declared = metadata.get(META_FAMILY)
    if declared is not None and declared not in FAMILIES:
        raise CheckpointError(path, f"metadata {META_FAMILY}={declared!r} is not one of {FAMILIES}")
    if declared is not None and (declared not in _BY_SHAPES.values() or META_UNET in metadata):
        # Files we wrote carry their configs; their sizes (the embedded tiny model, tiny test variants of each
        # layout) match no public family, so the metadata is the authority and strict loading checks the rest.
        first = shapes.get(f"{UNET_PREFIX}input_blocks.0.0.weight")
        if first is None or len(first) != 4:
            raise CheckpointError(path, f"{declared}: no LDM UNet found under {UNET_PREFIX!r} ({_found(shapes, path)})")
        to_k = _first(shapes, ".attn2.to_k.weight")
        label = shapes.get(f"{UNET_PREFIX}label_emb.0.0.weight")
        name = declared
        # rank checks: a file's shapes are its own claims (a rank-1 to_k must be a shape error later, not a crash)
        measured = dict(in_channels=first[1], model_channels=first[0],
                        context_dim=to_k[1] if to_k is not None and len(to_k) == 2 else None,
                        adm_in_channels=label[1] if label is not None and len(label) == 2 else None)  # fmt: skip
    else:
        name, measured = _family_from_shapes(path, shapes)
        if declared is not None and declared != name:
            raise CheckpointError(path, f"metadata says {META_FAMILY}={declared!r} but the weights are {name}")
    record = families.get_family(name)
    _check_components(path, shapes, record)
    pred, source = _prediction(path, name, shapes, metadata, prediction)
    notes = []
    if source == f"{name} default" and record.eps_native_size is not None:
        # a family with both eps and v models (told apart by their native size, never by the tensors)
        notes.append(f"{name.upper()} prediction type is not recorded in the file: assuming {pred} "
                     f"({record.native_size_for(pred)}-{pred}); use eps for {record.eps_native_size}-base")
    if measured["in_channels"] == INPAINT_IN_CHANNELS:
        notes.append(f"inpainting model ({INPAINT_IN_CHANNELS} input channels: latent, mask, masked-image latent)")
    if "ztsnr" in shapes:
        notes.append("ztsnr marker found: the file was trained for a zero-terminal-SNR schedule")
    ema = sum(k.startswith("model_ema.") for k in shapes)
    if ema:
        notes.append(f"{ema} EMA tensors (model_ema.*) ignored: the model.* weights are used")
    ignored = tuple(sorted(k for k in shapes if is_ignored_key(k)))
    return Family(name=name, prediction=pred, prediction_source=source, ignored_keys=ignored, notes=tuple(notes),
                  **measured)  # fmt: skip


def family_from_diffusers(unet_config: dict, has_text_encoder_2: bool, path="<folder>", *,
                          text_configs: dict | None = None) -> str:
    """Family of a diffusers folder from its structure, not its widths.

    ``text_configs`` maps the folder's text-tower subfolders (``text_encoder``, ``text_encoder_2``) to their
    ``config.json`` dicts. With it, any size of the SD architectures is recognised: two towers and
    ``addition_embed_type == "text_time"`` is SDXL (one tower with text_time is the refiner, refused); one
    OpenCLIP-style tower (``hidden_act`` "gelu") is SD2, one CLIP-L-style tower (quick_gelu, transformers' default)
    is SD1; and the UNet's ``cross_attention_dim`` must be the tower's width (the two widths' sum for SDXL).
    Without it (the UNet config alone) only the public widths are known: 768 SD1, 1024 SD2, 2048 SDXL.
    """
    from .config_values import ConfigValueError, get_int, get_str, is_int, show

    context = unet_config.get("cross_attention_dim")
    in_ch = unet_config.get("in_channels", 4)
    embed_type = unet_config.get("addition_embed_type")
    if isinstance(in_ch, bool) or in_ch not in (LATENT_CHANNELS, INPAINT_IN_CHANNELS):
        raise CheckpointError(path, f"unet in_channels={show(in_ch)} (depth/pix2pix models are not supported; "
                                    f"{LATENT_CHANNELS}, or {INPAINT_IN_CHANNELS} for inpainting)")
    if text_configs is None:
        if context == 768 and not has_text_encoder_2:
            return "sd1"
        if context == 1024 and unet_config.get("class_embed_type") is None and not has_text_encoder_2:
            return "sd2"
        if context == 2048 and embed_type == "text_time" and has_text_encoder_2:
            return "sdxl"
        if context == 1280:
            raise CheckpointError(path, "the SDXL refiner is not supported (cross_attention_dim=1280)")
        raise CheckpointError(
            path,
            f"unknown model family (unet cross_attention_dim={show(context)}, in_channels={show(in_ch)}, "
            f"addition_embed_type={show(embed_type)}, text_encoder_2={has_text_encoder_2})",
        )
    towers = [sub for sub in ("text_encoder", "text_encoder_2") if sub in text_configs]
    found = (f"unet cross_attention_dim={show(context)}, addition_embed_type={show(embed_type)}, "
             f"class_embed_type={show(unet_config.get('class_embed_type'))}, text encoders: "
             f"{', '.join(towers) or 'none'}")  # fmt: skip
    shape = {}
    for sub in towers:  # typed reads: a hostile value is an error naming the file and the key
        try:
            shape[sub] = (get_int(text_configs[sub], "hidden_size"),
                          get_str(text_configs[sub], "hidden_act", "quick_gelu", choices=("quick_gelu", "gelu")))
        except ConfigValueError as exc:
            raise CheckpointError(f"{path}/{sub}/config.json", exc.reason) from None
    if unet_config.get("class_embed_type") is not None:
        name = None
    elif embed_type == "text_time":
        if towers == ["text_encoder_2"]:  # bigG alone, plus an aesthetic score in y
            raise CheckpointError(path, f"the SDXL refiner is not supported ({found})")
        name = "sdxl" if len(towers) == 2 else None
    elif embed_type is None and towers == ["text_encoder"]:
        name = "sd2" if shape["text_encoder"][1] == "gelu" else "sd1"  # OpenCLIP towers use exact GELU
    else:
        name = None
    if name is None:
        raise CheckpointError(path, f"unknown model family ({found})")
    width = sum(w for w, _ in shape.values())
    if is_int(context) and context != width:
        widths = " + ".join(f"{sub} hidden_size {w}" for sub, (w, _) in shape.items())
        raise CheckpointError(path, f"unet cross_attention_dim={context} does not fit the text encoders "
                                    f"({widths} = {width}); {name}-style models condition on that width")
    return name
