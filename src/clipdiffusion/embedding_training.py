"""Textual inversion: learn new rows of the text encoder's token table (an n-vector "embedding") with every network
frozen, from captioned images.

The loss is the one the model was trained with: encode a training image to a latent (once, the VAE posterior's
mean and std kept; a fresh posterior sample each step), noise it at a uniformly drawn timestep (variance
preserving, the model's ``alphas_cumprod``), predict with the frozen UNet conditioned on the caption, where the
placeholder word is the ``n`` pseudo ids ``vocab_size .. vocab_size + n - 1`` (``CLIPTextModel``'s
``extra_embeddings``), and take the MSE against the noise (eps models) or the velocity (v models). Gradients reach
only the new vectors (one [n, D] table per text tower: SDXL learns CLIP-L's and bigG's rows together); the model's
parameters have ``requires_grad`` off during training and are bit-identical afterwards.

Initialisation as AUTOMATIC1111's "Create embedding": the init text's token rows, cycled to ``n`` vectors (zeros
for an empty init text). Optimiser: AdamW without weight decay (decay would pull the vectors' norms, which carry
meaning in CLIP's table, towards zero). Everything random (batches, posterior samples, timesteps, noise) comes from
one ``torch.Generator`` seeded by ``seed``, so a run is reproducible on the same machine and thread count.

Captions are plain text (no emphasis syntax), one CLIP window each (at most 75 tokens); the placeholder is the
embedding's name, matched as its token ids as a prompt's would be (``caption_tokens``). The file written is what A1111 and
kohya write and what ``Pipeline.load_textual_inversion`` reads: ``{"emb_params": [n, D]}`` for one tower,
``{"clip_l": [n, 768], "clip_g": [n, 1280]}`` for SDXL, plus string metadata (name, steps, init text, model).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field

import numpy as np

from .errors import ClipDiffusionError
from .values import show

NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
MAX_VECTORS = 75  # a caption is one CLIP window: the placeholder alone may fill it
MAX_STEPS = 1_000_000
MAX_BATCH = 256
MAX_EXAMPLES = 10_000
EMBEDDING_KEY = "emb_params"  # the one-tower key of A1111 / kohya embedding files


@dataclass(frozen=True)
class EmbeddingSettings:
    """What a run learns and how. ``time_limit`` (seconds, None = none) stops the loop cleanly between steps."""

    vectors: int = 2
    init_text: str = "*"
    steps: int = 400
    lr: float = 5e-3
    batch_size: int = 4
    seed: int = 0
    time_limit: float | None = None

    def __post_init__(self):
        def integer(name, value, low, high):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ClipDiffusionError(f"{name}: {show(value)} is not an integer in {low}..{high}")

        integer("vectors", self.vectors, 1, MAX_VECTORS)
        integer("steps", self.steps, 1, MAX_STEPS)
        integer("batch_size", self.batch_size, 1, MAX_BATCH)
        integer("seed", self.seed, 0, 2**63 - 1)
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not (0 < self.lr <= 1):
            raise ClipDiffusionError(f"lr: {show(self.lr)} is not a learning rate in (0, 1]")
        if self.time_limit is not None and (
            isinstance(self.time_limit, bool) or not isinstance(self.time_limit, (int, float))
            or not math.isfinite(self.time_limit) or self.time_limit <= 0
        ):
            raise ClipDiffusionError(f"time_limit: {show(self.time_limit)} is not a positive number of seconds")
        if not isinstance(self.init_text, str) or len(self.init_text) > 1000:
            raise ClipDiffusionError(f"init_text: {show(self.init_text)} is not a text of at most 1000 characters")


@dataclass(frozen=True)
class Example:
    """One training image (PIL, RGB) and its caption, which contains the embedding's name."""

    image: object
    caption: str
    source: str = ""  # where it came from (a file name), for error messages


@dataclass
class TrainedEmbedding:
    """The learned vectors, per tower name ([n, D] each), and how the run went."""

    name: str
    vectors: dict
    init_vectors: dict
    steps: int
    losses: list = field(default_factory=list)  # per step
    seconds: float = 0.0
    stopped: str = ""  # "" when all steps ran; "time limit" or "interrupted" otherwise
    settings: EmbeddingSettings | None = None

    def tensors(self, vectors=None) -> dict:
        """The file's tensors: ``{"emb_params": [n, D]}`` for one tower, ``{tower name: [n, D]}`` for several."""
        vectors = self.vectors if vectors is None else vectors
        if len(vectors) == 1:
            return {EMBEDDING_KEY: next(iter(vectors.values())).detach().float().contiguous()}
        return {k: v.detach().float().contiguous() for k, v in vectors.items()}


