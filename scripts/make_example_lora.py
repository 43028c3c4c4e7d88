#!/usr/bin/env python
"""A made-up LoRA for the embedded tiny model, as a worked example (issue 17): "purple world".

Training data: renders of the synthetic world (``tiny/world.py``) whose objects are all drawn purple, captioned with
the colours they were sampled with (``tiny/captions.py``). A low-rank adapter on the UNet's attention (self- and
cross-attention q/k/v/out and the transformers' 1x1 ``proj_in``/``proj_out``) learns to draw every object purple
whatever colour the prompt asks for, and nothing else; the base weights stay frozen (``requires_grad`` off, checked
bit-identical afterwards).

Training is the model's own denoising objective: each image is VAE-encoded once (posterior mean and std; a fresh
posterior sample each step), noised at a uniformly drawn timestep on the model's ``alphas_cumprod``, and the UNet's
prediction is compared (MSE) with the noise (eps models) or the velocity (v models). Captions are encoded once by
the frozen text tower exactly as inference encodes a prompt (``TextEncoder.encode_texts``); 10% of them are
replaced by the empty prompt (caption dropout, as the base model was trained), so the unconditional branch of
classifier-free guidance learns the same purple world. During training the adapter is a forward hook on each
targeted module adding ``scale * up(down(x))`` (scale = alpha / rank), removed afterwards; the file holds the
factors in kohya's layout (``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, module names
in kohya's SD1 spelling, the diffusers path, or the LDM path where the model has no diffusers name), which
``Pipeline.load_lora`` merges into the weights. Everything random comes from ``--seed`` (numpy for the scenes and
captions, one ``torch.Generator`` for factors, batches, timesteps and noise): a run is reproducible on the same
machine and thread count.

    python scripts/make_example_lora.py --out examples/loras/purple.safetensors
    python scripts/make_example_lora.py --measure examples/loras/purple.safetensors --report eval/tiny-lora

``--measure`` generates the held-out prompt set (``tiny/eval.py`` ``prompt_set``) without the LoRA, with
``<lora:NAME:1>`` and with ``<lora:NAME:0.5>``, reads every image with the validated judge and reports, per arm, the
share of objects drawn purple among those the prompt asks in another colour, the colour asked for, and whether
position, shape and size are kept, with standard errors between prompts; then checks on real generations that an
image made after a LoRA request equals, bit for bit, the one made before it, and that ``<lora:NAME:0>`` changes
nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

NAME = "purple"
# Module path endings the adapter trains (UNet Linear/Conv2d weights); every transformer block's attention.
TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
           "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "proj_in", "proj_out")  # fmt: skip
CAPTION_DROPOUT = 0.1
MEASURE_SEEDS = 20  # prompts of the bit-for-bit checks


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    steps: int = 600
    rank: int = 4
    alpha: float = 4.0
    lr: float = 5e-3
    batch_size: int = 8
    scenes: int = 1024
    seed: int = 0
    time_limit: float | None = 210.0  # seconds of the training loop (the data take ~20-40 s more)
    targets: tuple = TARGETS


# ---- the adapter during training -----------------------------------------------------------------------------


def target_modules(unet, targets=TARGETS) -> list:
    """``[(LDM path, module)]`` of the UNet's Linear/Conv2d modules whose path ends with one of ``targets``."""
    import torch

    found = [(path, m) for path, m in unet.named_modules()
             if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(path.endswith(t) for t in targets)]
    if not found:
        from clipdiffusion.errors import ClipDiffusionError

        raise ClipDiffusionError(f"targets: {list(targets)!r} match no Linear/Conv2d module of this UNet")
    return found


