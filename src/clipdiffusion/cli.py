"""The ``clipdiffusion`` command. A thin client: each subcommand is a module of ``clipdiffusion.commands`` that
exposes ``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their subcommand
runs, so ``clipdiffusion tokens`` never imports torch."""

import argparse
import sys
from importlib import import_module

from .errors import ClipDiffusionError

# subcommand -> (module, one-line help)
COMMANDS = {
    "tokens": ("clipdiffusion.commands.tokens", "show how a prompt is tokenized and chunked (no torch)"),
    "encode": ("clipdiffusion.commands.encode", "encode a prompt to a conditioning tensor file"),
    "generate": ("clipdiffusion.commands.generate", "generate an image"),
    "info": ("clipdiffusion.commands.info", "describe a checkpoint file or diffusers folder"),
    "convert": ("clipdiffusion.commands.convert", "convert between single-file and diffusers layouts"),
    "serve": ("clipdiffusion.commands.serve", "run the HTTP API and web page"),
    "train-tiny": ("clipdiffusion.commands.train_tiny", "train the embedded tiny model from scratch"),
    "eval": ("clipdiffusion.commands.eval", "measure prompt adherence of a model on the synthetic world"),
    "train-embedding": ("clipdiffusion.commands.train_embedding",
                        "learn a new word (textual-inversion embedding) with the model frozen"),
    "batch": ("clipdiffusion.commands.batch", "many images from a JSON-lines or prompts file, resumable (--ray)"),
}


def _argv_command(argv):
    for arg in argv:
        if not arg.startswith("-"):
            return arg
    return None


def build_parser(only=None):
    parser = argparse.ArgumentParser(prog="clipdiffusion", description=__doc__.splitlines()[0])
    from . import __version__

    parser.add_argument("--version", action="version", version=f"clipdiffusion {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == only:
            mod = import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _argv_command(argv)
    parser = build_parser(only=command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except ClipDiffusionError as exc:
        print(f"clipdiffusion {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"clipdiffusion {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
