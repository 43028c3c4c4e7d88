"""``clipdiffusion train-tiny --out DIR [--minutes N] [--resume]``: train the embedded tiny model from scratch;
``--recipe shipped`` reproduces the shipped model in one command (a from-scratch run, its UNet fine-tune, then the
text tower's depth alignment).

Single process; ``--threads`` sets torch's intra-op threads (default 2, the machine the budget was sized for).
The result is ``DIR/tiny-sd.safetensors``; copy it to ``src/clipdiffusion/tiny/data/`` to ship it."""

import sys

from ..errors import ClipDiffusionError


def add_arguments(parser):
    from ..tiny.models import PRESETS

    parser.add_argument("--out", required=True, help="folder for state.pt, log.jsonl and tiny-sd.safetensors")
    parser.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget of the whole run")
    parser.add_argument("--resume", action="store_true", help="continue the training state in --out")
    parser.add_argument("--model", default="tiny-sd", choices=sorted(PRESETS), help="model sizes")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool-size", type=int, default=12000, help="scenes rendered and encoded once")
    parser.add_argument("--size-named", type=float, default=None, metavar="P",
                        help="share of objects whose size a training caption names (default: the shipped recipe's)")
    parser.add_argument("--unet-lr", type=float, default=None, metavar="LR",
                        help="the UNet's AdamW learning rate (default 1e-3)")
    parser.add_argument("--pool-captions", type=int, default=None, metavar="K",
                        help="captions encoded once per pooled scene (default 4; 0: a fresh caption every UNet "
                             "step, as the first shipped model was trained)")  # fmt: skip
    parser.add_argument("--phase-steps", default=None, metavar="CLIP,VAE,POOL,UNET",
                        help="stop each phase after this many steps as well as at its share of --minutes: with a "
                             "generous --minutes, a run's logged step counts replay it exactly (same seed, torch "
                             "and threads)")  # fmt: skip
    parser.add_argument("--clip-hard-negatives", choices=("on", "off"), default=None,
                        help="NegCLIP-style twins (one attribute changed) in the tiny CLIP's loss")
    parser.add_argument("--clip-readout", type=float, default=None, metavar="W",
                        help="weight of the tiny CLIP's cell-readout loss (its context must name each cell's "
                             "colour, shape and size to a cross-attention probe); 0: contrastive only")  # fmt: skip
    parser.add_argument("--deep-objects", type=float, default=None, metavar="P",
                        help="share of the UNet's captions with objects after 0-240 tokens of style tags "
                             "(objects at every depth of a window; default 0)")  # fmt: skip
    parser.add_argument("--window-share", type=float, default=None, metavar="P",
                        help="share of captions past 75 tokens laid out by the window strategy (default 0: chunk)")
    parser.add_argument("--init-from", default=None, metavar="MODEL",
                        help="start from this tiny model's text tower, VAE and UNet; with --phase-steps 0,0,P,U "
                             "it fine-tunes the UNet alone")  # fmt: skip
    parser.add_argument("--lr-floor", type=float, default=None, metavar="F",
                        help="cosine-decay each phase's learning rate to this share of its base (default: constant)")
    parser.add_argument("--align-text", type=int, default=None, metavar="STEPS",
                        help="with --init-from: only align that model's text tower for STEPS steps, so an object's "
                             "states do not depend on how many tags precede it (tiny/align.py), into OUT")  # fmt: skip
    parser.add_argument("--recipe", default=None, choices=("shipped",),
                        help="reproduce a recorded model: 'shipped' trains OUT/base from scratch by the shipped "
                             "run's step counts, fine-tunes its UNet into OUT/finetune, then aligns its text tower "
                             "into OUT (other settings flags are refused)")  # fmt: skip
    parser.add_argument("--eval", type=int, default=0, metavar="N",
                        help="afterwards, evaluate the result on N prompts per object count")  # fmt: skip


