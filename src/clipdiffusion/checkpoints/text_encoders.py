"""Text encoders from every layout people have (text_layouts.py): which towers a file holds, strict loading.

Three ways in, one builder:

- ``text_encoders_from_state_dict(sd, family=...)``: a checkpoint whose family detect.py already decided; each
  tower is read from the layout the family table names for it (SD2 from either of its two prefixes).
- ``text_encoders_from_state_dict(sd)`` / ``load_text_encoder(path)``: a standalone text-encoder file, or an SD
  checkpoint's text part, whose family the text prefixes tell (SD1, SD2, SDXL) or, for a lone tower in
  transformers or OpenCLIP naming, its width (768 CLIP-L, 1024 OpenCLIP-H; a lone bigG is refused).
- ``text_encoders_from_diffusers(family, folders, configs)``: diffusers ``text_encoder*/`` folders, read in their
  own (transformers) layout with their config.json.

Every tower then follows its family's recipe (families.py: pad id, final layer norm, default clip skip). Keys of
other components are listed in ``ignored``; so are buffers and scalars that carry no text-encoder weight
(``position_ids``, ``logit_scale``, ``attn_mask``, a visual tower). Every other key of a tower must match: one
``CheckpointError`` lists all missing, unexpected and mis-shaped keys, by the names they have in the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import CheckpointError, ClipDiffusionError
from ..families import FAMILIES, ModelFamily, TowerRecipe, get_family
from .text_layouts import (
    HF,
    LAYOUTS,
    LONG_CLIP_RES,
    OPENCLIP_TOP,
    SINGLE_FILE,
    TOWER_ACTIVATION,
    TextLayout,
    at,
    file_name,
    leaf_ignored,
    to_ours,
    tower_layouts,
)

_EMBEDDERS = "conditioner.embedders."
_WIDTH_TOWER = {1024: "clip_h"}  # a lone tower's width -> its tower (anything else: OpenAI CLIP-L lineage)
_BIGG_WIDTH = 1280
# Position tables a text tower may have: CLIP's 77 (BOS + 75 tokens + EOS, what every SD UNet was trained on) up to
# a bound far above Long-CLIP's 248; a window of P positions holds P - 2 tokens (text/chunking.py).
MIN_TEXT_POSITIONS = 77
MAX_TEXT_POSITIONS = 1024
# Top-level entries of a whole OpenAI-CLIP / OpenCLIP model that are no text weight (OpenAI's jit state dicts and
# Long-CLIP keep the first three as scalars; SigLIP-style models have a logit bias). Everything else that is not
# under visual. belongs to the text tower and must be one of its names.
_MODEL_SCALARS = ("input_resolution", "context_length", "vocab_size", "logit_scale", "logit_bias")


@dataclass
class _Tower:
    recipe: TowerRecipe
    layout: TextLayout  # prefix included
    keys: list[str] = field(default_factory=list)  # file keys that carry this tower's weights
    text_model: bool = True  # HF keys sit under text_model.
    config: object = None  # a CLIPTextConfig that is known (our metadata, config.json); else from the weights
    removed_layers: int | None = 0  # None: a standalone transformers tower, decided from its depth
    overrides: dict = field(default_factory=dict)  # config fields the weights cannot tell (a config.json beside)


@dataclass
class _Plan:
    family: ModelFamily
    towers: list[_Tower]
    ignored: list[str] = field(default_factory=list)

    def text_keys(self) -> list[str]:
        return [k for t in self.towers for k in t.keys]


@dataclass(frozen=True)
class TextEncoderWeights:
    """What ``text_encoders_from_state_dict`` found: the family name, ready ``EncoderSpec``s, the keys it left."""

    family: str
    encoders: list
    ignored: list[str]

    def __iter__(self):  # allows ``family, encoders, ignored = text_encoders_from_state_dict(sd)``
        return iter((self.family, self.encoders, self.ignored))


# --- which towers, under which keys ----------------------------------------------------------------------------


def _group(key: str) -> str:
    """The layout prefix a key sits under, or its first levels under ``conditioner.embedders.``."""
    for prefix in SINGLE_FILE:
        if key.startswith(prefix):
            return prefix
    return ".".join(key.split(".")[:4]) + "." if key.startswith(_EMBEDDERS) else ""


def _assign(plan: _Plan, keys) -> _Plan:
    """Each key to the tower whose prefix it has (or to ``ignored``)."""
    for key in keys:
        tower = next((t for t in plan.towers if key.startswith(t.layout.prefix)), None)
        sub = key[len(tower.layout.prefix):] if tower else key
        if tower is None or leaf_ignored(sub):
            plan.ignored.append(key)
        elif tower.layout.naming == HF and not tower.layout.projection and sub.startswith("text_projection"):
            plan.ignored.append(key)  # SD1/SDXL use CLIP-L's hidden states only; a stray projection is unused
        else:
            tower.keys.append(key)
    for tower in plan.towers:
        tower.text_model = any(k[len(tower.layout.prefix):].startswith("text_model.") for k in tower.keys)
    return plan


def _plan_family(family: ModelFamily, keys: list, source: str) -> _Plan:
    """The towers of a checkpoint whose family is known, each from the layouts the family table gives it."""
    towers = []
    for recipe, layouts in zip(family.towers, tower_layouts(family)):
        present = [layout for layout in layouts if any(k.startswith(layout.prefix) for k in keys)]
        if len(present) > 1:
            raise CheckpointError(source, f"text encoder keys of several layouts: "
                                          f"{', '.join(p.prefix + '*' for p in present)}")  # fmt: skip
        if not present:
            raise CheckpointError(source, f"{family.name}: no text encoder under "
                                          f"{' or '.join(p.prefix for p in layouts)}")  # fmt: skip
        towers.append(_Tower(recipe, present[0]))
    claimed = tuple(t.layout.prefix for t in towers)
    # Keys of another family's tower are an error; SGM's other embedders (SDXL's size conditioning) are not.
    sgm = any(p.startswith(_EMBEDDERS) for p in claimed)
    foreign = sorted({_group(k) for k in keys if not k.startswith(claimed)} - {""})
    foreign = [g for g in foreign if g in SINGLE_FILE or not sgm]
    if foreign:
        raise CheckpointError(source, f"text encoder keys of several layouts: "
                                      f"{', '.join(p + '*' for p in claimed + tuple(foreign))}")  # fmt: skip
    return _assign(_Plan(family, towers), keys)


def _plan_detected(shapes: dict, source: str) -> _Plan:
    """A file of unknown family: its text prefixes say which (each family's first layout), else a lone tower."""
    keys = list(shapes)
    groups = {_group(k) for k in keys} - {""}
    if not groups:
        return _plan_standalone(shapes, source)
    known = groups & SINGLE_FILE.keys()
    for family in FAMILIES.values():  # sd1 before tiny: the same layout, tiny only by our metadata
        if known == {layouts[0].prefix for layouts in tower_layouts(family)}:
            return _plan_family(family, keys, source)  # which checks the other keys under text prefixes
    if all(g.startswith(_EMBEDDERS) for g in groups):
        found = sorted(g.rstrip(".") for g in groups)
        raise CheckpointError(source, "unsupported SDXL text encoders: expected conditioner.embedders.0.transformer "
                                      f"(CLIP-L) and conditioner.embedders.1.model (OpenCLIP bigG), found "
                                      f"{', '.join(found)}")  # fmt: skip
    raise CheckpointError(source, f"text encoder keys of several layouts: {', '.join(sorted(groups))}")


_HF_FLAT = ("embeddings.", "encoder.layers.", "final_layer_norm.", "text_projection.")


def _width(shapes: dict, candidates) -> int | None:
    for key in candidates:
        if key in shapes and len(shapes[key]) == 2:
            return shapes[key][1]
    return None


def _plan_standalone(shapes: dict, source: str) -> _Plan:
    """One tower in transformers or OpenCLIP naming; its width tells the tower (and so the family)."""
    keys = list(shapes)
    if any(k.startswith("text_model.") for k in keys) or "embeddings.token_embedding.weight" in shapes:
        chosen = [k for k in keys if k.startswith("text_model.") or k.startswith(_HF_FLAT)]
        width = _width(shapes, ["text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight"])
        layout, removed = LAYOUTS["hf"], None
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
        chosen = [k for k in keys if k.startswith(prefix) and not k.startswith(prefix + "visual.")]
        if not prefix:  # a whole OpenAI-CLIP/OpenCLIP model: every top-level name but its scalars is text tower
            # (an unknown one is reported as unexpected, never dropped unread)
            chosen = [k for k in chosen if k not in _MODEL_SCALARS or len(shapes[k]) > 1]
        width = _width(shapes, [prefix + "token_embedding.weight"])
        layout, removed = at(LAYOUTS["openclip"], prefix), 0
    if width == _BIGG_WIDTH:
        raise CheckpointError(
            source, "a lone OpenCLIP bigG text encoder (SDXL text_encoder_2): load the SDXL checkpoint, which has both"
        )
    tower = _WIDTH_TOWER.get(width, "clip_l")
    family = next(f for f in FAMILIES.values() if len(f.towers) == 1 and f.towers[0].name == tower)
    plan = _Plan(family, [_Tower(family.towers[0], layout, removed_layers=removed)])
    chosen_set = set(chosen)
    plan.ignored = [k for k in keys if k not in chosen_set]
    return _assign(plan, chosen)


# --- building ---------------------------------------------------------------------------------------------------


def _build(tower: _Tower, tensors: dict, *, activation, dtype, device, problems: list):
    import torch

    from ..text.clip import CLIPTextConfig, CLIPTextModel

    name, prefix = tower.recipe.name, tower.layout.prefix
    # A module's parameters must be floating point: integer or bool weights (same shapes) are named here rather
    # than failing inside load_state_dict. Ignored buffers (position_ids I64) never reach this point.
    integer = sorted(f"{key} ({str(tensors[key].dtype).removeprefix('torch.')})" for key in tower.keys
                     if not tensors[key].is_floating_point())  # fmt: skip
    if integer:
        problems.append(f"{name} weights stored with an integer or bool dtype ({len(integer)}): "
                        f"{', '.join(integer[:20])}")  # fmt: skip
        return None
    ours, origin, unexpected, bad = to_ours(tower.layout.naming, {k: tensors[k] for k in tower.keys}, prefix)
    config = tower.config
    if config is None:
        try:
            config = CLIPTextConfig.from_weights(ours, activation=activation or TOWER_ACTIVATION[name])
            if tower.overrides:
                config = replace(config, **tower.overrides)
        except (ClipDiffusionError, IndexError) as exc:  # IndexError: a rank-0 tensor where a matrix belongs
            problems.append(f"{name} ({prefix or 'top level'}): {exc}")
            return None
    if not MIN_TEXT_POSITIONS <= config.max_positions <= MAX_TEXT_POSITIONS:
        problems.append(f"{name}: {config.max_positions} positions (the position table's rows); a text encoder "
                        f"needs {MIN_TEXT_POSITIONS}..{MAX_TEXT_POSITIONS}")  # fmt: skip
        return None
    expected = {k: tuple(v.shape) for k, v in CLIPTextModel(config, device="meta").state_dict().items()}
    missing = [prefix + file_name(tower.layout.naming, k, text_model=tower.text_model)
               for k in expected if k not in ours]  # fmt: skip
    unexpected += sorted({origin[k] for k in ours if k not in expected})
    bad += [f"{origin[k]} {list(v.shape)} (expected {list(expected[k])})"
            for k, v in ours.items() if k in expected and tuple(v.shape) != expected[k]]  # fmt: skip
    before = len(problems)
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad)):
        if items:
            problems.append(f"{name} {label} ({len(items)}): {', '.join(sorted(set(items)))}")
    if len(problems) > before:
        return None
    model = CLIPTextModel.from_state_dict(ours, config, dtype=dtype or torch.float32, device=device)
    return model.eval().requires_grad_(False)  # a frozen conditioning tower: no autograd bookkeeping


