"""img2img's init image and inpainting mask, prepared as AUTOMATIC1111 prepares them (``processing.py``
``StableDiffusionProcessingImg2Img.init``, ``images.resize_image``, ``masking``), written from its behaviour.

The steps, for a request with ``init_image`` (and optionally ``mask``):

1. The mask becomes one grey channel (``binary_mask``: an RGBA mask with transparency gives its alpha, rounded at
   128; anything else its luminance), inverted when ``inpainting_mask_invert``, blurred by a Gaussian of sigma
   ``mask_blur_x`` across and ``mask_blur_y`` down with A1111's kernel rule ``2 * int(2.5 * sigma + 0.5) + 1``
   (``blur_mask``; OpenCV's reflect-101 border). A mask of another size than the init image is first resized to it.
   White = repaint.
2. ``inpaint_full_res`` ("only masked"): the mask's bounding box plus ``inpaint_full_res_padding`` pixels, widened to
   the request's aspect ratio (``crop_region``, ``expand_crop_region``), is cut out of image and mask and resized to
   width x height (``resize_image`` mode 2); the result is pasted back into the whole original at the end, so the
   output has the init image's size. A blank mask falls back to plain img2img (with a note), as A1111 does.
   Otherwise image and mask are resized to width x height by ``resize_mode`` (0 just resize, 1 crop and resize,
   2 resize and fill, 3 latent upscale: the image is encoded at its own size and the latents are resized).
3. ``inpainting_fill`` 0 "fill" replaces the masked pixels by blurred surrounding colours (``fill_masked``) before
   encoding; 1 "original" keeps them; 2 "latent noise" puts the seed's noise in the masked latents; 3 "latent
   nothing" zeroes them.
4. The latent mask is the mask resized to the latent grid and rounded to 0/1 (A1111's ``mask_round``). At every
   model call the denoised estimate outside the mask is replaced by the init latents (``MaskBlend``, A1111's
   ``apply_blend`` after denoising); for Euler-type steps this keeps the latents outside the mask at exactly
   "init latents + sigma * the start noise", i.e. the init latents noised to the current sigma. The final latents
   are blended once more, and after decoding the original pixels are composited back over everything the (blurred)
   mask does not cover (``composite``; the non-full-res overlay uses the mask doubled, as A1111 does).
5. A 9-channel inpainting UNet (latent 4 + mask 1 + masked-image latent 4, diffusers' channel order) is given the
   rounded mask at latent size (nearest) and the latents of the image with the masked pixels set to 0 in [-1, 1]
   (``conditioning_pixels``); txt2img, or img2img without a mask, on such a model gets a full mask and a grey image,
   as A1111's ``txt2img_image_conditioning`` / ``img2img_image_conditioning`` do.

PIL and numpy here; torch only inside the functions that make tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .request import RequestError

FILL_NAMES = ("fill", "original", "latent noise", "latent nothing")  # inpainting_fill 0..3, A1111's labels
RESIZE_NAMES = ("Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)")
INPAINT_CHANNELS_EXTRA = 5  # a 9-channel UNet: latent C + mask 1 + masked-image latent C (C = 4)


def is_inpainting_unet(unet_config) -> bool:
    """A UNet that takes the mask and masked-image latents beside the latents (in = 2 * out + 1: SD's 9)."""
    return unet_config.in_channels == 2 * unet_config.out_channels + 1


# -- masks ---------------------------------------------------------------------------------------------------


def binary_mask(mask, round_alpha: bool = True):
    """One grey channel of a mask (A1111 ``create_binary_mask``): an RGBA mask whose alpha is not all opaque gives
    its alpha (rounded to 0/255 at 128 when ``round_alpha``), any other mask its luminance."""
    if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
        rgba = mask.convert("RGBA")
        alpha = rgba.getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha.point(lambda v: 255 if v > 128 else 0) if round_alpha else alpha
        return rgba.convert("L")
    return mask.convert("L")


def kernel_size(sigma: float) -> int:
    """A1111's Gaussian kernel size for a mask blur of ``sigma`` pixels."""
    return 2 * int(2.5 * sigma + 0.5) + 1


def _gaussian(sigma: float) -> np.ndarray:
    size = kernel_size(sigma)
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return k / k.sum()


def blur_mask(mask, blur_x: float, blur_y: float):
    """``mask`` (mode L) blurred by a Gaussian of sigma ``blur_x`` along rows and ``blur_y`` along columns, as
    A1111's two ``cv2.GaussianBlur`` calls (kernel ``kernel_size(sigma)``, reflect-101 border), in float and
    rounded back to 8 bits (OpenCV's fixed-point path can differ by one level)."""
    from PIL import Image

    if blur_x <= 0 and blur_y <= 0:
        return mask
    import torch
    import torch.nn.functional as F

    a = np.asarray(mask.convert("L"), dtype=np.float64)
    for axis, sigma in ((1, blur_x), (0, blur_y)):
        if sigma <= 0:
            continue
        k = _gaussian(sigma)
        r = len(k) // 2
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        padded = np.pad(a, pad, mode="reflect") if a.shape[axis] > 1 else np.pad(a, pad, mode="edge")
        t = torch.from_numpy(padded)[None, None]
        w = torch.from_numpy(k).view(1, 1, 1, -1) if axis == 1 else torch.from_numpy(k).view(1, 1, -1, 1)
        a = F.conv2d(t, w)[0, 0].numpy()
    return Image.fromarray(np.clip(np.floor(a + 0.5), 0, 255).astype(np.uint8), "L")


def crop_region(mask, padding: int):
    """(x1, y1, x2, y2): the bounding box of the mask's non-zero pixels grown by ``padding`` on each side within
    the image (A1111 ``get_crop_region_v2``), or None for a blank mask."""
    box = mask.getbbox()
    if box is None:
        return None
    if not padding:
        return box
    x1, y1, x2, y2 = box
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, mask.width), min(y2 + padding, mask.height)


