"""Typed reads from a ``config.json`` dict that someone else wrote (a diffusers folder, a download).

Every value is checked before a module is built from it: integers are real integers (not bools, not floats),
sizes are positive and bounded, lists have the right length, strings come from known sets, floats are finite and
positive. A bad value raises ``ConfigValueError`` whose ``reason`` names the key and the value
(``block_out_channels=[0, 0]: must be a non-empty list of positive integers``); the reader of a file turns it into
``CheckpointError(file, reason)``, so the user sees one line naming the file, the key and the value.
"""

from __future__ import annotations


from ..errors import CheckpointError, ClipDiffusionError
from ..values import is_int, positive_finite, show

# Far beyond every Stable Diffusion config (SDXL: 2048-wide context, depth 10), as the config dataclasses bound them.
MAX_SIZE = 1 << 20
MAX_COUNT = 256
MAX_LIST = 16
_MISSING = object()


class ConfigValueError(ClipDiffusionError):
    """One bad config value; ``reason`` names the key and the value."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def _get(d: dict, key, default):
    value = d.get(key, _MISSING)
    if value is _MISSING:
        if default is _MISSING:
            raise ConfigValueError(f"{key} is missing")
        return default
    return value


def get_int(d: dict, key, default=_MISSING, *, minimum=1, maximum=MAX_SIZE, optional=False):
    """An integer from ``minimum`` to ``maximum``; ``optional`` allows null (returned as None)."""
    value = _get(d, key, default)
    if optional and value is None:
        return None
    if not is_int(value) or not minimum <= value <= maximum:
        allowed = "null or " if optional else ""
        raise ConfigValueError(f"{key}={show(value)}: must be {allowed}an integer from {minimum} to {maximum}")
    return value


def get_int_list(d: dict, key, default=_MISSING, *, minimum=1, maximum=MAX_SIZE, length=None) -> list[int]:
    """A non-empty list of integers (of ``length`` entries when given)."""
    value = _get(d, key, default)
    ok = isinstance(value, (list, tuple)) and 1 <= len(value) <= MAX_LIST and (length is None or len(value) == length)
    if not ok or not all(is_int(v) and minimum <= v <= maximum for v in value):
        count = f"a list of {length}" if length is not None else "a non-empty list of"
        kind = "positive integers" if minimum == 1 else f"integers from {minimum}"
        raise ConfigValueError(f"{key}={show(value)}: must be {count} {kind} (at most {maximum})")
    return list(value)


def get_int_or_list(d: dict, key, default=_MISSING, *, length: int, minimum=1, maximum=MAX_SIZE):
    """One integer, or a list of ``length`` integers (one per level), as diffusers allows for several keys."""
    value = _get(d, key, default)
    if isinstance(value, (list, tuple)):
        return get_int_list({key: value}, key, length=length, minimum=minimum, maximum=maximum)
    if not is_int(value) or not minimum <= value <= maximum:
        raise ConfigValueError(f"{key}={show(value)}: must be an integer from {minimum} to {maximum} or a list of "
                               f"{length} such integers")
    return value


def get_str(d: dict, key, default=_MISSING, *, choices) -> str:
    value = _get(d, key, default)
    if not isinstance(value, str) or value not in choices:
        raise ConfigValueError(f"{key}={show(value)}: must be one of {sorted(choices)}")
    return value


def get_str_list(d: dict, key, default=_MISSING, *, choices) -> list[str]:
    value = _get(d, key, default)
    if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_LIST or not all(
            isinstance(v, str) and v in choices for v in value):
        raise ConfigValueError(f"{key}={show(value)}: must be a non-empty list of {sorted(choices)}")
    return list(value)


def get_bool(d: dict, key, default=_MISSING, *, optional=False):
    value = _get(d, key, default)
    if optional and value is None:
        return None
    if not isinstance(value, bool):
        raise ConfigValueError(f"{key}={show(value)}: must be true or false")
    return value


def get_positive_float(d: dict, key, default=_MISSING):
    """A finite number > 0 (NaN, Infinity and 0 would silently give black images)."""
    value = _get(d, key, default)
    if not positive_finite(value):
        raise ConfigValueError(f"{key}={show(value)}: must be a finite number > 0")
    return value


def config_error(source, component: str, exc: ClipDiffusionError) -> ClipDiffusionError:
    """The error a config reader raises: ``CheckpointError(source, reason)`` when the file is known, else a plain
    ``ClipDiffusionError`` prefixed with the component ("diffusers UNet config block_out_channels=...")."""
    reason = exc.reason if isinstance(exc, (ConfigValueError, CheckpointError)) else str(exc)
    if source is not None:
        return CheckpointError(source, reason)
    return ClipDiffusionError(f"diffusers {component} config {reason}")


# A CLIP tokenizer's pad token -> its id: OpenCLIP pads with "!" (id 0), OpenAI CLIP with end-of-text (49407).
CLIP_PAD_IDS = {"!": 0, "<|endoftext|>": 49407}


def clip_pad_token(tokenizer_config: dict):
    """(pad token, its id or None) from a transformers ``tokenizer_config.json`` / ``special_tokens_map.json``
    dict; the token may be a string or an AddedToken dict ``{"content": ...}``."""
    pad = tokenizer_config.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    return (pad, CLIP_PAD_IDS.get(pad)) if isinstance(pad, str) else (None, None)
