"""One generation request: the shape that the CLI, the A1111 routes, our own routes, infotexts and batch files
all translate to and from, with one set of limits and one validation.

``GenerationRequest`` is a frozen dataclass of typed fields in our names (``guidance``, not ``cfg_scale``; engine
sampler names such as ``euler_a``, not "Euler a": adapters resolve A1111 names before building one). Every
instance is valid against the engine's ``LIMITS`` (checked in ``__post_init__``, which also normalises ints to
floats and lists to tuples); ``create(limits, **fields)`` and ``validate(limits)`` check against a server's
tightened ``Limits``. Bad values raise ``RequestError`` naming the field and the value. Fields in
``UNIMPLEMENTED`` (styles) are accepted with neutral defaults so that adapters can
carry what clients send; ``unhonoured()`` names those set to values the engine does not honour yet.

``Pipeline.generate`` takes a request (or the keywords of one: ``as_request``); ``to_generate_kwargs`` and
``for_iteration`` split an ``n_iter`` request into its engine calls. The infotext writer and reader
(``infotext.to_infotext`` / ``from_infotext``) translate to and from it.

Torch-free and PIL-free: the images (``init_image``, ``mask``) are opaque objects, compared by identity.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ClipDiffusionError
from .text.chunking import LONG_PROMPT_STRATEGIES
from .text.prompt import MAX_PROMPT_CHARS

LONG_PROMPTS = tuple(LONG_PROMPT_STRATEGIES)
# text.conditioning.WEIGHTINGS, repeated because that module imports torch; tests/test_request.py keeps them equal
WEIGHTINGS = ("a1111", "comfy", "none", "ignore")
# Engine sampler/schedule names (diffusion.samplers.SAMPLERS/SCHEDULES import torch, so membership is checked by
# check_engine_names()). Lowercase identifiers never collide with A1111 display names ("Euler a", "Karras").
_ENGINE_NAME = re.compile(r"[a-z0-9][a-z0-9_]{0,63}\Z")


class RequestError(ClipDiffusionError):
    """A request field with a bad value (the server answers 422). ``field`` is our field name, or the client's
    (an adapter renames it: ``renamed``); a dotted name is a path (``override_settings.CLIP_stop_at_last_layers``)."""

    def __init__(self, field_name: str, value: Any, reason: str):
        self.field = field_name
        self.value = value
        self.reason = reason
        shown = value if not isinstance(value, str) or len(value) <= 80 else value[:77] + "..."
        super().__init__(f"{field_name}={shown!r}: {reason}")

    def renamed(self, names: dict[str, str]) -> RequestError:
        """The same error under a client's name for the field (``names``: ours -> theirs), or ``self``."""
        if self.field not in names:
            return self
        return RequestError(names[self.field], self.value, self.reason)


@dataclass(frozen=True)
class Limits:
    """Bounds on a request, in one place. ``LIMITS`` is the engine's; a server narrows it with ``tightened``. Every
    request is also checked against ``LIMITS``, so a hand-built looser ``Limits`` admits nothing more."""

    max_steps: int = 1000
    max_width: int = 8192
    max_height: int = 8192
    max_pixels: int = 4096 * 4096
    size_multiple: int = 1  # the engine checks the model's own multiple (VAE factor 4 for tiny, 8 for SD)
    max_batch_size: int = 64
    max_n_iter: int = 100  # A1111's "Batch count" slider tops out at 100
    max_prompt_chars: int = MAX_PROMPT_CHARS
    max_guidance: float = 100.0
    # Clip skip counts layers back from the last (A1111). A1111's slider is 1..12 (CLIP-L), but SD2's OpenCLIP-H has
    # 24 layers and SDXL's bigG 32; 48 is the widest range any route accepted before, so no request valid today is
    # refused. A value above a model's layer count is refused by TextEncoder.encode, which knows the model.
    max_clip_skip: int = 48
    # torch.Generator.manual_seed takes [0, 2**64) and A1111 keeps seeds as Python ints; every seed used
    # (seed + i for i < batch_size * n_iter) must be below this. The server's old 2**63 had no reason behind it.
    seed_limit: int = 2**64

    def tightened(self, **changes) -> Limits:
        """A copy with some limits narrowed; widening one (or an unknown name) is a ClipDiffusionError."""
        known = {f.name for f in fields(self)}
        for name, value in changes.items():
            if name not in known:
                raise ClipDiffusionError(f"{name}: not a limit; limits are {', '.join(sorted(known))}")
            kinds = (int, float) if name == "max_guidance" else int
            if isinstance(value, bool) or not isinstance(value, kinds) or not 0 < value < math.inf:
                raise ClipDiffusionError(f"{name}={value!r}: a limit must be a positive finite number")
            old = getattr(self, name)
            looser = value % old != 0 if name == "size_multiple" else value > old
            if looser:
                how = f"a multiple of {old}" if name == "size_multiple" else f"at most {old}"
                raise ClipDiffusionError(f"{name}={value!r}: limits can only be tightened, to {how}")
        return dataclasses.replace(self, **changes)