def _spec(tower: _Tower, model):
    from ..text.clip import SD2_OPENCLIP_H
    from ..text.conditioning import EncoderSpec
    from .text_layouts import DIFFUSERS_DROPPED_LAYERS

    recipe, removed = tower.recipe, tower.removed_layers
    if removed is None:
        # A transformers-layout OpenCLIP-H shallower than the real one is diffusers' SD2 tower, which dropped the
        # last of the 24 layers: its last layer is the family's penultimate.
        dropped = DIFFUSERS_DROPPED_LAYERS.get(recipe.name, 0)
        removed = dropped if dropped and model.config.layers < SD2_OPENCLIP_H.layers else 0
    return EncoderSpec(recipe.name, model, pad_id=recipe.pad_id, final_norm=recipe.final_norm,
                       default_clip_skip=recipe.default_clip_skip, removed_layers=removed)  # fmt: skip


def _assemble(plan: _Plan, tensors: dict, *, source, activation=None, dtype=None, device=None,
              note="") -> TextEncoderWeights:  # fmt: skip
    problems: list[str] = []
    models = [_build(t, tensors, activation=activation, dtype=dtype, device=device, problems=problems)
              for t in plan.towers]  # fmt: skip
    if problems:
        raise CheckpointError(source, f"{plan.family.name} text encoder does not load{note}: " + "; ".join(problems))
    specs = [_spec(t, m) for t, m in zip(plan.towers, models)]
    return TextEncoderWeights(plan.family.name, specs, sorted(plan.ignored))


