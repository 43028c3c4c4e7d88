"""AUTOMATIC1111 API compatibility: the A1111 request -> `GenerationRequest` adapter and A1111's response shapes.

The request bodies are in `schemas`, the sampler/scheduler name table in `sampler_names`, uploads and PNG text in
`images`. `plan_a1111` translates a body into a `GenerationRequest` checked against the server's limits; errors
name the field as the client sent it (`cfg_scale`, `denoising_strength`, `override_settings.CLIP_stop_at_last_layers`).
Fields we do not implement are accepted and named in the response's `info["ignored_fields"]`, never dropped
silently. Torch-free.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import ClipDiffusionError
from ..request import LIMITS, GenerationRequest, Limits, RequestError
from .images import decode_image, decode_mask
from .sampler_names import resolve_sampler, resolve_schedule, sampler_display_name
from .schemas import Img2ImgRequest, Txt2ImgRequest, ignored_fields
from .settings import ServerSettings

CLIP_SKIP_OPTION = "CLIP_stop_at_last_layers"
# The override_settings keys a request may set for itself; any other key is listed in info["ignored_fields"].
HONOURED_OVERRIDES = ("sd_model_checkpoint", CLIP_SKIP_OPTION, "sd_vae")
# our request field -> the A1111 body's name for it, for error messages
A1111_NAMES = {"guidance": "cfg_scale", "strength": "denoising_strength", "schedule": "scheduler",
               "clip_skip": f"override_settings.{CLIP_SKIP_OPTION}", "init_image": "init_images"}


@dataclass
class GenerationPlan:
    """A validated generation: the request (its seed resolved) for the listed model `model`, and what the response
    reports besides the images."""

    model: str
    request: GenerationRequest
    sampler_label: str  # the sampler as the client names it (A1111's display name on the A1111 routes)
    ignored: list[str] = field(default_factory=list)
    # what the engine reports it did not do (GenerationResult.notes: a prompt's <lora:...> tag not applied, ...)
    notes: list[str] = field(default_factory=list)
    # A1111 semantics for CLIP_stop_at_last_layers: it moves only the text encoders of families whose record says
    # so (families.ModelFamily.a1111_clip_skip, SD1-style); decided in the worker, where the model is known.
    a1111_clip_skip: bool = False
    # an unknown LoRA name: "error" (our routes) or "note" (A1111's: "Lora not found: NAME", generation goes on)
    missing_loras: str = "error"
    job_timestamp: str = field(default_factory=lambda: time.strftime("%Y%m%d%H%M%S"))
    # A1111's sd_vae for this request: override_settings.sd_vae, None = the server's option (vae_routes resolves it
    # to `vae_path`, None = the checkpoint's own VAE); the worker fills `vae_name`/`vae_hash` for info
    vae_choice: str | None = None
    vae_path: str | None = None
    vae_name: str | None = None
    vae_hash: str | None = None
    # the request's style names as sent (info["styles"]); the request's prompts have the known ones applied
    styles: list[str] = field(default_factory=list)
    # the field the clip skip came from, named in ignored_fields where the family ignores it
    clip_skip_field: str = f"override_settings.{CLIP_SKIP_OPTION}"
    # save_images honoured: the server writes the PNGs into its --save-dir (a1111_extra.save_pngs)
    save_images: bool = False


def _integral(value: Any) -> Any:
    """An integral float (2.0) as the int it is, as the request schemas take numbers; anything else unchanged."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


def clip_skip_option(value: Any, field_name: str = CLIP_SKIP_OPTION, limits: Limits = LIMITS) -> int:
    """A1111's `CLIP_stop_at_last_layers` (an option, or an override) as our clip skip: an integer in the request
    limits' range, checked by the request itself; RequestError naming `field_name` otherwise."""
    value = _integral(value)
    try:
        clip_skip = GenerationRequest.create(limits, clip_skip=value).clip_skip
    except RequestError as exc:
        raise exc.renamed({"clip_skip": field_name}) from None
    if clip_skip is None:
        raise RequestError(field_name, value, f"must be an integer in [1, {limits.max_clip_skip}]")
    return clip_skip