def expand_crop_region(region, width: int, height: int, image_width: int, image_height: int):
    """``region`` grown on its short side to the aspect ratio of width x height, kept inside the image (A1111
    ``masking.expand_crop_region``)."""
    x1, y1, x2, y2 = region
    if (x2 - x1) / (y2 - y1) > width / height:
        grow = int((x2 - x1) / (width / height) - (y2 - y1))
        y1, y2 = y1 - grow // 2, y2 + grow - grow // 2
        if y2 >= image_height:
            y1, y2 = y1 - (y2 - image_height), image_height
        if y1 < 0:
            y1, y2 = 0, y2 - y1
        y2 = min(y2, image_height)
    else:
        grow = int((y2 - y1) * (width / height) - (x2 - x1))
        x1, x2 = x1 - grow // 2, x2 + grow - grow // 2
        if x2 >= image_width:
            x1, x2 = x1 - (x2 - image_width), image_width
        if x1 < 0:
            x1, x2 = 0, x2 - x1
        x2 = min(x2, image_width)
    return x1, y1, x2, y2


# -- images --------------------------------------------------------------------------------------------------


def resize_image(mode: int, image, width: int, height: int):
    """A1111 ``images.resize_image`` (Lanczos, no upscaler model): 0 stretch to width x height; 1 scale to cover
    and crop the centre; 2 (and 3, for masks) scale to fit, centre, and fill the bars by stretching the edge rows
    or columns."""
    from PIL import Image

    lanczos = Image.Resampling.LANCZOS
    if mode == 0:
        return image.resize((width, height), resample=lanczos)
    ratio, src_ratio = width / height, image.width / image.height
    if mode == 1:
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width
    else:
        src_w = width if ratio < src_ratio else image.width * height // image.height
        src_h = height if ratio >= src_ratio else image.height * width // image.width
    src_w, src_h = max(src_w, 1), max(src_h, 1)
    resized = image.resize((src_w, src_h), resample=lanczos)
    out = Image.new(image.mode if image.mode in ("L", "RGB", "RGBA") else "RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode != 1:
        if ratio < src_ratio:
            fill = height // 2 - src_h // 2
            if fill > 0:
                out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
                out.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)),
                          box=(0, fill + src_h))
        elif ratio > src_ratio:
            fill = width // 2 - src_w // 2
            if fill > 0:
                out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
                out.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)),
                          box=(fill + src_w, 0))
    return out


def fill_masked(image, mask):
    """The masked area (white in ``mask``) filled with blurred colours of its surroundings (A1111
    ``masking.fill``): the unmasked pixels, blurred at radii 256, 64, 16, 4, 2 and 0, composited over each other."""
    from PIL import Image, ImageFilter, ImageOps

    out = Image.new("RGBA", image.size)
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


