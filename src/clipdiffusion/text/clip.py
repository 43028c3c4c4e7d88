"""The CLIP text transformer used by Stable Diffusion (OpenAI CLIP-L, OpenCLIP ViT-H and ViT-bigG).

Parameter names equal transformers' ``CLIPTextModel`` minus its ``text_model.`` prefix (plus ``text_projection``
as in ``CLIPTextModelWithProjection``), so an HF or SD1 single-file state dict loads by a plain copy; OpenCLIP
files go through the layout table in ``checkpoints/text_layouts.py``.

Architecture: token + learned position embedding, pre-LN transformer blocks with a causal mask only (SD never
masks padding, so padded positions are attended to and their values matter), a final LayerNorm, and for the
pooled vector the final-LN state at the first EOS token, optionally projected.

``clip_skip`` counts like AUTOMATIC1111: 1 = last layer, 2 = penultimate, ... The same hidden state is
``hidden_states[-clip_skip]`` in transformers, ``clip_skip - 1`` in diffusers' pipelines and
``CLIPSetLastLayer(stop_at_clip_layer=-clip_skip)`` in ComfyUI. Layers after the chosen one are not computed.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ClipDiffusionError
from ..values import positive_finite, show


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # OpenAI's sigmoid approximation of GELU; CLIP-L was trained with it, so it is part of the weights' meaning.
    return x * torch.sigmoid(1.702 * x)


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)  # exact (erf) GELU, as OpenCLIP's nn.GELU and transformers' "gelu"


ACTIVATIONS = {"quick_gelu": _quick_gelu, "gelu": _gelu}
# Far beyond every CLIP text tower (bigG: width 1280, 32 layers, 20 heads; Long-CLIP: 248 positions), small enough
# that a hostile config cannot build millions of modules or overflow a shape product.
_LIMITS = {"vocab_size": 1 << 24, "width": 1 << 20, "layers": 1024, "heads": 1 << 20, "max_positions": 1 << 20}


@dataclass(frozen=True)
class CLIPTextConfig:
    """Shape and behaviour of one CLIP text tower. Defaults are SD 1.x's OpenAI CLIP ViT-L/14."""

    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    # 77 = BOS + 75 tokens + EOS; Long-CLIP style stretched tables are passed at call time instead.
    max_positions: int = 77
    # Cannot be read from weights (no parameters): quick_gelu for OpenAI CLIP, gelu for OpenCLIP H / bigG.
    activation: str = "quick_gelu"
    # Width of text_projection's output, or None when the checkpoint has no projection (SD1's CLIP-L).
    projection_dim: int | None = None
    layer_norm_eps: float = 1e-5
    # MLP hidden width; None means 4 * width, which every CLIP text tower in SD uses.
    mlp_width: int | None = None

    def __post_init__(self):
        # Configs also come from files (our metadata, a diffusers text_encoder/config.json): every value is checked
        # so that a bad one is an error naming the field, never a crash in torch or a silent NaN (layer_norm_eps).
        for name in ("vocab_size", "width", "layers", "heads", "max_positions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ClipDiffusionError(f"CLIPTextConfig.{name} must be a positive integer, got {show(value)}")
            if value > _LIMITS[name]:
                raise ClipDiffusionError(f"CLIPTextConfig.{name}={value} exceeds the limit of {_LIMITS[name]}")
        if self.width % self.heads:
            raise ClipDiffusionError(
                f"CLIPTextConfig.width ({self.width}) must be divisible by heads ({self.heads})"
            )
        if not isinstance(self.activation, str) or self.activation not in ACTIVATIONS:
            raise ClipDiffusionError(
                f"CLIPTextConfig.activation must be one of {sorted(ACTIVATIONS)}, got {show(self.activation)}"
            )
        for name in ("projection_dim", "mlp_width"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 1 <= value <= _LIMITS["width"]):  # fmt: skip
                raise ClipDiffusionError(
                    f"CLIPTextConfig.{name} must be None or a positive integer up to {_LIMITS['width']}, "
                    f"got {show(value)}"
                )
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not positive_finite(eps):
            raise ClipDiffusionError(f"CLIPTextConfig.layer_norm_eps must be a finite number > 0, got {show(eps)}")

    @property
    def hidden_mlp(self) -> int:
        return self.mlp_width if self.mlp_width is not None else 4 * self.width

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @classmethod
    def from_weights(cls, state_dict, *, activation: str = "quick_gelu") -> "CLIPTextConfig":
        """Infer the config from tensor shapes in our (HF-minus-``text_model.``) naming.

        Heads are width // 64: every CLIP text tower in SD (L, H, bigG) uses 64-wide heads, and the weights
        cannot reveal the head count. The activation cannot be read either, so the caller passes it
        (``checkpoints/text_encoders.py`` decides by tower). Missing keys fall back to defaults so that a strict
        key comparison can report them all afterwards; only an unknowable width raises.
        """
        shape = {k: tuple(v.shape) for k, v in state_dict.items()}
        width = None
        for key, axis in (
            ("embeddings.token_embedding.weight", 1),
            ("final_layer_norm.weight", 0),
            ("embeddings.position_embedding.weight", 1),
            ("encoder.layers.0.layer_norm1.weight", 0),
        ):
            if key in shape and len(shape[key]) > axis:
                width = shape[key][axis]
                break
        if width is None:
            raise ClipDiffusionError("text encoder weights: cannot infer width (no token embedding or layer norm)")
        indices = set()
        for key in shape:
            if key.startswith("encoder.layers."):
                part = key.split(".")[2]
                if part.isdigit():
                    indices.add(int(part))
        if not indices:
            raise ClipDiffusionError("text encoder weights: no 'encoder.layers.N.*' keys")
        token = shape.get("embeddings.token_embedding.weight", (49408, width))
        position = shape.get("embeddings.position_embedding.weight", (77, width))
        projection = shape.get("text_projection.weight")
        fc1 = next((shape[k] for k in sorted(shape) if k.endswith(".mlp.fc1.weight")), None)
        mlp = fc1[0] if fc1 and fc1[0] != 4 * width else None
        return cls(
            vocab_size=token[0],
            width=width,
            layers=max(indices) + 1,
            heads=max(1, width // 64),
            max_positions=position[0],
            activation=activation,
            projection_dim=projection[0] if projection else None,
            mlp_width=mlp,
        )


SD1_CLIP_L = CLIPTextConfig()
# SDXL's first encoder is the very same OpenAI CLIP-L (same weights in the base model); only its use differs.
SDXL_CLIP_L = CLIPTextConfig()
# OpenCLIP ViT-H/14 text tower as stored in SD 2.x files (24 layers; SD uses the penultimate one). The file
# carries a 1024x1024 text_projection that SD2 never uses; keeping it lets the strict loader consume it.
SD2_OPENCLIP_H = CLIPTextConfig(width=1024, layers=24, heads=16, activation="gelu", projection_dim=1024)
SDXL_OPENCLIP_BIGG = CLIPTextConfig(width=1280, layers=32, heads=20, activation="gelu", projection_dim=1280)

PRESETS = {
    "sd1_clip_l": SD1_CLIP_L,
    "sdxl_clip_l": SDXL_CLIP_L,
    "sd2_openclip_h": SD2_OPENCLIP_H,
    "sdxl_openclip_bigg": SDXL_OPENCLIP_BIGG,
}


@dataclass(frozen=True)
class CLIPTextOutput:
    hidden: torch.Tensor  # [B, T, D] the clip_skip-chosen layer, final-LN'd when final_norm
    pooled: torch.Tensor | None  # [B, P] (projected) or [B, D]; None unless pooled=True


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype=None, device=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.token_embedding = nn.Embedding(config.vocab_size, config.width, **kw)
        self.position_embedding = nn.Embedding(config.max_positions, config.width, **kw)


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype=None, device=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.heads = config.heads
        self.q_proj = nn.Linear(config.width, config.width, **kw)
        self.k_proj = nn.Linear(config.width, config.width, **kw)
        self.v_proj = nn.Linear(config.width, config.width, **kw)
        self.out_proj = nn.Linear(config.width, config.width, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        # (B, T, D) -> (B, heads, T, D/heads)
        q = self.q_proj(x).view(b, t, self.heads, -1).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.heads, -1).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.heads, -1).transpose(1, 2)
        # Causal only: SD attends to padding (EOS or 0) after the prompt, so no padding mask here.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, T, D/heads)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))  # (B, T, D)


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype=None, device=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.act = ACTIVATIONS[config.activation]
        self.fc1 = nn.Linear(config.width, config.hidden_mlp, **kw)
        self.fc2 = nn.Linear(config.hidden_mlp, config.width, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype=None, device=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.self_attn = CLIPAttention(config, **kw)
        self.layer_norm1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps, **kw)
        self.mlp = CLIPMLP(config, **kw)
        self.layer_norm2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype=None, device=None):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config, dtype=dtype, device=device) for _ in range(config.layers))


