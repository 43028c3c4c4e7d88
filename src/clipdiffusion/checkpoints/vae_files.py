"""Standalone VAE files: a replacement autoencoder for a loaded model (A1111's ``--vae-path`` / ``sd_vae``).

Layouts read (checkpoints.md §1.1, §5.3):

- LDM: SD's ``vae-ft-mse-840000-ema-pruned`` (``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``),
  also with a ``first_stage_model.`` (or ``vae.``) prefix, as ``.safetensors`` or as a ``.ckpt``/``.pt`` pickle read
  by the weights-only unpickler (``safetensors_io.load_pickle``; a nested ``state_dict`` is unwrapped). SDXL's
  ``sdxl_vae.safetensors`` has the same layout. A1111's ignorable keys (``loss.*`` from the training
  checkpoint, ``model_ema.decay``/``model_ema.num_updates``) are skipped and counted.
- diffusers: ``diffusion_pytorch_model.safetensors`` of an ``AutoencoderKL`` (a ``vae/`` folder, the file itself,
  or a pipeline folder holding ``vae/``), current or pre-0.14 attention names (``diffusers_vae``).

The scale factor is not part of the weights: the model's own is kept (A1111 does the same), so SDXL's 0.13025
stays with an SDXL model whatever VAE file decodes it. A folder's ``config.json`` whose ``scaling_factor``
differs is named in the notes. Checks, each failure a ``CheckpointError`` naming the file: from the header, before
any tensor data is read, every key against the model's VAE config (missing, unexpected, wrong shape) and float
dtypes; after loading, every tensor finite. The module is built in the dtype and on the device the model's VAE
has now.

``VaeLibrary`` is the server's list of VAE files (``--vae FILE``, ``--vae-dir DIR``), A1111's ``vae_dict``: names
are file base names (``vae-ft-mse-840000-ema-pruned.safetensors``), a diffusers folder is named after the folder.
Torch is imported inside the loading functions only, so the server imports this module without it.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, ClipDiffusionError

# A1111's sd_vae values that mean "no VAE file": the checkpoint's own VAE ("Automatic" may pick a file, see
# ``automatic_vae``).
AUTOMATIC = "Automatic"
NONE = "None"
VAE_SUFFIXES = (".safetensors", ".ckpt", ".pt")  # A1111's refresh_vae_list globs; .bin for diffusers folders only
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
_PREFIXES = ("first_stage_model.", "vae.")
_IGNORED_EXACT = {"model_ema.decay", "model_ema.num_updates"}  # A1111 sd_vae.vae_ignore_keys
_IGNORED_PREFIX = "loss."  # the training checkpoint's discriminator / LPIPS weights (A1111 drops k[0:4] == "loss")
_DIFFUSERS_MARKERS = (".down_blocks.", ".up_blocks.", ".mid_block.", "conv_norm_out.")


@dataclass(frozen=True)
class VaeWeights:
    """What ``load_vae_file`` read: the module, the weights file, its layout and what was skipped or noted."""

    vae: object  # diffusion.vae.AutoencoderKL
    path: Path  # the weights file (inside a folder for diffusers)
    layout: str  # "ldm" | "diffusers"
    ignored: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def weights_file(path) -> Path:
    """The weights file of ``path``: the file itself, a diffusers ``vae/`` folder's
    ``diffusion_pytorch_model.safetensors`` (or ``.bin``), or that of a pipeline folder's ``vae/``."""
    path = Path(path)
    if not path.is_dir():
        return path
    folder = path / "vae" if (path / "model_index.json").is_file() or (path / "vae").is_dir() else path
    for suffix in (".safetensors", ".bin"):
        candidate = folder / f"{DIFFUSERS_WEIGHTS}{suffix}"
        if candidate.is_file():
            return candidate
    raise CheckpointError(folder, f"no {DIFFUSERS_WEIGHTS}.safetensors (or .bin) VAE weights in this folder")


def _ignorable(key: str) -> bool:
    return key in _IGNORED_EXACT or key.startswith(_IGNORED_PREFIX)


def _strip_prefix(keys) -> tuple[str, list[str]]:
    """The prefix of the VAE keys (``first_stage_model.``, ``vae.``, or none when bare ``encoder.``/``decoder.``
    keys are there) and the ignorable keys."""
    keys = list(keys)
    ignored = [k for k in keys if _ignorable(k)]
    rest = [k for k in keys if not _ignorable(k)]
    if any(k.startswith(("encoder.", "decoder.")) for k in rest):
        return "", ignored
    for prefix in _PREFIXES:
        if any(k.startswith(prefix) for k in rest):
            return prefix, ignored
    return "", ignored


def _listed(what: str, keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:12]) + (f" (+{len(keys) - 12} more)" if len(keys) > 12 else "")
    return f"{what} ({len(keys)}): {shown}"


