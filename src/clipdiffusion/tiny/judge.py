"""The judge: reads background, and the colour, shape, size and cell of every object, back from pixels.

Its verdicts only count once it is right on fresh ground-truth renders (``validate``: >= 99% per attribute; the
tests hold it to that). It reads pixels the way a person would, so it also works on model outputs that are
blurred or off-colour: a pixel belongs to an object when it is nearer to some object colour than to the
background (for an anti-aliased edge that is exactly "more than half covered"), connected pixels form one object,
and the object's features decide the rest. numpy only.
"""

from collections import deque
from dataclasses import dataclass

import numpy as np

from .world import BACKGROUNDS, COLORS, POSITIONS, SIZES, SceneSpec

_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # [6, 3]
_BACKGROUND_RGB = np.array(list(BACKGROUNDS.values()), dtype=np.float32)  # [3, 3]
# Smallest object: a small triangle (half its box) shrunk by the size jitter is ~25 px at 64; a third of that
# rejects speckle in generated images without missing real objects.
_MIN_AREA_FRACTION = 0.5 * (1 / 8) ** 2 / 1.25 / 3
# Between small (<= 1/8 * 1.12) and large (>= 1/4 / 1.12): their geometric mean, as a fraction of the canvas.
_SIZE_SPLIT = float(np.sqrt(SIZES["small"] * 1.12 * SIZES["large"] / 1.12))


@dataclass(frozen=True)
class JudgedObject:
    color: str
    shape: str
    size: str
    cell: int
    area: int  # pixels
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


@dataclass(frozen=True)
class Judgement:
    background: str
    objects: tuple[JudgedObject, ...]

    def at(self, cell: int) -> JudgedObject | None:
        """The largest object whose centre lies in ``cell``."""
        found = [o for o in self.objects if o.cell == cell]
        return max(found, key=lambda o: o.area) if found else None


def judge(image) -> Judgement:
    """Judge one image (PIL or uint8 array [H, W, 3])."""
    rgb = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32)[..., :3]
    height, width = rgb.shape[:2]
    bg_rgb = np.median(rgb.reshape(-1, 3), axis=0)
    background = list(BACKGROUNDS)[int(np.argmin(((_BACKGROUND_RGB - bg_rgb) ** 2).sum(-1)))]
    dist_bg = np.sqrt(((rgb - bg_rgb) ** 2).sum(-1))  # [H, W]
    dist_palette = np.sqrt(((rgb[:, :, None, :] - _PALETTE) ** 2).sum(-1)).min(-1)  # [H, W]
    mask = dist_palette < dist_bg
    min_area = max(4, int(_MIN_AREA_FRACTION * height * width))
    objects = []
    for ys, xs in _components(mask):
        if len(ys) < min_area:
            continue
        objects.append(_describe(rgb, bg_rgb, dist_bg, ys, xs, width, height))
    return Judgement(background, tuple(sorted(objects, key=lambda o: (o.cell, -o.area))))


def _components(mask: np.ndarray):
    """4-connected components of a boolean mask, as (ys, xs) index arrays. A plain BFS: images are 64-128 px."""
    height, width = mask.shape
    seen = np.zeros_like(mask)
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, ys, xs = deque([(y0, x0)]), [], []
        while queue:
            y, x = queue.popleft()
            ys.append(y)
            xs.append(x)
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        yield np.array(ys), np.array(xs)