def _plan(shapes: dict, family, source: str) -> _Plan:
    if family is None:
        return _plan_detected(shapes, source)
    return _plan_family(get_family(family), list(shapes), source)


def text_weight_keys(shapes: dict, *, family=None, source: str = "<memory>") -> list[str]:
    """The keys of ``{key: shape}`` that would be loaded as text-encoder weights (not ignored buffers such as
    ``position_ids``), so a caller can check their dtypes from a file header before reading any data."""
    return _plan({k: tuple(v) for k, v in shapes.items()}, family, source).text_keys()


def text_encoders_from_state_dict(state_dict: dict, *, family=None, configs=None, configs_from="configs",
                                  source: str = "<memory>", activation: str | None = None, dtype=None,
                                  device=None) -> TextEncoderWeights:  # fmt: skip
    """Find the towers, rename, check strictly, and return ``TextEncoderWeights(family, encoders, ignored)``.

    ``family`` (a name or record) when the caller knows it (a checkpoint detect.py read); else the layout tells.
    ``configs``: one CLIPTextConfig per tower that the weights cannot fully reveal (heads, activation), from
    ``configs_from``. ``activation`` overrides the tower's (quick_gelu for CLIP-L, gelu for OpenCLIP H/bigG) for
    files whose tower the weights cannot identify. ``dtype`` defaults to float32.
    """
    plan = _plan({k: tuple(v.shape) for k, v in state_dict.items()}, family, source)
    note = ""
    if configs is not None:
        if len(configs) != len(plan.towers):
            raise CheckpointError(source, f"{configs_from} lists {len(configs)} text encoders, "
                                          f"the weights hold {len(plan.towers)}")  # fmt: skip
        for tower, config in zip(plan.towers, configs):
            tower.config = config
        note = f" with the shapes of {configs_from}"
    return _assemble(plan, state_dict, source=source, activation=activation, dtype=dtype, device=device, note=note)


