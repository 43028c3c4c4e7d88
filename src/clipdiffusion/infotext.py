"""AUTOMATIC1111's generation-parameters text ("infotext"), as stored in a PNG's "parameters" text chunk.

    a red circle
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, Model: tiny, Clip skip: 2

The last line is a comma-separated list of ``Key: value`` pairs; a value that contains a comma, colon or newline is
written as a JSON string (A1111 ``generation_parameters_copypaste.quote``). Keys we do not know are kept in
``extra`` so a parsed text can be written back unchanged. ``format_infotext``/``parse_infotext`` work on
``GenerationParameters`` (what a text says); ``to_infotext``/``from_infotext`` translate a
``request.GenerationRequest`` to and from the text. Torch-free.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields

from . import fast_options
from .errors import ClipDiffusionError
from .request import DEFAULTS, LIMITS, GenerationRequest, Limits, RequestError

# our sampler / schedule names (diffusion.samplers.SAMPLERS / SCHEDULES) -> A1111 display names
SAMPLER_NAMES = {"euler": "Euler", "euler_a": "Euler a", "heun": "Heun", "dpmpp_2m": "DPM++ 2M", "ddim": "DDIM",
                 "lms": "LMS", "dpm2": "DPM2", "dpm2_a": "DPM2 a", "dpmpp_2s_a": "DPM++ 2S a",
                 "dpmpp_sde": "DPM++ SDE", "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun",
                 "unipc": "UniPC", "lcm": "LCM"}
SCHEDULE_NAMES = {"normal": "Normal", "karras": "Karras", "ddim": "DDIM", "exponential": "Exponential",
                  "polyexponential": "Polyexponential", "sgm_uniform": "SGM Uniform", "kl_optimal": "KL Optimal",
                  "simple": "Simple"}
_SAMPLER_BY_NAME = {v: k for k, v in SAMPLER_NAMES.items()}
# A1111's "Uniform" is k-diffusion's get_sigmas, the same timesteps as "Normal" (linspace from t_max to 0).
_SCHEDULE_BY_NAME = {**{v: k for k, v in SCHEDULE_NAMES.items()}, "Uniform": "normal"}

# A1111's pattern for one "Key: value" pair; a value is a JSON string or runs to the next comma.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")

# A separate VAE file (Pipeline.replace_vae): A1111 writes these after "Model" (sd_vae.get_loaded_vae_hash/_name)
VAE_KEYS = ("VAE hash", "VAE")

_DEFAULT_LONG_PROMPT = "chunk"
_DEFAULT_WEIGHTING = "a1111"


@dataclass(frozen=True)
class GenerationParameters:
    """What an infotext records. ``sampler``/``schedule`` use our names when the A1111 name is known, otherwise
    the display name as written (so ``get_sampler`` reports it); ``None`` means the text did not say."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int | None = None
    sampler: str | None = None
    schedule: str | None = None
    guidance: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    model: str | None = None
    # A1111 counting (1 = last layer, 2 = penultimate); None = the family's default (SD1 1, SD2/SDXL 2), which
    # is what an A1111 text without "Clip skip" means
    clip_skip: int | None = None
    strength: float | None = None  # img2img "Denoising strength"
    long_prompt: str = _DEFAULT_LONG_PROMPT
    weighting: str = _DEFAULT_WEIGHTING
    extra: dict = field(default_factory=dict)