class CLIPTextModel(nn.Module):
    """CLIP text transformer; see the module docstring for naming and clip-skip conventions."""

    def __init__(self, config: CLIPTextConfig = SD1_CLIP_L, *, dtype=None, device=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config, **kw)
        self.encoder = CLIPEncoder(config, **kw)
        self.final_layer_norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps, **kw)
        if config.projection_dim is not None:
            self.text_projection = nn.Linear(config.width, config.projection_dim, bias=False, **kw)
        else:
            self.text_projection = None
        if str(device) != "meta":
            # CLIP's own initialisation scale, so that a random (test) model produces sane magnitudes.
            nn.init.normal_(self.embeddings.token_embedding.weight, std=0.02)
            nn.init.normal_(self.embeddings.position_embedding.weight, std=0.01)

    @classmethod
    def from_state_dict(cls, state_dict, config: CLIPTextConfig, *, dtype=None, device=None) -> "CLIPTextModel":
        """Build without allocating random weights first (meta device), then adopt the given tensors.

        The caller has already checked the key set and shapes (``checkpoints/text_encoders.py``); ``dtype`` casts
        floating tensors.
        """
        model = cls(config, device="meta")
        tensors = {}
        for name, value in state_dict.items():
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            value = value.to(device) if device is not None else value
            tensors[name] = value.contiguous()  # OpenCLIP's transposed projection arrives as a strided view
        model.load_state_dict(tensors, strict=True, assign=True)
        return model

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check_clip_skip(self, clip_skip) -> int:
        layers = self.config.layers
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 1 <= clip_skip <= layers:
            raise ClipDiffusionError(
                f"clip_skip must be an integer from 1 (last layer) to {layers} (this encoder has {layers} layers), "
                f"got {clip_skip!r}"
            )
        return clip_skip

    def _check_ids(self, ids, table_length: int, extra: int = 0) -> torch.Tensor:
        if not torch.is_tensor(ids):
            ids = torch.as_tensor(ids)
        if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dtype.is_complex:
            raise ClipDiffusionError(
                f"ids must be an integer tensor of shape [batch, tokens], got {ids.dtype} of shape {tuple(ids.shape)}"
            )
        length = ids.shape[1]
        if length < 1 or ids.shape[0] < 1:
            raise ClipDiffusionError(f"ids must not be empty, got shape {tuple(ids.shape)}")
        if length > table_length:
            raise ClipDiffusionError(
                f"token sequence length {length} exceeds the {table_length} positions of this encoder "
                "(use a long-prompt strategy, or pass a stretched position_embedding)"
            )
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.config.vocab_size + extra:
            bad = low if low < 0 else high
            top = self.config.vocab_size + extra - 1
            what = "the vocabulary" if not extra else f"the vocabulary plus {extra} extra embedding rows"
            raise ClipDiffusionError(f"ids: token id {bad} is outside {what} 0..{top}")
        return ids.long()

    def forward(
        self,
        ids,
        *,
        clip_skip: int = 1,
        final_norm: bool = True,
        pooled: bool = False,
        position_embedding: torch.Tensor | None = None,
        extra_embeddings: torch.Tensor | None = None,
    ) -> CLIPTextOutput:
        """Encode token ids [B, T] (BOS ... EOS pad, already padded) to hidden states [B, T, D].

        ``clip_skip=k`` returns the output of layer ``layers - k + 1`` (A1111 counting) and runs only that many
        layers. ``pooled=True`` needs the last layer, so then all layers run; ``hidden`` is still the chosen one.
        ``final_norm`` applies final_layer_norm to the chosen hidden state (SD1/SD2: yes; SDXL: no). The pooled
        vector is always final-LN'd (last layer, first EOS = argmax id) and projected when the model has a
        projection. ``position_embedding`` [T', D] with T' >= T replaces the learned table (Long-CLIP stretch).
        ``extra_embeddings`` [E, D]: rows for ids ``vocab_size .. vocab_size + E - 1`` (textual-inversion vectors);
        gradients flow into it, so it can be trained with the model frozen.
        """
        clip_skip = self._check_clip_skip(clip_skip)
        table = self.embeddings.position_embedding.weight if position_embedding is None else position_embedding
        if position_embedding is not None and (
            not torch.is_tensor(position_embedding)
            or position_embedding.dim() != 2
            or position_embedding.shape[1] != self.config.width
        ):
            raise ClipDiffusionError(
                f"position_embedding must be a tensor of shape [positions, {self.config.width}], "
                f"got {tuple(getattr(position_embedding, 'shape', ())) or type(position_embedding).__name__}"
            )
        device = self.embeddings.token_embedding.weight.device
        extra = 0
        if extra_embeddings is not None:
            if (not torch.is_tensor(extra_embeddings) or extra_embeddings.dim() != 2
                    or extra_embeddings.shape[1] != self.config.width):
                raise ClipDiffusionError(
                    f"extra_embeddings must be a tensor of shape [rows, {self.config.width}], "
                    f"got {tuple(getattr(extra_embeddings, 'shape', ())) or type(extra_embeddings).__name__}"
                )
            extra = extra_embeddings.shape[0]
        ids = self._check_ids(ids, table.shape[0], extra).to(device)
        t = ids.shape[1]
        vocab = self.config.vocab_size
        if extra and bool((ids >= vocab).any()):
            table_rows = self.embeddings.token_embedding.weight
            rows = torch.cat([table_rows, extra_embeddings.to(device=device, dtype=table_rows.dtype)])
            x = rows[ids]  # (B, T, D); gradients reach extra_embeddings
        else:
            x = self.embeddings.token_embedding(ids)  # (B, T, D)
        x = x + table[:t].to(device=x.device, dtype=x.dtype)

        stop = self.config.layers - clip_skip + 1  # layers needed for the chosen hidden state
        run = self.config.layers if pooled else stop
        chosen = x
        for index, layer in enumerate(self.encoder.layers[:run]):
            x = layer(x)
            if index == stop - 1:
                chosen = x
        hidden = self.final_layer_norm(chosen) if final_norm else chosen
        if not pooled:
            return CLIPTextOutput(hidden=hidden, pooled=None)

        last = hidden if (final_norm and stop == run) else self.final_layer_norm(x)
        # The first EOS: EOS (49407) is the largest id in the vocabulary, and argmax returns the first maximum.
        # Extra-embedding ids lie above the vocabulary and are masked out (A1111 puts placeholder 0s there).
        eos = (torch.where(ids >= vocab, -1, ids) if extra else ids).argmax(dim=-1)
        vector = last[torch.arange(last.shape[0], device=last.device), eos]  # (B, D)
        if self.text_projection is not None:
            vector = self.text_projection(vector)  # (B, P)
        return CLIPTextOutput(hidden=hidden, pooled=vector)


