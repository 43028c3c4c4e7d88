"""The UNet's SpatialTransformer: self-attention over image tokens, cross-attention to the text context, GEGLU MLP.

Names follow the LDM checkpoint keys (`ldm/modules/attention.py` in Stability-AI/stablediffusion), which diffusers'
`Transformer2DModel` / `BasicTransformerBlock` share inside a block, so no renaming is needed here.

Cross-attention is where the prompt steers the image: queries come from the image tokens (HW of them), keys and
values from the context (T tokens, any length: 77, 154, ...). No text mask is applied: SD attends to every context
position, padding included, and the checkpoints were trained that way.
"""

import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 for half-precision activations, as LDM's `GroupNorm32` does (fp16 statistics
    over 4096 positions lose too much precision). A no-op cast for fp32 models."""

    def forward(self, x):
        if x.dtype in (torch.float16, torch.bfloat16):
            return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(),
                                self.eps).to(x.dtype)
        return super().forward(x)


class CrossAttention(nn.Module):
    """Multi-head attention; `context=None` makes it self-attention.

    `layer_name` is filled in by `UNetModel` with this module's qualified name, so a recorder can tell layers
    apart (for per-token attention maps) without the module knowing its place in the tree.
    """

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.layer_name = ""
        # q/k/v carry no bias in LDM and diffusers alike; to_out.1 is LDM's Dropout (no parameters).
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def _split_heads(self, t):
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)  # [B,N,heads*d] -> [B,heads,N,d]

    def forward(self, x, context=None, recorder=None):
        source = x if context is None else context
        q = self._split_heads(self.to_q(x))  # [B,heads,HW,d]
        k = self._split_heads(self.to_k(source))  # [B,heads,T,d]
        v = self._split_heads(self.to_v(source))  # [B,heads,T,d]
        if recorder is not None and context is not None:
            # Explicit probabilities so the caller can see them; softmax in fp32 (SD2.1 overflows in fp16).
            scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.dim_head**-0.5  # [B,heads,HW,T]
            probs = scores.softmax(dim=-1)
            recorder(self.layer_name, probs)
            out = torch.matmul(probs.to(v.dtype), v)  # [B,heads,HW,d]
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # scale defaults to d^-0.5, as in LDM
        b, _, n, _ = out.shape
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head)  # [B,heads,HW,d] -> [B,HW,heads*d]
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020, "GLU Variants Improve Transformer"): the projection's first half is the value,
    the second half the gate, with exact (erf) GELU."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # net.1 is LDM's Dropout; keeping it keeps `ff.net.2` at index 2 as in the checkpoints.
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LN block: self-attention, then cross-attention to the context, then the GEGLU MLP."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context, recorder=None):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, recorder)
        return x + self.ff(self.norm3(x))

    def forward_merged(self, x, context, recorder, merging):
        """``forward`` with self-attention over merged tokens (``tome.py``): ``merging`` = (merge, unmerge)."""
        merge, unmerge = merging
        x = x + unmerge(self.attn1(merge(self.norm1(x))))
        x = x + self.attn2(self.norm2(x), context, recorder)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Image features [B,C,H,W] -> tokens -> `depth` transformer blocks -> back, plus a residual.

    SD1 projects in and out with 1x1 convs; SD2 and SDXL (`use_linear`) with Linear layers applied after
    flattening, which is the same map with the flatten moved; the checkpoints differ only in weight rank.
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, use_linear: bool,
                 norm_groups: int = 32):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = GroupNorm32(norm_groups, channels, eps=1e-6)
        if use_linear:
            self.proj_in = nn.Linear(channels, inner)
            self.proj_out = nn.Linear(inner, channels)
        else:
            self.proj_in = nn.Conv2d(channels, inner, 1)
            self.proj_out = nn.Conv2d(inner, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth))
        self.token_merge = None  # tome.TokenMerging while token merging is on: (x, h, w) -> (merge, unmerge)

    def forward(self, x, context, recorder=None):
        b, c, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # [B,C,H,W] -> [B,HW,C]
        if self.use_linear:
            x = self.proj_in(x)
        merging = self.token_merge
        for block in self.transformer_blocks:
            if merging is None:
                x = block(x, context, recorder)
            else:
                x = block.forward_merged(x, context, recorder, merging(x, h, w))
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)  # [B,HW,C] -> [B,C,H,W]
        if not self.use_linear:
            x = self.proj_out(x)
        return x + residual
