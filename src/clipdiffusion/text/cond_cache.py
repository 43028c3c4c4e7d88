"""A bounded cache of encoded conditioning across generations (the server's repeated prompts and negatives).

``ConditioningCache(max_entries, max_bytes)`` maps everything that changes a text encoder's output for a set of
texts to what ``TextEncoder.encode_texts`` returned, least recently used out first. ``cache.encoder(text_encoder,
extra=...)`` is a stand-in for the encoder with the same ``encode_texts``: a hit returns the stored
``EncodedTexts`` itself, so the images are bit-identical to encoding again.

**The key**: the prompt texts and negative texts (in order), clip skip, long-prompt strategy, weighting and the
encode options; the text encoder object and each tower's model object; every tower parameter's identity, version
counter (PyTorch bumps ``Tensor._version`` on each in-place change: a LoRA merged into or restored out of the text
encoder, any weight edit), dtype and device; the registered textual-inversion embeddings (name, file hash, widths,
object); and the caller's ``extra`` (the pipeline passes the LoRAs applied to the text encoder with their weights
and file hashes). A hit also checks, through weak references, that the encoder and the embedding registry are the
very objects the entry was made with (an id reused after a model is freed never hits).

``hits``, ``misses``, ``evictions``, ``stats()`` (for ``/api/info``); ``clear()`` (the server clears on a model
switch). Entries hold tensors on the model's device; ``max_bytes`` bounds their sum.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

from ..errors import ClipDiffusionError

DEFAULT_MAX_ENTRIES = 64
DEFAULT_MAX_BYTES = 256 << 20


def _nbytes(encoded) -> int:
    total = 0
    for table in (encoded.prompts, encoded.negatives):
        for e in table.values():
            for t in (e.context, e.pooled):
                if t is not None:
                    total += t.numel() * t.element_size()
    return total


def encoder_fingerprint(text_encoder) -> tuple:
    """What identifies the encoder's current weights and embeddings (see the module notes)."""
    towers = []
    for spec in getattr(text_encoder, "encoders", ()):
        model = spec.model
        params = tuple((id(p), p._version, str(p.dtype), str(p.device)) for p in model.parameters())
        towers.append((spec.name, id(model), params))
    registry = getattr(text_encoder, "embeddings", None)
    embeddings = () if registry is None else tuple(
        (e.name, e.hash, tuple(getattr(e, "widths", ()) or ()), id(e)) for e in registry.embeddings)
    positions = getattr(text_encoder, "positions", None)
    return (id(text_encoder), positions, tuple(towers), id(registry), embeddings)


class ConditioningCache:
    """LRU by count and bytes; thread-safe (the server's worker and request threads)."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, max_bytes: int = DEFAULT_MAX_BYTES):
        for name, value in (("max_entries", max_entries), ("max_bytes", max_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ClipDiffusionError(f"conditioning cache {name}={value!r}: must be an integer >= 0")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict = OrderedDict()  # key -> (encoded, bytes, encoder ref, registry ref)
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    def stats(self) -> dict:
        return {"entries": len(self._entries), "bytes": self._bytes, "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions, "max_entries": self.max_entries, "max_bytes": self.max_bytes}

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def encoder(self, text_encoder, *, extra=()) -> "CachingTextEncoder":
        return CachingTextEncoder(self, text_encoder, extra)

    def lookup(self, key, text_encoder):
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                encoded, _, encoder_ref, registry_ref = entry
                if encoder_ref() is text_encoder and registry_ref() is getattr(text_encoder, "embeddings", None):
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return encoded
                self._drop(key)
            self.misses += 1
            return None

    def store(self, key, text_encoder, encoded) -> None:
        size = _nbytes(encoded)
        if self.max_entries == 0 or size > self.max_bytes:
            return
        registry = getattr(text_encoder, "embeddings", None)
        with self._lock:
            if key in self._entries:
                self._drop(key)
            self._entries[key] = (encoded, size, weakref.ref(text_encoder),
                                  (lambda: None) if registry is None else _ref(registry))
            self._bytes += size
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
                self.evictions += 1

    def _drop(self, key) -> None:
        _, size, _, _ = self._entries.pop(key)
        self._bytes -= size


def _ref(obj):
    try:
        return weakref.ref(obj)
    except TypeError:  # an object without weak references: hold it (it is small: an embedding registry)
        return lambda: obj


class CachingTextEncoder:
    """``text_encoder`` with ``encode_texts`` answered from ``cache`` when the key matches; anything else is the
    encoder's own."""

    def __init__(self, cache: ConditioningCache, text_encoder, extra=()):
        self._cache = cache
        self._encoder = text_encoder
        self._extra = tuple(extra)

    def __getattr__(self, name):
        return getattr(self._encoder, name)

    def encode_texts(self, texts, negative_texts=(), clip_skip=None, long_prompt="chunk", weighting="a1111",
                     **options):
        texts, negative_texts = tuple(texts), tuple(negative_texts)
        key = (texts, negative_texts, clip_skip, long_prompt, weighting, tuple(sorted(options.items())),
               encoder_fingerprint(self._encoder), self._extra)
        encoded = self._cache.lookup(key, self._encoder)
        if encoded is None:
            encoded = self._encoder.encode_texts(texts, negative_texts, clip_skip, long_prompt, weighting, **options)
            self._cache.store(key, self._encoder, encoded)
        return encoded
