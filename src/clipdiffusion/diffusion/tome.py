"""Token merging for the UNet's self-attention (ToMe for SD: Bolya and Hoffman, "Token Merging for Fast Stable
Diffusion", CVPRW 2023; A1111's ``token_merging_ratio``, infotext "Token merging ratio").

Before each self-attention of the highest-resolution transformer blocks, a ``ratio`` of the image tokens is merged
into others by bipartite soft matching, attention runs on the fewer tokens, and its output is unmerged (each merged
token copies its destination's output) before the residual add. Cross-attention and the MLP see every token
(ToMe-SD's defaults: ``merge_attn`` only, ``max_downsample`` 1).

**Matching** (ToMe-SD's ``bipartite_soft_matching_random2d`` with ``sx = sy = 2``): the image is cut into 2x2
cells; one token per cell, picked at random, is a destination, the rest are sources. Each source's best
destination is its most cosine-similar one (the metric is the block's input tokens); the ``r = int(N * ratio)``
sources with the most similar best match (at most every source) are averaged into their destinations. A side that
the cells do not cover (odd latent sizes) stays source. As in ToMe-SD, an odd batch (no cond/uncond pair) picks the
first token of each cell instead of a random one.

**Determinism.** The random picks come from a CPU ``torch.Generator`` seeded per generation (``TokenMerging(ratio,
seed)``), drawn in call order, so a seed reproduces its image.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..errors import ClipDiffusionError


def _identity(x):
    return x


def merge_functions(metric, h: int, w: int, ratio: float, *, sx: int = 2, sy: int = 2, generator=None,
                    random: bool = True):
    """``(merge, unmerge)`` for tokens [B, N = h*w, C] whose similarity is ``metric`` [B,N,C]: ``merge(x)`` ->
    [B, N - r, C], ``unmerge(y)`` -> [B, N, C]. ``r = int(N * ratio)``, capped at the number of sources."""
    B, N, _ = metric.shape
    r = int(N * ratio)
    hsy, wsx = h // sy, w // sx
    if r <= 0 or hsy == 0 or wsx == 0 or N != h * w:
        return _identity, _identity
    device = metric.device
    with torch.no_grad():
        if random:
            pick = torch.randint(sy * sx, (hsy, wsx, 1), generator=generator).to(device)
        else:
            pick = torch.zeros(hsy, wsx, 1, dtype=torch.int64, device=device)
        cells = torch.zeros(hsy, wsx, sy * sx, dtype=torch.int64, device=device)
        cells.scatter_(2, pick, -1)  # -1 marks each cell's destination token
        grid = cells.view(hsy, wsx, sy, sx).transpose(1, 2).reshape(hsy * sy, wsx * sx)
        if hsy * sy < h or wsx * sx < w:
            full = torch.zeros(h, w, dtype=torch.int64, device=device)
            full[:hsy * sy, :wsx * sx] = grid
            grid = full
        order = torch.argsort(grid.reshape(1, -1, 1), dim=1, stable=True)  # destinations first, then sources
        n_dst = hsy * wsx
        src_pos, dst_pos = order[:, n_dst:, :], order[:, :n_dst, :]  # [1,Ns,1], [1,Nd,1]
        n_src = src_pos.shape[1]

        def split(x):
            c = x.shape[-1]
            return x.gather(1, src_pos.expand(B, n_src, c)), x.gather(1, dst_pos.expand(B, n_dst, c))

        m = metric.float()
        m = m / m.norm(dim=-1, keepdim=True)
        a, b = split(m)
        scores = a @ b.transpose(-1, -2)  # [B,Ns,Nd] cosine similarity
        r = min(n_src, r)
        best, best_dst = scores.max(dim=-1)  # [B,Ns]
        ranked = best.argsort(dim=-1, descending=True, stable=True)[..., None]  # [B,Ns,1]
        kept, merged = ranked[:, r:, :], ranked[:, :r, :]
        into = best_dst[..., None].gather(1, merged)  # [B,r,1] destination of each merged source
        kept_pos = src_pos.expand(B, n_src, 1).gather(1, kept)  # token positions
        merged_pos = src_pos.expand(B, n_src, 1).gather(1, merged)

    def merge(x):
        c = x.shape[-1]
        src, dst = split(x)
        unmerged = src.gather(1, kept.expand(B, n_src - r, c))
        moved = src.gather(1, merged.expand(B, r, c))
        dst = dst.scatter_reduce(1, into.expand(B, r, c), moved, reduce="mean")  # include_self: dst in the mean
        return torch.cat([unmerged, dst], dim=1)

    def unmerge(x):
        c = x.shape[-1]
        n_kept = n_src - r
        unmerged, dst = x[:, :n_kept, :], x[:, n_kept:, :]
        out = x.new_zeros(B, N, c)
        out.scatter_(1, dst_pos.expand(B, n_dst, c), dst)
        out.scatter_(1, kept_pos.expand(B, n_kept, c), unmerged)
        out.scatter_(1, merged_pos.expand(B, r, c), dst.gather(1, into.expand(B, r, c)))
        return out

    return merge, unmerge


class TokenMerging:
    """The hook a ``SpatialTransformer`` calls as ``token_merge(x, h, w) -> (merge, unmerge)``."""

    def __init__(self, ratio: float, seed: int = 0, *, sx: int = 2, sy: int = 2, random: bool = True):
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
            raise ClipDiffusionError(f"token_merging_ratio={ratio!r}: must be a number in [0, 1]")
        self.ratio = float(ratio)
        self.sx, self.sy, self.random = sx, sy, random
        self.generator = torch.Generator().manual_seed(int(seed) % 2**64)
        self.calls = 0

    def __call__(self, x, h, w):
        self.calls += 1
        random = self.random and x.shape[0] % 2 == 0  # ToMe-SD: an odd batch holds no cond/uncond pair
        return merge_functions(x, h, w, self.ratio, sx=self.sx, sy=self.sy, generator=self.generator, random=random)


def highest_resolution_transformers(unet) -> list:
    """The ``SpatialTransformer``s of the UNet's first level (full latent resolution), down and up path."""
    from .attention import SpatialTransformer

    unet = getattr(unet, "inner", unet)
    n = unet.config.num_res_blocks
    blocks = list(unet.input_blocks[1:1 + n]) + list(unet.output_blocks[-(n + 1):])
    return [layer for block in blocks for layer in block if isinstance(layer, SpatialTransformer)]


@contextmanager
def token_merging(unet, ratio: float, seed: int = 0):
    """Merge tokens in ``unet``'s highest-resolution self-attention while the block runs (ratio 0: nothing)."""
    if not ratio:
        yield None
        return
    hook = TokenMerging(ratio, seed)
    layers = highest_resolution_transformers(unet)
    for layer in layers:
        layer.token_merge = hook
    try:
        yield hook
    finally:
        for layer in layers:
            layer.token_merge = None
