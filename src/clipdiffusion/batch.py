"""Many generations into one output folder, resumable: what ``clipdiffusion batch`` runs, in-process or on Ray.

A job is a list of ``BatchItem(id, request, line)``: one image each, read from a JSON-lines file (``read_jsonl``:
one request per line in ``GenerationRequest``'s own field names plus ``id``) or a text file of prompts with shared
options (``read_prompts``: ``--n-seeds`` images per prompt). Every line is checked before any model work: an unknown
field, a bad value or a duplicate id is a ``ClipDiffusionError`` naming the file, the line and the field.

Output: ``DIR/<name>.png`` (``file_name(id)``: the id made safe as a file name; never a path taken from the input)
with the A1111 infotext in its "parameters" chunk, and ``DIR/manifest.jsonl``, one JSON record per finished image
(id, seed, file, sha256, batch, timings per stage in seconds). The PNG is written first (``fileio.atomic_write``),
its manifest line appended after, in one ``write`` of a whole line followed by ``fsync``: the manifest only grows,
so a rerun that rewrote it could lose it, and a line is the unit that is either there or not (a torn last line
from a crash is dropped when the next run opens the manifest, which it rewrites through ``atomic_write``).
Resuming: an id whose latest manifest record names a file that exists with the recorded sha256 is done and never
generated or written again; any other id runs (a crash between the PNG and its line leaves a PNG that the rerun
rewrites with identical bytes, seeds being fixed in the plan).

Planning (``plan_units``): items are ordered by compatible shape (``shape_key``); with ``max_unit`` > 1, items whose
requests differ only in their seed, with consecutive seeds, are one engine call with ``batch_size`` n (one UNet
batch). That is opt-in: measured here (torch 2.13 CPU, one thread), an image of a batch differs from the same seed
alone by up to 1/255 (latents by ~1e-4: the kernels block a batch of 6 differently from a batch of 2), so a batched
job is deterministic for one plan but not bit-identical to one call per image, nor across a resume that changes
the units; ``tests/test_batch.py`` measures it. The default (1) keeps every image bit-identical to ``generate``. ``run_unit(pipe, unit)`` runs one call and encodes the PNGs; both the
in-process runner (``run_local``) and the Ray actors (``clipdiffusion.ray_batch``) use it, with the torch thread
count set explicitly on both sides (``set_threads``), since the thread count moves CPU results.

Torch is imported only by ``run_unit``/``set_threads``; reading and planning are torch-free.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .errors import ClipDiffusionError
from .request import DEFAULTS, GenerationRequest, RequestError

MANIFEST = "manifest.jsonl"
MAX_ID_CHARS = 200
MAX_LINE_BYTES = 1 << 20  # one request line; a prompt is at most request.LIMITS.max_prompt_chars anyway
MAX_UNIT = 1  # images per engine call (plan_units): 1, as batches are not bit-identical (see above)
# Request fields a batch file cannot carry: images (no paths are read from the input), and the ones that make one
# line several images (one line is one image; --n-seeds / several lines give more).
REFUSED_FIELDS = {"init_image": "images cannot be given in a batch file", "mask": "images cannot be given in a "
                  "batch file", "batch_size": "one line is one image; give one line per seed (or --n-seeds)",
                  "n_iter": "one line is one image; give one line per seed (or --n-seeds)",
                  "attention_maps": "attention maps are not written by batch"}


@dataclass(frozen=True)
class BatchItem:
    """One image to make: ``id`` (unique in the job), the request (batch_size 1, seed resolved by ``plan``),
    ``line`` (1-based line of the input, for messages)."""

    id: str
    request: GenerationRequest
    line: int = 0

    @property
    def file(self) -> str:
        return file_name(self.id)


@dataclass
class Unit:
    """One engine call: ``items`` whose requests differ only by consecutive seeds, run as one batch."""

    items: list

    @property
    def request(self) -> GenerationRequest:
        first = self.items[0].request
        return dataclasses.replace(first, batch_size=len(self.items)) if len(self.items) > 1 else first


# -- reading ---------------------------------------------------------------------------------------------------


def _where(path, line: int) -> str:
    return f"{path}:{line}"


def check_id(value, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ClipDiffusionError(f"{where}: id={value!r}: must be a string or an integer")
    text = str(value)
    if not text or len(text) > MAX_ID_CHARS or any(ord(c) < 32 or c == "\x7f" for c in text):
        raise ClipDiffusionError(f"{where}: id={text[:80]!r}: must be 1 to {MAX_ID_CHARS} printable characters")
    return text


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def file_name(item_id: str) -> str:
    """The PNG file name of an id: letters, digits, ``.``, ``_`` and ``-`` kept, runs of anything else one ``_``,
    no leading dot, at most 100 characters; when that changed the id (``../x``, ``a/b``, ``ü``), 8 hex digits of
    the id's SHA-256 are added, so two ids never share a file. Never a path: no separator survives."""
    safe = _UNSAFE.sub("_", item_id).lstrip(".")[:100] or "item"
    if safe != item_id or safe.upper() == MANIFEST.upper():
        safe = f"{safe}-{hashlib.sha256(item_id.encode('utf-8')).hexdigest()[:8]}"
    return safe + ".png"


