"""Textual-inversion embeddings on the text side: names, pseudo token ids and matching. Torch-free.

An embedding is ``n`` learned vectors (1..75) per text tower, triggered by its *name* in a prompt. As in
AUTOMATIC1111 (``EmbeddingDatabase``, ``sd_hijack_clip.py``), the name's token ids (``tokenizer.encode(name)``,
no BOS/EOS) are matched as an exact id sequence inside one emphasis segment's tokens, longest name first; a match
becomes ``n`` positions carrying the segment's weight. Matching therefore follows the tokenizer: it is
case-insensitive (CLIP lowercases), ``name`` does not match inside ``names`` (BPE's end-of-word mark differs), and a
name split by emphasis brackets never matches. A word that names no embedding is ordinary text.

The ``n`` positions are *pseudo token ids* above CLIP's vocabulary: the registry gives each embedding a block
``base .. base+n-1`` starting at ``VOCAB_SIZE`` (49408), in registration order, and the text model looks those ids up
in an extra table (``CLIPTextModel.forward(extra_embeddings=...)``; ``conditioning.py`` builds one table per tower).
Chunking keeps a block whole (``chunking.py`` reads ``embedding_spans`` from the tokenizer it is given), and the
reports decode a block as the embedding's name.

:class:`EmbeddingRegistry` is immutable: adding or removing returns a new registry, so a plan made from one
snapshot never sees ids reassigned under it. :class:`EmbeddingTokenizer` wraps a CLIP tokenizer so that every
consumer of ``encode``/``encode_words``/``decode``/``token_strings`` (the chunker, the ``tokens`` report,
``/api/tokenize``, attention labels) sees embeddings without knowing about them.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from ..errors import ClipDiffusionError

VOCAB_SIZE = 49408  # text/tokenizer.py's VOCAB_SIZE; pseudo ids start here
MAX_VECTORS = 75  # one CLIP chunk: a longer embedding could never be placed whole
MAX_NAME_CHARS = 200


@dataclass(frozen=True)
class Embedding:
    """One textual-inversion embedding.

    ``widths``: the per-tower vector width (SD1 (768,), SD2 (1024,), SDXL (768, 1280)); ``tensors``: the per-tower
    ``[vectors, width]`` tensors in tower order, or ``()`` for a count-only entry (the ``tokens`` command reads
    only shapes). ``step``/``sd_checkpoint``/``sd_checkpoint_name`` come from A1111 ``.pt`` files (None
    otherwise); ``source`` is the file it was read from; ``hash`` the first 12 hex digits of the file's sha256 (what
    A1111 writes as "TI hashes" in the infotext)."""

    name: str
    vectors: int
    widths: tuple
    tensors: tuple = ()
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    source: str | None = None
    hash: str | None = None

    @property
    def shape(self) -> int:
        """The per-vector width A1111 reports: the towers' widths summed (SDXL 768 + 1280 = 2048)."""
        return sum(self.widths)

    def info(self) -> dict:
        """A1111's ``/sdapi/v1/embeddings`` entry."""
        return {"step": self.step, "sd_checkpoint": self.sd_checkpoint,
                "sd_checkpoint_name": self.sd_checkpoint_name, "shape": self.shape, "vectors": self.vectors}


def check_name(name) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ClipDiffusionError(f"embedding name must be a non-empty string, got {name!r:.60}")
    if len(name) > MAX_NAME_CHARS:
        raise ClipDiffusionError(f"embedding name {name[:40]!r}... has {len(name)} characters; the maximum is "
                                 f"{MAX_NAME_CHARS}")
    return name


@dataclass(frozen=True)
class _Entry:
    embedding: Embedding
    name_ids: tuple
    base: int


@dataclass(frozen=True)
class Unit:
    """One matched unit of a segment's ids: ``length`` input ids from ``start``; ``entry`` is None for an
    ordinary token, else the embedding whose name those ids spell."""

    start: int
    length: int
    entry: _Entry | None

    def ids(self, source) -> list:
        if self.entry is None:
            return [source[self.start]]
        base = self.entry.base
        return list(range(base, base + self.entry.embedding.vectors))


