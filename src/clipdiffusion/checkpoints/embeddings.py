"""Reading textual-inversion embedding files, which are untrusted input like checkpoints.

Formats (../shared/reference/prompt-language-and-networks.md §4.1, §4.3), recognised in this order:

1. A1111 ``.pt``: ``{"string_to_param": {"*": [n, D]}, "string_to_token", "name", "step", "sd_checkpoint",
   "sd_checkpoint_name"}``; exactly one ``string_to_param`` entry (any key).
2. SDXL pairs: ``{"clip_l": [n, 768], "clip_g": [n, 1280]}`` (``.safetensors`` or a pickle).
3. One tensor under one key: kohya/A1111 ``.safetensors`` ``{"emb_params": [n, D]}`` and diffusers
   ``learned_embeds`` ``{"<token>": [D] or [n, D]}`` (``.bin`` or ``.safetensors``); a 1-D vector is one row.

Anything else is a ``CheckpointError(path, reason)``. ``.safetensors`` headers are validated by
``safetensors_io.read_header`` and the names, dtypes and shapes checked before a byte of data is read; ``.pt`` and
``.bin`` go through ``torch.load(weights_only=True)`` only (``safetensors_io.load_weights_only``: any refusal is
reported, never retried). Vectors must be floating point, finite, 1..75 rows of a positive width; files over
``MAX_FILE_BYTES`` are refused unread. The trigger word is the file stem unless a name is given: the ``name`` stored
in ``.pt`` files is ignored, as A1111 does (diffusers uses it instead).

Folders (``scan_folder``): ``.pt .bin .safetensors`` files, recursively, in sorted path order; ``*.preview.*`` and
zero-byte files are passed over, as A1111 does. Two files whose names the prompt cannot tell apart (the same stem,
or stems with the same token ids such as ``Foo``/``foo``) collide: the first in sorted path order is loaded and the
other is reported under "skipped" (A1111 keeps whichever its directory walk meets last; sorted order is at least
reproducible).

Torch is imported only to read tensors: ``peek_embedding`` reads a ``.safetensors`` header without torch and imports
torch lazily for ``.pt``/``.bin`` (they have no header), so ``clipdiffusion tokens --embeddings DIR`` stays torch-free
for safetensors folders.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError, ClipDiffusionError
from ..text.embeddings import MAX_VECTORS, Embedding
from .safetensors_io import read_header

SUFFIXES = (".pt", ".bin", ".safetensors")
PICKLES = (".pt", ".bin")
MAX_FILE_BYTES = 64 * 2**20  # a 75-vector SDXL embedding in float32 is 600 KiB; anything this big is not one
MAX_FILES = 10_000
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
SDXL_KEYS = ("clip_l", "clip_g")
A1111_KEYS = ("string_to_param", "string_to_token", "name", "step", "sd_checkpoint", "sd_checkpoint_name")


@dataclass(frozen=True)
class EmbeddingFile:
    """What a file holds: ``tensors`` maps a tower name (``clip_l``/``clip_g``) or ``""`` (a single-tower file)
    to a float32 ``[vectors, width]`` tensor; ``shapes`` the same to widths (always present, also from a peek)."""

    path: str
    vectors: int
    widths: dict
    tensors: dict = field(default_factory=dict)
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None

    def info(self) -> dict:
        return {"step": self.step, "sd_checkpoint": self.sd_checkpoint,
                "sd_checkpoint_name": self.sd_checkpoint_name, "shape": sum(self.widths.values()),
                "vectors": self.vectors}


def stem_name(path) -> str:
    """The trigger word of a file: its name without the last suffix."""
    return Path(path).stem


def _check_size(path) -> None:
    try:
        if not os.path.isfile(path):
            raise CheckpointError(path, "no such file" if not os.path.exists(path) else "not a regular file")
        size = os.path.getsize(path)
    except OSError as exc:
        raise CheckpointError(path, f"cannot read: {exc.strerror or exc}") from None
    if size == 0:
        raise CheckpointError(path, "file is empty")
    if size > MAX_FILE_BYTES:
        raise CheckpointError(path, f"file is {size} bytes, more than the {MAX_FILE_BYTES} an embedding can need")


def _suffix(path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise CheckpointError(path, f"suffix {suffix or '(none)'!r} is not an embedding file; use "
                              + ", ".join(SUFFIXES))
    return suffix


def _shape_of(path, key, shape, dtype_ok, dtype) -> tuple:
    """Validated ``(vectors, width)`` of one tensor's shape."""
    shape = tuple(shape)
    if not dtype_ok:
        raise CheckpointError(path, f"tensor {key!r} has dtype {dtype}; embedding vectors must be floating point")
    if len(shape) == 1:
        shape = (1, shape[0])
    if len(shape) != 2:
        raise CheckpointError(path, f"tensor {key!r} has shape {list(shape)}; an embedding is [vectors, width]")
    rows, width = shape
    if rows == 0:
        raise CheckpointError(path, f"tensor {key!r} has zero vectors")
    if rows > MAX_VECTORS:
        raise CheckpointError(path, f"tensor {key!r} has {rows} vectors, more than fit in one {MAX_VECTORS}-token "
                              "chunk")
    if width == 0:
        raise CheckpointError(path, f"tensor {key!r} has zero width")
    return rows, width


