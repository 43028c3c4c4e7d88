"""AUTOMATIC1111 API compatibility: request/response schemas and the one table from A1111 names to ours.

Field names, defaults and response shapes follow A1111's `modules/api/models.py` and `api.py` (v1.10), so clients
written for it (the `webuiapi` package, scripts posting JSON) work unchanged. Torch-free.

What we do not implement (hires fix, face restoration, scripts, subseeds, ...) is accepted and ignored; a field
that would have changed A1111's output is named in the response's `info["ignored_fields"]`, never dropped
silently.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import random
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import AllowInfNan, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from ..errors import ClipDiffusionError
from .settings import ServerSettings


class RequestError(ClipDiffusionError):
    """A request field with a bad value (HTTP 422). The message names the field and the value."""

    def __init__(self, field_name: str, value: Any, reason: str):
        self.field = field_name
        self.value = value
        shown = value if not isinstance(value, str) or len(value) <= 80 else value[:77] + "..."
        super().__init__(f"{field_name}={shown!r}: {reason}")


# -- samplers and schedulers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class A1111Sampler:
    name: str  # A1111 display name
    aliases: tuple[str, ...]
    engine: tuple[str, ...]  # our SAMPLERS keys that implement it, first present wins
    schedule: str | None = None  # legacy names such as "DPM++ 2M Karras" fix the schedule


# A1111 `sd_samplers_kdiffusion.samplers_k_diffusion` / `sd_samplers_timesteps` names and aliases.
A1111_SAMPLERS = (
    A1111Sampler("DPM++ 2M", ("k_dpmpp_2m",), ("dpmpp_2m",)),
    A1111Sampler("Euler a", ("k_euler_a", "k_euler_ancestral"), ("euler_ancestral", "euler_a")),
    A1111Sampler("Euler", ("k_euler",), ("euler",)),
    A1111Sampler("Heun", ("k_heun",), ("heun",)),
    A1111Sampler("DDIM", ("ddim",), ("ddim",)),
    # Before v1.9 the schedule was part of the sampler name; old clients still send these.
    A1111Sampler("DPM++ 2M Karras", ("k_dpmpp_2m_ka",), ("dpmpp_2m",), "karras"),
    A1111Sampler("Euler Karras", (), ("euler",), "karras"),
)


@dataclass(frozen=True)
class A1111Scheduler:
    name: str
    label: str
    engine: tuple[str, ...]
    default_rho: float = -1.0


# A1111 `sd_schedulers.schedulers`. "uniform" there is k-diffusion's DiscreteSchedule.get_sigmas (timesteps
# evenly spaced from the last to 0), which is the schedule our "normal" computes; A1111's "normal" spaces
# sigma_to_t(sigma_max)..sigma_to_t(sigma_min), the same end points.
A1111_SCHEDULERS = (
    A1111Scheduler("automatic", "Automatic", ()),
    A1111Scheduler("uniform", "Uniform", ("normal",)),
    A1111Scheduler("karras", "Karras", ("karras",), 7.0),
    A1111Scheduler("exponential", "Exponential", ("exponential",)),
    A1111Scheduler("sgm_uniform", "SGM Uniform", ("sgm_uniform",)),
    A1111Scheduler("simple", "Simple", ("simple",)),
    A1111Scheduler("normal", "Normal", ("normal",)),
    A1111Scheduler("ddim", "DDIM", ("ddim", "ddim_uniform")),
)

DEFAULT_SCHEDULE = "normal"


def _first_present(candidates, available):
    return next((c for c in candidates if c in available), None)


def sampler_items(available: tuple[str, ...]) -> list[dict]:
    """GET /sdapi/v1/samplers: the A1111 names we can run, then our own names not covered by one."""
    items, covered = [], set()
    for s in A1111_SAMPLERS:
        engine = _first_present(s.engine, available)
        if engine is not None:
            covered.add(engine)
            options = {"scheduler": s.schedule} if s.schedule else {}
            items.append({"name": s.name, "aliases": list(s.aliases) + [engine], "options": options})
    items += [{"name": name, "aliases": [], "options": {}} for name in available if name not in covered]
    return items


def scheduler_items(available: tuple[str, ...]) -> list[dict]:
    items = []
    for s in A1111_SCHEDULERS:
        if s.engine and _first_present(s.engine, available) is None:
            continue
        items.append({"name": s.name, "label": s.label, "aliases": None,
                      "default_rho": s.default_rho, "need_inner_model": False})
    return items


def resolve_sampler(name: str, available: tuple[str, ...], field_name: str = "sampler_name"):
    """An A1111 display name or alias, or one of our names -> (our sampler, schedule it implies or None)."""
    if name in available:
        return name, None
    for s in A1111_SAMPLERS:
        if name == s.name or name in s.aliases or name.lower() == s.name.lower():
            engine = _first_present(s.engine, available)
            if engine is not None:
                return engine, s.schedule
    names = [item["name"] for item in sampler_items(available)]
    raise RequestError(field_name, name, f"unknown sampler; available: {', '.join(names)}")


def resolve_schedule(name: str | None, available: tuple[str, ...], implied: str | None,
                     field_name: str = "scheduler") -> str:
    if name is None or name.lower() == "automatic":
        choice = implied or DEFAULT_SCHEDULE
        return choice if choice in available or not available else available[0]
    if name in available:
        return name
    for s in A1111_SCHEDULERS:
        if name in (s.name, s.label):
            engine = _first_present(s.engine, available)
            if engine is not None:
                return engine
    names = [item["name"] for item in scheduler_items(available)]
    raise RequestError(field_name, name, f"unknown scheduler; available: {', '.join(names)}")


def sampler_display_name(engine: str) -> str:
    for s in A1111_SAMPLERS:
        if s.schedule is None and engine in s.engine:
            return s.name
    return engine


# -- request schemas -----------------------------------------------------------------------------------------


class NonFinite(str):
    """A non-finite number from a request body, as its JSON literal ("NaN", "Infinity", "-Infinity"): encodable
    where the float is not, and told apart from a client's string by its type."""


