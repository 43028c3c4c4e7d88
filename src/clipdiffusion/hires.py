"""Hires fix, as A1111's txt2img does it (``StableDiffusionProcessingTxt2Img``, A1111 >= 1.0).

1. The first pass is an ordinary txt2img at ``width`` x ``height`` (its size stays the request's, as in A1111 >=
   1.0; the infotext's "Size" is this one).
2. The upscale to ``request.hires_size`` (``hr_scale``, or ``hr_resize_x``/``hr_resize_y`` with A1111's rules:
   one side given keeps the aspect ratio, both cover the box and the excess is cut off, half on each side):
   - a latent mode (``request.LATENT_UPSCALE_MODES``, the default "Latent" = bilinear) interpolates the first
     pass's final latents (``torch.nn.functional.interpolate`` with A1111's mode and antialias);
   - a pixel upscaler ("None", "Lanczos", "Nearest") resizes the decoded first-pass image (the very PIL image a
     txt2img returns) as A1111's ``images.resize_image(0, ...)`` does, and the second pass encodes it as img2img
     does.
3. The second pass is img2img from there: ``hr_prompt``/``hr_negative_prompt`` ("" = the first pass's),
   ``hr_sampler``/``hr_schedule`` (None = the first pass's), at ``hr_strength`` (A1111's ``denoising_strength``),
   running exactly ``N = hr_second_pass_steps or steps`` steps: the last N of a schedule of
   ``int(N / min(strength, 0.999))`` steps (A1111 ``setup_img2img_steps`` with steps given). Image i's noise (and
   for a pixel upscaler its VAE posterior sample first, in our img2img order) comes from a fresh generator seeded
   with its seed, as A1111 draws the second pass's noise from the same seeds.

So a pixel-upscaler hires fix equals ``generate(request at width x height)`` -> upscale that image ->
``generate(init_image=it, width/height = the target, steps=int(N / min(s, 0.999)), strength=s, seed=...)``
whenever our img2img runs N steps of that schedule (``int(steps * s) == N``), bit for bit; a latent mode equals the
same second pass started from the interpolated latents. Differences from A1111: a pixel upscale is resized to the
upscale size, then cut in pixels (A1111 cuts the encoded latents); the second pass's prompt-editing timeline is
that of an img2img of the schedule's steps (A1111 offsets it by the first pass's steps); ``<lora:...>`` tags of
``hr_prompt`` are not applied separately (the first prompt's LoRAs stay merged for both passes).

Torch is imported inside the functions; this module imports nothing from ``pipeline`` (which calls it).
"""

from __future__ import annotations

import dataclasses

from .errors import NonFiniteError
from .request import (DEFAULT_HR_UPSCALER, LATENT_UPSCALE_MODES, LIMITS, PIXEL_UPSCALERS, GenerationRequest,
                      RequestError, check_hires_size, hires_schedule_steps, hires_size)


@dataclasses.dataclass(frozen=True)
class HiresPlan:
    """What a hires-fix request does, in numbers: the upscaler, the upscale size (before the cut) and the target
    size (the second pass's), the second pass's steps run and the schedule they end."""

    upscaler: str
    upscale: tuple[int, int]
    target: tuple[int, int]
    steps: int
    schedule_steps: int

    @property
    def latent(self) -> bool:
        return self.upscaler in LATENT_UPSCALE_MODES


def plan(request: GenerationRequest, factor: int) -> HiresPlan:
    """The hires plan of a sized request (width and height set) for a model of latent factor ``factor``."""
    if request.width is None or request.height is None:
        raise RequestError("width", request.width, "hires fix needs the first pass's size")
    check_hires_size(request.width, request.height, request.hr_scale, request.hr_resize_x, request.hr_resize_y,
                     LIMITS, factor)
    up_x, up_y, x, y = hires_size(request.width, request.height, request.hr_scale, request.hr_resize_x,
                                  request.hr_resize_y, factor)
    steps = request.hr_second_pass_steps or request.steps
    return HiresPlan(request.hr_upscaler or DEFAULT_HR_UPSCALER, (up_x, up_y), (x, y), steps,
                     hires_schedule_steps(steps, request.hr_strength))


def first_pass_request(request: GenerationRequest) -> GenerationRequest:
    """The first pass: the request as a plain txt2img (no attention maps: those come from the second pass)."""
    return dataclasses.replace(request, enable_hr=False, attention_maps=False)


def second_pass_request(request: GenerationRequest, hires: HiresPlan) -> GenerationRequest:
    """The second pass as a txt2img-shaped request at the target size over the schedule's steps (its start is the
    upscaled first pass, given to ``Pipeline._generate`` as ``start``)."""
    return dataclasses.replace(
        request, enable_hr=False, prompt=request.hr_prompt or request.prompt,
        negative_prompt=request.hr_negative_prompt or request.negative_prompt, steps=hires.schedule_steps,
        sampler=request.hr_sampler or request.sampler, schedule=request.hr_schedule or request.schedule,
        width=hires.target[0], height=hires.target[1])


