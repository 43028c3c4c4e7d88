"""The model families clipdiffusion runs, each stated once: what a family is lives here and nowhere else.

A record per family: native image size, default prediction type, the single-file text-encoder prefixes, one
encoder recipe per text tower (pad id, final layer norm, default clip skip), AUTOMATIC1111's clip-skip rule and
the zero-negative rule. Detection (``checkpoints/detect.py``) returns one of these records; code that needs to
know something about a family reads a field of its record instead of comparing family names.

Facts, with their sources (see ../shared/reference/checkpoints.md and prompt-encoding-frontends.md):
- SD 1.x: CLIP ViT-L/14, last layer + final LN, pads with EOS (49407); 512 px; eps.
- SD 2.x: OpenCLIP ViT-H/14, penultimate layer + final LN (LDM ``FrozenOpenCLIPEmbedder(layer="penultimate")``),
  pads with 0. The 768-v models are v-prediction at 768 px; the 512-base models are eps at 512 px. Nothing in the
  tensors tells them apart, so v (and 768) is the default, as in diffusers.
- SDXL: CLIP ViT-L then OpenCLIP bigG, both penultimate without final LN (sgm ``layer="penultimate"``); CLIP-L pads
  with EOS, bigG with 0; 1024 px; eps. An empty negative prompt is zeros (sgm ``force_zero_embeddings``, A1111,
  diffusers ``force_zeros_for_empty_prompt``).
- A1111's "Clip skip" setting (``CLIP_stop_at_last_layers``) moves SD1 text encoders only: A1111 always uses the
  penultimate layer on SD2 and SDXL (the latter unless its ``sdxl_clip_l_skip`` option is set).
- The SDXL VAE overflows in fp16 (its decoder's activations pass 65504: diffusers sets ``force_upcast`` in its
  config and runs it in fp32; the community "sdxl-vae-fp16-fix" exists for that reason); SD1/SD2 VAEs do not.
- ``tiny``: the embedded miniature model (CLIP-L-shaped tower, 64 px), which behaves like SD1.

Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ClipDiffusionError

EOS_ID = 49407  # CLIP's end-of-text id (text.tokenizer.EOS_ID; a test checks they agree)
PREDICTIONS = ("eps", "v")


@dataclass(frozen=True)
class TowerRecipe:
    """How a family uses one text tower. ``default_clip_skip`` is A1111 counting on the full tower (1 = last
    layer, 2 = penultimate); ``final_norm``: the final layer norm is applied to the chosen layer's output."""

    name: str  # "clip_l" | "clip_h" | "clip_g"
    pad_id: int
    final_norm: bool
    default_clip_skip: int


@dataclass(frozen=True)
class ModelFamily:
    name: str
    native_size: int  # pixels, for the default prediction type
    default_prediction: str  # "eps" | "v"
    text_prefixes: tuple[str, ...]  # single-file (LDM/SGM) prefixes of the text towers, in tower order
    towers: tuple[TowerRecipe, ...]
    a1111_clip_skip: bool  # A1111's "Clip skip" setting moves this family's text encoder
    zero_empty_negative: bool  # an empty negative prompt is encoded as zeros
    eps_native_size: int | None = None  # the native size of the family's eps models, when it differs
    vae_fp16_overflows: bool = False  # its VAE's activations overflow fp16 (Inf/NaN): devices.resolve upcasts it

    @property
    def default_clip_skip(self) -> int:
        return self.towers[0].default_clip_skip

    @property
    def pooled(self) -> bool:
        """The UNet takes the last tower's pooled vector (SDXL's ``y``)."""
        return len(self.towers) > 1

    def native_size_for(self, prediction: str | None) -> int:
        if prediction == "eps" and self.eps_native_size is not None:
            return self.eps_native_size
        return self.native_size

    def tower(self, name: str) -> TowerRecipe:
        for recipe in self.towers:
            if recipe.name == name:
                return recipe
        raise ClipDiffusionError(f"{self.name} has no text tower {name!r}; its towers: "
                                 f"{', '.join(t.name for t in self.towers)}")  # fmt: skip


_CLIP_L_SD1 = TowerRecipe("clip_l", pad_id=EOS_ID, final_norm=True, default_clip_skip=1)

SD1 = ModelFamily("sd1", 512, "eps", ("cond_stage_model.transformer.",), (_CLIP_L_SD1,), a1111_clip_skip=True,
                  zero_empty_negative=False)  # fmt: skip
SD2 = ModelFamily("sd2", 768, "v", ("cond_stage_model.model.", "conditioner.embedders.0.model."),
                  (TowerRecipe("clip_h", pad_id=0, final_norm=True, default_clip_skip=2),), a1111_clip_skip=False,
                  zero_empty_negative=False, eps_native_size=512)  # fmt: skip
SDXL = ModelFamily("sdxl", 1024, "eps", ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."),
                   (TowerRecipe("clip_l", pad_id=EOS_ID, final_norm=False, default_clip_skip=2),
                    TowerRecipe("clip_g", pad_id=0, final_norm=False, default_clip_skip=2)),
                   a1111_clip_skip=False, zero_empty_negative=True, vae_fp16_overflows=True)  # fmt: skip
TINY = ModelFamily("tiny", 64, "eps", ("cond_stage_model.transformer.",), (_CLIP_L_SD1,), a1111_clip_skip=True,
                   zero_empty_negative=False)  # fmt: skip

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (SD1, SD2, SDXL, TINY)}
NAMES = tuple(FAMILIES)


def get_family(name) -> ModelFamily:
    """The record of ``name`` ("sd1" | "sd2" | "sdxl" | "tiny"), or a ClipDiffusionError naming the value."""
    if isinstance(name, ModelFamily):
        return name
    if not isinstance(name, str) or name not in FAMILIES:
        raise ClipDiffusionError(f"family={name!r}: choose from {', '.join(NAMES)}")
    return FAMILIES[name]
