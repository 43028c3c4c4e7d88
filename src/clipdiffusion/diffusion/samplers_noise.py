"""Noise for the samplers: per-row generator noise (ancestral samplers) and a seeded Brownian motion (SDE samplers).

A noise sampler is a callable ``noise(sigma, sigma_next) -> Tensor`` shaped like the latents, standard normal per
element, as k-diffusion's samplers take it (``noise_sampler=``).

**Brownian noise.** A1111 gives its SDE samplers ("DPM++ SDE", "DPM++ 2M SDE") k-diffusion's
``BrownianTreeNoiseSampler`` seeded with each image's seed: the noise between two noise levels is the increment of
one Brownian path W over sigma, normalised, ``(W(b) - W(a)) / sqrt(|b - a|)``, so the same seed gives the same path
whatever the step count, and an image changes smoothly with the steps. ``BrownianNoise`` is our own deterministic
version of that (no torchsde in the product): one path per batch row on [sigma_min, sigma_max] with
W(sigma_min) = 0, built lazily by dyadic bisection. W(sigma_max) is sqrt(range) times a standard normal; each
midpoint of an interval [l, r] is the Brownian-bridge value (W(l) + W(r)) / 2 + sqrt((r - l) / 4) z. Every z is
drawn from a generator seeded by a hash of (row seed, depth, index), so any point is reproducible without storing
the tree. A query descends until the interval is shorter than 2^-``depth`` of the range (default 2^-30, about
1.4e-8 of sigma_max for SD) and interpolates linearly inside it; the increments therefore have the Brownian law up
to a relative variance error of that size.

What is and is not identical to k-diffusion: the query points, the sign convention ((W(second) - W(first)) for
``noise(first, second)``), the interval ([smallest positive sigma, largest sigma] of the schedule) and the per-row
seeding (each row's path depends only on its own seed) are the same; the random values are not (torchsde's
BrownianTree draws its own values with its own PRNG and interval cache), so an SDE sampler's image for a seed is
ours, reproducible, but not A1111's pixel for pixel. tests/test_samplers_more.py checks our samplers against
k-diffusion's with one noise sampler injected into both.
"""

from __future__ import annotations

import hashlib
import math

import torch


def row_seeds(generator, batch: int) -> list[int]:
    """One seed per batch row for the Brownian paths: each generator's ``initial_seed()`` (the image's seed, as
    A1111 seeds its trees), a single generator's seed + row index, or random seeds when there is none."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch}")
        return [int(g.initial_seed()) for g in generator]
    if generator is not None:
        return [int(generator.initial_seed()) + i for i in range(batch)]
    return [int(torch.randint(0, 2**63 - 1, []).item()) for _ in range(batch)]


def _node_seed(seed: int, depth: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{depth}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)



def randn_like(x: torch.Tensor, generator) -> torch.Tensor:
    """Noise shaped like ``x``, drawn on the CPU so that a seed means the same image on every device; a list of
    generators draws each batch row from its own."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
        rows = [torch.randn((1, *x.shape[1:]), generator=g, dtype=x.dtype) for g in generator]
        return torch.cat(rows).to(x.device)
    return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)

class BrownianNoise:
    """A deterministic Brownian noise sampler: ``BrownianNoise(x, sigma_min, sigma_max, seeds)``, one path per row
    of ``x`` (``seeds`` has one int per row), called as ``noise(sigma, sigma_next)``. See the module docstring."""

    def __init__(self, x: torch.Tensor, sigma_min: float, sigma_max: float, seeds, *, depth: int = 30):
        seeds = [int(s) for s in seeds]
        if len(seeds) != x.shape[0]:
            raise ValueError(f"got {len(seeds)} seeds for a batch of {x.shape[0]}")
        self.t0, self.t1 = sorted((float(sigma_min), float(sigma_max)))
        if not self.t1 > self.t0:
            raise ValueError(f"Brownian noise needs sigma_max > sigma_min, got {sigma_min}, {sigma_max}")
        self.seeds = seeds
        self.shape = tuple(x.shape[1:])
        self.dtype, self.device = x.dtype, x.device
        self.depth = depth
        self._paths: dict = {}

    def _z(self, seed: int, depth: int, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_node_seed(seed, depth, index))
        return torch.randn(self.shape, generator=g, dtype=torch.float32).double()

    def _w(self, seed: int, t: float) -> torch.Tensor:
        """W(t) of the row with ``seed``, float64. The descent resumes from the deepest node it shares with one of
        the row's last few query paths (consecutive queries share most of theirs), so a sampling run draws each
        node once or nearly."""
        t = min(max(t, self.t0), self.t1)
        paths = self._paths.setdefault(seed, [])
        best = None
        for path in paths:  # path[d] = (lo, hi, w_lo, w_hi, index) at depth d
            k = 0
            while k < len(path) and path[k][0] <= t <= path[k][1]:
                k += 1
            if k and (best is None or k > len(best)):
                best = path[:k]
        if best is None:
            best = [(self.t0, self.t1, torch.zeros(self.shape, dtype=torch.float64),
                     math.sqrt(self.t1 - self.t0) * self._z(seed, 0, 0), 0)]
        path = list(best)
        lo, hi, w_lo, w_hi, index = path[-1]
        while len(path) <= self.depth and t != lo and t != hi:
            mid = (lo + hi) / 2
            w_mid = (w_lo + w_hi) / 2 + math.sqrt((hi - lo) / 4) * self._z(seed, len(path), 2 * index)
            # the child's index names the node whose midpoint it draws next
            if t < mid:
                lo, hi, w_hi, index = lo, mid, w_mid, 2 * index
            else:
                lo, hi, w_lo, index = mid, hi, w_mid, 2 * index + 1
            path.append((lo, hi, w_lo, w_hi, index))
        paths.insert(0, path)
        del paths[3:]
        if t == lo:
            return w_lo
        if t == hi:
            return w_hi
        return w_lo + (t - lo) / (hi - lo) * (w_hi - w_lo)

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        a, b = float(sigma), float(sigma_next)
        scale = math.sqrt(abs(b - a))
        if scale == 0:
            raise ValueError(f"Brownian noise over an empty interval [{a}, {b}]")
        rows = [(self._w(s, b) - self._w(s, a)) / scale for s in self.seeds]
        return torch.stack(rows).to(device=self.device, dtype=self.dtype)


class GeneratorNoise:
    """Independent standard normal noise per call from the per-row CPU generators (the ancestral samplers' noise:
    a seed means the same image on every device)."""

    def __init__(self, x: torch.Tensor, generator):
        self.x = x
        self.generator = generator

    def __call__(self, sigma=None, sigma_next=None) -> torch.Tensor:
        return randn_like(self.x, self.generator)
