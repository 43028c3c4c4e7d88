"""``clipdiffusion batch REQUESTS.jsonl --out DIR`` (or ``--prompts FILE.txt``): many images into one folder, with a
manifest, resumable; in this process by default, or as a Ray Data job with ``--ray`` (``clipdiffusion.ray_batch``,
``pip install clipdiffusion[ray]``). See ``clipdiffusion.batch`` for the file formats and the resume rules.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import ClipDiffusionError

# shared request options: argparse dest -> request field
_SHARED = {"negative": "negative_prompt", "steps": "steps", "seed": "seed", "sampler": "sampler",
           "schedule": "schedule", "guidance": "guidance", "width": "width", "height": "height",
           "clip_skip": "clip_skip", "long_prompt": "long_prompt", "weighting": "weighting"}


def add_arguments(parser):
    from ..diffusion.samplers import SAMPLERS, SCHEDULES
    from ..request import LONG_PROMPTS, WEIGHTINGS

    parser.add_argument("requests", nargs="?", metavar="REQUESTS.jsonl",
                        help="one JSON object per line: an \"id\" and request fields in the engine's names "
                             "(prompt, negative_prompt, steps, guidance, seed, sampler, width, height, ...)")
    parser.add_argument("--prompts", metavar="FILE.txt",
                        help="instead of REQUESTS: one prompt per line, with the options below (ids p00001, ...)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder (created if its parent exists): ID.png files and manifest.jsonl; a "
                             "rerun skips the ids already done")
    parser.add_argument("--model", metavar="FILE|FOLDER", help="default: the embedded tiny model")
    from .. import devices

    devices.add_arguments(parser)
    shared = parser.add_argument_group("request options", "defaults for every line (a line's own fields win)")
    shared.add_argument("--negative", metavar="TEXT")
    shared.add_argument("--steps", type=int)
    shared.add_argument("--seed", type=int, help="with --prompts: the first seed of each prompt (-1: random)")
    shared.add_argument("--n-seeds", type=int, default=1, help="with --prompts: images per prompt, seeds "
                                                               "consecutive (default 1)")
    shared.add_argument("--sampler", choices=list(SAMPLERS))
    shared.add_argument("--schedule", choices=list(SCHEDULES))
    shared.add_argument("--guidance", type=float)
    shared.add_argument("--width", type=int)
    shared.add_argument("--height", type=int)
    shared.add_argument("--clip-skip", type=int)
    shared.add_argument("--long-prompt", choices=list(LONG_PROMPTS))
    shared.add_argument("--weighting", choices=list(WEIGHTINGS))
    from ..fast_options import CLI_SPEED, add_arguments as add_fast_arguments

    add_fast_arguments(parser, speed=CLI_SPEED)  # --speed, --s-min-uncond, ...: defaults for every line too
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per model (default 1; set the same on every run you compare: CPU "
                             "results depend on it)")
    parser.add_argument("--max-batch", type=int, default=1,
                        help="images per engine call when lines differ only by consecutive seeds (default 1: a "
                             "batch is faster but its images may differ from one-at-a-time ones by 1/255)")
    ray = parser.add_argument_group("Ray", "run the job on Ray Data (pip install clipdiffusion[ray])")
    ray.add_argument("--ray", nargs="?", const="local", metavar="auto|local|ADDRESS",
                     help="local (default when given): a private Ray instance on 127.0.0.1 for this command; auto: "
                          "the running cluster (RAY_ADDRESS); or a cluster address such as ray://head:10001")
    ray.add_argument("--actors", type=int, default=None,
                     help="model actors (default: one per GPU, else 1)")
    ray.add_argument("--cpus-per-actor", type=float, default=None,
                     help="CPUs reserved per actor (default: fractional, sized to what the cluster has free)")
    ray.add_argument("--max-attempts", type=int, default=3,
                     help="tries of an engine call whose actor dies (default 3); then the job stops, naming the "
                          "request, and keeps what it wrote")


def shared_options(args) -> dict:
    from ..fast_options import request_fields

    given = {field: getattr(args, dest) for dest, field in _SHARED.items() if getattr(args, dest, None) is not None}
    return {**request_fields(args), **given}


def read_items(args):
    from ..batch import read_jsonl, read_prompts

    if (args.requests is None) == (args.prompts is None):
        raise ClipDiffusionError("give either REQUESTS.jsonl or --prompts FILE.txt")
    options = shared_options(args)
    if args.prompts is not None:
        return read_prompts(args.prompts, options, args.n_seeds)
    if args.n_seeds != 1:
        raise ClipDiffusionError("--n-seeds is for --prompts; in REQUESTS.jsonl give one line per seed")
    return read_jsonl(args.requests, options)


def out_folder(path) -> Path:
    out = Path(path)
    if not out.is_dir():
        if not out.parent.is_dir():
            raise ClipDiffusionError(f"--out {str(path)!r}: the folder {str(out.parent)!r} does not exist")
        try:
            out.mkdir()
        except OSError as exc:
            raise ClipDiffusionError(f"--out {str(path)!r}: cannot create ({exc.strerror})") from None
    return out


def run(args) -> int:
    from ..batch import Progress, prepare
    from ..devices import from_args, load_options

    if isinstance(args.threads, bool) or not 1 <= args.threads <= 256:
        raise ClipDiffusionError(f"--threads {args.threads!r}: must be in [1, 256]")
    items = read_items(args)  # every line checked before anything loads
    device, dtype = from_args(args)
    if args.model is not None and not Path(args.model).exists():
        raise ClipDiffusionError(f"--model {args.model!r}: no such file or folder")
    out = out_folder(args.out)
    plan = prepare(items, out, max_unit=args.max_batch)
    if plan.manifest.dropped:
        print(f"note: {plan.manifest.dropped} unreadable manifest line(s) dropped", file=sys.stderr)
    print(f"{len(items)} images: {len(plan.skipped)} already done, {len(plan.todo)} to make in {len(plan.units)} "
          f"engine calls", file=sys.stderr)
    if not plan.todo:
        return 0
    progress = Progress(len(plan.todo))
    if args.ray is not None:
        from ..ray_batch import RaySettings, check_attempts, run_ray

        check_attempts(args.max_attempts)
        settings = RaySettings(address=args.ray, actors=args.actors, cpus_per_actor=args.cpus_per_actor,
                               threads=args.threads, model=args.model, device=device, dtype=dtype,
                               options=tuple(load_options(args).items()), max_attempts=args.max_attempts)
        written = run_ray(plan, settings, progress=progress)
    else:
        from ..batch import load_pipeline, run_local

        pipe = load_pipeline(args.model, device=device, dtype=dtype, **load_options(args))
        written = run_local(pipe, plan, threads=args.threads, progress=progress)
    print(f"{written} images written to {out}", file=sys.stderr)
    return 0