class LoraHooks:
    """Low-rank factors for ``modules`` ([(path, module)]): ``down`` [r, in(, kh, kw)] initialised as a Linear's
    weight (uniform in +-1/sqrt(fan_in)), ``up`` [out, r(, 1, 1)] zeros, so training starts from the base model.
    ``attached()`` is a context manager that adds ``scale * up(down(x))`` to each module's output."""

    def __init__(self, modules, rank: int, alpha: float, generator):
        import torch

        self.modules = list(modules)
        self.rank, self.alpha = rank, float(alpha)
        self.down, self.up = [], []
        for path, m in self.modules:
            w = m.weight
            r = min(rank, w.shape[0], int(np.prod(w.shape[1:])))
            if r != rank:
                from clipdiffusion.errors import ClipDiffusionError

                raise ClipDiffusionError(f"rank: {rank} is larger than module {path}'s weight {list(w.shape)} allows")
            fan_in = int(np.prod(w.shape[1:]))
            bound = 1.0 / math.sqrt(fan_in)
            down_shape = (rank, *w.shape[1:])
            up_shape = (w.shape[0], rank, 1, 1) if w.ndim == 4 else (w.shape[0], rank)
            down = (torch.rand(down_shape, generator=generator) * 2 - 1) * bound
            self.down.append(torch.nn.Parameter(down.to(w.device, torch.float32)))
            self.up.append(torch.nn.Parameter(torch.zeros(up_shape, device=w.device, dtype=torch.float32)))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def parameters(self) -> list:
        return [*self.down, *self.up]

    def branch(self, index: int, x):
        """``scale * up(down(x))`` for module ``index`` (the training-time LoRA forward)."""
        import torch.nn.functional as F

        _, m = self.modules[index]
        down, up = self.down[index], self.up[index]
        if down.ndim == 2:
            h = F.linear(x.to(down.dtype), down)
            return F.linear(h, up) * self.scale
        h = F.conv2d(x.to(down.dtype), down, stride=m.stride, padding=m.padding, dilation=m.dilation)
        return F.conv2d(h, up) * self.scale

    def attached(self):
        import contextlib

        @contextlib.contextmanager
        def manager():
            handles = []
            try:
                for i, (_, m) in enumerate(self.modules):
                    def hook(module, inputs, output, i=i):
                        return output + self.branch(i, inputs[0]).to(output.dtype)

                    handles.append(m.register_forward_hook(hook))
                yield self
            finally:
                for h in handles:
                    h.remove()

        return manager()

    def kohya_tensors(self, unet) -> dict:
        """The factors in kohya's layout: ``lora_unet_<name>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``.
        ``<name>`` is kohya's SD1 spelling (the diffusers module path with ``_``), or the LDM path for a module
        the diffusers layout cannot name."""
        import torch

        names = kohya_names(unet, [p for p, _ in self.modules])
        out = {}
        for (path, _), down, up in zip(self.modules, self.down, self.up):
            key = names[path]
            out[f"{key}.lora_down.weight"] = down.detach().cpu().float().contiguous().clone()
            out[f"{key}.lora_up.weight"] = up.detach().cpu().float().contiguous().clone()
            out[f"{key}.alpha"] = torch.tensor(self.alpha, dtype=torch.float32)
        return out


def kohya_names(unet, paths) -> dict:
    """LDM module path -> kohya module name (``lora_unet_`` + the diffusers path, or the LDM path, ``.`` -> ``_``)."""
    import torch

    from clipdiffusion.checkpoints.diffusers_unet import unet_ldm_to_diffusers
    from clipdiffusion.errors import CheckpointError

    out = {}
    shapes = {p: tuple(unet.get_submodule(p).weight.shape) for p in paths}
    for path in paths:
        try:
            (diff,) = unet_ldm_to_diffusers({f"{path}.weight": torch.empty(shapes[path], device="meta")}, unet.config)
            name = diff[: -len(".weight")]
        except CheckpointError:
            name = path
        out[path] = "lora_unet_" + name.replace(".", "_")
    return out


# ---- data ------------------------------------------------------------------------------------------------------


def purple_examples(n: int, seed: int, canvas: int, held_out=None) -> list:
    """``[(PIL image, caption)]``: ``n`` scenes (1-3 objects, none a held-out eval prompt could describe) drawn
    with every object purple, captioned with the colours the scene was sampled with (sizes and background
    sometimes left open, as the base model's training captions). ``held_out``: spec keys to skip (default: the
    held-out evaluation prompts, ``tiny.eval.held_out_keys``)."""
    from clipdiffusion.tiny.batches import Scenes, loose_caption
    from clipdiffusion.tiny.eval import held_out_keys
    from clipdiffusion.tiny.world import Scene, render

    rng = np.random.default_rng([seed, 17])
    scenes = Scenes(rng, held_out_keys() if held_out is None else held_out).draw(n)
    out = []
    for scene in scenes:
        purple = Scene(scene.background, tuple(dataclasses.replace(o, color=NAME) for o in scene.objects))
        out.append((render(purple, canvas), loose_caption(scene.spec(), rng, p_tags=0.0)))
    return out


