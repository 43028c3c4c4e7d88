"""The CLIP tokenizer, id for id the same as OpenAI's original SimpleTokenizer (openai/CLIP, shipped with
open_clip as ``open_clip/tokenizer.py``, ``SimpleTokenizer().encode``), but many times faster.

The text goes through the same steps as there: ``ftfy.fix_text``, ``html.unescape`` twice, strip, whitespace
collapsed to single spaces, lowercase, split by the CLIP regex, each piece's UTF-8 bytes mapped to printable
characters and merged by byte-level BPE (48,894 merges, 49,408 ids). Where the speed comes from:

- A pure-ASCII text without ``&`` and without control characters other than tab/newline/CR is a fixed point of
  ``ftfy.fix_text`` (ftfy's fixes act on non-ASCII characters, HTML entities, terminal escapes and control
  characters; its CR -> LF is erased by the whitespace collapse) and of ``html.unescape`` (which does nothing
  without ``&``). Such text skips both and is split on whitespace; each whitespace-separated word maps to its
  ids through a bounded LRU cache. Everything else takes the exact slow path. ``tests/test_tokenizer.py`` checks
  the fixed-point claim on random ASCII.
- The byte-to-character map is identity on printable ASCII, so ASCII pieces need no mapping at all.
- BPE results are cached per piece (bounded LRU); the merges use a heap, O(n log n) instead of the reference's
  O(n^2) rescans (same result: CLIP's merge list only merges symbols that earlier merges made).
- The vocabulary loads on first use, with C-level dict builds (about 30 ms), and is shared by later instances.

The special tokens recognised in text are OpenAI's original ``<|startoftext|>`` / ``<|endoftext|>`` (openai/CLIP's
``simple_tokenizer.py``; Hugging Face's tokenizer, which A1111 uses for SD1's CLIP-L, agrees), so a literal
``<|endoftext|>`` typed in a prompt is id 49407 as it is there. open_clip 3.x renamed them ``<start_of_text>`` /
``<end_of_text>``; pass ``special_tokens=OPEN_CLIP_SPECIAL_TOKENS`` for that behaviour.
"""

import html
import re
import zlib
from functools import lru_cache
from itertools import chain
from heapq import heapify, heappop, heappush
from pathlib import Path

from ..errors import PromptError

BOS_ID = 49406
EOS_ID = 49407
VOCAB_SIZE = 49408
OPEN_CLIP_SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
OPENAI_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
DEFAULT_VOCAB = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
_N_MERGES = 49152 - 256 - 2  # merge lines used by CLIP (the file has more); 512 byte symbols + merges + 2 specials
_WORD_CACHE = 1 << 16  # entries per cache; a word costs a few hundred bytes, so tens of MB at worst
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # ASCII controls except tab, LF, CR
_SURROGATE = re.compile("[\ud800-\udfff]")


