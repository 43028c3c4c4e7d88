"""A 20-step 512x512 SD 1.5-size generation on one GPU: clipdiffusion against diffusers, same weights, same card.

Prepared to run in one go on a lent GPU machine (issue 19, part 5). Both sides load the same random-weight SD
1.5-size diffusers folder (written once by ``bench_generate.prepare``), in the same dtype (fp16 by default), with
Euler, CFG 7, one prompt and a negative. Ours runs with its defaults for that device (``device="cuda"``,
``dtype="fp16"``; attention through torch's scaled_dot_product_attention), diffusers with its best stock
configuration (fp16, SDPA attention processor, the same scheduler). Repetitions alternate ours / diffusers after one
warm-up each; the medians are printed with the card, torch, dtype and seconds per image, UNet iterations per second
and peak allocated memory (``torch.cuda.max_memory_allocated``) per side.

    python bench/gpu_generate.py --folder /tmp/sd15-random --reps 3            # on the GPU machine
    python bench/gpu_generate.py --device cpu --dtype fp32 --size 64 --steps 2 --reps 1   # a dry run here

Random weights give meaningless pictures but the exact work of real ones; with random fp16 weights the VAE may
overflow to NaN on both sides, which changes nothing in the time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _machine import machine  # noqa: E402

PROMPT, NEGATIVE = "a red circle on a blue square, highly detailed", "blurry, low quality"


def _sync(device):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _peak_reset(device):
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.startswith("cuda") else None


def load_ours(folder, device, dtype):
    from clipdiffusion.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(folder, device=device, dtype=dtype)

    def run(size, steps, seed):
        pipe.generate(PROMPT, NEGATIVE, steps=steps, seed=seed, guidance=7.0, width=size, height=size)

    placed = pipe.placement
    return run, f"{placed.device}/{placed.unet_dtype} (text {placed.text_dtype}, VAE {placed.vae_dtype})"


def load_diffusers(folder, device, dtype):
    import diffusers
    import torch

    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, torch_dtype=torch_dtype)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)

    def run(size, steps, seed):
        with torch.no_grad():
            pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.0, width=size,
                 height=size, generator=torch.Generator().manual_seed(seed))  # fmt: skip

    return run, f"{device}/{dtype}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/sd15-random"), help="weights (written if missing)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run this on the GPU machine, or pass --device cpu for a dry run", file=sys.stderr)
        return 2
    if not (args.folder / "model_index.json").is_file():
        from bench_generate import prepare

        print(f"writing random SD 1.5-size weights to {args.folder} ...", file=sys.stderr)
        prepare(args.folder)
    card = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else machine()
    sides = {}
    for name, loader in (("ours", load_ours), ("diffusers", load_diffusers)):
        t0 = time.perf_counter()
        run, placed = loader(str(args.folder), args.device, args.dtype)
        _sync(args.device)
        load_s = time.perf_counter() - t0
        run(args.size, 2, 0)  # warm-up: kernels chosen, allocator primed
        _sync(args.device)
        sides[name] = {"run": run, "placed": str(placed), "load_s": load_s, "times": [], "peak_mb": None}
    for rep in range(args.reps):
        for name, side in sides.items():  # alternate, so drifting clocks hit both alike
            _peak_reset(args.device)
            _sync(args.device)
            t0 = time.perf_counter()
            side["run"](args.size, args.steps, 1 + rep)
            _sync(args.device)
            side["times"].append(time.perf_counter() - t0)
            peak = _peak_mb(args.device)
            side["peak_mb"] = peak if side["peak_mb"] is None else max(side["peak_mb"], peak)
    print(f"machine: {card}; torch {torch.__version__}; dtype {args.dtype}; threads {torch.get_num_threads()}; "
          f"{args.size}x{args.size}, {args.steps} steps, Euler, CFG 7, batch 1; median of {args.reps}")  # fmt: skip
    print("| side | placement | load s | s / image | it/s | peak MiB |")
    print("|---|---|---|---|---|---|")
    rows = {}
    for name, side in sides.items():
        med = statistics.median(side["times"])
        peak = "n/a" if side["peak_mb"] is None else f"{side['peak_mb']:.0f}"
        print(f"| {name} | {side['placed']} | {side['load_s']:.1f} | {med:.3f} | {args.steps / med:.2f} | {peak} |")
        rows[name] = {"seconds": med, "it_s": args.steps / med, "peak_mb": side["peak_mb"], "load_s": side["load_s"],
                      "placement": side["placed"], "times": side["times"]}  # fmt: skip
    ratio = rows["ours"]["seconds"] / rows["diffusers"]["seconds"]
    print(f"ours / diffusers time: {ratio:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": card, "torch": torch.__version__, "dtype": args.dtype,
                                         "size": args.size, "steps": args.steps, "sides": rows, "ratio": ratio}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
