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
        tv = sys.modules.setdefault("torchvision", types.ModuleType("torchvision"))
        ops = sys.modules.setdefault("torchvision.ops", types.ModuleType("torchvision.ops"))
        misc = types.ModuleType("torchvision.ops.misc")

        class FrozenBatchNorm2d:  # only referenced by vision-tower helpers we never call
            pass

        misc.FrozenBatchNorm2d = FrozenBatchNorm2d
        sys.modules["torchvision.ops.misc"] = misc
        tv.ops = ops
        ops.misc = misc
    return importlib.import_module(f"open_clip.{name}")
