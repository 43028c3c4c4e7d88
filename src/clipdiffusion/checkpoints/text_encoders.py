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


@dataclass
class _Tower:
    recipe: TowerRecipe
    layout: TextLayout  # prefix included
    keys: list[str] = field(default_factory=list)  # file keys that carry this tower's weights
    text_model: bool = True  # HF keys sit under text_model.
    config: object = None  # a CLIPTextConfig that is known (our metadata, config.json); else from the weights
    removed_layers: int | None = 0  # None: a standalone transformers tower, decided from its depth


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
        if not prefix:  # a whole OpenCLIP model: only its text tower's top-level names are ours
            chosen = [k for k in chosen if k.startswith("transformer.") or k in OPENCLIP_TOP or
                      leaf_ignored(k) or k == LONG_CLIP_RES]  # fmt: skip
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
        except (ClipDiffusionError, IndexError) as exc:  # IndexError: a rank-0 tensor where a matrix belongs
            problems.append(f"{name} ({prefix or 'top level'}): {exc}")
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
    return act if isinstance(act, str) and act in TOWER_ACTIVATION.values() else None


def load_text_encoder(path, *, dtype=None, device="cpu", tokenizer=None):
    """Read a ``.safetensors`` (or weights-only pickle) file and return a ``TextEncoder``.

    Only the text-encoder tensors are read from the file (about 1.6 GB of a 7 GB fp16 SDXL checkpoint).
    A diffusers ``text_encoder`` folder (holding model.safetensors) is accepted too.
    """
    from ..text.conditioning import TextEncoder
    from .safetensors_io import load_file, read_shapes

    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    shapes, _, _ = read_shapes(path)
    plan = _plan_detected(shapes, str(path))
    tensors = load_file(path, keys=plan.text_keys())
    result = _assemble(plan, tensors, source=str(path), activation=_activation_beside(path), dtype=dtype,
                       device=device)  # fmt: skip
    return TextEncoder(result.family, result.encoders, tokenizer=tokenizer)
