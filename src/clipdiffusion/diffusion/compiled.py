"""``torch.compile`` as an opt-in for the UNet's forward and the VAE decoder (issue 19), with eager as the fallback.

``compile_module(module, method)`` puts a ``CompiledCall`` in the instance's ``method`` attribute: callers keep
calling ``unet(...)``/``vae.decode(...)`` (the inpainting wrapper, the denoiser and the samplers see no change),
the class's method stays the eager path (``forward_split``, DeepCache's partial passes, run eager), and
``uncompile`` removes the attribute again. Shapes are static (``dynamic=False``): the batch, latent size and
context length are fixed within one generation, so the first UNet call of a shape compiles and every later step
reuses that graph; a new shape (another size, a longer prompt) compiles once more, up to dynamo's cache limit.

A compilation that fails (no C++ compiler, an unsupported operator, an inductor bug) runs that call eagerly: if the
eager call succeeds the failure was compiling's, so the call stays eager from then on, says so once on stderr and
records ``error`` (the generation notes repeat it); if the eager call fails too, its error is the caller's and
is raised. A call with an attention recorder (a Python callback per layer) always runs eager.
"""

from __future__ import annotations

import sys

from ..errors import ClipDiffusionError

# what Pipeline.compile / --compile accept -> the components compiled
TARGETS = {"off": (), "unet": ("unet",), "vae": ("vae",), "unet+vae": ("unet", "vae")}
METHODS = {"unet": "forward", "vae": "decode"}


def check_targets(value, field: str = "compile") -> str:
    """``value`` as a ``TARGETS`` key: False/None -> "off", True -> "unet"; anything else is an error naming
    ``field``."""
    if value is None or value is False:
        return "off"
    if value is True:
        return "unet"
    if isinstance(value, str) and value.strip().lower() in TARGETS:
        return value.strip().lower()
    raise ClipDiffusionError(f"{field}={value!r}: choose from {', '.join(TARGETS)} (or True/False)")


class CompiledCall:
    """``eager`` (a bound method) through ``torch.compile(dynamic=False)``, built on the first call."""

    def __init__(self, eager, label: str, *, backend: str = "inductor", mode=None):
        self.eager = eager
        self.label = label
        self.backend = backend
        self.mode = mode
        self.compiled = None
        self.error = None  # why compiling failed; the calls are eager from then on
        self.calls = 0  # calls that went through the compiled function

    def __call__(self, *args, **kwargs):
        if self.error is not None or kwargs.get("attention_recorder") is not None:
            return self.eager(*args, **kwargs)
        if self.compiled is None:
            import torch

            self.compiled = torch.compile(self.eager, backend=self.backend, mode=self.mode, dynamic=False)
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - told apart below by running the call eagerly
            out = self.eager(*args, **kwargs)  # raises the caller's own error when the input is at fault
            self.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            print(f"note: torch.compile of the {self.label} failed, running it eagerly ({self.error})",
                  file=sys.stderr)
            return out
        self.calls += 1
        return out


def compile_module(module, method: str, label: str, **options) -> CompiledCall:
    """Route ``module.<method>`` through a ``CompiledCall`` (idempotent: an existing one is kept)."""
    current = module.__dict__.get(method)
    if isinstance(current, CompiledCall):
        return current
    call = CompiledCall(getattr(module, method), label, **options)
    module.__dict__[method] = call  # an instance attribute shadows the class's method; nn.Module keeps no copy
    return call


def uncompile(module, method: str) -> None:
    if isinstance(module.__dict__.get(method), CompiledCall):
        del module.__dict__[method]


def compiled_call(module, method: str) -> CompiledCall | None:
    current = module.__dict__.get(method)
    return current if isinstance(current, CompiledCall) else None
