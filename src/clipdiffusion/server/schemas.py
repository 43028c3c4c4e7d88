"""Request bodies of the A1111 routes (and the base of every request body): field names, defaults and types as
A1111's `modules/api/models.py` (v1.10) declares them, so clients written for it (the `webuiapi` package, scripts
posting JSON) work unchanged. Torch-free.

These schemas only type-check; the values are checked once, by `request.GenerationRequest`, after the A1111
adapter (`a1111.plan_a1111`) has translated them. What we do not implement (hires fix, face restoration, scripts,
subseeds, ...) is accepted; a field that would have changed A1111's output is named by `ignored_fields`.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import AllowInfNan, BaseModel, BeforeValidator, ConfigDict, Field, model_validator


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
        None, description="sd_model_checkpoint and CLIP_stop_at_last_layers are honoured; others are listed in "
                          "info.ignored_fields")
    styles: list[Text] | None = Field(None, description="names of prompt styles (serve --styles-file), applied in "
                                                        "order; unknown names are listed in info")
    s_min_uncond: Number | None = Field(None, description="NGMS (negative guidance minimum sigma); wins over "
                                                           "override_settings.s_min_uncond")
    clip_skip: Int | None = Field(None, description="as override_settings.CLIP_stop_at_last_layers (A1111 >= 1.7, "
                                                    "SD.Next); the override wins when both are given")
    override_settings_restore_afterwards: bool = True
    send_images: bool = True
    save_images: bool = False
    # Hires fix (txt2img; A1111's img2img has no such fields, and ours lists enable_hr as ignored there).
    enable_hr: bool = False
    denoising_strength: Number | None = Field(None, description="txt2img: hires fix's second-pass strength "
                                                                "(None: 0.75)")
    hr_scale: Number = 2.0
    hr_upscaler: Text | None = Field(None, description='"Latent" (default), "Latent (antialiased)", "Latent '
                                                       '(bicubic)", ..., "None", "Lanczos", "Nearest"')
    hr_second_pass_steps: Int = 0
    hr_resize_x: Int = 0
    hr_resize_y: Int = 0
    hr_sampler_name: Text | None = None
    hr_scheduler: Text | None = None
    hr_prompt: Text = ""
    hr_negative_prompt: Text = ""

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
    resize_mode: Int = Field(0, description="0 just resize, 1 crop and resize, 2 resize and fill, 3 latent upscale")
    mask: Text | None = Field(None, description="base64 mask image, white = repaint (an alpha channel counts)")
    mask_blur: Int | None = Field(None, description="Gaussian sigma in pixels; sets mask_blur_x and mask_blur_y")
    mask_blur_x: Int = 4
    mask_blur_y: Int = 4
    inpainting_fill: Int = Field(0, description="0 fill, 1 original, 2 latent noise, 3 latent nothing")
    inpaint_full_res: bool = Field(True, description="inpaint only the masked area (plus padding), pasted back")
    inpaint_full_res_padding: Int = 0
    inpainting_mask_invert: Int = Field(0, description="1: repaint what the mask does not cover")


class PNGInfoRequest(JSONRequest):
    image: Text = Field(description="base64 PNG (a data: URL is accepted)")


# A1111 fields we accept but do not act on, with the values at which ignoring them changes nothing.
NEUTRAL_FIELDS: dict[str, tuple] = {
    "restore_faces": (False, None), "tiling": (False, None),
    "subseed_strength": (0, 0.0, None), "script_name": (None, ""),
    "script_args": ([], None), "alwayson_scripts": ({}, None), "refiner_checkpoint": (None, ""),
    "image_cfg_scale": (None, 1.5), "initial_noise_multiplier": (None, 1, 1.0),
    "eta": (None, 0, 0.0, 1, 1.0), "s_churn": (None, 0, 0.0), "s_tmin": (None, 0, 0.0),
    "s_tmax": (None, 0, 0.0, math.inf, "Infinity"), "s_noise": (None, 1, 1.0), "seed_resize_from_h": (None, 0, -1),
    "seed_resize_from_w": (None, 0, -1), "hr_checkpoint_name": None,  # a1111.plan_a1111 names it with enable_hr
    "firstphase_width": None,
    "firstphase_height": None, "subseed": None, "do_not_save_samples": None, "do_not_save_grid": None,
    "force_task_id": None, "infotext": None, "comments": None, "disable_extra_networks": (None, False),
    "s_min_uncond": (None, 0, 0.0), "firstpass_image": (None, ""), "hr_additional_modules": ([], None),
    "refiner_switch_at": None, "mask_round": (None, True),  # we always round the latent mask, as A1111's default
    "latent_mask": None, "sampler_noise_scheduler_override": None, "controlnet_units": None,
}
# None above: only meaningful together with a neutral-valued switch (hr_* with enable_hr), or housekeeping.


def ignored_fields(req: BaseModel, *, can_save: bool = False) -> list[str]:
    """Names of supplied fields we did not honour and whose value could have changed A1111's output (or, for
    `save_images`, what the server did: it is honoured only where the server has a save folder, `can_save`)."""
    ignored = []
    for name, value in (req.model_extra or {}).items():
        neutral = NEUTRAL_FIELDS.get(name, ())
        if name in NEUTRAL_FIELDS and (neutral is None or value in neutral):
            continue
        ignored.append(name)
    if req.save_images and not can_save:
        ignored.append("save_images")
    if isinstance(req, Img2ImgRequest):
        if req.init_images and len(req.init_images) > 1:
            ignored.append("init_images[1:]")
    return sorted(ignored)
