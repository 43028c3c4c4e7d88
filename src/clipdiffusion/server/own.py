"""clipdiffusion's own routes: /api/generate (with per-token cross-attention heatmaps) and /api/encode
(conditioning statistics). Our parameter names (guidance, sampler, schedule, clip_skip, long_prompt), strict
schemas: an unknown field is a 422 naming it, unlike the A1111 routes, which must tolerate foreign clients."""

from __future__ import annotations

import base64
import io
import math
from typing import Any

from pydantic import ConfigDict, Field

from . import a1111
from .a1111 import GenerationPlan, Int, JSONRequest, Number, RequestError, Text
from .settings import ServerSettings

LONG_PROMPT = ("truncate", "chunk", "window", "stretch")


class TokenizeRequest(JSONRequest):
    model_config = ConfigDict(extra="forbid")
    prompt: Text = ""
    long_prompt: Text = Field("chunk", description="truncate | chunk | window | stretch")


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
    model: Text | None = None


def _check_choice(name: str, value: str, choices) -> str:
    if value not in choices:
        raise RequestError(name, value, f"must be one of {', '.join(choices)}")
    return value


def generate_plan(req: GenerateRequest, settings: ServerSettings, model: str, samplers, schedules) -> GenerationPlan:
    a1111.check_prompt("prompt", req.prompt, settings)
    a1111.check_prompt("negative_prompt", req.negative_prompt, settings)
    a1111.check_int("steps", req.steps, 1, settings.max_steps)
    a1111.check_int("batch_size", req.batch_size, 1, settings.max_batch_size)
    if req.clip_skip is not None:
        a1111.check_int("clip_skip", req.clip_skip, 1, 48)
    if req.width is not None:
        a1111.check_size("width", req.width, settings.max_width)
    if req.height is not None:
        a1111.check_size("height", req.height, settings.max_height)
    if not math.isfinite(req.guidance) or not 0.0 <= req.guidance <= 100.0:
        raise RequestError("guidance", req.guidance, "must be a finite number in [0, 100]")
    _check_choice("long_prompt", req.long_prompt, LONG_PROMPT)
    sampler, implied = a1111.resolve_sampler(req.sampler, samplers, "sampler")
    schedule = a1111.resolve_schedule(req.schedule, schedules, implied, "schedule")
    seed = a1111.resolve_seed(req.seed)
    kwargs = dict(prompt=req.prompt, negative_prompt=req.negative_prompt, steps=req.steps, guidance=req.guidance,
                  sampler=sampler, schedule=schedule, width=req.width, height=req.height, clip_skip=req.clip_skip,
                  long_prompt=req.long_prompt, weighting=req.weighting, batch_size=req.batch_size)
    if req.attention_maps:
        kwargs["attention_maps"] = True
    return GenerationPlan(model=model, kwargs=kwargs, seed=seed, n_iter=1, sampler_label=sampler,
                          schedule=schedule)


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


def _report_dict(report) -> Any:
    if report is None or isinstance(report, (bool, int, float, str)):
        return report
    if hasattr(report, "to_dict"):
        return report.to_dict()
    if isinstance(report, dict):
        return {k: _report_dict(v) for k, v in report.items()}
    if isinstance(report, (list, tuple)):
        return [_report_dict(r) for r in report]
    return str(report)


def encode_stats(req: EncodeRequest, pipe, control) -> dict:
    """Runs in the worker: encode with the loaded model's text encoder and summarise the tensors."""
    _check_choice("long_prompt", req.long_prompt, LONG_PROMPT)
    if req.clip_skip is not None:
        a1111.check_int("clip_skip", req.clip_skip, 1, 48)
    cond = pipe.text_encoder.encode(req.prompt, req.negative_prompt, clip_skip=req.clip_skip,
                                    long_prompt=req.long_prompt, weighting=req.weighting)
    return {"context": _tensor_stats(cond.context), "negative_context": _tensor_stats(cond.negative_context),
            "pooled": _tensor_stats(getattr(cond, "pooled", None)),
            "negative_pooled": _tensor_stats(getattr(cond, "negative_pooled", None)),
            "report": _report_dict(getattr(cond, "report", None)),
            "family": getattr(pipe.text_encoder, "family", None), "clip_skip": req.clip_skip,
            "long_prompt": req.long_prompt, "weighting": req.weighting}


# -- attention heatmaps --------------------------------------------------------------------------------------


def _as_array(x):
    import numpy as np

    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype="float32")


def _maps_and_tokens(attention):
    """Accepts the shapes a pipeline may report: an object or dict with `maps` (and `tokens`), a mapping
    token -> map, or an array [T, h, w] / [B, T, h, w] (first image)."""
    tokens = None
    if hasattr(attention, "maps"):
        tokens, attention = getattr(attention, "tokens", None), attention.maps
    elif isinstance(attention, dict) and "maps" in attention:
        tokens, attention = attention.get("tokens"), attention["maps"]
    elif isinstance(attention, dict):
        tokens, attention = [str(k) for k in attention], list(attention.values())
    if isinstance(attention, (list, tuple)):
        maps = [_as_array(m) for m in attention]
    else:
        arr = _as_array(attention)
        if arr.ndim == 4:
            arr = arr[0]  # (B, T, h, w) -> first image
        if arr.ndim != 3:
            raise ValueError(f"attention maps of shape {arr.shape} are not [T, h, w]")
        maps = list(arr)
    return maps, (list(tokens) if tokens is not None else None)


def heatmap_png(m) -> str:
    from PIL import Image
    import numpy as np

    m = np.squeeze(m)
    lo, hi = float(m.min()), float(m.max())
    scaled = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    image = Image.fromarray((scaled * 255).round().astype("uint8"), mode="L")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def heatmaps(attention, labels: list[str]) -> dict | None:
    """One normalised grayscale PNG per token position: {"tokens": [...], "maps": [base64 PNG, ...]}. Positions
    past the prompt's tokens (EOS padding) are left out when the labels say where the prompt ends."""
    if attention is None:
        return None
    maps, tokens = _maps_and_tokens(attention)
    tokens = tokens or labels or [f"#{i}" for i in range(len(maps))]
    count = min(len(maps), len(tokens))
    return {"tokens": tokens[:count], "maps": [heatmap_png(m) for m in maps[:count]]}
