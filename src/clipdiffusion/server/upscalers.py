"""The upscalers this server has, by A1111's names, and the pixel upscaling itself (PIL). Torch-free.

One table for every route that names an upscaler: `GET /sdapi/v1/upscalers` and `/latent-upscale-modes` list it,
`POST /sdapi/v1/extra-single-image` / `extra-batch-images` use it, and hires fix (`hr_upscaler`) reads it.

- `UPSCALERS`: pixel upscalers, name -> PIL resampling filter name (None for "None", which leaves the image as it
  is, as A1111's extras do). No model-based upscalers (ESRGAN, SwinIR, ...): we ship none.
- `LATENT_UPSCALE_MODES`: A1111's latent modes, name -> (torch `interpolate` mode, antialias), all implemented by
  hires fix (a copy of `request.LATENT_UPSCALE_MODES`).

`upscale(image, name, scale)` follows A1111's `Upscaler.upscale` size rule: the destination is the scaled size
rounded down to a multiple of 8, reached with the named filter.
"""

from __future__ import annotations

from ..request import LATENT_UPSCALE_MODES as _REQUEST_LATENT_MODES
from ..request import RequestError

# name -> PIL.Image.Resampling member name; "None" does nothing
UPSCALERS: dict[str, str | None] = {"None": None, "Lanczos": "LANCZOS", "Nearest": "NEAREST"}

# The latent modes (A1111's `shared.latent_upscale_modes`: name -> (interpolate mode, antialias)), all implemented
# by hires fix (clipdiffusion.hires); their one table is request.LATENT_UPSCALE_MODES, since the request checks
# hr_upscaler against it and the core cannot import server/.
LATENT_UPSCALE_MODES: dict[str, tuple[str, bool]] = dict(_REQUEST_LATENT_MODES)

A1111_SCALE = 4  # A1111 lists its built-in upscalers (None, Lanczos, Nearest) with scale 4


def upscaler_items() -> list[dict]:
    """`GET /sdapi/v1/upscalers`: A1111's `UpscalerItem` shape for each pixel upscaler we have."""
    return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": A1111_SCALE}
            for name in UPSCALERS]


def latent_mode_items() -> list[dict]:
    """`GET /sdapi/v1/latent-upscale-modes`: `[{"name": ...}]` for the implemented latent modes."""
    return [{"name": name} for name in LATENT_UPSCALE_MODES]


def check_upscaler(name, field: str, *, latent: bool = False) -> str:
    """`name` if it is an upscaler we have (latent modes too when `latent`), else a RequestError naming `field` and
    listing what there is."""
    names = list(UPSCALERS) + (list(LATENT_UPSCALE_MODES) if latent else [])
    if isinstance(name, str) and name in names:
        return name
    if isinstance(name, str):  # A1111 compares names exactly; tell a client that only got the case wrong
        for known in names:
            if known.lower() == name.lower():
                return known
    raise RequestError(field, name, f"not an upscaler this server has; available: {', '.join(names)}")


def target_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """A1111's destination size for upscaling by `scale`: each side scaled and rounded down to a multiple of 8."""
    return int((width * scale) // 8 * 8), int((height * scale) // 8 * 8)


def resize(image, name: str, size: tuple[int, int]):
    """`image` resized to `size` with the named pixel upscaler's filter ("None": unchanged)."""
    from PIL import Image

    method = UPSCALERS[name]
    if method is None or image.size == tuple(size):
        return image
    return image.resize(tuple(size), resample=getattr(Image.Resampling, method))


def upscale(image, name: str, scale: float, *, max_pixels: int | None = None, field: str = "upscaling_resize"):
    """`image` upscaled by `scale` with the pixel upscaler `name`, to A1111's destination size. "None" returns the
    image unchanged (A1111's extras skip upscaling for it)."""
    if UPSCALERS[name] is None:
        return image
    width, height = target_size(image.width, image.height, scale)
    if width < 8 or height < 8:
        raise RequestError(field, scale, f"upscaling {image.width}x{image.height} by it gives {width}x{height}; "
                                         "each side must be at least 8 pixels")
    if max_pixels is not None and width * height > max_pixels:
        raise RequestError(field, scale, f"upscaling {image.width}x{image.height} by it gives {width}x{height}, "
                                         f"more than this server's {max_pixels} pixels")
    return resize(image, name, (width, height))
