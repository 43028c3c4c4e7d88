"""Extra-network tags ``<kind:name:arg:...>`` (``<lora:name:0.8>``, ``<lora:name:te=0.5:unet=1>``,
``<hypernet:name:1>``) with AUTOMATIC1111 v1.10's semantics (``modules/extra_networks.py``,
``extensions-builtin/Lora/extra_networks_lora.py``; ``shared/reference/prompt-language-and-networks.md`` section 3):
taken out of a positive prompt before anything is encoded and handed on as data. Torch-free.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import PromptError
from .prompt import check_text

# A LoRA tag's status: the pipeline applies it (``clipdiffusion.lora``) when it has a LoRA of that name; an unknown
# name is an error on our CLI and routes and a "Lora not found" note on the A1111 routes, from the pipeline.
APPLIED = "applied by the model's LoRAs (first prompt only; tags in a negative prompt are text)"
NOT_APPLIED = "not applied"  # the prefix of every other status

_TAG = re.compile(r"<(\w+):([^>]+)>")
KIND_ALIASES = {"lyco": "lora"}


@dataclass(frozen=True)
class ExtraNetwork:
    """One ``<kind:name:arg:...>`` tag. ``kind`` is as written except ``lyco``, A1111's alias of ``lora``; other
    kinds (``hypernet``, anything unknown) are kept so that reports can say what was ignored."""

    kind: str
    name: str
    positional: tuple
    named: tuple
    text: str

    def _number(self, value, field, convert=float):
        try:
            number = convert(value)
        except (TypeError, ValueError):
            raise PromptError(f"{self.text[:80]}: {field} {value!r} is not a number") from None
        if convert is float and not math.isfinite(number):
            raise PromptError(f"{self.text[:80]}: {field} {value!r} is not finite")
        return number

    def lora_weights(self) -> tuple:
        """``(te, unet, dyn)`` as A1111 reads ``<lora:name:te:unet:dyn>``: te defaults to 1, unet to the final
        te (after ``te=``), named ``te=`` / ``unet=`` / ``dyn=`` override the positions; ``dyn`` (None: all
        ranks) is a positive integer. A value that is not a number is a :class:`PromptError` naming the tag."""
        if not self.name:
            raise PromptError(f"{self.text[:80]}: the tag names no network")
        named = dict(self.named)  # a repeated key: the last one counts, as in A1111's dict
        rest = self.positional
        te = self._number(rest[0], "te multiplier") if rest else 1.0
        if "te" in named:
            te = self._number(named["te"], "te multiplier")
        unet = self._number(rest[1], "unet multiplier") if len(rest) > 1 else te
        if "unet" in named:
            unet = self._number(named["unet"], "unet multiplier")
        dyn = self._number(rest[2], "dyn", int) if len(rest) > 2 else None
        if "dyn" in named:
            dyn = self._number(named["dyn"], "dyn", int)
        if dyn is not None and dyn < 1:
            raise PromptError(f"{self.text[:80]}: dyn {dyn} must be at least 1 (the number of ranks kept)")
        return te, unet, dyn


def _network(kind: str, args: str, text: str) -> ExtraNetwork:
    positional, named = [], []
    for item in args.split(":"):
        pieces = item.split("=")
        if len(pieces) == 2:  # exactly one "=": named; "a=b=c" is positional, as in A1111
            named.append((pieces[0], pieces[1]))
        else:
            positional.append(item)
    name = positional[0] if positional else ""
    return ExtraNetwork(KIND_ALIASES.get(kind, kind), name, tuple(positional[1:]), tuple(named), text)


def extract_extra_networks(prompt: str) -> tuple:
    """``(text, tags)``: every ``<kind:args>`` tag (kind = word characters) removed, nothing else touched
    (``"a <lora:x:1> b"`` -> ``"a  b"``), and the tags in prompt order."""
    prompt = check_text(prompt)
    tags = []

    def take(m):
        tags.append(_network(m.group(1), m.group(2), m.group(0)))
        return ""

    return _TAG.sub(take, prompt), tags


def network_info(network: ExtraNetwork) -> dict:
    """A tag for reports: what was written, what it does, and why not when it does nothing."""
    info = {"kind": network.kind, "name": network.name, "text": network.text,
            "positional": list(network.positional), "named": [list(p) for p in network.named],
            "te": None, "unet": None, "dyn": None, "applied": False}
    if network.kind == "lora":
        try:
            info["te"], info["unet"], info["dyn"] = network.lora_weights()
            info["status"], info["applied"] = APPLIED, True
        except PromptError as err:
            info["status"] = f"not applied: {err}"
    elif network.kind == "hypernet":
        info["status"] = "not applied: hypernetworks are not supported"
    else:
        info["status"] = f"not applied: unknown extra network kind {network.kind!r} (A1111 skips it too)"
    return info
