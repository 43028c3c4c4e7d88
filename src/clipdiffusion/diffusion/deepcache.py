"""DeepCache (Ma, Fang and Wang, "DeepCache: Accelerating Diffusion Models for Free", CVPR 2024): adjacent
denoising steps change the UNet's deep features little, so the whole UNet runs only every ``interval`` steps and
the steps in between run just its shallowest blocks, with the deep feature of the last full step standing in for
everything below them.

``DeepCacheUNet(unet, interval, branch=1)`` wraps a ``UNetModel`` (anything with ``forward_split``) and is called
like one, so ``Denoiser`` takes it in the UNet's place. Where the split lies is ``UNetModel.forward_split``'s
``branch`` (1, the paper's default: the first skip level, i.e. the input convolution, the first res/attention block
and the two output blocks fed by their skips).

**Steps.** A call at a noise level other than the previous call's starts a new evaluation step (a sampler step;
Heun's corrector call is a step of its own). Step ``k`` runs the whole UNet when ``k % interval == 0`` (the first
step always does) and stores the deep feature; the other steps reuse it. ``interval`` 0 or 1 is no caching.

**Rows.** Classifier-free guidance batches differ between calls (the uncond may be skipped: NGMS, Skip Early CFG;
texts of different lengths run as separate calls), so the cache is kept per batch row, keyed by the row's
conditioning (a hash of its context and y rows) and the row's rank among equal rows of its call (the images of a
batch share one context). A call reuses cached features only when every one of its rows has one from the current
interval; otherwise it runs the whole UNet (and refreshes them). ``full_calls``/``shallow_calls`` count the calls.
"""

from __future__ import annotations

import hashlib

import torch

from ..errors import ClipDiffusionError


def _row_keys(context, y) -> list:
    """One key per batch row: (hash of the row's context and y, rank among equal rows of this call)."""
    ctx = context.detach().to("cpu", torch.float32).contiguous().numpy()
    ys = None if y is None else y.detach().to("cpu", torch.float32).contiguous().numpy()
    seen: dict = {}
    keys = []
    for i in range(ctx.shape[0]):
        digest = hashlib.blake2b(ctx[i].tobytes(), digest_size=16)
        if ys is not None:
            digest.update(ys[i].tobytes())
        d = digest.digest()
        rank = seen.get(d, 0)
        seen[d] = rank + 1
        keys.append((ctx.shape[1], d, rank))
    return keys


class DeepCacheUNet:
    """A UNet that reuses its deep features between adjacent steps (see the module notes)."""

    def __init__(self, unet, interval: int, branch: int = 1):
        if not hasattr(unet, "forward_split"):
            raise ClipDiffusionError(f"deepcache_interval: this model ({type(unet).__name__}) cannot split its UNet")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 0:
            raise ClipDiffusionError(f"deepcache_interval={interval!r}: must be an integer >= 0")
        self.unet = unet
        self.interval = interval
        self.branch = branch
        self.step = -1
        self._sigma = None
        self._cache: dict = {}  # row key -> (step, feature [1,C,h,w])
        self.full_calls = 0
        self.shallow_calls = 0

    def __getattr__(self, name):  # config, parameters(), ... of the wrapped UNet
        if name == "unet":
            raise AttributeError(name)
        return getattr(self.unet, name)

    def parameters(self, *args, **kwargs):
        return self.unet.parameters(*args, **kwargs)

    def __call__(self, x, timesteps, context, y=None, **kwargs):
        t = torch.as_tensor(timesteps)
        level = float(t.reshape(-1)[0]) if t.numel() else 0.0
        if level != self._sigma:
            self._sigma = level
            self.step += 1
            if self.interval <= 1 or self.step % self.interval == 0:
                self._cache.clear()
        if self.interval <= 1:
            self.full_calls += 1
            return self.unet(x, timesteps, context, y, **kwargs)
        keys = _row_keys(context, y)
        window = self.step - self.step % self.interval
        cached = [self._cache.get(k) for k in keys]
        spatial = tuple(x.shape[2:])
        usable = self.step % self.interval != 0 and all(
            c is not None and c[0] >= window and c[2] == spatial for c in cached)
        if usable:
            deep = torch.cat([c[1] for c in cached])
            out, _ = self.unet.forward_split(x, timesteps, context, y, branch=self.branch, deep=deep, **kwargs)
            self.shallow_calls += 1
            return out
        out, deep = self.unet.forward_split(x, timesteps, context, y, branch=self.branch, **kwargs)
        self.full_calls += 1
        for i, k in enumerate(keys):
            self._cache[k] = (self.step, deep[i:i + 1], spatial)
        return out