# hires fix: our request field -> the A1111 body's name for it
HIRES_NAMES = {"hr_strength": "denoising_strength", "hr_sampler": "hr_sampler_name", "hr_schedule": "hr_scheduler"}


def hires_values(req: Txt2ImgRequest, settings: ServerSettings, samplers: tuple[str, ...],
                 schedules: tuple[str, ...]) -> dict:
    """The GenerationRequest hires fields of an A1111 txt2img body with enable_hr (A1111 >= 1.0: the first pass
    is width x height; firstphase_width/height are not read). "Use same sampler"/"Use same scheduler" (what
    A1111's UI sends) and None mean the first pass's; "Automatic" is the hires sampler's own default schedule.
    Styles apply to a given hr_prompt/hr_negative_prompt as to the prompts."""
    hr_sampler, implied = None, None
    if req.hr_sampler_name not in (None, "", "Use same sampler"):
        hr_sampler, implied = resolve_sampler(req.hr_sampler_name, samplers, "hr_sampler_name")
    hr_schedule = None
    if req.hr_scheduler not in (None, "", "Use same scheduler"):
        hr_schedule = resolve_schedule(req.hr_scheduler, schedules, implied, "hr_scheduler")
    elif implied is not None:
        hr_schedule = resolve_schedule(None, schedules, implied, "hr_scheduler")  # "DPM++ 2M Karras"
    hr_prompt, hr_negative = req.hr_prompt, req.hr_negative_prompt
    if req.styles and (hr_prompt or hr_negative) and getattr(settings, "styles", None) is not None:
        styled_prompt, styled_negative, _ = settings.styles.apply(hr_prompt, hr_negative, req.styles)
        hr_prompt = styled_prompt if hr_prompt else ""
        hr_negative = styled_negative if hr_negative else ""
    values = dict(enable_hr=True, hr_scale=_integral(req.hr_scale), hr_upscaler=req.hr_upscaler,
                  hr_second_pass_steps=req.hr_second_pass_steps, hr_resize_x=req.hr_resize_x,
                  hr_resize_y=req.hr_resize_y, hr_prompt=hr_prompt, hr_negative_prompt=hr_negative,
                  hr_sampler=hr_sampler, hr_schedule=hr_schedule)
    if req.denoising_strength is not None:
        values["hr_strength"] = req.denoising_strength
    return values


# A1111 options (override_settings keys) that are request fields here (fast_options), by the same name;
# s_min_uncond is also a body field, which wins. deepcache_interval is ours (A1111 has no DeepCache): the server
# samples exactly, as A1111 does, unless a client asks for these.
FAST_OVERRIDES = {"s_min_uncond": "s_min_uncond", "s_min_uncond_all": "s_min_uncond_all",
                  "skip_early_cond": "skip_early_cond", "token_merging_ratio": "token_merging_ratio",
                  "deepcache_interval": "deepcache_interval"}


def fast_option_values(req, overrides: dict) -> tuple[dict, dict]:
    """({request field: value}, {request field: the client's name for errors}) from A1111's override_settings
    (popped from ``overrides``) and the body's ``s_min_uncond`` (A1111's processing field; when given it wins over
    the option, as ``p.s_min_uncond`` does). Values are checked by the request, under the client's name."""
    values, names = {}, {}
    for option, name in FAST_OVERRIDES.items():
        if option in overrides:
            values[name] = _integral(overrides.pop(option)) if name != "s_min_uncond_all" else overrides.pop(option)
            names[name] = f"override_settings.{option}"
    body = getattr(req, "s_min_uncond", None)
    if body is not None:
        values["s_min_uncond"], names["s_min_uncond"] = body, "s_min_uncond"
    return values, names