def _number(value: float) -> str:
    """7.0 -> "7", 7.5 -> "7.5" (A1111 writes the slider value as is)."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def _quote(text) -> str:
    text = str(text)
    if "," not in text and "\n" not in text and ":" not in text and not text.startswith('"'):
        return text
    return json.dumps(text, ensure_ascii=False)


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


def format_infotext(p: GenerationParameters) -> str:
    """The A1111 text for ``p``: prompt, "Negative prompt:" line when there is one, then the parameters line."""
    pairs = []
    if p.steps is not None:
        pairs.append(("Steps", p.steps))
    if p.sampler is not None:
        pairs.append(("Sampler", SAMPLER_NAMES.get(p.sampler, p.sampler)))
    if p.schedule is not None:
        pairs.append(("Schedule type", SCHEDULE_NAMES.get(p.schedule, p.schedule)))
    if p.guidance is not None:
        pairs.append(("CFG scale", _number(p.guidance)))
    if p.seed is not None:
        pairs.append(("Seed", p.seed))
    if p.width is not None and p.height is not None:
        pairs.append(("Size", f"{p.width}x{p.height}"))
    if p.model:
        pairs.append(("Model", p.model))
    # A1111 writes the VAE file right after the model ("VAE hash", "VAE"); they live in ``extra``
    vae_keys = [k for k in VAE_KEYS if p.extra.get(k) not in (None, "")]
    pairs.extend((k, p.extra[k]) for k in vae_keys)
    if p.strength is not None:
        pairs.append(("Denoising strength", _number(p.strength)))
    if p.clip_skip is not None:
        pairs.append(("Clip skip", p.clip_skip))
    if p.long_prompt != _DEFAULT_LONG_PROMPT:
        pairs.append(("Long prompt", p.long_prompt))
    if p.weighting != _DEFAULT_WEIGHTING:
        pairs.append(("Weighting", p.weighting))
    pairs.extend((k, v) for k, v in p.extra.items() if k not in vae_keys)
    lines = [p.prompt]
    if p.negative_prompt:
        lines.append(f"Negative prompt: {p.negative_prompt}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in pairs))
    return "\n".join(lines)


def _sampler_and_schedule(value: str) -> tuple[str, str | None]:
    """Sampler display name -> (our name or the raw name, schedule carried in the name by A1111 < 1.9)."""
    if value in _SAMPLER_BY_NAME:
        return _SAMPLER_BY_NAME[value], None
    for suffix, schedule in (("Karras", "karras"), ("Exponential", "exponential")):
        base = value.removesuffix(" " + suffix)
        if base != value and base in _SAMPLER_BY_NAME:
            return _SAMPLER_BY_NAME[base], schedule
    return value, None


def _int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ClipDiffusionError(f"infotext {key}: expected an integer, got {value!r}") from None


def _float(key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ClipDiffusionError(f"infotext {key}: expected a number, got {value!r}") from None


def parse_infotext(text: str) -> GenerationParameters:
    """Parse an A1111 infotext (ours or A1111's). Unknown keys land in ``extra`` in their order."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:  # A1111's test for "this is the parameters line"
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    values: dict = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative)}
    extra = {}
    for key, raw in _PARAM.findall(last):
        value = _unquote(raw.strip())
        if key == "Steps":
            values["steps"] = _int(key, value)
        elif key == "Sampler":
            values["sampler"], schedule = _sampler_and_schedule(value)
            if schedule is not None and "schedule" not in values:
                values["schedule"] = schedule
        elif key == "Schedule type":
            values["schedule"] = _SCHEDULE_BY_NAME.get(value, value)
        elif key == "CFG scale":
            values["guidance"] = _float(key, value)
        elif key == "Seed":
            values["seed"] = _int(key, value)
        elif key == "Size" and _SIZE.match(value):
            w, h = _SIZE.match(value).groups()
            values["width"], values["height"] = int(w), int(h)
        elif key == "Model":
            values["model"] = value
        elif key == "Denoising strength":
            values["strength"] = _float(key, value)
        elif key == "Clip skip":
            values["clip_skip"] = _int(key, value)
        elif key == "Long prompt":
            values["long_prompt"] = value
        elif key == "Weighting":
            values["weighting"] = value
        else:
            extra[key] = value
    known = {f.name for f in fields(GenerationParameters)}
    assert set(values) <= known
    return GenerationParameters(**values, extra=extra)


# -- requests ---------------------------------------------------------------------------------------------

