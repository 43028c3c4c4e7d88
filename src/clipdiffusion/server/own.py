"""clipdiffusion's own routes: /api/generate (with per-token cross-attention heatmaps) and /api/encode
(conditioning statistics). Our parameter names (guidance, sampler, schedule, clip_skip, long_prompt), strict
schemas: an unknown field is a 422 naming it, unlike the A1111 routes, which must tolerate foreign clients."""

from __future__ import annotations

import base64
import io
from typing import Any

from pydantic import ConfigDict, Field

from .. import fast_options
from ..request import GenerationRequest
from .a1111 import GenerationPlan
from .sampler_names import resolve_sampler, resolve_schedule
from .schemas import Int, JSONRequest, Number, Text
from .settings import ServerSettings


class TokenizeRequest(JSONRequest):
    model_config = ConfigDict(extra="forbid")
    prompt: Text = ""
    long_prompt: Text = Field("chunk", description="truncate | chunk | window | stretch | summarize")
    steps: Int = Field(20, description="steps that [from:to:when] and [a|b] are scheduled over, as A1111's counter")
    negative: bool = Field(False, description="a negative prompt: AND and <lora:...> tags are text, as in A1111")


class EncodeRequest(JSONRequest):
    model_config = ConfigDict(extra="forbid")
    prompt: Text = ""
    negative_prompt: Text = ""
    clip_skip: Int | None = Field(None, description="1 = last layer, 2 = penultimate; None: the model's default")
    long_prompt: Text = "chunk"
    weighting: Text = "a1111"
    model: Text | None = None


class GenerateRequest(JSONRequest):
    model_config = ConfigDict(extra="forbid")
    prompt: Text = ""
    negative_prompt: Text = ""
    steps: Int = 20
    guidance: Number = 7.0
    seed: Int = -1
    sampler: Text = Field("euler", description="ours (euler, euler_a, ...) or an A1111 name")
    schedule: Text = "normal"
    width: Int | None = Field(None, description="None: the model's native size")
    height: Int | None = None
    clip_skip: Int | None = Field(None, description="1 = last layer, 2 = penultimate; None: the model's default")
    long_prompt: Text = "chunk"
    weighting: Text = "a1111"
    batch_size: Int = 1
    attention_maps: bool = Field(False, description="return one heatmap per prompt token (first image)")
    loras: list[Any] = Field(default_factory=list, description="[[name, te_weight, unet_weight], ...] of the "
                             "server's --loras (added to the prompt's <lora:...> tags); an unknown name is a 422")
    model: Text | None = None
    speed: Text = Field("exact", description="exact (as diffusers and A1111 sample) or fast (the CLI's default: "
                        "NGMS 2 on all steps + DeepCache 2, about half the UNet work)")


def generate_plan(req: GenerateRequest, settings: ServerSettings, model: str, samplers, schedules) -> GenerationPlan:
    """Our body, in our names, as a request checked against the server's limits (A1111 sampler names accepted)."""
    sampler, implied = resolve_sampler(req.sampler, samplers, "sampler")
    schedule = resolve_schedule(req.schedule, schedules, implied, "schedule")
    request = GenerationRequest.create(
        settings.limits, prompt=req.prompt, negative_prompt=req.negative_prompt, steps=req.steps,
        guidance=req.guidance, seed=req.seed, sampler=sampler, schedule=schedule, width=req.width, height=req.height,
        clip_skip=req.clip_skip, long_prompt=req.long_prompt, weighting=req.weighting, batch_size=req.batch_size,
        attention_maps=req.attention_maps, loras=req.loras, **fast_options.preset(req.speed))
    return GenerationPlan(model=model, request=request.resolve_seed(), sampler_label=sampler)


# -- /api/encode ---------------------------------------------------------------------------------------------


def _tensor_stats(t) -> dict | None:
    if t is None:
        return None
    x = t.detach().float().cpu()
    norms = x.norm(dim=-1)  # one L2 norm per position: [B, T] for context, [B] for pooled
    stats = {"shape": list(x.shape), "dtype": str(t.dtype).replace("torch.", ""), "mean": float(x.mean()),
             "std": float(x.std()) if x.numel() > 1 else 0.0, "min": float(x.min()), "max": float(x.max()),
             "mean_norm": float(norms.mean())}
    if x.dim() == 3 and x.shape[1] % 77 == 0 and x.shape[1] > 77:
        # (B, chunks*77, D) -> per 77-position chunk, the mean norm, to see how chunks differ in scale
        per_chunk = norms[0].reshape(-1, 77).mean(dim=1)
        stats["chunk_mean_norms"] = [float(v) for v in per_chunk]
    return stats


def encode_stats(request: GenerationRequest, pipe, control) -> dict:
    """Runs in the worker: encode with the loaded model's text encoder and summarise the tensors."""
    if hasattr(pipe, "apply_loras"):
        pipe.apply_loras(())  # the model's own text encoder, not one a LoRA request left merged
    cond = pipe.text_encoder.encode(request.prompt, request.negative_prompt, clip_skip=request.clip_skip,
                                    long_prompt=request.long_prompt, weighting=request.weighting)
    return {"context": _tensor_stats(cond.context), "negative_context": _tensor_stats(cond.negative_context),
            "pooled": _tensor_stats(cond.pooled), "negative_pooled": _tensor_stats(cond.negative_pooled),
            "report": cond.report.to_dict() if cond.report is not None else None,
            "family": pipe.text_encoder.family, "clip_skip": request.clip_skip,
            "long_prompt": request.long_prompt, "weighting": request.weighting}


# -- attention heatmaps --------------------------------------------------------------------------------------


def heatmap_png(m) -> str:
    from PIL import Image
    import numpy as np

    lo, hi = float(m.min()), float(m.max())
    scaled = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    image = Image.fromarray((scaled * 255).round().astype("uint8"), mode="L")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def heatmaps(attention) -> dict | None:
    """A result's `pipeline.AttentionMaps` (one [h, w] map per prompt token, labelled from the conditioning's token
    plan) as {"tokens": [...], "maps": [base64 grayscale PNG, ...]}, each map normalised to 0..255."""
    from ..pipeline import AttentionMaps

    if attention is None:
        return None
    if not isinstance(attention, AttentionMaps):
        raise TypeError(f"attention: expected pipeline.AttentionMaps, got {type(attention).__name__}")
    return {"tokens": list(attention.tokens), "maps": [heatmap_png(m) for m in attention.maps]}
