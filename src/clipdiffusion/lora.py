"""Named LoRAs and their application to a pipeline's weights.

``LoraLibrary`` (torch-free until a file is read): the LoRAs a pipeline or a server knows, by name. A name is the
file's stem (or the name given to ``add``); the safetensors metadata's ``ss_output_name`` is an alias when no
other LoRA claims it (A1111's rule: colliding aliases are refused, the file name still works). Folders are
scanned for ``*.safetensors`` (recursively) on ``add_folder`` and rescanned on ``refresh``; files are read and
validated on first use (``checkpoints.lora.read_lora``), or at once by ``Pipeline.load_lora``.

``LoraEngine``: merge in place with exact restore (A1111's and ComfyUI's design). ``apply(pipe, wanted)`` with
``wanted`` a tuple of ``ActiveLora(name, te, unet, dyn)``: when the set differs from the applied one, every weight
the old or the new set touches is first restored from its backup (a copy taken before its first change), then
each active LoRA's delta is added in float32 (one fused ``addmm_`` per factor pair, straight into a float32
weight; for fp16/bf16 weights into a float32 copy of the backup, cast once). A
weight the new set leaves alone is restored and its backup dropped, so the model without LoRAs holds exactly the
tensors it was loaded with (bit for bit) and backups cost memory only while a LoRA touches the weight. An
unchanged set costs nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError, ClipDiffusionError

logger = logging.getLogger("clipdiffusion.lora")
SUFFIX = ".safetensors"
MAX_FILES = 10_000  # per folder scan
CACHE_FILES = 8  # read files kept in memory besides those applied


class LoraNotFound(ClipDiffusionError):
    """A request names a LoRA the library does not have."""

    def __init__(self, name: str, available: list[str]):
        self.name = name
        shown = ", ".join(available[:50]) + (f" (+{len(available) - 50} more)" if len(available) > 50 else "")
        super().__init__(f"LoRA {name!r} not found; available: {shown or 'none (load some with --loras DIR)'}")


@dataclass(frozen=True)
class ActiveLora:
    """One LoRA of a request: its name and multipliers (``dyn``: ranks kept, None = all)."""

    name: str
    te: float = 1.0
    unet: float = 1.0
    dyn: int | None = None


@dataclass
class LoraEntry:
    name: str
    path: str
    folder: str | None = None  # the configured folder it was found in (None: added by path)
    _metadata: dict | None = field(default=None, repr=False)
    _hash: str | None = field(default=None, repr=False)

    @property
    def metadata(self) -> dict:
        """The file's safetensors metadata (JSON-looking strings parsed); {} when the header cannot be read."""
        if self._metadata is None:
            from .checkpoints.lora import parse_metadata
            from .checkpoints.safetensors_io import read_header

            try:
                self._metadata = parse_metadata(read_header(self.path).metadata)
            except CheckpointError as exc:
                logger.warning("%s", exc)
                self._metadata = {}
        return self._metadata

    @property
    def alias(self) -> str:
        alias = self.metadata.get("ss_output_name")
        return alias if isinstance(alias, str) and alias else self.name

    @property
    def shorthash(self) -> str:
        """A1111's LoRA short hash: the first 12 hex digits of the sha256 of the file after its header (the
        "addnet" hash of safetensors files, what ``Lora hashes`` in an infotext quotes)."""
        if self._hash is None:
            digest = hashlib.sha256()
            with open(self.path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                f.seek(8 + n)
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            self._hash = digest.hexdigest()[:12]
        return self._hash

    def describe(self) -> dict:
        """``/sdapi/v1/loras``'s entry; the path is relative to its configured folder (no server paths leave)."""
        path = os.path.relpath(self.path, self.folder) if self.folder else os.path.basename(self.path)
        return {"name": self.name, "alias": self.alias, "path": path, "metadata": self.metadata}


class LoraLibrary:
    """Named LoRA files: ``add(path, name=None)``, ``add_folder(folder)``, ``refresh()``, ``get(name)``."""

    def __init__(self, folders=()):
        self.folders: list[str] = []
        self._added: dict[str, LoraEntry] = {}
        self._scanned: dict[str, LoraEntry] = {}
        self._read: OrderedDict = OrderedDict()  # path -> (mtime, size, LoraFile), most recent last
        for folder in folders:
            self.add_folder(folder)

    def add(self, path, name: str | None = None) -> LoraEntry:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(path, "no such LoRA file")
        if path.suffix.lower() != SUFFIX:
            raise CheckpointError(path, f"LoRA files must be {SUFFIX} (pickled .pt/.ckpt LoRAs are refused)")
        name = path.stem if name is None else name
        if not isinstance(name, str) or not name or any(c in name for c in "<>:"):
            raise ClipDiffusionError(f"LoRA name {name!r}: must be non-empty, without '<', '>' or ':'")
        entry = LoraEntry(name, str(path.resolve()))
        self._added[name] = entry
        return entry

    def add_folder(self, folder) -> list[LoraEntry]:
        folder = str(Path(folder).resolve())
        if not os.path.isdir(folder):
            raise ClipDiffusionError(f"--loras: {folder!r} is not a folder")
        if folder not in self.folders:
            self.folders.append(folder)
        return self._scan(folder)

    def _scan(self, folder) -> list[LoraEntry]:
        found = []
        for root, dirs, files in os.walk(folder, followlinks=False):
            dirs.sort()
            for f in sorted(files):
                if f.lower().endswith(SUFFIX) and os.path.isfile(os.path.join(root, f)):
                    found.append(LoraEntry(f[: -len(SUFFIX)], os.path.join(root, f), folder))
                    if len(found) > MAX_FILES:
                        raise ClipDiffusionError(f"--loras: {folder!r} holds more than {MAX_FILES} LoRA files")
        for entry in found:
            if entry.name in self._scanned:
                logger.warning("LoRA %r: %s shadows %s", entry.name, self._scanned[entry.name].path, entry.path)
                continue
            self._scanned[entry.name] = entry
        return found

    def refresh(self) -> None:
        """Rescan the folders (A1111's refresh-loras); files added by path stay."""
        self._scanned = {}
        for folder in self.folders:
            if os.path.isdir(folder):
                self._scan(folder)

    def entries(self) -> list[LoraEntry]:
        merged = {**self._scanned, **self._added}
        return [merged[name] for name in sorted(merged)]

    def names(self) -> list[str]:
        return [e.name for e in self.entries()]

    def get(self, name: str) -> LoraEntry:
        """The entry called ``name`` (its name, else a unique alias); ``LoraNotFound`` listing the names."""
        entries = self.entries()
        for entry in entries:
            if entry.name == name:
                return entry
        aliased = [e for e in entries if e.alias == name]
        if len(aliased) == 1:
            return aliased[0]
        raise LoraNotFound(name, [e.name for e in entries])

    def read(self, entry: LoraEntry):
        """The validated ``LoraFile`` of ``entry`` (cached while the file is unchanged)."""
        from .checkpoints.lora import read_lora

        try:
            stat = os.stat(entry.path)
        except OSError as exc:
            raise CheckpointError(entry.path, f"cannot read the LoRA file: {exc.strerror or exc}") from None
        cached = self._read.get(entry.path)
        if cached is not None and cached[:2] == (stat.st_mtime_ns, stat.st_size):
            self._read.move_to_end(entry.path)
            return cached[2]
        lora = read_lora(entry.path)
        self._read[entry.path] = (stat.st_mtime_ns, stat.st_size, lora)
        while len(self._read) > CACHE_FILES:
            self._read.popitem(last=False)
        return lora


class LoraEngine:
    """The applied set and the backups of one pipeline's weights (see the module docstring)."""

    def __init__(self):
        self.applied: tuple = ()  # ((ActiveLora, path), ...) as last applied
        self.backups: dict = {}  # (component, parameter) -> the original tensor
        self._mapped: dict = {}  # id(LoraFile) -> (LoraFile, {key: [LoraWeight]})
        self._targets = None

    def targets(self, pipe):
        from .checkpoints.lora import lora_targets

        if self._targets is None:
            self._targets = lora_targets(pipe.unet, [spec.model for spec in pipe.text_encoder.encoders])
        return self._targets

    def mapped(self, pipe, lora) -> dict:
        from .checkpoints.lora import map_lora

        hit = self._mapped.get(id(lora))
        if hit is None or hit[0] is not lora:
            hit = (lora, map_lora(lora, self.targets(pipe)))
            self._mapped[id(lora)] = hit
            while len(self._mapped) > CACHE_FILES * 2:
                self._mapped.pop(next(iter(self._mapped)))
        return hit[1]

    @staticmethod
    def _parameter(pipe, component, name):
        from .checkpoints.lora import UNET

        module = pipe.unet if component == UNET else pipe.text_encoder.encoders[int(component[2:])].model
        return module.get_parameter(name)

    def apply(self, pipe, wanted: list[tuple]) -> None:
        """Make ``wanted`` [(ActiveLora, LoraFile)] the applied set on ``pipe``'s weights."""
        import torch

        from .checkpoints.lora import add_delta, is_text_component

        key = tuple((a, lora) for a, lora in wanted)  # LoraFile compares by identity
        if key == self.applied:
            return
        deltas: dict = {}
        for active, lora in wanted:
            for target, weights in self.mapped(pipe, lora).items():
                multiplier = active.te if is_text_component(target[0]) else active.unet
                if multiplier == 0:
                    continue
                for w in weights:
                    deltas.setdefault(target, []).append((w, multiplier, active.dyn))
        with torch.no_grad():
            for target in [t for t in self.backups if t not in deltas]:  # restore, and forget the backup
                self._parameter(pipe, *target).copy_(self.backups.pop(target))
            for target, items in deltas.items():
                param = self._parameter(pipe, *target)
                original = self.backups.get(target)
                if original is None:
                    original = self.backups[target] = param.detach().clone()
                elif param.dtype == torch.float32:
                    param.copy_(original)
                if param.dtype == torch.float32 and param.is_contiguous():
                    total = param  # the deltas go straight into the weight, float32 already
                else:
                    total = original.to(torch.float32, copy=True).contiguous()  # summed in float32, cast once
                for w, multiplier, dyn in items:
                    add_delta(total, w, multiplier, dyn=dyn)
                if total is not param:
                    param.copy_(total)
        self.applied = key

    def restore(self, pipe) -> None:
        self.apply(pipe, [])


MISSING = ("error", "note")


def request_loras(request, *, missing: str = "error") -> tuple[list[ActiveLora], list[str]]:
    """The LoRAs a ``GenerationRequest`` asks for: its ``loras`` field, then the ``<lora:name:...>`` tags of its
    prompt (the negative prompt's tags are text). With ``missing="note"`` (A1111's routes), a tag whose numbers do
    not parse makes none of the prompt's tags apply, as in A1111, and says so in the notes; with "error" it raises
    the ``PromptError``."""
    from .errors import PromptError
    from .text.networks import extract_extra_networks

    wanted = [ActiveLora(name, te, unet) for name, te, unet in request.loras]
    _, tags = extract_extra_networks(request.prompt)
    tags = [t for t in tags if t.kind == "lora"]
    try:
        from_tags = [ActiveLora(t.name, *t.lora_weights()) for t in tags]
    except PromptError as exc:
        if missing == "error":
            raise
        return wanted, [f"{exc}: no LoRA tag of the prompt applied (as A1111)"]
    return wanted + from_tags, []