def _layout(path, keys) -> dict:
    """Which keys hold the vectors: ``{tower or "": key}`` from the top-level keys of a tensor-only mapping."""
    keys = list(keys)
    if all(k in keys for k in SDXL_KEYS):
        extra = [k for k in keys if k not in SDXL_KEYS]
        if extra:
            raise CheckpointError(path, f"SDXL embedding has unexpected entries besides clip_l/clip_g: {extra[:5]}")
        return {"clip_l": "clip_l", "clip_g": "clip_g"}
    if len(keys) == 1:
        return {"": keys[0]}
    shown = ", ".join(repr(k)[:60] for k in keys[:8]) or "none"
    raise CheckpointError(path, f"not an embedding: expected string_to_param, clip_l+clip_g, or one tensor; "
                          f"found keys {shown}")


def _finish(path, shapes: dict) -> tuple:
    """(vectors, widths) from validated per-tower shapes; SDXL towers must have as many vectors."""
    rows = {s[0] for s in shapes.values()}
    if len(rows) != 1:
        raise CheckpointError(path, "clip_l and clip_g have different numbers of vectors: "
                              + ", ".join(f"{k} {v[0]}" for k, v in shapes.items()))
    return rows.pop(), {k: v[1] for k, v in shapes.items()}


def _peek_safetensors(path) -> tuple:
    header = read_header(path)
    layout = _layout(path, header.tensors)
    shapes = {}
    for tower, key in layout.items():
        info = header.tensors[key]
        shapes[tower] = _shape_of(path, key, info.shape, info.dtype in FLOAT_DTYPES, info.dtype)
    return layout, shapes, header


def _text(value, limit=200):
    return value[:limit] if isinstance(value, str) else None


