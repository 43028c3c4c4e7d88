"""A corpus of broken and malicious model files and folders, built from a tiny random model in well under a second.

``build(root) -> list[Case]`` writes every case under ``root``; tests/test_hostile_corpus.py runs each through the
commands users run (``info``, ``info --check``, ``generate``, ``convert``) and asserts the clean outcome: a one-line
error naming the file or the field, exit 2, no traceback, nothing written or overwritten, no marker file from a
malicious pickle. ``python tests/hostile_corpus.py DIR`` writes the corpus to DIR for auditing by hand.

Each case says what the commands must do with it:
- ``refused``: ``generate`` and ``convert`` exit 2 with one line that contains ``mention`` (a key, field or value);
  ``info`` reads headers only, so it refuses the ``container`` cases and may describe the others (never a traceback).
- ``nonfinite``: the file is well formed but its weights hold NaN/Inf; ``info`` describes it (exit 0),
  ``info --check`` names the tensor and exits non-zero, ``generate`` exits 2 naming the stage (``mention``),
  ``convert`` copies it faithfully or refuses it cleanly.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import struct
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

MARKER_NAME = "PWNED"  # what the malicious pickles try to create, next to the corpus


@dataclass
class Case:
    name: str
    path: Path
    kind: str = "refused"  # "refused" | "nonfinite"
    mention: str = ""  # text the one-line error must contain ("" = only the path or a field)
    isolate: bool = False  # run in a subprocess with a timeout (FIFOs, devices: must never block)
    tags: tuple = field(default_factory=tuple)  # "container": broken before any model is read (info refuses too)


# --- raw safetensors building ---------------------------------------------------------------------------------


def raw_safetensors(header: dict, data: bytes = b"", *, length: int | None = None) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def _read(path: Path) -> tuple[dict, bytes]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a safetensors file, letting ``edit(header, data) -> (header, data)`` change it (offsets are the editor's)."""
    header, data = _read(src)
    header, data = edit(copy.deepcopy(header), bytearray(data))
    dst.write_bytes(raw_safetensors(header, bytes(data)))
    return dst


def _retype(header, data, key, dtype, size, *, drop=False):
    """Store tensor ``key`` as ``dtype`` (``size`` bytes per element), keeping the shape, or ``drop`` it; re-lays
    every offset so that the container stays valid."""
    out, blobs, cursor = {}, [], 0
    meta = header.pop("__metadata__", None)
    for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]):
        start, end = entry["data_offsets"]
        chunk = bytes(data[start:end])
        if name == key and drop:
            continue
        if name == key:
            n = 1
            for d in entry["shape"]:
                n *= d
            chunk, entry = b"\x01" * (n * size), dict(entry, dtype=dtype)
        out[name] = dict(entry, data_offsets=[cursor, cursor + len(chunk)])
        blobs.append(chunk)
        cursor += len(chunk)
    if meta is not None:
        out["__metadata__"] = meta
    return out, bytearray(b"".join(blobs))


def _poison(header, data, key, value: float):
    """Set the first element of F32 tensor ``key`` to ``value`` (NaN, inf)."""
    entry = header[key]
    assert entry["dtype"] == "F32", entry
    start = entry["data_offsets"][0]
    data[start : start + 4] = struct.pack("<f", value)
    return header, data


def _first_key(header, prefix, suffix=""):
    return next(k for k in sorted(header) if k.startswith(prefix) and k.endswith(suffix))


def _meta_edit(key, change):
    def edit(header, data):
        meta = header["__metadata__"]
        value = json.loads(meta[key])
        change(value)
        meta[key] = json.dumps(value)
        return header, data

    return edit


# --- malicious pickles ----------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _torch_zip_with(obj, path: Path):
    import torch

    torch.save(obj, path)  # torch's zip container with our pickle inside (torch.save pickles __reduce__)


