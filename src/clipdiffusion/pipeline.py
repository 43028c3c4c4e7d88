"""Text to image: one ``generate()`` that the CLI, the server and the Python API all call.

GenerationRequest -> prompt programs (``conditioning_schedule``: tags out, AND parts, prompt-editing schedules)
-> every distinct text through ``TextEncoder.encode_texts`` once -> ``ScheduledCFGDenoiser(Denoiser(unet))``, whose
conditioning follows the schedules call by call as A1111's does -> sampler over a noise schedule -> VAE decode ->
PIL images, each with its A1111 infotext (the prompt verbatim) and the generation's ``notes`` (tags not applied).
A plain prompt (no schedule, AND or tags) runs exactly as before those existed: the same encoder batch, the same
model calls. Attention maps, when asked for, come from ``attention_maps.AttentionCapture`` wrapped around the model
denoiser and given the rows of the tokens of the prompt's first text from its plan (tokenized once).

Seeds follow diffusers: image i of a batch draws its initial noise [1, C, h, w] on the CPU from
``torch.Generator().manual_seed(seed + i)`` (``randn_tensor`` with a list of generators), so seed s gives the same
noise as diffusers' ``generator=torch.Generator().manual_seed(s)``. The noise is then scaled by the schedule's
first sigma, which is diffusers' ``init_noise_sigma`` for its k-diffusion style schedulers (Euler with
"linspace"/"trailing" spacing). Its VP-space schedulers (DDIM, DPM-Solver) start from unit noise instead, i.e.
sqrt(sigma_max^2 + 1) in sigma units: 0.2 % more at sigma_max = 14.6. We follow k-diffusion and A1111.

Non-finite values (NaN/Inf from broken weights or fp16 overflow) are caught where they appear, as
``NonFiniteError`` naming the stage (text encoder, VAE encode, UNet at step N of M, sampler, VAE decode), instead
of turning into a black image. Loading does no scan of the weights; each check here is one ``isfinite().all()``
reduction over a stage's output (one per model call while sampling), and the checks only read tensors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .attention_maps import AttentionCapture, AttentionMaps
from .errors import ClipDiffusionError, NonFiniteError
from .families import ModelFamily, get_family
from . import fast_options
from .infotext import to_infotext
from .request import DEFAULTS, LIMITS, GenerationRequest, RequestError, as_request

# The engine's limits, stated once in request.LIMITS (a request is checked against them when it is built).
MAX_SIDE = LIMITS.max_width
MAX_PIXELS = LIMITS.max_pixels
MAX_STEPS = LIMITS.max_steps
MAX_BATCH = LIMITS.max_batch_size
SEED_LIMIT = LIMITS.seed_limit  # torch.Generator.manual_seed accepts [0, 2**64)
TINY_DATA = Path(__file__).parent / "tiny" / "data"


@dataclass
class GenerationResult:
    images: list  # PIL.Image.Image, one per batch item
    seeds: list
    infotexts: list
    attention: AttentionMaps | None = None  # for the first image of the batch, when asked for
    pixels: np.ndarray | None = None  # [B, H, W, 3] float32 in [0, 1] (diffusers' output_type="np")
    interrupted: bool = False
    notes: tuple = ()  # what the request asked that was not done, and why (an unapplied <lora:...> tag)
    latents: object = dataclasses.field(default=None, repr=False)  # [B,C,h,w] sampled latents (scaled), pre-decode

    @property
    def image(self):
        return self.images[0]


class Pipeline:
    """A loaded model: text encoder, UNet, VAE, family (a ``families`` name or record; ``family`` keeps the name,
    ``model_family`` the record), prediction ("eps" | "v"). ``default_size`` (the size when a request gives none)
    defaults to the family's native size for the prediction type; a checkpoint may state its own."""

    def __init__(self, text_encoder, unet, vae, family: str, prediction: str = "eps", *, name: str = "model",
                 default_size: int | None = None, alphas_cumprod=None):
        from .diffusion.denoiser import PREDICTIONS

        if prediction not in PREDICTIONS:
            raise ClipDiffusionError(f"prediction={prediction!r}: choose from {', '.join(PREDICTIONS)}")
        self.text_encoder = text_encoder
        self.unet = unet
        self.vae = vae
        record = get_family(family)
        self.family = record.name
        self.prediction = prediction
        self.name = name
        self.default_size = default_size or record.native_size_for(prediction)
        self.alphas_cumprod = alphas_cumprod
        self.placement = None  # a devices.Placement once placed (from_* with device/dtype, or place())

    # ---- construction ------------------------------------------------------------------------------------------

    @classmethod
    def _from_loaded(cls, loaded, name: str, prediction=None):
        return cls(loaded.text_encoder, loaded.unet, loaded.vae, loaded.family, prediction or loaded.prediction,
                   name=name, default_size=loaded.default_size)

    @classmethod
    def _load_placed(cls, loader, source, name, prediction, text_encoder, device, dtype, load_options, vae=None,
                     mmap=False, compile=False):  # fmt: skip
        """Load with ``loader`` and place the model (``devices.resolve(device, dtype, family=...)``). A placement
        that is one dtype the family cannot change loads straight onto the device in that dtype (cpu/fp32: as
        before placements existed); otherwise the stored weights load on the CPU and each component is cast and
        moved once the family is known. ``dtype=None`` keeps the stored dtypes (the loaders' own meaning).
        ``mmap`` is the loaders' (``load_checkpoint``): what stays mapped is said in the notes."""
        from . import devices

        if dtype is None:
            plan = devices.resolve(device, devices.DEFAULT_DTYPE)
            loaded = loader(source, dtype=None, device=plan.device, mmap=mmap, **load_options)
            pipe = cls._from_loaded(loaded, name, prediction)
        else:
            plan = devices.resolve(device, dtype)
            direct = plan.uniform and not devices.family_sensitive(plan)
            loaded = loader(source, dtype=plan.torch_dtype("unet") if direct else None,
                            device=plan.device if direct else "cpu", mmap=mmap, **load_options)  # fmt: skip
            pipe = cls._from_loaded(loaded, name, prediction)
            pipe.place(device, dtype)
        if text_encoder is not None:
            pipe.replace_text_encoder(text_encoder)  # in the placed tower's dtype and device
        if vae is not None:
            pipe.replace_vae(vae)  # in the placed VAE's dtype and device
        if mmap:
            pipe.__dict__["_mmap_notes"] = pipe._mapping_notes(source, loaded.copied_pickles)
        if compile:
            pipe.compile(compile)
        return pipe

    def _mapping_notes(self, source, copied=()) -> tuple:
        """What ``mmap=True`` did: how many weights are views of ``source``'s files (``/proc/self/maps``), and
        the pickles that were copied instead."""
        from .checkpoints.safetensors_io import mapped_tensors

        tensors = [t for module in (self.unet, self.vae, *(e.model for e in self.text_encoder.encoders))
                   for t in (*module.parameters(), *module.buffers())]  # fmt: skip
        found, label = mapped_tensors(tensors, source), Path(source).name
        if found is None:
            notes = [f"mmap: weights kept in their stored dtype on the CPU are views of {label}, not copies"]
        elif found[0]:
            notes = [f"mmap: {found[0]} of {len(tensors)} weight tensors ({found[1] / 2**30:.2f} GiB) are views of "
                     f"{label}, not copies: a file rewritten or truncated while loaded changes them or stops the "
                     f"process (SIGBUS)"]  # fmt: skip
        else:
            notes = ["mmap: no weight stayed mapped (each was cast or moved; only the stored dtype on the CPU maps)"]
        notes += [f"mmap: {Path(f).name} is a pickle; only .safetensors files are mapped, so its weights were copied"
                  for f in copied]  # fmt: skip
        return tuple(notes)

    @classmethod
    def from_file(cls, path, *, prediction: str | None = None, text_encoder=None, device="cpu", dtype="fp32",
                  vae=None, mmap: bool = False, compile=False, **load_options) -> "Pipeline":  # fmt: skip
        """A single-file checkpoint (.safetensors). ``prediction`` overrides what the loader detected;
        ``text_encoder`` (a file or folder) replaces its text tower (``replace_text_encoder``). ``device`` ("cpu",
        "cuda[:n]", "auto") and ``dtype`` ("fp32", "bf16", "fp16", "auto", or a torch dtype) place the model as
        ``place`` does (``devices.resolve``); the default is cpu/fp32. ``vae`` (a VAE file or folder) replaces
        its VAE (``replace_vae``). ``mmap=True`` keeps the weights that need no cast or device move as views of
        the ``.safetensors`` file (faster cold start, no second copy in memory; a pickle is copied, with a note):
        the file must then stay as it is while the model is loaded (truncated: SIGBUS; rewritten in place: other
        weights). Mapped pages count toward the process's RSS once touched. ``compile`` ("unet", "unet+vae", True
        = "unet") calls ``compile`` once loaded."""
        from .checkpoints.load import load_checkpoint

        return cls._load_placed(load_checkpoint, path, Path(path).stem, prediction, text_encoder, device, dtype,
                                load_options, vae=vae, mmap=mmap, compile=compile)  # fmt: skip

    @classmethod
    def from_pretrained(cls, folder, *, prediction: str | None = None, text_encoder=None, device="cpu",
                        dtype="fp32", vae=None, mmap: bool = False, compile=False,
                        **load_options) -> "Pipeline":  # fmt: skip
        """A diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/); ``text_encoder``,
        ``device``, ``dtype``, ``vae``, ``mmap`` and ``compile`` as in ``from_file``."""
        from .checkpoints.load import load_diffusers

        return cls._load_placed(load_diffusers, folder, Path(folder).name, prediction, text_encoder, device, dtype,
                                load_options, vae=vae, mmap=mmap, compile=compile)  # fmt: skip

    def place(self, device="auto", dtype="auto"):
        """Move the model to ``devices.resolve(device, dtype, family=<this family>)``: each component to the
        device in its own dtype (auto: fp16 on a GPU with the SDXL VAE in bf16; bf16 on a CPU with bf16 matrix
        units, text encoder fp32; else fp32). Returns the ``Placement`` (also ``self.placement``); generations
        name it in their notes unless it is plain cpu/fp32. Merged LoRAs stay merged (their float32 backups
        restore into any dtype)."""
        from .devices import place_modules, resolve

        placement = resolve(device, dtype, family=self.model_family)
        place_modules(placement, text_encoder=self.text_encoder, unet=self.unet, vae=self.vae)
        self.placement = placement
        return placement

    # ---- torch.compile (diffusion/compiled.py) ------------------------------------------------------------------

    def compile(self, targets="unet", *, backend: str = "inductor", mode=None) -> str:
        """Run the UNet's forward (``"unet"``, also ``True``), the VAE decoder (``"vae"``) or both (``"unet+vae"``)
        through ``torch.compile`` (inductor, static shapes); ``"off"``/``False`` goes back to eager. The first call
        of each shape compiles (minutes on a CPU for SD 1.5: an opt-in for long-running processes), later calls of
        that shape reuse the graph; a failed compilation runs eagerly with a note. Images equal the eager ones to
        float rounding (``tests/test_compile.py``). Returns the targets' name."""
        from .diffusion.compiled import check_targets

        targets = check_targets(targets)
        self.__dict__["_compile"] = (targets, backend, mode)
        self._apply_compile()
        return targets

    def _apply_compile(self) -> None:
        """(Re)route the current modules as ``compile`` asked (a replaced VAE is compiled too); idempotent."""
        from .diffusion.compiled import METHODS, TARGETS, compile_module, uncompile

        targets, backend, mode = self.__dict__.get("_compile", ("off", None, None))
        for name, method in METHODS.items():
            module = getattr(self, name)
            if name in TARGETS[targets]:
                compile_module(module, method, "UNet" if name == "unet" else "VAE decoder", backend=backend,
                               mode=mode)  # fmt: skip
            else:
                uncompile(module, method)

    def _compile_notes(self) -> tuple:
        from .diffusion.compiled import METHODS, TARGETS, compiled_call

        targets, backend, _ = self.__dict__.get("_compile", ("off", None, None))
        notes = []
        for name in TARGETS[targets]:
            call = compiled_call(getattr(self, name), METHODS[name])
            if call is not None and call.error is not None:
                notes.append(f"compile: the {call.label} runs eagerly: torch.compile failed ({call.error})")
            elif call is not None:
                notes.append(f"compile: the {call.label} runs through torch.compile ({backend}, static shapes)")
        return tuple(notes)

    def _placement_notes(self) -> tuple:
        placement = self.__dict__.get("placement")  # subclasses that skip __init__ (test stand-ins) have none
        if placement is None or (placement.is_default and placement.reason == "as asked"):
            return ()
        return (f"placement: {placement.describe()}; not in the infotext (A1111 has no key for it)",)

    # ---- the conditioning cache (text/cond_cache.py) ------------------------------------------------------------

    conditioning_cache = None  # a text.cond_cache.ConditioningCache: encoded prompts reused across generations

    def enable_conditioning_cache(self, max_entries: int | None = None, max_bytes: int | None = None, *,
                                  cache=None):
        """Reuse encoded prompts across generations (``text.cond_cache``): a hit gives bit-identical images; the key
        holds everything that changes the context (texts, clip skip, strategy, weighting, embeddings, the text
        encoder's weights and their in-place versions, the LoRAs applied to it). ``cache`` shares one (the
        server's); ``max_entries=0`` turns it off. Returns the cache (or None)."""
        from .text.cond_cache import DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES, ConditioningCache

        if cache is None and max_entries != 0:
            cache = ConditioningCache(DEFAULT_MAX_ENTRIES if max_entries is None else max_entries,
                                      DEFAULT_MAX_BYTES if max_bytes is None else max_bytes)
        self.conditioning_cache = cache
        return cache

    def _conditioning_encoder(self):
        """The text encoder as ``encode_request`` uses it: through the conditioning cache when one is on."""
        cache = self.__dict__.get("conditioning_cache")
        if cache is None:
            return self.text_encoder
        engine = self.__dict__.get("_lora_engine_state")
        applied = () if engine is None else tuple((a.name, a.te, a.dyn) for a, _ in engine.applied if a.te)
        hashes = tuple(getattr(e, "shorthash", None) for e in self.__dict__.get("_lora_entries") or ())
        return cache.encoder(self.text_encoder, extra=(applied, hashes))

    @classmethod
    def default(cls, **load_options) -> "Pipeline":
        """The embedded tiny model shipped in ``clipdiffusion/tiny/data``; ``device``/``dtype`` as in ``from_file``."""
        files = sorted(TINY_DATA.glob("*.safetensors")) if TINY_DATA.is_dir() else []
        if not files:
            raise ClipDiffusionError(
                f"the embedded tiny model is missing: no .safetensors file in {TINY_DATA}; train it with "
                "`clipdiffusion train-tiny` or pass a model (--model FILE|FOLDER)"
            )
        if len(files) > 1:
            raise ClipDiffusionError(f"the embedded tiny model is ambiguous: {', '.join(f.name for f in files)} "
                                     f"in {TINY_DATA}")
        pipe = cls.from_file(files[0], **load_options)
        pipe.name = "clipdiffusion-tiny"
        return pipe

    # ---- a replacement text tower (checkpoints/text_encoders.py) ----------------------------------------------

    def replace_text_encoder(self, source, *, name: str | None = None) -> None:
        """Use another text tower: a file or folder (``load_replacement_text_encoder``: a fine-tuned CLIP-L,
        Long-CLIP's ``longclip-L.pt`` or its transformers conversion, in any layout) or a ``TextEncoder`` of this
        family. Its width must be the UNet's cross-attention width; its position count (77, Long-CLIP's 248, ...)
        sets the prompt window (``TextEncoder.positions``). One-tower families only (SDXL is refused). LoRAs
        merged into the old tower are restored first; textual-inversion embeddings carry over (same width). The
        generation notes name the replacement (``text_encoder_name``); A1111's infotext has no key for it."""
        from .text.conditioning import TextEncoder

        context_width = self.unet.config.context_dim
        if isinstance(source, TextEncoder):
            if source.family != self.family:
                raise ClipDiffusionError(f"text_encoder: a {source.family} text encoder cannot replace the text "
                                         f"encoder of a {self.family} model")  # fmt: skip
            width = source.encoders[0].model.config.width
            if len(source.encoders) != 1 or width != context_width:
                raise ClipDiffusionError(f"text_encoder: width {width} does not fit this model's UNet, whose "
                                         f"cross-attention takes {context_width}-wide context")  # fmt: skip
            encoder, label = source, name or "TextEncoder"
        else:
            from .checkpoints.text_encoders import load_replacement_text_encoder

            weight = next(self.text_encoder.encoders[0].model.parameters())
            encoder = load_replacement_text_encoder(source, self.model_family, context_width=context_width,
                                                    dtype=weight.dtype, device=weight.device,
                                                    tokenizer=self.text_encoder.tokenizer)  # fmt: skip
            label = name or Path(source).name
        if self.__dict__.get("_lora_engine_state") is not None:
            self.apply_loras(())  # the old tower's weights back as they were; the engine forgets them
            self.__dict__.pop("_lora_engine_state", None)
        if hasattr(self.text_encoder, "embeddings") and hasattr(encoder, "embeddings"):
            encoder.embeddings = self.text_encoder.embeddings
        self.text_encoder = encoder
        self.text_encoder_name = label

    # ---- a separate VAE file (checkpoints/vae_files.py) --------------------------------------------------------

    def replace_vae(self, source, *, name: str | None = None) -> None:
        """Decode (and encode, for img2img) with another VAE: a file or folder (``vae_files.load_vae_file``: SD's
        ft-MSE VAE in LDM layout, with or without ``first_stage_model.``, ``.safetensors`` or a weights-only
        ``.ckpt``/``.pt``; a diffusers ``AutoencoderKL``; SDXL's VAE), checked against this model's VAE config and
        built in the current VAE's dtype and device, or an ``AutoencoderKL`` of the same structure. ``None``
        restores the checkpoint's own VAE, the very module it loaded (bit-exact). The model's scale factor is kept,
        as A1111 does. Generations record A1111's "VAE" (the file's base name) and "VAE hash" (first 10 hex of the
        file's SHA-256) in the infotext; their notes name the file."""
        own = self.__dict__.get("_own_vae")
        if source is None:
            if own is not None:
                current = next(iter(self.vae.parameters()), None)
                if current is not None:  # placed since the swap: follow the placement
                    own.to(device=current.device, dtype=current.dtype)
                self.vae = own
            for key in ("_own_vae", "vae_name", "vae_path", "_vae_file_notes"):
                self.__dict__.pop(key, None)
            return
        base = own if own is not None else self.vae
        config = base.config  # the model's: its structure and its scale factor
        from .diffusion.vae import AutoencoderKL

        if isinstance(source, AutoencoderKL):
            if {k: tuple(v.shape) for k, v in source.state_dict().items()} != \
                    {k: tuple(v.shape) for k, v in base.state_dict().items()}:
                raise ClipDiffusionError("vae: an AutoencoderKL of another structure than this model's VAE")
            if source.config.scale_factor != config.scale_factor:
                source.config = dataclasses.replace(source.config, scale_factor=config.scale_factor)
            vae, path, label, notes = source, None, name or "AutoencoderKL", ()
        else:
            from .checkpoints.vae_files import load_vae_file, vae_name

            weight = next(iter(self.vae.parameters()), None)
            loaded = load_vae_file(source, config, dtype=None if weight is None else weight.dtype,
                                   device="cpu" if weight is None else weight.device)  # fmt: skip
            vae, path, label, notes = loaded.vae, str(loaded.path), name or vae_name(source), loaded.notes
        self.__dict__["_own_vae"] = base
        self.vae = vae
        self.__dict__.update(vae_name=label, vae_path=path, _vae_file_notes=tuple(notes))

    @property
    def vae_hash(self) -> str | None:
        """A1111's "VAE hash" of the replacement VAE file (None for the model's own VAE or a module)."""
        path = self.__dict__.get("vae_path")
        if path is None:
            return None
        from .checkpoints.vae_files import vae_hash

        return vae_hash(path)

    def _vae_notes(self) -> tuple:
        label = self.__dict__.get("vae_name")
        if label is None:
            return ()
        return (f"VAE: {label} replaces the model's own",) + tuple(self.__dict__.get("_vae_file_notes", ()))

    def _text_encoder_notes(self) -> tuple:
        label = self.__dict__.get("text_encoder_name")
        if label is None:
            return ()
        positions = self.text_encoder.positions
        return (f"text encoder: {label} ({positions} positions, {positions - 2} tokens per window) replaces the "
                f"model's own (not recorded in the infotext: A1111 has no key for it)",)

    # ---- textual inversion (checkpoints/embeddings.py, text/embeddings.py) -------------------------------------

    def load_textual_inversion(self, path, name=None):
        """Load one embedding file (A1111 ``.pt``, ``.safetensors`` ``emb_params``, diffusers ``learned_embeds``
        ``.bin``/``.safetensors``, SDXL ``clip_l``+``clip_g``) under ``name`` (default: the file stem), checked
        against this model's text towers. Returns the registered ``text.embeddings.Embedding``; an embedding of
        the same name (or the same token ids) is replaced. Bad files raise ``CheckpointError`` naming the file."""
        from .checkpoints.embeddings import embedding_for

        embedding = embedding_for(path, self.text_encoder, name=name)
        self.text_encoder.add_embedding(embedding)
        return embedding

    def load_embeddings(self, folder):
        """(Re)load a folder of embeddings (``checkpoints.embeddings.load_folder``): the embeddings an earlier call
        loaded are dropped first, so this is also the refresh. Returns the ``FolderReport`` (loaded, skipped with
        reasons), kept as ``embeddings_report``."""
        from .checkpoints.embeddings import load_folder

        report = load_folder(folder, self.text_encoder)
        for name in self.__dict__.get("_folder_embeddings", ()):
            self.text_encoder.remove_embedding(name)
        for embedding in report.loaded:
            self.text_encoder.add_embedding(embedding)
        self.__dict__["_folder_embeddings"] = [e.name for e in report.loaded]
        self.__dict__["embeddings_report"] = report
        return report

    def embeddings_info(self) -> dict:
        """A1111's ``/sdapi/v1/embeddings`` body: every registered embedding under "loaded", and the files the
        last folder scan skipped (each with its "reason") under "skipped"."""
        report = self.__dict__.get("embeddings_report")
        loaded = {e.name: e.info() for e in self.text_encoder.embeddings.embeddings}
        return {"loaded": loaded, "skipped": dict(report.skipped) if report is not None else {}}

    # ---- LoRA (clipdiffusion.lora) -----------------------------------------------------------------------------

    @property
    def loras(self):
        """The ``lora.LoraLibrary`` of named LoRAs this pipeline can apply (a server shares one across models)."""
        library = self.__dict__.get("_lora_library")
        if library is None:
            from .lora import LoraLibrary

            library = self.__dict__["_lora_library"] = LoraLibrary()
        return library

    @loras.setter
    def loras(self, library):
        self.__dict__["_lora_library"] = library

    def _lora_engine(self):
        engine = self.__dict__.get("_lora_engine_state")
        if engine is None:
            from .lora import LoraEngine

            engine = self.__dict__["_lora_engine_state"] = LoraEngine()
        return engine

    def load_lora(self, path, name: str | None = None) -> str:
        """Register the LoRA file ``path`` under ``name`` (its stem by default) without applying it; the file is
        read and checked against this model now, so a bad file fails here. Returns the name."""
        entry = self.loras.add(path, name)
        self._lora_engine().mapped(self, self.loras.read(entry))
        return entry.name

    def load_loras(self, folder) -> list[str]:
        """Register every ``*.safetensors`` under ``folder`` by file stem (read on first use)."""
        return [e.name for e in self.loras.add_folder(folder)]

    def apply_loras(self, loras=(), *, missing: str = "error") -> list[str]:
        """Make ``loras`` (``lora.ActiveLora`` or ``(name, te, unet[, dyn])`` items) the LoRAs merged into the
        weights: the previous set is restored exactly first (``lora.LoraEngine``); ``()`` restores the model.
        An unknown name raises ``lora.LoraNotFound`` naming the available ones, or with ``missing="note"`` is
        skipped and reported as A1111 does ("Lora not found: NAME"). Returns the notes."""
        from .lora import MISSING, ActiveLora, LoraNotFound

        if missing not in MISSING:
            raise ClipDiffusionError(f"missing_loras={missing!r}: choose from {', '.join(MISSING)}")
        notes, wanted, entries = [], [], []
        for item in loras:
            active = item if isinstance(item, ActiveLora) else ActiveLora(*item)
            if active.te == 0 and active.unet == 0:
                continue
            try:
                entry = self.loras.get(active.name)
            except LoraNotFound:
                if missing == "error":
                    raise
                notes.append(f"Lora not found: {active.name}")
                continue
            wanted.append((active, self.loras.read(entry)))
            entries.append(entry)
        if wanted or self.__dict__.get("_lora_engine_state") is not None:
            self._lora_engine().apply(self, wanted)
        self.__dict__["_lora_entries"] = entries
        return notes

    def _lora_infotexts(self, infotexts) -> list:
        """The infotexts with A1111's ``Lora hashes: "name: 12-hex, ..."`` for the applied LoRAs."""
        entries = self.__dict__.get("_lora_entries") or []
        if not entries:
            return list(infotexts)
        hashes = ", ".join(dict.fromkeys(f"{e.name}: {e.shorthash}" for e in entries))
        return [f'{text}, Lora hashes: "{hashes}"' for text in infotexts]

    # ---- helpers -----------------------------------------------------------------------------------------------

    @property
    def model_family(self) -> ModelFamily:
        """The family's record (families.py): native size, clip-skip defaults and rules."""
        return get_family(self.family)

    @property
    def latent_factor(self) -> int:
        """Pixels per latent pixel: width and height must divide by this. (The UNet takes any latent size: its
        upsampling lands on each skip connection's size, as diffusers and A1111 do.)"""
        return self.vae.config.downsample_factor

    def _device(self):
        for p in self.unet.parameters():
            return p.device
        import torch

        return torch.device("cpu")

    def _size(self, request: GenerationRequest) -> GenerationRequest:
        """``request`` with its size filled in (the model's native size, or an init image's size rounded down to
        the latent factor) and checked against what this model needs: a multiple of its latent factor."""
        width, height = request.width, request.height
        f = self.latent_factor
        if request.init_image is not None and width is None and height is None:
            width, height = (max(f, s // f * f) for s in request.init_image.size)
        width = self.default_size if width is None else width
        height = self.default_size if height is None else height
        for name, value in (("width", width), ("height", height)):
            if value % f:
                raise RequestError(name, value, f"must be a multiple of {f} for this model (its VAE works on "
                                                f"{f}x{f}-pixel latents)")
        return request.replace(width=width, height=height)

    def _sdxl_vector(self, pooled, width, height, batch):
        """y [B,adm] for one text's pooled vector [1,P] (SDXL), None for a UNet without y."""
        import torch

        from .diffusion.unet import sdxl_vector

        if self.unet.config.adm_in_channels is None:
            return None
        if pooled is None:
            raise ClipDiffusionError(f"{self.family} text encoder gave no pooled vector, but the UNet needs y")
        # original size, crop top-left (0, 0), target size, each (h, w): diffusers' add_time_ids
        ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).expand(batch, -1)
        return sdxl_vector(pooled.float().expand(batch, -1), ids, self.unet.config.size_embed_dim)

    def _initial_latents(self, generators, sigmas, width, height, init_pixels, strength, device, *,
                         latent_upscale=False):
        """Starting latents [B,C,h,w] and the sigmas left to run. Each image's noise comes from its own CPU
        generator in diffusers' order: txt2img draws the noise; img2img the VAE posterior sample, then the noise,
        and runs the last int(steps * strength) steps (diffusers' get_timesteps, at least one).
        ``latent_upscale`` (resize_mode 3): the init image is encoded at its own size and its latents resized
        (bilinear) to the generation's, as A1111 does."""
        import torch

        f = self.vae.config.downsample_factor
        shape = (1, self.unet.config.out_channels, height // f, width // f)
        if init_pixels is None:
            noise = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(device)  # [B,C,h,w]
            return noise * sigmas[0], sigmas
        steps = len(sigmas) - 1
        run = min(max(int(steps * strength), 1), steps)
        sigmas = sigmas[steps - run:]
        with torch.no_grad():
            posterior = self.vae.encode(init_pixels.to(device))  # over [1,C,h,w]
        rows = []
        for g in generators:
            z = posterior.sample(g).float() * self.vae.config.scale_factor
            if latent_upscale and z.shape[-2:] != shape[-2:]:
                z = torch.nn.functional.interpolate(z, size=shape[-2:], mode="bilinear")
            rows.append(z + torch.randn(shape, generator=g).to(device) * sigmas[0])
        latents = torch.cat(rows)  # [B,C,h,w]
        _check_finite("VAE encode", latents)
        return latents, sigmas

    # A1111 blends the latents outside the mask at every step on 9-channel inpainting models too; diffusers'
    # StableDiffusionInpaintPipeline does not (False gives its behaviour, for parity checks).
    blend_inpainting_models = True

    def _inpaint_start(self, generators, sigmas, width, height, init, strength, device):
        """(latents, sigmas, init_latent, nmask, c_concat) for a masked generation or any generation on a
        9-channel UNet (``inpaint`` module doc). Per image, its generator draws in diffusers' inpainting order:
        the init image's posterior sample (img2img), the noise, then the masked image's posterior sample (9-channel
        models). ``init_latent`` (the clean init latents after ``inpainting_fill`` 2/3) and ``nmask`` (1 where
        repainted, on the latent grid) are None without a mask; ``c_concat`` is None for a 4-channel UNet."""
        import torch

        from .inpaint import conditioning_mask, conditioning_pixels, is_inpainting_unet, latent_mask, to_pixels

        f = self.vae.config.downsample_factor
        shape = (1, self.unet.config.out_channels, height // f, width // f)
        scale = self.vae.config.scale_factor
        nine = is_inpainting_unet(self.unet.config)
        posterior = masked_posterior = None
        with torch.no_grad():
            if init is not None:
                steps = len(sigmas) - 1
                run = min(max(int(steps * strength), 1), steps)
                sigmas = sigmas[steps - run:]
                posterior = self.vae.encode(to_pixels(init.image).to(device))
            if nine:
                masked, full_mask = conditioning_pixels(init, width, height)
                masked_posterior = self.vae.encode(masked.to(device))
        zs, noises, conds = [], [], []
        for g in generators:
            if posterior is not None:
                zs.append(posterior.sample(g).float() * scale)
            noises.append(torch.randn(shape, generator=g).to(device))
            if masked_posterior is not None:
                conds.append(masked_posterior.sample(g).float() * scale)
        noise = torch.cat(noises)  # [B,C,h,w]
        c_concat = None
        if nine:
            small = conditioning_mask(full_mask, *shape[-2:]).to(device)
            c_concat = torch.cat([small.expand(len(generators), -1, -1, -1), torch.cat(conds)], dim=1)
            _check_finite("VAE encode", c_concat)
        if posterior is None:
            return noise * sigmas[0], sigmas, None, None, c_concat
        z = torch.cat(zs)
        if z.shape[-2:] != shape[-2:]:  # resize_mode 3: the latents of the image at its own size, resized
            z = torch.nn.functional.interpolate(z, size=shape[-2:], mode="bilinear")
        nmask = None
        if init.mask is not None:
            nmask = latent_mask(init.mask, *shape[-2:]).to(device)
            if init.fill == 2:  # latent noise: the seed's noise (A1111 draws it from the same seed)
                z = z * (1 - nmask) + noise * nmask
            elif init.fill == 3:  # latent nothing
                z = z * (1 - nmask)
        _check_finite("VAE encode", z)
        return z + noise * sigmas[0], sigmas, z, nmask, c_concat

    @staticmethod
    def _image_pixels(init_image, width, height):
        """PIL image -> [1,3,H,W] in [-1,1], resized to width x height (diffusers' VaeImageProcessor)."""
        import torch

        image = init_image.convert("RGB")
        if image.size != (width, height):
            image = image.resize((width, height), resample=3)  # 3 = PIL.Image.BICUBIC
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0 * 2.0 - 1.0)  # [H,W,3]
        return pixels.permute(2, 0, 1)[None]  # [1,3,H,W]

    # ---- generation --------------------------------------------------------------------------------------------

    def generate(self, prompt, negative_prompt="", *, steps=20, guidance=7.0, seed=-1, sampler="euler",
                 schedule="normal", width=None, height=None, clip_skip=None, long_prompt="chunk", weighting="a1111",
                 batch_size=1, init_image=None, strength=0.75, attention_maps=False, loras=(), enable_hr=False,
                 hr_scale=2.0, hr_upscaler=None, hr_second_pass_steps=0, hr_resize_x=0, hr_resize_y=0, hr_prompt="",
                 hr_negative_prompt="", hr_sampler=None, hr_schedule=None, hr_strength=0.75, mask=None, mask_blur=4,
                 mask_blur_x=None, mask_blur_y=None, inpainting_fill=0, inpaint_full_res=True,
                 inpaint_full_res_padding=0, inpainting_mask_invert=0, resize_mode=0, callback=None,
                 should_stop=None, missing_loras="error", s_min_uncond=0.0, s_min_uncond_all=False,
                 skip_early_cond=0.0, deepcache_interval=0, token_merging_ratio=0.0) -> GenerationResult:
        """Run a ``GenerationRequest``: ``generate(request)``, or ``generate(prompt, ...)`` with the request's
        fields as keywords (they build one; see DEVELOPING.md for the contract). Bad values raise ``RequestError``
        naming the field, before any model work; fields the engine does not honour yet (``request.UNIMPLEMENTED``:
        styles) are refused the same way. ``enable_hr`` runs A1111's hires fix (``clipdiffusion.hires``:
        a first pass at width x height, an upscale, an img2img second pass at ``hr_strength``). A request with ``n_iter`` > 1 runs that
        many batches, seeds continuing across them; ``should_stop`` also ends the batches still to come.
        The prompt speaks A1111's language (``conditioning_schedule``): ``[a:b:when]``, ``[a|b]``, ``a AND b :w``
        follow A1111's per-call timeline; ``<lora:name:te:unet>`` tags of the prompt and the request's ``loras``
        are merged into the weights before anything is encoded (``apply_loras``; a request without any restores
        the model bit for bit), an unknown name raising ``lora.LoraNotFound`` or, with ``missing_loras="note"``
        (A1111's routes), noted as "Lora not found: NAME"; other tags are named in ``result.notes``. The infotext
        keeps the prompt as written.

        ``clip_skip`` counts like A1111 (1 = last layer, 2 = penultimate); None is the family's default (SD1 1,
        SD2/SDXL 2), and only a value other than that default is written to the infotext.
        Raises ``NonFiniteError`` (and returns no image) when a stage gives NaN/Inf: its ``stage`` is "text
        encoder", "VAE encode" (img2img), "UNet" (with ``step``, 1-based, of ``total`` sampler steps), "sampler"
        or "VAE decode". There is no load-time scan of the weights (``clipdiffusion info --check`` does that); the
        runtime stage checks cost one ``isfinite().all()`` reduction per model call and one per other stage.
        ``callback(step, total, latents)`` runs after each sampler step; ``should_stop()`` is polled before each
        step, and when it returns True the images are decoded from the latest denoised estimate
        (``result.interrupted``). img2img (``init_image``, a PIL image, resized to width x height; its size when
        those are None) samples the VAE posterior, noises it to the schedule's sigma at ``1 - strength`` and
        samples from there: the last ``int(steps * strength)`` steps run. Both draws come from the image's seed in
        diffusers' order, so StableDiffusionImg2ImgPipeline with the same seed starts from the same latents.
        ``mask`` (white = repaint) inpaints as A1111 does (``clipdiffusion.inpaint``: blur, invert, fill modes,
        "only masked" crop and paste-back, the latents outside the mask blended back at every model call, the
        original composited over the unmasked pixels); ``resize_mode`` 1-3 fit the init image as A1111's modes.
        A 9-channel inpainting UNet gets the mask and masked-image latents (a full mask and a grey image without
        a mask, txt2img included).
        """
        fast = dict(s_min_uncond=s_min_uncond, s_min_uncond_all=s_min_uncond_all, skip_early_cond=skip_early_cond,
                    deepcache_interval=deepcache_interval, token_merging_ratio=token_merging_ratio)  # issue 19
        request = as_request(prompt, negative_prompt, **fast, steps=steps, guidance=guidance, seed=seed, sampler=sampler,
                             schedule=schedule, width=width, height=height, clip_skip=clip_skip,
                             long_prompt=long_prompt, weighting=weighting, batch_size=batch_size,
                             init_image=init_image, strength=strength, attention_maps=attention_maps, loras=loras,
                             enable_hr=enable_hr, hr_scale=hr_scale, hr_upscaler=hr_upscaler,
                             hr_second_pass_steps=hr_second_pass_steps, hr_resize_x=hr_resize_x,
                             hr_resize_y=hr_resize_y, hr_prompt=hr_prompt, hr_negative_prompt=hr_negative_prompt,
                             hr_sampler=hr_sampler, hr_schedule=hr_schedule, hr_strength=hr_strength,
                             mask=mask, mask_blur=mask_blur, mask_blur_x=mask_blur_x, mask_blur_y=mask_blur_y,
                             inpainting_fill=inpainting_fill, inpaint_full_res=inpaint_full_res,
                             inpaint_full_res_padding=inpaint_full_res_padding,
                             inpainting_mask_invert=inpainting_mask_invert, resize_mode=resize_mode)
        request = request.require_honoured()
        for name, fn in (("callback", callback), ("should_stop", should_stop)):
            if fn is not None and not callable(fn):
                raise ClipDiffusionError(f"{name}: expected a callable, got {type(fn).__name__}")
        request = self._size(request).resolve_seed()
        from .conditioning_schedule import prompt_notes

        notes = prompt_notes(request)  # before any model work: a prompt the planner refuses fails here
        notes = self._placement_notes() + self._text_encoder_notes() + self._vae_notes() + notes
        notes = tuple(self.__dict__.get("_mmap_notes", ())) + notes
        if "_compile" in self.__dict__:
            self._apply_compile()
        from .lora import request_loras

        wanted, lora_notes = request_loras(request, missing=missing_loras)
        notes = notes + tuple(lora_notes) + tuple(self.apply_loras(wanted, missing=missing_loras))
        results = []
        for iteration in range(request.n_iter):
            if results and (results[-1].interrupted or (should_stop is not None and should_stop())):
                break
            one = request.for_iteration(iteration)
            if one.enable_hr:  # hires fix: two passes (clipdiffusion.hires)
                from . import hires

                results.append(hires.generate(self, one, callback, should_stop))
            else:
                results.append(self._generate(one, callback, should_stop))
        if "_compile" in self.__dict__:
            notes = notes + self._compile_notes()  # after the calls: a failed compilation is known by now
        if len(results) == 1:
            return dataclasses.replace(results[0], notes=notes + tuple(results[0].notes),
                                       infotexts=self._lora_infotexts(results[0].infotexts))
        return GenerationResult([im for r in results for im in r.images], [s for r in results for s in r.seeds],
                                self._lora_infotexts([t for r in results for t in r.infotexts]), results[0].attention,
                                np.concatenate([r.pixels for r in results]), any(r.interrupted for r in results),
                                notes + tuple(results[0].notes))

    def _generate(self, request: GenerationRequest, callback, should_stop, *, start=None) -> GenerationResult:
        """One batch of a sized request with a resolved seed. ``start(generators, sigmas) -> (latents, sigmas)``,
        when given, replaces the initial latents (hires fix's second pass starts from the upscaled first pass)."""
        import torch

        from .conditioning_schedule import encode_request
        from .diffusion.denoiser import Denoiser
        from .diffusion.samplers import get_sampler, get_schedule, sampler_sigmas
        from .text.conditioning import token_rows as plan_token_rows

        r = request
        sample = get_sampler(r.sampler)
        make_sigmas = get_schedule(r.schedule)
        width, height = r.width, r.height
        from .inpaint import is_inpainting_unet, prepare_init, to_pixels

        init = None if r.init_image is None else prepare_init(r, width, height)
        init_pixels = None if init is None else to_pixels(init.image)
        inpainting_unet = is_inpainting_unet(self.unet.config)
        seeds = [r.seed + i for i in range(r.batch_size)]

        B = r.batch_size
        scheduled = encode_request(self._conditioning_encoder(), r, batch=B, device=self._device(), check=_check_finite,
                                   y_for=lambda pooled: self._sdxl_vector(pooled, width, height, B))

        unet = self.unet
        if inpainting_unet:
            from .diffusion.unet import ConcatConditionedUNet

            unet = ConcatConditionedUNet(self.unet)  # its c_concat is drawn with the start latents below
        denoiser = model = Denoiser(unet, self.alphas_cumprod, self.prediction)
        denoiser.unet = fast_options.wrap_unet(denoiser.unet, r)  # DeepCache when deepcache_interval > 1
        capture, labels = None, []
        if r.attention_maps:
            # rows and labels from the plan the prompt's first text was encoded with: tokenized once
            token_rows = plan_token_rows(scheduled.first_plan)
            labels = [self.text_encoder.prompt_tokenizer.decode([token]).strip() for _, token in token_rows]
            f = self.vae.config.downsample_factor
            context = scheduled.conds[scheduled.first_text].context
            capture = AttentionCapture(denoiser, context, [row for row, _ in token_rows], (height // f, width // f))
            if token_rows:  # an empty prompt ("", "BREAK", ...) has no token rows: empty maps, nothing recorded
                model = capture
        cfg = scheduled.denoiser(model, r.guidance, **fast_options.denoiser_options(r))
        sigmas = sampler_sigmas(r.sampler, r.schedule, denoiser.sigmas, r.steps)  # DPM2: A1111's discarded sigma

        generators = [torch.Generator().manual_seed(s) for s in seeds]
        blend = None
        if start is None and (inpainting_unet or (init is not None and init.mask is not None)):
            from .inpaint import MaskBlend

            x, sigmas, init_latent, nmask, c_concat = self._inpaint_start(generators, sigmas, width, height, init,
                                                                          r.strength, self._device())
            if inpainting_unet:
                unet.c_concat = c_concat
            if nmask is not None and (not inpainting_unet or self.blend_inpainting_models):
                cfg = blend = MaskBlend(cfg, init_latent, nmask)
        elif start is None:
            x, sigmas = self._initial_latents(generators, sigmas, width, height, init_pixels, r.strength,
                                              self._device(), latent_upscale=init is not None and init.latent_upscale)
        else:
            x, sigmas = start(generators, sigmas)
            if inpainting_unet:  # hires fix's second pass on an inpainting model: a full mask, a grey image
                unet.c_concat = self._inpaint_start(generators, sigmas, width, height, None, 1.0, self._device())[4]

        stopped = []

        def stop():
            if should_stop is not None and should_stop():
                stopped.append(True)
                return True
            return False

        checked = _FiniteDenoiser(cfg, len(sigmas) - 1, callback)
        with torch.no_grad(), fast_options.token_merging(self.unet, r):
            latents = sample(checked, x, sigmas, generator=generators, callback=checked.callback, should_stop=stop)
            _check_finite("sampler", latents)
            if blend is not None:  # A1111 blends the sampled latents once more before decoding
                latents = blend.blend(latents)
            pixels = self.vae.decode(latents / self.vae.config.scale_factor).float()  # [B,3,H,W] in [-1,1]
            _check_finite("VAE decode", pixels)
        pixels = (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()  # [B,H,W,3]
        if init is not None and init.overlay is not None:  # the original composited back (A1111's overlay)
            from .inpaint import composite_pixels

            pixels = composite_pixels(pixels, init)
        images = [_to_pil(p) for p in pixels]

        attention = capture.result(labels) if capture is not None else None
        infotexts = self._infotexts(r, seeds)
        if init is not None and init.params:
            from .inpaint import infotext_params

            infotexts = [text + infotext_params(init) for text in infotexts]
        return GenerationResult(images, seeds, infotexts, attention, pixels, interrupted=bool(stopped),
                                notes=init.notes if init is not None else (), latents=latents)

    def _infotexts(self, request: GenerationRequest, seeds) -> list[str]:
        """Each image's A1111 infotext: its own seed, the batch size left out (each image is reproduced by its
        seed alone), and for txt2img no strength (unused)."""
        one = dataclasses.replace(request, batch_size=1)
        if one.init_image is None:
            one = dataclasses.replace(one, strength=DEFAULTS["strength"])
        default_skip = self.model_family.default_clip_skip
        vae = {"vae": self.__dict__.get("vae_name"), "vae_hash": self.vae_hash}
        return [to_infotext(one, seed=s, model=self.name, default_clip_skip=default_skip, **vae) for s in seeds]


def _nonfinite_detail(t) -> str:
    import torch

    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    return f"{nan} NaN, {inf} Inf of {t.numel()} values"


def _check_finite(stage, *tensors, step=None, total=None):
    """One reduction per tensor; raises NonFiniteError naming ``stage`` when any holds NaN or Inf."""
    import torch

    for t in tensors:
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(stage, step=step, total=total, detail=_nonfinite_detail(t))


class _FiniteDenoiser:
    """The CFG denoiser as the sampler sees it, checking each model call's output for NaN/Inf.

    ``callback`` (passed to the sampler) counts completed steps, so a failing call names its 1-based sampler step
    of ``total`` (Heun's second call within a step names that step), then forwards to the user's callback.
    """

    def __init__(self, denoiser, total: int, user_callback=None):
        self.denoiser = denoiser
        self.total = total
        self.step = 1
        self.user_callback = user_callback

    @property
    def sigmas(self):
        return self.denoiser.sigmas

    def __call__(self, x, sigma):
        out = self.denoiser(x, sigma)
        _check_finite("UNet", out, step=self.step, total=self.total)
        return out

    def callback(self, step, total, x):
        self.step = step + 1
        if self.user_callback is not None:
            self.user_callback(step, total, x)


def _to_pil(pixels: np.ndarray):
    from PIL import Image

    return Image.fromarray((pixels * 255).round().astype(np.uint8))  # diffusers' numpy_to_pil