def upscale_latents(latents, upscaler: str, upscale: tuple[int, int], target: tuple[int, int], factor: int):
    """[B,C,h,w] first-pass latents -> [B,C,target_h/f,target_w/f]: A1111's interpolate to the upscale size in
    latent pixels with the mode's (mode, antialias), then the cut (half on each side, the odd one at the end)."""
    import torch.nn.functional as F

    mode, antialias = LATENT_UPSCALE_MODES[upscaler]
    size = (upscale[1] // factor, upscale[0] // factor)
    kwargs = {"antialias": True} if antialias else {}
    out = F.interpolate(latents.float(), size=size, mode=mode, **kwargs)
    cut_y, cut_x = size[0] - target[1] // factor, size[1] - target[0] // factor
    return out[:, :, cut_y // 2: size[0] - (cut_y + 1) // 2, cut_x // 2: size[1] - (cut_x + 1) // 2]


def upscale_image(image, upscaler: str, width: int, height: int):
    """A PIL image resized to ``width`` x ``height`` as A1111's ``images.resize_image(0, image, w, h,
    upscaler_name)`` does with its built-in upscalers: "None" is one Lanczos resize; "Lanczos"/"Nearest" upscale by
    ``scale = max(w / W, h / H)`` with their filter (``Upscaler.upscale``: to int(W * scale) x int(H * scale), then
    Lanczos to that size rounded down to 8), then Lanczos to the exact size when it differs."""
    from PIL import Image

    lanczos = Image.Resampling.LANCZOS
    if upscaler not in PIXEL_UPSCALERS:
        raise RequestError("hr_upscaler", upscaler, f"not a pixel upscaler; choose from {', '.join(PIXEL_UPSCALERS)}")
    if upscaler == "None":
        return image.resize((width, height), resample=lanczos)
    scale = max(width / image.width, height / image.height)
    if scale > 1.0:
        resample = lanczos if upscaler == "Lanczos" else Image.Resampling.NEAREST
        scaled = (int(image.width * scale), int(image.height * scale))
        dest = (int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8))
        image = image.resize(scaled, resample=resample)
        if image.size != dest:
            image = image.resize(dest, resample=lanczos)
    if image.size != (width, height):
        image = image.resize((width, height), resample=lanczos)
    return image


def crop_image(image, upscale: tuple[int, int], target: tuple[int, int], factor: int):
    """An upscaled image cut to the target size: A1111's latent cut, in pixels (whole latent pixels, half on each
    side; the remainder of a side that is not a multiple of ``factor`` is dropped at the end)."""
    cut_x = upscale[0] // factor - target[0] // factor
    cut_y = upscale[1] // factor - target[1] // factor
    left, top = cut_x // 2 * factor, cut_y // 2 * factor
    if (left, top) == (0, 0) and image.size == tuple(target):
        return image
    return image.crop((left, top, left + target[0], top + target[1]))


def _check_finite(stage, t):
    import torch

    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(stage, detail=f"{int(torch.isnan(t).sum())} NaN, {int(torch.isinf(t).sum())} Inf "
                                           f"of {t.numel()} values")


def generate(pipe, request: GenerationRequest, callback=None, should_stop=None):
    """One batch of a sized, seeded hires-fix request on ``pipe`` (a ``Pipeline``): the two passes. Returns the
    second pass's ``GenerationResult`` (the first pass's when it was interrupted), with the request's infotexts
    (first-pass "Size", the "Hires ..." keys). ``callback(step, total, x)`` counts both passes' steps."""
    import torch

    f = pipe.latent_factor
    hires = plan(request, f)
    config = pipe.unet.config
    if config.in_channels != config.out_channels:
        raise RequestError("enable_hr", True, f"hires fix needs a {config.out_channels}-channel UNet; this model's "
                                              f"takes {config.in_channels} channels (an inpainting model)")
    first_steps = request.steps
    total = first_steps + hires.steps

    def first_callback(step, _total, x):
        if callback is not None:
            callback(step, total, x)

    def second_callback(step, _total, x):
        if callback is not None:
            callback(first_steps + step, total, x)

    first = pipe._generate(first_pass_request(request), first_callback, should_stop)
    if first.interrupted or (should_stop is not None and should_stop()):
        return dataclasses.replace(first, interrupted=True, infotexts=pipe._infotexts(request, first.seeds))
    second_request = second_pass_request(request, hires)
    device = pipe._device()
    shape = (1, config.out_channels, hires.target[1] // f, hires.target[0] // f)

    if hires.latent:
        init = upscale_latents(first.latents, hires.upscaler, hires.upscale, hires.target, f).to(device)
        init_rows = None
    else:
        images = [crop_image(upscale_image(im, hires.upscaler, *hires.upscale), hires.upscale, hires.target, f)
                  for im in first.images]
        init_rows = [pipe._image_pixels(im, *hires.target) for im in images]  # each [1,3,H,W]

    def start(generators, sigmas):
        """The second pass's starting latents and sigmas: the last ``hires.steps`` steps of the schedule."""
        sigmas = sigmas[len(sigmas) - 1 - hires.steps:]
        rows = []
        for i, g in enumerate(generators):
            if init_rows is None:
                z = init[i:i + 1]
            else:  # our img2img: the posterior sample, then the noise, from the image's generator
                with torch.no_grad():
                    posterior = pipe.vae.encode(init_rows[i].to(device))
                z = posterior.sample(g).float() * pipe.vae.config.scale_factor
            rows.append(z + torch.randn(shape, generator=g).to(device) * sigmas[0])
        latents = torch.cat(rows)
        _check_finite("VAE encode" if init_rows is not None else "hires upscale", latents)
        return latents, sigmas

    second = pipe._generate(second_request, second_callback, should_stop, start=start)
    return dataclasses.replace(second, seeds=first.seeds, infotexts=pipe._infotexts(request, first.seeds))