def _describe(rgb, bg_rgb, dist_bg, ys, xs, width, height) -> JudgedObject:
    # colour from the object's core (the pixels furthest from the background), not its blended rim
    strength = dist_bg[ys, xs]
    core = strength >= 0.8 * strength.max()
    mean = rgb[ys[core], xs[core]].mean(0)
    color = list(COLORS)[int(np.argmin(((_PALETTE - mean) ** 2).sum(-1)))]

    x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
    # Soft coverage alpha (how much of each pixel the object covers, from the blend between background and the
    # object colour) over the component grown by one pixel: at 8 px across, a half-coverage mask is too coarse
    # to tell a circle from a square, exact area sums are not.
    local = np.zeros((y1 - y0 + 3, x1 - x0 + 3), dtype=bool)  # [h+2, w+2], one pixel of margin each side
    local[ys - y0 + 1, xs - x0 + 1] = True
    grown = local.copy()
    grown[1:] |= local[:-1]
    grown[:-1] |= local[1:]
    grown[:, 1:] |= local[:, :-1]
    grown[:, :-1] |= local[:, 1:]
    gy, gx = np.nonzero(grown)
    gy, gx = gy + y0 - 1, gx + x0 - 1
    inside = (gy >= 0) & (gy < height) & (gx >= 0) & (gx < width)
    gy, gx = gy[inside], gx[inside]
    direction = mean - bg_rgb
    alpha = np.clip(((rgb[gy, gx] - bg_rgb) @ direction) / max(float(direction @ direction), 1e-6), 0.0, 1.0)
    rows = np.bincount(gy - gy.min(), weights=alpha)  # object width per row
    cols = np.bincount(gx - gx.min(), weights=alpha)  # object height per column
    fill = alpha.sum() / max(rows.max() * cols.max(), 1e-6)  # circle pi/4, square 1, triangle 1/2
    # Skewness of the mass along y: symmetric shapes give 0, an upward triangle (width grows linearly
    # downwards) gives -0.57; robust to blur and to where the object sits.
    y = np.arange(len(rows), dtype=np.float64)
    mu = (rows * y).sum() / rows.sum()
    var = (rows * (y - mu) ** 2).sum() / rows.sum()
    skew = (rows * (y - mu) ** 3).sum() / rows.sum() / max(var, 1e-6) ** 1.5
    if skew < -0.3:
        shape = "triangle"
    elif fill > 0.89:
        shape = "square"
    else:
        shape = "circle"

    w, h = x1 - x0 + 1, y1 - y0 + 1
    size = "large" if max(w, h) / width > _SIZE_SPLIT else "small"
    cx, cy = (x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2  # box centre: stable for triangles, whose mass sits low
    col = min(2, int(cx * 3 / width))
    row = min(2, int(cy * 3 / height))
    return JudgedObject(color, shape, size, row * 3 + col, len(ys), (x0, y0, x1, y1))


@dataclass(frozen=True)
class Verdict:
    """How one image fares against the spec of its prompt. Per specified object (in ``spec.objects`` order):
    whether its cell holds an object at all, and whether that object's colour, shape and size are right."""

    occupied: tuple[bool, ...]
    color_ok: tuple[bool, ...]
    shape_ok: tuple[bool, ...]
    size_ok: tuple[bool, ...]  # True when the spec leaves the size open
    extra: int  # objects in cells the spec does not name
    background_ok: bool  # True when the spec leaves the background open

    @property
    def objects_ok(self) -> tuple[bool, ...]:
        return tuple(all(t) for t in zip(self.occupied, self.color_ok, self.shape_ok, self.size_ok))

    @property
    def success(self) -> bool:
        """GenEval-style, strict: every object right, nothing extra, and the background right."""
        return all(self.objects_ok) and self.extra == 0 and self.background_ok


def verdict(spec: SceneSpec, judgement: Judgement) -> Verdict:
    named = {o.cell for o in spec.objects}
    found = [judgement.at(o.cell) for o in spec.objects]
    return Verdict(
        occupied=tuple(f is not None for f in found),
        color_ok=tuple(f is not None and f.color == o.color for o, f in zip(spec.objects, found)),
        shape_ok=tuple(f is not None and f.shape == o.shape for o, f in zip(spec.objects, found)),
        size_ok=tuple(f is not None and (o.size is None or f.size == o.size) for o, f in zip(spec.objects, found)),
        extra=sum(1 for o in judgement.objects if o.cell not in named),
        background_ok=spec.background is None or spec.background == judgement.background,
    )


def validate(n: int = 500, seed: int = 1_000_003, canvas: int = 64, noise: float = 0.0) -> dict[str, float]:
    """Judge ``n`` fresh ground-truth renders and return accuracy per attribute (and whole-scene exactness).
    ``noise`` adds Gaussian pixel noise (std in 0-255 units) and a slight blur, to see the margin."""
    from PIL import ImageFilter

    from .world import render, sample_scene

    rng = np.random.default_rng(seed)
    hits = {"background": 0, "count": 0, "cell": 0, "color": 0, "shape": 0, "size": 0, "scene": 0}
    n_objects = 0
    for _ in range(n):
        scene = sample_scene(rng)
        image = render(scene, canvas)
        if noise:
            image = image.filter(ImageFilter.GaussianBlur(0.6))
            pixels = np.asarray(image, np.float32) + rng.normal(0, noise, (canvas, canvas, 3))
            image = np.clip(pixels, 0, 255).astype(np.uint8)
        j = judge(image)
        v = verdict(scene.spec(), j)
        hits["background"] += j.background == scene.background
        hits["count"] += len(j.objects) == len(scene.objects)
        hits["cell"] += sum(v.occupied)
        hits["color"] += sum(v.color_ok)
        hits["shape"] += sum(v.shape_ok)
        hits["size"] += sum(v.size_ok)
        hits["scene"] += v.success
        n_objects += len(scene.objects)
    per_object = {"cell", "color", "shape", "size"}
    return {k: v / (n_objects if k in per_object else n) for k, v in hits.items()}