def text_encoders_from_diffusers(family, folders, configs, *, source, dtype=None, device=None):
    """diffusers ``text_encoder*/`` folders, each read in its own (transformers) layout with its config.json:
    ``folders`` is ``[(name, tensors)]`` in tower order. Returns ``TextEncoderWeights``; key names in errors and in
    ``ignored`` are ``folder/key``. A tower without a projection in its config ignores a stored one."""
    from .text_layouts import DIFFUSERS_DROPPED_LAYERS

    record = get_family(family)
    if len(folders) != len(record.towers):
        raise CheckpointError(source, f"{record.name} has {len(record.towers)} text encoder(s), "
                                      f"the folder holds {len(folders)}")  # fmt: skip
    plan, tensors = _Plan(record, []), {}
    for (name, part), recipe, config in zip(folders, record.towers, configs):
        layout = replace(LAYOUTS["hf"], prefix=f"{name}/", projection=config.projection_dim is not None)
        plan.towers.append(_Tower(recipe, layout, config=config,
                                  removed_layers=DIFFUSERS_DROPPED_LAYERS.get(recipe.name, 0)))  # fmt: skip
        tensors.update({f"{name}/{k}": v for k, v in part.items()})
    return _assemble(_assign(plan, list(tensors)), tensors, source=source, dtype=dtype, device=device)


_CONFIG_FIELDS = {  # transformers CLIPTextConfig key -> (our CLIPTextConfig field, kind)
    "hidden_act": ("activation", str),
    "num_attention_heads": ("heads", int),
    "max_position_embeddings": ("max_positions", int),
    "layer_norm_eps": ("layer_norm_eps", float),
}
_MAX_CONFIG_BYTES = 10_000_000  # a config.json is a few kilobytes; never read an unbounded file