@dataclass(frozen=True)
class EmbeddingRegistry:
    """Registered embeddings by name, with their name ids and pseudo-id blocks (immutable; see the module)."""

    entries: tuple = ()
    cache: dict = field(default_factory=dict, compare=False, repr=False)  # conditioning's per-tower tables

    def __post_init__(self):
        by_first = {}
        for entry in sorted(self.entries, key=lambda e: -len(e.name_ids)):  # longest first; stable
            by_first.setdefault(entry.name_ids[0], []).append(entry)
        object.__setattr__(self, "_by_first", by_first)
        object.__setattr__(self, "_bases", [e.base for e in self.entries])

    @classmethod
    def build(cls, embeddings, tokenizer) -> "EmbeddingRegistry":
        registry = cls()
        for embedding in embeddings:
            registry, _ = registry.with_embedding(embedding, tokenizer)
        return registry

    # -- contents -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.entries)

    def __bool__(self) -> bool:
        return bool(self.entries)

    @property
    def embeddings(self) -> tuple:
        return tuple(e.embedding for e in self.entries)

    def get(self, name: str) -> Embedding | None:
        for e in self.entries:
            if e.embedding.name == name:
                return e.embedding
        return None

    @property
    def total_vectors(self) -> int:
        return sum(e.embedding.vectors for e in self.entries)

    @property
    def spans(self) -> dict:
        """First pseudo id -> vector count, for the chunker."""
        return {e.base: e.embedding.vectors for e in self.entries}

    def locate(self, token: int):
        """``(embedding, k)`` for pseudo id ``token`` (its k-th vector, 0-based), or None for any other id."""
        if token < VOCAB_SIZE or not self.entries:
            return None
        i = bisect.bisect_right(self._bases, token) - 1
        if i < 0:
            return None
        entry = self.entries[i]
        k = token - entry.base
        return (entry.embedding, k) if 0 <= k < entry.embedding.vectors else None

    # -- changes --------------------------------------------------------------------------------------------
    def with_embedding(self, embedding: Embedding, tokenizer):
        """``(new registry, replaced name or None)``. An embedding of the same name, or whose name has the same
        token ids (``Foo`` and ``foo``), is replaced: the prompt could not tell them apart."""
        check_name(embedding.name)
        if not isinstance(embedding.vectors, int) or not 1 <= embedding.vectors <= MAX_VECTORS:
            raise ClipDiffusionError(f"embedding {embedding.name!r}: {embedding.vectors!r} vectors; an embedding "
                                     f"has 1..{MAX_VECTORS}")
        name_ids = tuple(int(t) for t in tokenizer.encode(embedding.name))
        if not name_ids:
            raise ClipDiffusionError(f"embedding name {embedding.name!r} has no tokens, so no prompt can name it")
        replaced = None
        kept = []
        for e in self.entries:
            if e.embedding.name == embedding.name or e.name_ids == name_ids:
                replaced = e.embedding.name
            else:
                kept.append((e.embedding, e.name_ids))
        kept.append((embedding, name_ids))
        return _rebased(kept), replaced

    def without(self, name: str) -> "EmbeddingRegistry":
        return _rebased([(e.embedding, e.name_ids) for e in self.entries if e.embedding.name != name])

    # -- matching -------------------------------------------------------------------------------------------
    def match(self, ids) -> list:
        """``ids`` (one segment's tokens) -> :class:`Unit` list covering them in order."""
        units, i, n = [], 0, len(ids)
        by_first = self._by_first
        while i < n:
            found = None
            for entry in by_first.get(ids[i], ()):
                k = len(entry.name_ids)
                if tuple(ids[i:i + k]) == entry.name_ids:
                    found = entry
                    break
            length = len(found.name_ids) if found else 1
            units.append(Unit(i, length, found))
            i += length
        return units

    def substitute(self, ids) -> list:
        """One segment's ids with every embedding name replaced by its pseudo-id block."""
        if not self.entries:
            return list(ids)
        out = []
        for unit in self.match(ids):
            out += unit.ids(ids)
        return out

    def wrap(self, tokenizer):
        """``tokenizer`` if nothing is registered, else an :class:`EmbeddingTokenizer` over it."""
        if not self.entries:
            return tokenizer
        if isinstance(tokenizer, EmbeddingTokenizer):
            tokenizer = tokenizer.inner
        return EmbeddingTokenizer(tokenizer, self)


def _rebased(pairs) -> EmbeddingRegistry:
    entries, base = [], VOCAB_SIZE
    for embedding, name_ids in pairs:
        entries.append(_Entry(embedding, tuple(name_ids), base))
        base += embedding.vectors
    return EmbeddingRegistry(tuple(entries))


class EmbeddingTokenizer:
    """A CLIP tokenizer that knows a registry: ``encode`` gives pseudo ids for embedding names, the decoders show
    a pseudo-id block as the name (its first id) and nothing (the others). Everything else is the inner
    tokenizer's. ``embedding_spans`` (first id -> vectors) tells the chunker which ids belong together."""

    def __init__(self, inner, registry: EmbeddingRegistry):
        self.inner = inner
        self.registry = registry
        self.embedding_spans = registry.spans

    def __getattr__(self, name):  # bos_id, eos_id, vocab_size, special_tokens, ...
        return getattr(self.inner, name)

    def encode(self, text) -> list:
        return self.registry.substitute(self.inner.encode(text))

    def encode_words(self, text) -> list:
        """The inner ``encode_words`` with names substituted; the words an embedding's name spans become one
        word (joined by spaces), which carries the whole pseudo-id block."""
        words = self.inner.encode_words(text)
        flat = [t for _, ids in words for t in ids]
        units = self.registry.match(flat)
        out, u, pos, consumed = [], 0, 0, 0
        for text_, ids in words:
            end = pos + len(ids)
            if pos < consumed and out:
                out[-1][0] += " " + text_  # this word's first token belongs to an embedding started earlier
            else:
                out.append([text_, []])
            while u < len(units) and units[u].start < end:
                out[-1][1] += units[u].ids(flat)
                consumed = units[u].start + units[u].length
                u += 1
            pos = end
        return [(t, ids) for t, ids in out]

    def locate(self, token):
        return self.registry.locate(token)

    def _runs(self, ids):
        run = []
        for token in ids:
            found = self.registry.locate(int(token)) if isinstance(token, int) or hasattr(token, "__index__") \
                else None
            if found is None:
                run.append(token)
                continue
            if run:
                yield run, None
                run = []
            yield None, found
        if run:
            yield run, None

    def decode(self, ids) -> str:
        out = ""
        for run, found in self._runs(ids):
            if run is not None:
                out += self.inner.decode(run)
            elif found[1] == 0:
                out += found[0].name + " "
        return out

    def token_strings(self, ids) -> list:
        out = []
        for run, found in self._runs(ids):
            if run is not None:
                out += self.inner.token_strings(run)
            else:
                out.append(found[0].name if found[1] == 0 else "")
        return out

    def __repr__(self) -> str:
        return f"EmbeddingTokenizer({self.inner!r}, {len(self.registry)} embeddings)"
