"""From prompt text to the UNet's cross-attention context: the ``Conditioning``.

``TextEncoder.encode`` parses the prompt (``prompt.py``), lays its tokens out in CLIP windows (``chunking.py``),
runs every window of the prompt, the negative prompt and (when needed) the empty prompt through each text encoder
in one batched call, applies the weighting, assembles the output rows, concatenates the encoders along channels
(SDXL) and makes the prompt and the negative prompt the same length.
"""

from dataclasses import dataclass, field

import torch

from ..errors import ClipDiffusionError
from ..families import get_family
from .chunking import (
    EMPTY_WINDOW,
    Plan,
    TokenReport,
    Window,
    check_prompt_text,
    check_strategy,
    plan_prompt,
    plan_stream,
)
from .embeddings import VOCAB_SIZE, Embedding, EmbeddingRegistry
from .weighting import WEIGHTINGS

DEFAULT_WINDOW_STRIDE = 60  # 15 tokens of overlap: the first tokens of a window see a phrase of context
DEFAULT_CHUNK_BACKTRACK = 20  # A1111's default "Prompt word wrap length limit"


@dataclass(frozen=True)
class EncoderSpec:
    """One text tower and how a family uses it.

    ``pad_id``: 49407 (EOS) for OpenAI CLIP-L, 0 for OpenCLIP H/bigG. ``final_norm``: apply final_layer_norm to the
    chosen layer (SD1, SD2: yes; SDXL: no). ``default_clip_skip``: the layer the family uses when the user gives no
    clip skip, in A1111 counting on the family's full tower (SD1: 1 = last; SD2 and SDXL: 2 = penultimate).
    ``removed_layers``: layers the stored tower lacks at its end (diffusers' SD2 ``text_encoder`` dropped the last
    of OpenCLIP-H's 24 layers: 1), so that clip skip n means the same layer whichever layout the weights came in.
    """

    name: str
    model: object  # clip.CLIPTextModel
    pad_id: int
    final_norm: bool
    default_clip_skip: int = 1
    removed_layers: int = 0

    @property
    def min_clip_skip(self) -> int:
        return 1 + self.removed_layers

    @property
    def max_clip_skip(self) -> int:
        return self.model.config.layers + self.removed_layers

    def model_clip_skip(self, clip_skip: int) -> int:
        """The clip skip to ask of the stored tower for the family-level ``clip_skip``."""
        return clip_skip - self.removed_layers


@dataclass(frozen=True)
class ConditioningReport:
    prompt: TokenReport
    negative_prompt: TokenReport
    notes: tuple = ()

    def to_dict(self) -> dict:
        return {"prompt": self.prompt.to_dict(), "negative_prompt": self.negative_prompt.to_dict(),
                "notes": list(self.notes)}


@dataclass
class Conditioning:
    """``context``/``negative_context`` [1, T, D]; ``pooled``/``negative_pooled`` [1, P] (SDXL) or None.

    ``context_lengths`` are the rows of (prompt, negative prompt) before equalisation; with ``equalize=True`` both
    contexts were padded to the longer one with encoded empty-prompt chunks. ``plan``/``negative_plan`` are the
    layouts (``chunking.Plan``) the contexts were assembled from: the prompt is planned once, and what needs to
    know which row holds which token (attention maps) reads it here (``token_rows``).
    """

    context: torch.Tensor
    negative_context: torch.Tensor
    pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None
    report: ConditioningReport | None = None
    context_lengths: tuple = field(default=())
    plan: Plan | None = None
    negative_plan: Plan | None = None

    def token_rows(self) -> list:
        """``(row, token id)`` of every ``context`` row that carries a prompt token, in row order; BOS, EOS,
        padding and empty-prompt rows are left out (an empty prompt has none)."""
        return token_rows(self.plan)

    def to_diffusers(self) -> dict:
        """Keyword arguments for a diffusers pipeline call (``pipe(**cond.to_diffusers(), ...)``)."""
        if self.context.shape != self.negative_context.shape:
            raise ClipDiffusionError(
                f"diffusers needs equal shapes: context {tuple(self.context.shape)} vs negative_context "
                f"{tuple(self.negative_context.shape)}; encode with equalize=True"
            )
        out = {"prompt_embeds": self.context, "negative_prompt_embeds": self.negative_context}
        if self.pooled is not None:
            out["pooled_prompt_embeds"] = self.pooled
            out["negative_pooled_prompt_embeds"] = self.negative_pooled
        return out