# hires field -> (A1111 infotext key, our name -> A1111 name, text -> value); A1111 processing.py,
# StableDiffusionProcessingTxt2Img.init. "Hires resize" (WxH) holds hr_resize_x and hr_resize_y.
_HIRES = {"hr_scale": ("Hires upscale", {}, float), "hr_second_pass_steps": ("Hires steps", {}, int),
          "hr_upscaler": ("Hires upscaler", {}, str), "hr_sampler": ("Hires sampler", SAMPLER_NAMES, str),
          "hr_schedule": ("Hires schedule type", SCHEDULE_NAMES, str), "hr_prompt": ("Hires prompt", {}, str),
          "hr_negative_prompt": ("Hires negative prompt", {}, str)}


def hires_parameters(request: GenerationRequest) -> dict:
    """The "Hires ..." infotext keys of a hires-fix request, as A1111's txt2img ``init`` sets them (the
    "Denoising strength" aside): "Hires upscale" (without a resize) or "Hires resize" (WxH), "Hires steps" when
    given, "Hires upscaler" when given (None is A1111's default, "Latent"), "Hires sampler"/"Hires schedule type"
    and "Hires prompt"/"Hires negative prompt" when they differ from the first pass's. Empty without enable_hr."""
    r = request
    if not r.enable_hr:
        return {}
    out: dict = {}
    if r.hr_resize_x or r.hr_resize_y:
        out["Hires resize"] = f"{r.hr_resize_x}x{r.hr_resize_y}"
    else:
        out["Hires upscale"] = _number(r.hr_scale)
    if r.hr_second_pass_steps:
        out["Hires steps"] = r.hr_second_pass_steps
    if r.hr_upscaler is not None:
        out["Hires upscaler"] = r.hr_upscaler
    if r.hr_sampler not in (None, r.sampler):
        out["Hires sampler"] = SAMPLER_NAMES.get(r.hr_sampler, r.hr_sampler)
    if r.hr_schedule not in (None, r.schedule):
        out["Hires schedule type"] = SCHEDULE_NAMES.get(r.hr_schedule, r.hr_schedule)
    if r.hr_prompt not in ("", r.prompt):
        out["Hires prompt"] = r.hr_prompt
    if r.hr_negative_prompt not in ("", r.negative_prompt):
        out["Hires negative prompt"] = r.hr_negative_prompt
    return out


def to_infotext(request: GenerationRequest, *, seed: int | None = None, model: str | None = None,
                width: int | None = None, height: int | None = None, default_clip_skip: int | None = None,
                vae: str | None = None, vae_hash: str | None = None) -> str:
    """The A1111 infotext of one image of ``request``: ``seed`` is that image's (default ``request.seed``),
    ``width``/``height`` the size used (default the request's), ``default_clip_skip`` the model family's (a clip
    skip equal to it is left out, as A1111 and Pipeline.generate do). ``vae``/``vae_hash``: a separate VAE file's
    base name and A1111 hash, written as "VAE hash" and "VAE" after "Model" (None: the model's own VAE, nothing).

    The request's ``loras`` (given outside the prompt: ``--lora``, the API field) are written into the prompt as
    ``<lora:name:te[:unet]>`` tags, as A1111 users have them, so that reading the infotext back applies them.
    Not recorded: init_image and mask (images), n_iter and attention_maps (they change no image), the mask options,
    resize_mode and styles; "Denoising strength" is ``strength`` unless hires fix is on (then
    ``hr_strength``, as in A1111), written for txt2img only when not the default. A one-sided size (width or
    height None) is recorded only when ``width`` and ``height`` are given. "Batch size" is written when above 1.
    """
    r = request
    extra: dict = {key: value for key, value in zip(VAE_KEYS, (vae_hash, vae)) if value}
    if r.batch_size > 1:
        extra["Batch size"] = r.batch_size
    extra.update(fast_options.infotext_pairs(r))  # NGMS, Skip Early CFG, Token merging ratio, DeepCache interval
    strength = r.strength if r.init_image is not None or r.strength != DEFAULTS["strength"] else None
    if r.enable_hr:
        strength = r.hr_strength
        extra.update(hires_parameters(r))
    prompt = r.prompt + "".join(
        f" <lora:{name}:{te:g}>" if te == unet else f" <lora:{name}:{te:g}:{unet:g}>" for name, te, unet in r.loras)
    return format_infotext(GenerationParameters(
        prompt=prompt, negative_prompt=r.negative_prompt, steps=r.steps, sampler=r.sampler, schedule=r.schedule,
        guidance=r.guidance, seed=r.seed if seed is None else seed, width=r.width if width is None else width,
        height=r.height if height is None else height, model=model, strength=strength,
        clip_skip=None if r.clip_skip == default_clip_skip else r.clip_skip, long_prompt=r.long_prompt,
        weighting=r.weighting, extra=extra))


