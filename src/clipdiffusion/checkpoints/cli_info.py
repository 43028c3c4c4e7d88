"""``clipdiffusion info FILE|FOLDER [--json]``: what a checkpoint is, without loading its tensors.

Reads only safetensors headers (pickles are memory-mapped through the weights-only unpickler), detects the
family and prediction type, and counts parameters and dtypes per component. A refused or unknown file exits 2
with one line naming the reason (cli.py prints ``CheckpointError``s that way).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from . import detect

_COMPONENTS = (
    ("unet", (detect.UNET_PREFIX,)),
    ("vae", (detect.VAE_PREFIX,)),
    ("text", ("cond_stage_model.", "conditioner.")),
)


def add_arguments(parser):
    parser.add_argument("path", help="a .safetensors/.ckpt single file or a diffusers folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--prediction", choices=detect.PREDICTIONS, default=None,
                        help="override the prediction type (eps or v), as loading would")  # fmt: skip
    parser.add_argument("--variant", default=None, help="diffusers weight variant to read, e.g. fp16")


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
    from .safetensors_io import read_shapes

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
    from .load import diffusers_prediction, component_weights, read_json
    from .safetensors_io import read_shapes

    folder = Path(folder)
    index = read_json(folder / "model_index.json")
    unet_json = read_json(folder / "unet" / "config.json")
    family = index.get(detect.DIFFUSERS_FAMILY_KEY)
    if family not in detect.FAMILIES:
        family = detect.family_from_diffusers(unet_json, (folder / "text_encoder_2").is_dir(), path=str(folder))
    pred, notes = diffusers_prediction(folder, family, prediction)
    subs = [("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")]
    if (folder / "text_encoder_2").is_dir():
        subs.append(("text_encoder_2", "model"))
    groups = {}
    for sub, stem in subs:
        items = []
        for f in component_weights(folder / sub, stem, variant):
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
    return "\n".join(lines)


def run(args) -> int:
    info = describe(args.path, args.prediction, args.variant)
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0
