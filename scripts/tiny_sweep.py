"""Training-design sweep for the embedded tiny model: several variants, each trained for a fixed number of steps
per phase, then judged on the held-out prompt set. Steps, not seconds, so a sweep on a faster machine replays what
the 2-core, 60-minute budget affords each variant; ``--time`` measures those per-step costs here first.

    python scripts/tiny_sweep.py --time                     # seconds per step of each variant, this machine
    python scripts/tiny_sweep.py --run base,neg --device cuda --minutes 55 --step-times times.json --out DIR
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


NEG = {"clip_hard_negatives": True, "lr_floor": 0.05, "pool_size": 24000}


def unet(**change):
    return dataclasses.replace(models.TINY_SD, unet=dataclasses.replace(models.TINY_SD.unet, **change))


# name -> (model config, settings changes)
VARIANTS = {
    "base": (models.TINY_SD, {}),
    "neg": (models.TINY_SD, NEG),
    "neg_lr": (models.TINY_SD, {**NEG, "unet_lr": 1e-3}),
    "neg_c64": (unet(model_channels=64, norm_groups=32), NEG),
    "neg_rb2": (unet(num_res_blocks=2), NEG),
    "neg_c64_lr": (unet(model_channels=64, norm_groups=32), {**NEG, "unet_lr": 1e-3}),
    "neg_3lvl": (unet(channel_mult=(1, 2, 2), transformer_depth=(0, 1, 1)), NEG),
    "neg_b64": (models.TINY_SD, {**NEG, "unet_batch": 64, "unet_lr": 1e-3}),
    "neg_sh": (models.TINY_SD, {**NEG, "shares": (0.08, 0.12, 0.03, 0.77)}),
}


def settings_for(name, **extra):
    if name not in VARIANTS:
        sys.exit(f"variant: unknown {name!r} (one of {', '.join(VARIANTS)})")
    config, change = VARIANTS[name]
    models.PRESETS[f"sweep-{name}"] = config
    return TrainSettings(model=f"sweep-{name}", **{**change, **extra})


def time_variants(names, reps=6):
    """Seconds per step of each phase for each variant (median of ``reps`` after one warm-up)."""
    out = {}
    for name in names:
        trainer = Trainer(f"/tmp/sweep-time-{name}-{time.time_ns()}", settings_for(name), log=lambda *_: None)
        trainer.state["scale_factor"] = 1.0
        row = {}
        for phase in PHASES:
            fn = getattr(trainer, f"_{phase}_step")
            times = []
            for i in range(reps + 1):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            row[phase] = sorted(times[1:])[reps // 2]
        trainer.pool = None
        out[name] = row
        print(name, {k: round(v, 3) for k, v in row.items()}, file=sys.stderr, flush=True)
    return out


def budget_steps(step_times, minutes, shares):
    """Steps per phase a ``minutes`` budget split by ``shares`` buys at these per-step times."""
    total = sum(shares)
    return [max(1, int(minutes * 60 * sh / total / step_times[p])) for p, sh in zip(PHASES, shares)]


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--time", action="store_true")
    parser.add_argument("--run", default="")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--minutes", type=float, default=55.0)
    parser.add_argument("--step-times", default="bench/tiny_step_times.json")
    parser.add_argument("--out", default="/tmp/sweep")
    parser.add_argument("--per-count", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.time:
        times = time_variants(args.variants.split(","))
        Path(args.step_times).write_text(json.dumps(times, indent=1))
        return 0
    times = json.loads(Path(args.step_times).read_text())
    for name in args.run.split(","):
        shares = settings_for(name).shares
        steps = budget_steps(times[name], args.minutes, shares)
        steps[2] = 10**9  # the pool is bounded by its size
        settings = settings_for(name, minutes=1440, phase_steps=tuple(steps))
        out = Path(args.out) / name
        start = time.time()
        trainer = Trainer(out, settings, device=args.device, log=lambda line: None)
        trainer.run()
        train_s = time.time() - start
        from clipdiffusion.pipeline import Pipeline
        from clipdiffusion.tiny.eval import evaluate, prompt_set

        pipe = Pipeline.from_file(out / "tiny-sd.safetensors")
        report = evaluate(pipe, prompt_set(args.per_count))
        result = {"variant": name, "steps": steps, "train_s": train_s, "success": report.success,
                  "accuracy": {k: v[0] for k, v in report.accuracy.items()}}  # fmt: skip
        print(json.dumps(result), flush=True)
        (out / "result.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