def _json_literal(x: float) -> NonFinite:
    return NonFinite("NaN" if x != x else ("Infinity" if x > 0 else "-Infinity"))


def json_safe(data: Any) -> Any:
    """`data` with every non-finite float (JSON's NaN/Infinity literals, or 1e999, which Python's parser accepts)
    replaced by a `NonFinite` string, nested containers in place. A non-finite float must not reach a validation
    error or a response: their JSON encoding refuses it (a 500 instead of the 422)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else _json_literal(data)
    stack = [data] if isinstance(data, (dict, list)) else []
    while stack:  # iterative: JSON nesting may be as deep as the parser allows
        container = stack.pop()
        pairs = container.items() if isinstance(container, dict) else enumerate(container)
        for key, value in pairs:
            if isinstance(value, float):
                if not math.isfinite(value):
                    container[key] = _json_literal(value)  # replaces a value: the dict's size does not change
            elif isinstance(value, (dict, list)):
                stack.append(value)
    return data


def _number(value: Any) -> Any:
    # JSON true/false are not numbers: pydantic's lax mode would read true as 1 (one step, seed 1).
    if isinstance(value, bool):
        raise ValueError(f"must be a number, not {str(value).lower()}")
    if isinstance(value, NonFinite):
        raise ValueError(f"must be a finite number, not {value}")
    return value


def _text(value: Any) -> Any:
    if isinstance(value, NonFinite):
        raise ValueError(f"must be a string, not the number {value}")
    return value


# Request field types. Integers: JSON integers, integral floats (20.0, as pydantic and A1111 take them) and
# numeric strings; never booleans. Numbers: also never NaN or +-Infinity (literal, 1e999, or as a string).
# Text: a string, never a non-finite number turned into one by `json_safe`.
Int = Annotated[int, BeforeValidator(_number)]
Number = Annotated[float, BeforeValidator(_number), AllowInfNan(False)]
Text = Annotated[str, BeforeValidator(_text)]


class JSONRequest(BaseModel):
    """Base of every request body: non-finite floats become `NonFinite` strings before validation, so that a
    field refuses them with a 422 naming it, and nothing echoes them back unencodable. Declare fields with the
    `Int`, `Number` and `Text` types."""

    @model_validator(mode="before")
    @classmethod
    def _finite_json(cls, data):
        data = json_safe(data)
        # a bare NaN body: a plain str, since pydantic would read attributes off an object of another type
        return str(data) if isinstance(data, NonFinite) else data


class Txt2ImgRequest(JSONRequest):
    """POST /sdapi/v1/txt2img. Unknown fields are accepted (A1111 has many we do not implement)."""

    model_config = ConfigDict(extra="allow")

    prompt: Text = ""
    negative_prompt: Text = ""
    seed: Int = Field(-1, description="-1 picks a random seed; the seed used is returned in info")
    sampler_name: Text | None = Field(None, description='A1111 name ("Euler a", "DPM++ 2M", ...) or ours')
    sampler_index: Text | None = Field(None, description="deprecated alias of sampler_name")
    scheduler: Text | None = Field(None, description='"automatic", "karras", "normal", ...')
    steps: Int = 50
    cfg_scale: Number = 7.0
    width: Int = 512
    height: Int = 512
    batch_size: Int = 1
    n_iter: Int = 1
    override_settings: dict[str, Any] | None = Field(
        None, description="sd_model_checkpoint and CLIP_stop_at_last_layers are honoured")
    override_settings_restore_afterwards: bool = True
    send_images: bool = True
    save_images: bool = False

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data):
        # A1111 declares every field Optional, and clients send null for "not set": take our default instead.
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[Text] | None = Field(None, description="base64 images (data: URLs accepted)")
    denoising_strength: Number = 0.75
    include_init_images: bool = False
    resize_mode: Int = 0


class PNGInfoRequest(JSONRequest):
    image: Text = Field(description="base64 PNG (a data: URL is accepted)")


# A1111 fields we accept but do not act on, with the values at which ignoring them changes nothing.
NEUTRAL_FIELDS: dict[str, tuple] = {
    "enable_hr": (False, None), "restore_faces": (False, None), "tiling": (False, None),
    "subseed_strength": (0, 0.0, None), "styles": ([], None), "script_name": (None, ""),
    "script_args": ([], None), "alwayson_scripts": ({}, None), "refiner_checkpoint": (None, ""),
    "mask": (None, ""), "image_cfg_scale": (None, 1.5), "initial_noise_multiplier": (None, 1, 1.0),
    "eta": (None, 0, 0.0, 1, 1.0), "s_churn": (None, 0, 0.0), "s_tmin": (None, 0, 0.0),
    "s_tmax": (None, 0, 0.0, math.inf, "Infinity"), "s_noise": (None, 1, 1.0), "seed_resize_from_h": (None, 0, -1),
    "seed_resize_from_w": (None, 0, -1), "hr_scale": None, "hr_upscaler": None, "hr_second_pass_steps": None,
    "hr_resize_x": None, "hr_resize_y": None, "hr_checkpoint_name": None, "hr_sampler_name": None,
    "hr_scheduler": None, "hr_prompt": None, "hr_negative_prompt": None, "firstphase_width": None,
    "firstphase_height": None, "subseed": None, "do_not_save_samples": None, "do_not_save_grid": None,
    "force_task_id": None, "infotext": None, "comments": None, "disable_extra_networks": None,
    "refiner_switch_at": None, "mask_blur": None, "inpainting_fill": None, "inpaint_full_res": None,
    "inpaint_full_res_padding": None, "inpainting_mask_invert": None, "mask_round": None,
    "latent_mask": None, "sampler_noise_scheduler_override": None, "controlnet_units": None,
    "denoising_strength": None,  # txt2img: only used by hires fix
}
# None above: only meaningful together with a neutral-valued switch (hr_* with enable_hr), or housekeeping.


def ignored_fields(req: BaseModel) -> list[str]:
    """Names of supplied fields we did not honour and whose value could have changed A1111's output."""
    ignored = []
    for name, value in (req.model_extra or {}).items():
        neutral = NEUTRAL_FIELDS.get(name, ())
        if name in NEUTRAL_FIELDS and (neutral is None or value in neutral):
            continue
        ignored.append(name)
    if req.save_images:
        ignored.append("save_images")
    if isinstance(req, Img2ImgRequest):
        if req.resize_mode not in (0, None):
            ignored.append("resize_mode")
        if req.init_images and len(req.init_images) > 1:
            ignored.append("init_images[1:]")
    return sorted(ignored)


