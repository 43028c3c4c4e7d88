"""Text encoders from every checkpoint layout people have: one rename table per foreign layout, strict loading.

Layouts recognised (see ../shared/reference/checkpoints.md §2.7, §3.2, §4.1, §5.4):

- HF ``CLIPTextModel`` / ``CLIPTextModelWithProjection``: ``text_model.*`` (or flat, as transformers >= 5
  saves CLIPTextModel) and ``text_projection.weight``. Our names are these minus ``text_model.``.
- SD1 single file: ``cond_stage_model.transformer.text_model.*``; older merges lack ``text_model.``.
- SD2 single file: OpenCLIP ViT-H under ``cond_stage_model.model.`` (fused q/k/v, ``text_projection`` stored
  [in, out] because OpenCLIP computes ``x @ W``, so our Linear weight is its transpose).
- SDXL single file: CLIP-L under ``conditioner.embedders.0.transformer.`` plus OpenCLIP bigG under
  ``conditioner.embedders.1.model.``.
- A bare OpenCLIP text tower (``token_embedding.weight``, ``transformer.resblocks.*``), optionally under ``text.``.

Keys of other components (UNet, VAE, EMA) are left alone and listed in ``ignored``; so are buffers and scalars
that carry no text-encoder weight (``position_ids``, ``logit_scale``, ``attn_mask``, a visual tower). Every other
key under a text prefix must match: one ``CheckpointError`` lists all missing, unexpected and mis-shaped keys,
by the names they have in the file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError, ClipDiffusionError

# <|endoftext|>; SD1 and SDXL's CLIP-L pad with it, OpenCLIP H / bigG pad with 0 (reference §1.5, §4 table).
EOS_ID = 49407
FAMILIES = ("sd1", "sd2", "sdxl", "tiny")

_SDXL_L = "conditioner.embedders.0.transformer."
_SDXL_G = "conditioner.embedders.1.model."
_SD2 = "cond_stage_model.model."
_SD1 = "cond_stage_model.transformer."
# Names under a text prefix that hold no text-encoder weight (regenerated buffers, CLIP's contrastive scalar).
_IGNORED_LEAVES = ("position_ids", "logit_scale", "attn_mask")
_LONG_CLIP_RES = "positional_embedding_res"
LONG_CLIP_KEEP = 20  # rows of the original CLIP table that Long-CLIP keeps (its mask1)

# OpenCLIP block names -> ours (transformers' CLIPEncoderLayer names)
_OPENCLIP_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
_OPENCLIP_TOP = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
    "text_projection": "text_projection.weight",
}
_OURS_TOP = {v: k for k, v in _OPENCLIP_TOP.items()}
_OURS_BLOCK = {v: k for k, v in _OPENCLIP_BLOCK.items()}
_BLOCK_RE = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_FUSED_RE = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
_LAYER_RE = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def openclip_name_to_ours(name: str) -> list[str] | None:
    """Our names for one OpenCLIP text-tower key (three for the fused q/k/v), or None if it is not one."""
    if name in _OPENCLIP_TOP:
        return [_OPENCLIP_TOP[name]]
    fused = _FUSED_RE.fullmatch(name)
    if fused:
        n, kind = fused.groups()
        return [f"encoder.layers.{n}.self_attn.{p}_proj.{kind}" for p in "qkv"]
    block = _BLOCK_RE.fullmatch(name)
    if block and block.group(2) in _OPENCLIP_BLOCK:
        n, part, kind = block.groups()
        return [f"encoder.layers.{n}.{_OPENCLIP_BLOCK[part]}.{kind}"]
    return None


def ours_name_to_openclip(name: str) -> str:
    if name in _OURS_TOP:
        return _OURS_TOP[name]
    layer = _LAYER_RE.fullmatch(name)
    if layer:
        n, part, kind = layer.groups()
        if part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            return f"transformer.resblocks.{n}.attn.in_proj_{kind}"
        if part in _OURS_BLOCK:
            return f"transformer.resblocks.{n}.{_OURS_BLOCK[part]}.{kind}"
    raise ClipDiffusionError(f"no OpenCLIP name for text encoder parameter {name!r}")


def from_open_clip_state_dict(tensors: dict) -> dict:
    """OpenCLIP text-tower tensors -> our names (q/k/v split by rows, text_projection transposed)."""
    out = {}
    for name, value in tensors.items():
        ours = openclip_name_to_ours(name)
        if ours is None:
            raise ClipDiffusionError(f"not an OpenCLIP text tower key: {name!r}")
        if len(ours) == 3:
            for target, part in zip(ours, value.chunk(3, dim=0)):  # rows: q, then k, then v
                out[target] = part
        elif name == "text_projection":
            out[ours[0]] = value.t()  # OpenCLIP stores [in, out] for x @ W; a Linear weight is [out, in]
        else:
            out[ours[0]] = value
    return out


def to_open_clip_state_dict(tensors: dict) -> dict:
    """Our text-encoder tensors -> OpenCLIP text-tower names (the inverse of ``from_open_clip_state_dict``)."""
    import torch

    out = {}
    for name, value in tensors.items():
        target = ours_name_to_openclip(name)
        if ".self_attn.q_proj." in name:
            kind = name.rsplit(".", 1)[1]
            prefix = name.rsplit(".self_attn.", 1)[0]
            parts = [tensors[f"{prefix}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[target] = torch.cat(parts, dim=0).contiguous()
        elif ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue  # fused with q above
        elif name == "text_projection.weight":
            out[target] = value.t().contiguous()
        else:
            out[target] = value
    return out


@dataclass
class _EncoderPlan:
    name: str  # "clip_l" | "clip_h" | "clip_g"
    kind: str  # "hf" | "openclip"
    prefix: str  # in the file
    keys: list[str] = field(default_factory=list)  # file keys that carry weights for this encoder
    activation: str = "quick_gelu"
    keep_projection: bool = True
    text_model: bool = True  # HF keys sit under text_model. (old SD1 merges and transformers >= 5 lack it)


@dataclass
class _Plan:
    family: str
    encoders: list[_EncoderPlan]
    ignored: list[str]

    def text_keys(self) -> list[str]:
        return [k for e in self.encoders for k in e.keys]


@dataclass(frozen=True)
class TextEncoderWeights:
    """What ``text_encoders_from_state_dict`` found: the family, ready ``EncoderSpec``s, and the keys it left."""

    family: str
    encoders: list
    ignored: list[str]

    def __iter__(self):  # allows ``family, encoders, ignored = text_encoders_from_state_dict(sd)``
        return iter((self.family, self.encoders, self.ignored))


def _leaf_ignored(subkey: str) -> bool:
    return subkey.rsplit(".", 1)[-1] in _IGNORED_LEAVES or subkey.startswith("visual.")


def _width(shapes: dict, candidates) -> int | None:
    for key in candidates:
        if key in shapes and len(shapes[key]) == 2:
            return shapes[key][1]
    return None


def _plan(shapes: dict, source: str) -> _Plan:
    """Decide the family and which file keys belong to which encoder, from key names and shapes only."""
    keys = list(shapes)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    layouts = [p for p in (_SDXL_L, _SDXL_G, _SD2, _SD1) if has(p)]
    other_embedders = sorted(
        {".".join(k.split(".")[2:4]) for k in keys if k.startswith("conditioner.embedders.")}
        - {"0.transformer", "1.model"}
    )
    if (_SDXL_L in layouts or _SDXL_G in layouts) and (_SD2 in layouts or _SD1 in layouts):
        raise CheckpointError(source, f"text encoder keys of several layouts: {', '.join(layouts)}")
    if _SDXL_L in layouts or _SDXL_G in layouts or other_embedders:
        if layouts != [_SDXL_L, _SDXL_G]:
            found = sorted({".".join(k.split(".")[:4]) for k in keys if k.startswith("conditioner.embedders.")})
            raise CheckpointError(
                source,
                "unsupported SDXL text encoders: expected conditioner.embedders.0.transformer (CLIP-L) and "
                f"conditioner.embedders.1.model (OpenCLIP bigG), found {', '.join(found)}",
            )
        encoders = [
            _EncoderPlan("clip_l", "hf", _SDXL_L, keep_projection=False),
            _EncoderPlan("clip_g", "openclip", _SDXL_G, activation="gelu"),
        ]
        family = "sdxl"
    elif _SD2 in layouts and _SD1 in layouts:
        raise CheckpointError(source, f"text encoder keys of several layouts: {_SD2}*, {_SD1}*")
    elif _SD2 in layouts:
        encoders, family = [_EncoderPlan("clip_h", "openclip", _SD2, activation="gelu")], "sd2"
    elif _SD1 in layouts:
        encoders, family = [_EncoderPlan("clip_l", "hf", _SD1, keep_projection=False)], "sd1"
    else:
        return _plan_standalone(shapes, source)
    for e in encoders:
        e.text_model = e.kind == "hf" and has(e.prefix + "text_model.")
    ignored = []
    for key in keys:
        owner = next((e for e in encoders if key.startswith(e.prefix)), None)
        sub = key[len(owner.prefix) :] if owner else key
        if owner is None or _leaf_ignored(sub):
            ignored.append(key)
        elif owner.kind == "hf" and not owner.keep_projection and sub.startswith("text_projection"):
            ignored.append(key)  # SD1/SDXL use CLIP-L's hidden states only; a stray projection is unused
        else:
            owner.keys.append(key)
    return _Plan(family, encoders, ignored)


_HF_FLAT = ("embeddings.", "encoder.layers.", "final_layer_norm.", "text_projection.")


def _plan_standalone(shapes: dict, source: str) -> _Plan:
    keys = list(shapes)
    if any(k.startswith("text_model.") for k in keys) or "embeddings.token_embedding.weight" in shapes:
        prefix_keys = [k for k in keys if k.startswith("text_model.") or k.startswith(_HF_FLAT)]
        width = _width(shapes, ["text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight"])
        plan = _EncoderPlan("clip_l", "hf", "", text_model=any(k.startswith("text_model.") for k in keys))
    else:
        prefix = "text." if "text.token_embedding.weight" in shapes else ""
        if prefix + "token_embedding.weight" not in shapes or not any(
            k.startswith(prefix + "transformer.resblocks.") for k in keys
        ):
            raise CheckpointError(
                source,
                "no text encoder found: expected keys under cond_stage_model.transformer. (SD1), "
                "cond_stage_model.model. (SD2), conditioner.embedders.0/1. (SDXL), text_model. (transformers) "
                "or token_embedding/transformer.resblocks (OpenCLIP)",
            )
        prefix_keys = [k for k in keys if k.startswith(prefix) and not k.startswith(prefix + "visual.")]
        if not prefix:  # a whole OpenCLIP model: only its text tower's top-level names are ours
            prefix_keys = [k for k in prefix_keys if k.startswith("transformer.") or k in _OPENCLIP_TOP or
                           k in _IGNORED_LEAVES or k == _LONG_CLIP_RES]
        width = _width(shapes, [prefix + "token_embedding.weight"])
        plan = _EncoderPlan("clip_l", "openclip", prefix)
    # Width tells the tower apart: 768 = OpenAI CLIP-L (quick_gelu), 1024 = OpenCLIP H, 1280 = OpenCLIP bigG.
    if width == 1280:
        raise CheckpointError(
            source, "a lone OpenCLIP bigG text encoder (SDXL text_encoder_2): load the SDXL checkpoint, which has both"
        )
    family = "sd2" if width == 1024 else "sd1"
    if family == "sd2":
        plan.name, plan.activation = "clip_h", "gelu"
    chosen = set(prefix_keys)
    ignored = [k for k in keys if k not in chosen or _leaf_ignored(k[len(plan.prefix) :])]
    plan.keys = [k for k in prefix_keys if not _leaf_ignored(k[len(plan.prefix) :])]
    return _Plan(family, [plan], ignored)


def _rename(plan: _EncoderPlan, tensors: dict):
    """File tensors of one encoder -> (ours, file name of each our name, unexpected file keys, bad shapes)."""
    ours, origin, unexpected, bad = {}, {}, [], []
    for key in plan.keys:
        sub, value = key[len(plan.prefix) :], tensors[key]
        if plan.kind == "hf":
            name = sub.removeprefix("text_model.")
            if name in ours:  # the same weight both with and without text_model.: which one is meant?
                unexpected.append(key)
            else:
                ours[name], origin[name] = value, key
            continue
        targets = openclip_name_to_ours(sub)
        if sub == _LONG_CLIP_RES:
            continue  # merged into the position table below
        if targets is None:
            unexpected.append(key)
        elif len(targets) == 3:
            if value.dim() < 1 or value.shape[0] % 3:
                bad.append(f"{key} {list(value.shape)} (fused q/k/v rows must divide by 3)")
                continue
            for target, part in zip(targets, value.chunk(3, dim=0)):
                ours[target], origin[target] = part, key
        elif sub == "text_projection":
            if value.dim() != 2:
                bad.append(f"{key} {list(value.shape)} (expected [width, projection])")
                continue
            ours[targets[0]], origin[targets[0]] = value.t(), key
        else:
            ours[targets[0]], origin[targets[0]] = value, key
    res_key = plan.prefix + _LONG_CLIP_RES
    if plan.kind == "openclip" and res_key in plan.keys:
        _merge_long_clip_positions(ours, tensors[res_key], res_key, bad)
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


def _file_name(plan: _EncoderPlan, ours: str) -> str:
    if plan.kind == "openclip":
        return plan.prefix + ours_name_to_openclip(ours)
    level = "text_model." if plan.text_model and not ours.startswith("text_projection") else ""
    return plan.prefix + level + ours


def _build(plan: _EncoderPlan, tensors: dict, *, activation, dtype, device, problems: list):
    import torch

    from .clip import CLIPTextConfig, CLIPTextModel

    ours, origin, unexpected, bad = _rename(plan, tensors)
    problems_before = len(problems)
    # A module's parameters must be floating point: integer or bool weights (same shapes) are named here rather
    # than failing inside load_state_dict. Ignored buffers (position_ids I64) never reach this point.
    integer = sorted(f"{key} ({str(tensors[key].dtype).removeprefix('torch.')})" for key in plan.keys
                     if not tensors[key].is_floating_point())  # fmt: skip
    if integer:
        problems.append(f"{plan.name} weights stored with an integer or bool dtype ({len(integer)}): "
                        f"{', '.join(integer[:20])}")
        return None
    try:
        config = CLIPTextConfig.from_weights(ours, activation=activation or plan.activation)
    except (ClipDiffusionError, IndexError) as exc:  # IndexError: a rank-0 tensor where a matrix belongs
        problems.append(f"{plan.name} ({plan.prefix or 'top level'}): {exc}")
        return None
    expected = {k: tuple(v.shape) for k, v in CLIPTextModel(config, device="meta").state_dict().items()}
    missing = [_file_name(plan, k) for k in expected if k not in ours]
    unexpected += sorted({origin[k] for k in ours if k not in expected})
    bad += [
        f"{origin[k]} {list(v.shape)} (expected {list(expected[k])})"
        for k, v in ours.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad)):
        if items:
            problems.append(f"{plan.name} {label} ({len(items)}): {', '.join(sorted(set(items)))}")
    if len(problems) > problems_before:
        return None
    model = CLIPTextModel.from_state_dict(ours, config, dtype=dtype or torch.float32, device=device)
    return model.eval().requires_grad_(False)  # a frozen conditioning tower: no autograd bookkeeping


def _spec(family: str, plan: _EncoderPlan, model):
    from .conditioning import EncoderSpec

    if plan.name == "clip_h":
        # SD2 uses OpenCLIP-H's penultimate layer + final LN (LDM FrozenOpenCLIPEmbedder layer="penultimate").
        # diffusers' SD2 text_encoder (HF layout) already dropped the last of 24 layers: its last is the penultimate.
        removed = 0 if plan.kind == "openclip" or model.config.layers >= 24 else 1
        return EncoderSpec(plan.name, model, pad_id=0, final_norm=True, default_clip_skip=2, removed_layers=removed)
    if family == "sdxl":
        # Both SDXL encoders feed the penultimate layer without final LN (sgm layer_idx 11 / "penultimate").
        pad = EOS_ID if plan.name == "clip_l" else 0
        return EncoderSpec(plan.name, model, pad_id=pad, final_norm=False, default_clip_skip=2)
    return EncoderSpec(plan.name, model, pad_id=EOS_ID, final_norm=True, default_clip_skip=1)


def _assemble(plan: _Plan, tensors: dict, *, source, activation, dtype, device) -> TextEncoderWeights:
    problems: list[str] = []
    models = [
        _build(e, tensors, activation=activation, dtype=dtype, device=device, problems=problems)
        for e in plan.encoders
    ]
    if problems:
        raise CheckpointError(source, f"{plan.family} text encoder does not load: " + "; ".join(problems))
    specs = [_spec(plan.family, e, m) for e, m in zip(plan.encoders, models)]
    return TextEncoderWeights(plan.family, specs, sorted(plan.ignored))


def text_weight_keys(shapes: dict, *, source: str = "<memory>") -> list[str]:
    """The keys of ``{key: shape}`` that would be loaded as text-encoder weights (not ignored buffers such as
    ``position_ids``), so a caller can check their dtypes from a file header before reading any data."""
    return _plan({k: tuple(v) for k, v in shapes.items()}, source).text_keys()


def text_encoders_from_state_dict(
    state_dict: dict, *, source: str = "<memory>", activation: str | None = None, dtype=None, device=None
) -> TextEncoderWeights:
    """Recognise the layout, rename, check strictly, and return ``TextEncoderWeights(family, encoders, ignored)``.

    ``activation`` overrides the per-layout choice (quick_gelu for CLIP-L layouts, gelu for OpenCLIP H/bigG)
    for files whose tower the weights cannot identify. ``dtype`` defaults to float32.
    """
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    plan = _plan(shapes, source)
    return _assemble(plan, state_dict, source=source, activation=activation, dtype=dtype, device=device)


def _activation_beside(path: Path) -> str | None:
    """diffusers/transformers text_encoder folders keep ``hidden_act`` in config.json next to the weights."""
    config = path.parent / "config.json"
    if not config.is_file():
        return None
    try:
        with open(config, "rb") as f:
            raw = f.read(10_000_001)  # a config.json is a few hundred bytes; never read an unbounded file
        act = json.loads(raw).get("hidden_act") if len(raw) <= 10_000_000 else None
    except (OSError, ValueError, AttributeError, RecursionError):  # RecursionError: absurdly nested JSON
        return None
    return act if isinstance(act, str) and act in ("quick_gelu", "gelu") else None


def load_text_encoder(path, *, dtype=None, device="cpu", tokenizer=None):
    """Read a ``.safetensors`` (or weights-only pickle) file and return a ``TextEncoder``.

    Only the text-encoder tensors are read from the file (about 1.6 GB of a 7 GB fp16 SDXL checkpoint).
    A diffusers ``text_encoder`` folder (holding model.safetensors) is accepted too.
    """
    from ..checkpoints.safetensors_io import load_file, read_shapes
    from .conditioning import TextEncoder

    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    shapes, _, _ = read_shapes(path)
    plan = _plan(shapes, str(path))
    tensors = load_file(path, keys=plan.text_keys())
    result = _assemble(
        plan, tensors, source=str(path), activation=_activation_beside(path), dtype=dtype, device=device
    )
    return TextEncoder(result.family, result.encoders, tokenizer=tokenizer)


def text_encoder_to_ldm(family: str, encoders) -> dict:
    """Our encoders (EncoderSpecs or CLIPTextModels) -> tensors named as in an LDM/SGM single file."""
    models = [getattr(e, "model", e) for e in encoders]
    if family not in FAMILIES:
        raise ClipDiffusionError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    expected = 2 if family == "sdxl" else 1
    if len(models) != expected:
        raise ClipDiffusionError(f"encoders: family {family!r} has {expected} text encoder(s), got {len(models)}")

    def hf(prefix, model):
        return {
            prefix + "text_model." + k: v.contiguous()
            for k, v in model.state_dict().items()
            if not k.startswith("text_projection")
        }

    def openclip(prefix, model):
        return {prefix + k: v for k, v in to_open_clip_state_dict(model.state_dict()).items()}

    if family == "sdxl":
        return {**hf(_SDXL_L, models[0]), **openclip(_SDXL_G, models[1])}
    if family == "sd2":
        tensors = openclip(_SD2, models[0])
        if getattr(encoders[0], "removed_layers", 0) == 1:
            tensors.update(_identity_block(_SD2, models[0]))
        return tensors
    return hf(_SD1, models[0])


def _identity_block(prefix: str, model) -> dict:
    """An extra last resblock that returns its input (zero out_proj and c_proj, so both residual branches add 0).

    A diffusers-style SD2 tower (23 layers, default = its last layer) written in the LDM layout, whose readers
    take the penultimate layer (``layer="penultimate"``), would otherwise lose a layer; with this block the
    penultimate is the original last layer and the pooled vector is unchanged too.
    """
    import torch

    width, n = model.config.width, model.config.layers
    ref = model.final_layer_norm.weight
    zeros = lambda *shape: torch.zeros(shape, dtype=ref.dtype, device=ref.device)  # noqa: E731
    ones = lambda *shape: torch.ones(shape, dtype=ref.dtype, device=ref.device)  # noqa: E731
    block = f"{prefix}transformer.resblocks.{n}."
    return {
        block + "ln_1.weight": ones(width), block + "ln_1.bias": zeros(width),
        block + "attn.in_proj_weight": zeros(3 * width, width), block + "attn.in_proj_bias": zeros(3 * width),
        block + "attn.out_proj.weight": zeros(width, width), block + "attn.out_proj.bias": zeros(width),
        block + "ln_2.weight": ones(width), block + "ln_2.bias": zeros(width),
        block + "mlp.c_fc.weight": zeros(model.config.hidden_mlp, width),
        block + "mlp.c_fc.bias": zeros(model.config.hidden_mlp),
        block + "mlp.c_proj.weight": zeros(width, model.config.hidden_mlp), block + "mlp.c_proj.bias": zeros(width),
    }
