"""The rest of A1111's API surface: what clients poll at startup and the small routes around generation.

`register(app, state)` adds, in A1111's JSON shapes (`modules/api/models.py`, v1.10):

- `GET /sdapi/v1/cmd-flags`: A1111's flag names with this server's real values where we have the flag (`api`,
  `listen`, `port`, `api_auth` (redacted), `styles_file`, `lora_dir`, `embeddings_dir`, `no_half`, ...), A1111's
  defaults for the rest, and our own flags under their own names (`max_width`, `queue_size`, `save_dir`, ...).
  Paths are shown as base names only.
- `GET /sdapi/v1/upscalers`, `/latent-upscale-modes` (`server.upscalers`), `/prompt-styles` (`--styles-file`),
  `/face-restorers`, `/hypernetworks`, `/realesrgan-models`, `/script-info`, `/extensions` (empty: we have none).
- `GET /sdapi/v1/memory`: `{"ram": {free, used, total}, "cuda": {...}}` (A1111's meaning: `used` is this process's
  resident size, `free` = total - used; from psutil when installed, else /proc; `cuda` is A1111's block when
  torch sees a GPU, else `{"error": "unavailable"}`).
- `POST /sdapi/v1/skip` (stops the running job, as interrupt: we do not skip to the next image of a batch),
  `POST /sdapi/v1/refresh-checkpoints` (the model list is fixed by `serve --model`: nothing to rescan; null).
- `POST /sdapi/v1/extra-single-image`, `/extra-batch-images`: upscaling with the upscalers we have (None,
  Lanczos, Nearest; a second upscaler blended by `extras_upscaler_2_visibility`); face restoration (GFPGAN,
  CodeFormer visibility > 0) is a 422 naming the field.
- What we do not do (`interrogate`, `create/*`, `train/*`, `unload-checkpoint`, `reload-checkpoint`) answers 422
  naming it, never a 404 that a client reads as "API not enabled".

`save_pngs` is the `save_images: true` writer (into `--save-dir` only, names made here). Torch-free except
`/memory`, which asks torch about CUDA in a pool thread.
"""

from __future__ import annotations

import html
import os
import re
import sys
import threading
from pathlib import Path
from typing import Literal

from fastapi import FastAPI
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from ..errors import ClipDiffusionError
from ..request import RequestError
from . import upscalers
from .images import decode_image, encode_png
from .schemas import Int, JSONRequest, Number, Text