@dataclass
class InitImage:
    """An init image prepared for one generation: ``image`` (RGB) is what the VAE encodes (width x height, or the
    image's own size for latent upscale), ``mask`` (L, width x height, white = repaint) or None; what the final
    composite needs (``overlay``, ``paste_to``, ``size``); ``params`` for the infotext and ``notes``."""

    image: object
    mask: object = None
    fill: int = 1
    latent_upscale: bool = False
    overlay: object = None  # RGBA: the original with alpha = where it is kept
    paste_to: tuple | None = None  # (x, y, w, h) of the crop in the whole image (inpaint_full_res)
    size: tuple = (0, 0)  # the output size: width x height, or the init image's (inpaint_full_res)
    params: dict = field(default_factory=dict)
    notes: tuple = ()


def _blurs(request):
    bx = request.mask_blur if request.mask_blur_x is None else request.mask_blur_x
    by = request.mask_blur if request.mask_blur_y is None else request.mask_blur_y
    return bx, by


def prepare_init(request, width: int, height: int) -> InitImage:
    """The init image (and mask) of ``request`` prepared for a width x height generation (see the module doc)."""
    from PIL import Image, ImageOps

    r = request
    image = r.init_image.convert("RGB")
    if r.mask is None:
        if r.resize_mode == 3:
            return InitImage(image, latent_upscale=True, size=(width, height))
        resized = image if image.size == (width, height) and r.resize_mode == 0 else (
            image.resize((width, height), resample=Image.Resampling.BICUBIC) if r.resize_mode == 0
            else resize_image(r.resize_mode, image, width, height))
        return InitImage(resized, size=(width, height))
    params, notes = {}, []
    mask = binary_mask(r.mask)
    if mask.size != image.size:
        notes.append(f"mask: {mask.width}x{mask.height} resized to the init image's {image.width}x{image.height}")
        mask = mask.resize(image.size, resample=Image.Resampling.LANCZOS)
    if r.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
        params["Mask mode"] = "Inpaint not masked"
    blur_x, blur_y = _blurs(r)
    mask = blur_mask(mask, blur_x, blur_y)
    if blur_x > 0 or blur_y > 0:
        params["Mask blur"] = r.mask_blur if blur_x == blur_y else f"{blur_x}x{blur_y}"
    region = crop_region(mask, r.inpaint_full_res_padding) if r.inpaint_full_res else None
    if r.inpaint_full_res and region is None:
        notes.append('inpaint_full_res: the mask is blank, so "only masked" fell back to img2img of the whole image')
    if region is not None:
        x1, y1, x2, y2 = expand_crop_region(region, width, height, mask.width, mask.height)
        overlay_mask = mask
        work_mask = resize_image(2, mask.crop((x1, y1, x2, y2)), width, height)
        paste_to, size = (x1, y1, x2 - x1, y2 - y1), image.size
        base = image
        work = resize_image(2, image.crop((x1, y1, x2, y2)), width, height)
        params["Inpaint area"] = "Only masked"
        params["Masked area padding"] = r.inpaint_full_res_padding
    elif r.inpaint_full_res:  # blank mask: A1111 drops the mask and runs img2img
        plain = prepare_init(r.replace(mask=None), width, height)
        plain.params, plain.notes = params, tuple(notes)
        return plain
    else:
        work_mask = resize_image(r.resize_mode, mask, width, height)
        doubled = np.clip(np.asarray(work_mask, dtype=np.float32) * 2, 0, 255).astype(np.uint8)
        overlay_mask = Image.fromarray(doubled, "L")
        paste_to, size = None, (width, height)
        work = resize_image(r.resize_mode, image, width, height) if r.resize_mode != 3 else image
        base = work if r.resize_mode != 3 else resize_image(0, image, width, height)
    if overlay_mask.size != base.size:
        overlay_mask = resize_image(0, overlay_mask, base.width, base.height)
    overlay = Image.new("RGBa", base.size)
    overlay.paste(base.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(overlay_mask))
    if r.inpainting_fill == 0:
        work = fill_masked(work, work_mask if work.size == work_mask.size else
                           resize_image(0, work_mask, work.width, work.height))
    if r.inpainting_fill != 1:
        params["Masked content"] = FILL_NAMES[r.inpainting_fill]
    return InitImage(work, mask=work_mask, fill=r.inpainting_fill, latent_upscale=r.resize_mode == 3 and
                     paste_to is None, overlay=overlay.convert("RGBA"), paste_to=paste_to, size=size,
                     params=params, notes=tuple(notes))


def to_pixels(image):
    """PIL RGB -> [1,3,H,W] float32 in [-1, 1]."""
    import torch

    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 * 2.0 - 1.0)
    return pixels.permute(2, 0, 1)[None]


