"""Reading and writing weights without trusting the file.

A ``.safetensors`` file is an 8-byte little-endian header length N, N bytes of JSON, then raw tensor bytes.
``read_header`` checks every claim the header makes (length, JSON schema, dtypes, shapes, byte sizes, offsets)
before a single tensor byte is allocated, following the rules of the reference Rust reader plus the extra
hardening in the safetensors "attacks" notes (see ../shared/reference/checkpoints.md §8.3-8.4). Only a file that
passes is handed to the safetensors library to map.

Pickled ``.ckpt``/``.pt``/``.bin`` files go through ``torch.load(weights_only=True, mmap=True)`` and nothing else:
a refusal there is reported, never retried with the unsafe unpickler (the attacker controls that refusal).

``read_header`` is torch-free so that describing a file does not need torch; the tensor functions import it.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError, ClipDiffusionError
from ..values import is_int

# The reference reader's MAX_HEADER_SIZE; ComfyUI's header peek uses the same bound.
MAX_HEADER_BYTES = 100_000_000
# SDXL single files hold ~2,600 tensors; anything near this is not a Stable Diffusion checkpoint.
MAX_TENSORS = 200_000
MAX_RANK = 8
MAX_NAME_CHARS = 1024
# A zero-byte tensor may claim any shape ([0, 2**70] spans 0 bytes), and torch.empty overflows on such sizes. Bound
# every dimension and the element count that the non-zero dimensions imply (strides must fit in 64 bits); real
# tensors are far smaller (the largest SD weight has ~1e8 elements).
MAX_DIM = 1 << 40
MAX_ELEMENTS = 1 << 50

# safetensors dtype string -> (torch dtype name, bytes per element). Only these load.
DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
_FP8 = {"F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}
# Valid in the format, but no Stable Diffusion checkpoint we load stores them; name them clearly.
_OTHER_KNOWN = {"U16", "U32", "U64", "C64", "F4", "F6_E2M3", "F6_E3M2"}
_TORCH_TO_ST = {torch_name: st for st, (torch_name, _) in DTYPES.items()}

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype string, e.g. "F16"
    shape: tuple[int, ...]
    offsets: tuple[int, int]  # [start, end) relative to the data region

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    data_start: int = 0  # file offset of the data region (8 + N)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: info.shape for name, info in self.tensors.items()}


def _reject_duplicates(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise _Duplicate(key)
        obj[key] = value
    return obj


class _Duplicate(Exception):
    pass


def _parse_entry(path, name, entry) -> TensorInfo:
    if not isinstance(entry, dict):
        raise CheckpointError(path, f"tensor {name!r}: header entry is {type(entry).__name__}, not an object")
    extra = set(entry) - {"dtype", "shape", "data_offsets"}
    missing = {"dtype", "shape", "data_offsets"} - set(entry)
    if missing or extra:
        raise CheckpointError(
            path, f"tensor {name!r}: header entry fields missing {sorted(missing)} unexpected {sorted(extra)}"
        )
    dtype = entry["dtype"]
    if dtype in _FP8:
        raise CheckpointError(
            path, f"tensor {name!r}: dtype {dtype} (fp8) is not supported; use an fp16/bf16/fp32 file"
        )
    if dtype in _OTHER_KNOWN:
        raise CheckpointError(path, f"tensor {name!r}: dtype {dtype} is not supported for model weights")
    if dtype not in DTYPES:
        raise CheckpointError(path, f"tensor {name!r}: unknown dtype {str(dtype)[:40]!r}")
    shape = entry["shape"]
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(
            path, f"tensor {name!r}: shape {str(shape)[:80]} must be a list of at most {MAX_RANK} non-negative integers"
        )
    if any(d > MAX_DIM for d in shape) or math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        raise CheckpointError(
            path, f"tensor {name!r}: shape {str(shape)[:80]} is too large (each dimension at most {MAX_DIM}, "
                  f"at most {MAX_ELEMENTS} elements)"
        )
    offsets = entry["data_offsets"]
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_int(o) and o >= 0 for o in offsets):
        raise CheckpointError(
            path, f"tensor {name!r}: data_offsets {str(offsets)[:80]} must be two non-negative integers"
        )
    start, end = offsets
    if end < start:
        raise CheckpointError(path, f"tensor {name!r}: data_offsets [{start}, {end}] end before start")
    # Python ints do not overflow, so the product is exact; compare it with the span instead of allocating anything.
    nbytes = math.prod(shape) * DTYPES[dtype][1]
    if nbytes != end - start:
        raise CheckpointError(
            path, f"tensor {name!r}: {dtype} {shape} needs {nbytes} bytes but data_offsets span {end - start}"
        )
    return TensorInfo(dtype, tuple(shape), (start, end))


def read_header(path) -> Header:
    """Parse and validate a safetensors header. Reads only the first 8 + N bytes; allocates nothing else."""
    path = Path(path)
    try:
        size = os.path.getsize(path)
        if not path.is_file():
            raise CheckpointError(path, "not a regular file")
        with open(path, "rb") as f:
            head = f.read(8)
            if size < 8 or len(head) < 8:
                raise CheckpointError(path, f"file is {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(path, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
            if n > size - 8:
                raise CheckpointError(path, f"header length {n} is larger than the file ({size} bytes)")
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(path, f"cannot read: {exc.strerror or exc}") from None
    if len(raw) != n:
        raise CheckpointError(path, "file shrank while reading the header")
    if not raw.startswith(b"{"):
        raise CheckpointError(path, "header does not start with '{' (not a safetensors file?)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(path, "header is not valid UTF-8") from None
    try:
        obj = json.loads(text, object_pairs_hook=_reject_duplicates)
    except _Duplicate as dup:
        raise CheckpointError(path, f"header has duplicate key {str(dup.args[0])[:80]!r}") from None
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(path, f"header is not valid JSON ({str(exc)[:80]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"header is a JSON {type(obj).__name__}, not an object")

    metadata = obj.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(path, "__metadata__ must map strings to strings")
    if len(obj) > MAX_TENSORS:
        raise CheckpointError(path, f"header lists {len(obj)} tensors, more than the {MAX_TENSORS} limit")

    tensors = {}
    for name, entry in obj.items():
        if len(name) > MAX_NAME_CHARS:
            raise CheckpointError(path, f"tensor name of {len(name)} characters exceeds {MAX_NAME_CHARS}")
        tensors[name] = _parse_entry(path, name, entry)

    # Spans sorted by start must tile [0, data_len) exactly: rejects overlaps (aliasing amplifies allocation),
    # gaps and out-of-range offsets, and trailing bytes that could hide a second payload.
    data_len = size - 8 - n
    cursor = 0
    for name, info in sorted(tensors.items(), key=lambda item: item[1].offsets):
        start, end = info.offsets
        if start != cursor:
            what = "overlaps the previous tensor" if start < cursor else f"leaves a gap after byte {cursor}"
            raise CheckpointError(path, f"tensor {name!r}: data_offsets [{start}, {end}] {what}")
        if end > data_len:
            raise CheckpointError(
                path, f"tensor {name!r}: data_offsets [{start}, {end}] beyond the {data_len}-byte data"
            )
        cursor = end
    if cursor != data_len:
        raise CheckpointError(path, f"data region is {data_len} bytes but the tensors cover {cursor}")
    return Header(tensors=tensors, metadata=dict(metadata), data_start=8 + n)


def is_pickle_path(path) -> bool:
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def _check_keys(path, available, keys):
    if keys is None:
        return list(available)
    keys = list(keys)
    missing = [k for k in keys if k not in available]
    if missing:
        raise CheckpointError(path, f"requested keys not in file: {missing[:10]}")
    return keys


def load_file(path, *, dtype=None, device="cpu", keys=None, copy=True) -> dict:
    """Load tensors from a ``.safetensors`` file (validated first) or a pickle via the weights-only unpickler.

    ``dtype`` casts floating-point tensors only (integer buffers keep their type); ``keys`` loads a subset.
    ``copy=True`` (the default) reads each tensor's bytes into memory of its own: nothing stays tied to the
    file, so a file truncated or rewritten later can neither change the weights nor crash the process with
    SIGBUS (checkpoints.md §8.4 item 9), and mapped file pages never add to the peak. ``copy=False`` keeps
    the safetensors library's zero-copy mapping (a private, copy-on-write ``mmap``) for callers that own the file:
    a tensor stays a view of the file where no cast or device move was asked (those copy), so a file truncated
    while mapped kills the process with SIGBUS when a page is touched, and one rewritten in place may change the
    weights. Pickles are mapped by ``torch.load(mmap=True)`` in that case (loaders that promise "safetensors
    only" pass ``copy=True`` for them).
    """
    if is_pickle_path(path):
        tensors = load_pickle(path)
        names = _check_keys(path, tensors, keys)
        return {name: _cast(tensors[name], dtype, device, copy) for name in names}
    header = read_header(path)
    names = _check_keys(path, header.tensors, keys)
    if copy and sys.byteorder == "little":
        return _read_tensors(path, header, names, dtype, device)
    from safetensors import safe_open

    out = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in names:
                out[name] = _cast(f.get_tensor(name), dtype, device, copy)
    except ClipDiffusionError:
        raise
    except Exception as exc:  # the file changed after validation, or the mapping failed
        raise CheckpointError(path, f"cannot load tensors: {str(exc)[:200]}") from None
    return out


def file_mappings(root) -> list[tuple[int, int]] | None:
    """Address ranges [start, end) that this process maps from ``root`` (a file, or any file under a folder), from
    ``/proc/self/maps``; None where the system does not tell (no procfs)."""
    root = os.path.realpath(root)
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    ranges = []
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) < 6:
            continue
        name = parts[5].strip()
        if name == root or name.startswith(root.rstrip(os.sep) + os.sep):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((start, end))
    return sorted(ranges)


def mapped_tensors(tensors, root) -> tuple[int, int] | None:
    """(count, bytes) of ``tensors`` whose memory lies in a mapping of ``root`` (``file_mappings``): views of the
    file, not copies. None where the system does not tell."""
    import bisect

    ranges = file_mappings(root)
    if ranges is None:
        return None
    starts = [start for start, _ in ranges]
    count = nbytes = 0
    for tensor in tensors:
        if tensor.device.type != "cpu" or tensor.numel() == 0:
            continue
        ptr = tensor.data_ptr()
        i = bisect.bisect_right(starts, ptr) - 1
        if i >= 0 and ptr < ranges[i][1]:
            count += 1
            nbytes += tensor.numel() * tensor.element_size()
    return count, nbytes


def _read_tensors(path, header: Header, names, dtype, device) -> dict:
    """Read validated spans straight into freshly allocated tensors (the format is little-endian, as we are)."""
    import torch

    out = {}
    try:
        with open(path, "rb") as f:
            for name in sorted(names, key=lambda n: header.tensors[n].offsets):  # one forward pass over the file
                info = header.tensors[name]
                tensor = torch.empty(info.shape, dtype=getattr(torch, DTYPES[info.dtype][0]))
                start, end = info.offsets
                if end > start:
                    f.seek(header.data_start + start)
                    if f.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) != end - start:
                        raise CheckpointError(path, f"file shrank while reading tensor {name!r}")
                out[name] = _cast(tensor, dtype, device, copy=False)
    except OSError as exc:
        raise CheckpointError(path, f"cannot read: {exc.strerror or exc}") from None
    return {name: out[name] for name in names}


def _cast(tensor, dtype, device, copy):
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        return tensor.to(dtype=dtype, device=device)  # a new tensor already
    if str(device) != "cpu":
        return tensor.to(device)
    return tensor.clone() if copy else tensor


# torch releases whose weights-only unpickler has a published code-execution bug (CVE-2025-32434 <= 2.5.1,
# CVE-2026-24747 <= 2.9.1): refuse pickles there rather than trust it.
_MIN_SAFE_TORCH = (2, 10)


def load_weights_only(path, *, mmap: bool = False):
    """``torch.load(weights_only=True)`` and nothing else: tensors and builtins only, on a torch without known
    bypasses of that unpickler; any failure is a ``CheckpointError`` (never a retry with ``weights_only=False``)."""
    import torch

    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if version < _MIN_SAFE_TORCH:
        raise CheckpointError(
            path, f"refusing pickle: torch {torch.__version__} has known weights_only bypasses; convert to safetensors"
        )
    if not Path(path).is_file():
        raise CheckpointError(path, "no such file")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:
        # Never fall back to weights_only=False: the file chose this error.
        reason = " ".join(str(exc).split())[:240]
        raise CheckpointError(path, f"refused by the weights-only unpickler: {type(exc).__name__}: {reason}") from None


def load_pickle(path) -> dict:
    """Load a pickled state dict with ``load_weights_only`` (memory-mapped); unwrap nested ``state_dict``."""
    import torch

    obj = load_weights_only(path, mmap=True)
    for _ in range(4):  # a ControlNet file in the wild nests state_dict twice
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"pickle holds a {type(obj).__name__}, not a state dict")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in obj.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if bad:
        raise CheckpointError(path, f"state dict has non-tensor entries: {', '.join(bad[:5])}")
    return dict(obj)


def read_shapes(path) -> tuple[dict[str, tuple[int, ...]], dict[str, str], dict[str, str]]:
    """(shapes, dtypes, metadata) without loading tensor data (pickles are memory-mapped, not read)."""
    if is_pickle_path(path):
        tensors = load_pickle(path)
        return (
            {k: tuple(v.shape) for k, v in tensors.items()},
            {k: _TORCH_TO_ST.get(str(v.dtype).removeprefix("torch."), str(v.dtype)) for k, v in tensors.items()},
            {},
        )
    header = read_header(path)
    return header.shapes(), {k: v.dtype for k, v in header.tensors.items()}, header.metadata


def save_file(tensors: dict, path, metadata: dict | None = None) -> None:
    """Write a safetensors file (sorted names, data aligned to 8 bytes), atomically via a temporary file."""
    import torch

    path = Path(path)
    metadata = dict(metadata or {})
    for k, v in metadata.items():
        if not (isinstance(k, str) and isinstance(v, str)):
            raise ClipDiffusionError(f"metadata: entry {k!r} must map a string to a string, got {type(v).__name__}")
    header: dict = {"__metadata__": metadata} if metadata else {}
    prepared = []
    offset = 0
    for name in sorted(tensors):
        tensor = tensors[name]
        if not isinstance(name, str) or not torch.is_tensor(tensor):
            raise ClipDiffusionError(f"tensors: entry {name!r} must map a string to a tensor")
        st_dtype = _TORCH_TO_ST.get(str(tensor.dtype).removeprefix("torch."))
        if st_dtype is None:
            raise ClipDiffusionError(f"tensors: {name!r} has unsupported dtype {tensor.dtype}")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        nbytes = flat.numel() * flat.element_size()
        header[name] = {"dtype": st_dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        prepared.append(flat)
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)  # spaces are the padding the format allows

    def write(f):
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for flat in prepared:
            if flat.numel():
                f.write(flat.view(torch.uint8).numpy().tobytes())

    atomic_write(path, write)


def atomic_write(path, write) -> None:
    """``fileio.atomic_write`` with failures as ``CheckpointError(path, reason)``: a random ``O_EXCL`` temporary
    file beside ``path`` (nothing planted under a predictable name such as the old ``OUT.tmp`` is opened or
    followed), renamed onto it; a failure keeps an existing ``path`` as it was. A symbolic link *at* ``path`` is
    replaced by the new file, its target left alone."""
    from ..fileio import atomic_write as write_atomically

    write_atomically(path, write, error=CheckpointError)