def _request(fields: dict, where: str) -> GenerationRequest:
    for name, reason in REFUSED_FIELDS.items():
        if name in fields and fields[name] != DEFAULTS[name]:
            raise ClipDiffusionError(f"{where}: {name}={fields[name]!r}: {reason}")
    unknown = [name for name in fields if name not in DEFAULTS]
    if unknown:
        raise ClipDiffusionError(f"{where}: unknown field {unknown[0]!r}; fields are id and the request's: "
                                 f"{', '.join(n for n in DEFAULTS if n not in REFUSED_FIELDS)}")
    values = dict(fields)
    for name in ("styles", "loras"):
        if isinstance(values.get(name), list):  # JSON has no tuples
            values[name] = tuple(tuple(x) if isinstance(x, list) else x for x in values[name])
    try:
        return GenerationRequest.create(**values).check_engine_names().require_honoured()
    except RequestError as exc:
        raise ClipDiffusionError(f"{where}: {exc}") from None


def read_jsonl(path, options: dict | None = None) -> list[BatchItem]:
    """Items of a JSON-lines file: one object per line (blank lines and lines starting with ``#`` skipped) with
    ``id`` and request fields; ``options`` (request fields) are defaults that a line's own fields override. Every
    line is checked here; errors name the file, the line and the field."""
    path = Path(path)
    items, seen = [], {}
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise ClipDiffusionError(f"requests={str(path)!r}: cannot read ({exc.strerror or exc})") from None
    with handle:
        for number, raw in enumerate(handle, 1):
            where = _where(path, number)
            if len(raw) > MAX_LINE_BYTES:
                raise ClipDiffusionError(f"{where}: the line is over {MAX_LINE_BYTES} bytes")
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise ClipDiffusionError(f"{where}: not UTF-8 text") from None
            if not text or text.startswith("#"):
                continue
            try:
                obj = json.loads(text, parse_constant=lambda c: _bad_constant(c, where))
            except json.JSONDecodeError as exc:
                raise ClipDiffusionError(f"{where}: not JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise ClipDiffusionError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            if "id" not in obj:
                raise ClipDiffusionError(f"{where}: missing field 'id'")
            item_id = check_id(obj.pop("id"), where)
            if item_id in seen:
                raise ClipDiffusionError(f"{where}: id={item_id!r} is also on line {seen[item_id]}; ids must be "
                                         "unique")
            seen[item_id] = number
            items.append(BatchItem(item_id, _request({**(options or {}), **obj}, where), number))
    return _checked_names(items, path)


def _bad_constant(name, where):
    raise ClipDiffusionError(f"{where}: {name} is not a number JSON allows")


def read_prompts(path, options: dict, n_seeds: int = 1) -> list[BatchItem]:
    """Items of a text file, one prompt per line (blank lines skipped; the text is the prompt verbatim), each
    with the shared ``options`` (request fields) and ``n_seeds`` seeds: ``seed``, ``seed + 1``, ... when the seed
    is fixed. Ids are ``p<line>`` (``p<line>-s<k>`` with several seeds)."""
    path = Path(path)
    if isinstance(n_seeds, bool) or not isinstance(n_seeds, int) or not 1 <= n_seeds <= 10_000:
        raise ClipDiffusionError(f"n-seeds={n_seeds!r}: must be an integer in [1, 10000]")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ClipDiffusionError(f"prompts={str(path)!r}: cannot read ({exc.strerror or exc})") from None
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise ClipDiffusionError(f"prompts={str(path)!r}: not UTF-8 text") from None
    items = []
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        base = _request({**options, "prompt": text}, _where(path, number))
        for k in range(n_seeds):
            seed = base.seed if base.seed == -1 else base.seed + k
            if seed != -1 and seed >= 2**64:
                raise ClipDiffusionError(f"{_where(path, number)}: seed={seed}: seeds must stay below 2**64")
            item_id = f"p{number:05d}" + (f"-s{k}" if n_seeds > 1 else "")
            items.append(BatchItem(item_id, dataclasses.replace(base, seed=seed), number))
    return _checked_names(items, path)


def _checked_names(items: list[BatchItem], path) -> list[BatchItem]:
    """Two ids whose file names collide (only on a filesystem that folds case) are refused."""
    seen = {}
    for item in items:
        key = item.file.lower()
        if key in seen:
            raise ClipDiffusionError(f"{_where(path, item.line)}: id={item.id!r} would be written as {item.file!r}, "
                                     f"which also holds id={seen[key].id!r} (line {seen[key].line})")
        seen[key] = item
    return items


# -- planning --------------------------------------------------------------------------------------------------


def resolve_seeds(items: list[BatchItem], rng=None) -> list[BatchItem]:
    """Seed -1 replaced by a random one per item (recorded in the manifest and the PNG)."""
    return [dataclasses.replace(item, request=item.request.resolve_seed(rng)) for item in items]


def shape_key(request: GenerationRequest) -> tuple:
    """What must agree for two requests to share one UNet batch: everything but the prompt texts and the seed
    (size, steps, sampler, schedule, guidance, clip skip, LoRAs, hires settings...). Units are formed within a
    key; keys order the work so that requests of one shape run together."""
    values = {f.name: getattr(request, f.name) for f in dataclasses.fields(request)}
    for name in ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt", "seed", "init_image", "mask"):
        values.pop(name)
    return tuple(sorted((k, repr(v)) for k, v in values.items()))


def plan_units(items: list[BatchItem], max_unit: int = MAX_UNIT) -> list[Unit]:
    """Engine calls for ``items`` (seeds resolved): grouped by ``shape_key`` (stable, first appearance first);
    within a group, items with identical requests but for consecutive seeds are one call of up to ``max_unit``
    images. Different prompts are separate calls: the engine batches one prompt over seeds."""
    if isinstance(max_unit, bool) or not isinstance(max_unit, int) or not 1 <= max_unit <= 64:
        raise ClipDiffusionError(f"max-batch={max_unit!r}: must be an integer in [1, 64]")
    groups: dict[tuple, list[BatchItem]] = {}
    for item in items:
        if item.request.seed == -1:
            raise ClipDiffusionError(f"id={item.id!r}: resolve the seed before planning")
        groups.setdefault(shape_key(item.request), []).append(item)
    units = []
    for group in groups.values():
        current: list[BatchItem] = []
        for item in group:
            if current and len(current) < max_unit and _continues(current[-1].request, item.request):
                current.append(item)
            else:
                if current:
                    units.append(Unit(current))
                current = [item]
        if current:
            units.append(Unit(current))
    return units


def _continues(previous: GenerationRequest, nxt: GenerationRequest) -> bool:
    return nxt.seed == previous.seed + 1 and dataclasses.replace(nxt, seed=previous.seed) == previous


# -- the manifest ----------------------------------------------------------------------------------------------


def sha256_file(path) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


class Manifest:
    """``DIR/manifest.jsonl``: the records of finished images, the latest per id. ``open`` reads it (a torn or
    unreadable line is dropped, and the file rewritten without it through ``atomic_write``); ``done(item)``:
    finished with its file intact; ``append(record)`` after the PNG is written."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / MANIFEST
        self.records: dict[str, dict] = {}
        self.dropped = 0

    @classmethod
    def open(cls, folder) -> Manifest:
        from .fileio import atomic_write, check_output

        manifest = cls(folder)
        check_output(manifest.path, "manifest")
        good = []
        try:
            data = manifest.path.read_bytes()
        except FileNotFoundError:
            data = b""
        except OSError as exc:
            raise ClipDiffusionError(f"manifest={str(manifest.path)!r}: cannot read ({exc.strerror})") from None
        for raw in data.split(b"\n"):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
                ok = isinstance(record, dict) and isinstance(record.get("id"), str) and \
                    isinstance(record.get("file"), str) and isinstance(record.get("sha256"), str)
            except (ValueError, UnicodeDecodeError):
                ok = False
            if not ok:
                manifest.dropped += 1
                continue
            good.append(raw)
            manifest.records[record["id"]] = record
        if manifest.dropped or (data and not data.endswith(b"\n")):
            body = b"".join(line + b"\n" for line in good)
            atomic_write(manifest.path, lambda f: f.write(body), field="manifest")
        return manifest

    def done(self, item: BatchItem) -> bool:
        record = self.records.get(item.id)
        if record is None or record["file"] != item.file:
            return False
        return sha256_file(self.folder / record["file"]) == record["sha256"]

    def append(self, record: dict) -> None:
        line = (json.dumps(record, sort_keys=True, ensure_ascii=True) + "\n").encode("ascii")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.records[record["id"]] = record


# -- running ---------------------------------------------------------------------------------------------------


def load_pipeline(model=None, *, device="cpu", dtype="fp32", **options):
    """The model of a job: a .safetensors file, a diffusers folder, or None for the embedded tiny model;
    ``options``: ``devices.load_options`` (``mmap``)."""
    from .pipeline import Pipeline

    if model is None:
        return Pipeline.default(device=device, dtype=dtype, **options)
    if Path(model).is_dir():
        return Pipeline.from_pretrained(model, device=device, dtype=dtype, **options)
    return Pipeline.from_file(model, device=device, dtype=dtype, **options)


def set_threads(threads: int) -> None:
    """Torch's intra-op thread count, the same on every side of a comparison (Ray sets OMP_NUM_THREADS=1 in
    fractional-CPU actors; the thread count moves CPU results by a unit in the last place)."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


