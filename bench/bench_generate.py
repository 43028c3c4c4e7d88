"""Peak memory and cold start of a 512x512 SD 1.5-size generation: clipdiffusion vs diffusers.

Both sides load the same random-weight SD 1.5-size diffusers folder (UNet 860M, VAE 84M, CLIP-L 123M, fp32) that
this script writes once with ``checkpoints.save.save_diffusers``.

- Peak memory: each side runs in its own subprocess (load, then one generation with Euler, CFG 7, 512x512) and
  reports ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (tracemalloc does not see torch's allocations), plus the
  resident size right after loading, so weights and activations can be told apart.
- Cold start: wall time from spawning the command to the end of the first sampler step. Ours is the real CLI
  (``python -m clipdiffusion generate ... --model FOLDER``), timed to its first progress line on stderr; the
  reference is the equivalent diffusers script (``StableDiffusionPipeline.from_pretrained`` + ``__call__``), timed
  to its first ``callback_on_step_end``. The child is stopped there.

Repetitions alternate ours / reference (other engineers load the same CPUs); medians are printed. ``--mmap`` adds
a third side to the cold start, ours with ``generate --mmap`` (weights left as views of the file mapping),
interleaved with the other two.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_generate.py --threads 2 --reps 1
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_generate.py --size 512 --threads 2 --reps 3 --skip-memory --mmap
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

PROMPT, NEGATIVE = "a red circle on a blue square, highly detailed", "blurry, low quality"


def machine() -> str:
    model = platform.processor() or ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                     model)
    except OSError:
        pass
    import torch

    return f"{model}; torch {torch.__version__}"


# ---- children ----------------------------------------------------------------------------------------------------

def _status_kb(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident so far) from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def prepare(folder: Path):
    """Random SD 1.5-size weights as a diffusers folder. Built on the meta device, then filled with N(0, 0.02):
    the values do not matter for time or memory, and this skips the slow default initialisers."""
    import torch

    from clipdiffusion.checkpoints.save import save_diffusers
    from clipdiffusion.diffusion.unet import SD1 as UNET_SD1, UNetModel
    from clipdiffusion.diffusion.vae import SD1 as VAE_SD1, AutoencoderKL
    from clipdiffusion.pipeline import Pipeline
    from clipdiffusion.text.clip import SD1_CLIP_L, CLIPTextModel
    from clipdiffusion.text.conditioning import EncoderSpec, TextEncoder

    def filled(module):
        module = module.to_empty(device="cpu")
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0, 0.02, generator=g)
        return module.eval()

    clip = filled(CLIPTextModel(SD1_CLIP_L, device="meta"))
    text = TextEncoder("sd1", [EncoderSpec("clip_l", clip, pad_id=49407, final_norm=True)])
    pipe = Pipeline(text, filled(UNetModel(UNET_SD1, device="meta")), filled(AutoencoderKL(VAE_SD1, device="meta")),
                    "sd1", "eps")
    save_diffusers(pipe, folder)


def child_memory(side: str, folder: str, size: int, steps: int, threads: int):
    import resource

    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    if side == "ours":
        from clipdiffusion.pipeline import Pipeline

        pipe = Pipeline.from_pretrained(folder)
        load_s, rss_loaded, load_peak = time.perf_counter() - t0, _status_kb("VmRSS"), _status_kb("VmHWM")
        t1 = time.perf_counter()
        pipe.generate(PROMPT, NEGATIVE, steps=steps, seed=1, guidance=7.0, width=size, height=size)
    else:
        import diffusers

        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
        pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config,
                                                                      timestep_spacing="linspace")
        pipe.set_progress_bar_config(disable=True)
        load_s, rss_loaded, load_peak = time.perf_counter() - t0, _status_kb("VmRSS"), _status_kb("VmHWM")
        t1 = time.perf_counter()
        with torch.no_grad():
            pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.0, width=size,
                 height=size, generator=torch.Generator().manual_seed(1))
    gen_s = time.perf_counter() - t1
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mb": peak_kb / 1024, "load_peak_mb": load_peak / 1024, "loaded_mb": rss_loaded / 1024,
                      "load_s": load_s,
                      "generate_s": gen_s}))


def child_cold_diffusers(folder: str, size: int, threads: int):
    import diffusers
    import torch

    torch.set_num_threads(threads)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def first_step(pipeline, i, t, kwargs):
        sys.stderr.write("FIRST STEP DONE\n")
        sys.stderr.flush()
        return kwargs

    with torch.no_grad():
        pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=2, guidance_scale=7.0, width=size, height=size,
             generator=torch.Generator().manual_seed(1), callback_on_step_end=first_step)


# ---- parent ------------------------------------------------------------------------------------------------------

def _env(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def run_memory(side, args) -> dict:
    cmd = [sys.executable, __file__, "--child", f"mem-{side}", "--folder", str(args.folder), "--size",
           str(args.size), "--steps", str(args.steps), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(args.threads))
    if out.returncode != 0:
        raise RuntimeError(f"{side} memory child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_to_marker(cmd, marker: bytes, threads: int) -> float:
    """Seconds from spawning ``cmd`` until ``marker`` appears on its stderr; the child is stopped then."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(threads))
    seen = threading.Event()
    tail = bytearray()

    def reader():
        while True:
            chunk = os.read(proc.stderr.fileno(), 4096)
            if not chunk:
                return
            tail.extend(chunk)
            if marker in tail:
                seen.set()
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    while not seen.is_set() and proc.poll() is None:
        seen.wait(0.05)
    elapsed = time.perf_counter() - start
    proc.kill()
    proc.wait()
    if not seen.is_set():
        raise RuntimeError(f"no {marker!r} from {cmd[:4]}...:\n{bytes(tail[-3000:]).decode(errors='replace')}")
    return elapsed


