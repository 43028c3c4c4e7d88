"""UNet-only design sweep for the embedded tiny model: every variant trains a fresh UNet on the *same* frozen tiny
CLIP and VAE (taken from a finished checkpoint, by default the shipped one), so the variants differ only in what
the sweep changes. Each replays the UNet step count a 55-minute 2-core run buys it (the shipped run's UNet phase:
2175 s; per-step seconds measured here, ``bench/tiny_step_times.json``), and is judged on the held-out prompt set
at half and at the whole of that count.

    python scripts/tiny_unet_sweep.py --run sz,sz_rb2 --device cuda --out DIR        # one JSON line per result
    python scripts/tiny_unet_sweep.py --run sz --scale 0.001 --per-count 1 --out /tmp/smoke   # seconds, a check
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from clipdiffusion.tiny import models
from clipdiffusion.tiny.settings import PHASES, TrainSettings
from clipdiffusion.tiny.train import Trainer

SHIPPED_UNET_SECONDS = 2175  # eval/training.md, the shipped run's UNet phase on 2 cores
from tiny_sweep import unet  # noqa: E402  (scripts/ is on sys.path when run as a script)

# pinned to run 3's UNet learning rate and fresh captions every step, which the recorded results used (the
# defaults are now 1e-3 and four pooled captions per scene)
RUN3 = {"unet_lr": 5e-4, "pool_captions": 0}
SZ = {**RUN3, "size_named": 0.5}
# name -> (model config, settings changes, step-time row of its UNet in bench/tiny_step_times.json)
VARIANTS = {
    "base": (models.TINY_SD, RUN3, "base"),
    "lr": (models.TINY_SD, {"unet_lr": 1e-3, "pool_captions": 0}, "base"),
    "lr_pc4": (models.TINY_SD, {"unet_lr": 1e-3, "pool_captions": 4}, "base"),  # the defaults since session 5
    # half the batch: twice the updates for the same samples (run with twice the --steps to compare)
    "lr_b16": (models.TINY_SD, {"unet_lr": 1e-3, "pool_captions": 4, "unet_batch": 16}, "base"),
    "sz": (models.TINY_SD, SZ, "base"),
    "sz_lr": (models.TINY_SD, {**SZ, "unet_lr": 1e-3}, "base"),
    "sz_rb2": (unet(num_res_blocks=2), SZ, "neg_rb2"),
    "sz_c64": (unet(model_channels=64, norm_groups=32), SZ, "neg_c64"),
    "sz_3lvl": (unet(channel_mult=(1, 2, 2), transformer_depth=(0, 1, 1)), SZ, "neg_3lvl"),
}


def unet_steps(name, step_times, scale=1.0):
    """UNet steps the shipped run's UNet seconds buy this variant on 2 cores."""
    return max(2, int(scale * SHIPPED_UNET_SECONDS / step_times[VARIANTS[name][2]]["unet"]))


def sweep_one(name, args, step_times):
    from clipdiffusion.pipeline import Pipeline
    from clipdiffusion.tiny.eval import evaluate, prompt_set

    config, change, _ = VARIANTS[name]
    models.PRESETS[f"sweep-{name}"] = config
    total = args.steps or unet_steps(name, step_times, args.scale)
    base = TrainSettings(model=f"sweep-{name}", minutes=1440, **change)
    out = Path(args.out) / name
    trainer = Trainer(out, base, device=args.device, log=lambda line: None, resume=args.resume)
    if not args.resume:  # the frozen parts, from the finished checkpoint (a resumed state already holds them)
        frozen = Pipeline.from_file(args.base)
        trainer.models["text"].load_state_dict(frozen.text_encoder.encoders[0].model.state_dict())
        trainer.models["vae"].load_state_dict(frozen.vae.state_dict())
        trainer.state["scale_factor"] = frozen.vae.config.scale_factor
        trainer.state["phase"] = PHASES.index("pool")
    start = time.time()
    for fraction in args.fractions:
        steps = max(1, int(total * fraction))
        if steps <= trainer.state["step"]["unet"]:  # a resumed run has passed this point already
            continue
        trainer.settings = dataclasses.replace(base, phase_steps=(0, 0, 10**9, steps))
        trainer.state["phase"] = min(trainer.state["phase"], PHASES.index("unet"))
        path = trainer.run()
        # keep each evaluated point (the next fraction's export overwrites tiny-sd.safetensors)
        kept = path.with_name(f"tiny-sd-{trainer.state['step']['unet']}.safetensors")
        kept.write_bytes(path.read_bytes())
        train_s = time.time() - start
        torch.set_num_threads(args.eval_threads)
        report = evaluate(Pipeline.from_file(path), prompt_set(args.per_count))
        torch.set_num_threads(args.threads)
        result = {"variant": name, "base": str(args.base), "unet_steps": trainer.state["step"]["unet"], "of": total,
                  "train_s": round(train_s), "success": report.success, "extra": round(report.extra, 3),
                  "accuracy": {k: round(v[0], 3) for k, v in report.accuracy.items()}}  # fmt: skip
        print(json.dumps(result), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default="sz")
    parser.add_argument("--base", default="src/clipdiffusion/tiny/data/tiny-sd.safetensors")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--step-times", default="bench/tiny_step_times.json")
    parser.add_argument("--scale", type=float, default=1.0, help="share of the 55-minute run's UNet steps")
    parser.add_argument("--out", default="/tmp/unet-sweep")
    parser.add_argument("--per-count", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="UNet steps (instead of the 55-minute count)")
    parser.add_argument("--fractions", type=lambda s: [float(f) for f in s.split(",")], default=[0.5, 1.0],
                        help="evaluate after these shares of the steps")
    parser.add_argument("--resume", action="store_true", help="continue the state in OUT/VARIANT (same --steps)")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        sys.exit(f"steps: {args.steps} must be at least 1")
    if not args.fractions or any(not 0 < f <= 1 for f in args.fractions):
        sys.exit(f"fractions: {args.fractions} must each be in (0, 1]")
    step_times = json.loads(Path(args.step_times).read_text())
    names = args.run.split(",")
    for name in names:
        if name not in VARIANTS:
            sys.exit(f"variant: unknown {name!r} (one of {', '.join(VARIANTS)})")
    torch.set_num_threads(args.threads)
    for name in names:
        sweep_one(name, args, step_times)
    return 0


if __name__ == "__main__":
    sys.exit(main())
