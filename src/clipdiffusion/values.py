"""Small checks shared by every config that reads values from files (model configs, diffusers config.json, our
metadata): what counts as an integer, a usable positive number, and how a hostile value is shown in an error.
Torch-free; stages (text/, diffusion/) and checkpoints/ all import it.
"""

from __future__ import annotations

import math
import numbers


def is_int(value) -> bool:
    """An ``int`` that is not a ``bool`` (JSON's ``true`` is not a size)."""
    return isinstance(value, int) and not isinstance(value, bool)


def positive_finite(value) -> bool:
    """A real number, not a bool, finite and > 0; an integer too large for a float is not (JSON allows any number
    of digits)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(value) and value > 0
    except OverflowError:
        return False


def show(value) -> str:
    """A value for an error message, cut short (a hostile value can be megabytes of JSON)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
