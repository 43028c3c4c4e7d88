"""Per-token cross-attention maps: what a generation returns (``AttentionMaps``) and the denoiser wrapper that
records them (``AttentionCapture``), given the context rows of the prompt's tokens from the conditioning's plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class AttentionMaps:
    """Cross-attention of each prompt token, averaged over sampling steps, layers and heads, at latent size.

    ``tokens[i]`` is the decoded text of the token whose map is ``maps[i]``; BOS, EOS and padding are left out.
    """

    tokens: list
    maps: np.ndarray  # [T, h, w] float32


class AttentionCapture:
    """The model denoiser as the guidance denoiser sees it, recording the cross-attention of the prompt's token rows.

    Given the prompt's context [B,T,D], the context rows that carry its tokens (``conditioning.token_rows``) and the
    latent size, it hands the UNet a recorder on the calls that carry the prompt: a call with that very context
    (cond alone), or a batched guidance call, whose block of B rows equal to it is the prompt's. Other texts' calls
    (the negative prompt, other sub-prompts or schedule texts) record nothing. Per image, the probabilities of the
    token rows are averaged over heads, resized to latent size and summed over layers and steps; ``result`` gives
    the first image's mean, like ``_FiniteDenoiser`` a wrapper that changes no output.
    """

    def __init__(self, denoiser, context, rows: list, size: tuple):
        self.denoiser = denoiser
        self.context = context  # [B,T,D]
        self.rows = rows
        self.size = size  # latent (h, w)
        self.total = None
        self.count = 0
        self._index = None

    @property
    def sigmas(self):
        return self.denoiser.sigmas

    def __call__(self, x, sigma, context, y=None, attention_recorder=None):
        cond = self._cond_half(context)
        if cond is None:
            return self.denoiser(x, sigma, context, y, attention_recorder=attention_recorder)

        def recorder(layer_name, probs):  # probs [B',heads,HW,T]
            self._record(probs[cond])
            if attention_recorder is not None:
                attention_recorder(layer_name, probs)

        return self.denoiser(x, sigma, context, y, attention_recorder=recorder)

    def _cond_half(self, context):
        """The batch rows of a call's context that are the prompt's: all, one block of B rows of a batched call
        (uncond first, then the sub-prompts: the blocks after the first are tried first), or None (no block is)."""
        import torch

        if context is self.context:
            return slice(None)
        B = self.context.shape[0]
        k, rest = divmod(context.shape[0], B)
        if k >= 2 and not rest and context.shape[1:] == self.context.shape[1:]:
            for j in [*range(1, k), 0]:
                block = slice(j * B, (j + 1) * B)
                if torch.equal(context[block], self.context):
                    return block
        return None

    def _record(self, probs):
        import torch
        import torch.nn.functional as F

        h, w = self.size
        B, _, HW, _ = probs.shape  # [B,heads,HW,T]
        if self._index is None:
            self._index = torch.tensor(self.rows, dtype=torch.long, device=probs.device)
        scale = math.isqrt(h * w // HW)  # this layer works at latent size / scale
        lh, lw = h // scale, w // scale
        maps = probs.float().mean(dim=1).index_select(-1, self._index)  # [B,HW,Ttok]
        maps = maps.transpose(1, 2).reshape(B, len(self.rows), lh, lw)  # [B,Ttok,lh,lw]
        if (lh, lw) != (h, w):
            maps = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)
        self.total = maps if self.total is None else self.total + maps
        self.count += 1

    def result(self, labels) -> AttentionMaps:
        h, w = self.size
        if self.total is None:
            return AttentionMaps(list(labels), np.zeros((len(labels), h, w), dtype=np.float32))
        maps = (self.total[0] / self.count).cpu().numpy().astype(np.float32)  # [Ttok,h,w] of the first image
        return AttentionMaps(list(labels), maps)