def stretch_position_embedding(table: torch.Tensor, keep: int = 20, factor: int = 4) -> torch.Tensor:
    """Long-CLIP's knowledge-preserving stretching: [L, D] -> [keep + factor * (L - keep), D] (77 -> 248).

    The first ``keep`` rows, which CLIP trained well, are copied. Every later row i becomes ``factor`` rows
    linearly interpolated towards row i + 1; after the last row, which has no successor, the rows continue along
    the last difference (row[L-1] - row[L-2]). This is the hand-written loop of Long-CLIP's
    ``model/longclip.py: load_from_clip`` (beichenzbc/Long-CLIP), not ``F.interpolate``: there is no
    align_corners choice to make, and the tail extrapolates rather than clamps.
    """
    if not torch.is_tensor(table) or table.dim() != 2:
        raise ClipDiffusionError(f"table must be a [positions, width] tensor, got {getattr(table, 'shape', table)!r}")
    length = table.shape[0]
    if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= length - 2:
        raise ClipDiffusionError(f"keep must be an integer from 0 to {length - 2}, got {keep!r}")
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ClipDiffusionError(f"factor must be a positive integer, got {factor!r}")
    base = table[keep:]  # (L - keep, D)
    following = torch.cat([table[keep + 1 :], (2 * table[-1] - table[-2])[None]])  # successor of each base row
    j = torch.arange(factor, dtype=table.dtype, device=table.device)[None, :, None]  # (1, factor, 1)
    # ((factor - j) * a + j * b) / factor, the same arithmetic as Long-CLIP's per-row formula
    stretched = ((factor - j) * base[:, None] + j * following[:, None]) / factor  # (L - keep, factor, D)
    return torch.cat([table[:keep], stretched.reshape(-1, table.shape[1])])

