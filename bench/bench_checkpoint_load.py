"""Benchmark: loading a full-size SD 1.5 single file, ours vs the references.

1. Tensor reading: our ``load_file`` (header validated first, then the safetensors library maps the file) vs
   ``safetensors.torch.load_file`` on the same file: the cost of our validation (``copy=False``, which maps the
   file through the library too), and of our default, which reads every tensor into memory of its own
   (nothing stays tied to the file; the library's load only maps it and touches no data).
2. Whole model: our ``load_checkpoint`` (meta-device models that adopt the loaded tensors) vs diffusers'
   ``StableDiffusionPipeline.from_single_file(config=<local folder>)`` offline, both in fp16 (the file's dtype).

The file holds random fp16 weights with SD 1.5's exact keys and shapes (UNet, VAE, CLIP-L; 1.07 G parameters,
2.1 GB), written by our ``save_checkpoint``. Repetitions are interleaved (ours, reference, ours, ...) and the
median is reported, because other processes share the machine; the file stays in the page cache throughout, so
this measures CPU work, not disk.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_checkpoint_load.py --reps 3 --memory

``--memory`` also loads the model once in fresh processes (ours, then diffusers; fp16 and fp32) and reports peak
resident memory above the post-import baseline (page-cache pages of the mapped file count while touched).
"""

import argparse
import gc
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from _machine import machine


def random_sd15(folder: Path) -> tuple[Path, Path]:
    """Write the random SD 1.5 file and the diffusers config folder (configs only) diffusers needs offline."""
    from clipdiffusion.checkpoints.load import build_module
    from clipdiffusion.checkpoints.save import save_checkpoint, save_diffusers
    from clipdiffusion.diffusion import unet as U
    from clipdiffusion.diffusion import vae as V
    from clipdiffusion.text.clip import SD1_CLIP_L, CLIPTextModel

    gen = torch.Generator().manual_seed(0)

    def random(cls, config):
        meta = cls(config, device="meta")
        tensors = {k: (torch.randn(v.shape, generator=gen) * 0.02).half() for k, v in meta.state_dict().items()}
        return build_module(cls, config, tensors, dtype=None, device="cpu", model=meta)

    clip = random(CLIPTextModel, SD1_CLIP_L)
    model = SimpleNamespace(
        family="sd1", prediction="eps", unet=random(U.UNetModel, U.SD1), vae=random(V.AutoencoderKL, V.SD1),
        text_encoder=SimpleNamespace(encoders=[SimpleNamespace(model=clip, default_clip_skip=1)]),
    )  # fmt: skip
    path = save_checkpoint(model, folder / "sd15-random.safetensors")
    config = save_diffusers(model, folder / "config", weights=False)
    return path, config


_CHILD = """
import sys, torch
import diffusers, transformers
from diffusers import StableDiffusionPipeline
from clipdiffusion.checkpoints.load import load_checkpoint
diffusers.utils.logging.set_verbosity_error(); transformers.utils.logging.set_verbosity_error()

def hwm_kb():  # VmHWM belongs to this address space (ru_maxrss would carry the parent's peak across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

path, config, who, dtype = sys.argv[1:5]
dtype = getattr(torch, dtype)
before = hwm_kb()
if who == "ours":
    model = load_checkpoint(path, dtype=dtype)
else:
    model = StableDiffusionPipeline.from_single_file(path, config=config, local_files_only=True, torch_dtype=dtype,
                                                     safety_checker=None, requires_safety_checker=False)
print(before, hwm_kb())
"""


def peak_rss_mb(path, config, who, dtype) -> tuple[float, float]:
    """(RSS after imports, peak RSS) in MB of a fresh process that loads the model once."""
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(config), who, dtype], capture_output=True,
                         text=True, check=True).stdout.split()  # fmt: skip
    return int(out[-2]) / 1024, int(out[-1]) / 1024


def timed(fn) -> float:
    gc.collect()
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    del result
    gc.collect()
    return elapsed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory", action="store_true", help="also measure peak RSS in fresh processes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import diffusers
    import safetensors.torch
    import transformers
    from diffusers import StableDiffusionPipeline

    from clipdiffusion.checkpoints.load import load_checkpoint
    from clipdiffusion.checkpoints.safetensors_io import load_file

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        path, config = random_sd15(Path(tmp))
        size = path.stat().st_size
        cases = {
            "tensors": (lambda: load_file(path, copy=False), lambda: safetensors.torch.load_file(str(path))),
            "tensors_copy": (lambda: load_file(path), lambda: safetensors.torch.load_file(str(path))),
            "model": (
                lambda: load_checkpoint(path, dtype=torch.float16),
                lambda: StableDiffusionPipeline.from_single_file(
                    str(path), config=str(config), local_files_only=True, torch_dtype=torch.float16,
                    safety_checker=None, requires_safety_checker=False),
            ),
        }  # fmt: skip
        # the models must agree before their speed means anything
        ours, ref = cases["model"][0](), cases["model"][1]()
        unet_ours = ours.unet.state_dict()
        assert torch.equal(unet_ours["out.2.weight"], ref.unet.state_dict()["conv_out.weight"])
        del ours, ref, unet_ours
        print(f"machine: {machine()}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
              f"diffusers {diffusers.__version__} (accelerate installed: "
              f"{diffusers.utils.is_accelerate_available()}); file {size / 1e9:.2f} GB fp16; median of {args.reps}")
        print("| what | ours (s) | reference (s) | ours / reference |")
        print("|---|---|---|---|")
        for name, (ours_fn, ref_fn) in cases.items():
            times = {"ours": [], "ref": []}
            for _ in range(args.reps):
                times["ours"].append(timed(ours_fn))
                times["ref"].append(timed(ref_fn))
            o, r = statistics.median(times["ours"]), statistics.median(times["ref"])
            label = {"tensors": "map all tensors (load_file copy=False vs safetensors.torch.load_file)",
                     "tensors_copy": "read all tensors (load_file default: own reads into new tensors)",
                     "model": "load SD1.5 model (load_checkpoint vs from_single_file)"}[name]  # fmt: skip
            print(f"| {label} | {o:.2f} | {r:.2f} | {o / r:.2f} |")
        if args.memory:
            print("\npeak resident memory of a fresh process loading the model once (MB; after imports -> peak)")
            print("| dtype | ours | reference | ours / reference (peak - imports) |")
            print("|---|---|---|---|")
            for dtype in ("float16", "float32"):
                ob, op = peak_rss_mb(path, config, "ours", dtype)
                rb, rp = peak_rss_mb(path, config, "reference", dtype)
                ratio = (op - ob) / max(rp - rb, 1.0)
                print(f"| {dtype} | {ob:.0f} -> {op:.0f} | {rb:.0f} -> {rp:.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