# -- images --------------------------------------------------------------------------------------------------


# Formats accepted as uploads: what A1111 clients send. PIL's other plugins are not offered to strangers.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # a JPEG may open as MPO, its multi-picture form
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
# All text chunks of one image together, decompressed: an A1111 infotext is a few KB; a zTXt of a few KB can
# inflate to gigabytes.
MAX_PNG_TEXT_BYTES = 1 << 20


def _b64_payload(text: Any, field_name: str) -> bytes:
    """A base64 image (optionally a data: URL) -> its bytes, or RequestError naming the field. URLs are refused:
    the server never fetches on a client's behalf."""
    if not isinstance(text, str) or not text:
        raise RequestError(field_name, text, "expected a base64-encoded image")
    payload = text.strip()
    if payload.startswith("data:"):
        header, sep, payload = payload.partition(",")
        if not sep or ";base64" not in header:
            raise RequestError(field_name, text, "expected a data:image/...;base64, URL")
    elif payload.startswith(("http://", "https://")):
        raise RequestError(field_name, text, "URLs are not fetched; send the image as base64")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(field_name, text, "not valid base64") from None


def _png_chunks(raw: bytes):
    """(type, data start, data end) of each complete chunk of a PNG, up to IEND; no chunk is decompressed.
    Stops at a truncated chunk (what is there is read, as PIL reads a PNG's text chunks)."""
    pos, size = len(PNG_SIGNATURE), len(raw)
    while pos + 12 <= size:
        length, kind = struct.unpack_from(">I4s", raw, pos)
        start, end = pos + 8, pos + 8 + length
        if end + 4 > size:
            return
        yield kind, start, end
        if kind == b"IEND":
            return
        pos = end + 4


