"""Continue a finished ``train-tiny`` run's UNet phase to a total step count, on the run's own CLIP, VAE and pool,
then export. It asks whether a weak run lacked UNet steps (a slow hour gives fewer on the clock) or something else.

With the default constant learning rate (``lr_floor`` None) this is the run its UNet phase would have been with
more time; with a cosine decay it is not (the decay restarts from the new cap), so such runs are refused.

    python scripts/tiny_extend_unet.py RUN_DIR COPY_DIR --unet-steps 7138 [--threads 2]

RUN_DIR is copied to COPY_DIR first (RUN_DIR is left as it was); the model lands in COPY_DIR/tiny-sd.safetensors.
"""

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch

from clipdiffusion.errors import ClipDiffusionError
from clipdiffusion.tiny.settings import PHASES, TrainSettings
from clipdiffusion.tiny.train import Trainer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished train-tiny folder (state.pt)")
    parser.add_argument("copy", type=Path, help="new folder to continue in (must not exist)")
    parser.add_argument("--unet-steps", type=int, required=True, help="total UNet steps to reach")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        if not (args.run / "state.pt").is_file():
            raise ClipDiffusionError(f"run: no state.pt in {str(args.run)!r}")
        if args.copy.exists():
            raise ClipDiffusionError(f"copy: {str(args.copy)!r} already exists")
        if args.unet_steps < 1:
            raise ClipDiffusionError(f"unet_steps: {args.unet_steps} must be positive")
        if not (args.run / "tiny-sd.safetensors").is_file():
            raise ClipDiffusionError(f"run: no tiny-sd.safetensors in {str(args.run)!r} (the run has not finished)")
        from safetensors import safe_open

        with safe_open(str(args.run / "tiny-sd.safetensors"), "np") as f:
            saved = json.loads((f.metadata() or {}).get("clipdiffusion.tiny.train_settings", "null"))
        if not isinstance(saved, dict):
            raise ClipDiffusionError(f"run: {str(args.run)!r}'s model records no training settings")
        if saved.get("lr_floor") is not None:
            raise ClipDiffusionError(f"run: lr_floor {saved['lr_floor']} (a cosine decay) cannot be extended")
        saved = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
        # every setting the run trained with (model, batches, seed, ...), but a day of clock for the UNet phase and
        # a step cap on it, which is what ends it
        try:
            settings = dataclasses.replace(TrainSettings(**saved), minutes=24 * 60,
                                           phase_steps=(0, 0, 0, args.unet_steps))  # fmt: skip
        except TypeError as e:
            raise ClipDiffusionError(f"run: {str(args.run)!r}'s recorded training settings do not fit ({e})") from None
        torch.set_num_threads(args.threads)
        shutil.copytree(args.run, args.copy)
        try:  # a state that cannot resume (corrupt, planted, wrong model) leaves no half-made copy behind
            trainer = Trainer(args.copy, settings, resume=True)
        except ClipDiffusionError:
            shutil.rmtree(args.copy)
            raise
        done = trainer.state["step"]["unet"]
        if trainer.state["phase"] != len(PHASES) or done >= args.unet_steps:
            shutil.rmtree(args.copy)
            raise ClipDiffusionError(f"unet_steps: the run is at phase {trainer.state['phase']} with {done} UNet "
                                     f"steps; a finished run short of {args.unet_steps} can be extended")  # fmt: skip
        trainer.state["phase"] = PHASES.index("unet")
        print(f"continuing {args.run}: UNet {done} -> {args.unet_steps} steps in {args.copy}")
        print(trainer.run())
    except ClipDiffusionError as e:
        print(f"tiny_extend_unet: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