def _config_beside(path: Path) -> dict:
    """What a transformers/diffusers ``config.json`` next to the weights says that the weights cannot: the
    activation, the head count, the layer-norm epsilon, and the position count (which must then agree with the
    weights). A whole ``CLIPModel``'s config keeps these under ``text_config``. Only keys present are used; a bad
    value is a ``CheckpointError`` naming the file and the key. Returns ``{our field: value}``."""
    config = path.parent / "config.json"
    if not config.is_file():
        return {}
    try:
        with open(config, "rb") as f:
            raw = f.read(_MAX_CONFIG_BYTES + 1)
        if len(raw) > _MAX_CONFIG_BYTES:
            raise ValueError(f"larger than {_MAX_CONFIG_BYTES} bytes")
        data = json.loads(raw)
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
        raise CheckpointError(config, f"unreadable config.json beside the text encoder ({str(exc)[:80]})") from None
    if isinstance(data, dict) and isinstance(data.get("text_config"), dict):
        data = data["text_config"]
    if not isinstance(data, dict):
        raise CheckpointError(config, "must hold a JSON object")
    out = {}
    for key, (name, kind) in _CONFIG_FIELDS.items():
        if key not in data:
            continue
        value = data[key]
        if kind is str:
            ok = isinstance(value, str) and value in TOWER_ACTIVATION.values()
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1
        if not ok:
            raise CheckpointError(config, f"{key}={str(value)[:40]!r} is not a valid text encoder value")
        out[name] = float(value) if kind is float else value
    return out


def _weights_file(path: Path) -> Path:
    """A weights file, or the file a text-encoder folder holds: ``model.safetensors`` (transformers, diffusers
    ``text_encoder/``), ``pytorch_model.bin`` (older transformers), or a diffusers pipeline's ``text_encoder/``."""
    if path.is_dir():
        folder = path / "text_encoder" if (path / "model_index.json").is_file() else path
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (folder / name).is_file():
                return folder / name
        return folder / "model.safetensors"  # reported as missing below
    return path


def load_text_encoder(path, *, dtype=None, device="cpu", tokenizer=None):
    """Read a ``.safetensors`` (or weights-only pickle) file and return a ``TextEncoder``.

    Only the text-encoder tensors are read from the file (about 1.6 GB of a 7 GB fp16 SDXL checkpoint).
    A diffusers ``text_encoder`` folder (holding model.safetensors) is accepted too.
    """
    from ..text.conditioning import TextEncoder
    from .safetensors_io import load_file, read_shapes

    path = _weights_file(Path(path))
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    shapes, _, _ = read_shapes(path)
    plan = _plan_detected(shapes, str(path))
    if len(plan.towers) == 1:
        plan.towers[0].overrides = _config_beside(path)
    tensors = load_file(path, keys=plan.text_keys())
    result = _assemble(plan, tensors, source=str(path), dtype=dtype, device=device)
    return TextEncoder(result.family, result.encoders, tokenizer=tokenizer)


def _position_rows(shapes: dict, tower: _Tower) -> tuple[str, tuple]:
    """The file key and shape of ``tower``'s position table (from the header: nothing loaded yet)."""
    for key in tower.keys:
        sub = key[len(tower.layout.prefix):]
        name = sub.removeprefix("text_model.") if tower.layout.naming == HF else OPENCLIP_TOP.get(sub)
        if name == "embeddings.position_embedding.weight":
            return key, tuple(shapes[key])
    return "", ()


def text_encoder_positions(path) -> int:
    """The position count of the one text tower in ``path`` (file or folder), from its header (a pickle is
    opened weights-only and memory-mapped); the checks ``load_replacement_text_encoder`` makes first."""
    from .safetensors_io import read_shapes

    file = _weights_file(Path(path))
    if not file.is_file():
        raise CheckpointError(file, "no such file")
    shapes, _, _ = read_shapes(file)
    plan = _plan_detected(shapes, str(file))
    key, shape = _position_rows(shapes, plan.towers[0]) if len(plan.towers) == 1 else ("", ())
    if len(shape) != 2 or not MIN_TEXT_POSITIONS <= shape[0] <= MAX_TEXT_POSITIONS:
        raise CheckpointError(file, f"no usable position table ({key or 'none'} {list(shape)}): a replacement "
                                    f"text encoder is one tower with {MIN_TEXT_POSITIONS}..{MAX_TEXT_POSITIONS} "
                                    f"positions")  # fmt: skip
    return shape[0]


