"""Where a text tower's tensors sit in a file and what they are called there: one table, both directions.

Two namings (see ../shared/reference/checkpoints.md §2.7, §3.2, §4.1, §5.4):

- ``HF``: transformers' ``CLIPTextModel`` / ``CLIPTextModelWithProjection``: ``text_model.*`` (or flat, as
  transformers >= 5 saves CLIPTextModel; old SD1 merges lack it too) and ``text_projection.weight`` at the top.
  Our parameter names (text/clip.py) are these minus ``text_model.``.
- ``OPENCLIP``: ``token_embedding``, ``positional_embedding``, ``transformer.resblocks.N`` with q/k/v fused into
  ``attn.in_proj_*`` (rows q, k, v), ``ln_final``, and ``text_projection`` stored [in, out] because OpenCLIP
  computes ``x @ W`` (our Linear weight is its transpose).

``LAYOUTS`` names every place a tower is stored: the single-file prefixes of each family (LDM SD1 and SD2, SGM
SDXL and SD2 as SGM-era tools save it), a standalone transformers file or diffusers ``text_encoder*/`` folder,
and a bare OpenCLIP text tower. ``tower_layouts(family)`` reads the family table's ``text_prefixes`` through it.
Renames: ``to_ours`` (file -> our names, with every unexpected and mis-shaped key), ``from_ours`` (ours -> file).

Torch-free at import.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from ..errors import ClipDiffusionError

HF = "hf"
OPENCLIP = "openclip"


@dataclass(frozen=True)
class TextLayout:
    name: str
    prefix: str  # of the tower's keys in the file ("" for a standalone file)
    naming: str  # HF | OPENCLIP
    projection: bool = True  # False: CLIP-L in SD files, whose hidden states alone are used; a stray
    #                          text_projection there is ignored, never loaded


LAYOUTS = {layout.name: layout for layout in (
    TextLayout("ldm", "cond_stage_model.transformer.", HF, projection=False),  # SD1: OpenAI CLIP-L
    TextLayout("ldm_openclip", "cond_stage_model.model.", OPENCLIP),  # SD2: OpenCLIP ViT-H
    TextLayout("sgm_openclip", "conditioner.embedders.0.model.", OPENCLIP),  # SD2 saved by SGM-era tools
    TextLayout("sgm_clip_l", "conditioner.embedders.0.transformer.", HF, projection=False),  # SDXL: CLIP-L
    TextLayout("sgm_clip_g", "conditioner.embedders.1.model.", OPENCLIP),  # SDXL: OpenCLIP bigG
    TextLayout("hf", "", HF),  # transformers CLIPTextModel(WithProjection); a diffusers text_encoder*/ folder
    TextLayout("openclip", "", OPENCLIP),  # a bare OpenCLIP text tower (or a whole OpenCLIP model), maybe "text."
)}  # fmt: skip
SINGLE_FILE = {layout.prefix: layout for layout in LAYOUTS.values() if layout.prefix}
DIFFUSERS_TEXT_FOLDERS = ("text_encoder", "text_encoder_2")  # one per tower, in tower order
# Activation per tower: OpenAI's CLIP-L uses quick_gelu, OpenCLIP's H and bigG exact GELU.
TOWER_ACTIVATION = {"clip_l": "quick_gelu", "clip_h": "gelu", "clip_g": "gelu"}
# diffusers stores SD2's OpenCLIP-H without its last layer (SD2 conditions on the penultimate one).
DIFFUSERS_DROPPED_LAYERS = {"clip_h": 1}
# Names under a tower's prefix that hold no text-encoder weight (regenerated buffers, CLIP's contrastive scalar).
IGNORED_LEAVES = ("position_ids", "logit_scale", "attn_mask")
LONG_CLIP_RES = "positional_embedding_res"
LONG_CLIP_KEEP = 20  # rows of the original CLIP table that Long-CLIP keeps (its mask1)


def tower_layouts(family) -> list[tuple[TextLayout, ...]]:
    """Per text tower of ``family`` (a ``families.ModelFamily``), the single-file layouts it may be stored in;
    the first is the one we write. A family lists one prefix per tower (SDXL), or alternatives for its one tower
    (SD2: LDM ``cond_stage_model.model.`` or SGM ``conditioner.embedders.0.model.``)."""
    layouts = tuple(SINGLE_FILE[p] for p in family.text_prefixes)
    if len(layouts) == len(family.towers):
        return [(layout,) for layout in layouts]
    if len(family.towers) == 1:
        return [layouts]
    raise ClipDiffusionError(f"family {family.name}: {len(layouts)} text prefixes for {len(family.towers)} towers")


def at(layout: TextLayout, prefix: str) -> TextLayout:
    """``layout`` with its keys under ``prefix`` (a standalone OpenCLIP file's ``text.``, a folder's name)."""
    return dataclasses.replace(layout, prefix=prefix)


def leaf_ignored(sub: str) -> bool:
    return sub.rsplit(".", 1)[-1] in IGNORED_LEAVES or sub.startswith("visual.")


# --- names ---------------------------------------------------------------------------------------------------

# OpenCLIP block names -> ours (transformers' CLIPEncoderLayer names)
_OPENCLIP_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
OPENCLIP_TOP = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
    "text_projection": "text_projection.weight",
}
_OURS_TOP = {v: k for k, v in OPENCLIP_TOP.items()}
_OURS_BLOCK = {v: k for k, v in _OPENCLIP_BLOCK.items()}
_BLOCK_RE = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_FUSED_RE = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
_LAYER_RE = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def _openclip_to_ours(name: str) -> list[str] | None:
    """Our names for one OpenCLIP text-tower key (three for the fused q/k/v), or None if it is not one."""
    if name in OPENCLIP_TOP:
        return [OPENCLIP_TOP[name]]
    fused = _FUSED_RE.fullmatch(name)
    if fused:
        n, kind = fused.groups()
        return [f"encoder.layers.{n}.self_attn.{p}_proj.{kind}" for p in "qkv"]
    block = _BLOCK_RE.fullmatch(name)
    if block and block.group(2) in _OPENCLIP_BLOCK:
        n, part, kind = block.groups()
        return [f"encoder.layers.{n}.{_OPENCLIP_BLOCK[part]}.{kind}"]
    return None


def file_name(naming: str, ours: str, *, text_model: bool = True) -> str:
    """The name of our parameter ``ours`` in ``naming`` (without the layout's prefix)."""
    if naming == HF:
        return ("text_model." if text_model and not ours.startswith("text_projection") else "") + ours
    if ours in _OURS_TOP:
        return _OURS_TOP[ours]
    layer = _LAYER_RE.fullmatch(ours)
    if layer:
        n, part, kind = layer.groups()
        if part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            return f"transformer.resblocks.{n}.attn.in_proj_{kind}"
        if part in _OURS_BLOCK:
            return f"transformer.resblocks.{n}.{_OURS_BLOCK[part]}.{kind}"
    raise ClipDiffusionError(f"no OpenCLIP name for text encoder parameter {ours!r}")


def to_ours(naming: str, tensors: dict, prefix: str = ""):
    """File tensors of one tower (keys include ``prefix``) -> ``(ours, origin, unexpected, bad)``: our tensors, the
    file key each came from, file keys that are no weight of this naming, and shape problems (fused q/k/v rows
    that do not divide by 3, a projection that is not a matrix). Nothing raises: the caller lists it all."""
    ours, origin, unexpected, bad = {}, {}, [], []
    for key, value in tensors.items():
        sub = key[len(prefix):]
        if naming == HF:
            name = sub.removeprefix("text_model.")
            if name in ours:  # the same weight both with and without text_model.: which one is meant?
                unexpected.append(key)
            else:
                ours[name], origin[name] = value, key
            continue
        if sub == LONG_CLIP_RES:
            continue  # merged into the position table below
        targets = _openclip_to_ours(sub)
        if targets is None:
            unexpected.append(key)
        elif len(targets) == 3:
            if value.dim() < 1 or value.shape[0] % 3:
                bad.append(f"{key} {list(value.shape)} (fused q/k/v rows must divide by 3)")
                continue
            for target, part in zip(targets, value.chunk(3, dim=0)):  # rows: q, then k, then v
                ours[target], origin[target] = part, key
        elif sub == "text_projection":
            if value.dim() != 2:
                bad.append(f"{key} {list(value.shape)} (expected [width, projection])")
                continue
            ours[targets[0]], origin[targets[0]] = value.t(), key
        else:
            ours[targets[0]], origin[targets[0]] = value, key
    if naming == OPENCLIP and prefix + LONG_CLIP_RES in tensors:
        _merge_long_clip_positions(ours, tensors[prefix + LONG_CLIP_RES], prefix + LONG_CLIP_RES, bad)
    return ours, origin, unexpected, bad


def _merge_long_clip_positions(ours: dict, res, res_key: str, bad: list) -> None:
    """Long-CLIP files keep two [248, D] tables: its encode_text adds ``positional_embedding`` masked to the first
    20 rows and ``positional_embedding_res`` masked to the rest (beichenzbc/Long-CLIP model/model_longclip.py,
    ``mask1``/``mask2``). Both are constants at inference, so one table holds the same sum."""
    import torch

    name = "embeddings.position_embedding.weight"
    table = ours.get(name)
    if table is None:
        return  # reported as missing
    if tuple(res.shape) != tuple(table.shape) or table.shape[0] <= LONG_CLIP_KEEP:
        bad.append(f"{res_key} {list(res.shape)} (expected {list(table.shape)}, like positional_embedding)")
        return
    ours[name] = torch.cat([table[:LONG_CLIP_KEEP], res[LONG_CLIP_KEEP:]])


def from_ours(layout: TextLayout, tensors: dict) -> dict:
    """Our tensors of one tower -> the names ``layout`` gives them, prefix included (q/k/v fused, the projection
    transposed for OpenCLIP; dropped where the layout has none)."""
    import torch

    out = {}
    for name, value in tensors.items():
        if name.startswith("text_projection") and not layout.projection:
            continue
        target = layout.prefix + file_name(layout.naming, name)
        if layout.naming == HF:
            out[target] = value.contiguous()
        elif ".self_attn.q_proj." in name:
            kind = name.rsplit(".", 1)[1]
            stem = name.rsplit(".self_attn.", 1)[0]
            parts = [tensors[f"{stem}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[target] = torch.cat(parts, dim=0).contiguous()
        elif ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue  # fused with q above
        elif name == "text_projection.weight":
            out[target] = value.t().contiguous()
        else:
            out[target] = value
    return out


# --- writing --------------------------------------------------------------------------------------------------


def _identity_layers(model, count: int) -> dict:
    """``count`` extra last layers (our names) that return their input: zero attention output and zero MLP output,
    so both residual branches add 0.

    A diffusers-style SD2 tower (23 layers, default = its last layer) written in a single-file layout, whose readers
    take the penultimate layer (``layer="penultimate"``), would otherwise lose a layer; with this block the
    penultimate is the original last layer and the pooled vector is unchanged too.
    """
    import torch

    config = model.config
    width, mlp = config.width, config.hidden_mlp
    ref = model.final_layer_norm.weight
    zeros = lambda *shape: torch.zeros(shape, dtype=ref.dtype, device=ref.device)  # noqa: E731
    ones = lambda *shape: torch.ones(shape, dtype=ref.dtype, device=ref.device)  # noqa: E731
    out = {}
    for n in range(config.layers, config.layers + count):
        layer = f"encoder.layers.{n}."
        out.update({layer + "layer_norm1.weight": ones(width), layer + "layer_norm1.bias": zeros(width),
                    layer + "layer_norm2.weight": ones(width), layer + "layer_norm2.bias": zeros(width),
                    layer + "mlp.fc1.weight": zeros(mlp, width), layer + "mlp.fc1.bias": zeros(mlp),
                    layer + "mlp.fc2.weight": zeros(width, mlp), layer + "mlp.fc2.bias": zeros(width)})  # fmt: skip
        for part in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[f"{layer}self_attn.{part}.weight"] = zeros(width, width)
            out[f"{layer}self_attn.{part}.bias"] = zeros(width)
    return out


def written_layers(spec) -> int:
    """Layers of ``spec``'s tower as a single file holds it: the layers it lacks at its end come back as identity
    layers (``removed_layers``), so that clip skip counts the same in every reader."""
    return spec.model.config.layers + getattr(spec, "removed_layers", 0)


def text_encoder_to_ldm(family, encoders) -> dict:
    """Our encoders (EncoderSpecs or CLIPTextModels) -> tensors named as in ``family``'s single file (the first
    layout of each tower: SD1 LDM, SD2 LDM OpenCLIP, SDXL SGM)."""
    from ..families import get_family

    record = get_family(family)
    if len(encoders) != len(record.towers):
        raise ClipDiffusionError(f"encoders: family {record.name!r} has {len(record.towers)} text encoder(s), "
                                 f"got {len(encoders)}")  # fmt: skip
    out = {}
    for spec, layouts in zip(encoders, tower_layouts(record)):
        model = getattr(spec, "model", spec)
        tensors = dict(model.state_dict())
        tensors.update(_identity_layers(model, getattr(spec, "removed_layers", 0)))
        out.update(from_ours(layouts[0], tensors))
    return out


def text_encoder_to_diffusers(family, encoders) -> list:
    """Our encoders -> ``[(folder, tensors, config)]`` in transformers' layout, one ``text_encoder*/`` folder per
    tower: CLIPTextModel first, CLIPTextModelWithProjection second (config.projection_dim None for the first).
    diffusers' convention for SD2 holds: OpenCLIP-H's unused last layer is dropped (unless the tower lacks it)."""
    from ..families import get_family

    record = get_family(family)
    if len(encoders) != len(record.towers):
        raise ClipDiffusionError(f"encoders: family {record.name!r} has {len(record.towers)} text encoder(s), "
                                 f"got {len(encoders)}")  # fmt: skip
    out = []
    for index, (spec, recipe) in enumerate(zip(encoders, record.towers)):
        model, config = spec.model, spec.model.config
        drop = max(0, DIFFUSERS_DROPPED_LAYERS.get(recipe.name, 0) - getattr(spec, "removed_layers", 0))
        tensors = dict(model.state_dict())
        if drop:
            kept = config.layers - drop
            tensors = {k: v for k, v in tensors.items()
                       if not (k.startswith("encoder.layers.") and int(k.split(".")[2]) >= kept)}  # fmt: skip
            config = dataclasses.replace(config, layers=kept)
        layout = LAYOUTS["hf"]
        if index == 0:  # CLIPTextModel: no projection
            layout = dataclasses.replace(layout, projection=False)
            config = dataclasses.replace(config, projection_dim=None)
        out.append((DIFFUSERS_TEXT_FOLDERS[index], from_ours(layout, tensors), config))
    return out
