"""Seconds per generation at SD 1.5 size for each of issue 19's options against the exact baseline and against
diffusers' ``StableDiffusionPipeline`` on the same weights, in one run: NGMS (``s_min_uncond``), Skip Early CFG
(``skip_early_cond``), DeepCache (``deepcache_interval``) and ToMe (``token_merging_ratio``), alone and combined,
plus the conditioning cache (the same request twice).

The model is SD 1.5's architecture with random weights (CLIP-L text encoder, the SD1 UNet, the SD VAE), built in
our own modules, so nothing is downloaded; speed does not depend on the weights' values. diffusers' pipeline is
built over the *same* tensors: ``save_diffusers(..., weights=False)`` writes the configs, tokenizer and scheduler
the project would write, and our state dicts go through the project's rename tables (``unet_ldm_to_diffusers``,
``vae_ldm_to_diffusers``, ``text_encoder_to_diffusers``) into models built on the meta device, so memory holds one
set of weights. diffusers runs its best stock CPU configuration: SDPA attention processors (``AttnProcessor2_0``),
fp32 (``--ref-dtype``), EulerDiscreteScheduler given our sigmas (``sigmas=``, so both run the same 20 sigmas).

Before timing, ours-exact (the baseline, which is also our default request) and diffusers run the same request
(prompt, negative prompt, guidance 7, Euler, the same initial latents passed to diffusers as ``latents=``) and the
largest pixel difference is printed and checked against ``--tolerance``. Each configuration then runs one full
generation (text encoding, ``--steps`` sampler steps, VAE decode) per repetition, after one warm-up of each side;
diffusers runs right after our baseline in every repetition. The UNet's evaluations are counted (rows through the
whole UNet, calls through its shallow part only). Then one UNet step (batch 2, the CFG step) of ours and of
diffusers is timed, interleaved, and set against the matmul peak of fp32 and bf16 (``torch.mm``: fp32 2048^3, best
of 5; bf16 1024^3, best of 3; the best dtype's peak is the machine's limit), its FLOPs counted once by
FlopCounterMode. Adherence is not measured here: ``clipdiffusion eval --studies main`` with the same flags does
that on the tiny model, and ``scripts/fast_options_table.py`` joins the two.

    OMP_NUM_THREADS=2 .venv/bin/python bench/fast_options.py [--size 512] [--steps 20] [--dtype fp32|bf16]
        [--ref-dtype fp32|bf16] [--threads 2] [--reps 1] [--configs baseline,diffusers,ngms,...] [--json out.json]
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _machine import machine
from bench_unet_vae import matmul_peak_gflops
from clipdiffusion.fast_options import SPEEDS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
REFERENCE = "diffusers"  # the configuration name of diffusers' pipeline in --configs
# name -> request fields
CONFIGS = {
    "baseline": {},
    REFERENCE: None,
    "ngms": {"s_min_uncond": 2.0},  # sigma < 2 from step 9 of 20 (normal schedule): calls 9, 11, ..., 19 skip
    "ngms_all": {"s_min_uncond": 2.0, "s_min_uncond_all": True},
    "skip_early": {"skip_early_cond": 0.2},
    "deepcache2": {"deepcache_interval": 2},
    "deepcache3": {"deepcache_interval": 3},
    "deepcache5": {"deepcache_interval": 5},
    "tome0.5": {"token_merging_ratio": 0.5},
    "deepcache3+tome0.5": {"deepcache_interval": 3, "token_merging_ratio": 0.5},
    "ngms+deepcache2": {"s_min_uncond": 2.0, "deepcache_interval": 2},  # the two within the noise on the tiny model
    "fast": None,  # the CLI's --speed fast: fast_options.SPEEDS["fast"], filled in below
    "cond_cache": {},  # the baseline with the conditioning cache on, second run of the same request (a hit)
}
CONFIGS["fast"] = dict(SPEEDS["fast"])
PROMPT = "a photo of a red fox in a snowy forest, detailed fur, soft light"
NEGATIVE = "blurry, low quality"


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


def _adopt(model, tensors):
    """Give ``model`` (built on the meta device) ``tensors`` as its own, without copying; nothing may stay meta."""
    model.load_state_dict(tensors, strict=True, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise SystemExit(f"diffusers twin: tensors left on the meta device: {left[:5]}")
    return model.eval()


def diffusers_twin(pipe, dtype: str):
    """diffusers' StableDiffusionPipeline over the same weight tensors as ``pipe`` (cast copies when ``dtype``
    differs from ours), with the project's own configs, tokenizer and key tables."""
    import diffusers
    import transformers

    from clipdiffusion.checkpoints.diffusers_unet import unet_ldm_to_diffusers
    from clipdiffusion.checkpoints.diffusers_vae import vae_ldm_to_diffusers
    from clipdiffusion.checkpoints.save import save_diffusers
    from clipdiffusion.checkpoints.text_layouts import text_encoder_to_diffusers

    torch_dtype = DTYPES[dtype]

    def cast(tensors):
        return {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in tensors.items()}

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_diffusers(pipe, Path(tmp) / "sd15", weights=False)  # configs, tokenizer, scheduler
        with torch.device("meta"):
            unet = diffusers.UNet2DConditionModel.from_config(
                diffusers.UNet2DConditionModel.load_config(folder / "unet"))
            vae = diffusers.AutoencoderKL.from_config(diffusers.AutoencoderKL.load_config(folder / "vae"))
        unet = _adopt(unet, cast(unet_ldm_to_diffusers(dict(pipe.unet.state_dict()), pipe.unet.config)))
        vae = _adopt(vae, cast(vae_ldm_to_diffusers(dict(pipe.vae.state_dict()), pipe.vae.config)))
        [(sub, tensors, _config)] = text_encoder_to_diffusers(pipe.family, pipe.text_encoder.encoders)
        text_config = transformers.CLIPTextConfig.from_pretrained(folder / sub)
        text_config._attn_implementation = "sdpa"
        text = transformers.CLIPTextModel(text_config)  # small: built normally, then given our tensors
        if not any(k.startswith("text_model.") for k in text.state_dict()):  # transformers 5 drops the prefix
            tensors = {k.removeprefix("text_model."): v for k, v in tensors.items()}
        text.load_state_dict(cast(tensors), strict=True, assign=True)
        text.eval()
        tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")
        scheduler = diffusers.EulerDiscreteScheduler.from_pretrained(folder / "scheduler", timestep_spacing="linspace")
    ref = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                            scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                            requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    processors = sorted({type(p).__name__ for p in list(unet.attn_processors.values())
                         + list(vae.attn_processors.values())})
    return ref, f"{dtype}, attention {'/'.join(processors)}, text {text_config._attn_implementation}"