def load_replacement_text_encoder(path, family, *, context_width: int | None = None, dtype=None, device="cpu",
                                  tokenizer=None, check_finite: bool = True):  # fmt: skip
    """A text tower from ``path`` in place of the one of a ``family`` model (a name or record): a fine-tuned
    CLIP-L, Long-CLIP's ``longclip-L.pt`` (a whole OpenAI-CLIP state dict, 248 positions, visual tower ignored),
    a transformers ``CLIPTextModel``/``CLIPModel`` file or folder (``max_position_embeddings: 248``), an SD1
    checkpoint's ``cond_stage_model.transformer.``, a diffusers ``text_encoder/`` folder or pipeline folder.

    The tower takes the family's recipe (pad id, final layer norm, default clip skip) and activation (quick_gelu
    for CLIP-L, gelu for OpenCLIP-H) unless a ``config.json`` beside the weights says otherwise. Checked before any
    tensor data is read: one tower (an SDXL pair is refused, as is replacing a tower of a two-tower family), its
    position count (``MIN_TEXT_POSITIONS..MAX_TEXT_POSITIONS``), its width against ``context_width`` (the UNet's
    cross-attention width), CLIP's vocabulary; then strict loading, and (``check_finite``) no NaN/Inf weight.
    Pickles load only through the weights-only unpickler (``safetensors_io.load_pickle``). Returns a
    ``TextEncoder`` of ``family``."""
    from ..text.conditioning import TextEncoder
    from ..text.tokenizer import VOCAB_SIZE
    from .safetensors_io import load_file, read_shapes

    record = get_family(family)
    if len(record.towers) != 1:
        towers = ", ".join(t.name for t in record.towers)
        raise ClipDiffusionError(f"text_encoder={str(path)!r}: a {record.name} model has {len(record.towers)} text "
                                 f"towers ({towers}); a replacement text encoder is supported for one-tower "
                                 f"families only (sd1, sd2, tiny)")  # fmt: skip
    file = _weights_file(Path(path))
    source = str(file)
    if not file.is_file():
        raise CheckpointError(file, "no such file")
    shapes, _, _ = read_shapes(file)
    plan = _plan_detected(shapes, source)
    if len(plan.towers) != 1:
        raise CheckpointError(source, f"holds {len(plan.towers)} text towers ({plan.family.name}); a replacement "
                                      f"text encoder is one tower")  # fmt: skip
    tower = plan.towers[0]
    key, shape = _position_rows(shapes, tower)
    if len(shape) != 2:
        raise CheckpointError(source, f"no position table of shape [positions, width] (found "
                                      f"{key or 'none'} {list(shape)})")  # fmt: skip
    rows, width = shape
    if not MIN_TEXT_POSITIONS <= rows <= MAX_TEXT_POSITIONS:
        raise CheckpointError(source, f"{key} has {rows} positions; a text encoder needs "
                                      f"{MIN_TEXT_POSITIONS}..{MAX_TEXT_POSITIONS} (CLIP 77, Long-CLIP 248)")
    if context_width is not None and width != context_width:
        raise CheckpointError(source, f"text encoder width {width} ({key} {list(shape)}) does not fit this "
                                      f"{record.name} model, whose UNet cross-attention takes {context_width}-wide "
                                      f"context")  # fmt: skip
    token_key = next((k for k in tower.keys if k.endswith("token_embedding.weight")), None)
    if token_key is not None and len(shapes[token_key]) == 2 and shapes[token_key][0] < VOCAB_SIZE:
        raise CheckpointError(source, f"{token_key} {list(shapes[token_key])} has fewer rows than CLIP's "
                                      f"{VOCAB_SIZE}-token vocabulary; only CLIP-tokenized towers are supported")
    tower.recipe = record.towers[0]  # the family's use of its tower, and its activation
    tower.overrides = _config_beside(file)
    tensors = load_file(file, keys=plan.text_keys())
    plan.family = record
    result = _assemble(plan, tensors, source=source, dtype=dtype, device=device)
    model = result.encoders[0].model
    if check_finite:
        import torch

        bad = [name for name, t in model.state_dict().items() if not bool(torch.isfinite(t).all())]
        if bad:
            raise CheckpointError(source, f"non-finite (NaN/Inf) text encoder weights in {len(bad)} tensor(s): "
                                          f"{', '.join(bad[:10])}")  # fmt: skip
    return TextEncoder(record, result.encoders, tokenizer=tokenizer)