def _byte_chars() -> list:
    """GPT-2/CLIP's reversible byte -> character map: printable Latin-1 bytes stand for themselves, the other 68
    bytes (space, controls, ...) take the characters from U+0100 on, so no BPE symbol is whitespace."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 256
    for b in range(256):
        if b not in chars:
            chars[b] = chr(extra)
            extra += 1
    # vocabulary order is the printable bytes first, then the rest in byte order (dict insertion order)
    return list(chars.items())


def _is_fast_text(text: str) -> bool:
    """True when ``ftfy.fix_text`` and ``html.unescape`` leave ``text`` unchanged (see the module docstring)."""
    # isprintable() settles the common case in C; only text with tabs or newlines needs the regex
    return text.isascii() and "&" not in text and (text.isprintable() or _CONTROL.search(text) is None)


def decode_prompt_bytes(data, field: str = "prompt") -> str:
    """Strict UTF-8 decoding for APIs that take bytes; the error names the field and the offending bytes."""
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = bytes(data)[exc.start:exc.end]
        raise PromptError(f"{field} is not UTF-8 text: bytes {bad!r} at offset {exc.start}") from None


def _check_text(text, field: str) -> str:
    if isinstance(text, (bytes, bytearray, memoryview)):
        return decode_prompt_bytes(text, field)
    if not isinstance(text, str):
        raise PromptError(f"{field} must be a string, got {type(text).__name__}: {text!r:.60}")
    return text


def _check_surrogates(text: str, field: str) -> None:
    """Reject unpaired surrogates (not text; on Linux they are how Python smuggles non-UTF-8 argv bytes).
    Paired ones are left for ftfy, which joins them into one character as the reference does."""
    if _SURROGATE.search(text) is None:
        return
    i, n = 0, len(text)
    while i < n:
        c = ord(text[i])
        if 0xD800 <= c <= 0xDBFF and i + 1 < n and 0xDC00 <= ord(text[i + 1]) <= 0xDFFF:
            i += 2
            continue
        if 0xD800 <= c <= 0xDFFF:
            hint = f" (the byte 0x{c - 0xDC00:02X}, which is not UTF-8)" if 0xDC80 <= c <= 0xDCFF else ""
            raise PromptError(f"{field} contains an unpaired surrogate U+{c:04X} at index {i}{hint}")
        i += 1


def _merge_lines(path) -> str:
    """The merge lines CLIP uses, as one string. Only the first part of the file is needed, so only that much
    is decompressed (this halves the load time)."""
    try:
        data = Path(path).read_bytes()
        inflate = zlib.decompressobj(wbits=31)  # gzip container
        buf = inflate.decompress(data, 1 << 19)
        while buf.count(b"\n") <= _N_MERGES and not inflate.eof and inflate.unconsumed_tail:
            buf += inflate.decompress(inflate.unconsumed_tail, 1 << 18)
    except (OSError, zlib.error) as exc:
        raise PromptError(f"vocab_path={str(path)!r} cannot be read as a gzip BPE file: {exc}") from None
    lines = buf.split(b"\n", _N_MERGES + 1)
    return b"\n".join(lines[1:_N_MERGES + 1]).decode("utf-8")


class _Vocab:
    """The loaded BPE tables. Immutable after construction."""

    def __init__(self, path, special_tokens):
        block = _merge_lines(path)
        merges = block.split("\n")
        if len(merges) != _N_MERGES:
            raise PromptError(f"vocab_path={str(path)!r} has {len(merges)} merges; CLIP needs {_N_MERGES}")
        byte_chars = _byte_chars()
        base = [c for _, c in byte_chars]
        # "a b" -> rank: the file's own lines are the keys, so no tuples are built (the load is C-speed)
        self.ranks = dict(zip(merges, range(len(merges))))
        self.pieces = base + [c + "</w>" for c in base] + block.replace(" ", "").split("\n") + list(special_tokens)
        # a string produced by two merges would keep its last id, as dict(zip(vocab, ...)) does in the reference
        self.ids = dict(zip(self.pieces, range(len(self.pieces))))
        self.specials = {t: self.ids[t] for t in special_tokens}
        self.byte_table = str.maketrans({b: c for b, c in byte_chars})  # applied to latin-1-decoded UTF-8
        self.char_bytes = {c: b for b, c in byte_chars}


@lru_cache(maxsize=4)
def _load_vocab(path: str, special_tokens: tuple) -> _Vocab:
    """Tables are immutable and the same for every tokenizer on one file, so instances share them: a second
    ``CLIPTokenizer()`` (a server request, another encoder) costs nothing to load."""
    return _Vocab(path, special_tokens)


@lru_cache(maxsize=4)
def _clip_pattern(special_tokens: tuple):
    import regex

    specials = "|".join(regex.escape(t) for t in special_tokens)
    # the CLIP pattern; IGNORECASE as in the reference (the text is lowercased before anyway)
    pattern = specials + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    return regex.compile(pattern, regex.IGNORECASE)


class CLIPTokenizer:
    """``CLIPTokenizer(vocab_path=None).encode(text) -> list[int]`` without BOS/EOS; see the module docstring."""

    bos_id = BOS_ID
    eos_id = EOS_ID
    vocab_size = VOCAB_SIZE

    def __init__(self, vocab_path=None, *, special_tokens=OPENAI_SPECIAL_TOKENS, cache_size=_WORD_CACHE):
        self.vocab_path = Path(vocab_path) if vocab_path is not None else DEFAULT_VOCAB
        if len(special_tokens) != 2 or not all(isinstance(t, str) and t for t in special_tokens):
            raise PromptError(f"special_tokens={special_tokens!r} must be two non-empty strings (start, end)")
        self.special_tokens = tuple(special_tokens)
        self._vocab = None
        self._pattern = None
        # per-instance caches (not lru_cache on the method, which would keep every instance alive)
        self._piece_ids = lru_cache(maxsize=cache_size)(self._bpe)
        self._word_ids = lru_cache(maxsize=cache_size)(self._ascii_word)

    # -- loading ---------------------------------------------------------------------------------------------

    def _load(self) -> _Vocab:
        # pattern first: a thread that sees _vocab set also sees _pattern
        self._pattern = _clip_pattern(self.special_tokens)
        self._vocab = _load_vocab(str(self.vocab_path), self.special_tokens)
        return self._vocab

    @property
    def vocab(self) -> _Vocab:
        return self._vocab or self._load()

    # -- encoding --------------------------------------------------------------------------------------------

    def encode(self, text) -> list:
        """Token ids of ``text`` (str, or UTF-8 bytes), without BOS/EOS."""
        text = _check_text(text, "text")
        if self._vocab is None:
            self._load()
        if _is_fast_text(text):
            return list(chain.from_iterable(map(self._word_ids, text.lower().split())))
        return self._text_ids(self._clean(text).lower())

    def encode_words(self, text) -> list:
        """``[(word, ids), ...]`` for each whitespace-separated word of the cleaned text (for plain ASCII, the
        words as written); the ids concatenated are ``encode(text)``. For reports in the user's own words: ids
        lose the spacing ("tag21" and "tag 2 1" give the same tokens)."""
        text = _check_text(text, "text")
        if self._vocab is None:
            self._load()
        if _is_fast_text(text):
            return [(word, list(self._word_ids(word.lower()))) for word in text.split()]
        # lowercasing word by word equals lowercasing the text: a space ends every case context (final sigma)
        return [(word, self._text_ids(word.lower())) for word in self._clean(text).split(" ") if word]

    @staticmethod
    def _clean(text: str) -> str:
        """The reference's cleaning up to (not including) the lowercasing."""
        _check_surrogates(text, "text")
        import ftfy

        return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split())

    def _text_ids(self, text: str) -> list:
        table, piece_ids, out = self._vocab.byte_table, self._piece_ids, []
        for piece in self._pattern.findall(text):
            # printable ASCII stands for itself under the byte map; anything else (controls ftfy kept too) maps
            as_is = piece.isascii() and piece.isprintable()
            out += piece_ids(piece if as_is else piece.encode("utf-8").decode("latin-1").translate(table))
        return out

    def _ascii_word(self, word: str) -> tuple:
        # printable ASCII maps to itself under the byte map, so the regex pieces are already BPE input
        return tuple(chain.from_iterable(map(self._piece_ids, self._pattern.findall(word))))

    def _bpe(self, piece: str) -> tuple:
        """Ids of one byte-mapped regex piece."""
        v = self._vocab
        special = v.specials.get(piece)
        if special is not None:
            return (special,)
        ids = v.ids
        return tuple(ids[s] for s in _merge([*piece[:-1], piece[-1] + "</w>"], v.ranks))

    # -- decoding --------------------------------------------------------------------------------------------

    def _pieces(self, ids) -> list:
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise PromptError(f"ids must be a sequence of token ids, got {type(ids).__name__}: {ids!r:.60}")
        pieces = self.vocab.pieces
        out = []
        for i in ids:
            if isinstance(i, bool) or not hasattr(i, "__index__") or not 0 <= int(i) < len(pieces):
                raise PromptError(f"token id {i!r} is not in the vocabulary (0..{len(pieces) - 1})")
            out.append(pieces[int(i)])
        return out

    def _piece_bytes(self, piece: str) -> bytes:
        char_bytes = self.vocab.char_bytes
        return bytes(char_bytes[c] for c in piece)

    def decode(self, ids) -> str:
        """Text of ``ids``, as the reference decodes it: end-of-word marks become spaces, invalid UTF-8 "\ufffd"."""
        raw = b"".join(self._piece_bytes(p) for p in self._pieces(ids))
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")

    def token_strings(self, ids) -> list:
        """One readable string per id, for reports: the piece's text without the end-of-word mark; bytes of a
        character split across tokens show as ``<0xF0>``."""
        out = []
        for piece in self._pieces(ids):
            end = piece.endswith("</w>") and piece not in self.special_tokens
            out.append("".join(_show_bytes(self._piece_bytes(piece[:-4] if end else piece))))
        return out

    def __repr__(self) -> str:
        return f"CLIPTokenizer(vocab_path={str(self.vocab_path)!r})"