def token_rows(plan: Plan | None) -> list:
    """``(row, token id)`` of every row of a context assembled from ``plan`` that carries a prompt token."""
    if plan is None:
        return []
    rows = []
    for r, (w, p) in enumerate(plan.rows):
        if w != EMPTY_WINDOW and 1 <= p <= len(plan.windows[w].tokens):
            rows.append((r, plan.windows[w].tokens[p - 1]))
    return rows


@dataclass(frozen=True)
class EncodedText:
    """One text encoded alone: ``context`` [1, T, D], ``pooled`` [1, P] (SDXL) or None, and its ``plan``."""

    context: torch.Tensor
    pooled: torch.Tensor | None
    plan: Plan


@dataclass(frozen=True)
class EncodedTexts:
    """What ``TextEncoder.encode_texts`` gives: text -> ``EncodedText`` for the prompt texts and for the negative
    texts (a text in both is encoded once and appears in both, except SDXL's zeroed empty negative)."""

    prompts: dict
    negatives: dict
    notes: tuple = ()


def _check_choice(field_name, value, table):
    if value not in table:
        raise ClipDiffusionError(f"{field_name}={value!r} is not valid; choose one of: {', '.join(table)}")
    return value


class TextEncoder:
    """The text side of a Stable Diffusion family: one (SD1, SD2, tiny) or two (SDXL: CLIP-L, then bigG) towers."""

    def __init__(self, family, encoders, tokenizer=None, *, parse=None):
        record = get_family(family)  # a name or a families.ModelFamily; what the family does is read from it
        encoders = tuple(encoders)
        expected = len(record.towers)
        if len(encoders) != expected or not all(isinstance(e, EncoderSpec) for e in encoders):
            raise ClipDiffusionError(f"family {record.name!r} needs {expected} EncoderSpec(s), got {len(encoders)}")
        self.family = record.name
        self.record = record
        self.encoders = encoders
        self._tokenizer = tokenizer
        self._parse = parse
        # textual-inversion embeddings (text/embeddings.py); replaced, never mutated, so a plan keeps its snapshot
        self.embeddings = EmbeddingRegistry()

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .tokenizer import CLIPTokenizer

            self._tokenizer = CLIPTokenizer()
        return self._tokenizer

    @property
    def prompt_tokenizer(self):
        """The tokenizer prompts are planned with: ``tokenizer`` plus the registered embeddings' names."""
        return self.embeddings.wrap(self.tokenizer)

    def add_embedding(self, embedding: Embedding):
        """Register a textual-inversion embedding (``embedding.tensors``: one ``[vectors, width]`` tensor per
        tower, in tower order). Returns the name it replaced (same name, or a name with the same token ids), or
        None. Shapes and values are checked here against the towers."""
        tensors = tuple(embedding.tensors)
        where = embedding.source or embedding.name
        if len(tensors) != len(self.encoders):
            towers = ", ".join(f"{e.name} ({e.model.config.width})" for e in self.encoders)
            raise ClipDiffusionError(f"embedding {where}: has {len(tensors)} tensor(s) but this {self.family} model "
                                     f"has {len(self.encoders)} text tower(s): {towers}")
        checked = []
        for spec, t in zip(self.encoders, tensors):
            width = spec.model.config.width
            if not torch.is_tensor(t) or t.dim() != 2 or t.shape[0] != embedding.vectors or t.shape[1] != width:
                got = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
                raise ClipDiffusionError(f"embedding {where}: the {spec.name} tensor is {got}, but this model's "
                                         f"{spec.name} tower needs [{embedding.vectors}, {width}]")
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise ClipDiffusionError(f"embedding {where}: the {spec.name} vectors are not finite floats")
            checked.append(t.detach())
        import dataclasses

        embedding = dataclasses.replace(embedding, tensors=tuple(checked),
                                        widths=tuple(e.model.config.width for e in self.encoders))
        self.embeddings, replaced = self.embeddings.with_embedding(embedding, self.tokenizer)
        return replaced

    def remove_embedding(self, name: str) -> None:
        self.embeddings = self.embeddings.without(name)

    def clear_embeddings(self) -> None:
        self.embeddings = EmbeddingRegistry()

    def parse(self, text):
        if self._parse is None:
            from .prompt import parse_prompt

            self._parse = parse_prompt
        return self._parse(text)

    @property
    def max_clip_skip(self) -> int:
        return min(e.max_clip_skip for e in self.encoders)

    @property
    def min_clip_skip(self) -> int:
        return max(e.min_clip_skip for e in self.encoders)

    @property
    def default_clip_skip(self) -> int:
        return self.encoders[0].default_clip_skip

    @property
    def positions(self) -> int:
        """The window length prompts are planned in: the towers' position count (CLIP 77; a Long-CLIP tower 248,
        whose windows then hold 246 tokens). ``stretch`` uses ``max(positions, 248)``."""
        return min(e.model.config.max_positions for e in self.encoders)

    def to(self, device=None, dtype=None) -> "TextEncoder":
        for spec in self.encoders:
            spec.model.to(device=device, dtype=dtype)
        return self

    def plan(self, prompt, long_prompt="chunk", weighting="a1111", *, chunk_backtrack=DEFAULT_CHUNK_BACKTRACK,
             window_stride=DEFAULT_WINDOW_STRIDE, field_name="prompt", embeddings=None):
        """Parse and lay out one prompt (no torch work): the :class:`chunking.Plan` that ``encode`` would use.
        ``embeddings``: the registry snapshot to plan with (default: the current one)."""
        tokenizer = (self.embeddings if embeddings is None else embeddings).wrap(self.tokenizer)
        check_prompt_text(field_name, prompt)
        _check_choice("weighting", weighting, WEIGHTINGS)
        if weighting == "none":
            # A1111's emphasis "None": no emphasis syntax at all, the prompt is one segment of weight 1, so brackets,
            # (x:1.2) and BREAK are literal text (as `clipdiffusion tokens --no-weights` shows them)
            segments = [(prompt, 1.0)]
        else:
            segments = self.parse(prompt)
        if weighting == "ignore":
            # A1111's "Ignore": brackets are parsed away, their weights ignored; BREAK keeps its marker weight
            segments = [(t, w if (t == "BREAK" and w == -1.0) else 1.0) for t, w in segments]
        judge = None
        if long_prompt == "summarize":  # the text encoder itself ranks the segments (torch work)
            judge = SummaryJudge(self, tokenizer, weighting, self.embeddings if embeddings is None else embeddings,
                                 chunk_backtrack)
        return plan_prompt(segments, tokenizer, long_prompt, backtrack=chunk_backtrack, stride=window_stride,
                           positions=self.positions, judge=judge)

    def _layer_skips(self, clip_skip) -> list:
        """Per tower, the clip skip to run it at (``None``: each tower's family default)."""
        if clip_skip is None:
            return [e.model_clip_skip(e.default_clip_skip) for e in self.encoders]
        low, top = self.min_clip_skip, self.max_clip_skip
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not low <= clip_skip <= top:
            raise ClipDiffusionError(
                f"clip_skip={clip_skip!r} is out of range: this {self.family} text encoder accepts {low}..{top} "
                f"(1 = last layer, 2 = penultimate; default {self.default_clip_skip})"
            )
        return [e.model_clip_skip(clip_skip) for e in self.encoders]

    def encode(self, prompt, negative_prompt="", clip_skip=None, long_prompt="chunk", weighting="a1111", *,
               chunk_backtrack=DEFAULT_CHUNK_BACKTRACK, window_stride=DEFAULT_WINDOW_STRIDE, equalize=True):
        """Encode a prompt and its negative to a :class:`Conditioning`.

        ``clip_skip`` counts like AUTOMATIC1111 and stable-diffusion.cpp: 1 = the last layer, 2 = the penultimate,
        n = ``hidden_states[-n]`` of the family's full tower; ``None`` = the family's default (SD1: 1; SD2, SDXL: 2,
        the layer they were trained on). The same value applies to the negative prompt (diffusers'
        ``encode_prompt`` forgets it there), and the layers after the chosen one are never computed:

        ======  ======================  ========  ====================================  =============
        family  default (``None``)      final LN  diffusers ``clip_skip``               ComfyUI layer
        ======  ======================  ========  ====================================  =============
        sd1     1 (last layer)          yes       n-1 (``None`` for 1)                  -n
        sd2     2 (penultimate)         yes       n-2 (its HF tower has 23 layers)      -n
        sdxl    2 (penultimate), both   no        n-2 (``None`` for 2)                  -n
        ======  ======================  ========  ====================================  =============

        A1111 differs on SD2, where it ignores the slider (always penultimate), and on SDXL, where it moves only
        CLIP-L and only with its ``sdxl_clip_l_skip`` option; ComfyUI (``CLIPSetLastLayer(-n)``) and
        stable-diffusion.cpp (``--clip-skip n``) move both SDXL towers as we do. The SDXL pooled vector always
        comes from bigG's last layer (final LN, projection) at the first EOS of the **first** window, unweighted.

        ``long_prompt``: ``truncate | chunk | window | stretch`` (``chunking.py``). ``weighting``: ``a1111`` (z*w,
        mean restored per window and encoder), ``comfy`` (lerp from the empty prompt's encoding), ``none``
        (A1111's emphasis "None": no emphasis syntax, brackets and BREAK are literal text), ``ignore`` (A1111's
        "Ignore": the syntax is parsed, the weights dropped, BREAK still splits).

        Equal lengths: with ``equalize=True`` the shorter of prompt and negative is padded with whole encoded
        empty-prompt chunks (A1111's "Pad prompt/negative prompt" option). A1111's default instead runs cond and
        uncond as separate UNet calls, which is exact; ``context_lengths`` keeps the unpadded lengths so a sampler
        can do that (``equalize=False`` leaves the contexts unpadded).

        SDXL with ``negative_prompt == ""`` (exactly): negative context and pooled are zeros, as A1111 and sgm
        (``force_zero_embeddings``) do; padding such a negative uses zero rows too, which is exact because a
        context of zero rows gives the same cross-attention output at any length (SD's to_k/to_v have no bias).
        """
        options = {"chunk_backtrack": chunk_backtrack, "window_stride": window_stride}
        encoded, empty_rows = self._encode_texts([prompt], [negative_prompt], clip_skip, long_prompt, weighting,
                                                 options, pad=equalize)
        pos, neg = encoded.prompts[prompt], encoded.negatives[negative_prompt]
        context, negative_context = pos.context, neg.context
        lengths = (len(pos.plan.rows), len(neg.plan.rows))
        notes = list(encoded.notes)
        if equalize and lengths[0] != lengths[1]:
            zero_negative = self.record.zero_empty_negative and negative_prompt == ""
            context, negative_context, note = _equalize(context, negative_context, empty_rows, zero_negative)
            notes.append(note)
        report = ConditioningReport(pos.plan.report, neg.plan.report, tuple(notes))
        return Conditioning(context, negative_context, pos.pooled, neg.pooled, report, lengths, plan=pos.plan,
                            negative_plan=neg.plan)

    def encode_texts(self, texts, negative_texts=(), clip_skip=None, long_prompt="chunk", weighting="a1111", *,
                     chunk_backtrack=DEFAULT_CHUNK_BACKTRACK, window_stride=DEFAULT_WINDOW_STRIDE) -> EncodedTexts:
        """Encode every distinct text of a prompt's schedule(s) and of the negative prompt's schedule, each exactly
        once, in one batched call per tower (``encode`` is this for one prompt and one negative, plus padding).
        Each text's context is its own, unpadded (texts of different lengths run as separate model calls). Each
        window's emphasis mean is restored on its own; A1111 takes the mean over the batch of one prompt's schedule
        texts, which couples them (frontends doc 1.6); we do not.

        SDXL: when the negative texts are just ``""`` (exactly), the negative is zeros as in ``encode`` (A1111
        zeroes a negative whose whole schedule is empty); otherwise ``""`` is encoded.
        """
        options = {"chunk_backtrack": chunk_backtrack, "window_stride": window_stride}
        return self._encode_texts(texts, negative_texts, clip_skip, long_prompt, weighting, options)[0]

    def _encode_texts(self, texts, negative_texts, clip_skip, long_prompt, weighting, options, pad=False):
        """``encode_texts``, and the empty prompt's rows [1, P, D] when ``pad`` needs them to equalise lengths."""
        texts, negative_texts = list(dict.fromkeys(texts)), list(dict.fromkeys(negative_texts))
        for name, group in (("prompt", texts), ("negative_prompt", negative_texts)):
            for text in group:
                check_prompt_text(name, text)
        check_strategy(long_prompt)
        _check_choice("weighting", weighting, WEIGHTINGS)
        skips = self._layer_skips(clip_skip)
        zero_negative = self.record.zero_empty_negative and negative_texts == [""]
        registry = self.embeddings  # one snapshot for planning and the extra tables
        plans = {t: self.plan(t, long_prompt, weighting, embeddings=registry, **options) for t in texts}
        for t in negative_texts:
            if t not in plans:
                plans[t] = self.plan(t, long_prompt, weighting, field_name="negative_prompt", embeddings=registry,
                                     **options)
        encoded = [t for t in plans if t in texts or not zero_negative]
        order = [plans[t] for t in encoded]
        longest = max((len(p.rows) for p in plans.values()), default=0)
        need_empty = (
            any(p.uses_empty_window for p in order)
            or (weighting == "comfy" and any(w != 1.0 for p in order for win in p.windows for w in win.weights))
            or (pad and any(len(p.rows) < longest for p in order))
        )
        contexts, empty_rows, pooled = self._encode_plans(order, skips, weighting, need_empty, registry)
        done = {t: EncodedText(c, None if pooled is None else pooled[i:i + 1], plans[t])
                for i, (t, c) in enumerate(zip(encoded, contexts))}
        negatives, notes = {}, []
        for t in negative_texts:
            if zero_negative:
                negatives[t] = EncodedText(contexts[0].new_zeros((1, len(plans[t].rows), contexts[0].shape[-1])),
                                           None if pooled is None else torch.zeros_like(pooled[0:1]), plans[t])
                notes.append("negative_prompt is empty: SDXL negative context and pooled are zeros (A1111/sgm)")
            else:
                negatives[t] = done[t]
        return EncodedTexts({t: done[t] for t in texts}, negatives, tuple(notes)), empty_rows

    def _encode_plans(self, plans, skips, weighting, need_empty, registry=None):
        """Every window of every plan (and the empty prompt when needed) through each tower in one batch, weighted
        and assembled: contexts [1, T, D_total] per plan, the empty prompt's rows [1, P, D_total] | None, and the
        pooled vectors of each plan's first window [len(plans), P'] (SDXL) | None."""
        positions = plans[0].positions
        windows = [w for p in plans for w in p.windows] + ([Window((), (), positions)] if need_empty else [])
        firsts = [sum(len(p.windows) for p in plans[:k]) for k in range(len(plans))]
        # a window's hidden states depend on its tokens only (weights apply afterwards): each distinct token
        # sequence goes through the tower once (repeated chunks, a prompt equal to its negative, the summarize
        # judge's encoding of the prompt when it equals the chunk plan)
        slot, unique = [], {}
        for w in windows:
            slot.append(unique.setdefault((w.tokens, w.positions), len(unique)))
        distinct = [Window(tokens, (), p) for tokens, p in unique]
        gather = torch.tensor(slot)
        per_tower, empties, pooled = [], [], None
        for index, (spec, skip) in enumerate(zip(self.encoders, skips)):
            want_pooled = self.record.pooled and index == len(self.encoders) - 1  # SDXL: bigG
            out = self._run(spec, skip, distinct, positions, want_pooled, registry, index)
            hidden = out.hidden if len(distinct) == len(windows) else out.hidden[gather]
            empty = hidden[-1] if need_empty else None  # (P, D)
            tower = []
            for first, plan in zip(firsts, plans):
                z = hidden[first:first + len(plan.windows)]  # (N, P, D)
                weights = torch.tensor([w.position_weights() for w in plan.windows], dtype=z.dtype, device=z.device)
                tower.append(_assemble(WEIGHTINGS[weighting](z, weights, empty), empty, plan.rows))
            per_tower.append(tower)
            empties.append(empty)
            if want_pooled:
                pooled = out.pooled[gather[firsts]]  # (len(plans), P')
        contexts = [torch.cat(parts, dim=-1) for parts in zip(*per_tower)]  # SDXL: (1, T, 768 + 1280)
        empty_rows = torch.cat(empties, dim=-1)[None] if need_empty else None  # (1, P, D_total)
        return contexts, empty_rows, pooled

    def _run(self, spec, clip_skip, windows, positions, pooled, registry=None, tower=0):
        """All windows through one tower in a single batch: hidden [N, P, D] and pooled [N, P'] | None.

        ``stretch`` stretches the learned 77-row position table; a tower that already has 248 positions (a
        converted Long-CLIP, ``max_position_embeddings: 248``) uses its own table."""
        model = spec.model
        table = None
        if positions > model.config.max_positions:  # stretch on a tower shorter than its window
            from .clip import stretch_position_embedding

            table = stretch_position_embedding(model.embeddings.position_embedding.weight.detach())[:positions]
            if table.shape[0] < positions:
                raise ClipDiffusionError(f"long_prompt='stretch' needs {positions} positions; the {spec.name} "
                                         f"tower's {model.config.max_positions} stretch to {table.shape[0]} only")
        ids = torch.tensor([w.ids(spec.pad_id) for w in windows], dtype=torch.long)  # (N, P)
        extra = None
        if registry and bool((ids >= VOCAB_SIZE).any()):
            extra = _extra_table(registry, tower, model)
            if model.config.vocab_size != VOCAB_SIZE:  # pseudo ids follow the model's own vocabulary
                ids = torch.where(ids >= VOCAB_SIZE, ids - VOCAB_SIZE + model.config.vocab_size, ids)
        with torch.no_grad():
            return model(ids, clip_skip=clip_skip, final_norm=spec.final_norm, pooled=pooled,
                         position_embedding=table, extra_embeddings=extra)