def plan_a1111(req: Txt2ImgRequest, settings: ServerSettings, defaults: dict, samplers: tuple[str, ...],
               schedules: tuple[str, ...]) -> GenerationPlan:
    """Translate an A1111 body into a request checked against `settings.limits`. `defaults` carries the server
    options (`sd_model_checkpoint`, `CLIP_stop_at_last_layers`) that override_settings may replace."""
    overrides = dict(req.override_settings or {})
    model = overrides.pop("sd_model_checkpoint", None) or defaults["sd_model_checkpoint"]
    entry = settings.model(str(model))
    if entry is None:
        raise RequestError("override_settings.sd_model_checkpoint", model,
                           f"not a listed model; available: {', '.join(m.name for m in settings.models)}")
    vae_choice = overrides.pop("sd_vae", None)  # resolved against the server's VAE files by vae_routes
    clip_skip_field, extra_ignored = f"override_settings.{CLIP_SKIP_OPTION}", []
    if CLIP_SKIP_OPTION in overrides:
        clip_skip = clip_skip_option(overrides.pop(CLIP_SKIP_OPTION), clip_skip_field, settings.limits)
        if req.clip_skip is not None and req.clip_skip != clip_skip:
            extra_ignored.append("clip_skip")  # the override wins, as in A1111, which reads only the setting
    elif req.clip_skip is not None:
        clip_skip_field = "clip_skip"
        clip_skip = clip_skip_option(req.clip_skip, clip_skip_field, settings.limits)
    else:
        clip_skip = clip_skip_option(defaults[CLIP_SKIP_OPTION], clip_skip_field, settings.limits)
    prompt, negative_prompt, notes = req.prompt, req.negative_prompt, []
    if req.styles:
        unknown = settings.styles.check_names(req.styles)  # at most MAX_REQUEST_STYLES names
        prompt, negative_prompt, _ = settings.styles.apply(prompt, negative_prompt, req.styles)
        extra_ignored += [f"styles[{i}]" for i, _ in unknown]
        notes += [f"Style not found: {name}" for _, name in unknown]
    sampler_field = "sampler_name" if req.sampler_name else "sampler_index"
    sampler, implied = resolve_sampler(req.sampler_name or req.sampler_index or "Euler", samplers, sampler_field)
    schedule = resolve_schedule(req.scheduler, schedules, implied)
    img2img = isinstance(req, Img2ImgRequest)
    values = dict(prompt=prompt, negative_prompt=negative_prompt, steps=req.steps, guidance=req.cfg_scale,
                  seed=req.seed, sampler=sampler, schedule=schedule, width=req.width, height=req.height,
                  clip_skip=clip_skip, batch_size=req.batch_size, n_iter=req.n_iter)
    if img2img:
        values["strength"] = req.denoising_strength
        if req.enable_hr:
            extra_ignored.append("enable_hr")  # A1111's img2img has no hires fix
    elif req.enable_hr:
        values.update(hires_values(req, settings, samplers, schedules))
        if (req.model_extra or {}).get("hr_checkpoint_name") not in (None, "", "Use same checkpoint"):
            extra_ignored.append("hr_checkpoint_name")
    names = {**A1111_NAMES, **HIRES_NAMES, "sampler": sampler_field, "clip_skip": clip_skip_field}
    fast, fast_names = fast_option_values(req, overrides)  # NGMS, Skip Early CFG, token merging
    values.update(fast)
    names = {**names, **fast_names}
    try:
        request = GenerationRequest.create(settings.limits, **values)
        if img2img:
            request = request.replace(limits=settings.limits, **img2img_values(req, settings.limits))
    except RequestError as exc:
        raise exc.renamed(names) from None
    can_save = settings.save_dir is not None
    ignored = sorted(ignored_fields(req, can_save=can_save) + extra_ignored) + [
        f"override_settings.{k}" for k in sorted(overrides)]
    return GenerationPlan(model=entry.name, request=request.resolve_seed(), sampler_label=sampler_display_name(sampler),
                          ignored=ignored, notes=notes, a1111_clip_skip=True, missing_loras="note",
                          styles=list(req.styles or ()), clip_skip_field=clip_skip_field,
                          save_images=bool(req.save_images and can_save), vae_choice=vae_choice)