A1111_FLAG_DEFAULTS = {  # A1111 flags we have no counterpart for, at A1111's defaults (paths: None)
    "update_all_extensions": False, "skip_python_version_check": False, "skip_torch_cuda_test": False,
    "reinstall_xformers": False, "reinstall_torch": False, "update_check": False, "tests": None,
    "no_tests": False, "skip_install": False, "dump_sysinfo": False, "loglevel": None, "do_not_download_clip": False,
    "data_dir": None, "models_dir": None, "config": None, "ckpt_dir": None, "vae_dir": None, "vae_path": None,
    "gfpgan_dir": None, "gfpgan_model": None, "max_batch_count": 16, "textual_inversion_templates_dir": None,
    "hypernetwork_dir": None, "localizations_dir": None, "allow_code": False, "medvram": False,
    "medvram_sdxl": False, "lowvram": False, "lowram": False, "always_batch_cond_uncond": False,
    "unload_gfpgan": False, "upcast_sampling": False, "share": False, "ngrok": None, "ngrok_region": "",
    "ngrok_options": {}, "enable_insecure_extension_access": False, "codeformer_models_path": None,
    "gfpgan_models_path": None, "esrgan_models_path": None, "bsrgan_models_path": None,
    "realesrgan_models_path": None, "dat_models_path": None, "clip_models_path": None, "xformers": False,
    "force_enable_xformers": False, "xformers_flash_attention": False, "deepdanbooru": False,
    "opt_split_attention": False, "opt_sub_quad_attention": False, "sub_quad_q_chunk_size": 1024,
    "sub_quad_kv_chunk_size": None, "sub_quad_chunk_threshold": None, "opt_split_attention_invokeai": False,
    "opt_split_attention_v1": False, "opt_sdp_attention": True, "opt_sdp_no_mem_attention": False,
    "disable_opt_split_attention": False, "disable_nan_check": False, "use_cpu": [], "use_ipex": False,
    "disable_model_loading_ram_optimization": False, "show_negative_prompt": False, "ui_config_file": None,
    "hide_ui_dir_config": False, "freeze_settings": False, "freeze_settings_in_sections": None,
    "freeze_specific_settings": None, "ui_settings_file": None, "gradio_debug": False, "gradio_auth": None,
    "gradio_auth_path": None, "gradio_img2img_tool": None, "gradio_inpaint_tool": None,
    "gradio_allowed_path": [], "opt_channelslast": False, "autolaunch": False, "theme": None,
    "use_textbox_seed": False, "disable_console_progressbars": False, "enable_console_prompts": False,
    "disable_safe_unpickle": False, "api_log": False, "ui_debug_mode": False, "administrator": False,
    "cors_allow_origins": None, "cors_allow_origins_regex": None, "tls_keyfile": None, "tls_certfile": None,
    "disable_tls_verify": None, "gradio_queue": True, "no_gradio_queue": False, "skip_version_check": False,
    "no_hashing": False, "no_download_sd_model": False, "subpath": None, "add_stop_route": False,
    "api_server_stop": False, "timeout_keep_alive": 30, "disable_all_extensions": False,
    "disable_extra_extensions": False, "skip_load_model_at_start": False, "unix_filenames_sanitization": False,
    "filenames_max_length": 128, "no_prompt_history": False, "ldsr_models_path": None, "lora_dir": None,
    "lyco_dir_backcompat": None, "scunet_models_path": None, "swinir_models_path": None,
}
# A1111 routes we do not implement: answered with a 422 naming them, not a 404 ("API not enabled").
UNSUPPORTED_POSTS = {
    "/sdapi/v1/interrogate": "image captioning (interrogate: CLIP/DeepBooru)",
    "/sdapi/v1/create/embedding": "creating embeddings (use `clipdiffusion train-embedding`)",
    "/sdapi/v1/create/hypernetwork": "hypernetworks",
    "/sdapi/v1/train/embedding": "training embeddings over HTTP (use `clipdiffusion train-embedding`)",
    "/sdapi/v1/train/hypernetwork": "hypernetworks",
    "/sdapi/v1/unload-checkpoint": "unloading the model on request (the server keeps the selected model loaded)",
    "/sdapi/v1/reload-checkpoint": "reloading the model on request (the server keeps the selected model loaded)",
}
_SAVE_LOCK = threading.Lock()
_NUMBERED = re.compile(r"^(\d+)-")


def _base(path) -> str | None:
    return os.path.basename(os.path.normpath(path)) if path else None


def cmd_flags(settings) -> dict:
    """`GET /sdapi/v1/cmd-flags`: A1111's flag names (`vars(cmd_opts)`), ours filled in from the settings."""
    loopback = settings.host in ("127.0.0.1", "localhost", "::1")
    cuda = settings.device.startswith("cuda")
    models = [m for m in settings.models if m.source]
    flags = dict(A1111_FLAG_DEFAULTS)
    flags.update({
        "api": True, "nowebui": False, "listen": not loopback, "port": settings.port,
        "server_name": None if loopback else settings.host,
        "api_auth": "<redacted>" if settings.api_auth else None,
        "ckpt": _base(models[0].source) if models else None,
        "styles_file": [_base(f) for f in settings.styles_files],
        "embeddings_dir": _base(settings.embeddings_dir),
        "lora_dir": _base(settings.lora_dirs[0]) if settings.lora_dirs else None,
        "no_half": settings.dtype == "fp32", "no_half_vae": settings.dtype == "fp32",
        "precision": "full" if settings.dtype == "fp32" else "autocast",
        "use_cpu": ["all"] if settings.device == "cpu" else [],
        "device_id": (settings.device.partition(":")[2] or "0") if cuda else None,
        "max_batch_count": settings.max_n_iter,
        "vae_path": _base(getattr(settings, "vae", None)),
        "vae_dir": _base(getattr(settings, "vae_dirs", None)[0]) if getattr(settings, "vae_dirs", None) else None,
        # ours, under our own names
        "model": [m.filename for m in settings.models], "text_encoder": _base(settings.text_encoder),
        "device": settings.device, "dtype": settings.dtype, "host": settings.host,
        "max_width": settings.max_width, "max_height": settings.max_height, "max_steps": settings.max_steps,
        "max_batch_size": settings.max_batch_size, "max_prompt_chars": settings.max_prompt_chars,
        "max_body_mb": settings.max_body_bytes // 2**20, "queue_size": settings.queue_size,
        "loras": [_base(d) for d in settings.lora_dirs], "save_dir": _base(settings.save_dir),
    })
    return flags


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read(1 << 16)
    except OSError:
        return None


