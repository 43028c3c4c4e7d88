"""Benchmark: our UNet and VAE vs diffusers' UNet2DConditionModel / AutoencoderKL at full SD 1.5 size.

One UNet step (batch 2, 4x64x64 latents, 77-token context: one classifier-free-guidance step at 512x512) and one
VAE decode to 512x512 (batch 1), fp32 on CPU. Both sides run the *same* weight tensors: diffusers' random init
is renamed through our table and assigned to our model without copying, so memory holds one set. Repetitions
are interleaved (ours, reference, ours, ...) and the median is reported, because other processes share the
machine. The UNet's FLOPs are counted once with FlopCounterMode and set against a measured fp32 matmul peak.
Ours also runs a second time as a channels-last (NHWC) twin over the same weights, the one optional speedup.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_unet_vae.py --threads 1 --reps 2
"""

import argparse
import statistics
import time

import torch
from _machine import machine


def matmul_peak_gflops(n: int = 2048, reps: int = 5, dtype=torch.float32) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def build_unet():
    import diffusers

    from clipdiffusion.checkpoints.diffusers_unet import unet_config_from_diffusers, unet_diffusers_to_ldm
    from clipdiffusion.diffusion.unet import UNetModel

    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).eval()
    cfg = unet_config_from_diffusers(dict(ref.config))
    ours = UNetModel(cfg, device="meta").eval()
    ours.load_state_dict(unet_diffusers_to_ldm(ref.state_dict(), cfg), strict=True, assign=True)
    return ours, ref


def build_vae():
    import diffusers

    from clipdiffusion.checkpoints.diffusers_vae import vae_config_from_diffusers, vae_diffusers_to_ldm
    from clipdiffusion.diffusion.vae import AutoencoderKL

    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4).eval()
    cfg = vae_config_from_diffusers(dict(ref.config))
    ours = AutoencoderKL(cfg, device="meta").eval()
    # diffusers' attention projections are Linear; the reshape to 1x1 conv makes views of the same storage.
    ours.load_state_dict(vae_diffusers_to_ldm(ref.state_dict(), cfg), strict=True, assign=True)
    return ours, ref


def channels_last_twin(model):
    """A second model over the same weights, converted to NHWC (only the 4-D conv weights are copied)."""
    twin = type(model)(model.config, device="meta").eval()
    twin.load_state_dict(model.state_dict(), strict=True, assign=True)
    return twin.to(memory_format=torch.channels_last)


def compare(name, runs: dict, reps):
    """`runs` maps a label to a callable; the first is ours (default layout), the last the reference."""
    outputs = {label: fn() for label, fn in runs.items()}  # also the warm-up
    ref_label = list(runs)[-1]
    diffs = {label: (out - outputs[ref_label]).abs().max().item() for label, out in outputs.items()}
    times = {label: [] for label in runs}
    for _ in range(reps):
        for label, fn in runs.items():
            times[label].append(_timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{name}:")
    for label in runs:
        print(f"  {label:24s} median {med[label]:7.2f} s  ratio to {ref_label} {med[label] / med[ref_label]:.3f}  "
              f"max |diff| {diffs[label]:.2e}  runs {[round(t, 2) for t in times[label]]}")
    return med


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--skip-vae", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}; torch {torch.__version__}; threads {torch.get_num_threads()}; fp32 CPU")
    peak = matmul_peak_gflops()
    print(f"fp32 matmul peak (2048^3 torch.mm, best of 5): {peak:.1f} GFLOP/s")

    with torch.inference_mode():
        ours, ref = build_unet()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 4, 64, 64, generator=g)
        t = torch.tensor([500.0, 500.0])
        context = torch.randn(2, 77, 768, generator=g)
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            ours(x, t, context)
        flops = counter.get_total_flops()
        ours_cl = channels_last_twin(ours)
        med = compare("UNet step (B=2, 4x64x64, T=77)", {
            "ours": lambda: ours(x, t, context),
            "ours channels_last": lambda: ours_cl(x, t, context),
            "diffusers": lambda: ref(x, t, context).sample}, args.reps)
        print(f"UNet FLOPs per step: {flops / 1e9:.1f} GFLOP")
        for label, seconds in med.items():
            rate = flops / seconds / 1e9
            print(f"  {label:24s} {rate:6.1f} GFLOP/s = {100 * rate / peak:.0f}% of the matmul peak")
        del ours, ours_cl, ref

        if not args.skip_vae:
            ours, ref = build_vae()
            z = torch.randn(1, 4, 64, 64, generator=g)
            ours_cl = channels_last_twin(ours)
            compare("VAE decode (1x4x64x64 -> 512x512)", {
                "ours": lambda: ours.decode(z),
                "ours channels_last": lambda: ours_cl.decode(z),
                "diffusers": lambda: ref.decode(z).sample}, args.reps)


if __name__ == "__main__":
    main()
