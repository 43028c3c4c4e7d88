"""``clipdiffusion convert IN OUT``: single file <-> diffusers folder (direction from the paths).

IN is a folder -> read as diffusers; else a single file (.safetensors, or a pickle through the weights-only
unpickler, which makes this the way to turn a .ckpt into a .safetensors once). OUT ending in ``.safetensors`` ->
single file; anything else -> a new diffusers folder. Everything is loaded strictly first, so a conversion never
writes a file that would not load back.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ClipDiffusionError
from ..checkpoints import detect

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def add_arguments(parser):
    parser.add_argument("input", help="a .safetensors/.ckpt single file or a diffusers folder")
    parser.add_argument("output", help="OUT.safetensors for a single file; any other path for a diffusers folder")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="floating-point type of the written weights (default fp32)")  # fmt: skip
    parser.add_argument("--prediction", choices=detect.PREDICTIONS, default=None,
                        help="set the prediction type (eps or v) when the source does not record it")  # fmt: skip
    parser.add_argument("--variant", default=None, help="diffusers weight variant to read, e.g. fp16")


def convert(src, dst, *, dtype="fp32", prediction=None, variant=None) -> Path:
    import torch

    from ..checkpoints.load import load_checkpoint, load_diffusers
    from ..checkpoints.save import save_checkpoint, save_diffusers

    src, dst = Path(src), Path(dst)
    if dtype not in DTYPES:
        raise ClipDiffusionError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not src.exists():
        raise ClipDiffusionError(f"input: {str(src)!r} does not exist")
    try:
        same = src.resolve() == dst.resolve()
    except (OSError, RuntimeError) as exc:  # a symbolic link loop (RuntimeError before Python 3.13)
        raise ClipDiffusionError(f"output: {str(dst)!r} cannot be resolved ({exc})") from None
    if same:
        raise ClipDiffusionError(f"output: {str(dst)!r} is the input")
    to_file = dst.suffix.lower() == ".safetensors"
    if to_file and dst.is_dir():
        raise ClipDiffusionError(f"output: {str(dst)!r} is a folder")
    # A symbolic link as OUT.safetensors is replaced by the new file, its target left alone (atomic_write).
    if not to_file and (dst.exists() or dst.is_symlink()):
        try:
            occupied = not dst.is_dir() or any(dst.iterdir())
        except OSError as exc:
            raise ClipDiffusionError(f"output: {str(dst)!r} cannot be read ({exc.strerror or exc})") from None
        if occupied:
            raise ClipDiffusionError(f"output: {str(dst)!r} exists; a diffusers folder is written to a new or "
                                     f"empty folder")
    # fp32 in memory: fp16/bf16 sources convert losslessly, and the cast to the output dtype happens once.
    if src.is_dir():
        model = load_diffusers(src, dtype=torch.float32, prediction=prediction, variant=variant)
    else:
        model = load_checkpoint(src, dtype=torch.float32, prediction=prediction)
    out_dtype = getattr(torch, DTYPES[dtype])
    if to_file:
        return save_checkpoint(model, dst, dtype=out_dtype)
    return save_diffusers(model, dst, dtype=out_dtype)


def run(args) -> int:
    out = convert(args.input, args.output, dtype=args.dtype, prediction=args.prediction, variant=args.variant)
    kind = "single file" if out.suffix == ".safetensors" else "diffusers folder"
    print(f"wrote {kind} {out}")
    return 0