def check_name(name) -> str:
    """An embedding name is the word prompts use and the file's stem: a letter, then letters, digits, _ or -."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ClipDiffusionError(f"name: {show(name)} is not a valid embedding name (a letter, then up to 63 "
                                 "letters, digits, '_' or '-'; it is the word prompts use and the file's stem)")
    return name


def plain_tokenizer(tokenizer):
    """The CLIP tokenizer under an embedding-aware wrapper (``text.embeddings.EmbeddingTokenizer``): a caption's
    other words must be ordinary tokens, whatever embeddings the pipeline has loaded."""
    return getattr(tokenizer, "inner", tokenizer)


def caption_tokens(tokenizer, caption: str, name: str, vectors: int, vocab_size: int, *, source="caption") -> list:
    """The caption's token ids (no BOS/EOS) with every occurrence of the name's token ids replaced by the pseudo
    ids ``vocab_size .. vocab_size + vectors - 1``. The name is matched as A1111 and ``text.embeddings`` match it
    in a prompt: as the exact sequence of its token ids (so case-insensitively, and not inside a longer word).
    At most 75 ids: one CLIP window."""
    from .text.chunking import CHUNK_TOKENS

    tokenizer = plain_tokenizer(tokenizer)
    if not isinstance(caption, str):
        raise ClipDiffusionError(f"{source}: the caption must be text, got {type(caption).__name__}")
    text_ids, name_ids = tokenizer.encode(caption), tokenizer.encode(name)
    pseudo = list(range(vocab_size, vocab_size + vectors))
    ids: list = []
    i, found, k = 0, 0, len(name_ids)
    while i < len(text_ids):
        if text_ids[i:i + k] == name_ids:
            ids += pseudo
            i += k
            found += 1
        else:
            ids.append(text_ids[i])
            i += 1
    if not found:
        raise ClipDiffusionError(f"{source}: caption {caption!r} does not contain the embedding's name {name!r}")
    if len(ids) > CHUNK_TOKENS:
        raise ClipDiffusionError(f"{source}: caption {caption!r} is {len(ids)} tokens with the {vectors} embedding "
                                 f"vectors; a training caption must fit one CLIP window ({CHUNK_TOKENS} tokens)")
    return ids


def init_vectors(text_encoder, init_text: str, vectors: int) -> dict:
    """Per tower, ``vectors`` rows from the init text's token embeddings, cycled (zeros for an empty text)."""
    import torch

    ids = plain_tokenizer(text_encoder.tokenizer).encode(init_text) if init_text else []
    if len(ids) > MAX_VECTORS:
        raise ClipDiffusionError(f"init_text: {init_text!r} is {len(ids)} tokens; at most {MAX_VECTORS}")
    out = {}
    for spec in text_encoder.encoders:
        table = spec.model.embeddings.token_embedding.weight.detach()
        if ids:
            rows = table[torch.tensor([ids[i % len(ids)] for i in range(vectors)])]
        else:
            rows = table.new_zeros((vectors, table.shape[1]))
        out[spec.name] = rows.float().clone()
    return out


def _pixels(image, size: int):
    """PIL image -> [3, size, size] in [-1, 1]: RGB, centre-cropped to a square, resized (bicubic)."""
    import torch

    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    if (w, h) != (side, side):
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), resample=3)  # 3 = PIL.Image.BICUBIC
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # [H, W, 3]
    return torch.from_numpy(array).permute(2, 0, 1)


