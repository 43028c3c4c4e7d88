"""Training of the embedded tiny model from scratch, in phases, within a wall-clock budget, resumable.

1. ``clip``: the tiny CLIP, contrastively (symmetric InfoNCE, Radford et al. 2021) between the text tower (our
   ``CLIPTextModel``) and a small CNN image tower, on renders and captions of the synthetic world, plus an
   auxiliary cell readout (``models.CellReadout``) that trains the final hidden states, the UNet's context, to
   hold each object's attributes bound to its cell; the contrastive loss alone left them to chance.
2. ``vae``: our ``AutoencoderKL`` at 4x downsampling, L1 + MSE reconstruction and LDM's tiny KL weight; the
   scale factor is then measured as 1 / std of the latents, as the SD authors did for theirs.
3. ``pool``: a fixed pool of scenes and their latents (rendering and encoding once is far cheaper than per step).
4. ``unet``: our ``UNetModel``, eps prediction on the SD noise schedule with Min-SNR-5 loss weighting (Hang et al.
   2023), cross-attending to the *frozen* tiny CLIP's context built exactly as inference builds it (the same
   ``TextEncoder.plan`` windows, so captions past 75 tokens train 154-token chunked contexts), 10% caption dropout
   for classifier-free guidance, captions drawn from each pooled scene's (``pool_captions`` per scene, encoded
   once in the pool phase), and an EMA copy.

The state (weights, optimisers, RNGs, phase clocks) is written atomically every few minutes; ``resume=True`` picks
up where it stopped. The result is one LDM-layout ``.safetensors`` of family "tiny" (``save_checkpoint``).
"""

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ClipDiffusionError
from .batches import POOL_BATCH, ContextBuilder, Scenes, cell_targets, deep_caption, described_pair, loose_caption
from .models import build_models, to_pixels
from .settings import PHASES, TrainSettings, phase_seconds
from .world import BACKGROUNDS, Scene, SceneObject, render

# ---------------------------------------------------------------------------------------------------------------
# Models and state


def _optimizer(params, lr, weight_decay=0.0):
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99))


def _lr(step: int, base: float, warmup: int) -> float:
    return base * min(1.0, (step + 1) / warmup)