def _from_text(name, key, text, convert):
    try:
        return convert(text)
    except ValueError:
        raise RequestError(name, text, f"infotext {key!r} is not a valid value") from None


def from_infotext(text: str, *, limits: Limits = LIMITS) -> GenerationRequest:
    """The request an infotext (ours or A1111's) describes; keys it does not give keep their defaults. Keys
    without a request field (Model, Model hash, Version, ...) are ignored: ``parse_infotext`` gives them.

    ``from_infotext(to_infotext(r)) == r`` for a request with no images, n_iter 1, no attention maps, default
    mask/resize/style/LoRA fields and, with hires fix on, the default strength, whose prompts the format can
    hold: lines (split on "\\n") without leading or trailing whitespace, none starting with "Negative prompt:",
    a prompt whose first line is empty only when it is all empty; hires prompts and upscaler that hold a comma,
    colon or newline or have no leading or trailing whitespace. Hires fields that change nothing come back as their
    defaults, as A1111 leaves them out: an ``hr_sampler``/``hr_schedule``/``hr_prompt``/``hr_negative_prompt``
    equal to the first pass's, ``hr_scale`` beside a resize."""
    return from_parameters(parse_infotext(text), limits=limits)


def from_parameters(p: GenerationParameters, *, limits: Limits = LIMITS) -> GenerationRequest:
    """The request a parsed infotext describes (see ``from_infotext``)."""
    values = {"prompt": p.prompt, "negative_prompt": p.negative_prompt, "long_prompt": p.long_prompt,
              "weighting": p.weighting}
    for name in ("steps", "sampler", "schedule", "guidance", "seed", "width", "height", "clip_skip"):
        if getattr(p, name) is not None:
            values[name] = getattr(p, name)
    if "Batch size" in p.extra:
        values["batch_size"] = _from_text("batch_size", "Batch size", p.extra["Batch size"], int)
    values.update(fast_options.from_infotext_extra(p.extra))
    hires = {}
    for name, (key, names, convert) in _HIRES.items():
        if key in p.extra:
            value = _from_text(name, key, p.extra[key], convert)
            if name == "hr_sampler":
                value = _sampler_and_schedule(value)[0]
            elif name == "hr_schedule":
                value = _SCHEDULE_BY_NAME.get(value, value)
            hires[name] = {display: ours for ours, display in names.items()}.get(value, value)
    if "Hires resize" in p.extra:
        size = _SIZE.match(p.extra["Hires resize"].strip())
        if size is None:
            raise RequestError("hr_resize_x", p.extra["Hires resize"], "infotext 'Hires resize' is not WxH")
        hires["hr_resize_x"], hires["hr_resize_y"] = int(size[1]), int(size[2])
    if hires:
        values.update(hires, enable_hr=True)
    if p.strength is not None:
        values["hr_strength" if hires else "strength"] = p.strength
    return GenerationRequest.create(limits, **values)
