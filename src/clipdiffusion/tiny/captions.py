"""Captions for the synthetic world: varied natural templates, optional style-tag noise, and the inverse parser.

Style tags never use a word of the world's vocabulary (colour, shape, size, position, background), so they change
nothing in the image; the model has to learn to ignore them, and with enough of them prompts pass 77 tokens the
way real prompts do. ``parse_caption`` reads any caption written here (and reasonable hand-written ones) back to
its ``SceneSpec``; the eval harness and the ground-truth stand-in pipeline rely on it.
"""

import re

import numpy as np

from .world import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, ObjectSpec, SceneSpec

STYLE_TAGS = (
    "masterpiece", "best quality", "highly detailed", "8k", "ultra detailed", "sharp focus",
    "trending on artstation", "award winning", "4k", "hdr", "high resolution", "intricate details",
    "professional", "cinematic lighting", "studio lighting", "absurdres", "high quality", "detailed",
    "octane render", "unreal engine", "depth of field", "illustration", "digital art", "concept art",
    "smooth", "elegant", "volumetric lighting", "photorealistic", "uhd", "film grain", "bokeh",
    "hyperrealistic", "clean lines", "vector art", "minimalist", "flat design",
)  # fmt: skip

# Ways to say where an object is; the position words themselves are the fixed vocabulary.
_LOCATIONS = {
    "corner": ("at the {p}", "in the {p}", "in the {p} corner"),
    "edge_tb": ("at the {p}",),
    "edge_lr": ("on the {p}", "at the {p}"),
    "center": ("in the {p}", "at the {p}"),
}
_LOCATION_KIND = {"top left": "corner", "top right": "corner", "bottom left": "corner", "bottom right": "corner",
                  "top": "edge_tb", "bottom": "edge_tb", "left": "edge_lr", "right": "edge_lr", "center": "center"}
# {objs} is the object list, {bg} the background colour; templates without {bg} are used when it is open.
_WITH_BACKGROUND = (
    "{objs} on a {bg} background",
    "on a {bg} background, {objs}",
    "a {bg} background with {objs}",
    "a picture of {objs} on a {bg} background",
    "{bg} background, {objs}",
    "an image of {objs}, {bg} background",
)
_WITHOUT_BACKGROUND = ("{objs}", "an image of {objs}", "a picture of {objs}", "a drawing of {objs}")


def object_phrase(obj: ObjectSpec, rng: np.random.Generator) -> str:
    words = ["a"] + ([obj.size] if obj.size else []) + [obj.color, obj.shape]
    pattern = _LOCATIONS[_LOCATION_KIND[obj.position]]
    return " ".join(words) + " " + pattern[rng.integers(len(pattern))].format(p=obj.position)


def style_tags(rng: np.random.Generator, count: int) -> list[str]:
    return [STYLE_TAGS[i] for i in rng.integers(len(STYLE_TAGS), size=count)]


def caption(spec: SceneSpec, rng: np.random.Generator, *, p_tags: float = 0.3, max_tags: int = 40) -> str:
    """One natural caption for ``spec``; objects in random order; with probability ``p_tags`` style tags go
    before, between and/or after the objects (up to ``max_tags`` of them, enough to pass 77 tokens)."""
    order = rng.permutation(len(spec.objects))
    phrases = [object_phrase(spec.objects[i], rng) for i in order]
    tags_before, tags_after = [], []
    if rng.random() < p_tags:
        # mostly a few tags; a quarter of the time a long run, so that prompts past 75 tokens (two CLIP chunks,
        # objects in the second) are common enough to learn from
        if rng.random() < 0.25:
            total = int(rng.integers(min(15, max_tags), max_tags + 1))
        else:
            total = int(min(max_tags, 1 + rng.geometric(0.2)))
        slots = rng.integers(0, len(phrases) + 1, size=total)  # 0 = before, k = after the k-th object
        for slot, tag in zip(slots, style_tags(rng, total)):
            if slot == 0:
                tags_before.append(tag)
            elif slot == len(phrases):
                tags_after.append(tag)
            else:
                phrases[slot - 1] += ", " + tag
    if len(phrases) == 1:
        objs = phrases[0]
    elif len(phrases) == 2 or rng.random() < 0.5:
        objs = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    else:
        objs = ", ".join(phrases[:-1]) + ", and " + phrases[-1]
    if spec.background is None:
        text = _WITHOUT_BACKGROUND[rng.integers(len(_WITHOUT_BACKGROUND))].format(objs=objs)
    else:
        text = _WITH_BACKGROUND[rng.integers(len(_WITH_BACKGROUND))].format(objs=objs, bg=spec.background)
    if tags_before:
        text = ", ".join(tags_before) + ", " + text
    if tags_after:
        text = text + ", " + ", ".join(tags_after)
    return text


def tag_prefix(tokenizer, n_tokens: int, rng: np.random.Generator) -> list[str]:
    """Style tags whose comma-joined text (plus the comma before the objects) is at least ``n_tokens`` tokens."""
    tags: list[str] = []
    while n_tokens > 0 and len(tokenizer.encode(", ".join(tags) + ",")) < n_tokens:
        tags.extend(style_tags(rng, 1))
    return tags


def long_caption(spec: SceneSpec, rng: np.random.Generator, prefix_tags: list[str]) -> str:
    """Objects after a given run of style tags (the long-prompt study places them 60-150 tokens in)."""
    return ", ".join(prefix_tags) + ", " + caption(spec, rng, p_tags=0.0)


_WORD = re.compile(r"[a-z]+")
_TWO_WORD_POSITIONS = {p for p in POSITIONS if " " in p}


def parse_caption(text: str) -> SceneSpec:
    """Read a caption back to the spec it describes. Each colour word starts an object: the word before it may
    be a size, the word after it must be a shape, and the first position phrase before the next object is its
    cell. Raises ``PromptError`` naming the problem when the caption does not describe a valid scene."""
    from ..errors import PromptError
    from .world import check_spec

    words = _WORD.findall(text.lower().replace("centre", "center").replace("middle", "center"))
    starts = [i for i, w in enumerate(words) if w in COLORS and i + 1 < len(words) and words[i + 1] in SHAPES]
    objects = []
    for k, i in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(words)
        size = words[i - 1] if i > 0 and words[i - 1] in SIZES else None
        cell = _find_position(words[i + 2 : end])
        if cell is None:
            raise PromptError(f"caption: no position for '{words[i]} {words[i + 1]}' in {text!r}")
        objects.append(ObjectSpec(words[i], words[i + 1], cell, size))
    if not objects:
        raise PromptError(f"caption: no '<color> <shape>' object in {text!r}")
    background = None
    for i, w in enumerate(words[1:], 1):
        if w == "background" and words[i - 1] in BACKGROUNDS:
            background = words[i - 1]
    spec = SceneSpec(tuple(objects), background)
    try:
        check_spec(spec)
    except ValueError as exc:
        raise PromptError(f"caption {text!r}: {exc}") from None
    return spec


def _find_position(words: list[str]) -> int | None:
    for j, w in enumerate(words):
        pair = " ".join(words[j : j + 2])
        if pair in _TWO_WORD_POSITIONS:
            return POSITIONS.index(pair)
        if w in POSITIONS:
            return POSITIONS.index(w)
    return None