LIMITS = Limits()

# Fields whose non-default values the engine does not honour yet (the issues after #15). Hires fix (enable_hr,
# hr_*) is honoured since issue 20: clipdiffusion.hires.
UNIMPLEMENTED = frozenset({
    "styles",
})
_MASK_OPTIONS = ("mask_blur", "mask_blur_x", "mask_blur_y", "inpainting_fill", "inpaint_full_res",
                 "inpaint_full_res_padding", "inpainting_mask_invert")
_OPAQUE = ("init_image", "mask")
# Pipeline.generate's keyword arguments (besides callback and should_stop), in its order.
GENERATE_ARGS = ("prompt", "negative_prompt", "steps", "guidance", "seed", "sampler", "schedule", "width", "height",
                 "clip_skip", "long_prompt", "weighting", "batch_size", "init_image", "strength", "attention_maps",
                 "loras", "enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x",
                 "hr_resize_y", "hr_prompt", "hr_negative_prompt", "hr_sampler", "hr_schedule", "hr_strength",
                 "mask", "mask_blur", "mask_blur_x", "mask_blur_y", "inpainting_fill", "inpaint_full_res",
                 "inpaint_full_res_padding", "inpainting_mask_invert", "resize_mode")

# Hires fix upscalers (hr_upscaler), by A1111's names. The latent modes are A1111's ``shared.latent_upscale_modes``:
# name -> (torch.nn.functional.interpolate mode, antialias), applied to the first pass's latents. The pixel
# upscalers resize the decoded first-pass image with PIL (A1111's built-in "None", "Lanczos" and "Nearest"; "None"
# is a plain Lanczos resize there too). None (the default) is A1111's default mode, "Latent".
LATENT_UPSCALE_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
PIXEL_UPSCALERS = ("None", "Lanczos", "Nearest")
HR_UPSCALERS = (*LATENT_UPSCALE_MODES, *PIXEL_UPSCALERS)
DEFAULT_HR_UPSCALER = "Latent"
MAX_HR_SCALE = 8.0


