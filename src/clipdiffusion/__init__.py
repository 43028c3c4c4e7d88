"""clipdiffusion: Stable Diffusion's text conditioning, done faithfully, and the engine around it.

Importing this package does no work and does not import torch: the public names below are resolved on first
use, so the tokenizer and the ``tokens`` command start fast.
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "CLIPTokenizer": "clipdiffusion.text.tokenizer",
    "parse_prompt": "clipdiffusion.text.prompt",
    "prompt_schedule": "clipdiffusion.text.schedule",
    "split_composable": "clipdiffusion.text.schedule",
    "load_text_encoder": "clipdiffusion.checkpoints.text_encoders",
    "TextEncoder": "clipdiffusion.text.conditioning",
    "Conditioning": "clipdiffusion.text.conditioning",
    "Pipeline": "clipdiffusion.pipeline",
    "GenerationResult": "clipdiffusion.pipeline",
    "GenerationRequest": "clipdiffusion.request",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'clipdiffusion' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