class _Stopwatch:
    """Seconds spent in the text encoder and the VAE decoder of one call (wrapping the instances' methods)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.seconds = {"encode": 0.0, "vae": 0.0}

    def _wrap(self, owner, name, key):
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - t

        object.__setattr__(owner, name, timed)
        return owner, name

    def __enter__(self):
        self._patched = [self._wrap(self.pipe.text_encoder, "encode_texts", "encode"),
                         self._wrap(self.pipe.vae, "decode", "vae")]
        return self

    def __exit__(self, *exc):
        for owner, name in self._patched:
            owner.__dict__.pop(name, None)


def png_bytes(image, infotext: str) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", infotext)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def run_unit(pipe, request: GenerationRequest, ids: list[str]) -> list[dict]:
    """One engine call; per image ``{id, seed, file, png (bytes), sha256, batch, timings}``. Timings (seconds) are
    the call's: ``encode`` (text encoder), ``vae`` (decode), ``sample`` (the rest of generate: UNet and sampler),
    ``png`` (encoding this image), ``total``."""
    t0 = time.perf_counter()
    with _Stopwatch(pipe) as watch:
        result = pipe.generate(request)
    generated = time.perf_counter() - t0
    if len(result.images) != len(ids):
        raise ClipDiffusionError(f"ids {ids}: the engine returned {len(result.images)} images")
    out = []
    for item_id, image, seed, infotext in zip(ids, result.images, result.seeds, result.infotexts):
        t = time.perf_counter()
        data = png_bytes(image, infotext)
        png = time.perf_counter() - t
        timings = {"encode": watch.seconds["encode"], "vae": watch.seconds["vae"],
                   "sample": max(0.0, generated - watch.seconds["encode"] - watch.seconds["vae"]), "png": png,
                   "total": generated + png}
        out.append({"id": item_id, "seed": int(seed), "file": file_name(item_id), "png": data,
                    "sha256": hashlib.sha256(data).hexdigest(), "batch": len(ids),
                    "timings": {k: round(v, 4) for k, v in timings.items()}})
    return out


class Writer:
    """The one writer of a job's outputs: PNG through ``atomic_write``, then its manifest line; an id is written
    at most once per run (a repeated result, e.g. from a retried Ray task, is skipped)."""

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self.written: set[str] = set()

    def write(self, row: dict) -> bool:
        from .fileio import atomic_write

        if row["id"] in self.written:
            return False
        if hashlib.sha256(row["png"]).hexdigest() != row["sha256"]:
            raise ClipDiffusionError(f"id={row['id']!r}: the image's bytes do not match their sha256")
        data = row["png"]
        name = file_name(row["id"])  # from the id, never a path a worker or the input hands over
        atomic_write(self.manifest.folder / name, lambda f: f.write(data), field="output")
        record = {**{k: v for k, v in row.items() if k != "png"}, "file": name}
        self.manifest.append(record)
        self.written.add(row["id"])
        return True


class Progress:
    """``[#####-----] done/total images, s/image`` on one self-overwriting stderr line."""

    def __init__(self, total: int, stream=None, width: int = 30, skipped: int = 0):
        self.total, self.done, self.skipped = total, 0, skipped
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.start = time.perf_counter()

    def advance(self, n: int = 1) -> None:
        self.done += n
        filled = round(self.width * self.done / max(1, self.total))
        rate = (time.perf_counter() - self.start) / max(1, self.done)
        self.stream.write(f"\r[{'#' * filled}{'-' * (self.width - filled)}] {self.done}/{self.total} images "
                          f"{rate:.2f}s/image")
        if self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


@dataclass
class JobPlan:
    """What a run will do: the items still to make (seeds resolved), their engine calls, and what was skipped."""

    todo: list
    units: list
    skipped: list = field(default_factory=list)
    manifest: Manifest | None = None


def prepare(items: list[BatchItem], out_dir, *, max_unit: int = MAX_UNIT, rng=None) -> JobPlan:
    """Open the manifest in ``out_dir`` (an existing folder), drop the ids already done, resolve seeds, plan."""
    out = Path(out_dir)
    if not out.is_dir():
        raise ClipDiffusionError(f"out={str(out)!r}: no such folder")
    manifest = Manifest.open(out)
    done = {item.id for item in items if manifest.done(item)}
    skipped = [item for item in items if item.id in done]
    todo = resolve_seeds([item for item in items if item.id not in done], rng)
    return JobPlan(todo, plan_units(todo, max_unit), skipped, manifest)


def run_local(pipe, plan: JobPlan, *, threads: int = 1, progress: Progress | None = None,
              on_row: Callable | None = None) -> int:
    """Run ``plan`` in this process; returns the number of images written."""
    set_threads(threads)
    writer = Writer(plan.manifest)
    written = 0
    for unit in plan.units:
        for row in run_unit(pipe, unit.request, [item.id for item in unit.items]):
            written += writer.write(row)
            if on_row is not None:
                on_row(row)
        if progress is not None:
            progress.advance(len(unit.items))
    return written


def unit_rows(units: Iterable[Unit]) -> list[dict]:
    """Units as plain rows (JSON text of the request, the ids) for a Ray dataset: nothing pickled but strings."""
    rows = []
    for unit in units:
        request = unit.request
        fields = {f.name: getattr(request, f.name) for f in dataclasses.fields(request)
                  if f.name not in ("init_image", "mask")}
        rows.append({"request": json.dumps(fields), "ids": json.dumps([item.id for item in unit.items])})
    return rows


def request_from_row(row: dict) -> tuple[GenerationRequest, list[str]]:
    """The inverse of ``unit_rows`` (validated again: a row is data)."""
    fields = json.loads(row["request"])
    ids = json.loads(row["ids"])
    if not isinstance(fields, dict) or not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ClipDiffusionError("a batch row is malformed")
    for name in ("styles", "loras"):
        fields[name] = tuple(tuple(x) if isinstance(x, list) else x for x in fields.get(name, ()))
    return GenerationRequest.create(**fields), ids