def hires_size(width: int, height: int, hr_scale: float, hr_resize_x: int = 0, hr_resize_y: int = 0,
               factor: int = 1) -> tuple[int, int, int, int]:
    """Hires fix's sizes for a first pass of ``width`` x ``height`` (A1111's ``calculate_target_resolution``):
    ``(upscale_x, upscale_y, target_x, target_y)``. Without a resize, the upscale is ``int(side * hr_scale)``; with
    one side of the resize given, that side and the other by the aspect ratio (integer division); with both, the
    first pass is scaled to cover the resize and the excess cut off in whole latent pixels of ``factor`` pixels,
    half on each side. The target is what the second pass runs at: the upscale, cut, rounded down to ``factor``."""
    if hr_resize_x == 0 and hr_resize_y == 0:
        up_x, up_y = int(width * hr_scale), int(height * hr_scale)
        cut_x = cut_y = 0
    elif hr_resize_y == 0:
        up_x, up_y, cut_x, cut_y = hr_resize_x, hr_resize_x * height // width, 0, 0
    elif hr_resize_x == 0:
        up_x, up_y, cut_x, cut_y = hr_resize_y * width // height, hr_resize_y, 0, 0
    else:
        if width / height < hr_resize_x / hr_resize_y:
            up_x, up_y = hr_resize_x, hr_resize_x * height // width
        else:
            up_x, up_y = hr_resize_y * width // height, hr_resize_y
        cut_x, cut_y = (up_x - hr_resize_x) // factor, (up_y - hr_resize_y) // factor
    return up_x, up_y, (up_x // factor - cut_x) * factor, (up_y // factor - cut_y) * factor


# Bounds of the issue-19 options. A sigma above any schedule's (SD's sigma_max is 14.6; A1111's slider stops at 15)
# means every other call; DeepCache beyond 1000 steps is no different from one full step; merging every token
# (ratio 1) is refused, as ToMe caps merges at the sources (3/4 of the tokens) anyway and 0.9 is A1111's slider top.
MAX_S_MIN_UNCOND = 1000.0
MAX_DEEPCACHE_INTERVAL = 1000
MAX_TOKEN_MERGING_RATIO = 0.99
FAST_ARGS = ("s_min_uncond", "s_min_uncond_all", "skip_early_cond", "deepcache_interval", "token_merging_ratio")
GENERATE_ARGS = GENERATE_ARGS + FAST_ARGS


@dataclass(frozen=True)
class GenerationRequest:
    """A txt2img or img2img request (img2img when ``init_image`` is set). Defaults are ``Pipeline.generate``'s."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    guidance: float = 7.0  # classifier-free guidance scale (A1111 cfg_scale)
    seed: int = -1  # -1: random, picked by resolve_seed() or the engine and recorded
    sampler: str = "euler"  # engine name (diffusion.samplers.SAMPLERS)
    schedule: str = "normal"  # engine name (diffusion.samplers.SCHEDULES)
    width: int | None = None  # None: the model's native size
    height: int | None = None
    clip_skip: int | None = None  # A1111 counting, 1 = last layer; None: the family default (SD1 1, SD2/SDXL 2)
    long_prompt: str = "chunk"  # text.chunking strategy
    weighting: str = "a1111"
    batch_size: int = 1  # images per engine call, seeds seed .. seed + batch_size - 1
    n_iter: int = 1  # A1111 "Batch count": engine calls, seeds continuing across them
    init_image: Any = field(default=None, compare=False, repr=False)  # a PIL image: img2img
    strength: float = 0.75  # img2img denoising strength, (0, 1]
    attention_maps: bool = False  # per-token cross-attention maps of the first image
    # -- hires fix (clipdiffusion.hires); A1111's names and defaults unless said otherwise --
    enable_hr: bool = False  # hires fix (txt2img only)
    hr_scale: float = 2.0  # (0, 8]
    hr_upscaler: str | None = None  # HR_UPSCALERS; None: A1111's default ("Latent")
    hr_second_pass_steps: int = 0  # 0: the same as steps
    hr_resize_x: int = 0  # 0 and 0: use hr_scale
    hr_resize_y: int = 0
    hr_prompt: str = ""  # "": the same as prompt
    hr_negative_prompt: str = ""
    hr_sampler: str | None = None  # engine name; None: the same as sampler
    hr_schedule: str | None = None
    hr_strength: float = 0.75  # A1111 txt2img "denoising_strength": the second pass's; > 0 with enable_hr
    # -- inpainting and the init image's resize (clipdiffusion.inpaint); A1111's names and defaults --
    mask: Any = field(default=None, compare=False, repr=False)  # a PIL image: inpainting (needs init_image)
    mask_blur: int = 4  # Gaussian sigma in pixels, both directions
    mask_blur_x: int | None = None  # None: mask_blur
    mask_blur_y: int | None = None
    inpainting_fill: int = 0  # 0 fill, 1 original, 2 latent noise, 3 latent nothing
    inpaint_full_res: bool = True  # "only masked" area
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0  # 1: inpaint what the mask does not cover
    resize_mode: int = 0  # 0 just resize, 1 crop and resize, 2 resize and fill, 3 latent upscale
    # -- not honoured yet (UNIMPLEMENTED) --
    styles: tuple[str, ...] = ()
    loras: tuple[tuple[str, float, float], ...] = ()  # (name, text-encoder weight, UNet weight): honoured
    # -- fewer or cheaper UNet evaluations (issue 19), all off by default; A1111's option names where it has them --
    s_min_uncond: float = 0.0  # NGMS: no uncond on every other call while sigma < this (0: off)
    s_min_uncond_all: bool = False  # NGMS on every call, not every other one
    skip_early_cond: float = 0.0  # Skip Early CFG: no guidance for this fraction of the first calls, [0, 1]
    deepcache_interval: int = 0  # DeepCache: the whole UNet every N steps, its shallow blocks between (0/1: off)
    token_merging_ratio: float = 0.0  # ToMe for SD: share of tokens merged before self-attention, [0, 1)

    def __post_init__(self):
        for name, value in _checked(self._values(), LIMITS).items():
            object.__setattr__(self, name, value)

    def __eq__(self, other):
        # dataclass equality, except that the images compare by identity (PIL's == compares pixels)
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, f.name) is getattr(other, f.name) if f.name in _OPAQUE
                   else getattr(self, f.name) == getattr(other, f.name) for f in fields(self))

    # __hash__ is the dataclass's (frozen, eq): over the compared fields, which leave the images out

    def _values(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def create(cls, limits: Limits = LIMITS, **values) -> GenerationRequest:
        """A request checked against ``limits`` (a server's tightened ones), so errors quote those."""
        unknown = [name for name in values if name not in _DEFAULTS]
        if unknown:
            raise RequestError(unknown[0], values[unknown[0]], "unknown field")
        return cls(**_checked({**_DEFAULTS, **values}, limits))

    def validate(self, limits: Limits = LIMITS) -> GenerationRequest:
        """``self`` when it is within ``limits``; RequestError otherwise."""
        _checked(self._values(), limits)
        return self

    def replace(self, *, limits: Limits = LIMITS, **changes) -> GenerationRequest:
        """A validated copy with ``changes``."""
        return type(self).create(limits, **{**self._values(), **changes})

    def resolve_seed(self, rng: random.Random | None = None) -> GenerationRequest:
        """Seed -1 replaced by a random one in [0, 2**32) (the engine's and A1111's range); else ``self``."""
        if self.seed != -1:
            return self
        return dataclasses.replace(self, seed=(rng or random).randrange(2**32))

    def unhonoured(self) -> list[str]:
        """Names of UNIMPLEMENTED fields set to values that would change the output. Options of a feature that is
        off do not count: hr_* without enable_hr, mask options without a mask, resize_mode without init_image."""
        names = []
        for f in fields(self):
            value = getattr(self, f.name)
            if (f.name not in UNIMPLEMENTED or (f.name.startswith("hr_") and not self.enable_hr)
                    or (f.name in _MASK_OPTIONS and self.mask is None)
                    or (f.name == "resize_mode" and self.init_image is None)):
                continue
            if (value is not None) if f.name in _OPAQUE else value != f.default:
                names.append(f.name)
        return names

    def require_honoured(self) -> GenerationRequest:
        """``self`` when the engine honours every field; else a RequestError naming the first unhonoured one (and
        listing them all)."""
        names = self.unhonoured()
        if names:
            raise RequestError(names[0], getattr(self, names[0]), f"not implemented yet ({', '.join(names)})")
        return self

    def for_iteration(self, iteration: int) -> GenerationRequest:
        """The request of engine call ``iteration`` (of n_iter): one batch, its seed continuing the previous call's
        batch when the seed is fixed (a random seed stays -1: resolve it first to keep the calls consecutive)."""
        if isinstance(iteration, bool) or not isinstance(iteration, int) or not 0 <= iteration < self.n_iter:
            raise RequestError("iteration", iteration, f"must be an integer in [0, {self.n_iter - 1}]")
        if self.n_iter == 1:
            return self
        seed = self.seed if self.seed == -1 else self.seed + iteration * self.batch_size
        return dataclasses.replace(self, seed=seed, n_iter=1)

    def check_engine_names(self, samplers=None, schedules=None) -> GenerationRequest:
        """Check sampler/schedule names against the given tables, by default the engine's (imports torch)."""
        if samplers is None or schedules is None:
            from .diffusion import samplers as engine

            samplers = engine.SAMPLERS if samplers is None else samplers
            schedules = engine.SCHEDULES if schedules is None else schedules
        for name, table in (("sampler", samplers), ("hr_sampler", samplers), ("schedule", schedules),
                            ("hr_schedule", schedules)):
            value = getattr(self, name)
            if value is not None and value not in table:
                raise RequestError(name, value, f"unknown {name.removeprefix('hr_')}; choose from {', '.join(table)}")
        return self

    def to_generate_kwargs(self, *, iteration: int = 0, allow_unhonoured: bool = False) -> dict:
        """Keyword arguments of ``Pipeline.generate`` for engine call ``iteration`` (see ``for_iteration``).
        Unhonoured fields are a RequestError unless ``allow_unhonoured`` (a caller that reports them, as the A1111
        routes' ``ignored_fields`` do)."""
        if not allow_unhonoured:
            self.require_honoured()
        one = self.for_iteration(iteration)
        return {name: getattr(one, name) for name in GENERATE_ARGS}


_DEFAULTS = {f.name: f.default for f in fields(GenerationRequest)}


# -- validation ----------------------------------------------------------------------------------------------


def _int(name, value, low, high, *, multiple=1, optional=False):
    if optional and value is None:
        return None
    ok = not isinstance(value, bool) and isinstance(value, int) and low <= value <= high and value % multiple == 0
    if not ok:
        what = f"a multiple of {multiple}" if multiple > 1 else "an integer"
        raise RequestError(name, value, f"must be {'None or ' if optional else ''}{what} in [{low}, {high}]")
    return value


def _float(name, value, low, high, *, low_open=False):
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not (ok and (value > low if low_open else value >= low) and value <= high):
        raise RequestError(name, value, f"must be a finite number in {'(' if low_open else '['}{low}, {high}]")
    return float(value)


def _text(name, value, max_chars):
    if not isinstance(value, str) or len(value) > max_chars:
        raise RequestError(name, value, f"must be a string of at most {max_chars} characters")
    return value


def _label(name, value, *, optional=False):
    """A name we pass on without a table (styles, upscaler): 1 to 200 characters."""
    if not (optional and value is None) and not (isinstance(value, str) and 0 < len(value) <= 200):
        raise RequestError(name, value, f"must be {'None or ' if optional else ''}a name of 1 to 200 characters")
    return value


def _engine_name(name, value, *, optional=False):
    if optional and value is None:
        return None
    if not isinstance(value, str) or not _ENGINE_NAME.match(value):
        raise RequestError(name, value, "must be an engine name (lowercase letters, digits, _), e.g. euler_a")
    return value


def _bool(name, value):
    if not isinstance(value, bool):
        raise RequestError(name, value, "must be true or false")
    return value


def _image(name, value):
    if value is not None and not (hasattr(value, "size") and hasattr(value, "convert")):
        raise RequestError(name, type(value).__name__, "must be an image (PIL) or None")
    return value


def _sequence(name, value, item):
    if not isinstance(value, (list, tuple)):
        raise RequestError(name, value, "must be a list")
    return tuple(item(x) for x in value)


def _lora(value):
    ok = isinstance(value, (list, tuple)) and len(value) == 3 and isinstance(value[0], str) and value[0]
    ok = ok and all(not isinstance(w, bool) and isinstance(w, (int, float)) and math.isfinite(w) for w in value[1:])
    if not ok:
        raise RequestError("loras", value, "each LoRA must be (name, te_weight, unet_weight) with finite weights")
    return (value[0], float(value[1]), float(value[2]))


def _checked(v: dict, lim: Limits) -> dict:
    """``v`` (every field) checked against ``lim`` and normalised; RequestError naming the first bad field."""
    out = dict(v)
    for name in ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt"):
        _text(name, v[name], lim.max_prompt_chars)
    out["steps"] = _int("steps", v["steps"], 1, lim.max_steps)
    out["guidance"] = _float("guidance", v["guidance"], 0.0, lim.max_guidance)
    seed = v["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or not (seed == -1 or 0 <= seed < lim.seed_limit):
        raise RequestError("seed", seed, f"must be -1 (random) or an integer in [0, {lim.seed_limit - 1}]")
    for name in ("sampler", "schedule", "hr_sampler", "hr_schedule"):
        _engine_name(name, v[name], optional=name.startswith("hr_"))
    m = lim.size_multiple
    _int("width", v["width"], m, lim.max_width, multiple=m, optional=True)
    _int("height", v["height"], m, lim.max_height, multiple=m, optional=True)
    if v["width"] is not None and v["height"] is not None and v["width"] * v["height"] > lim.max_pixels:
        raise RequestError("width", v["width"], f"size={v['width']}x{v['height']} is more than {lim.max_pixels} "
                                                f"pixels")
    _int("clip_skip", v["clip_skip"], 1, lim.max_clip_skip, optional=True)
    for name, choices in (("long_prompt", LONG_PROMPTS), ("weighting", WEIGHTINGS)):
        if not isinstance(v[name], str) or v[name] not in choices:
            raise RequestError(name, v[name], f"must be one of {', '.join(choices)}")
    _int("batch_size", v["batch_size"], 1, lim.max_batch_size)
    _int("n_iter", v["n_iter"], 1, lim.max_n_iter)
    if seed != -1 and seed + v["batch_size"] * v["n_iter"] > lim.seed_limit:
        raise RequestError("seed", seed, f"the last seed used, seed + batch_size * n_iter - 1, must be below "
                                         f"{lim.seed_limit}")
    _image("init_image", v["init_image"])
    out["strength"] = _float("strength", v["strength"], 0.0, 1.0, low_open=True)
    _bool("attention_maps", v["attention_maps"])
    if _bool("enable_hr", v["enable_hr"]) and v["init_image"] is not None:
        raise RequestError("enable_hr", True, "hires fix is for txt2img: a request with init_image cannot use it")
    out["hr_scale"] = _float("hr_scale", v["hr_scale"], 0.0, MAX_HR_SCALE, low_open=True)  # A1111's slider: 1..4
    if _label("hr_upscaler", v["hr_upscaler"], optional=True) not in (None, *HR_UPSCALERS):
        raise RequestError("hr_upscaler", v["hr_upscaler"], f"unknown upscaler; choose from {', '.join(HR_UPSCALERS)}")
    _int("hr_second_pass_steps", v["hr_second_pass_steps"], 0, lim.max_steps)
    _int("hr_resize_x", v["hr_resize_x"], 0, lim.max_width, multiple=m)
    _int("hr_resize_y", v["hr_resize_y"], 0, lim.max_height, multiple=m)
    out["hr_strength"] = _float("hr_strength", v["hr_strength"], 0.0, 1.0)
    if v["enable_hr"]:
        if out["hr_strength"] == 0:
            raise RequestError("hr_strength", v["hr_strength"], "hires fix needs a denoising strength in (0, 1]")
        schedule = hires_schedule_steps(v["hr_second_pass_steps"] or v["steps"], out["hr_strength"])
        if schedule > LIMITS.max_steps:
            raise RequestError("hr_strength", v["hr_strength"], f"hires fix's second pass at this strength samples "
                                                                f"a schedule of {schedule} steps, over "
                                                                f"{LIMITS.max_steps}")
        if v["width"] is not None and v["height"] is not None:
            check_hires_size(v["width"], v["height"], out["hr_scale"], v["hr_resize_x"], v["hr_resize_y"], lim)
    if _image("mask", v["mask"]) is not None and v["init_image"] is None:
        raise RequestError("mask", type(v["mask"]).__name__, "inpainting needs an init_image")
    _bool("inpaint_full_res", v["inpaint_full_res"])
    for name, high in (("mask_blur", 64), ("inpainting_fill", 3), ("inpaint_full_res_padding", 256),
                       ("inpainting_mask_invert", 1), ("resize_mode", 3)):  # A1111's slider / choice ranges
        _int(name, v[name], 0, high)
    for name in ("mask_blur_x", "mask_blur_y"):
        _int(name, v[name], 0, 64, optional=True)
    out["styles"] = _sequence("styles", v["styles"], lambda style: _label("styles", style))
    out["loras"] = _sequence("loras", v["loras"], _lora)
    out["s_min_uncond"] = _float("s_min_uncond", v["s_min_uncond"], 0.0, MAX_S_MIN_UNCOND)
    _bool("s_min_uncond_all", v["s_min_uncond_all"])
    out["skip_early_cond"] = _float("skip_early_cond", v["skip_early_cond"], 0.0, 1.0)
    _int("deepcache_interval", v["deepcache_interval"], 0, MAX_DEEPCACHE_INTERVAL)
    out["token_merging_ratio"] = _float("token_merging_ratio", v["token_merging_ratio"], 0.0, MAX_TOKEN_MERGING_RATIO)
    return out


def hires_schedule_steps(steps: int, strength: float) -> int:
    """The schedule hires fix's second pass samples the last ``steps`` steps of (A1111's ``setup_img2img_steps``
    with steps given: ``int(steps / min(strength, 0.999))``), so that exactly ``steps`` steps run."""
    return max(steps, int(steps / min(strength, 0.999)))


def check_hires_size(width, height, hr_scale, hr_resize_x, hr_resize_y, lim: Limits = LIMITS, factor: int = 1):
    """RequestError (naming hr_scale, or hr_resize_x when a resize is given) when hires fix's upscale or target size
    of a ``width`` x ``height`` first pass is outside ``lim`` or under ``factor`` pixels a side."""
    up_x, up_y, x, y = hires_size(width, height, hr_scale, hr_resize_x, hr_resize_y, factor)
    name, value = ("hr_scale", hr_scale) if not (hr_resize_x or hr_resize_y) else ("hr_resize_x", hr_resize_x)
    size = f"{width}x{height} upscaled to {up_x}x{up_y}" + (f" (cut to {x}x{y})" if (x, y) != (up_x, up_y) else "")
    if up_x > lim.max_width or up_y > lim.max_height or up_x * up_y > lim.max_pixels:
        raise RequestError(name, value, f"hires fix: {size} is over the limits ({lim.max_width}x{lim.max_height}, "
                                        f"{lim.max_pixels} pixels)")
    if min(x, y) < max(factor, lim.size_multiple, 1):
        raise RequestError(name, value, f"hires fix: {size} is too small")


DEFAULTS = dict(_DEFAULTS)  # every field's default, by name (the CLI's argparse defaults come from here)


def as_request(prompt: str | GenerationRequest = "", negative_prompt: str = "", **fields) -> GenerationRequest:
    """``prompt`` itself when it is a request (then every other field must be left at its default), else the
    request of these fields: how ``Pipeline.generate`` takes either a request or today's keywords."""
    if not isinstance(prompt, GenerationRequest):
        return GenerationRequest.create(prompt=prompt, negative_prompt=negative_prompt, **fields)
    given = {"negative_prompt": negative_prompt, **fields}
    unknown = [name for name in given if name not in _DEFAULTS]
    if unknown:
        raise RequestError(unknown[0], given[unknown[0]], "unknown field")
    extra = [name for name, value in given.items()
             if ((value is not None) if name in _OPAQUE else value != _DEFAULTS[name])]
    if extra:
        raise RequestError(extra[0], given[extra[0]], "give a GenerationRequest or its fields as keywords, not both")
    return prompt