def img2img_values(req: Img2ImgRequest, limits: Limits) -> dict:
    """The request fields of an img2img body: the init image, the mask (decoded with its alpha) and the mask
    options, ``resize_mode``. ``mask_blur``, when sent, sets both directions (A1111's property); otherwise
    ``mask_blur_x``/``mask_blur_y``. Option values are checked by the request (errors name the A1111 field)."""
    values = dict(init_image=_init_image(req, limits), resize_mode=req.resize_mode)
    if req.mask not in (None, ""):
        values["mask"] = decode_mask(req.mask, "mask", limits.max_width * limits.max_height)
    blur_x, blur_y = (req.mask_blur, req.mask_blur) if req.mask_blur is not None else (req.mask_blur_x,
                                                                                       req.mask_blur_y)
    values.update(mask_blur=req.mask_blur if req.mask_blur is not None else max(blur_x, blur_y, 0),
                  mask_blur_x=blur_x, mask_blur_y=blur_y, inpainting_fill=req.inpainting_fill,
                  inpaint_full_res=req.inpaint_full_res, inpaint_full_res_padding=req.inpaint_full_res_padding,
                  inpainting_mask_invert=req.inpainting_mask_invert)
    return values


def _init_image(req: Img2ImgRequest, limits: Limits):
    """The first init image, decoded at its own size (the engine fits it to width x height by ``resize_mode``, or
    crops the masked area for ``inpaint_full_res``); the others (listed as ignored) are checked from their headers
    only."""
    if not req.init_images:
        raise RequestError("init_images", req.init_images, "img2img needs at least one init image")
    if len(req.init_images) > limits.max_batch_size:
        raise RequestError("init_images", f"{len(req.init_images)} images",
                           f"at most {limits.max_batch_size} (the batch size limit)")
    max_pixels = limits.max_width * limits.max_height
    image = decode_image(req.init_images[0], "init_images[0]", max_pixels)
    for i, extra in enumerate(req.init_images[1:], start=1):
        decode_image(extra, f"init_images[{i}]", max_pixels, load=False)
    return image


def info_json(req: Txt2ImgRequest, plan: GenerationPlan, seeds: list[int], infotexts: list[str],
              interrupted: bool) -> str:
    """The `info` string of A1111's txt2img/img2img responses (`Processed.js()`), plus `ignored_fields`, and the
    engine's notes twice: as A1111's `comments` text (one line each, where A1111 puts "Lora not found: ...") and as
    our `notes` list. Neither goes into the infotext, which keeps the prompt verbatim."""
    n = len(seeds)
    r = plan.request
    return json.dumps({
        "prompt": req.prompt, "all_prompts": [r.prompt] * n,  # as A1111: the prompt as sent, the styled ones
        "negative_prompt": req.negative_prompt, "all_negative_prompts": [r.negative_prompt] * n,
        "seed": seeds[0] if seeds else r.seed, "all_seeds": seeds,
        "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0,
        "width": r.width, "height": r.height, "sampler_name": plan.sampler_label,
        "scheduler": r.schedule, "cfg_scale": r.guidance, "steps": r.steps,
        "batch_size": r.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": plan.model, "sd_model_hash": None, "sd_vae_name": plan.vae_name,
        "sd_vae_hash": plan.vae_hash,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": r.strength if r.init_image is not None else (r.hr_strength if r.enable_hr else None),
        "extra_generation_params": {"Schedule type": r.schedule, **_hires_info(r)},
        "index_of_first_image": 0, "infotexts": infotexts, "styles": plan.styles,
        "job_timestamp": plan.job_timestamp, "clip_skip": r.clip_skip,
        "is_using_inpainting_conditioning": False, "version": "clipdiffusion",
        "interrupted": interrupted, "ignored_fields": plan.ignored,
        "comments": "".join(f"{note}\n" for note in plan.notes), "notes": plan.notes,
    })


def _hires_info(r: GenerationRequest) -> dict:
    """A1111's extra_generation_params for hires fix: "Denoising strength" and the "Hires ..." keys."""
    if not r.enable_hr:
        return {}
    from ..infotext import hires_parameters

    return {"Denoising strength": r.hr_strength, **hires_parameters(r)}


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
