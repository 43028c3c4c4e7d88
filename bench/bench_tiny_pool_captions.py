"""Tiny-model UNet training step with a fresh caption per sample encoded every step (pool_captions 0, how the
first shipped model was trained) against captions encoded once in the pool (pool_captions 4, the default since
session 5), same process, interleaved. Also the pool step (64 scenes) each way: what the pool phase pays for it.
Prints seconds per step (median) and the ratios.

    .venv/bin/python bench/bench_tiny_pool_captions.py --threads 2 --reps 10
"""

import argparse
import dataclasses
import tempfile
import time

import numpy as np
import torch

from _machine import machine
from clipdiffusion.tiny.train import Trainer, TrainSettings


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{machine()}, torch {torch.__version__}, {args.threads} threads")
    pooled = TrainSettings()
    fresh = dataclasses.replace(pooled, pool_captions=0)
    trainers = {k: Trainer(tempfile.mkdtemp(), settings, log=lambda *_: None)
                for k, settings in ((0, fresh), (4, pooled))}  # fmt: skip
    times = {("pool", 0): [], ("pool", 4): [], ("unet", 0): [], ("unet", 4): []}
    for i in range(4):  # pool steps of 64 scenes, both ways, interleaved
        for k, trainer in trainers.items():
            trainer.state["scale_factor"] = 1.0
            start = time.perf_counter()
            trainer._pool_step()
            if i:  # the first round warms up
                times[("pool", k)].append(time.perf_counter() - start)
    trainer = trainers[4]  # UNet steps on one pool, each way
    for i in range(args.reps + 1):
        for settings in (fresh, pooled):
            trainer.settings = settings
            start = time.perf_counter()
            trainer._unet_step()
            if i:  # the first round warms up
                times[("unet", settings.pool_captions)].append(time.perf_counter() - start)
    med = {k: float(np.median(v)) for k, v in times.items()}
    for phase in ("pool", "unet"):
        a, b = med[(phase, 0)], med[(phase, 4)]
        print(f"{phase:4s} fresh captions {a:.3f} s  pooled (4 per scene) {b:.3f} s  pooled / fresh {b / a:.2f}")
    per_scene = (med[("pool", 4)] - med[("pool", 0)]) / 64
    print(f"pool phase: {per_scene * 12000:.0f} s more for 12,000 scenes; UNet steps per 2,000 s: "
          f"{2000 / med[('unet', 0)]:.0f} fresh, {2000 / med[('unet', 4)]:.0f} pooled")


if __name__ == "__main__":
    main()