def declared_size(raw: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG or WebP header, None for other formats. Read before PIL opens the image:
    libwebp allocates the whole canvas when PIL opens a WebP, before any size check of ours could run."""
    if raw.startswith(PNG_SIGNATURE) and raw[12:16] == b"IHDR" and len(raw) >= 24:
        return struct.unpack_from(">II", raw, 16)
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP" and len(raw) >= 30:
        kind = raw[12:16]
        if kind == b"VP8X":
            return 1 + int.from_bytes(raw[24:27], "little"), 1 + int.from_bytes(raw[27:30], "little")
        if kind == b"VP8L" and raw[20] == 0x2F:
            bits = int.from_bytes(raw[21:25], "little")
            return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
        if kind == b"VP8 " and raw[23:26] == b"\x9d\x01\x2a":
            return (int.from_bytes(raw[26:28], "little") & 0x3FFF, int.from_bytes(raw[28:30], "little") & 0x3FFF)
    return None


def _without_png_text(raw: bytes) -> bytes:
    """The PNG minus its text chunks, so that opening it for the pixels inflates no zTXt/iTXt (PIL would hold up
    to 64 MB of decompressed text per image)."""
    if not raw.startswith(PNG_SIGNATURE):
        return raw
    spans = [(start - 8, end + 4) for kind, start, end in _png_chunks(raw) if kind in PNG_TEXT_CHUNKS]
    if not spans:
        return raw
    parts, pos = [], 0
    for a, b in spans:
        parts.append(raw[pos:a])
        pos = b
    parts.append(raw[pos:])
    return b"".join(parts)


def _open_image(raw: bytes, field_name: str, text: Any, max_pixels: int | None):
    """PIL image for `raw`, header read, no pixel decoded; its declared size checked against `max_pixels`
    (None: not checked, the pixels will not be decoded) before PIL allocates anything for it."""
    from PIL import Image

    def check(width, height):
        if max_pixels is not None and width * height > max_pixels:
            raise RequestError(field_name, f"{width}x{height} image", f"larger than {max_pixels} pixels")

    size = declared_size(raw)
    if size is not None:
        check(*size)
    Image.init()
    formats = [name for name in IMAGE_FORMATS if name in Image.OPEN]  # as this PIL was built
    try:
        image = Image.open(io.BytesIO(raw), formats=formats)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RequestError(field_name, text, f"larger than {max_pixels} pixels ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise RequestError(field_name, text, f"not a readable image ({type(exc).__name__})") from None
    check(*image.size)
    return image


def decode_image(text: Any, field_name: str, max_pixels: int, *, load: bool = True):
    """A base64 image (optionally a data: URL) -> RGB PIL image, or RequestError naming the field. The declared
    size is checked before any pixel is decoded. `load=False` validates the header only (returns None)."""
    from PIL import Image

    raw = _without_png_text(_b64_payload(text, field_name))
    image = _open_image(raw, field_name, text, max_pixels)
    if not load:
        return None
    try:
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, MemoryError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise RequestError(field_name, text, f"not a readable image ({type(exc).__name__})") from None


def _inflate(data: bytes, budget: int, field_name: str, key: str) -> bytes:
    """zlib data -> at most `budget` bytes; more is a RequestError (a decompression bomb), never allocated."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, budget + 1)
    except zlib.error:
        raise RequestError(field_name, f"text chunk {key!r}", "is not valid zlib data") from None
    if len(out) > budget:
        raise RequestError(field_name, f"text chunk {key!r}",
                           f"the PNG's text chunks decompress to more than {MAX_PNG_TEXT_BYTES} bytes")
    return out


def png_text(raw: bytes, field_name: str = "image", limit: int = MAX_PNG_TEXT_BYTES) -> dict[str, str]:
    """The text chunks (tEXt, zTXt, iTXt) of a PNG, read as PIL's `info` reads them (a later chunk with the same
    keyword wins, chunks with a bad CRC or undecodable text are skipped) but without decoding pixel data, and with
    all text together inflated to at most `limit` bytes (more: RequestError naming `field_name`)."""
    items: dict[str, str] = {}
    budget = limit
    for kind, start, end in _png_chunks(raw):
        if kind not in PNG_TEXT_CHUNKS:
            continue  # IDAT and the rest are skipped over, never inflated
        data = raw[start:end]
        if zlib.crc32(kind + data) != struct.unpack_from(">I", raw, end)[0]:
            continue
        key, sep, rest = data.partition(b"\0")
        if not sep or not 1 <= len(key) <= 79:
            continue
        name = key.decode("latin-1")
        if kind == b"tEXt":
            value = rest
        elif kind == b"zTXt":
            if rest[:1] != b"\0":
                continue  # compression method 0 (zlib) is the only one defined
            value = _inflate(rest[1:], budget, field_name, name)
        else:  # iTXt: flag, method, language\0, translated keyword\0, text (UTF-8)
            if len(rest) < 2:
                continue
            compressed, method = rest[0], rest[1]
            lang, sep1, rest = rest[2:].partition(b"\0")
            translated, sep2, value = rest.partition(b"\0")
            if not (sep1 and sep2):
                continue
            if compressed:
                if method != 0:
                    continue
                value = _inflate(value, budget, field_name, name)
        if len(value) > budget:
            raise RequestError(field_name, f"text chunk {name!r}",
                               f"the PNG's text chunks hold more than {limit} bytes")
        budget -= len(value)
        try:
            items[name] = value.decode("utf-8" if kind == b"iTXt" else "latin-1")
        except UnicodeDecodeError:
            continue
    return items


def read_png_text(image_b64: str, max_pixels: int | None = None) -> tuple[str, dict]:
    """(parameters text, other text chunks) from an image, as A1111's png-info reads them, without decoding its
    pixels: a PNG's text chunks are read by `png_text` (bounded inflation); other formats are opened by PIL for
    their header only (WebP not at all). `max_pixels` is accepted for compatibility and not used: nothing is
    decoded."""
    raw = _b64_payload(image_b64, "image")
    if raw.startswith(PNG_SIGNATURE):
        if raw[12:16] != b"IHDR":
            raise RequestError("image", image_b64, "not a readable image (a PNG must start with IHDR)")
        items = png_text(raw, "image")
    elif raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        items = {}  # PIL reports no text for WebP, and opening one makes libwebp allocate the whole canvas
    else:
        image = _open_image(raw, "image", image_b64, None)
        items = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
    return items.pop("parameters", ""), items


def encode_png(image, parameters: str | None) -> str:
    """PIL image -> base64 PNG with the A1111 'parameters' text chunk (what png-info reads back)."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    text = parameters or image.info.get("parameters")
    if text:
        info.add_text("parameters", text)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# -- request -> engine call ----------------------------------------------------------------------------------


@dataclass
class GenerationPlan:
    """A validated generation: the keyword arguments for `Pipeline.generate` minus seed and the callbacks."""

    model: str
    kwargs: dict
    seed: int
    n_iter: int
    sampler_label: str
    schedule: str
    init_image: Any = None
    strength: float | None = None
    ignored: list[str] = field(default_factory=list)
    # A1111 semantics for CLIP_stop_at_last_layers: it applies to SD1-style models only; A1111 ignores the
    # slider on SD2 (always penultimate) and SDXL (unless its sdxl_clip_l_skip option), so we use the family default.
    a1111_clip_skip: bool = False
    job_timestamp: str = field(default_factory=lambda: time.strftime("%Y%m%d%H%M%S"))


def check_int(name: str, value: Any, low: int, high: int) -> int:
    """`value` as an int in [low, high], or RequestError naming `name`. As the request schemas: an integral float
    (2.0) is taken, a boolean is not."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(name, value, f"must be an integer in [{low}, {high}]")
    return value


def check_size(name: str, value: Any, high: int) -> int:
    check_int(name, value, 8, high)
    if value % 8:
        raise RequestError(name, value, "must be a multiple of 8 (the VAE downsamples by 8)")
    return value


def check_prompt(name: str, value: str, settings: ServerSettings) -> str:
    if len(value) > settings.max_prompt_chars:
        raise RequestError(name, value, f"longer than {settings.max_prompt_chars} characters")
    return value


def resolve_seed(seed: int, name: str = "seed") -> int:
    if seed == -1:
        return random.randrange(2**32)
    if isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise RequestError(name, seed, "must be -1 (random) or in [0, 2**63)")
    return seed


def plan_a1111(req: Txt2ImgRequest, settings: ServerSettings, defaults: dict, samplers: tuple[str, ...],
               schedules: tuple[str, ...]) -> GenerationPlan:
    """Validate an A1111 request against our limits and translate it. `defaults` carries the server options
    (`sd_model_checkpoint`, `CLIP_stop_at_last_layers`) that override_settings may replace."""
    overrides = dict(req.override_settings or {})
    model = overrides.pop("sd_model_checkpoint", None) or defaults["sd_model_checkpoint"]
    entry = settings.model(str(model))
    if entry is None:
        raise RequestError("override_settings.sd_model_checkpoint", model,
                           f"not a listed model; available: {', '.join(m.name for m in settings.models)}")
    clip_skip = overrides.pop("CLIP_stop_at_last_layers", defaults["CLIP_stop_at_last_layers"])
    clip_skip = check_int("override_settings.CLIP_stop_at_last_layers", clip_skip, 1, 12)
    check_prompt("prompt", req.prompt, settings)
    check_prompt("negative_prompt", req.negative_prompt, settings)
    check_int("steps", req.steps, 1, settings.max_steps)
    check_size("width", req.width, settings.max_width)
    check_size("height", req.height, settings.max_height)
    check_int("batch_size", req.batch_size, 1, settings.max_batch_size)
    check_int("n_iter", req.n_iter, 1, settings.max_n_iter)
    if not math.isfinite(req.cfg_scale) or not 0.0 <= req.cfg_scale <= 100.0:
        raise RequestError("cfg_scale", req.cfg_scale, "must be a finite number in [0, 100]")
    field_name = "sampler_name" if req.sampler_name else "sampler_index"
    sampler, implied = resolve_sampler(req.sampler_name or req.sampler_index or "Euler", samplers, field_name)
    schedule = resolve_schedule(req.scheduler, schedules, implied)
    seed = resolve_seed(req.seed)

    ignored = ignored_fields(req) + [f"override_settings.{k}" for k in sorted(overrides)]
    plan = GenerationPlan(
        model=entry.name, seed=seed, n_iter=req.n_iter, sampler_label=sampler_display_name(sampler),
        schedule=schedule, ignored=ignored, a1111_clip_skip=True,
        kwargs=dict(prompt=req.prompt, negative_prompt=req.negative_prompt, steps=req.steps,
                    guidance=float(req.cfg_scale), sampler=sampler, schedule=schedule, width=req.width,
                    height=req.height, clip_skip=clip_skip, long_prompt="chunk", weighting="a1111",
                    batch_size=req.batch_size))
    if isinstance(req, Img2ImgRequest):
        if not req.init_images:
            raise RequestError("init_images", req.init_images, "img2img needs at least one init image")
        if len(req.init_images) > settings.max_batch_size:
            raise RequestError("init_images", f"{len(req.init_images)} images",
                               f"at most {settings.max_batch_size} (the batch size limit)")
        strength = req.denoising_strength
        if not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
            raise RequestError("denoising_strength", strength, "must be in (0, 1]")
        max_pixels = settings.max_width * settings.max_height
        image = decode_image(req.init_images[0], "init_images[0]", max_pixels)
        for i, extra in enumerate(req.init_images[1:], start=1):  # ignored (listed), so only their headers
            decode_image(extra, f"init_images[{i}]", max_pixels, load=False)
        plan.init_image = image.resize((req.width, req.height)) if image.size != (req.width, req.height) else image
        plan.strength = float(strength)
    return plan


def info_json(req: Txt2ImgRequest, plan: GenerationPlan, seeds: list[int], infotexts: list[str],
              interrupted: bool) -> str:
    """The `info` string of A1111's txt2img/img2img responses (`Processed.js()`), plus `ignored_fields`."""
    n = len(seeds)
    kw = plan.kwargs
    return json.dumps({
        "prompt": kw["prompt"], "all_prompts": [kw["prompt"]] * n,
        "negative_prompt": kw["negative_prompt"], "all_negative_prompts": [kw["negative_prompt"]] * n,
        "seed": seeds[0] if seeds else plan.seed, "all_seeds": seeds,
        "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0,
        "width": kw["width"], "height": kw["height"], "sampler_name": plan.sampler_label,
        "scheduler": plan.schedule, "cfg_scale": kw["guidance"], "steps": kw["steps"],
        "batch_size": kw["batch_size"], "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": plan.model, "sd_model_hash": None, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": plan.strength,
        "extra_generation_params": {"Schedule type": plan.schedule},
        "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
        "job_timestamp": plan.job_timestamp, "clip_skip": kw["clip_skip"],
        "is_using_inpainting_conditioning": False, "version": "clipdiffusion",
        "interrupted": interrupted, "ignored_fields": plan.ignored,
    })


def response_parameters(req: Txt2ImgRequest) -> dict:
    """The `parameters` of A1111's responses: the request as understood, init images left out by default."""
    params = req.model_dump()
    if isinstance(req, Img2ImgRequest) and not req.include_init_images:
        params["init_images"] = None
    return params


def parse_parameters(text: str) -> dict:
    """png-info's `parameters`: the infotext parsed into A1111's keys ("Prompt", "Steps", "Size-1", ...)."""
    from ..infotext import SAMPLER_NAMES, SCHEDULE_NAMES, parse_infotext

    if not text.strip():
        return {}
    try:
        p = parse_infotext(text)
    except ClipDiffusionError:
        return {"Prompt": text}
    out = {"Prompt": p.prompt, "Negative prompt": p.negative_prompt}
    pairs = [("Steps", p.steps), ("Sampler", SAMPLER_NAMES.get(p.sampler, p.sampler)),
             ("Schedule type", SCHEDULE_NAMES.get(p.schedule, p.schedule)), ("CFG scale", p.guidance),
             ("Seed", p.seed), ("Size-1", p.width), ("Size-2", p.height), ("Model", p.model),
             ("Clip skip", p.clip_skip), ("Denoising strength", p.strength)]
    out.update({k: v for k, v in pairs if v is not None})
    out.update(p.extra)
    return out