def _key_problems(expected: dict, given: dict) -> list[str]:
    """Missing, unexpected and mis-shaped keys, a dozen of each named."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    bad = [f"{k} {list(given[k])} (expected {list(expected[k])})"
           for k in expected if k in given and tuple(given[k]) != tuple(expected[k])]  # fmt: skip
    return [_listed(label, items) for label, items in (("missing", missing), ("unexpected", unexpected),
                                                         ("wrong shape", bad)) if items]


def detect_layout(keys) -> str:
    """"diffusers" when the names are diffusers' (``encoder.down_blocks.0.resnets.0...``), else "ldm"."""
    return "diffusers" if any(marker in k for k in keys for marker in _DIFFUSERS_MARKERS) else "ldm"


def _scale_note(file: Path, scale_factor: float) -> tuple[str, ...]:
    """A note when a diffusers folder's config.json states another scaling_factor than the model's."""
    config = file.parent / "config.json"
    if file.name.startswith(DIFFUSERS_WEIGHTS) and config.is_file():
        from .load import read_json

        stated = read_json(config).get("scaling_factor")
        if isinstance(stated, (int, float)) and not isinstance(stated, bool) and float(stated) != scale_factor:
            return (f"the VAE's config.json states scaling_factor {stated}; the model's {scale_factor} is kept (as "
                    f"A1111 does: the scale factor belongs to the model, not the VAE file)",)
    return ()


def load_vae_file(path, config, *, dtype=None, device="cpu", check_finite: bool = True) -> VaeWeights:
    """A VAE file or folder for a model whose VAE has ``config`` (``diffusion.vae.VAEConfig``; its scale factor is
    kept). ``dtype=None`` keeps the stored dtypes. Every failure is a ``CheckpointError`` naming the file."""
    import torch

    from ..diffusion.vae import AutoencoderKL
    from .build import build_module, expected_shapes, integer_weights
    from .diffusers_vae import vae_diffusers_to_ldm
    from .safetensors_io import load_file, read_shapes

    file = weights_file(path)
    if not file.is_file():
        raise CheckpointError(file, "no such file")
    shapes, dtypes, _ = read_shapes(file)  # header only (a pickle is memory-mapped by the weights-only unpickler)
    prefix, ignored = _strip_prefix(shapes)
    keys = [k for k in shapes if not _ignorable(k)]
    if not keys:
        raise CheckpointError(file, "holds no VAE weights")
    stray = [k for k in keys if not k.startswith(prefix)]
    if stray:
        raise CheckpointError(file, "not a VAE file: " + _listed(f"keys outside {prefix!r}", stray))
    problems = integer_weights(dtypes, keys)
    if problems:
        raise CheckpointError(file, problems[0])
    named = {k[len(prefix):]: k for k in keys}
    layout = detect_layout(named)
    meta = AutoencoderKL(config, device="meta")
    expected = expected_shapes(meta)
    if layout == "diffusers":
        empty = {name: torch.empty(shapes[key], device="meta") for name, key in named.items()}
        try:
            converted = vae_diffusers_to_ldm(empty, config, source=str(file))
        except CheckpointError as exc:
            raise CheckpointError(file, f"does not fit this model's VAE: {exc.reason}") from None
        given = {k: tuple(v.shape) for k, v in converted.items()}
    else:
        given = {name: shapes[key] for name, key in named.items()}
    problems = _key_problems(expected, given)
    if problems:
        raise CheckpointError(file, f"{layout} VAE does not fit this model's VAE (ch={config.ch}, ch_mult="
                                    f"{list(config.ch_mult)}, latent channels {config.embed_dim}): "
                                    + "; ".join(problems))  # fmt: skip
    tensors = load_file(file, keys=keys, dtype=dtype, device="cpu")
    tensors = {name: tensors[key] for name, key in named.items()}
    if layout == "diffusers":
        tensors = vae_diffusers_to_ldm(tensors, config, source=str(file))
    if check_finite:
        bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise CheckpointError(file, f"non-finite (NaN/Inf) VAE weights in {len(bad)} tensor(s): "
                                        f"{', '.join(sorted(bad)[:10])}")  # fmt: skip
    vae = build_module(AutoencoderKL, config, tensors, dtype=dtype, device=device, model=meta)
    notes = _scale_note(file, config.scale_factor)
    return VaeWeights(vae=vae, path=file, layout=layout, ignored=tuple(sorted(ignored)), notes=notes)


# --- A1111's VAE hash and the file list ----------------------------------------------------------------------

_hash_cache: dict = {}
_hash_lock = threading.Lock()


def vae_hash(path) -> str:
    """A1111's "VAE hash": the first 10 hex digits of the SHA-256 of the whole weights file (``hashes.sha256``),
    cached by path, size and modification time."""
    file = weights_file(path)
    try:
        stat = file.stat()
    except OSError as exc:
        raise CheckpointError(file, f"cannot read: {exc.strerror or exc}") from None
    key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
    with _hash_lock:
        if key in _hash_cache:
            return _hash_cache[key]
    digest = hashlib.sha256()
    try:
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise CheckpointError(file, f"cannot read: {exc.strerror or exc}") from None
    value = digest.hexdigest()[:10]
    with _hash_lock:
        _hash_cache[key] = value
    return value


