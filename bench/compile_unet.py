"""Benchmark: ``torch.compile`` (inductor, static shapes) against eager, for the opt-in ``Pipeline.compile``.

``--model sd15``: our UNet at full SD 1.5 size (random weights, batch 2, 4x64x64 latents, 77-row context: one CFG
step at 512x512): the compile time (first call, compile included), then eager and compiled steps interleaved
(median), the largest output difference, and the graphs compiled (``torch._dynamo`` counters: 1 = no recompile).
``--vae`` adds the VAE decoder to 512x512 (batch 1) the same way.
``--model tiny``: the shipped tiny model, a 20-step Euler generation (CFG 7, 64x64, batch 1) eager and with
``pipe.compile("unet")`` (and ``"unet+vae"`` with ``--vae``), interleaved; the first compiled generation includes
the compile. Inductor caches compiled kernels on disk (``/tmp/torchinductor_$USER``): ``--fresh-cache`` points
it at a new folder so the compile time is a cold one.

    OMP_NUM_THREADS=2 flock /tmp/sd15.lock .venv/bin/python bench/compile_unet.py --model sd15 --threads 2 --reps 3
    OMP_NUM_THREADS=2 .venv/bin/python bench/compile_unet.py --model tiny --threads 2 --reps 5
"""

import argparse
import os
import statistics
import tempfile
import time

import torch
from _machine import machine


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _filled(module):
    module = module.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02, generator=g)
    return module.eval().requires_grad_(False)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compare(label, module, method, args, reps, dtype):
    """Compile ``module.method``; time the first compiled call and interleaved eager/compiled calls."""
    from clipdiffusion.diffusion.compiled import compile_module, uncompile

    eager_fn = getattr(module, method)
    with torch.no_grad():
        t_eager_first, ref = _timed(lambda: eager_fn(*args))
        call = compile_module(module, method, label)
        graphs = _graphs()
        t_compile, out = _timed(lambda: getattr(module, method)(*args))
        if call.error:
            print(f"{label}: compile failed: {call.error}")
            uncompile(module, method)
            return
        eager, compiled = [], []
        for i in range(reps):
            order = (("eager", eager_fn), ("compiled", getattr(module, method)))
            for name, fn in order if i % 2 == 0 else order[::-1]:
                t, _ = _timed(lambda: fn(*args))
                (eager if name == "eager" else compiled).append(t)
        new_graphs = _graphs() - graphs
    diff = (out.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    e, c = statistics.median(eager), statistics.median(compiled)
    print(f"| {label} ({dtype}) | {e:.3f} s | {c:.3f} s | {c / e:.2f} | {t_compile:.1f} s | {new_graphs} | "
          f"{diff:.2e} (of max {scale:.2f}) |")
    print(f"  eager runs {', '.join(f'{t:.3f}' for t in eager)}; compiled runs {', '.join(f'{t:.3f}' for t in compiled)}"
          f"; first eager call {t_eager_first:.3f} s")
    uncompile(module, method)


def sd15(args, dtype):
    from clipdiffusion.diffusion.unet import SD1 as UNET_SD1, UNetModel
    from clipdiffusion.diffusion.vae import SD1 as VAE_SD1, AutoencoderKL

    print("| part | eager step | compiled step | compiled / eager | first compiled call (compile + run) | "
          "graphs compiled | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    unet = _filled(UNetModel(UNET_SD1, device="meta")).to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 64, 64, generator=g).to(dtype)
    t = torch.tensor([500.0, 500.0])
    context = torch.randn(2, 77, 768, generator=g).to(dtype)
    compare("SD 1.5 UNet, B=2, 4x64x64, 77 rows", unet, "forward", (x, t, context), args.reps, args.dtype)
    del unet
    if args.vae:
        vae = _filled(AutoencoderKL(VAE_SD1, device="meta")).to(dtype)
        z = torch.randn(1, 4, 64, 64, generator=g).to(dtype)
        compare("SD 1.5 VAE decode to 512x512, B=1", vae, "decode", (z,), args.reps, args.dtype)


def tiny(args, dtype):
    from clipdiffusion.pipeline import Pipeline

    pipe = Pipeline.default(dtype=args.dtype)
    kw = dict(steps=20, guidance=7.0, seed=3, width=64, height=64, sampler="euler")
    prompt = "a red circle on the left and a blue square on the right"
    modes = ["off", "unet"] + (["unet+vae"] if args.vae else [])
    firsts, times, pixels = {}, {m: [] for m in modes}, {}
    for mode in modes:  # first generation of each mode: the compiled ones compile here
        pipe.compile(mode)
        firsts[mode], result = _timed(lambda: pipe.generate(prompt, **kw))
        pixels[mode] = result.pixels
        print(f"  first generation, compile={mode}: {firsts[mode]:.2f} s; notes {result.notes}", flush=True)
    graphs = _graphs()
    for i in range(args.reps):
        for mode in modes[i % len(modes):] + modes[:i % len(modes)]:
            pipe.compile(mode)
            t, _ = _timed(lambda: pipe.generate(prompt, **kw))
            times[mode].append(t)
            print(f"  rep {i} compile={mode}: {t:.3f} s", flush=True)
    print(f"graphs compiled during the timed runs: {_graphs() - graphs} (0 = no recompile)")
    print("| tiny model, 20 Euler steps, CFG 7, 64x64 | generation | / eager | first generation (compile "
          "included) | max abs pixel diff vs eager |")
    print("|---|---|---|---|---|")
    base = statistics.median(times["off"])
    for mode in modes:
        m = statistics.median(times[mode])
        diff = float(abs(pixels[mode] - pixels["off"]).max())
        print(f"| compile={mode} | {m:.3f} s | {m / base:.2f} | {firsts[mode]:.1f} s | {diff:.1e} |")
        print(f"  runs {', '.join(f'{t:.3f}' for t in times[mode])}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("sd15", "tiny"), default="sd15")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--vae", action="store_true", help="also the VAE decoder")
    parser.add_argument("--fresh-cache", action="store_true", help="a new inductor cache folder (cold compile)")
    args = parser.parse_args()
    if args.fresh_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cache-")
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    print(f"machine: {machine()}; torch {torch.__version__}; threads {torch.get_num_threads()}; dtype {args.dtype}; "
          f"model {args.model}; median of {args.reps} interleaved reps; inductor cache "
          f"{'fresh' if args.fresh_cache else 'as found'}")
    (sd15 if args.model == "sd15" else tiny)(args, dtype)


if __name__ == "__main__":
    main()
