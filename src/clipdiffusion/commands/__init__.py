"""The ``clipdiffusion`` subcommands, one module each: ``add_arguments(parser)`` and ``run(args) -> int``.

Thin translators between the command line and the library: they parse, call the library, and print. Nothing in
the library imports them (``tests/test_layering.py``); ``clipdiffusion.cli`` dispatches to them by name and
imports only the one that runs, so ``clipdiffusion tokens`` never imports torch.
"""
