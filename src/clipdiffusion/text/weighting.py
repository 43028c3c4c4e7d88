"""Prompt weighting: how a token's weight changes its context vector, per the tools people use.

Each function takes ``z`` [N, P, D] (windows, positions, channels), ``weights`` [N, P] and the empty prompt's
encoding ``empty`` [P, D] (or None when no token is weighted) and returns the weighted ``z``.
"""

import torch

# A1111 rescale guard: below this |new mean| / mean|z*w| the rescale factor would explode (see _weight_a1111).
MEAN_GUARD = 1e-3


def _weight_a1111(z, weights, empty):
    """A1111 "Original" emphasis (``modules/sd_emphasis.py``): z*w, then rescale so the window's mean over all
    positions and channels is what it was. Per window and per encoder (SDXL's two towers separately).

    Guard (a deliberate deviation from A1111, only where A1111 produces garbage): the rescale is skipped when the
    factor is not finite, negative (A1111 would flip every vector), or either mean is smaller than ``MEAN_GUARD``
    times the mean absolute value (the factor would blow the window up or squash it to ~0); the window is then
    just z*w. Windows whose weights are all 1 are returned untouched.
    """
    weighted = z * weights[..., None]
    original = z.float().mean(dim=(1, 2))
    new = weighted.float().mean(dim=(1, 2))
    ratio = original / new
    big_enough = (new.abs() > MEAN_GUARD * weighted.float().abs().mean(dim=(1, 2))) & (
        original.abs() > MEAN_GUARD * z.float().abs().mean(dim=(1, 2))
    )
    ok = torch.isfinite(ratio) & (ratio > 0) & big_enough
    ratio = torch.where(ok, ratio, torch.ones_like(ratio)).to(z.dtype)
    out = weighted * ratio[:, None, None]
    unweighted = (weights == 1).all(dim=1)
    return torch.where(unweighted[:, None, None], z, out)


def _weight_comfy(z, weights, empty):
    """ComfyUI (``comfy/sd1_clip.py: encode_token_weights``): z' = empty + (z - empty) * w at the same position,
    with ``empty`` the encoding of ``""``; no renormalisation. Tokens of weight 1 are untouched."""
    if empty is None:  # encode() skips the empty prompt when no token is weighted
        assert bool((weights == 1).all())
        return z
    lerped = empty[None] + (z - empty[None]) * weights[..., None]
    return torch.where((weights == 1)[..., None], z, lerped)


def _weight_none(z, weights, empty):
    return z


# name -> function(z [N, P, D], weights [N, P], empty [P, D] | None); feeds the CLI choices and the errors.
# "none" and "ignore" are A1111's emphasis settings of those names (sd_emphasis.py): "None" disables the syntax
# (brackets, (x:1.2) and BREAK are literal text), "Ignore" parses it and drops the weights (BREAK still splits).
WEIGHTINGS = {"a1111": _weight_a1111, "comfy": _weight_comfy, "none": _weight_none, "ignore": _weight_none}
