"""Server configuration: the listed models, the request limits and the access rules. Torch-free.

One frozen dataclass, set once from the command line (or by a test), read by every handler. Mutable state (the
selected model, the default clip skip) lives in `server.app.ServerState`, never here.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

from ..errors import ClipDiffusionError
from ..request import LIMITS, Limits

# The name the embedded model is listed under when no --model is given.
EMBEDDED_MODEL = "clipdiffusion-tiny"


@dataclass(frozen=True)
class ModelEntry:
    """A model a client may select by name. `source` is a file or folder path, None for the embedded model.
    The path never leaves the server: clients see `name` and the file's base name only."""

    name: str
    source: str | None = None

    @property
    def filename(self) -> str:
        return os.path.basename(self.source) if self.source else "embedded"


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 7860
    models: tuple[ModelEntry, ...] = (ModelEntry(EMBEDDED_MODEL),)
    # "user:password" pairs for HTTP basic auth; empty means open (which is why the default bind is loopback).
    api_auth: tuple[tuple[str, str], ...] = ()
    # Limits (see `limits`): A1111 itself caps the UI at 2048 px and 150 steps; prompt and body caps bound memory
    # per request.
    max_width: int = 2048
    max_height: int = 2048
    max_steps: int = 150
    max_batch_size: int = 8
    max_n_iter: int = 16
    max_prompt_chars: int = 8000
    max_body_bytes: int = 32 * 1024 * 1024
    # Pending jobs beyond the running one; a full queue answers 503 rather than letting latency grow unbounded.
    queue_size: int = 8
    # Seconds a shutdown waits for the running job after interrupting it.
    shutdown_timeout: float = 10.0
    # Engine names offered to clients; None reads the engine's SAMPLERS / SCHEDULES tables on first use.
    samplers: tuple[str, ...] | None = None
    schedules: tuple[str, ...] | None = None
    default_clip_skip: int = 1
    # Folders of LoRA files (--loras DIR): GET /sdapi/v1/loras lists them (paths relative to their folder), POST
    # /sdapi/v1/refresh-loras rescans; clients name LoRAs, never paths.
    lora_dirs: tuple[str, ...] = ()
    # Load the default model when the server starts (the CLI does), so a broken model shows up in the log at once
    # rather than in the first client's error; tests leave it off.
    preload: bool = False
    # A replacement text tower (--text-encoder FILE) for every listed model: Pipeline.replace_text_encoder. The
    # path never leaves the server; the generation notes name the file's base name.
    text_encoder: str | None = None
    # A folder of textual-inversion embeddings (--embeddings DIR): loaded into every model when it loads, rescanned
    # by POST /sdapi/v1/refresh-embeddings, counted by /api/tokenize.
    embeddings_dir: str | None = None
    # Its window length (from the file's header at startup), so the token counter shows the capacity it has.
    text_positions: int = 77
    # Where every model runs (--device/--dtype): requests for devices.resolve, applied per model with its family
    # (Pipeline.from_*(device=, dtype=)). Defaults cpu/fp32; "auto" picks per machine.
    device: str = "cpu"
    dtype: str = "fp32"
    # --mmap: every model's .safetensors weights stay mapped (Pipeline.from_*(mmap=True); the risk is in its help).
    mmap: bool = False
    # --compile: torch.compile for every model's UNet and/or VAE decoder (Pipeline.compile; "off" by default).
    compile: str = "off"
    # Separate VAE files (A1111's --vae-path and --vae-dir): `vae` is what the sd_vae option "Automatic" means (else
    # a <checkpoint stem>.vae.* file beside the checkpoint, else its own VAE); GET /sdapi/v1/sd-vae lists it and
    # every VAE file of `vae_dirs` (POST /sdapi/v1/refresh-vae rescans); clients name files, never paths.
    vae: str | None = None
    vae_dirs: tuple[str, ...] = ()
    # A1111 styles files (--styles-file FILE, repeatable; A1111's flag): read when the settings are made, so a bad
    # file stops the server at startup (`styles.StyleLibrary`); the request field `styles` applies them.
    styles_files: tuple[str, ...] = ()
    # Where `save_images: true` writes (--save-dir DIR): <dir>/txt2img-images and <dir>/img2img-images (A1111's
    # outdir_*_samples), file names made here. None: save_images is reported as ignored and nothing is written.
    save_dir: str | None = None

    def __post_init__(self):
        for name in ("max_width", "max_height", "max_steps", "max_batch_size", "max_n_iter", "max_prompt_chars",
                     "max_body_bytes", "queue_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ClipDiffusionError(f"{name} must be a positive integer, got {value!r}")
        if not self.models:
            raise ClipDiffusionError("models must list at least one model, got none")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ClipDiffusionError(f"models must have distinct names, got {names!r}")
        from ..devices import check_device, check_dtype

        check_device(self.device, "device")
        check_dtype(self.dtype, "dtype")
        self.limits  # a limit looser than the engine's is an error here, not in the first request
        self.styles  # a bad styles file is an error here, naming the file

    @functools.cached_property
    def limits(self) -> Limits:
        """The engine's request limits (`request.LIMITS`) tightened to this server's; sizes are multiples of 8 (the
        SD VAEs' factor, what A1111's sliders step by). Every request is checked against these, by name."""
        return LIMITS.tightened(
            max_steps=self.max_steps, max_width=self.max_width, max_height=self.max_height,
            max_pixels=min(LIMITS.max_pixels, self.max_width * self.max_height), size_multiple=8,
            max_batch_size=self.max_batch_size, max_n_iter=self.max_n_iter, max_prompt_chars=self.max_prompt_chars)

    @functools.cached_property
    def styles(self):
        """The prompt styles of `styles_files` (`styles.StyleLibrary`; empty without files)."""
        from ..styles import StyleLibrary

        return StyleLibrary.from_files(self.styles_files)

    def replace(self, **changes) -> "ServerSettings":
        return dataclasses.replace(self, **changes)

    def model(self, name: str) -> ModelEntry | None:
        """The listed model called `name` (its name or its file's base name), or None."""
        for entry in self.models:
            if name in (entry.name, entry.filename):
                return entry
        return None


def parse_api_auth(text: str) -> tuple[tuple[str, str], ...]:
    """'user:pass[,user2:pass2]' as A1111's --api-auth takes it."""
    pairs = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise ClipDiffusionError(f"--api-auth must be user:password[,user:password], got {item.strip()!r}")
        pairs.append((user, password))
    return tuple(pairs)


def default_models(model_paths: list[str] | None) -> tuple[ModelEntry, ...]:
    """Model entries for --model arguments (named after the file's stem), or the embedded model."""
    if not model_paths:
        return (ModelEntry(EMBEDDED_MODEL),)
    entries = []
    for path in model_paths:
        stem = os.path.basename(os.path.normpath(path))
        for suffix in (".safetensors", ".ckpt"):
            if stem.endswith(suffix):
                stem = stem[: -len(suffix)]
        entries.append(ModelEntry(stem, os.path.abspath(path)))
    return tuple(entries)

