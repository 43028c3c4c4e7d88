"""``clipdiffusion info FILE|FOLDER [--json] [--check]``: what a checkpoint is, without loading its tensors.

Reads only safetensors headers (pickles are memory-mapped through the weights-only unpickler), detects the
family and prediction type, and counts parameters and dtypes per component. A refused or unknown file exits 2
with one line naming the reason (cli.py prints ``CheckpointError``s that way).

``--check`` also reads every floating-point tensor, a batch of at most ``SCAN_BATCH_BYTES`` at a time through the
validated loader, and counts NaN/Inf elements: it names the non-finite tensors, states the bytes read and the
time taken, and exits 1 when any tensor is non-finite. Without it nothing is scanned, and the output says so.
Loading a model never scans either; ``Pipeline.generate`` checks each stage's output at run time instead.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

from ..checkpoints import detect

_COMPONENTS = (
    ("unet", (detect.UNET_PREFIX,)),
    ("vae", (detect.VAE_PREFIX,)),
    ("text", ("cond_stage_model.", "conditioner.")),
)
_FOLDER_SUBS = (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model"),
                ("text_encoder_2", "model"))
SCAN_BATCH_BYTES = 128 * 2**20  # --check reads at most this much at once (a larger tensor alone)
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
LISTED_JSON = 100  # non-finite tensors named in --json output
LISTED_TEXT = 10  # ... and in the text output
EXIT_NONFINITE = 1  # --check found NaN/Inf (2 stays "could not read or recognise the file")


def add_arguments(parser):
    parser.add_argument("path", help="a .safetensors/.ckpt single file or a diffusers folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--prediction", choices=detect.PREDICTIONS, default=None,
                        help="override the prediction type (eps or v), as loading would")  # fmt: skip
    parser.add_argument("--variant", default=None, help="diffusers weight variant to read, e.g. fp16")
    parser.add_argument("--check", action="store_true",
                        help="also read every floating-point tensor and count its NaN/Inf values: this reads "
                             "the whole model (seconds per GB), 128 MiB at a time, and prints the bytes read and the "
                             f"time taken; exits {EXIT_NONFINITE} when any tensor is non-finite (2 still means the "
                             "file could not be read). Without --check no tensor is read. Loading a model never "
                             "scans: generation checks each stage's output instead (one reduction per step)")


def _summarise(groups: dict) -> dict:
    """{component: [(shape, dtype), ...]} -> {component: {tensors, parameters, dtypes}}."""
    out = {}
    for name, items in groups.items():
        if items:
            dtypes = Counter(dtype for _, dtype in items)
            out[name] = {"tensors": len(items), "parameters": sum(math.prod(s) for s, _ in items),
                         "dtypes": dict(sorted(dtypes.items()))}  # fmt: skip
    return out


def describe_file(path, prediction=None) -> dict:
    from ..checkpoints.safetensors_io import read_shapes

    path = Path(path)
    shapes, dtypes, metadata = read_shapes(path)
    fam = detect.detect_family(shapes, metadata, prediction=prediction, path=str(path))
    ignored = set(fam.ignored_keys)
    groups = {name: [] for name, _ in _COMPONENTS}
    groups["other"] = []
    for key, shape in shapes.items():
        if key in ignored:
            continue
        name = next((n for n, prefixes in _COMPONENTS if key.startswith(prefixes)), "other")
        groups[name].append((shape, dtypes[key]))
    shown_meta = {k: (v if len(v) <= 200 else v[:200] + f"... ({len(v)} chars)") for k, v in sorted(metadata.items())}
    return {
        "path": str(path), "layout": "single file", "bytes": path.stat().st_size,
        "family": fam.name, "prediction": fam.prediction, "prediction_source": fam.prediction_source,
        "in_channels": fam.in_channels, "context_dim": fam.context_dim, "adm_in_channels": fam.adm_in_channels,
        "components": _summarise(groups), "ignored_keys": list(fam.ignored_keys), "notes": list(fam.notes),
        "metadata": shown_meta,
    }  # fmt: skip


def describe_folder(folder, prediction=None, variant=None) -> dict:
    from ..checkpoints.load import diffusers_family_from_structure, diffusers_prediction, read_json
    from ..checkpoints.safetensors_io import read_shapes

    folder = Path(folder)
    index = read_json(folder / "model_index.json")
    unet_json = read_json(folder / "unet" / "config.json")
    family = index.get(detect.DIFFUSERS_FAMILY_KEY)
    if family not in detect.FAMILIES:
        family = diffusers_family_from_structure(folder, unet_json)
    pred, notes = diffusers_prediction(folder, family, prediction)
    groups = {}
    for sub, files in _folder_files(folder, variant):
        items = []
        for f in files:
            shapes, dtypes, _ = read_shapes(f)
            items += [(shapes[k], dtypes[k]) for k in shapes if not k.endswith("position_ids")]
        groups[sub] = items
    return {
        "path": str(folder), "layout": "diffusers folder", "pipeline": index.get("_class_name"),
        "family": family, "prediction": pred,
        "prediction_source": "user override" if prediction else ("scheduler_config.json" if not notes else "default"),
        "context_dim": unet_json.get("cross_attention_dim"), "components": _summarise(groups),
        "ignored_keys": [], "notes": list(notes), "metadata": {},
    }  # fmt: skip


def _folder_files(folder: Path, variant=None) -> list:
    """[(component, [weight files])] of a diffusers folder; text_encoder_2 only when present (SDXL)."""
    from ..checkpoints.load import component_weights

    return [(sub, component_weights(folder / sub, stem, variant)) for sub, stem in _FOLDER_SUBS
            if sub != "text_encoder_2" or (folder / sub).is_dir()]


def _all_finite(tensor) -> bool:
    """min and max propagate NaN and show +-Inf; on CPU this is several times faster than isfinite() on fp16."""
    import torch

    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.reshape(-1))
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def _scan_tensor(name, tensor, file_label, found, totals):
    import torch

    totals["tensors"] += 1
    totals["bytes"] += tensor.numel() * tensor.element_size()
    if _all_finite(tensor):
        return
    from ..checkpoints.safetensors_io import _TORCH_TO_ST

    dtype = str(tensor.dtype).removeprefix("torch.")
    dtype = _TORCH_TO_ST.get(dtype, dtype)  # the header's spelling, as the component summary shows it
    found.append({"name": name, "file": file_label, "dtype": dtype, "shape": list(tensor.shape),
                  "nan": int(torch.isnan(tensor).sum()), "inf": int(torch.isinf(tensor).sum()),
                  "numel": tensor.numel()})


def _scan_one(path: Path, file_label, found, totals):
    from ..checkpoints.safetensors_io import is_pickle_path, load_file, load_pickle, read_header

    if is_pickle_path(path):  # memory-mapped by the weights-only unpickler: touched one tensor at a time
        for name, tensor in load_pickle(path).items():
            if tensor.is_floating_point():
                _scan_tensor(name, tensor, file_label, found, totals)
        return
    header = read_header(path)
    names = sorted((n for n, info in header.tensors.items() if info.dtype in _FLOAT_DTYPES),
                   key=lambda n: header.tensors[n].offsets)  # one forward pass over the file
    batches, size = [[]], 0
    for name in names:
        start, end = header.tensors[name].offsets
        if batches[-1] and size + (end - start) > SCAN_BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(name)
        size += end - start
    for batch in filter(None, batches):
        tensors = load_file(path, keys=batch)  # validated again, read into fresh memory, released after the batch
        for name in batch:
            _scan_tensor(name, tensors.pop(name), file_label, found, totals)


def scan_nonfinite(path, variant=None) -> dict:
    """Read every floating-point tensor of a single file or diffusers folder and count NaN/Inf elements.

    Returns {tensors, bytes, seconds, nonfinite_tensors, nonfinite: [{name, file, dtype, shape, nan, inf,
    numel}, ...] (the first ``LISTED_JSON``)}. Memory stays near ``SCAN_BATCH_BYTES`` (or the largest tensor).
    """
    import torch  # noqa: F401 - imported before the clock starts: the time reported is the scan's

    path = Path(path)
    start = time.perf_counter()
    found, totals = [], {"tensors": 0, "bytes": 0}
    if path.is_dir():
        for _, files in _folder_files(path, variant):
            for f in files:
                _scan_one(f, str(f.relative_to(path)), found, totals)
    else:
        _scan_one(path, path.name, found, totals)
    return {"tensors": totals["tensors"], "bytes": totals["bytes"],
            "seconds": round(time.perf_counter() - start, 3), "nonfinite_tensors": len(found),
            "nonfinite": found[:LISTED_JSON]}


def describe(path, prediction=None, variant=None) -> dict:
    path = Path(path)
    if path.is_dir():
        return describe_folder(path, prediction, variant)
    return describe_file(path, prediction)


def _human(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def format_text(info: dict) -> str:
    lines = [
        f"{info['path']} ({info['layout']})",
        f"family:     {info['family']}",
        f"prediction: {info['prediction']} (from {info['prediction_source']})",
        f"context:    {info.get('context_dim')}",
    ]
    for name, c in info["components"].items():
        dtypes = ", ".join(f"{d} x{n}" for d, n in c["dtypes"].items())
        lines.append(f"  {name:<15} {_human(c['parameters']):>8} parameters  {c['tensors']:>5} tensors  {dtypes}")
    total = sum(c["parameters"] for c in info["components"].values())
    lines.append(f"  {'total':<15} {_human(total):>8} parameters")
    ignored = info["ignored_keys"]
    if ignored:
        shown = ", ".join(ignored[:8]) + (f", ... ({len(ignored)} in all)" if len(ignored) > 8 else "")
        lines.append(f"ignored:    {shown}")
    lines += [f"note:       {n}" for n in info["notes"]]
    # configs are long JSON: --json shows them
    ours = {k: v for k, v in info["metadata"].items()
            if k.startswith(("clipdiffusion.", "modelspec.")) and not k.endswith(("_config", "_configs"))}  # fmt: skip
    lines += [f"metadata:   {k} = {v}" for k, v in ours.items()]
    lines += _check_lines(info.get("check"))
    auto = info.get("auto_placement")
    if auto is not None:
        lines.append(f"auto:       {auto['describe']} (what --device auto --dtype auto picks on this machine)")
    return "\n".join(lines)


NOT_SCANNED = "weights not scanned for NaN/Inf (use --check)"


def _human_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def _check_lines(check) -> list:
    if not check or not check.get("scanned"):
        return [f"check:      {NOT_SCANNED}"]
    n = check["nonfinite_tensors"]
    lines = [f"check:      scanned {check['tensors']} floating-point tensors ({_human_bytes(check['bytes'])}) in "
             f"{check['seconds']:.2f} s: {n} non-finite"]
    for item in check["nonfinite"][:LISTED_TEXT]:
        shape = "x".join(map(str, item["shape"])) or "scalar"
        lines.append(f"  non-finite {item['file']}: {item['name']} ({item['dtype']} {shape}): {item['nan']} NaN, "
                     f"{item['inf']} Inf of {item['numel']}")
    if n > LISTED_TEXT:
        lines.append(f"  ... {n - LISTED_TEXT} more (--json lists up to {LISTED_JSON})")
    return lines


def run(args) -> int:
    info = describe(args.path, args.prediction, args.variant)
    from ..devices import resolve

    auto = resolve("auto", "auto", family=info["family"])
    info["auto_placement"] = {**auto.to_dict(), "describe": auto.describe()}
    if getattr(args, "check", False):
        info["check"] = {"scanned": True, **scan_nonfinite(args.path, args.variant)}
    else:
        info["check"] = {"scanned": False, "note": NOT_SCANNED}
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return EXIT_NONFINITE if info["check"].get("nonfinite_tensors") else 0