def latent_mask(mask, h: int, w: int):
    """[1,1,h,w] 0/1: 1 where the latents are repainted (A1111: the mask resized to the latent grid, bicubic, and
    rounded)."""
    import torch

    small = np.asarray(mask.convert("RGB").resize((w, h)), dtype=np.float32)[..., 0] / 255.0
    return torch.from_numpy(np.round(small))[None, None]


def conditioning_mask(mask, h: int, w: int):
    """[1,1,h,w] 0/1 for a 9-channel UNet: the mask rounded at full size, then nearest-resized to the latents
    (A1111 ``inpainting_image_conditioning``, diffusers ``prepare_mask_latents``)."""
    import torch
    import torch.nn.functional as F

    if isinstance(mask, torch.Tensor):  # [1,1,H,W], already 0/1 (conditioning_pixels)
        full = mask
    else:
        full = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)[None, None]
    return F.interpolate(torch.round(full), size=(h, w))


def conditioning_pixels(init: InitImage | None, width: int, height: int):
    """(masked image [1,3,H,W] in [-1,1], mask at full size [1,1,H,W]) for a 9-channel UNet: the image with the
    masked pixels zeroed (grey); no init image or no mask: a grey image under a full mask (A1111)."""
    import torch

    if init is None or init.mask is None:
        return torch.zeros(1, 3, height, width), torch.ones(1, 1, height, width)
    image = init.image if init.image.size == init.mask.size else resize_image(0, init.image, *init.mask.size)
    pixels = to_pixels(image)
    full = torch.round(torch.from_numpy(np.asarray(init.mask.convert("L"), dtype=np.float32) / 255.0))[None, None]
    return pixels * (1.0 - full), full


def composite(images, init: InitImage):
    """The generated images with the original composited back where the mask keeps it (A1111 ``apply_overlay``):
    pasted into the whole original first for ``inpaint_full_res``."""
    from PIL import Image

    if init is None or init.overlay is None:
        return list(images)
    out = []
    for image in images:
        if init.paste_to is not None:
            x, y, w, h = init.paste_to
            base = Image.new("RGBA", init.size)
            base.paste(resize_image(1, image, w, h), (x, y))
            image = base
        image = image.convert("RGBA")
        image.alpha_composite(init.overlay)
        out.append(image.convert("RGB"))
    return out


def infotext_params(init: InitImage | None) -> str:
    """A1111's infotext keys for the mask options used (", Mask blur: 4, Inpaint area: Only masked, ...")."""
    if init is None or not init.params:
        return ""
    return "".join(f", {k}: {v}" for k, v in init.params.items())


class MaskBlend:
    """A denoiser D(x, sigma) whose output outside the mask is the init latents (A1111's blend after denoising):
    ``denoised * nmask + init_latent * (1 - nmask)``, ``nmask`` 1 where repainted."""

    def __init__(self, denoiser, init_latent, nmask):
        self.denoiser = denoiser
        self.init_latent = init_latent
        self.nmask = nmask
        self.keep = 1.0 - nmask

    @property
    def sigmas(self):
        return self.denoiser.sigmas

    def blend(self, latents):
        return latents * self.nmask + self.init_latent * self.keep

    def __call__(self, x, sigma):
        return self.blend(self.denoiser(x, sigma))

    def __getattr__(self, name):  # attributes samplers or wrappers read from the inner denoiser
        if name in ("denoiser", "init_latent", "nmask", "keep"):
            raise AttributeError(name)
        return getattr(self.denoiser, name)


def check_mask_size(mask, field_name: str, max_pixels: int):
    """A mask's size against the request limits, naming the field (a hostile huge mask)."""
    w, h = mask.size
    if w < 1 or h < 1 or w * h > max_pixels:
        raise RequestError(field_name, f"{w}x{h} image", f"must be at least 1x1 and at most {max_pixels} pixels")
    return mask



def composite_pixels(pixels, init: InitImage):
    """``composite`` on decoded pixels [B,H,W,3] in [0, 1] -> [B,H',W',3] (the init image's size for
    ``inpaint_full_res``): in float where nothing is resized, so the repainted pixels stay exactly as decoded."""
    if init is None or init.overlay is None:
        return pixels
    if init.paste_to is not None:
        from PIL import Image

        images = [Image.fromarray((p * 255).round().astype(np.uint8)) for p in pixels]
        return np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in composite(images, init)])
    overlay = np.asarray(init.overlay, dtype=np.float32) / 255.0  # RGBA, straight alpha
    alpha = overlay[..., 3:4]
    return (pixels * (1.0 - alpha) + overlay[..., :3] * alpha).astype(np.float32)