def _from_object(path, obj) -> EmbeddingFile:
    """A weights-only unpickled object -> validated EmbeddingFile (tensors float32)."""
    import torch

    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise CheckpointError(path, f"holds a {type(obj).__name__}, not a dict of named tensors")
    step = sd_checkpoint = sd_name = None
    if "string_to_param" in obj:
        params = obj["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            count = len(params) if isinstance(params, dict) else type(params).__name__
            raise CheckpointError(path, f"string_to_param must hold exactly one entry, got {count}")
        key, tensor = next(iter(params.items()))
        candidates = {"": (f"string_to_param[{key!r}]", tensor)}
        raw_step = obj.get("step")
        step = raw_step if isinstance(raw_step, int) and not isinstance(raw_step, bool) else None
        sd_checkpoint, sd_name = _text(obj.get("sd_checkpoint")), _text(obj.get("sd_checkpoint_name"))
    else:
        candidates = {tower: (key, obj[key]) for tower, key in _layout(path, obj).items()}
    shapes, tensors = {}, {}
    for tower, (key, tensor) in candidates.items():
        if not torch.is_tensor(tensor):
            raise CheckpointError(path, f"{key} is a {type(tensor).__name__}, not a tensor")
        dtype = str(tensor.dtype).removeprefix("torch.")
        shapes[tower] = _shape_of(path, key, tensor.shape, tensor.is_floating_point(), dtype)
        tensors[tower] = _vectors(path, key, tensor)
    vectors, widths = _finish(path, shapes)
    return EmbeddingFile(str(path), vectors, widths, tensors, step, sd_checkpoint, sd_name)


def _vectors(path, key, tensor):
    import torch

    tensor = tensor.detach().to(device="cpu", dtype=torch.float32)
    if tensor.dim() == 1:
        tensor = tensor[None]
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(path, f"tensor {key} has {bad} non-finite value(s) (NaN/Inf)")
    return tensor.clone().contiguous()


def read_embedding(path) -> EmbeddingFile:
    """Read and validate an embedding file (any format above); every failure is a ``CheckpointError``."""
    suffix = _suffix(path)
    _check_size(path)
    if suffix == ".safetensors":
        layout, shapes, _ = _peek_safetensors(path)
        from .safetensors_io import load_file

        loaded = load_file(path, keys=list(layout.values()))
        tensors = {tower: _vectors(path, key, loaded[key]) for tower, key in layout.items()}
        vectors, widths = _finish(path, shapes)
        return EmbeddingFile(str(path), vectors, widths, tensors)
    from .safetensors_io import load_weights_only

    obj = load_weights_only(path)
    try:
        return _from_object(path, obj)
    except CheckpointError:
        raise
    except Exception as exc:  # anything odd inside an unpickled structure is the file's fault
        raise CheckpointError(path, f"unreadable embedding: {type(exc).__name__}: {str(exc)[:160]}") from None


def peek_embedding(path) -> EmbeddingFile:
    """Vectors and widths without loading tensor data where the format allows: a ``.safetensors`` header only
    (torch-free); a pickle is loaded (weights only; torch imported here)."""
    suffix = _suffix(path)
    _check_size(path)
    if suffix == ".safetensors":
        _, shapes, _ = _peek_safetensors(path)
        vectors, widths = _finish(path, shapes)
        return EmbeddingFile(str(path), vectors, widths)
    return read_embedding(path)


def file_hash(path) -> str:
    """The first 12 hex digits of the file's sha256 (A1111's embedding short hash)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def tower_tensors(file: EmbeddingFile, text_encoder) -> tuple:
    """The file's tensors in ``text_encoder``'s tower order, widths checked; a ``CheckpointError`` otherwise."""
    path = file.path
    encoders = text_encoder.encoders
    describe = ", ".join(f"{e.name} {e.model.config.width}" for e in encoders)
    if "" in file.tensors:
        if len(encoders) != 1:
            raise CheckpointError(path, f"a one-tower embedding ({file.widths['']} wide) cannot condition this "
                                  f"{text_encoder.family} model, which has towers {describe} (an SDXL embedding "
                                  "holds clip_l and clip_g)")
        picked = [("", file.tensors[""])]
    else:
        names = tuple(e.name for e in encoders)
        if names != SDXL_KEYS:
            raise CheckpointError(path, f"an SDXL embedding (clip_l + clip_g) cannot condition this "
                                  f"{text_encoder.family} model, which has towers {describe}")
        picked = [(name, file.tensors[name]) for name in names]
    for spec, (key, tensor) in zip(encoders, picked):
        width = spec.model.config.width
        if tensor.shape[1] != width:
            label = key or "vector"
            raise CheckpointError(path, f"{label} width is {tensor.shape[1]}, but this {text_encoder.family} model's "
                                  f"{spec.name} tower is {width} wide (an embedding for another model family?)")
    return tuple(t for _, t in picked)


def embedding_for(path, text_encoder, *, name=None) -> Embedding:
    """Read ``path`` and make the :class:`Embedding` for ``text_encoder`` (not yet registered). ``name``: the
    trigger word (default: the file stem)."""
    from ..text.embeddings import check_name

    file = read_embedding(path)
    tensors = tower_tensors(file, text_encoder)
    name = check_name(stem_name(path) if name is None else name)
    return Embedding(name, file.vectors, tuple(t.shape[1] for t in tensors), tensors, file.step,
                     file.sd_checkpoint, file.sd_checkpoint_name, str(path), file_hash(path))


def scan_folder(folder) -> list:
    """Embedding files under ``folder``: ``[path]`` in sorted order (recursive; ``*.preview.*``, zero-byte files
    and other suffixes passed over). A missing folder is a ``ClipDiffusionError`` naming it."""
    folder = str(folder)
    if not os.path.isdir(folder):
        raise ClipDiffusionError(f"embeddings folder {folder!r}: no such folder")
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for fn in sorted(files):
            path = os.path.join(root, fn)
            if Path(fn).suffix.lower() not in SUFFIXES or ".preview." in fn.lower():
                continue
            try:
                if not os.path.isfile(path) or os.path.getsize(path) == 0:
                    continue
            except OSError:
                continue
            found.append(path)
            if len(found) > MAX_FILES:
                raise ClipDiffusionError(f"embeddings folder {folder!r} has more than {MAX_FILES} embedding files")
    return sorted(found, key=lambda p: os.path.relpath(p, folder))


@dataclass
class FolderReport:
    """A folder's embeddings: ``loaded`` (``Embedding`` list, in order) and ``skipped`` {name: info + reason}."""

    folder: str
    loaded: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)

    def to_a1111(self) -> dict:
        return {"loaded": {e.name: e.info() for e in self.loaded}, "skipped": dict(self.skipped)}