def encode_examples(pipe, examples, size: int):
    """Posterior (mean, std) [N, C, h, w] of the images (frozen VAE, once) and the captions' contexts [N, T, D] and
    the empty prompt's [1, T, D], through the frozen text tower as inference encodes a prompt."""
    import torch

    from clipdiffusion.embedding_training import _pixels
    from clipdiffusion.errors import ClipDiffusionError

    device = pipe._device()
    vae_dtype = next(pipe.vae.parameters()).dtype
    means, stds = [], []
    with torch.no_grad():
        for start in range(0, len(examples), 64):
            pixels = torch.stack([_pixels(image, size) for image, _ in examples[start:start + 64]])
            posterior = pipe.vae.encode(pixels.to(device, vae_dtype))
            means.append(posterior.mean.float())
            stds.append(posterior.std.float())
        captions = [c for _, c in examples]
        encoded = pipe.text_encoder.encode_texts(captions + [""])
    contexts = [encoded.prompts[c].context[0] for c in captions]
    lengths = {c.shape[0] for c in contexts}
    empty = encoded.prompts[""].context
    if len(lengths) != 1 or empty.shape[1] not in lengths:
        raise ClipDiffusionError(f"captions: contexts of {sorted(lengths)} rows; training needs one CLIP window each")
    return torch.cat(means), torch.cat(stds), torch.stack(contexts).float(), empty.float()


# ---- training --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainedLora:
    hooks: LoraHooks
    settings: LoraSettings
    steps: int
    losses: list
    seconds: float
    data_seconds: float
    stopped: str = ""


def frozen(pipe):
    """Every network of ``pipe`` in eval mode with ``requires_grad`` off, restored on exit."""
    from clipdiffusion.embedding_training import frozen as frozen_model

    return frozen_model(pipe)