def _show_bytes(raw: bytes):
    """Valid UTF-8 runs as text, stray bytes as <0xNN>."""
    i = 0
    while i < len(raw):
        for j in range(min(len(raw), i + 4), i, -1):
            try:
                yield raw[i:j].decode("utf-8")
                i = j
                break
            except UnicodeDecodeError:
                continue
        else:
            yield f"<0x{raw[i]:02X}>"
            i += 1


def _merge(symbols: list, ranks: dict) -> list:
    """Byte-level BPE. The reference merges the lowest-ranked adjacent pair, all its occurrences left to right,
    and rescans, until no pair is in the merge list: O(n^2) per piece. This does the same with a heap of
    (rank, position) over a linked list: O(n log n), and faster even for short pieces.

    Equal ranks pop in position order, which reproduces the reference's left-to-right pass over all occurrences
    of the chosen pair (an occurrence overlapping a merged one is stale and skipped). A merge creates only
    pairs containing the new symbol, whose ranks are higher than the one just used (the merge list is built in
    order), so no new pair can jump ahead of the remaining occurrences."""
    sym = list(symbols)
    n = len(sym)
    nxt = list(range(1, n + 1))
    prv = list(range(-1, n - 1))
    nxt[-1] = -1
    heap = []
    for i in range(n - 1):
        r = ranks.get(sym[i] + " " + sym[i + 1])
        if r is not None:
            heap.append((r, i))
    heapify(heap)
    while heap:
        r, i = heappop(heap)
        left = sym[i]
        j = nxt[i]
        if left is None or j == -1 or ranks.get(left + " " + sym[j]) != r:
            continue  # stale: one of the two symbols took part in a merge since this entry was pushed
        sym[i] = left + sym[j]
        sym[j] = None
        k = nxt[j]
        nxt[i] = k
        if k != -1:
            prv[k] = i
            rk = ranks.get(sym[i] + " " + sym[k])
            if rk is not None:
                heappush(heap, (rk, i))
        p = prv[i]
        if p != -1:
            rp = ranks.get(sym[p] + " " + sym[i])
            if rp is not None:
                heappush(heap, (rp, p))
    return [s for s in sym if s is not None]