def _skip(report, name, reason, info=None):
    entry = dict(info or {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                          "vectors": None})
    entry["reason"] = reason
    key, n = name, 2
    while key in report.skipped:  # two broken files of one name: keep both reasons
        key, n = f"{name} ({n})", n + 1
    report.skipped[key] = entry


def _name_key(name, tokenizer):
    return tuple(tokenizer.encode(name)) if tokenizer is not None else name


def load_folder(folder, text_encoder=None, *, tokenizer=None) -> FolderReport:
    """Every embedding file of ``folder``, read and checked against ``text_encoder`` (full tensors), or, without
    one, only counted (``peek_embedding``: names, vectors and widths for the token counter). Nothing is registered
    here. A file that fails is skipped with its reason; so is a name already taken by an earlier file."""
    from ..text.embeddings import check_name

    report = FolderReport(str(folder))
    tokenizer = tokenizer or (text_encoder.tokenizer if text_encoder is not None else None)
    taken = {}
    for path in scan_folder(folder):
        name = stem_name(path)
        rel = os.path.relpath(path, folder)
        try:
            check_name(name)
            key = _name_key(name, tokenizer)
            if not key:
                raise ClipDiffusionError("the name has no tokens, so no prompt can name it")
            if key in taken:
                _skip(report, name, f"{rel}: the name collides with {taken[key]}, loaded first (sorted order)")
                continue
            if text_encoder is None:
                file = peek_embedding(path)
                embedding = Embedding(name, file.vectors, tuple(file.widths.values()), (), file.step,
                                      file.sd_checkpoint, file.sd_checkpoint_name, path)
            else:
                embedding = embedding_for(path, text_encoder, name=name)
        except ClipDiffusionError as exc:
            reason = str(exc) if isinstance(exc, CheckpointError) else f"{rel}: {exc}"
            _skip(report, name, reason, _known_info(path))
            continue
        taken[key] = rel
        report.loaded.append(embedding)
    return report


def _known_info(path):
    """A skipped file's A1111 fields where its header still tells them (a width mismatch, say)."""
    try:
        return peek_embedding(path).info() if Path(path).suffix.lower() == ".safetensors" else None
    except ClipDiffusionError:
        return None


def describe_report(report: FolderReport) -> list:
    """Lines for the CLI: how many embeddings a folder gave, and why each skipped file was skipped."""
    names = ", ".join(f"{e.name} ({e.vectors})" for e in report.loaded[:20])
    more = f", ... ({len(report.loaded) - 20} more)" if len(report.loaded) > 20 else ""
    lines = [f"embeddings: {len(report.loaded)} loaded from {report.folder}" + (f": {names}{more}" if names else "")]
    lines += [f"embedding {name} skipped: {entry['reason']}" for name, entry in report.skipped.items()]
    return lines


def counting_tokenizer(tokenizer, folder):
    """``(tokenizer that knows the folder's embeddings, FolderReport)`` for counting tokens without a model: names
    and vector counts only (``load_folder`` without a text encoder), so widths are not checked against a model."""
    from ..text.embeddings import EmbeddingRegistry

    report = load_folder(folder, tokenizer=tokenizer)
    return EmbeddingRegistry.build(report.loaded, tokenizer).wrap(tokenizer), report
