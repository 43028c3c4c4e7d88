"""``clipdiffusion train-embedding NAME (--images DIR | --describe TEXT)``: textual inversion with the model frozen.

Learns ``--vectors`` new token vectors for the word NAME (``embedding_training``) from a folder of images
(captions from ``IMAGE.txt`` beside each image, else ``--caption``, default ``"a [name]"``) or from renders of the
tiny model's synthetic world whose object matches ``--describe`` (e.g. ``"large purple triangle"``), captioned in
the grammar the tiny model was trained on with the object's words replaced by NAME. Writes an A1111/kohya
``.safetensors`` embedding (``--out``, default ``NAME.safetensors``) that ``generate --embeddings DIR`` and
``Pipeline.load_textual_inversion`` read. ``--time-limit`` stops between steps and saves what was learned.
"""

import os
import platform
import sys
import time
from pathlib import Path

from ..errors import ClipDiffusionError

# Sized on the shipped tiny model (eval/tiny-embedding/train.log): about 2.6 steps/s at batch 4 with one torch thread
# on the shared 2-core machine (other jobs running), so 700 steps and the setup took 282 s, inside the 5
# minutes (400 steps learned the shape and size but only half the colour: eval/tiny-embedding/steps-400). One
# thread is the default because on a busy 2-core machine two threads were 30x slower (0.07 steps/s, the threads
# waiting for each other), not faster; --threads 2 may help on an otherwise idle machine.
DEFAULTS = {"vectors": 3, "init_text": "*", "steps": 700, "lr": 1e-2, "batch_size": 4, "seed": 0, "threads": 1}


def add_arguments(parser):
    parser.add_argument("name", metavar="NAME", help="the new word (letters, digits, _ or -; the file's stem)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", metavar="DIR", help="a folder of training images (IMAGE.txt beside an image is "
                                                         "its caption)")
    source.add_argument("--describe", metavar="TEXT",
                        help='renders of the synthetic world whose object matches TEXT, e.g. "large purple triangle"')
    parser.add_argument("--caption", metavar="TEMPLATE",
                        help="--images: caption of an image without IMAGE.txt; [name] is replaced by NAME "
                             "(default \"a [name]\")")
    parser.add_argument("--scenes", type=int, default=64, help="--describe: how many renders (default 64)")
    parser.add_argument("--vectors", type=int, default=DEFAULTS["vectors"], help="vectors per tower (1..75)")
    parser.add_argument("--init-text", default=DEFAULTS["init_text"],
                        help='text whose token vectors start the embedding, cycled to --vectors (default "*"; '
                             '"" for zeros)')
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="optimiser steps")
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="AdamW learning rate")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="images per step")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seed of every random choice")
    parser.add_argument("--model", help="checkpoint file or diffusers folder (default: the embedded tiny model)")
    parser.add_argument("--out", metavar="FILE", help="the embedding file (default NAME.safetensors)")
    parser.add_argument("--time-limit", type=float, metavar="SECONDS",
                        help="stop after this long (between steps) and save what was learned")
    parser.add_argument("--threads", type=int, default=DEFAULTS["threads"],
                        help="torch threads (default 1: faster than 2 on a shared 2-core machine)")


def _load_model(path):
    from ..pipeline import Pipeline

    if path is None:
        return Pipeline.default()
    p = Path(path)
    if p.is_dir():
        return Pipeline.from_pretrained(p)
    if not p.exists():
        raise ClipDiffusionError(f"model: {path!r} does not exist")
    return Pipeline.from_file(p)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(args) -> int:
    from ..embedding_training import EmbeddingSettings, check_name
    from ..fileio import check_output

    name = check_name(args.name)
    if not 1 <= args.threads <= 256:
        raise ClipDiffusionError(f"threads: {args.threads} is outside 1..256")
    if args.caption is not None and args.images is None:
        raise ClipDiffusionError("caption: --caption is for --images (--describe captions come from the world's "
                                 "caption grammar)")
    if args.images is not None and args.scenes != 64:
        raise ClipDiffusionError("scenes: --scenes is for --describe (--images trains on every image of the folder)")
    settings = EmbeddingSettings(vectors=args.vectors, init_text=args.init_text, steps=args.steps, lr=args.lr,
                                 batch_size=args.batch_size, seed=args.seed, time_limit=args.time_limit)
    out = Path(args.out if args.out is not None else f"{name}.safetensors")
    if out.suffix != ".safetensors":
        raise ClipDiffusionError(f"out: {str(out)!r} must end in .safetensors")
    if out.stem != name:
        print(f"note: prompts will use the file's stem {out.stem!r} as the word, not {name!r} "
              "(unless loaded with an explicit name)", file=sys.stderr)
    check_output(out, "out")  # before any slow work

    import torch

    from ..embedding_data import description_examples, folder_examples
    from ..embedding_training import EmbeddingTrainer, save_embedding

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.images is not None:
        examples = folder_examples(args.images, name, args.caption)
        source = f"{len(examples)} images from {args.images}"
    else:
        examples = description_examples(args.describe, name, args.scenes, args.seed)
        source = f"{len(examples)} renders of {args.describe!r}"
    pipe = _load_model(args.model)
    print(f"cpu: {cpu_name()} ({os.cpu_count()} logical), torch threads: {torch.get_num_threads()}, "
          f"model: {pipe.name} ({pipe.family})", file=sys.stderr)
    print(f"training {name!r}: {settings.vectors} vector(s) from {settings.init_text!r}, {settings.steps} steps, "
          f"batch {settings.batch_size}, lr {settings.lr:g}, seed {settings.seed}; {source}", file=sys.stderr)
    print(f"  e.g. {examples[0].caption!r}", file=sys.stderr)

    def log(step, loss, rate):
        print(f"  step {step}/{settings.steps}: loss {loss:.4f}, {rate:.2f} steps/s "
              f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

    trainer = EmbeddingTrainer(pipe, name, examples, settings, log=log)
    trained = trainer.run()
    seconds = time.perf_counter() - start
    source_meta = f"describe:{args.describe}" if args.describe is not None else "images"
    save_embedding(out, trained, model=pipe.name, family=pipe.family,
                   extra_metadata={"source": source_meta, "examples": len(examples),
                                   "train_seconds": f"{trained.seconds:.1f}"})  # fmt: skip
    state = "all steps" if not trained.stopped else f"stopped by the {trained.stopped}"
    print(f"{trained.steps} steps ({state}) in {trained.seconds:.1f} s of training, {seconds:.1f} s in all "
          f"({trained.steps / max(trained.seconds, 1e-9):.2f} steps/s with setup)", file=sys.stderr)
    print(f'use it: clipdiffusion generate "a {out.stem} ..." --embeddings {out.parent}', file=sys.stderr)
    print(out)
    return 0
