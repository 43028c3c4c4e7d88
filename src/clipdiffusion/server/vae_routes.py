"""Separate VAE files on the server: A1111's ``sd_vae`` option, ``GET /sdapi/v1/sd-vae``, ``POST
/sdapi/v1/refresh-vae``. Torch-free (the worker's ``Pipeline.replace_vae`` loads the file).

The server's files are ``--vae FILE`` and every VAE file under ``--vae-dir DIR`` (``checkpoints.vae_files.
VaeLibrary``, A1111's ``vae_dict``: named by base name). ``sd_vae`` (an option, or ``override_settings.sd_vae``)
is "Automatic" (``--vae`` when given, else ``<checkpoint stem>.vae.*`` beside the checkpoint, else the checkpoint's
own VAE), "None" (the checkpoint's own) or a listed name; anything else is a 422 naming the field, the value and
the choices, before any work is queued. The handler resolves the choice to a path; the worker swaps the model's
VAE to it before the generation (``apply_vae``) and back to the checkpoint's own for "None", so every job decodes
with the VAE its request asked for, whatever ran before.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from ..checkpoints.vae_files import AUTOMATIC, VaeLibrary, vae_name
from ..errors import CheckpointError
from ..request import RequestError

VAE_OPTION = "sd_vae"


def library(settings) -> VaeLibrary:
    """The server's VAE files (``settings.vae`` first, then ``settings.vae_dirs``)."""
    return VaeLibrary(settings.vae_dirs, files=(settings.vae,) if settings.vae else ())


def check_option(state, value, field: str = VAE_OPTION) -> str:
    """An ``sd_vae`` value the server can honour (returned as given); ``RequestError`` naming ``field`` otherwise."""
    state.vaes.resolve(value, field=field, default=state.settings.vae)
    return value


def resolve_plan(state, plan, options: dict) -> None:
    """Set ``plan.vae_path`` from the request's ``override_settings.sd_vae`` or the server's ``sd_vae`` option
    (None: the checkpoint's own VAE). Raises ``RequestError`` for an unknown name."""
    choice = getattr(plan, "vae_choice", None)
    field = f"override_settings.{VAE_OPTION}"
    if choice is None:
        choice, field = options.get(VAE_OPTION, AUTOMATIC), VAE_OPTION
    entry = state.settings.model(plan.model)
    plan.vae_path = state.vaes.resolve(choice, field=field, default=state.settings.vae,
                                       model_path=entry.source if entry is not None else None)  # fmt: skip


def apply_vae(plan, pipe) -> None:
    """In the worker, before generating: the model decodes with ``plan.vae_path`` (None: its own VAE); a swap
    happens only when that differs from what the model has now. Fills ``plan.vae_name``/``plan.vae_hash``."""
    if not hasattr(pipe, "replace_vae"):
        return
    wanted = getattr(plan, "vae_path", None)
    current = pipe.__dict__.get("vae_source")
    if wanted != current:
        try:
            pipe.replace_vae(wanted)
        except CheckpointError as exc:  # a broken file on the server: named by its listed name, never its path
            field = f"override_settings.{VAE_OPTION}" if getattr(plan, "vae_choice", None) is not None else VAE_OPTION
            raise RequestError(field, vae_name(wanted), f"this VAE file cannot be used: {exc.reason}") from None
        pipe.__dict__["vae_source"] = wanted
    if wanted is not None:
        plan.vae_name, plan.vae_hash = pipe.vae_name, pipe.vae_hash


def install(app: FastAPI, state) -> None:
    """A1111's ``GET /sdapi/v1/sd-vae`` (``[{"model_name", "filename"}]``; the filename relative to its --vae-dir,
    the server's own paths never shown) and ``POST /sdapi/v1/refresh-vae`` (rescan the folders; answers null, as
    A1111's does)."""

    @app.get("/sdapi/v1/sd-vae", tags=["a1111"])
    async def sd_vae() -> list[dict]:
        return await run_in_threadpool(lambda: [e.describe() for e in state.vaes.entries()])

    @app.post("/sdapi/v1/refresh-vae", tags=["a1111"])
    async def refresh_vae() -> None:
        await run_in_threadpool(state.vaes.refresh)
        return None