def run_cold(side, args, out_png) -> float:
    if side in ("ours", "ours --mmap"):
        cmd = [sys.executable, "-m", "clipdiffusion", "generate", PROMPT, "--negative", NEGATIVE, "--model",
               str(args.folder), "--steps", "2", "--width", str(args.size), "--height", str(args.size), "--seed", "1",
               "--exact", "-o", str(out_png), *(["--mmap"] if side == "ours --mmap" else [])]
        return time_to_marker(cmd, b" 1/2 ", args.threads)
    cmd = [sys.executable, __file__, "--child", "cold-diffusers", "--folder", str(args.folder), "--size",
           str(args.size), "--threads", str(args.threads)]
    return time_to_marker(cmd, b"FIRST STEP DONE", args.threads)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/clipdiffusion-bench-sd15"))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--skip-cold", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--mmap", action="store_true", help="also time the cold start of generate --mmap")
    args = parser.parse_args()

    if args.child == "prepare":
        return prepare(args.folder)
    if args.child in ("mem-ours", "mem-diffusers"):
        return child_memory(args.child[4:], str(args.folder), args.size, args.steps, args.threads)
    if args.child == "cold-diffusers":
        return child_cold_diffusers(str(args.folder), args.size, args.threads)

    if not (args.folder / "model_index.json").exists():
        print(f"writing random SD 1.5-size weights to {args.folder} ...", file=sys.stderr)
        subprocess.run([sys.executable, __file__, "--child", "prepare", "--folder", str(args.folder)], check=True,
                       env=_env(args.threads))
    mem = {"ours": [], "diffusers": []}
    cold = {"ours": [], "diffusers": [], "ours --mmap": []}
    sides = ("ours", "diffusers", "ours --mmap") if args.mmap else ("ours", "diffusers")
    for rep in range(args.reps):
        for side in sides[rep % len(sides):] + sides[:rep % len(sides)]:  # each side leads in turn
            if not args.skip_memory and side in mem:
                mem[side].append(run_memory(side, args))
                print(f"rep {rep} {side} memory: {mem[side][-1]}", file=sys.stderr)
            if not args.skip_cold:
                cold[side].append(run_cold(side, args, Path("/tmp/clipdiffusion-bench.png")))
                print(f"rep {rep} {side} cold start: {cold[side][-1]:.1f} s", file=sys.stderr)

    def med(side, key):
        return statistics.median(m[key] for m in mem[side])

    print(f"machine: {machine()}; threads {args.threads}; {args.size}x{args.size}, {args.steps} Euler step(s), "
          f"CFG 7 (batch 2 through the UNet), fp32, SD 1.5-size random weights; median of {args.reps}")
    print("| measure | ours | diffusers | ours / diffusers |")
    print("|---|---|---|---|")
    rows = () if args.skip_memory else (("peak_mb", "peak RSS (load + generate)", "MB"),
                                        ("load_peak_mb", "peak RSS during loading", "MB"),
                                        ("loaded_mb", "RSS after loading", "MB"),
                                        ("load_s", "load from folder", "s"),
                                        ("generate_s", "generate (text, sampling, VAE decode)", "s"))
    for key, label, unit in rows:
        a, b = med("ours", key), med("diffusers", key)
        print(f"| {label} | {a:.1f} {unit} | {b:.1f} {unit} | {a / b:.2f} |")
    if not args.skip_cold:
        a, b = statistics.median(cold["ours"]), statistics.median(cold["diffusers"])
        print(f"| cold start: command to first step | {a:.1f} s | {b:.1f} s | {a / b:.2f} |")
        if args.mmap:
            m = statistics.median(cold["ours --mmap"])
            print(f"| cold start with generate --mmap | {m:.1f} s | {b:.1f} s | {m / b:.2f} |")
        for side in sides:
            print(f"cold start runs, {side}: {', '.join(f'{t:.1f}' for t in cold[side])} s")


if __name__ == "__main__":
    main()