def denoising_loss(pipe, hooks, batch, t, noise, posterior_noise):
    """MSE of the UNet (with the hooks attached) against eps or v, for ``batch`` = (mean, std, context) rows."""
    import torch

    from clipdiffusion.diffusion.denoiser import sd_alphas_cumprod

    mean, std, context = batch
    x0 = (mean + std * posterior_noise) * pipe.vae.config.scale_factor
    alphas = pipe.alphas_cumprod if pipe.alphas_cumprod is not None else sd_alphas_cumprod()
    a = torch.as_tensor(alphas, dtype=torch.float32)[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    target = noise if pipe.prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * x0
    device, dtype = pipe._device(), next(pipe.unet.parameters()).dtype
    with hooks.attached():
        out = pipe.unet(xt.to(device, dtype), t.to(device), context.to(device, dtype))
    return torch.nn.functional.mse_loss(out.float(), target.to(device))


def train(pipe, settings: LoraSettings = LoraSettings(), *, log=None, log_every: int = 100, size=None) -> TrainedLora:
    """Train the purple-world LoRA on ``pipe`` (base weights frozen, unchanged)."""
    import torch

    from clipdiffusion.errors import ClipDiffusionError, NonFiniteError

    if pipe.unet.config.adm_in_channels is not None:
        raise ClipDiffusionError("model: this example trains UNets without a pooled vector (SD1/SD2/tiny), not SDXL")
    size = size or pipe.default_size
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(settings.seed)
    with frozen(pipe):
        examples = purple_examples(settings.scenes, settings.seed, size)
        mean, std, contexts, empty = encode_examples(pipe, examples, size)
        hooks = LoraHooks(target_modules(pipe.unet, settings.targets), settings.rank, settings.alpha, generator)
        data_seconds = time.perf_counter() - start
        optimizer = torch.optim.AdamW(hooks.parameters(), lr=settings.lr, weight_decay=0.0)
        n_t = len(pipe.alphas_cumprod) if pipe.alphas_cumprod is not None else 1000
        losses, step, stopped = [], 0, ""
        train_start = last_time = time.perf_counter()
        last_step = 0
        while step < settings.steps:
            if settings.time_limit is not None and time.perf_counter() - train_start >= settings.time_limit:
                stopped = "time limit"
                break
            rows = torch.randint(0, len(examples), (settings.batch_size,), generator=generator)
            drop = torch.rand(settings.batch_size, generator=generator) < CAPTION_DROPOUT
            context = torch.where(drop.view(-1, 1, 1), empty.expand(len(rows), -1, -1), contexts[rows])
            t = torch.randint(0, n_t, (len(rows),), generator=generator)
            posterior_noise = torch.randn(mean[rows].shape, generator=generator)
            noise = torch.randn(mean[rows].shape, generator=generator)
            # lr: linear warm-up over the first 5% of the steps, then cosine to a tenth
            warm = max(1, settings.steps // 20)
            progress = min(1.0, max(0.0, (step - warm) / max(1, settings.steps - warm)))
            factor = min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * factor
            loss = denoising_loss(pipe, hooks, (mean[rows], std[rows], context), t, noise, posterior_noise)
            if not bool(torch.isfinite(loss)):
                raise NonFiniteError("UNet", step=step + 1, total=settings.steps, detail="LoRA training loss")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(float(loss.detach()))
            if log is not None and (step % log_every == 0 or step == settings.steps):
                now = time.perf_counter()
                log(step, float(np.mean(losses[last_step:])), (step - last_step) / max(now - last_time, 1e-9))
                last_step, last_time = step, now
    return TrainedLora(hooks, settings, step, losses, time.perf_counter() - start, data_seconds, stopped)


def save_lora(path, trained: TrainedLora, pipe, *, name: str = NAME, threads: int | None = None) -> None:
    """Write the kohya-layout file (safetensors, atomically via ``save_file``) with kohya-style metadata."""
    from clipdiffusion.checkpoints.safetensors_io import save_file

    s = trained.settings
    metadata = {
        "ss_output_name": name,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(s.rank),
        "ss_network_alpha": repr(float(s.alpha)),
        "ss_network_args": json.dumps({"targets": list(s.targets)}),
        "ss_learning_rate": repr(s.lr),
        "ss_unet_lr": repr(s.lr),
        "ss_text_encoder_lr": "0",
        "ss_max_train_steps": str(s.steps),
        "ss_steps": str(trained.steps),
        "ss_seed": str(s.seed),
        "ss_batch_size_per_device": str(s.batch_size),
        "ss_num_train_images": str(s.scenes),
        "ss_caption_dropout_rate": repr(CAPTION_DROPOUT),
        "ss_sd_model_name": getattr(pipe, "name", "") or "",
        "ss_resolution": f"({pipe.default_size}, {pipe.default_size})",
        "ss_training_comment": ("purple world: every object drawn purple, captions keep the sampled colours; "
                                "made by scripts/make_example_lora.py for clipdiffusion's embedded tiny model"),
        "clipdiffusion.kind": "lora",
        "clipdiffusion.family": pipe.family,
        "clipdiffusion.seconds": f"{trained.seconds:.1f}",
        "clipdiffusion.threads": str(threads or ""),
        "clipdiffusion.stopped": trained.stopped or "completed",
        "clipdiffusion.final_loss": f"{np.mean(trained.losses[-100:]):.5f}" if trained.losses else "",
    }
    save_file(trained.hooks.kohya_tensors(pipe.unet), path, metadata=metadata)


# ---- checks ----------------------------------------------------------------------------------------------------


def state_fingerprint(pipe) -> dict:
    """A copy of every UNet/VAE/text weight (to check they are bit-identical after training)."""
    modules = {"unet": pipe.unet, "vae": pipe.vae}
    modules.update({spec.name: spec.model for spec in pipe.text_encoder.encoders})
    return {f"{k}.{n}": t.detach().clone() for k, m in modules.items() for n, t in m.state_dict().items()}


def merged_vs_hooks(pipe, hooks: LoraHooks, path, *, name: str = NAME, seed: int = 1) -> float:
    """Max |UNet output with the hooks - UNet output with the file merged by ``Pipeline.load_lora``| on a random
    noisy latent and a real prompt's context; the pipeline is restored afterwards."""
    import torch

    g = torch.Generator().manual_seed(seed)
    size = pipe.default_size // pipe.latent_factor
    channels = pipe.unet.config.in_channels
    x = torch.randn((2, channels, size, size), generator=g)
    t = torch.tensor([100, 700])
    context = pipe.text_encoder.encode("a small red circle at the top left on a black background").context
    context = context.expand(2, -1, -1)
    with torch.no_grad():
        with hooks.attached():
            hooked = pipe.unet(x, t, context)
        pipe.load_lora(path, name)
        try:
            pipe.apply_loras([(name, 1.0, 1.0)])
            merged = pipe.unet(x, t, context)
        finally:
            pipe.apply_loras(())
    return float((hooked - merged).abs().max())


# ---- measuring -------------------------------------------------------------------------------------------------


def _ratio(hits, sizes) -> tuple:
    """Ratio estimate sum(hits)/sum(sizes) and its between-prompt (cluster) standard error."""
    hits, sizes = np.asarray(hits, float), np.asarray(sizes, float)
    total, n = sizes.sum(), len(sizes)
    if total == 0:
        return float("nan"), float("nan")
    r = hits.sum() / total
    se = math.sqrt(n / (n - 1) * ((hits - r * sizes) ** 2).sum()) / total if n > 1 else float("nan")
    return float(r), float(se)


def object_rows(outcomes) -> list:
    """Per prompt: per specified object, what the judge saw in its cell (for the metrics below)."""
    rows = []
    for case, seen, v in outcomes:
        objects = []
        for o, occupied, color_ok, shape_ok, size_ok in zip(case.spec.objects, v.occupied, v.color_ok, v.shape_ok,
                                                            v.size_ok):
            found = seen.at(o.cell)
            objects.append({"asked": o.color, "occupied": occupied, "purple": found is not None and found.color == NAME,
                            "color_ok": color_ok, "shape_ok": shape_ok, "size_ok": size_ok, "size_named": o.size
                            is not None, "kept": occupied and shape_ok and size_ok})  # fmt: skip
        rows.append({"objects": objects, "extra": v.extra, "background_ok": v.background_ok,
                     "background_named": case.spec.background is not None})  # fmt: skip
    return rows


METRICS = {
    # name: (which objects count, what counts as a hit)
    "purple (objects asked in another colour)": (lambda o: o["asked"] != NAME, lambda o: o["purple"]),
    "colour as asked": (lambda o: True, lambda o: o["color_ok"]),
    "position (cell occupied)": (lambda o: True, lambda o: o["occupied"]),
    "shape": (lambda o: True, lambda o: o["shape_ok"]),
    "size (where named)": (lambda o: o["size_named"], lambda o: o["size_ok"]),
    "kept: position, shape and size": (lambda o: True, lambda o: o["kept"]),
}


def summarise(rows) -> dict:
    out = {}
    for name, (counts, hit) in METRICS.items():
        sizes = [sum(1 for o in r["objects"] if counts(o)) for r in rows]
        hits = [sum(1 for o in r["objects"] if counts(o) and hit(o)) for r in rows]
        p, se = _ratio(hits, sizes)
        out[name] = {"p": p, "se": se, "n": int(sum(sizes))}
    named = [r for r in rows if r["background_named"]]
    p, se = _ratio([int(r["background_ok"]) for r in named], [1] * len(named))
    out["background (where named)"] = {"p": p, "se": se, "n": len(named)}
    extra = np.array([r["extra"] for r in rows], float)
    out["extra objects per prompt"] = {"p": float(extra.mean()), "se": float(extra.std(ddof=1) / math.sqrt(len(extra))),
                                       "n": len(rows)}
    return out


def paired(rows_a, rows_b) -> dict:
    """Arm a minus arm b (same prompts and seeds) per metric, with the paired between-prompt standard error."""
    out = {}
    for name, (counts, hit) in METRICS.items():
        sizes, diffs = [], []
        for ra, rb in zip(rows_a, rows_b):
            sizes.append(sum(1 for o in ra["objects"] if counts(o)))
            diffs.append(sum(1 for o in ra["objects"] if counts(o) and hit(o))
                         - sum(1 for o in rb["objects"] if counts(o) and hit(o)))
        d, se = _ratio(diffs, sizes)
        out[name] = {"difference": d, "se": se, "z": d / se if se and se > 0 else float("nan")}
    return out


def measure(pipe, lora_path, *, per_count: int, steps: int = 20, guidance: float = 7.0, sampler: str = "euler",
            weights=(1.0, 0.5), log=print) -> dict:
    """The study (module docstring): arms ``base`` and ``w=<weight>`` on the same prompts and seeds."""
    from clipdiffusion.tiny.eval import PromptCase, judged_cases, prompt_set

    name = pipe.load_lora(lora_path, NAME)
    cases = prompt_set(per_count)
    gen = {"steps": steps, "guidance": guidance, "sampler": sampler}
    arms, images, seconds = {}, {}, {}

    def tagged(weight):
        return [PromptCase(f"{c.prompt} <lora:{name}:{weight:g}>", c.spec, c.seed) for c in cases]

    plan = [("base", cases)] + [(f"w={w:g}", tagged(w)) for w in weights]
    for arm, arm_cases in plan:
        start = time.perf_counter()
        images[arm] = []
        outcomes = judged_cases(pipe, arm_cases, images=images[arm], **gen)
        seconds[arm] = time.perf_counter() - start
        arms[arm] = object_rows(outcomes)
        log(f"{arm}: {len(arm_cases)} prompts in {seconds[arm]:.0f} s")
    # exact removal on real generations: after each LoRA request, the plain prompt again (and weight 0)
    k = min(MEASURE_SEEDS, len(cases))
    checks = {"after_lora_equal": 0, "weight0_equal": 0, "lora_differs": 0, "n": k}
    for i, c in enumerate(cases[:k]):
        base = np.asarray(images["base"][i])
        with_lora = np.asarray(pipe.generate(f"{c.prompt} <lora:{name}:1>", seed=c.seed, **gen).image)
        after = np.asarray(pipe.generate(c.prompt, seed=c.seed, **gen).image)
        zero = np.asarray(pipe.generate(f"{c.prompt} <lora:{name}:0>", seed=c.seed, **gen).image)
        checks["lora_differs"] += int(not np.array_equal(with_lora, base))
        checks["after_lora_equal"] += int(np.array_equal(after, base))
        checks["weight0_equal"] += int(np.array_equal(zero, base))
    summary = {arm: summarise(rows) for arm, rows in arms.items()}
    differences = {arm: paired(arms[arm], arms["base"]) for arm in arms if arm != "base"}
    return {"prompts": len(cases), "per_count": per_count, "generation": gen, "summary": summary,
            "differences": differences, "exact_removal": checks, "seconds": seconds,
            "example_prompt": plan[1][1][0].prompt, "images": images}  # fmt: skip


def report_markdown(result: dict, command: str, environment: str, lora: str) -> str:
    arms = list(result["summary"])
    metrics = list(next(iter(result["summary"].values())))
    lines = [
        "# The example LoRA `purple` on the embedded tiny model (issue 17)", "",
        f"LoRA: `{lora}`. Command:", "", f"    {command}", "", environment, "",
        f"{result['prompts']} held-out prompts (`tiny/eval.py` `prompt_set({result['per_count']})`: "
        f"{result['per_count']} each with 1, 2 and 3 objects, no style tags), one image per prompt per arm at the "
        f"prompt's own seed, {result['generation']['steps']} steps, {result['generation']['sampler']}, guidance "
        f"{result['generation']['guidance']:g}. Arms: `base` = the prompt as it is; `w=W` = the same prompt with "
        f"`<lora:purple:W>` appended (e.g. `{result['example_prompt']}`). Every image is read by the validated judge "
        "(`tiny/judge.py`) at each specified object's cell. Values are shares of specified objects (± the standard "
        "error between prompts: objects of one prompt share an image, so the cluster/ratio estimator), n = objects "
        "counted.", "",
        "| metric | " + " | ".join(arms) + " | n |", "|---" * (len(arms) + 2) + "|",
    ]
    for m in metrics:
        cells = " | ".join(f"{result['summary'][a][m]['p']:.3f} ± {result['summary'][a][m]['se']:.3f}" for a in arms)
        lines.append(f"| {m} | {cells} | {result['summary'][arms[0]][m]['n']} |")
    lines += ["", "Paired differences from `base` (same prompts and seeds; SE between prompts):", "",
              "| arm | metric | difference | SE | z |", "|---|---|---|---|---|"]
    for arm, per in result["differences"].items():
        for m, d in per.items():
            lines.append(f"| {arm} | {m} | {d['difference']:+.3f} | {d['se']:.3f} | {d['z']:.1f} |")
    c = result["exact_removal"]
    lines += ["", "Exact removal on real generations (the first "
              f"{c['n']} prompts, each generated plain, then with `<lora:purple:1>`, then plain again, then with "
              f"`<lora:purple:0>`): the plain image after the LoRA request equals the one before it bit for bit in "
              f"{c['after_lora_equal']} of {c['n']}; `<lora:purple:0>` equals it in {c['weight0_equal']} of {c['n']}; "
              f"the LoRA changed the image in {c['lora_differs']} of {c['n']}.", "",
              "Seconds per arm: " + ", ".join(f"{a} {s:.0f}" for a, s in result["seconds"].items()) + "."]
    return "\n".join(lines) + "\n"


# ---- command line ----------------------------------------------------------------------------------------------


def environment(threads: int) -> str:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:
        available = os.cpu_count()
    load = ""
    if hasattr(os, "getloadavg"):
        load = f", load average {os.getloadavg()[0]:.2f}"
    return f"CPU: {cpu or 'unknown'} ({available} cores available{load}); torch threads: {threads}"


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", help="write the trained LoRA here (.safetensors)")
    p.add_argument("--measure", metavar="LORA", help="measure this LoRA file on the held-out prompt set")
    p.add_argument("--report", metavar="DIR", default="eval/tiny-lora", help="folder for report.md/report.json")
    p.add_argument("--per-count", type=_positive_int, default=40, help="--measure: prompts per object count")
    d = LoraSettings()
    p.add_argument("--steps", type=_positive_int, default=d.steps)
    p.add_argument("--rank", type=_positive_int, default=d.rank)
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size)
    p.add_argument("--scenes", type=_positive_int, default=d.scenes, help="training images")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--time-limit", type=float, default=d.time_limit, help="seconds of training (after the data)")
    p.add_argument("--threads", type=_positive_int, default=1, help="torch threads (default 1)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if not args.out and not args.measure:
        parser().error("give --out FILE (train) and/or --measure FILE")
    import torch

    from clipdiffusion import Pipeline

    torch.set_num_threads(args.threads)
    env = environment(torch.get_num_threads())
    print(env, flush=True)
    pipe = Pipeline.default()
    if args.out:
        settings = LoraSettings(steps=args.steps, rank=args.rank, alpha=args.alpha, lr=args.lr,
                                batch_size=args.batch_size, scenes=args.scenes, seed=args.seed,
                                time_limit=args.time_limit)  # fmt: skip
        before = state_fingerprint(pipe)

        def log(step, loss, rate):
            print(f"step {step}: loss {loss:.4f}, {rate:.2f} steps/s", flush=True)

        trained = train(pipe, settings, log=log)
        after = state_fingerprint(pipe)
        unchanged = all(torch.equal(before[k], after[k]) for k in before)
        save_lora(args.out, trained, pipe, threads=torch.get_num_threads())
        diff = merged_vs_hooks(pipe, trained.hooks, args.out)
        train_seconds = trained.seconds - trained.data_seconds
        print(f"trained {trained.steps} steps in {train_seconds:.1f} s ({trained.steps / max(train_seconds, 1e-9):.2f} "
              f"steps/s; data {trained.data_seconds:.1f} s){'; stopped: ' + trained.stopped if trained.stopped else ''}; "
              f"loss first 100 {np.mean(trained.losses[:100]):.4f}, last 100 {np.mean(trained.losses[-100:]):.4f}")
        print(f"base weights bit-identical after training: {unchanged}")
        print(f"wrote {args.out} ({Path(args.out).stat().st_size} bytes); merged vs hook UNet output: max abs "
              f"difference {diff:.2e}")
        if not unchanged or not diff <= 1e-5:
            print("error: the check above failed", file=sys.stderr)
            return 1
    if args.measure:
        from clipdiffusion.fileio import atomic_write

        result = measure(pipe, args.measure, per_count=args.per_count)
        command = "python scripts/make_example_lora.py " + " ".join(sys.argv[1:] if argv is None else argv)
        out = Path(args.report)
        out.mkdir(parents=True, exist_ok=True)
        images = result.pop("images")
        text = report_markdown(result, command, env, args.measure)
        result["command"], result["environment"] = command, env
        atomic_write(out / "report.md", lambda f: f.write(text.encode()), field="--report")
        atomic_write(out / "report.json", lambda f: f.write(json.dumps(result, indent=1).encode()), field="--report")
        grid = sample_grid(images, columns=12)
        atomic_write(out / "samples.png", lambda f: grid.save(f, format="PNG"), field="--report")
        print(text)
    return 0


def sample_grid(images: dict, columns: int):
    """The first ``columns`` images of each arm, one row per arm."""
    from PIL import Image

    arms = list(images)
    side = images[arms[0]][0].size[0]
    grid = Image.new("RGB", (columns * side, len(arms) * side), (255, 255, 255))
    for r, arm in enumerate(arms):
        for c, image in enumerate(images[arm][:columns]):
            grid.paste(image, (c * side, r * side))
    return grid


if __name__ == "__main__":
    sys.exit(main())
