"""Tiny-model training steps in fp32 and under CPU bf16 autocast (oneDNN uses AMX where the CPU has it), same
process, interleaved per phase. Prints seconds per step (median) and the bf16/fp32 ratio per phase.

    .venv/bin/python bench/bench_tiny_bf16.py --threads 2 --reps 6
"""

import argparse
import contextlib
import tempfile
import time

import numpy as np
import torch

from _machine import machine
from clipdiffusion.tiny.train import Trainer, TrainSettings


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{machine()}, torch {torch.__version__}, {args.threads} threads")
    trainer = Trainer(tempfile.mkdtemp(), TrainSettings(), log=lambda *_: None)
    trainer.state["scale_factor"] = 1.0
    for _ in range(3):
        trainer._pool_step()

    def bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    for phase in ("clip", "vae", "unet"):
        step = getattr(trainer, f"_{phase}_step")
        times = {"fp32": [], "bf16": []}
        for i in range(args.reps + 1):
            for name, ctx in (("fp32", contextlib.nullcontext), ("bf16", bf16)):
                start = time.perf_counter()
                with ctx():
                    step()
                if i:  # the first round warms up
                    times[name].append(time.perf_counter() - start)
        fp32, bf = np.median(times["fp32"]), np.median(times["bf16"])
        print(f"{phase:5s} fp32 {fp32:.3f} s  bf16 {bf:.3f} s  bf16/fp32 {bf / fp32:.2f}")


if __name__ == "__main__":
    main()