class Trainer:
    """Runs the phases against a folder ``out`` (state.pt, log.jsonl, tiny-sd.safetensors)."""

    def __init__(self, out, settings: TrainSettings = TrainSettings(), *, resume=False, tokenizer=None, log=print,
                 device="cpu"):  # fmt: skip
        self.out = Path(out)
        # Random draws stay on the CPU generators (same run on any device); only the networks and their
        # batches move. The shipped model is trained on the CPU; other devices serve experiments.
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError):
            raise ClipDiffusionError(f"device: {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ClipDiffusionError(f"device: {device!r} asked for, but this torch sees no CUDA device")
        self._budgets, self._caps = None, {}  # per phase, set by run(): what the learning-rate decay follows
        self.settings = settings
        self.log = log
        self.config = settings.config
        torch.manual_seed(settings.seed)  # initial weights are part of the run: reproducible from the seed
        self.models, self.text_encoder = build_models(self.config, tokenizer)
        for m in self.models.values():
            m.to(self.device)
        if settings.clip_readout:
            from .models import CellReadout

            self.models["readout"] = CellReadout(self.config.text.width).to(self.device)
        clip_params = [*self.models["text"].parameters(), *self.models["heads"].parameters()]
        if "readout" in self.models:
            clip_params += list(self.models["readout"].parameters())
        self.optimizers = {
            "clip": _optimizer(clip_params, settings.clip_lr),
            "vae": _optimizer(self.models["vae"].parameters(), settings.vae_lr),
            "unet": _optimizer(self.models["unet"].parameters(), settings.unet_lr),
        }
        self.state = {"phase": 0, "step": {p: 0 for p in PHASES}, "seconds": {p: 0.0 for p in PHASES},
                      "scale_factor": None, "settings": dataclasses.asdict(settings)}  # fmt: skip
        self.rng = np.random.default_rng(settings.seed)
        self.torch_rng = torch.Generator().manual_seed(settings.seed)
        self.pool = None
        self._empty = None  # the empty caption's context, encoded at the first UNet step
        self._base_run = None  # the (settings, steps) metadata of the init_from model's own run
        state_path = self.out / "state.pt"
        if settings.init_from is not None and not resume:
            self._init_from(settings.init_from)
        if resume:
            if not state_path.exists():
                raise ClipDiffusionError(f"resume: no training state in {str(self.out)!r} (state.pt is missing)")
            self._load(state_path)
        elif state_path.exists():
            raise ClipDiffusionError(f"out: {str(self.out)!r} already holds a training state; pass --resume to "
                                     "continue it or choose another folder")  # fmt: skip
        from .eval import held_out_keys

        self.scenes = Scenes(self.rng, held_out_keys())

    def _init_from(self, path):
        """Start from a finished tiny model's text tower, VAE (and scale factor) and UNet (also the EMA's start)."""
        from safetensors import safe_open

        from ..pipeline import Pipeline

        pipe = Pipeline.from_file(path)
        if pipe.family != "tiny":
            raise ClipDiffusionError(f"init_from: {str(path)!r} is a {pipe.family!r} model, not a tiny one")
        try:
            self.models["text"].load_state_dict(pipe.text_encoder.encoders[0].model.state_dict())
            self.models["vae"].load_state_dict(pipe.vae.state_dict())
            self.models["unet"].load_state_dict(pipe.unet.state_dict())
            self.models["ema"].load_state_dict(pipe.unet.state_dict())
        except RuntimeError as e:
            raise ClipDiffusionError(f"init_from: {str(path)!r} does not fit preset {self.settings.model!r} "
                                     f"({str(e)[:200]})") from None  # fmt: skip
        self.state["scale_factor"] = float(pipe.vae.config.scale_factor)
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
        base = (meta.get("clipdiffusion.tiny.base_train_settings") or meta.get("clipdiffusion.tiny.train_settings"),
                meta.get("clipdiffusion.tiny.base_steps") or meta.get("clipdiffusion.tiny.steps"))  # fmt: skip
        self.state["base_run"] = list(base) if all(base) else None

    # ---- persistence ----------------------------------------------------------------------------------------

    def _save(self):
        self.out.mkdir(parents=True, exist_ok=True)
        blob = {
            "models": {k: m.state_dict() for k, m in self.models.items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "state": self.state,
            "rng": self.rng.bit_generator.state,
            "torch_rng": self.torch_rng.get_state(),
            # scenes as plain tuples: the file then holds only tensors and builtins, and loads with weights_only
            # the encoded contexts (~1 GB) are not saved: resuming encodes the saved captions again
            "pool": None if self.pool is None else {
                "scenes": [(sc.background, [dataclasses.astuple(o) for o in sc.objects]) for sc in self.pool["scenes"]],
                "latents": self.pool["latents"], "captions": self.pool["captions"],
                "strategies": self.pool.get("strategies", [])},
        }
        tmp = self.out / "state.pt.tmp"
        torch.save(blob, tmp)
        os.replace(tmp, self.out / "state.pt")  # atomic: a kill mid-write leaves the previous state intact

    def _load(self, path):
        from ..checkpoints.safetensors_io import load_weights_only
        from ..errors import CheckpointError

        try:  # tensors and builtins only: a planted state.pt cannot run code when resumed
            blob = load_weights_only(path)
        except CheckpointError as e:
            raise ClipDiffusionError(f"resume: {str(path)!r} is not a training state this version can read "
                                     f"safely ({e.reason}); start a new run in another folder") from None
        keys = {"models", "optimizers", "state", "rng", "torch_rng", "pool"}
        if not isinstance(blob, dict) or not keys <= set(blob):
            raise ClipDiffusionError(f"resume: {str(path)!r} is not a clipdiffusion training state (keys missing)")
        try:
            self._restore(blob)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # the file is left as it was
            raise ClipDiffusionError(f"resume: the training state in {str(path)!r} is malformed "
                                     f"({type(e).__name__}: {str(e)[:200]})") from None

    def _restore(self, blob):
        if blob["state"]["settings"]["model"] != self.settings.model:
            saved = blob["state"]["settings"]["model"]
            raise ClipDiffusionError(f"resume: the state in {str(self.out)!r} trains model {saved!r}, "
                                     f"not {self.settings.model!r}")  # fmt: skip
        for k, m in self.models.items():
            m.load_state_dict(blob["models"][k])  # copies into the parameters, wherever they live
        for k, o in self.optimizers.items():
            o.load_state_dict(blob["optimizers"][k])
        self.state = blob["state"]
        self.rng.bit_generator.state = blob["rng"]
        self.torch_rng.set_state(blob["torch_rng"])
        pool = blob["pool"]
        if pool is not None:  # scenes were saved as tuples (see _save)
            scenes = [Scene(bg, tuple(SceneObject(*o) for o in objects)) for bg, objects in pool["scenes"]]
            captions = list(pool.get("captions", []))  # states written before pooled captions have none
            if len(captions) != self.settings.pool_captions * len(scenes):
                raise ValueError(f"{len(captions)} pooled captions for {len(scenes)} scenes at pool_captions "
                                 f"{self.settings.pool_captions}")  # fmt: skip
            strategies = list(pool.get("strategies") or ["chunk"] * len(captions))  # older states: all chunked
            pool = {"scenes": scenes, "latents": pool["latents"], "captions": captions, "strategies": strategies,
                    "contexts": []}  # fmt: skip
            # in the pool phase's batches, so the contexts come out bit-identical to the ones the run had
            per_batch = POOL_BATCH * self.settings.pool_captions
            for start in range(0, len(pool["captions"]), per_batch or 1):
                end = start + (per_batch or 1)
                pool["contexts"] += self._encode(pool["captions"][start:end], pool["strategies"][start:end])
        self.pool = pool

    def _record(self, phase, **values):
        entry = {"phase": phase, "step": self.state["step"][phase], "seconds": round(self.state["seconds"][phase], 1)}
        entry.update({k: round(float(v), 5) for k, v in values.items()})
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
        self.log(" ".join(f"{k}={v}" for k, v in entry.items()))

    # ---- the loop -------------------------------------------------------------------------------------------

    def run(self, *, stop_after: int | None = None) -> Path | None:
        """Train until every phase has spent its budget (or ``max_steps``), then export. ``stop_after`` steps
        of this call, the state is saved and None returned, as if the process had been killed (tests)."""
        caps = self.settings.phase_steps or (None,) * len(PHASES)
        last_save, steps_here = time.monotonic(), 0
        while self.state["phase"] < len(PHASES):
            phase = PHASES[self.state["phase"]]
            finished = {p: self.state["seconds"][p] for p in PHASES[: self.state["phase"]]}
            budgets = self._budgets = phase_seconds(self.settings, finished)
            step_fn = getattr(self, f"_{phase}_step")
            done = False
            cap = min((c for c in (self.settings.max_steps, caps[self.state["phase"]]) if c is not None), default=None)
            self._caps[phase] = cap
            while not done and self.state["seconds"][phase] < budgets[phase]:
                if cap is not None and self.state["step"][phase] >= cap:
                    break
                if stop_after is not None and steps_here >= stop_after:
                    self._save()
                    return None
                steps_here += 1
                start = time.monotonic()
                try:
                    done = step_fn() is True
                except KeyboardInterrupt:
                    # keep the work done so far; the interrupted step is simply redone after --resume
                    self._save()
                    self.log(f"interrupted: state saved in {self.out / 'state.pt'}; continue with --resume")
                    raise
                self.state["seconds"][phase] += time.monotonic() - start
                self.state["step"][phase] += 1
                if time.monotonic() - last_save > self.settings.checkpoint_minutes * 60:
                    self._save()
                    last_save = time.monotonic()
            self._finish(phase)
            self.state["phase"] += 1
            self._save()
            last_save = time.monotonic()
        return self.export(self.out / "tiny-sd.safetensors")

    def _finish(self, phase):
        if phase == "vae" and self.settings.init_from is not None and not self.state["step"]["vae"]:
            self._record("vae", scale_factor=self.state["scale_factor"])  # kept from init_from
        elif phase == "vae":
            self.state["scale_factor"] = self._measure_scale_factor()
            self._record("vae", scale_factor=self.state["scale_factor"], judged_right=self._vae_round_trip())
        if phase == "pool":
            if self.pool is None:
                self._pool_step()  # a budget too small for even one batch still yields a (tiny) pool
            self._record("pool", size=len(self.pool["scenes"]))

    def _clip_step(self):
        s = self.settings
        step = self.state["step"]["clip"]
        scenes = self.scenes.draw(s.clip_batch)
        # captions fitting one window: the pooled EOS must see every object
        pairs = [described_pair(sc.spec(), self.rng, s.p_tags * 0.5, s.size_named) for sc in scenes]
        captions = [p for p, _, _ in pairs] + ([n for _, n, _ in pairs] if s.clip_hard_negatives else [])
        plans = [self.text_encoder.plan(c, long_prompt="truncate") for c in captions]
        ids = torch.tensor([p.windows[0].ids(self.text_encoder.encoders[0].pad_id) for p in plans])  # [T, 77]
        pixels = to_pixels([render(sc, self.config.image.canvas) for sc in scenes]).to(self.device)
        heads = self.models["heads"]
        encoded = self.models["text"](ids.to(self.device), pooled=True)
        text = F.normalize(heads.text_projection(encoded.pooled), dim=-1)  # [T, P]; T = B, or 2B with the twins
        image = F.normalize(heads.image(pixels), dim=-1)  # [B, P]
        logits = heads.logit_scale.clamp(max=math.log(100)).exp() * image @ text.T  # [B, T]
        labels = torch.arange(len(scenes), device=self.device)
        # image -> text over every caption, twins included; text -> image over the true captions only
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits[:, : len(scenes)].T, labels)) / 2
        readout = None
        if s.clip_readout:  # the true captions' final hidden states: the UNet's context for them
            targets = cell_targets([spec for _, _, spec in pairs]).to(self.device)  # [B, 9, 3]
            logits_per_cell = self.models["readout"](encoded.hidden[: len(scenes)])
            readout = sum(F.cross_entropy(lg.flatten(0, 1), targets[..., j].flatten())
                          for j, lg in enumerate(logits_per_cell))  # fmt: skip
            loss = loss + s.clip_readout * readout
        self._update("clip", loss, s.clip_lr)
        if step % s.log_every == 0:
            accuracy = (logits[:, : len(scenes)].argmax(1) == labels).float().mean()
            values = {"loss": loss.item(), "accuracy": accuracy.item()}
            if readout is not None:
                values["readout"] = readout.item()
            if s.clip_hard_negatives:  # share of images scoring their caption above its twin
                twin = logits.diagonal() > logits[:, len(scenes) :].diagonal()
                values["twin_accuracy"] = twin.float().mean().item()
            self._record("clip", **values)

    def _vae_step(self):
        s = self.settings
        vae = self.models["vae"]
        scenes = self.scenes.draw(s.vae_batch)
        pixels = to_pixels([render(sc, self.config.image.canvas) for sc in scenes]).to(self.device)
        posterior = vae.encode(pixels)
        decoded = vae.decode(posterior.sample(self.torch_rng))
        # Objects cover 2-20% of the canvas: unweighted, the flat background dominates the loss and the first
        # hundreds of steps learn only that. Object pixels (and their rims) weigh 10x.
        background = torch.tensor([BACKGROUNDS[sc.background] for sc in scenes], device=self.device)
        background = background.view(-1, 3, 1, 1) / 127.5 - 1
        weight = 1.0 + 9.0 * ((pixels - background).abs().amax(1, keepdim=True) > 0.02).float()  # [B, 1, H, W]
        error = decoded - pixels
        recon = (weight * (error.abs() + error**2)).mean() / weight.mean()
        kl = 0.5 * (posterior.mean**2 + posterior.std**2 - 1 - posterior.logvar).mean()
        loss = recon + 1e-6 * kl * posterior.mean[0].numel()  # LDM's kl_weight on a per-image KL sum
        self._update("vae", loss, s.vae_lr)
        if self.state["step"]["vae"] % s.log_every == 0:
            self._record("vae", loss=loss.item(), recon=recon.item(), kl=kl.item())

    @torch.no_grad()
    def _vae_round_trip(self, n: int = 32) -> float:
        """Share of fresh scenes whose VAE reconstruction the judge reads entirely right: the ceiling of every
        adherence number the finished model can reach."""
        from .judge import judge, verdict

        scenes = self.scenes.draw(n)
        vae = self.models["vae"]
        pixels = to_pixels([render(sc, self.config.image.canvas) for sc in scenes]).to(self.device)
        decoded = vae.decode(vae.encode(pixels).mean)
        images = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # [B,H,W,3]
        return float(np.mean([verdict(sc.spec(), judge(im)).success for sc, im in zip(scenes, images)]))

    @torch.no_grad()
    def _measure_scale_factor(self) -> float:
        pixels = to_pixels([render(sc, self.config.image.canvas) for sc in self.scenes.draw(128)]).to(self.device)
        return float(1.0 / self.models["vae"].encode(pixels).mean.std())

    @torch.no_grad()
    def _pool_step(self):
        s = self.settings
        if self.pool is None:
            self.pool = {"scenes": [], "latents": [], "captions": [], "strategies": [], "contexts": []}
        scenes = self.scenes.draw(min(POOL_BATCH, s.pool_size - len(self.pool["scenes"])))
        pixels = to_pixels([render(sc, self.config.image.canvas) for sc in scenes]).to(self.device)
        latents = self.models["vae"].encode(pixels).mean * self.state["scale_factor"]  # [b, 4, h, w]
        self.pool["scenes"] += scenes
        self.pool["latents"].append(latents.half().cpu())
        # scene i's captions are captions[i * pool_captions : (i + 1) * pool_captions]
        captions = [self._pool_caption(sc) for sc in scenes for _ in range(s.pool_captions)]
        strategies = ["chunk"] * len(captions)
        if s.window_share:
            tokenizer = self.text_encoder.tokenizer
            strategies = ["window" if len(tokenizer.encode(c)) > 75 and self.rng.random() < s.window_share else "chunk"
                          for c in captions]  # fmt: skip
        self.pool["captions"] += captions
        self.pool["strategies"] += strategies
        self.pool["contexts"] += self._encode(captions, strategies)
        return len(self.pool["scenes"]) >= s.pool_size

    def _pool_caption(self, scene) -> str:
        s = self.settings
        if s.deep_objects and self.rng.random() < s.deep_objects:
            return deep_caption(scene.spec(), self.rng, self.text_encoder.tokenizer, s.size_named)
        return loose_caption(scene.spec(), self.rng, s.p_tags, s.size_named)

    def _encode(self, captions, strategies=None) -> list:
        """captions -> their cross-attention contexts [T, D], fp16 on the CPU, in order (``strategies``: the
        long-prompt layout of each, chunk by default)."""
        contexts = [None] * len(captions)
        for members, context in ContextBuilder(self.text_encoder)(captions, strategies):
            for i, row in zip(members, context.half().cpu()):
                contexts[i] = row
        return contexts

    def _batch_contexts(self, index) -> list:
        """The UNet batch's contexts, grouped by length: [(members, context [b, T, D])]. Caption dropout (the
        empty prompt, also what the negative "" encodes to at inference) is drawn here."""
        s = self.settings
        drop = [self.rng.random() < s.caption_dropout for _ in index]
        if not s.pool_captions:  # run 3: a fresh caption every step
            captions = ["" if d else loose_caption(self.pool["scenes"][i].spec(), self.rng, s.p_tags, s.size_named)
                        for d, i in zip(drop, index)]  # fmt: skip
            return ContextBuilder(self.text_encoder)(captions)
        if self._empty is None:
            self._empty = self._encode([""])[0]
        picks = self.rng.integers(s.pool_captions, size=len(index))
        rows = [self._empty if d else self.pool["contexts"][i * s.pool_captions + k]
                for d, i, k in zip(drop, index, picks)]  # fmt: skip
        groups: dict = {}
        for j, row in enumerate(rows):
            groups.setdefault(row.shape[0], []).append(j)
        return [(members, torch.stack([rows[j].float() for j in members]).to(self.device))
                for _, members in sorted(groups.items())]  # fmt: skip

    def _unet_step(self):
        from ..diffusion.denoiser import sd_alphas_cumprod

        s = self.settings
        unet = self.models["unet"]
        if not isinstance(self.pool["latents"], torch.Tensor):
            self.pool["latents"] = torch.cat(self.pool["latents"])  # [N, 4, h, w]
        alphas = sd_alphas_cumprod().float()
        index = self.rng.integers(len(self.pool["scenes"]), size=s.unet_batch)
        groups = self._batch_contexts(index)
        x0 = self.pool["latents"][torch.from_numpy(index)].float()  # [B, 4, h, w]
        t = torch.randint(0, len(alphas), (s.unet_batch,), generator=self.torch_rng)
        noise = torch.randn(x0.shape, generator=self.torch_rng)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(self.device)
        snr = alphas[t] / (1 - alphas[t])
        weight = (snr.clamp(max=5.0) / snr).to(self.device)  # Min-SNR-gamma for eps prediction, gamma = 5
        noise, t = noise.to(self.device), t.to(self.device)
        loss = 0.0
        for members, context in groups:
            m = torch.tensor(members, device=self.device)
            eps = unet(xt[m], t[m], context)
            per_sample = ((eps - noise[m]) ** 2).mean(dim=(1, 2, 3))
            loss = loss + (weight[m] * per_sample).sum() / s.unet_batch
        self._update("unet", loss, s.unet_lr)
        step = self.state["step"]["unet"]
        decay = min(s.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(self.models["ema"].parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
        if step % s.log_every == 0:
            self._record("unet", loss=loss.item())

    def _decay(self, phase) -> float:
        """The cosine factor on ``phase``'s learning rate at its current progress (1 outside ``run``)."""
        floor = self.settings.lr_floor
        if floor is None or self._budgets is None:
            return 1.0
        # steps when capped (deterministic: resumed runs match), else the clock
        cap = self._caps.get(phase)
        progress = self.state["step"][phase] / cap if cap else self.state["seconds"][phase] / self._budgets[phase]
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def _update(self, phase, loss, base_lr):
        optimizer = self.optimizers[phase]
        for group in optimizer.param_groups:
            group["lr"] = _lr(self.state["step"][phase], base_lr, self.settings.warmup) * self._decay(phase)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
        optimizer.step()

    # ---- export ---------------------------------------------------------------------------------------------

    def pipeline(self, *, ema=True):
        """A ``Pipeline`` over the current weights (the EMA UNet by default)."""
        from ..diffusion.vae import AutoencoderKL
        from ..pipeline import Pipeline

        vae = self.models["vae"]
        if self.state["scale_factor"] is not None:
            vae = AutoencoderKL(dataclasses.replace(self.config.vae, scale_factor=self.state["scale_factor"]))
            vae.load_state_dict(self.models["vae"].state_dict())
        unet = self.models["ema" if ema else "unet"]
        vae.to(self.device)
        return Pipeline(self.text_encoder, unet.eval(), vae.eval(), "tiny", "eps", name="clipdiffusion-tiny",
                        default_size=self.config.image.canvas)  # fmt: skip

    def export(self, path) -> Path:
        from ..checkpoints.save import save_checkpoint

        meta = {"clipdiffusion.tiny.train_settings": json.dumps(self.state["settings"]),
                "clipdiffusion.tiny.steps": json.dumps(self.state["step"])}  # fmt: skip
        if self.state.get("base_run"):  # a fine-tuned model keeps the record of the run it started from
            meta["clipdiffusion.tiny.base_train_settings"], meta["clipdiffusion.tiny.base_steps"] = self.state["base_run"]
        path = save_checkpoint(self.pipeline(), path, meta, dtype=torch.float16)
        self.log(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
        self.export_heads(Path(path).with_name("tiny-clip-heads.safetensors"))
        return path

    def export_heads(self, path) -> Path:
        """The contrastive image tower, text projection and temperature (for the eval's tiny-CLIP score; not
        part of the SD checkpoint, and kept out of tiny/data, where exactly one .safetensors must live)."""
        from ..checkpoints.safetensors_io import save_file

        tensors = {k: v.detach().contiguous() for k, v in self.models["heads"].state_dict().items()}
        save_file(tensors, path, {"clipdiffusion.tiny.model": self.settings.model})
        return Path(path)