def run(args) -> int:
    if not 1 <= args.threads <= 256:
        raise ClipDiffusionError(f"threads: {args.threads} is outside 1..256")
    if args.pool_size < 1:
        raise ClipDiffusionError(f"pool-size: {args.pool_size} must be positive")
    import torch

    from ..tiny.settings import TrainSettings, pace_notes, shipped_run
    from ..tiny.train import Trainer

    torch.set_num_threads(args.threads)
    if args.recipe is not None:
        return _run_recipe(args, Trainer)
    if args.align_text is not None:
        return _run_align(args)
    phase_steps = None
    if args.phase_steps is not None:
        try:
            phase_steps = tuple(int(n) for n in args.phase_steps.split(","))
        except ValueError:
            raise ClipDiffusionError(f"phase-steps: {args.phase_steps!r} is not four comma-separated integers") from None
    hard = None if args.clip_hard_negatives is None else args.clip_hard_negatives == "on"
    options = (("size_named", args.size_named), ("unet_lr", args.unet_lr), ("pool_captions", args.pool_captions),
               ("phase_steps", phase_steps), ("clip_hard_negatives", hard),
               ("clip_readout", args.clip_readout), ("deep_objects", args.deep_objects),
               ("window_share", args.window_share), ("lr_floor", args.lr_floor))  # fmt: skip
    extra = {k: v for k, v in options if v is not None}
    if args.init_from is not None:
        from pathlib import Path

        if not Path(args.init_from).is_file():
            raise ClipDiffusionError(f"init-from: {args.init_from!r} is not a file")
        extra["init_from"] = str(args.init_from)
    settings = TrainSettings(model=args.model, minutes=args.minutes, seed=args.seed, pool_size=args.pool_size, **extra)
    trainer = Trainer(args.out, settings, resume=args.resume, log=lambda line: print(line, file=sys.stderr))
    path = trainer.run()
    shipped = shipped_run()
    notes = pace_notes(trainer.state["settings"], trainer.state["step"], shipped)
    if notes:
        ref = shipped[1]
        counts = ",".join(str(ref[p]) for p in ("clip", "vae", "pool", "unet"))
        print("note: this machine trained more slowly than the shipped model's run, so the model will likely score "
              "lower:\n  " + "\n  ".join(notes) + f"\n  to replay the shipped step counts, run again with "
              f"--phase-steps {counts} and a larger --minutes", file=sys.stderr)  # fmt: skip
    if args.eval:
        from ..tiny.eval import evaluate, prompt_set

        report = evaluate(trainer.pipeline(), prompt_set(args.eval))
        print(report.table())
    print(path)
    return 0


_RECIPE_EXCLUSIVE = ("size_named", "unet_lr", "pool_captions", "phase_steps", "clip_hard_negatives", "clip_readout",
                     "deep_objects", "window_share", "init_from", "lr_floor", "align_text")  # fmt: skip


def _run_align(args) -> int:
    import dataclasses

    from ..tiny.align import AlignSettings, align_file

    if args.init_from is None:
        raise ClipDiffusionError("align-text: needs --init-from MODEL (the tiny model whose text tower to align)")
    if not 1 <= args.align_text <= 100_000:
        raise ClipDiffusionError(f"align-text: {args.align_text} is outside 1..100000")
    settings = dataclasses.replace(AlignSettings(), steps=args.align_text, seed=args.seed)
    print(align_file(args.init_from, args.out, settings, log=lambda line: print(line, file=sys.stderr)))
    return 0


def _run_recipe(args, trainer_class) -> int:
    """Both stages of a recipe; each resumes (or is skipped when finished) on a rerun, so an interrupted
    reproduction continues where it stopped."""
    from pathlib import Path

    from ..tiny.settings import recipe

    given = [name for name in _RECIPE_EXCLUSIVE if getattr(args, name, None) is not None]
    if given:
        raise ClipDiffusionError(f"recipe: --{given[0].replace('_', '-')} cannot be combined with --recipe "
                                 f"(the recipe fixes every setting)")  # fmt: skip
    from ..tiny.align import align_file

    out = Path(args.out)
    base_dir, finetune_dir = out / "base", out / "finetune"
    base, finetune, align = recipe(args.recipe, base_dir / "tiny-sd.safetensors")
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    for folder, settings in ((base_dir, base), (finetune_dir, finetune)):
        if (folder / "tiny-sd.safetensors").is_file():
            continue  # this stage finished on an earlier call
        resume = (folder / "state.pt").is_file()
        print(f"recipe {args.recipe}: {'resuming' if resume else 'training'} {folder}", file=sys.stderr)
        trainer_class(folder, settings, resume=resume, log=log).run()
    print(f"recipe {args.recipe}: aligning the text tower into {out}", file=sys.stderr)
    print(align_file(finetune_dir / "tiny-sd.safetensors", out, align, log=log))
    return 0