class SummaryJudge:
    """The ``summarize`` strategy's judge (``text/summarize.py``) backed by the text encoder.

    The prompt (the segments still in the running) is encoded once, chunked as A1111 does (the default clip skip,
    the request's weighting, all towers concatenated). Its *encoding vector* is the mean of its content rows (no BOS,
    EOS or padding). A segment's importance is ``1 - cos`` between that vector and the mean of the other segments'
    rows: how much removing the segment's rows changes the prompt's encoding. The rows come from the one encoding,
    in context, so a segment's score does not depend on where the chunk boundaries would fall without it.

    (An earlier judge re-encoded each leave-one-out text. Removing a segment then moved every later chunk boundary,
    and that shift, not the segment's content, set the score: on the tiny model every 3-token style tag scored
    ~100x a 2-token one, and 2-4% of object phrases were dropped at 60-120 tokens of tags.)
    Near-duplicates are the lexical rule of ``text/summarize.py``. ``passes`` counts the windows encoded."""

    def __init__(self, encoder, tokenizer, weighting, registry, backtrack=DEFAULT_CHUNK_BACKTRACK):
        self.encoder, self.tokenizer, self.weighting = encoder, tokenizer, weighting
        self.registry, self.backtrack = registry, backtrack
        self.rule = "encoder (1 - cosine between the prompt's encoding with and without the segment's rows)"
        self.passes = 0  # windows encoded, for the cost report

    def content_rows(self, stream) -> torch.Tensor:
        """[len(stream), D_total]: the row of each ``(id, weight)`` pair of ``stream`` in its chunked encoding."""
        plan = plan_stream(stream, self.tokenizer, "chunk", backtrack=self.backtrack,
                           positions=self.encoder.positions)
        skips = self.encoder._layer_skips(None)
        contexts, _, _ = self.encoder._encode_plans([plan], skips, self.weighting, plan.uses_empty_window,
                                                    self.registry)
        self.passes += len({(w.tokens, w.positions) for w in plan.windows}) + plan.uses_empty_window
        rows = [r for r, (w, pos) in enumerate(plan.rows) if w >= 0 and 1 <= pos <= len(plan.windows[w].tokens)]
        if len(rows) != len(stream):  # chunking keeps every token: a mismatch is a bug, not a prompt's fault
            raise RuntimeError(f"summarize judge: {len(rows)} content rows for {len(stream)} tokens")
        return contexts[0][0, rows].float()

    def importance(self, segments) -> list:
        full = [p for s in segments for p in s.tokens]
        rows = self.content_rows(full)
        total, n = rows.sum(0), rows.shape[0]
        mean = total / n
        scores, start = [], 0
        for seg in segments:
            k = len(seg)
            rest = (total - rows[start:start + k].sum(0)) / max(n - k, 1)
            start += k
            scores.append(float(1.0 - torch.nn.functional.cosine_similarity(mean, rest, dim=0)))
        return scores

    def near_duplicates(self, segments) -> list:
        from .summarize import near_duplicates

        return near_duplicates(segments)  # lexical: see text/summarize.py for why not the encoder


