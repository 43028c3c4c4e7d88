"""What the tiny model's training reads: captions of each scene (loose and exact twins), the cell readout's
targets, the scene sampler that avoids held-out prompts, and the context builder that lays captions out as
inference does. Split from ``train.py``.
"""

import dataclasses

import numpy as np
import torch

from ..text.chunking import EMPTY_WINDOW
from .captions import caption, long_caption, tag_prefix
from .world import SceneSpec, realize, sample_spec

def caption_variants(spec: SceneSpec) -> list:
    """Every spec a caption of this scene can state (size and background each said or left open)."""
    variants = []
    for mask in range(2 ** len(spec.objects)):
        objects = tuple(
            dataclasses.replace(o, size=o.size if mask >> i & 1 else None) for i, o in enumerate(spec.objects)
        )
        variants += [SceneSpec(objects, spec.background), SceneSpec(objects, None)]
    return variants


def loosen(spec: SceneSpec, rng, size_named: float = 0.8) -> SceneSpec:
    """What a training caption of a fully specified scene states: each size (named with probability
    ``size_named``) and the background omitted at times."""
    objects = tuple(o if rng.random() < size_named else dataclasses.replace(o, size=None) for o in spec.objects)
    return SceneSpec(objects, spec.background if rng.random() < 0.7 else None)


def loose_caption(spec: SceneSpec, rng, p_tags: float, size_named: float = 0.8) -> str:
    """A training caption of a fully specified scene: size and background each omitted at times."""
    return caption(loosen(spec, rng, size_named), rng, p_tags=p_tags)


def deep_caption(spec: SceneSpec, rng, tokenizer, size_named: float = 0.8, max_prefix: int = 240) -> str:
    """A training caption whose objects come after a run of style tags of uniform length in [0, ``max_prefix``]
    tokens: objects at every depth of a 77-position window and in every chunk, which ordinary captions (a few
    tags spread between the objects) almost never give (eval/longpos: recall fell from 0.95-1.00 in a window's
    first 30 positions to 0.58-0.78 after them)."""
    prefix = tag_prefix(tokenizer, int(rng.integers(max_prefix + 1)), rng)
    loose = loosen(spec, rng, size_named)
    return long_caption(loose, rng, prefix) if prefix else caption(loose, rng, p_tags=0.0)


def caption_pair(spec: SceneSpec, rng, p_tags: float, size_named: float = 0.8) -> tuple[str, str]:
    """A training caption of a full scene and its hard-negative twin: the same words but for one attribute,
    which misdescribes the image (a shape or colour changed, an object moved to an empty cell, or two objects'
    colours or shapes swapped)."""
    return described_pair(spec, rng, p_tags, size_named)[:2]


def described_pair(spec: SceneSpec, rng, p_tags: float, size_named: float = 0.8) -> tuple[str, str, SceneSpec]:
    """``caption_pair``, and the spec the caption states (sizes and background at times left open)."""
    from .world import COLORS, SHAPES

    loose = loosen(spec, rng, size_named)
    objects = loose.objects
    i = int(rng.integers(len(objects)))
    kind = rng.choice(["shape", "color", "cell", "swap"], p=[0.4, 0.25, 0.1, 0.25])
    if kind == "swap" and len({(o.color, o.shape) for o in objects}) > 1:
        j = int(rng.choice([k for k in range(len(objects)) if (objects[k].color, objects[k].shape)
                            != (objects[i].color, objects[i].shape)]))  # fmt: skip
        attr = "color" if objects[i].color != objects[j].color else "shape"
        changed = list(objects)
        changed[i] = dataclasses.replace(objects[i], **{attr: getattr(objects[j], attr)})
        changed[j] = dataclasses.replace(objects[j], **{attr: getattr(objects[i], attr)})
    else:
        if kind == "cell":
            free = [c for c in range(9) if all(o.cell != c for o in objects)]
            change = {"cell": int(rng.choice(free))}
        elif kind == "color":
            change = {"color": str(rng.choice([c for c in COLORS if c != objects[i].color]))}
        else:
            change = {"shape": str(rng.choice([h for h in SHAPES if h != objects[i].shape]))}
        changed = [dataclasses.replace(o, **change) if k == i else o for k, o in enumerate(objects)]
    twin = SceneSpec(tuple(changed), loose.background)
    seed = int(rng.integers(2**63))  # the same template, order and tags for both
    return (caption(loose, np.random.default_rng(seed), p_tags=p_tags),
            caption(twin, np.random.default_rng(seed), p_tags=p_tags), loose)  # fmt: skip


def cell_targets(specs) -> torch.Tensor:
    """What each caption states per cell of the grid, as ``CellReadout`` classes: [B, 9, (colour, shape, size)];
    0 is an empty cell (for size also a size left unstated)."""
    from .world import COLORS, SHAPES, SIZES

    colours, sizes = list(COLORS), list(SIZES)
    out = torch.zeros(len(specs), 9, 3, dtype=torch.long)
    for i, spec in enumerate(specs):
        for o in spec.objects:
            size = 0 if o.size is None else 1 + sizes.index(o.size)
            out[i, o.cell] = torch.tensor([1 + colours.index(o.color), 1 + SHAPES.index(o.shape), size])
    return out


POOL_BATCH = 64  # scenes per pool step


class Scenes:
    """Training scenes: random, minus every scene a held-out eval prompt could describe."""

    def __init__(self, rng: np.random.Generator, held_out: frozenset):
        self.rng = rng
        self.held_out = held_out

    def draw(self, n: int):
        scenes = []
        while len(scenes) < n:
            scene = realize(sample_spec(self.rng, p_size=1.0, p_background=1.0), self.rng)
            if not any(v.key() in self.held_out for v in caption_variants(scene.spec())):
                scenes.append(scene)
        return scenes


class ContextBuilder:
    """Frozen text tower -> cross-attention context, laid out by the same ``TextEncoder.plan`` as inference
    (by default the chunk strategy: one 77-position window per 75 tokens, rows concatenated)."""

    def __init__(self, text_encoder):
        self.text_encoder = text_encoder
        self.spec = text_encoder.encoders[0]

    @torch.no_grad()
    def __call__(self, captions, strategies=None) -> list:
        """captions -> list of (indices into captions, context [b, T, D]) groups of equal T. ``strategies``: the
        long-prompt strategy per caption (default chunk); window layouts pad with the empty prompt's rows."""
        strategies = strategies or ["chunk"] * len(captions)
        plans = [self.text_encoder.plan(c, long_prompt=k) for c, k in zip(captions, strategies)]
        groups: dict = {}
        for i, plan in enumerate(plans):
            groups.setdefault(len(plan.rows), []).append(i)
        out = []
        device = next(self.spec.model.parameters()).device
        for _, members in sorted(groups.items()):
            windows = [w for i in members for w in plans[i].windows]
            empty = len(windows)  # the empty prompt's window, appended once per group, for EMPTY_WINDOW rows
            windows.append(self.text_encoder.plan("", long_prompt="truncate").windows[0])
            ids = torch.tensor([w.ids(self.spec.pad_id) for w in windows], device=device)  # [W + 1, 77]
            hidden = self.spec.model(ids, final_norm=self.spec.final_norm).hidden  # [W + 1, 77, D]
            contexts, start = [], 0
            for i in members:
                rows = [(empty if w == EMPTY_WINDOW else start + w, p) for w, p in plans[i].rows]
                contexts.append(hidden[[w for w, _ in rows], [p for _, p in rows]])  # [T, D]
                start += len(plans[i].windows)
            out.append((members, torch.stack(contexts)))  # [b, T, D]
        return out
