"""Training examples for textual inversion (``embedding_training``): a folder of captioned images, or renders of the
tiny model's synthetic world whose object matches a description.

Image files are untrusted input: each is read whole only when its size is under ``MAX_IMAGE_BYTES``, opened by the
server's upload decoder (``server.images.decode_image_bytes``: the formats clients send, the declared size checked
against ``MAX_IMAGE_PIXELS`` before any pixel is decoded, PNG text chunks never inflated) and converted to RGB.
Every problem is a ``ClipDiffusionError`` naming the file.

Captions for a folder (A1111's "prompt template" idea, simplified): ``IMAGE.txt`` beside ``IMAGE.png`` when it
exists, else the template (default ``"a [name]"``); ``[name]`` is replaced by the embedding's name, and a caption
that does not then contain the name is an error (the vectors would learn nothing from it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .embedding_training import Example
from .errors import ClipDiffusionError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_IMAGE_BYTES = 64 * 2**20
MAX_IMAGE_PIXELS = 40_000_000  # a 40-megapixel photo; the image is cropped and resized to the model's size anyway
MAX_CAPTION_BYTES = 4096
MAX_FOLDER_IMAGES = 10_000
DEFAULT_TEMPLATE = "a [name]"
DEFAULT_SCENES = 64


def fill_caption(text: str, name: str, source: str) -> str:
    """``[name]`` -> the name; the result must mention the name."""
    caption = " ".join(text.replace("[name]", name).split())
    if name.lower() not in caption.lower():
        raise ClipDiffusionError(f"{source}: caption {text!r} has neither [name] nor the name {name!r}")
    return caption


def _read_caption(path: Path) -> str:
    try:
        raw = path.read_bytes()[: MAX_CAPTION_BYTES + 1]
    except OSError as exc:
        raise ClipDiffusionError(f"caption file {str(path)!r}: cannot read ({exc.strerror or exc})") from None
    if len(raw) > MAX_CAPTION_BYTES:
        raise ClipDiffusionError(f"caption file {str(path)!r}: longer than {MAX_CAPTION_BYTES} bytes")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ClipDiffusionError(f"caption file {str(path)!r}: not UTF-8 text") from None


def read_image(path) -> object:
    """One image file -> RGB PIL image, with the upload checks; errors name the file."""
    from .server.images import decode_image_bytes

    path = Path(path)
    shown = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise ClipDiffusionError(f"image {shown!r}: {size} bytes, more than {MAX_IMAGE_BYTES}")
        raw = path.read_bytes()
    except OSError as exc:
        raise ClipDiffusionError(f"image {shown!r}: cannot read ({exc.strerror or exc})") from None
    if not raw:
        raise ClipDiffusionError(f"image {shown!r}: empty file")
    return decode_image_bytes(raw, "image", MAX_IMAGE_PIXELS, shown=shown)


def folder_examples(folder, name: str, template: str | None = None) -> list:
    """Every image in ``folder`` (not recursive; hidden files and other suffixes are passed over), in sorted order,
    with its caption (``IMAGE.txt`` beside it, else ``template``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ClipDiffusionError(f"images: {str(folder)!r} is not a folder" if folder.exists()
                                 else f"images: {str(folder)!r} does not exist")  # fmt: skip
    template = DEFAULT_TEMPLATE if template is None else template
    if not isinstance(template, str) or not template.strip():
        raise ClipDiffusionError(f"caption: {template!r} is empty")
    fill_caption(template, name, "caption")  # a template without [name] fails before any image is read
    try:
        entries = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                         and not p.name.startswith(".") and p.is_file())  # fmt: skip
    except OSError as exc:
        raise ClipDiffusionError(f"images: cannot list {str(folder)!r} ({exc.strerror or exc})") from None
    if not entries:
        raise ClipDiffusionError(f"images: no image files ({', '.join(IMAGE_SUFFIXES)}) in {str(folder)!r}")
    if len(entries) > MAX_FOLDER_IMAGES:
        raise ClipDiffusionError(f"images: {len(entries)} images in {str(folder)!r}; at most {MAX_FOLDER_IMAGES}")
    examples = []
    for path in entries:
        beside = path.with_suffix(".txt")
        if beside.is_file():
            caption = fill_caption(_read_caption(beside), name, f"caption file {str(beside)!r}")
        else:
            caption = fill_caption(template, name, "caption")
        examples.append(Example(read_image(path), caption, str(path)))
    return examples


def parse_description(text: str):
    """``"large purple triangle"`` -> (size or None, colour, shape), in the synthetic world's words (any order)."""
    from .tiny.world import COLORS, SHAPES, SIZES

    words = text.lower().split() if isinstance(text, str) else []
    found = {"size": [w for w in words if w in SIZES], "color": [w for w in words if w in COLORS],
             "shape": [w for w in words if w in SHAPES]}  # fmt: skip
    unknown = [w for w in words if w not in SIZES and w not in COLORS and w not in SHAPES]
    if (not words or unknown or len(found["color"]) != 1 or len(found["shape"]) != 1 or len(found["size"]) > 1):
        raise ClipDiffusionError(
            f"describe: {text!r} is not an object of the synthetic world: give one colour ({', '.join(COLORS)}), "
            f"one shape ({', '.join(SHAPES)}) and optionally a size ({', '.join(SIZES)})"
            + (f"; unknown words: {', '.join(unknown)}" if unknown else "")
        )
    return (found["size"][0] if found["size"] else None), found["color"][0], found["shape"][0]


def description_examples(description: str, name: str, count: int = DEFAULT_SCENES, seed: int = 0, *,
                         canvas: int = 64, cells=None, backgrounds=None) -> list:
    """``count`` renders of one-object scenes whose object matches ``description`` (a random cell and background;
    a random size when the description names none), captioned in the grammar the tiny model was trained on with
    the object's words replaced by ``name``: "a large purple triangle at the top left on a black background" ->
    "a NAME at the top left on a black background". ``cells``/``backgrounds`` restrict where objects are drawn
    (to hold combinations out of training)."""
    from .tiny.captions import caption
    from .tiny.world import BACKGROUNDS, ObjectSpec, SceneSpec, check_spec, render_spec

    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_FOLDER_IMAGES:
        raise ClipDiffusionError(f"scenes: {count!r} is not an integer in 1..{MAX_FOLDER_IMAGES}")
    size, color, shape = parse_description(description)
    phrase = " ".join(([size] if size else []) + [color, shape])
    cells = list(range(9)) if cells is None else list(cells)
    backgrounds = list(BACKGROUNDS) if backgrounds is None else list(backgrounds)
    if not cells or not backgrounds:
        raise ClipDiffusionError("describe: no cell or no background left to draw the object in")
    rng = np.random.default_rng([seed, 17])
    examples = []
    for i in range(count):
        cell = int(cells[rng.integers(len(cells))])
        background = str(backgrounds[rng.integers(len(backgrounds))])
        spec = SceneSpec((ObjectSpec(color, shape, cell, size),), background)
        check_spec(spec)
        text = caption(spec, rng, p_tags=0.0)
        assert text.count(f" {phrase} ") == 1, (text, phrase)
        image = render_spec(spec, int(rng.integers(2**31)), canvas)
        examples.append(Example(image, text.replace(f" {phrase} ", f" {name} ", 1), f"render {i}"))
    return examples