def _extra_table(registry, tower, model):
    """The registry's vectors for one tower, in pseudo-id order, on the model's device and dtype (cached on the
    registry snapshot)."""
    weight = model.embeddings.token_embedding.weight
    key = (tower, str(weight.device), str(weight.dtype))
    table = registry.cache.get(key)
    if table is None:
        table = torch.cat([e.tensors[tower] for e in registry.embeddings]).to(device=weight.device,
                                                                               dtype=weight.dtype)
        registry.cache[key] = table
    return table


def _assemble(z, empty, rows):
    """Gather output rows (window, position) from the weighted windows z [N, P, D]; EMPTY_WINDOW rows from the
    empty prompt's encoding. Returns [1, T, D]."""
    source = z if empty is None else torch.cat([z, empty[None]])  # (N [+1], P, D)
    n = z.shape[0]
    win = torch.tensor([n if w == EMPTY_WINDOW else w for w, _ in rows], device=z.device)
    pos = torch.tensor([p for _, p in rows], device=z.device)
    return source[win, pos][None]  # (1, T, D)


def _equalize(context, negative_context, empty_rows, zero_negative):
    """Pad the shorter context with whole empty-prompt chunks (or zero rows for a zeroed SDXL negative)."""
    short_is_negative = negative_context.shape[1] < context.shape[1]
    short, long = (negative_context, context) if short_is_negative else (context, negative_context)
    missing = long.shape[1] - short.shape[1]
    if short_is_negative and zero_negative:
        padded = torch.cat([short, short.new_zeros((1, missing, short.shape[-1]))], dim=1)
        note = f"negative_prompt padded with {missing} zero rows to {long.shape[1]} rows"
    else:
        chunk = empty_rows.shape[1]
        assert missing % chunk == 0, (missing, chunk)  # both sides are whole chunks of the same strategy
        padded = torch.cat([short, empty_rows.expand(missing // chunk, -1, -1).reshape(1, missing, -1)], dim=1)
        name = "negative_prompt" if short_is_negative else "prompt"
        note = f"{name} padded with {missing // chunk} empty-prompt chunk(s) to {long.shape[1]} rows"
    if short_is_negative:
        return context, padded, note
    return padded, negative_context, note