def _zip_traversal(path: Path, marker: Path):
    """A torch-style zip whose pickle is benign-looking but which also holds entries escaping the folder."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"a": 1}, protocol=2))
        z.writestr("archive/version", "3\n")
        z.writestr("../../" + marker.name, "escaped")
        z.writestr("/" + str(marker).lstrip("/") + ".abs", "absolute")


# --- the corpus -----------------------------------------------------------------------------------------------


def _tiny_sources(root: Path):
    """A tiny random SD1-style model saved as one file and as a diffusers folder (the corpus' valid base)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_checkpoint_load import tiny_model

    from clipdiffusion.checkpoints.save import save_checkpoint, save_diffusers

    base = root / "_base"
    base.mkdir(parents=True, exist_ok=True)
    model = tiny_model("tiny")
    single = save_checkpoint(model, base / "good.safetensors")
    folder = save_diffusers(model, base / "good-diffusers")
    return single, folder


def build(root) -> list[Case]:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    single, folder = _tiny_sources(root)
    files = root / "files"
    files.mkdir(exist_ok=True)
    header, _ = _read(single)
    unet_key = _first_key(header, "model.diffusion_model.middle_block.", ".weight")
    vae_key = _first_key(header, "first_stage_model.", ".weight")
    text_key = _first_key(header, "cond_stage_model.", "token_embedding.weight")
    conv_out = "first_stage_model.decoder.conv_out.weight"
    cases: list[Case] = []

    def add(name, data: bytes, **kw):
        """A file whose container (header, offsets, pickle) is broken: even ``info`` must refuse it."""
        kw.setdefault("tags", ("container",))
        path = files / name
        path.write_bytes(data)
        cases.append(Case(name, path, **kw))

    def edited(name, edit, **kw):
        cases.append(Case(name, _rewrite(single, files / name, edit), **kw))

    good = single.read_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    # 1. the container itself
    add("empty.safetensors", b"")
    add("seven-bytes.safetensors", b"\x10\x00\x00\x00\x00\x00\x00")
    add("header-longer-than-file.safetensors", struct.pack("<Q", 10_000) + b"{}")
    add("header-2pow60.safetensors", struct.pack("<Q", 2**60) + b"{}" * 8)
    add("header-not-json.safetensors", struct.pack("<Q", 6) + b"{nope}")
    add("header-json-array.safetensors", raw_safetensors([]))  # type: ignore[arg-type]
    add("header-not-utf8.safetensors", struct.pack("<Q", 4) + b"{\xff\xfe}")
    deep = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    add("header-deep-nesting.safetensors", struct.pack("<Q", len(deep)) + deep)
    dup = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    add("duplicate-keys.safetensors", struct.pack("<Q", len(dup)) + dup + b"\0" * 4, mention="duplicate")
    add("truncated-data.safetensors", good[: len(good) - 1000])
    add("truncated-header.safetensors", good[: 8 + n // 2])
    add("trailing-bytes.safetensors", good + b"\0" * 64)
    t = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    add("overlapping-offsets.safetensors",
        raw_safetensors({"a": t, "b": dict(t, data_offsets=[4, 12])}, b"\0" * 12), mention="overlaps")
    add("aliased-offsets.safetensors", raw_safetensors({"a": t, "b": t}, b"\0" * 8), mention="overlaps")
    add("gap-between-tensors.safetensors",
        raw_safetensors({"a": t, "b": dict(t, data_offsets=[16, 24])}, b"\0" * 24), mention="gap")
    add("offsets-beyond-data.safetensors", raw_safetensors({"a": dict(t, data_offsets=[0, 8])}, b"\0" * 4))
    add("offsets-end-before-start.safetensors", raw_safetensors({"a": dict(t, data_offsets=[8, 0])}, b"\0" * 8))
    add("wrong-byte-size.safetensors", raw_safetensors({"a": dict(t, shape=[3])}, b"\0" * 8))
    add("unknown-dtype.safetensors", raw_safetensors({"a": dict(t, dtype="X9")}, b"\0" * 8), mention="X9")
    add("fp8-dtype.safetensors", raw_safetensors({"a": {"dtype": "F8_E4M3", "shape": [8], "data_offsets": [0, 8]}},
                                                 b"\0" * 8), mention="F8_E4M3")
    add("negative-dim.safetensors", raw_safetensors({"a": dict(t, shape=[-2])}, b"\0" * 8))
    add("float-dim.safetensors", raw_safetensors({"a": dict(t, shape=[2.0])}, b"\0" * 8))
    add("rank-9.safetensors", raw_safetensors({"a": dict(t, shape=[1] * 8 + [2])}, b"\0" * 8))
    add("name-2000-chars.safetensors", raw_safetensors({"x" * 2000: t}, b"\0" * 8))
    add("metadata-not-strings.safetensors", raw_safetensors({"__metadata__": {"a": 1}, "a": t}, b"\0" * 8),
        mention="__metadata__")
    add("entry-extra-field.safetensors", raw_safetensors({"a": dict(t, evil=1)}, b"\0" * 8))
    add("random-bytes.safetensors", bytes(range(256)) * 64)
    # 2. well-formed containers, hostile content
    huge_zero = lambda h, d: (dict(h, **{"cond_stage_model.transformer.evil": {  # noqa: E731
        "dtype": "F32", "shape": [0, 2**70], "data_offsets": [len(d), len(d)]}}), d)
    edited("zero-bytes-shape-2pow70.safetensors", huge_zero, mention="cond_stage_model.transformer.evil")
    edited("unet-int8.safetensors", lambda h, d: _retype(h, d, unet_key, "I8", 1), mention=unet_key)
    edited("vae-bool.safetensors", lambda h, d: _retype(h, d, vae_key, "BOOL", 1), mention=vae_key)
    edited("text-int32.safetensors", lambda h, d: _retype(h, d, text_key, "I32", 4), mention=text_key)
    edited("missing-unet-key.safetensors", lambda h, d: _retype(h, d, unet_key, None, 0, drop=True),
           mention=unet_key)
    extra = {"dtype": "F32", "shape": [1], "data_offsets": None}

    def stray(h, d):
        h["model.diffusion_model.evil.weight"] = dict(extra, data_offsets=[len(d), len(d) + 4])
        return h, d + b"\0" * 4

    edited("stray-unet-key.safetensors", stray, mention="model.diffusion_model.evil.weight")

    def reshape(h, d):  # same byte count, wrong shape
        e = h[unet_key]
        numel = 1
        for s in e["shape"]:
            numel *= s
        h[unet_key] = dict(e, shape=[numel])
        return h, d

    edited("unet-wrong-shape.safetensors", reshape, mention=unet_key)
    add("no-model-at-all.safetensors", raw_safetensors({"weight": t}, b"\0" * 8), tags=())
    # 3. our metadata configs
    edited("meta-unet-norm-groups-7.safetensors",
           _meta_edit("clipdiffusion.unet_config", lambda c: c.update(norm_groups=7)), mention="norm_groups")
    edited("meta-unet-model-channels-negative.safetensors",
           _meta_edit("clipdiffusion.unet_config", lambda c: c.update(model_channels=-48)), mention="model_channels")
    edited("meta-vae-norm-groups-0.safetensors",
           _meta_edit("clipdiffusion.vae_config", lambda c: c.update(norm_groups=0)), mention="norm_groups")
    edited("meta-vae-scale-factor-nan.safetensors",
           _meta_edit("clipdiffusion.vae_config", lambda c: c.update(scale_factor=float("nan"))),
           mention="scale_factor")
    edited("meta-vae-scale-factor-0.safetensors",
           _meta_edit("clipdiffusion.vae_config", lambda c: c.update(scale_factor=0)), mention="scale_factor")
    edited("meta-text-layer-norm-eps-nan.safetensors",
           _meta_edit("clipdiffusion.text_configs", lambda c: c[0].update(layer_norm_eps=float("nan"))),
           mention="layer_norm_eps")
    edited("meta-unet-config-string.safetensors",
           _meta_edit("clipdiffusion.unet_config", lambda c: c.update(channel_mult="ab")), mention="channel_mult")

    def meta_set(key, value):
        def edit(h, d):
            h["__metadata__"][key] = value
            return h, d

        return edit

    edited("meta-unet-config-not-json.safetensors", meta_set("clipdiffusion.unet_config", "{oops"),
           mention="clipdiffusion.unet_config")
    edited("meta-family-unknown.safetensors", meta_set("clipdiffusion.family", "sd9"), mention="sd9")
    edited("meta-prediction-unknown.safetensors", meta_set("clipdiffusion.prediction", "x0"), mention="x0")
    # a text tower with too few positions for a CLIP window (77..1024: CLIP 77, Long-CLIP 248), read from the weights
    short = files / "text-positions-20.safetensors"
    _with_tensors(single, short, _cut_positions(20), drop_meta=("clipdiffusion.text_configs",))
    cases.append(Case(short.name, short, mention="20 positions"))
    # 4. non-finite weights: well-formed files that would draw a black image
    nan, inf = float("nan"), float("inf")
    edited("nan-one-unet-element.safetensors", lambda h, d: _poison(h, d, unet_key, nan), kind="nonfinite",
           mention="UNet")
    edited("nan-text-encoder.safetensors", lambda h, d: _poison_all(h, d, "cond_stage_model."), kind="nonfinite",
           mention="text encoder")
    edited("inf-vae-conv-out.safetensors", lambda h, d: _poison(h, d, conv_out, inf), kind="nonfinite",
           mention="VAE")
    # 5. pickles
    marker = root / MARKER_NAME
    evil_raw = pickle.dumps({"state_dict": _Payload(marker)}, protocol=2)
    add("malicious-raw-pickle.ckpt", evil_raw)
    torch_evil = files / "malicious-torch-zip.pt"
    _torch_zip_with({"state_dict": {"x": _Payload(marker)}}, torch_evil)
    cases.append(Case(torch_evil.name, torch_evil, tags=("container",)))
    add("malicious-pickle-as-bin.bin", evil_raw)
    traversal = files / "zip-path-traversal.ckpt"
    _zip_traversal(traversal, marker)
    cases.append(Case(traversal.name, traversal, tags=("container",)))
    add("garbage.ckpt", b"this is not a pickle" * 10)
    list_pickle = files / "list-pickle.pt"
    _torch_zip_with([1, 2, 3], list_pickle)
    cases.append(Case(list_pickle.name, list_pickle, mention="list", tags=("container",)))
    nontensor = files / "non-tensor-values.ckpt"
    _torch_zip_with({"state_dict": {"model.diffusion_model.x": "hello"}}, nontensor)
    cases.append(Case(nontensor.name, nontensor, tags=("container",)))
    # 6. links and special files
    special = root / "special"
    special.mkdir(exist_ok=True)
    fifo = special / "fifo.safetensors"
    os.mkfifo(fifo)
    cases.append(Case("fifo.safetensors", fifo, isolate=True, tags=("container",)))
    fifo_ckpt = special / "fifo.ckpt"
    os.mkfifo(fifo_ckpt)
    cases.append(Case("fifo.ckpt", fifo_ckpt, isolate=True, tags=("container",)))
    dev = special / "dev-zero.safetensors"
    dev.symlink_to("/dev/zero")
    cases.append(Case("link-to-dev-zero.safetensors", dev, isolate=True, tags=("container",)))
    loop = special / "loop.safetensors"
    loop.symlink_to(loop.name)
    cases.append(Case("symlink-loop.safetensors", loop, tags=("container",)))
    dangling = special / "dangling.safetensors"
    dangling.symlink_to(special / "does-not-exist.safetensors")
    cases.append(Case("dangling-symlink.safetensors", dangling, tags=("container",)))
    dir_named = special / "dir.safetensors"
    dir_named.mkdir()
    cases.append(Case("folder-named-safetensors", dir_named, tags=("container",)))
    # 7. diffusers folders
    cases += _folder_cases(folder, root / "folders")
    return cases


def _with_tensors(src: Path, dst: Path, edit, *, drop_meta=()) -> Path:
    """Copy a safetensors file through the tensor reader and writer, letting ``edit(tensors)`` change it."""
    from clipdiffusion.checkpoints.safetensors_io import load_file, read_header, save_file

    tensors = load_file(src)
    edit(tensors)
    metadata = {k: v for k, v in read_header(src).metadata.items() if k not in drop_meta}
    save_file(tensors, dst, metadata)
    return dst


def _cut_positions(rows: int):
    def edit(tensors):
        key = next(k for k in tensors if k.endswith("position_embedding.weight") and k.startswith("cond_stage_model."))
        tensors[key] = tensors[key][:rows].clone()

    return edit


def _poison_all(header, data, prefix):
    """Every F32 tensor under ``prefix`` becomes NaN."""
    for name, entry in header.items():
        if name.startswith(prefix) and isinstance(entry, dict) and entry.get("dtype") == "F32":
            start, end = entry["data_offsets"]
            data[start:end] = struct.pack("<f", float("nan")) * ((end - start) // 4)
    return header, data


def _folder_cases(good: Path, root: Path) -> list[Case]:
    import shutil

    root.mkdir(parents=True, exist_ok=True)
    cases = []

    def variant(name, sub, change, *, mention="", kind="refused"):
        dst = root / name
        shutil.copytree(good, dst, symlinks=True)
        change(dst / sub if sub else dst)
        cases.append(Case(name, dst, kind=kind, mention=mention))

    def config(key, value):
        def change(path):
            cfg = json.loads((path / "config.json").read_text()) if path.is_dir() else json.loads(path.read_text())
            cfg[key] = value
            target = path / "config.json" if path.is_dir() else path
            target.write_text(json.dumps(cfg))

        return change

    variant("index-class-name-list", "model_index.json", config("_class_name", ["x"]), mention="_class_name")
    variant("index-missing", "model_index.json", lambda p: p.unlink(), mention="model_index.json")
    variant("index-not-json", "model_index.json", lambda p: p.write_text("{nope"), mention="model_index.json")
    variant("text-hidden-size-null", "text_encoder", config("hidden_size", None), mention="hidden_size")
    variant("text-layer-norm-eps-nan", "text_encoder", config("layer_norm_eps", float("nan")),
            mention="layer_norm_eps")
    variant("text-layers-string", "text_encoder", config("num_hidden_layers", "2"), mention="num_hidden_layers")
    variant("unet-block-out-empty", "unet", config("block_out_channels", []), mention="block_out_channels")
    variant("unet-block-out-string", "unet", config("block_out_channels", "ab"), mention="block_out_channels")
    variant("unet-block-out-zeros", "unet", config("block_out_channels", [0, 0]), mention="block_out_channels")
    variant("unet-head-dim-zero", "unet", config("attention_head_dim", 0), mention="attention_head_dim")
    variant("unet-in-channels-bool", "unet", config("in_channels", True), mention="in_channels")
    variant("unet-cross-attention-list", "unet", config("cross_attention_dim", [1, 2]),
            mention="cross_attention_dim")
    variant("vae-block-out-zero", "vae", config("block_out_channels", [0]), mention="block_out_channels")
    variant("vae-norm-groups-7", "vae", config("norm_num_groups", 7), mention="norm_num_groups")
    variant("vae-scaling-factor-nan", "vae", config("scaling_factor", float("nan")), mention="scaling_factor")
    variant("vae-scaling-factor-0", "vae", config("scaling_factor", 0), mention="scaling_factor")
    variant("scheduler-prediction-list", "scheduler/scheduler_config.json", config("prediction_type", ["v"]),
            mention="prediction_type")
    variant("unet-config-huge", "unet/config.json", lambda p: p.write_text(" " * 11_000_000 + "{}"),
            mention="config.json")

    def traversal_index(path):
        weights = path / "diffusion_pytorch_model.safetensors"
        weights.rename(path / "shard.safetensors")
        (path / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"a": "../../../etc/passwd", "b": "shard.safetensors"}}))

    variant("shard-index-traversal", "unet", traversal_index, mention="passwd")

    def weights_link(path):
        weights = path / "diffusion_pytorch_model.safetensors"
        weights.unlink()
        weights.symlink_to("/dev/zero")

    variant("unet-weights-link-to-dev-zero", "unet", weights_link)
    variant("unet-weights-missing", "unet", lambda p: (p / "diffusion_pytorch_model.safetensors").unlink(),
            mention="diffusion_pytorch_model")

    def retype_text(path):
        weights = path / "model.safetensors"
        header, _ = _read(weights)
        key = _first_key(header, "text_model.", "token_embedding.weight")
        _rewrite(weights, weights, lambda h, d: _retype(h, d, key, "I8", 1))

    variant("text-weights-int8", "text_encoder", retype_text, mention="token_embedding")

    def nan_unet(path):
        weights = path / "diffusion_pytorch_model.safetensors"
        header, _ = _read(weights)
        _rewrite(weights, weights, lambda h, d: _poison(h, d, _first_key(h, "down_blocks.", ".weight"), float("nan")))

    variant("unet-nan-weight", "unet", nan_unet, kind="nonfinite", mention="UNet")
    return cases


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python tests/hostile_corpus.py DIR")
        sys.exit(2)
    built = build(sys.argv[1])
    for c in built:
        print(f"{c.kind:9} {c.path}")
    print(f"{len(built)} cases")
