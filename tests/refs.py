"""Access to the reference implementations used as test oracles.

open_clip's package ``__init__`` imports torchvision (for image transforms), and PyPI's torchvision does not
load beside the CPU torch build we install. The text side of open_clip (tokenizer.py, transformer.py) does not
need it, so we import those submodules without running the package ``__init__``, giving ``open_clip.utils`` a
stand-in for the one torchvision class it imports at module level (used only by vision towers).
"""

import importlib
import importlib.util
import sys
import types

import pytest


def _open_clip_dir():
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch is not installed (pip install --no-deps open_clip_torch)")
    return list(spec.submodule_search_locations)[0]


def open_clip_module(name):
    """Return ``open_clip.<name>`` (e.g. "tokenizer", "transformer") without importing torchvision."""
    if "open_clip" not in sys.modules or not hasattr(sys.modules["open_clip"], "__path__"):
        pkg = types.ModuleType("open_clip")
        pkg.__path__ = [_open_clip_dir()]
        sys.modules["open_clip"] = pkg
    try:
        importlib.import_module("torchvision.ops.misc")
    except Exception:
        return _import_with_torchvision_stub(f"open_clip.{name}")
    return importlib.import_module(f"open_clip.{name}")


def _import_with_torchvision_stub(module_name):
    """Import with a stand-in ``torchvision.ops.misc`` that exists only during the import: left in sys.modules it
    would make transformers/diffusers believe torchvision is installed (``find_spec`` then fails on it)."""
    names = ("torchvision", "torchvision.ops", "torchvision.ops.misc")
    saved = {n: sys.modules.get(n) for n in names}
    tv, ops, misc = (types.ModuleType(n) for n in names)

    class FrozenBatchNorm2d:  # only referenced by vision-tower helpers we never call
        pass

    misc.FrozenBatchNorm2d = FrozenBatchNorm2d
    tv.ops, ops.misc = ops, misc
    sys.modules.update(zip(names, (tv, ops, misc)))
    try:
        return importlib.import_module(module_name)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
