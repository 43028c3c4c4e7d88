"""Seconds per generation at SD 1.5 size for each of issue 19's options against the exact baseline: NGMS
(``s_min_uncond``), Skip Early CFG (``skip_early_cond``), DeepCache (``deepcache_interval``) and ToMe
(``token_merging_ratio``), alone and combined, plus the conditioning cache (the same request twice).

The model is SD 1.5's architecture with random weights (CLIP-L text encoder, the SD1 UNet, the SD VAE), built in
our own modules, so nothing is downloaded; speed does not depend on the weights' values. Each configuration runs
one full generation (text encoding, ``--steps`` sampler steps of Euler at guidance 7 with a negative prompt, VAE
decode) after one warm-up run of the baseline; the UNet's evaluations are counted (rows through the whole UNet,
calls through its shallow part only). The time is the median of ``--reps`` runs, interleaved across
configurations. Adherence is not measured here: ``clipdiffusion eval --studies main`` with the same flags does that
on the tiny model.

    OMP_NUM_THREADS=2 .venv/bin/python bench/fast_options.py [--size 512] [--steps 20] [--dtype fp32|bf16]
        [--threads 2] [--reps 1] [--configs baseline,ngms,...]
"""

import argparse
import statistics
import time

import torch
from _machine import machine

# name -> request fields
CONFIGS = {
    "baseline": {},
    "ngms": {"s_min_uncond": 2.0},  # sigma < 2 from step 9 of 20 (normal schedule): calls 9, 11, ..., 19 skip
    "ngms_all": {"s_min_uncond": 2.0, "s_min_uncond_all": True},
    "skip_early": {"skip_early_cond": 0.2},
    "deepcache3": {"deepcache_interval": 3},
    "deepcache5": {"deepcache_interval": 5},
    "tome0.5": {"token_merging_ratio": 0.5},
    "deepcache3+tome0.5": {"deepcache_interval": 3, "token_merging_ratio": 0.5},
    "cond_cache": {},  # the baseline with the conditioning cache on, second run of the same request (a hit)
}


def build_pipeline():
    from clipdiffusion.diffusion.unet import SD1 as UNET_SD1
    from clipdiffusion.diffusion.unet import UNetModel
    from clipdiffusion.diffusion.vae import SD1 as VAE_SD1
    from clipdiffusion.diffusion.vae import AutoencoderKL
    from clipdiffusion.pipeline import Pipeline
    from clipdiffusion.text.chunking import EOS_ID
    from clipdiffusion.text.clip import SD1_CLIP_L, CLIPTextModel
    from clipdiffusion.text.conditioning import EncoderSpec, TextEncoder

    torch.manual_seed(0)
    text = TextEncoder("sd1", [EncoderSpec("clip_l", CLIPTextModel(SD1_CLIP_L).eval(), EOS_ID, True, 1)])
    unet = UNetModel(UNET_SD1).eval()
    with torch.no_grad():  # default init gives a UNet whose output grows with depth; keep activations tame
        for p in unet.parameters():
            if p.ndim > 1:
                p.mul_(0.5)
    vae = AutoencoderKL(VAE_SD1).eval()
    return Pipeline(text, unet, vae, "sd1", name="sd15-random")


class Counter:
    """UNet rows through the whole UNet and calls through its shallow part (DeepCache)."""

    def __init__(self):
        from clipdiffusion.diffusion.unet import UNetModel

        self.full_rows = self.shallow_calls = 0
        forward, split = UNetModel.forward, UNetModel.forward_split
        counter = self

        def counted_forward(unet, x, *args, **kwargs):
            counter.full_rows += x.shape[0]
            return forward(unet, x, *args, **kwargs)

        def counted_split(unet, x, *args, deep=None, **kwargs):
            if deep is None:
                counter.full_rows += x.shape[0]
            else:
                counter.shallow_calls += 1
            return split(unet, x, *args, deep=deep, **kwargs)

        UNetModel.forward, UNetModel.forward_split = counted_forward, counted_split

    def reset(self):
        self.full_rows = self.shallow_calls = 0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; choose from {', '.join(CONFIGS)}")

    from clipdiffusion.request import GenerationRequest

    pipe = build_pipeline()
    if args.dtype != "fp32":
        pipe.place("cpu", args.dtype)
    counter = Counter()
    base = dict(prompt="a photo of a red fox in a snowy forest, detailed fur, soft light",
                negative_prompt="blurry, low quality", steps=args.steps, guidance=7.0, seed=1, sampler="euler",
                width=args.size, height=args.size)
    print(f"CPU: {machine()}; torch {torch.__version__}; threads {torch.get_num_threads()}; dtype {args.dtype}; "
          f"{args.size}x{args.size}, {args.steps} Euler steps, guidance 7, negative prompt; median of {args.reps}")
    pipe.generate(GenerationRequest(**{**base, "steps": 1}))  # warm-up
    times = {n: [] for n in names}
    counts = {}
    for _ in range(args.reps):
        for name in names:
            request = GenerationRequest(**base, **CONFIGS[name])
            if name == "cond_cache":
                pipe.enable_conditioning_cache()
                pipe.generate(request)  # fills the cache
            counter.reset()
            start = time.perf_counter()
            pipe.generate(request)
            times[name].append(time.perf_counter() - start)
            counts[name] = (counter.full_rows, counter.shallow_calls)
            if name == "cond_cache":
                pipe.enable_conditioning_cache(max_entries=0)
    base_time = statistics.median(times["baseline"]) if "baseline" in times else None
    print()
    print("| config | request fields | s / image | vs baseline | UNet rows (whole) | shallow calls |")
    print("|---|---|---|---|---|---|")
    for name in names:
        t = statistics.median(times[name])
        ratio = f"{t / base_time:.2f}x" if base_time else "-"
        fields = ", ".join(f"{k}={v}" for k, v in CONFIGS[name].items()) or "-"
        print(f"| {name} | {fields} | {t:.2f} | {ratio} | {counts[name][0]} | {counts[name][1]} |")


if __name__ == "__main__":
    main()
