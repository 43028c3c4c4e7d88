"""Classifier-free guidance whose conditioning follows a prompt's schedule call by call: A1111's prompt editing
(``[a:b:k]``), alternation (``[a|b]``) and composable diffusion (``a AND b :w``), for every sampler.

**The step counter** is A1111's (``CFGDenoiser.step``, ``sd_samplers_cfg_denoiser.py`` @82a973c0): it is 0 when a
sampling run starts (a new ``ScheduledCFGDenoiser`` per run) and goes up by one after every model call, corrector
calls included. A schedule is ``[(end_step, key), ...]`` with 1-based, ascending end steps; at counter ``c`` the
first entry with ``c <= end_step`` applies, so every boundary is inclusive and late by one call (``[a:b:10]`` over
20 steps: ``a`` for 11 calls, then ``b``). Past the last end step (a sampler calling the model more often than the
schedule is long) no entry matches and the **first** entry applies again, as in A1111. Schedules are built over
``schedule_steps(sampler, steps)``: twice the steps for second-order samplers (A1111's ``SamplerData.total_steps``;
here Heun, which makes 2N - 1 calls for N steps), the steps otherwise.

**Combination** (A1111 ``combine_denoised``): for sub-prompts j with weights w_j, guidance g and uncond U,
``D = U + sum_j (w_j * g) * (C_j - U)``, a *sum* of weighted deltas (two sub-prompts of weight 1 double the
guidance; a negative weight pushes away). The uncond is skipped when there is none, or when it cancels out:
g == 1 and sum_j w_j == 1 (a plain prompt at guidance 1). Skipping follows A1111's skip-uncond rule: the first
sub-prompt's prediction stands in for U and the scale is 1, ``D = C_1 + sum_j w_j (C_j - C_1)``, which equals the
full formula whenever the uncond cancels (and is ``C_1`` for one sub-prompt).

**Batching.** Per call, the uncond (B rows) and each distinct sub-prompt text of that call (B rows each) are grouped
by context length, uncond first, and each group is one model call: when every text has the same length (the usual
case: everything within one 75-token chunk) the whole guidance step is ONE call. Contexts are never padded to a
common length. A1111 stacks ``AND`` sub-prompts of different lengths by repeating the last vector
(``prompt_parser.stack_conds``), which changes the result; we run each length as its own call instead, which is
exact (A1111 itself does this, by default, for a cond and an uncond of different lengths).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Samplers whose schedules A1111 builds over 2 * steps (its "second_order" samplers: Heun, DPM2, DPM2 a, DPM++ 2S a,
# DPM++ SDE); equal to the second_order entries of samplers.SAMPLER_TRAITS (tests/test_samplers_more.py).
# tests/test_scheduled_sampling.py checks that every other sampler makes one call per step.
SECOND_ORDER = frozenset({"heun", "dpm2", "dpm2_a", "dpmpp_2s_a", "dpmpp_sde"})


def schedule_steps(sampler: str, steps: int) -> int:
    """The length A1111 builds prompt schedules over for ``steps`` steps of ``sampler``."""
    return 2 * steps if sampler in SECOND_ORDER else steps


def entry_at(schedule, counter: int):
    """The key of ``schedule`` ([(end_step, key), ...], ascending) at call ``counter`` (0-based): the first entry
    with ``counter <= end_step``, else the first entry (A1111's fallback past the end)."""
    for end, key in schedule:
        if counter <= end:
            return key
    return schedule[0][1]


@dataclass(frozen=True)
class UncondSkip:
    """When A1111 drops the uncond pass (``sd_samplers_cfg_denoiser.CFGDenoiser.forward``, @82a973c0), call by call.

    - **Skip Early CFG** (option ``skip_early_cond``, infotext "Skip Early CFG"): at call counter ``c`` (0-based,
      the scheduled denoiser's) while ``c / total <= skip_early_cond``, for ``skip_early_cond > 0``; ``total`` is
      A1111's ``total_steps`` (``schedule_steps``: 2 x steps for Heun). 0.25 of 20 steps skips calls 0..5.
    - **NGMS**, negative guidance minimum sigma (option and request field ``s_min_uncond``, infotext "NGMS"): when
      ``s_min_uncond > 0`` and the call's sigma (the first row's) is below it, on odd counters only (every other
      call, ``c % 2 == 1``), or on every call with ``s_min_uncond_all`` (infotext "NGMS all steps").

    A skipped call runs the sub-prompts alone and combines them at scale 1 (``D = C_1 + sum_j w_j (C_j - C_1)``,
    just ``C_1`` for a plain prompt): guidance is off, the cond prediction stands (A1111's ``fake_uncond``).
    """

    total: int
    s_min_uncond: float = 0.0
    s_min_uncond_all: bool = False
    skip_early_cond: float = 0.0

    @property
    def active(self) -> bool:
        return self.s_min_uncond > 0 or self.skip_early_cond > 0

    def skips(self, counter: int, sigma) -> bool:
        if self.skip_early_cond > 0 and counter / max(self.total, 1) <= self.skip_early_cond:
            return True
        if self.s_min_uncond > 0 and (counter % 2 or self.s_min_uncond_all):
            first = float(torch.as_tensor(sigma).reshape(-1)[0])
            return first < self.s_min_uncond
        return False


@dataclass(frozen=True)
class Cond:
    """One encoded text as the model takes it: ``context`` [B,T,D] and ``y`` [B,adm] (SDXL) or None."""

    context: torch.Tensor
    y: torch.Tensor | None = None


class ScheduledCFGDenoiser:
    """A D(x, sigma) for the samplers: guidance over scheduled, composable conditioning (see the module notes).

    ``conds``: key -> ``Cond`` for the sub-prompts' texts; ``parts``: [(weight, schedule)] with schedules
    [(end_step, key)]; ``negative``: a schedule over ``negative_conds`` or None (no uncond at all).
    ``calls`` is the step counter; ``history`` records, per call, the keys used: (sub-prompt keys, negative key or
    None when the uncond was skipped).
    """

    def __init__(self, denoiser, conds, parts, negative=None, negative_conds=None, guidance: float = 7.0, *,
                 skip: UncondSkip | None = None):
        if not parts:
            raise ValueError("a prompt program needs at least one part")
        self.denoiser = denoiser
        self.conds = dict(conds)
        self.parts = [(float(w), tuple(schedule)) for w, schedule in parts]
        self.negative = None if negative is None else tuple(negative)
        self.negative_conds = dict(negative_conds or {})
        self.guidance = float(guidance)
        self.calls = 0
        self.history = []
        self.skip = skip  # A1111's NGMS / Skip Early CFG (None: the uncond runs whenever guidance needs it)

    @property
    def sigmas(self):
        return self.denoiser.sigmas

    @property
    def skips_uncond(self) -> bool:
        total = sum(w for w, _ in self.parts)
        return self.negative is None or (math.isclose(self.guidance, 1.0) and math.isclose(total, 1.0))

    def keys_at(self, counter: int):
        """(sub-prompt keys, negative key or None) the call with this counter uses."""
        positive = tuple(entry_at(schedule, counter) for _, schedule in self.parts)
        return positive, (None if self.skips_uncond else entry_at(self.negative, counter))

    def __call__(self, x, sigma):
        positive, negative = self.keys_at(self.calls)
        if negative is not None and self.skip is not None and self.skip.skips(self.calls, sigma):
            negative = None  # guidance off for this call: the first sub-prompt stands in for the uncond (A1111)
        self.calls += 1
        self.history.append((positive, negative))
        distinct = list(dict.fromkeys(positive))
        entries = ([] if negative is None else [self.negative_conds[negative]]) + [self.conds[k] for k in distinct]
        outs = self._run(x, sigma, entries)
        preds = outs[1:] if negative is not None else outs
        by_key = dict(zip(distinct, preds))
        cond = [by_key[k] for k in positive]
        weights = [w for w, _ in self.parts]
        if negative is None:
            first = cond[0]
            if len(cond) == 1:
                return first
            out = first
            for w, c in zip(weights[1:], cond[1:]):
                out = out + w * (c - first)
            return out
        uncond, g = outs[0], self.guidance
        out = uncond + (weights[0] * g) * (cond[0] - uncond)
        for w, c in zip(weights[1:], cond[1:]):
            out = out + (w * g) * (c - uncond)
        return out

    def _run(self, x, sigma, entries):
        """Each entry's prediction [B,...]: entries of one context length batched into one model call, in order."""
        B = x.shape[0]
        groups: dict[int, list[int]] = {}
        for i, e in enumerate(entries):
            groups.setdefault(e.context.shape[1], []).append(i)
        outs = [None] * len(entries)
        for members in groups.values():
            if len(members) == 1:
                e = entries[members[0]]
                outs[members[0]] = self.denoiser(x, sigma, e.context, e.y)
                continue
            k = len(members)
            sigma_b = torch.as_tensor(sigma)
            if sigma_b.ndim == 0:
                sigma_b = sigma_b.expand(B)
            context = torch.cat([entries[i].context for i in members])
            ys = [entries[i].y for i in members]
            y = None if ys[0] is None else torch.cat(ys)
            both = self.denoiser(torch.cat([x] * k), torch.cat([sigma_b] * k), context, y)
            for j, i in enumerate(members):
                outs[i] = both[j * B:(j + 1) * B]
        return outs