def our_sigmas(pipe, steps: int) -> list:
    """The sigmas our Euler runs for ``steps`` steps of the normal schedule (21 values for 20, ending at 0)."""
    from clipdiffusion.diffusion.denoiser import Denoiser
    from clipdiffusion.diffusion.samplers import sampler_sigmas

    return sampler_sigmas("euler", "normal", Denoiser(None, pipe.alphas_cumprod, pipe.prediction).sigmas,
                          steps).tolist()


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
    parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    parser.add_argument("--ref-dtype", default="fp32", choices=tuple(DTYPES), help="diffusers' dtype")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--step-reps", type=int, default=2, help="repetitions of the single UNet step timing")
    parser.add_argument("--tolerance", type=float, default=2e-2,
                        help="largest pixel difference (in [0, 1]) allowed between ours-exact and diffusers")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; choose from {', '.join(CONFIGS)}")
    if REFERENCE in names and "baseline" in names:  # diffusers right after our baseline in every repetition
        names.remove(REFERENCE)
        names.insert(names.index("baseline") + 1, REFERENCE)

    from clipdiffusion.request import GenerationRequest

    pipe = build_pipeline()
    ref = ref_label = None
    if REFERENCE in names:
        ref, ref_label = diffusers_twin(pipe, args.ref_dtype)
    if args.dtype != "fp32":
        pipe.place("cpu", args.dtype)
    counter = Counter()
    base = dict(prompt=PROMPT, negative_prompt=NEGATIVE, steps=args.steps, guidance=7.0, seed=1, sampler="euler",
                width=args.size, height=args.size)
    f = pipe.latent_factor
    shape = (1, pipe.unet.config.in_channels, args.size // f, args.size // f)
    sigmas = our_sigmas(pipe, args.steps)

    def run_diffusers(sigma_list, output_type="pil"):
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(base["seed"]))  # our seed's noise
        with torch.no_grad():
            return ref(PROMPT, negative_prompt=NEGATIVE, sigmas=sigma_list, guidance_scale=7.0, width=args.size,
                       height=args.size, latents=noise.to(DTYPES[args.ref_dtype]), output_type=output_type).images

    print(f"machine: {machine()}; torch {torch.__version__}; threads {torch.get_num_threads()}; ours {args.dtype}"
          + (f"; diffusers {ref_label}" if ref else "")
          + f"; {args.size}x{args.size}, {args.steps} Euler steps (normal schedule), guidance 7, negative prompt; "
          f"median of {args.reps}", flush=True)
    pipe.generate(GenerationRequest(**{**base, "steps": 1}))  # warm-up
    figures = {"machine": machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "dtype": args.dtype, "size": args.size, "steps": args.steps, "reps": args.reps}
    if ref is not None:
        run_diffusers([sigmas[0], 0.0])  # warm-up
        start = time.perf_counter()
        expected = run_diffusers(sigmas, "np")
        check_s = time.perf_counter() - start
        counter.reset()
        start = time.perf_counter()
        got = pipe.generate(GenerationRequest(**base)).pixels
        ours_s = time.perf_counter() - start
        diff = float(abs(got - expected).max())
        mean = float(abs(got - expected).mean())
        spread = float(expected.std())
        print(f"check: ours-exact vs diffusers, same weights, sigmas and initial latents: max |pixel diff| "
              f"{diff:.2e}, mean {mean:.2e} (image std {spread:.3f}; tolerance {args.tolerance:g}); "
              f"these runs: ours {ours_s:.1f} s, diffusers {check_s:.1f} s (counted as the first timed pair)",
              flush=True)
        figures["check"] = {"max_abs_pixel_diff": diff, "mean_abs_pixel_diff": mean, "tolerance": args.tolerance}
        if args.dtype == args.ref_dtype and not diff < args.tolerance:
            raise SystemExit(f"ours-exact and diffusers differ by {diff:.3g} > tolerance {args.tolerance:g}: "
                             "not the same computation, the times would not compare")
    times = {n: [] for n in names}
    counts = {}
    checked = set()
    if ref is not None and "baseline" in names:  # the check's two full generations are the first timed pair
        times["baseline"].append(ours_s)
        counts["baseline"] = (counter.full_rows, counter.shallow_calls)
        checked.add("baseline")
        if REFERENCE in names:
            times[REFERENCE].append(check_s)
            checked.add(REFERENCE)
    for rep in range(args.reps):
        for name in names:
            if rep == 0 and name in checked:
                print(f"  {name}: {times[name][-1]:.1f} s (the check run)", flush=True)
                continue
            if name == REFERENCE:
                start = time.perf_counter()
                run_diffusers(sigmas)
                times[name].append(time.perf_counter() - start)
                print(f"  {name}: {times[name][-1]:.1f} s", flush=True)
                continue
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
            print(f"  {name}: {times[name][-1]:.1f} s", flush=True)
    med = {n: statistics.median(v) for n, v in times.items()}
    base_time, ref_time = med.get("baseline"), med.get(REFERENCE)
    print()
    print("| config | request fields | s / image | vs ours-exact | vs diffusers | UNet rows (whole) | shallow calls |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        t = med[name]
        vs_base = f"{t / base_time:.2f}x" if base_time else "-"
        vs_ref = f"{t / ref_time:.2f}x" if ref_time else "-"
        if name == REFERENCE:
            fields, rows, shallow = f"StableDiffusionPipeline, {ref_label}", args.steps * 2, 0
        else:
            fields = ", ".join(f"{k}={v}" for k, v in CONFIGS[name].items()) or "- (exact: the request defaults)"
            if name == "cond_cache":
                fields = "- (conditioning cache hit)"
            rows, shallow = counts[name]
        print(f"| {name} | {fields} | {t:.2f} | {vs_base} | {vs_ref} | {rows} | {shallow} |")
    figures["configs"] = {n: {"seconds": med[n], "runs": times[n], "unet_rows": counts.get(n, (None,))[0],
                              "shallow_calls": counts.get(n, (None, None))[1]} for n in names}
    if args.step_reps > 0:  # 0: no single-step timing (another run of the script measured it)
        figures["unet_step"] = unet_step_share(pipe, ref, args, shape)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


def unet_step_share(pipe, ref, args, shape):
    """One CFG UNet step (batch 2) of ours and of diffusers, timed interleaved; its FLOPs against the matmul peaks."""
    from torch.utils.flop_counter import FlopCounterMode

    # bf16 at 1024^3, best of 3: without native bf16 units (AVX2) one 2048^3 bf16 product takes tens of seconds
    peaks = {"fp32": matmul_peak_gflops(), "bf16": matmul_peak_gflops(1024, 3, torch.bfloat16)}
    best = max(peaks, key=peaks.get)
    g = torch.Generator().manual_seed(1)
    unet_dtype = DTYPES[args.dtype]
    x = torch.randn((2,) + shape[1:], generator=g)
    context = torch.randn(2, 77, pipe.unet.config.context_dim, generator=g)
    t = torch.tensor([500.0, 500.0])
    runs = {"ours": lambda: pipe.unet(x.to(unet_dtype), t, context.to(unet_dtype))}
    if ref is not None:
        ref_dtype = DTYPES[args.ref_dtype]
        runs[REFERENCE] = lambda: ref.unet(x.to(ref_dtype), t, context.to(ref_dtype)).sample
    with torch.inference_mode():
        flop_counter = FlopCounterMode(display=False)
        with flop_counter:
            runs["ours"]()
        flops = flop_counter.get_total_flops()
        times = {k: [] for k in runs}
        for _ in range(args.step_reps):
            for label, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[label].append(time.perf_counter() - start)
    print()
    print(f"matmul peak: fp32 {peaks['fp32']:.1f} GFLOP/s (2048^3 torch.mm, best of 5), bf16 {peaks['bf16']:.1f} "
          f"GFLOP/s (1024^3, best of 3); best dtype here: {best}")
    print(f"UNet step (batch 2, 4x{shape[2]}x{shape[3]}, T=77): {flops / 1e9:.1f} GFLOP (FlopCounterMode)")
    out = {"peaks_gflops": peaks, "best_dtype": best, "gflop": flops / 1e9, "sides": {}}
    for label, runs_s in times.items():
        seconds = statistics.median(runs_s)
        rate = flops / seconds / 1e9
        dtype = args.dtype if label == "ours" else args.ref_dtype
        print(f"  {label:10s} {dtype}: {seconds:.2f} s (runs {[round(s, 2) for s in runs_s]}) = {rate:.1f} GFLOP/s "
              f"= {100 * rate / peaks[dtype]:.0f}% of the {dtype} peak, {100 * rate / peaks[best]:.0f}% of the best "
              f"dtype's ({best}) peak")
        out["sides"][label] = {"seconds": seconds, "runs": runs_s, "gflops": rate,
                               "share_of_best_peak": rate / peaks[best]}
    return out


if __name__ == "__main__":
    sys.exit(main())