def _kib_field(text: str | None, key: str) -> int | None:
    if text is None:
        return None
    m = re.search(rf"^{key}:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(m.group(1)) * 1024 if m else None


def ram_stats() -> dict:
    """A1111's `ram` block: `used` = this process's resident size, `total` = the machine's RAM, `free` = total -
    used (A1111's definition, not the system's free memory). psutil when installed, else /proc, else what
    `resource` knows (peak resident size only)."""
    try:
        import psutil  # optional

        process = psutil.Process(os.getpid())
        rss = process.memory_info().rss
        total = psutil.virtual_memory().total
        return {"free": total - rss, "used": rss, "total": total}
    except ImportError:
        pass
    except Exception as exc:  # psutil present but failing: say so, as A1111 does
        return {"error": f"{exc}"}
    rss = _kib_field(_read("/proc/self/status"), "VmRSS")
    total = _kib_field(_read("/proc/meminfo"), "MemTotal")
    if rss is not None and total is not None:
        return {"free": total - rss, "used": rss, "total": total}
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak *= 1 if sys.platform == "darwin" else 1024
        return {"used": peak, "error": "total RAM unknown; used is the peak resident size"}
    except Exception as exc:
        return {"error": f"{exc}"}


def cuda_stats() -> dict:
    """A1111's `cuda` block (`torch.cuda.mem_get_info` and the caching allocator's counters), or
    `{"error": "unavailable"}` without a GPU."""
    try:
        import torch

        if not torch.cuda.is_available():
            return {"error": "unavailable"}
        free, total = torch.cuda.mem_get_info()
        s = torch.cuda.memory_stats()

        def pair(name):
            return {"current": s.get(f"{name}.all.current", 0), "peak": s.get(f"{name}.all.peak", 0)}

        return {"system": {"free": free, "used": total - free, "total": total},
                "active": pair("active_bytes"), "allocated": pair("allocated_bytes"),
                "reserved": pair("reserved_bytes"), "inactive": pair("inactive_split_bytes"),
                "events": {"retries": s.get("num_alloc_retries", 0), "oom": s.get("num_ooms", 0)}}
    except Exception as exc:
        return {"error": f"{exc}"}


class ExtrasRequest(JSONRequest):
    """A1111's `ExtrasBaseRequest`: field names, defaults and ranges as there."""

    resize_mode: Literal[0, 1] = 0
    show_extras_results: bool = True
    gfpgan_visibility: Number = Field(0, ge=0, le=1)
    codeformer_visibility: Number = Field(0, ge=0, le=1)
    codeformer_weight: Number = Field(0, ge=0, le=1)
    upscaling_resize: Number = Field(2, gt=0)
    upscaling_resize_w: Int = Field(512, ge=1)
    upscaling_resize_h: Int = Field(512, ge=1)
    upscaling_crop: bool = True
    upscaler_1: Text | None = "None"
    upscaler_2: Text | None = "None"
    extras_upscaler_2_visibility: Number = Field(0, ge=0, le=1)
    upscale_first: bool = False


class ExtrasSingleImageRequest(ExtrasRequest):
    image: Text = ""


class FileData(JSONRequest):
    data: Text
    name: Text = ""


class ExtrasBatchImagesRequest(ExtrasRequest):
    imageList: list[FileData] = Field(default_factory=list)  # noqa: N815 (A1111's name)


def _check_extras(req: ExtrasRequest) -> tuple[str | None, str | None]:
    """(upscaler 1, upscaler 2) as known names (None: not used); face restoration refused by field."""
    for name, what in (("gfpgan_visibility", "GFPGAN"), ("codeformer_visibility", "CodeFormer")):
        if getattr(req, name) > 0:
            raise RequestError(name, getattr(req, name), f"face restoration ({what}) is not available on this "
                                                         "server; GET /sdapi/v1/face-restorers lists none")
    first = upscalers.check_upscaler(req.upscaler_1 if req.upscaler_1 is not None else "None", "upscaler_1")
    second = upscalers.check_upscaler(req.upscaler_2 if req.upscaler_2 is not None else "None", "upscaler_2")
    first = None if first == "None" else first
    second = None if second == "None" or req.extras_upscaler_2_visibility == 0 else second
    return first, second


def run_extras(image, req: ExtrasRequest, first: str | None, second: str | None, max_pixels: int):
    """One image through A1111's postprocessing upscale: (image, info text). No upscaler 1: unchanged."""
    if first is None:
        return image, ""
    info = {}
    if req.resize_mode == 1:
        tw, th = req.upscaling_resize_w, req.upscaling_resize_h
        scale = max(tw / image.width, th / image.height)
        info["Postprocess upscale to"] = f"{tw}x{th}"
        field = "upscaling_resize_w"
    else:
        scale = req.upscaling_resize
        info["Postprocess upscale by"] = f"{scale:g}"
        field = "upscaling_resize"
    out = upscalers.upscale(image, first, scale, max_pixels=max_pixels, field=field)
    info["Postprocess upscaler"] = first
    if second is not None:
        from PIL import Image

        other = upscalers.resize(image, second, out.size)
        out = Image.blend(out.convert("RGB"), other.convert("RGB"), req.extras_upscaler_2_visibility)
        info["Postprocess upscaler 2"] = second
    if req.resize_mode == 1 and req.upscaling_crop:
        from PIL import Image

        if tw * th > max_pixels:
            raise RequestError("upscaling_resize_w", tw, f"{tw}x{th} is more than this server's {max_pixels} pixels")
        canvas = Image.new("RGB", (tw, th))
        canvas.paste(out, (tw // 2 - out.width // 2, th // 2 - out.height // 2))
        out = canvas
        info["Postprocess crop to"] = f"{tw}x{th}"
    return out, ", ".join(f"{k}: {v}" for k, v in info.items())


def _html(text: str) -> str:
    return f"<p>{html.escape(text)}</p>" if text else ""


def save_pngs(settings, kind: str, pictures, infotexts, seeds) -> list[str]:
    """`save_images: true`: each image as `<save_dir>/<kind>-images/NNNNN-SEED.png` with its infotext (A1111's
    folder and name pattern; the number continues after the highest one there). Names never come from the
    request. Returns notes for what could not be written (the images are still returned)."""
    if not settings.save_dir:
        return []
    from ..fileio import atomic_write

    folder = Path(settings.save_dir) / f"{kind}-images"
    notes = []
    with _SAVE_LOCK:
        try:
            folder.mkdir(exist_ok=True)
            numbers = [int(m.group(1)) for name in os.listdir(folder) if (m := _NUMBERED.match(name))]
        except OSError as exc:
            return [f"save_images: cannot use the save folder ({exc.strerror or exc})"]
        number = max(numbers, default=-1) + 1
        for i, image in enumerate(pictures):
            text = infotexts[i] if i < len(infotexts) else None
            seed = seeds[i] if i < len(seeds) else 0

            def write(f, image=image, text=text):
                from PIL import PngImagePlugin

                info = PngImagePlugin.PngInfo()
                if text:
                    info.add_text("parameters", text)
                image.save(f, format="PNG", pnginfo=info)

            try:
                atomic_write(folder / f"{number + i:05d}-{seed}.png", write, field="save_images")
            except ClipDiffusionError as exc:
                notes.append(str(exc).replace(str(settings.save_dir), "<save-dir>"))
    return notes


def register(app: FastAPI, state) -> None:
    """Add the routes above to `app` (`state`: the app's `ServerState`)."""
    settings = state.settings
    max_in = settings.max_width * settings.max_height
    max_out = 4 * max_in

    @app.get("/sdapi/v1/cmd-flags", tags=["a1111"])
    async def get_cmd_flags() -> dict:
        return cmd_flags(settings)

    @app.get("/sdapi/v1/upscalers", tags=["a1111"])
    async def get_upscalers() -> list[dict]:
        return upscalers.upscaler_items()

    @app.get("/sdapi/v1/latent-upscale-modes", tags=["a1111"])
    async def get_latent_upscale_modes() -> list[dict]:
        return upscalers.latent_mode_items()

    @app.get("/sdapi/v1/prompt-styles", tags=["a1111"])
    async def get_prompt_styles() -> list[dict]:
        return settings.styles.items()

    @app.get("/sdapi/v1/face-restorers", tags=["a1111"])
    async def get_face_restorers() -> list[dict]:
        return []

    @app.get("/sdapi/v1/hypernetworks", tags=["a1111"])
    async def get_hypernetworks() -> list[dict]:
        return []

    @app.get("/sdapi/v1/realesrgan-models", tags=["a1111"])
    async def get_realesrgan_models() -> list[dict]:
        return []

    @app.get("/sdapi/v1/script-info", tags=["a1111"])
    async def get_script_info() -> list[dict]:
        return []

    @app.get("/sdapi/v1/extensions", tags=["a1111"])
    async def get_extensions() -> list[dict]:
        return []

    @app.get("/sdapi/v1/memory", tags=["a1111"])
    async def get_memory() -> dict:
        return await run_in_threadpool(lambda: {"ram": ram_stats(), "cuda": cuda_stats()})

    @app.post("/sdapi/v1/skip", tags=["a1111"])
    async def skip() -> None:
        state.worker.interrupt()  # we stop the job; A1111 would go on with the next image of the batch
        return None

    @app.post("/sdapi/v1/refresh-checkpoints", tags=["a1111"])
    async def refresh_checkpoints() -> None:
        return None  # the model list is fixed by serve --model; nothing to rescan

    @app.post("/sdapi/v1/extra-single-image", tags=["a1111"])
    async def extra_single_image(req: ExtrasSingleImageRequest) -> dict:
        first, second = _check_extras(req)

        def work():
            image = decode_image(req.image, "image", max_in)
            out, info = run_extras(image, req, first, second, max_out)
            return {"html_info": _html(info), "image": encode_png(out, None)}

        return await run_in_threadpool(work)

    @app.post("/sdapi/v1/extra-batch-images", tags=["a1111"])
    async def extra_batch_images(req: ExtrasBatchImagesRequest) -> dict:
        first, second = _check_extras(req)
        limit = settings.max_batch_size * settings.max_n_iter
        if len(req.imageList) > limit:
            raise RequestError("imageList", f"{len(req.imageList)} images", f"at most {limit} per request")

        def work():
            out, infos = [], []
            for i, item in enumerate(req.imageList):
                image = decode_image(item.data, f"imageList[{i}].data", max_in)
                result, info = run_extras(image, req, first, second, max_out)
                out.append(encode_png(result, None))
                infos.append(info)
            return {"html_info": _html(infos[0] if infos else ""), "images": out}

        return await run_in_threadpool(work)

    for path, what in UNSUPPORTED_POSTS.items():
        app.add_api_route(path, _unsupported(path, what), methods=["POST"], tags=["a1111"], include_in_schema=False)


def _unsupported(path: str, what: str):
    """An endpoint (no parameters) answering 422: `path` and what it would have done, named."""

    async def endpoint():
        raise ClipDiffusionError(f"{path}: {what} is not supported by this server (clipdiffusion)")

    return endpoint