class EmbeddingTrainer:
    """Textual inversion on a ``Pipeline`` (any family: one tower or SDXL's two). ``run()`` returns a
    ``TrainedEmbedding``; ``log(step, loss, steps_per_second)`` is called every ``log_every`` steps."""

    def __init__(self, pipe, name: str, examples, settings: EmbeddingSettings = EmbeddingSettings(), *,
                 size: int | None = None, log=None, log_every: int = 25):
        self.pipe = pipe
        self.name = check_name(name)
        self.settings = settings
        examples = list(examples)
        if not examples:
            raise ClipDiffusionError("images: no training images")
        if len(examples) > MAX_EXAMPLES:
            raise ClipDiffusionError(f"images: {len(examples)} training images; at most {MAX_EXAMPLES}")
        self.examples = examples
        self.size = size or pipe.default_size
        f = pipe.latent_factor
        if self.size % f:
            raise ClipDiffusionError(f"size: {self.size} is not a multiple of {f} (this model's latent factor)")
        self.log = log
        self.log_every = log_every
        encoder = pipe.text_encoder
        vocab = {spec.model.config.vocab_size for spec in encoder.encoders}
        if len(vocab) != 1:
            raise ClipDiffusionError(f"text towers with different vocabularies ({sorted(vocab)}) are not supported")
        self.vocab_size = vocab.pop()
        self._latents_cache = None
        self.ids = [caption_tokens(encoder.tokenizer, e.caption, self.name, settings.vectors, self.vocab_size,
                                   source=e.source or "caption") for e in examples]  # fmt: skip

    # ---- pieces ------------------------------------------------------------------------------------------------

    def _latents(self):
        """Posterior mean and std [N, C, h, w] of every training image (frozen VAE, encoded once, in batches)."""
        import torch

        vae = self.pipe.vae
        device = self.pipe._device()
        means, stds = [], []
        with torch.no_grad():
            for start in range(0, len(self.examples), 16):
                chunk = self.examples[start:start + 16]
                pixels = torch.stack([_pixels(e.image, self.size) for e in chunk]).to(device)
                dtype = next(vae.parameters()).dtype
                posterior = vae.encode(pixels.to(dtype))
                means.append(posterior.mean.float())
                stds.append(posterior.std.float())
        mean, std = torch.cat(means), torch.cat(stds)
        if not bool(torch.isfinite(mean).all() and torch.isfinite(std).all()):
            from .errors import NonFiniteError

            raise NonFiniteError("VAE encode", detail="while encoding the training images")
        return mean, std

    def _window_ids(self, spec, rows):
        """[B, 77] ids for the chosen captions in one tower's layout (BOS, tokens, EOS, the tower's pad id)."""
        import torch

        from .text.chunking import Window

        return torch.tensor([Window(tuple(self.ids[i]), (1.0,) * len(self.ids[i])).ids(spec.pad_id) for i in rows],
                            dtype=torch.long)

    def _context(self, rows, params):
        """Cross-attention context [B, 77, D_total] (and SDXL's y) for the chosen captions, through the frozen
        towers at the family's default clip skip, gradients flowing into ``params`` (one per tower)."""
        import torch

        encoder = self.pipe.text_encoder
        device = self.pipe._device()
        hidden, pooled = [], None
        for index, (spec, vectors) in enumerate(zip(encoder.encoders, params)):
            want_pooled = encoder.record.pooled and index == len(encoder.encoders) - 1
            out = spec.model(self._window_ids(spec, rows).to(device),
                             clip_skip=spec.model_clip_skip(spec.default_clip_skip), final_norm=spec.final_norm,
                             pooled=want_pooled, extra_embeddings=vectors)  # fmt: skip
            hidden.append(out.hidden)
            if want_pooled:
                pooled = out.pooled
        context = torch.cat(hidden, dim=-1)
        y = None
        if self.pipe.unet.config.adm_in_channels is not None:
            from .diffusion.unet import sdxl_vector

            s = float(self.size)
            ids = torch.tensor([[s, s, 0.0, 0.0, s, s]], device=context.device).expand(len(rows), -1)
            y = sdxl_vector(pooled.float(), ids, self.pipe.unet.config.size_embed_dim)
        return context, y

    # ---- the loss and the loop --------------------------------------------------------------------------------

    def latents(self):
        """(mean, std) of the training images' posteriors, encoded once."""
        if self._latents_cache is None:
            self._latents_cache = self._latents()
        return self._latents_cache

    def parameters(self, vectors: dict | None = None) -> list:
        """Trainable copies (``nn.Parameter``, one per tower, in tower order) of ``vectors`` (default: the init
        vectors)."""
        import torch

        vectors = init_vectors(self.pipe.text_encoder, self.settings.init_text, self.settings.vectors) \
            if vectors is None else vectors
        device = self.pipe._device()
        return [torch.nn.Parameter(vectors[spec.name].detach().float().clone().to(device))
                for spec in self.pipe.text_encoder.encoders]  # fmt: skip

    def loss(self, params, rows, t, noise, latent_noise=None):
        """The denoising loss of captions/images ``rows`` at timesteps ``t`` [B] with ``noise`` [B, C, h, w];
        ``latent_noise`` draws from the posterior (None: its mean). Differentiable in ``params``."""
        import torch

        from .diffusion.denoiser import sd_alphas_cumprod

        pipe = self.pipe
        device = pipe._device()
        dtype = next(pipe.unet.parameters()).dtype
        mean, std = self.latents()
        x0 = mean[rows] if latent_noise is None else mean[rows] + std[rows] * latent_noise
        x0 = x0 * pipe.vae.config.scale_factor
        alphas = pipe.alphas_cumprod if pipe.alphas_cumprod is not None else sd_alphas_cumprod()
        a = torch.as_tensor(alphas, dtype=torch.float32)[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = noise if pipe.prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * x0
        context, y = self._context(list(rows), params)
        out = pipe.unet(xt.to(device, dtype), torch.as_tensor(t).to(device), context.to(dtype),
                        None if y is None else y.to(dtype))
        return torch.nn.functional.mse_loss(out.float(), target.to(device))

    def frozen(self):
        """A context manager: every module of the pipeline in eval mode with ``requires_grad`` off, restored on
        exit (the model's parameters are never written)."""
        return frozen(self.pipe)

    def run(self, *, should_stop=None) -> TrainedEmbedding:
        """Train for ``settings.steps`` steps (fewer when the time limit, ``should_stop()`` or Ctrl-C stops it)."""
        import torch

        s = self.settings
        start = time.perf_counter()
        initial = init_vectors(self.pipe.text_encoder, s.init_text, s.vectors)
        names = list(initial)
        params = self.parameters(initial)
        optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
        generator = torch.Generator().manual_seed(s.seed)
        n_timesteps = len(self.pipe.alphas_cumprod) if self.pipe.alphas_cumprod is not None else 1000
        losses, stopped, step = [], "", 0
        with self.frozen():
            try:
                mean, _ = self.latents()
                n = len(self.examples)
                last_log, last_time = 0, time.perf_counter()
                while step < s.steps:
                    if s.time_limit is not None and time.perf_counter() - start >= s.time_limit:
                        stopped = "time limit"
                        break
                    if should_stop is not None and should_stop():
                        stopped = "interrupted"
                        break
                    if s.batch_size <= n:
                        rows = torch.randperm(n, generator=generator)[: s.batch_size].tolist()
                    else:
                        rows = torch.randint(0, n, (s.batch_size,), generator=generator).tolist()
                    shape = (len(rows), *mean.shape[1:])
                    latent_noise = torch.randn(shape, generator=generator)
                    t = torch.randint(0, n_timesteps, (len(rows),), generator=generator)
                    noise = torch.randn(shape, generator=generator)
                    loss = self.loss(params, rows, t, noise, latent_noise)
                    if not bool(torch.isfinite(loss)):
                        from .errors import NonFiniteError

                        raise NonFiniteError("UNet", step=step + 1, total=s.steps, detail="training loss")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    step += 1
                    losses.append(float(loss.detach()))
                    if self.log is not None and (step % self.log_every == 0 or step == s.steps):
                        now = time.perf_counter()
                        rate = (step - last_log) / max(now - last_time, 1e-9)
                        self.log(step, float(np.mean(losses[last_log:])), rate)
                        last_log, last_time = step, now
            except KeyboardInterrupt:
                stopped = "interrupted"
        learned = {n: p.detach().cpu().float().clone() for n, p in zip(names, params)}
        return TrainedEmbedding(self.name, learned, initial, step, losses, time.perf_counter() - start, stopped, s)


def save_embedding(path, trained: TrainedEmbedding, *, model: str = "", family: str = "", vectors=None,
                   extra_metadata=None) -> None:
    """Write ``trained`` (or other ``vectors`` of the same towers, e.g. its init vectors) as an A1111/kohya
    embedding file (safetensors, written atomically) with string metadata."""
    from .checkpoints.safetensors_io import save_file

    s = trained.settings or EmbeddingSettings()
    metadata = {
        "name": trained.name,
        "step": str(trained.steps),
        "vectors": str(s.vectors),
        "init_text": s.init_text,
        "lr": repr(s.lr),
        "batch_size": str(s.batch_size),
        "seed": str(s.seed),
        "model": model,
        "family": family,
        "stopped": trained.stopped or "completed",
        "clipdiffusion.kind": "textual_inversion",
    }
    metadata.update({k: str(v) for k, v in (extra_metadata or {}).items()})
    save_file(trained.tensors(vectors), path, metadata=metadata)


def frozen(pipe):
    """A context manager: every network of ``pipe`` (text towers, UNet, VAE) in eval mode with ``requires_grad``
    off, both restored on exit. Used by every trainer that learns something beside a frozen model."""
    import contextlib

    modules = [spec.model for spec in pipe.text_encoder.encoders] + [pipe.unet, pipe.vae]

    @contextlib.contextmanager
    def manager():
        flags = [[p.requires_grad for p in m.parameters()] for m in modules]
        modes = [m.training for m in modules]
        try:
            for m in modules:
                m.eval()
                m.requires_grad_(False)
            yield
        finally:
            for m, f, mode in zip(modules, flags, modes):
                for p, flag in zip(m.parameters(), f):
                    p.requires_grad_(flag)
                m.train(mode)

    return manager()
