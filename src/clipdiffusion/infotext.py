"""AUTOMATIC1111's generation-parameters text ("infotext"), as stored in a PNG's "parameters" text chunk.

    a red circle
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, Model: tiny, Clip skip: 2

The last line is a comma-separated list of ``Key: value`` pairs; a value that contains a comma, colon or newline is
written as a JSON string (A1111 ``generation_parameters_copypaste.quote``). Keys we do not know are kept in
``extra`` so a parsed text can be written back unchanged. Torch-free.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields

from .errors import ClipDiffusionError

# our sampler / schedule names (diffusion.samplers.SAMPLERS / SCHEDULES) -> A1111 display names
SAMPLER_NAMES = {"euler": "Euler", "euler_a": "Euler a", "heun": "Heun", "dpmpp_2m": "DPM++ 2M", "ddim": "DDIM"}
SCHEDULE_NAMES = {"normal": "Normal", "karras": "Karras", "ddim": "DDIM"}
_SAMPLER_BY_NAME = {v: k for k, v in SAMPLER_NAMES.items()}
# A1111's "Uniform" is k-diffusion's get_sigmas, the same timesteps as "Normal" (linspace from t_max to 0).
_SCHEDULE_BY_NAME = {**{v: k for k, v in SCHEDULE_NAMES.items()}, "Uniform": "normal"}

# A1111's pattern for one "Key: value" pair; a value is a JSON string or runs to the next comma.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")

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


def generate_kwargs(p: GenerationParameters) -> dict:
    """Keyword arguments for ``Pipeline.generate`` that reproduce ``p`` (fields the text did not give are left to
    generate's defaults; an img2img text still needs its init image)."""
    kwargs = {"prompt": p.prompt, "negative_prompt": p.negative_prompt, "long_prompt": p.long_prompt,
              "weighting": p.weighting}
    for name in ("steps", "sampler", "schedule", "guidance", "seed", "width", "height", "clip_skip", "strength"):
        value = getattr(p, name)
        if value is not None:
            kwargs[name] = value
    return kwargs


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
    if p.strength is not None:
        pairs.append(("Denoising strength", _number(p.strength)))
    if p.clip_skip is not None:
        pairs.append(("Clip skip", p.clip_skip))
    if p.long_prompt != _DEFAULT_LONG_PROMPT:
        pairs.append(("Long prompt", p.long_prompt))
    if p.weighting != _DEFAULT_WEIGHTING:
        pairs.append(("Weighting", p.weighting))
    pairs.extend(p.extra.items())
    lines = [p.prompt]
    if p.negative_prompt:
        lines.append(f"Negative prompt: {p.negative_prompt}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in pairs))
    return "\n".join(lines)


def _sampler_and_schedule(value: str) -> tuple[str, str | None]:
    """Sampler display name -> (our name or the raw name, schedule carried in the name by A1111 < 1.9)."""
    if value in _SAMPLER_BY_NAME:
        return _SAMPLER_BY_NAME[value], None
    for suffix, schedule in (("Karras", "karras"),):
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