def vae_name(path) -> str:
    """The name A1111 shows for a VAE file: its base name; a diffusers folder: the folder's name (a pipeline
    folder's, not ``vae``)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent if path.stem.startswith(DIFFUSERS_WEIGHTS) else None
    if folder is None:
        return path.name
    return folder.parent.name if folder.name == "vae" and (folder.parent / "model_index.json").is_file() \
        else folder.name


def _natural_key(text: str):
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


@dataclass(frozen=True)
class VaeEntry:
    name: str
    path: str  # file, or a diffusers folder
    folder: str | None = None  # the --vae-dir it was found in (None: given as --vae)

    def describe(self) -> dict:
        """A1111's ``/sdapi/v1/sd-vae`` item. ``filename`` is relative to its folder (the server never shows
        its own paths; A1111 gives the absolute path)."""
        shown = os.path.relpath(self.path, self.folder) if self.folder else os.path.basename(self.path)
        return {"model_name": self.name, "filename": shown}


def scan_vae_folder(folder) -> list[VaeEntry]:
    """The VAE files under ``folder`` (recursively): ``*.safetensors``, ``*.ckpt``, ``*.pt`` by base name, and each
    diffusers ``AutoencoderKL`` folder (``config.json`` + ``diffusion_pytorch_model.*``) by its folder name. Natural
    sort order; of two files with one name the first in path order is listed. Nothing is read but names."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ClipDiffusionError(f"--vae-dir {str(folder)!r}: no such folder")
    found: dict[str, VaeEntry] = {}
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs.sort()
        root_path = Path(root)
        diffusers = "config.json" in files and any(f.startswith(DIFFUSERS_WEIGHTS) for f in files)
        if diffusers and root_path != folder:
            name = vae_name(root_path)
            found.setdefault(name, VaeEntry(name, str(root_path), str(folder)))
            continue
        for name in sorted(files):
            if name.lower().endswith(VAE_SUFFIXES) and not name.startswith(DIFFUSERS_WEIGHTS):
                found.setdefault(name, VaeEntry(name, str(root_path / name), str(folder)))
    return [found[k] for k in sorted(found, key=_natural_key)]


def vae_near_checkpoint(model_path) -> str | None:
    """A1111's automatic pick: ``<checkpoint stem>.vae.{safetensors,ckpt,pt}`` beside a checkpoint file."""
    if not model_path:
        return None
    path = Path(model_path)
    if path.is_dir():
        return None
    for suffix in (".vae.safetensors", ".vae.ckpt", ".vae.pt"):
        candidate = path.with_name(path.name.rsplit(".", 1)[0] + suffix) if "." in path.name else None
        if candidate is not None and candidate.is_file():
            return str(candidate)
    return None


class VaeLibrary:
    """The VAE files a server offers: ``files`` (``--vae FILE``, listed first) and every file of ``folders``
    (``--vae-dir``). ``refresh()`` rescans the folders (A1111's ``refresh-vae``); thread-safe."""

    def __init__(self, folders=(), files=()):
        self.folders = tuple(str(f) for f in folders)
        self.files = tuple(str(f) for f in files)
        self._lock = threading.Lock()
        self._entries: list[VaeEntry] | None = None

    def refresh(self) -> list[VaeEntry]:
        entries: dict[str, VaeEntry] = {}
        for file in self.files:
            entries.setdefault(vae_name(file), VaeEntry(vae_name(file), file))
        for folder in self.folders:
            for entry in scan_vae_folder(folder):
                entries.setdefault(entry.name, entry)
        with self._lock:
            self._entries = list(entries.values())
            return list(self._entries)

    def entries(self) -> list[VaeEntry]:
        with self._lock:
            cached = self._entries
        return list(cached) if cached is not None else self.refresh()

    def names(self) -> list[str]:
        return [e.name for e in self.entries()]

    def get(self, name: str) -> VaeEntry | None:
        return next((e for e in self.entries() if e.name == name), None)

    def resolve(self, choice, *, field: str = "sd_vae", default: str | None = None, model_path=None) -> str | None:
        """The VAE file for A1111's ``sd_vae`` value ``choice``: None = the checkpoint's own. "Automatic" is
        ``default`` (the server's ``--vae``) when given, else a ``<stem>.vae.*`` file beside the checkpoint
        (``vae_near_checkpoint``), else the checkpoint's own; "None" is always the checkpoint's own; another value
        must name a listed file (a ``RequestError`` naming ``field`` and the choices otherwise)."""
        from ..request import RequestError

        if not isinstance(choice, str):
            raise RequestError(field, choice, f"must be a string: {AUTOMATIC}, {NONE} or a VAE file name")
        if choice == NONE:
            return None
        if choice == AUTOMATIC:
            return default or vae_near_checkpoint(model_path)
        entry = self.get(choice)
        if entry is None:
            choices = [AUTOMATIC, NONE, *self.names()]
            raise RequestError(field, choice, "not a VAE file this server has (--vae, --vae-dir); available: "
                                              + ", ".join(choices))
        return entry.path
