"""Long-prompt strategies: from weighted prompt segments to CLIP windows and a plan for the output rows.

CLIP's text model has 77 positions: BOS, 75 content tokens, EOS. A prompt is tokenized segment by segment (as
AUTOMATIC1111 does, so BPE never merges across a weight boundary), every token keeps its segment's weight, and a
strategy decides how the token stream is laid out in windows:

- ``truncate``: the first 75 tokens in one window; the rest is dropped and reported.
- ``chunk``: AUTOMATIC1111's rule (``modules/sd_hijack_clip.py: tokenize_line``): 75-token chunks, comma
  backtracking, BREAK; the output is the chunks concatenated along tokens (77*k rows).
- ``window``: overlapping 75-token windows; every token appears once in the output (see :func:`window`).
- ``summarize``: one window of the prompt's most informative segments (``text/summarize.py``); the rest is
  dropped segment by segment, each reported with its reason and score.
- ``stretch`` (experimental): Long-CLIP's stretched position table, one window of 248 positions (246 tokens).

The window length is the text encoder's (``positions``, default 77; ``TextEncoder.positions`` passes its towers'
own): a Long-CLIP tower has 248, so ``chunk`` then makes windows of 246 tokens and ``stretch`` is one window of
its own table (no interpolation; ``max(positions, 248)`` positions).

A window is ``[BOS, tokens..., EOS, pad...]``. The pad id depends on the encoder (EOS for CLIP-L, 0 for OpenCLIP),
so a window stores only its content and :meth:`Window.ids` lays it out for a given pad id. The same plan can
therefore feed both SDXL encoders. BOS, EOS and padding positions always have weight 1.0.

No torch here: the ``tokens`` command and the report run without it.
"""

import math
from dataclasses import dataclass

from ..errors import PromptError

BOS_ID = 49406  # same values as text/tokenizer.py; repeated so this module does not depend on it
EOS_ID = 49407
COMMA_ID = 267  # the ",</w>" token of the CLIP vocabulary, which A1111 tracks for comma backtracking
CHUNK_TOKENS = 75
CHUNK_POSITIONS = CHUNK_TOKENS + 2
STRETCH_POSITIONS = 248  # Long-CLIP: 4*77 - 3*20
STRETCH_TOKENS = STRETCH_POSITIONS - 2
MAX_POSITIONS = 1024  # the longest window a text encoder may have (checkpoints/text_encoders.MAX_TEXT_POSITIONS)
# A prompt longer than this is a mistake (a pasted file), not a prompt: 10,000 tokens are 134 CLIP chunks.
MAX_PROMPT_TOKENS = 10_000
# Checked before tokenizing so that a megabyte of text is rejected without spending seconds on BPE.
MAX_PROMPT_CHARS = 200_000
# |weight| bound: CLIP hidden values reach ~30, so larger weights overflow half precision (65504) to inf/NaN.
MAX_ABS_WEIGHT = 1000.0
BREAK_ID = -1  # token stream marker for BREAK; never a real id
EMPTY_WINDOW = -1  # row source meaning "the empty prompt's window at this position"
REPORT_WORDS = 8  # tokens decoded for a chunk's "first words"


@dataclass(frozen=True)
class Window:
    """One CLIP input: up to ``positions - 2`` content tokens with their weights."""

    tokens: tuple
    weights: tuple
    positions: int = CHUNK_POSITIONS

    def ids(self, pad_id: int = EOS_ID) -> list:
        pad = self.positions - len(self.tokens) - 2
        return [BOS_ID, *self.tokens, EOS_ID] + [pad_id] * pad

    def position_weights(self) -> list:
        pad = self.positions - len(self.tokens) - 2
        return [1.0, *self.weights, 1.0] + [1.0] * pad


@dataclass(frozen=True)
class ChunkInfo:
    tokens: int
    capacity: int
    first_words: str


@dataclass(frozen=True)
class TokenReport:
    """What happened to a prompt's tokens. Nothing is dropped without appearing here."""

    strategy: str
    chunks: tuple
    total_tokens: int
    dropped_tokens: int = 0
    dropped_text: str = ""
    notes: tuple = ()
    # textual-inversion embeddings placed: ({"name", "vectors", "chunk", "position"}, ...), chunk 0-based, position
    # the window position (1-based, after BOS) of the first vector; each counts `vectors` tokens
    embeddings: tuple = ()
    # summarize: each dropped segment ({"index", "text", "tokens", "reason", "score", "of"}), in prompt order
    dropped_segments: tuple = ()

    def summary(self) -> str:
        """Counts per window, as A1111's token counter shows them: ``"75/75 | 12/75"``."""
        return " | ".join(f"{c.tokens}/{c.capacity}" for c in self.chunks)

    def to_dict(self) -> dict:
        return {
            "strategy": self.strategy,
            "chunks": [{"tokens": c.tokens, "capacity": c.capacity, "first_words": c.first_words} for c in self.chunks],
            "summary": self.summary(),
            "total_tokens": self.total_tokens,
            "dropped_tokens": self.dropped_tokens,
            "dropped_text": self.dropped_text,
            "notes": list(self.notes),
            "embeddings": [dict(e) for e in self.embeddings],
            "dropped_segments": [dict(d) for d in self.dropped_segments],
        }


@dataclass(frozen=True)
class Plan:
    """Windows to encode, and where each output row comes from.

    ``rows[r] = (window, position)``: output row ``r`` is the hidden state of ``windows[window]`` at ``position``;
    ``window == EMPTY_WINDOW`` means the encoding of the empty prompt ``""`` at that position.
    """

    windows: tuple
    rows: tuple
    report: TokenReport

    @property
    def positions(self) -> int:
        return self.windows[0].positions

    @property
    def uses_empty_window(self) -> bool:
        return any(w == EMPTY_WINDOW for w, _ in self.rows)


@dataclass(frozen=True)
class _Layout:
    windows: list
    rows: list
    dropped: list  # dropped token ids, in prompt order
    notes: list
    summary: object = None  # summarize: the text/summarize.py Summary


def _all_rows(windows) -> list:
    return [(i, p) for i, w in enumerate(windows) for p in range(w.positions)]


def _window(pairs, positions=CHUNK_POSITIONS) -> Window:
    return Window(tuple(t for t, _ in pairs), tuple(w for _, w in pairs), positions)


def _without_breaks(stream, strategy, notes) -> list:
    pairs = [p for p in stream if p[0] != BREAK_ID]
    if len(pairs) != len(stream):
        notes.append(f"BREAK has no effect with long_prompt={strategy!r} (only 'chunk' splits at BREAK); ignored")
    return pairs


def _units(pairs, spans) -> list:
    """The stream in units: one ``(id, weight)`` pair, or an embedding's whole pseudo-id block (``spans``: first
    id -> vectors), which no strategy but ``window`` ever splits."""
    if not spans:
        return [[p] for p in pairs]
    units, i = [], 0
    while i < len(pairs):
        n = spans.get(pairs[i][0], 1)
        units.append(pairs[i:i + n])
        i += len(units[-1])
    return units


def _first_tokens(pairs, limit, spans) -> int:
    """How many leading pairs fit in ``limit`` positions without cutting an embedding."""
    taken = 0
    for unit in _units(pairs, spans):
        if taken + len(unit) > limit:
            break
        taken += len(unit)
    return taken


def truncate(stream, *, backtrack=20, stride=60, spans=None, positions=CHUNK_POSITIONS) -> _Layout:
    """The first 75 tokens, as diffusers and the original SD code do; the rest is dropped (and reported). An
    embedding that does not fit whole is dropped whole, with everything after it."""
    notes = []
    pairs = _without_breaks(stream, "truncate", notes)
    kept = _first_tokens(pairs, positions - 2, spans)
    windows = [_window(pairs[:kept], positions)]
    return _Layout(windows, _all_rows(windows), [t for t, _ in pairs[kept:]], notes)


def chunk(stream, *, backtrack=20, stride=60, spans=None, positions=CHUNK_POSITIONS) -> _Layout:
    """AUTOMATIC1111's chunking (``sd_hijack_clip.py: tokenize_line``, option ``comma_padding_backtrack``).

    A chunk closes when its 76th token arrives, so exactly 75 tokens make one chunk. If the chunk is full, the
    arriving token is not a comma, and the chunk's last comma lies within the last ``backtrack`` positions, the
    tokens after that comma move to the next chunk (``backtrack=0`` disables this). BREAK closes the current chunk,
    even an empty one, which then becomes an all-padding chunk (``"BREAK a"`` and ``"a BREAK BREAK b"`` give one),
    as in A1111. A trailing BREAK adds nothing. The empty prompt is one all-padding chunk.

    An embedding of n vectors (``spans``) is never split: if the chunk's length + n exceeds 75, the chunk is
    closed first (EOS-padded), as A1111 does. Comma backtracking moves an embedding's vectors with the other
    tokens of the tail (A1111 leaves the embedding's vectors behind there, a bug: frontends doc 1.4).
    """
    chunks, current, last_comma = [], [], -1
    size = positions - 2  # 75 tokens for CLIP; 246 for a Long-CLIP tower

    def close():
        nonlocal current, last_comma
        chunks.append(current)
        current, last_comma = [], -1

    for unit in _units(stream, spans):
        token, weight = unit[0]
        if token == BREAK_ID:
            close()
            continue
        if token == COMMA_ID:
            last_comma = len(current)
        elif backtrack and len(current) == size and last_comma != -1 and size - last_comma <= backtrack:
            tail = current[last_comma + 1:]
            current = current[:last_comma + 1]
            close()
            current = tail
        if len(current) == size:
            close()
        if len(unit) > 1 and len(current) + len(unit) > size:
            close()  # an embedding is never split (A1111)
        current.extend(unit)
    if current or not chunks:
        close()
    windows = [_window(c, positions) for c in chunks]
    return _Layout(windows, _all_rows(windows), [], [])


def _window_starts(n: int, stride: int, size: int = CHUNK_TOKENS) -> list:
    starts = [0]
    while starts[-1] + size < n:
        # the last window is aligned to the end so it is full and its tokens get the most context
        starts.append(min(starts[-1] + stride, n - size))
    return starts


def window(stream, *, backtrack=20, stride=60, spans=None, positions=CHUNK_POSITIONS) -> _Layout:
    """Sliding window: windows of 75 tokens starting every ``stride`` tokens (overlap ``75 - stride``).

    Merge rule: each token is taken from the window in which it has the most tokens before it, i.e. the earliest
    window that contains it. CLIP's text attention is causal, so a token's hidden state depends only on the tokens
    to its left in its window; the right window edge does not affect it, and "farthest from an edge" reduces to
    "farthest from the left edge". The overlap therefore gives the first tokens of every later window ``75 -
    stride`` tokens of preceding context that plain chunking would not give them.

    Output rows: BOS (first window), every token once in prompt order, EOS (last window, which has seen the end of
    the prompt), then rows of the empty prompt's encoding at the same positions up to a multiple of 77, so the
    result batches with other prompts. A prompt of up to 75 tokens gives exactly the ``chunk`` output.

    Embeddings: a window may start inside an embedding's vectors (windows are cut by position); each vector is
    still one output row, taken like any token from the earliest window that holds it.
    """
    notes = []
    pairs = _without_breaks(stream, "window", notes)
    size = positions - 2
    if len(pairs) <= size:
        windows = [_window(pairs, positions)]
        return _Layout(windows, _all_rows(windows), [], notes)
    starts = _window_starts(len(pairs), stride, size)
    windows = [_window(pairs[s:s + size], positions) for s in starts]
    rows, covered = [(0, 0)], 0
    for w, start in enumerate(starts):
        # tokens before `covered` already came from an earlier window, where they had more context
        rows += [(w, 1 + i - start) for i in range(covered, start + size)]
        covered = start + size
    rows.append((len(windows) - 1, size + 1))
    total = math.ceil(len(rows) / positions) * positions
    rows += [(EMPTY_WINDOW, r % positions) for r in range(len(rows), total)]
    return _Layout(windows, rows, [], notes)


def stretch(stream, *, backtrack=20, stride=60, spans=None, positions=CHUNK_POSITIONS) -> _Layout:
    """Experimental. Long-CLIP (arXiv 2403.15378): one window of 248 positions whose position table is stretched
    from the 77 learned ones (the text model gets ``position_embedding=stretch_position_embedding(...)``). Up to
    246 tokens; the rest is dropped and reported. The UNet was trained on 77-row contexts; results may suffer.
    An encoder with 248 or more positions of its own (Long-CLIP) gets one window of its own length, unstretched."""
    notes = []
    pairs = _without_breaks(stream, "stretch", notes)
    length = max(positions, STRETCH_POSITIONS)
    kept = _first_tokens(pairs, length - 2, spans)  # an embedding that does not fit is dropped whole
    windows = [_window(pairs[:kept], length)]
    return _Layout(windows, _all_rows(windows), [t for t, _ in pairs[kept:]], notes)


def summarize(stream, *, backtrack=20, stride=60, spans=None, positions=CHUNK_POSITIONS, judge=None,
              decode=None) -> _Layout:
    """The seed's summarization: one window holding the prompt's most informative segments, in their order, with
    their weights and embeddings (``text/summarize.py``). ``judge`` ranks segments (``TextEncoder`` passes one that
    runs the text encoder; without one, the position rule). Every dropped segment is reported."""
    from .summarize import describe, summarize as choose

    result = choose(stream, positions - 2, judge, spans)
    windows = [_window(result.stream, positions)]
    notes = list(result.notes)
    if result.dropped:
        notes.append(f"summarize: rule {result.rule}; kept {result.segments - len(result.dropped)} of "
                     f"{result.segments} segments")
        if decode is not None:
            notes += describe(result, decode)
    return _Layout(windows, _all_rows(windows), [t for d in result.dropped for t, _ in d.tokens], notes, result)


# name -> strategy; feeds the CLI choices and the error message
LONG_PROMPT_STRATEGIES = {"truncate": truncate, "chunk": chunk, "window": window, "stretch": stretch,
                          "summarize": summarize}


def check_strategy(name) -> str:
    if name not in LONG_PROMPT_STRATEGIES:
        valid = ", ".join(LONG_PROMPT_STRATEGIES)
        raise PromptError(f"long_prompt={name!r} is not a long-prompt strategy; valid: {valid}")
    return name


def check_prompt_text(field: str, text) -> str:
    """Boundary check for a prompt string (before parsing, so absurd input costs nothing)."""
    if not isinstance(text, str):
        raise PromptError(f"{field} must be a string, got {type(text).__name__}: {text!r:.60}")
    if len(text) > MAX_PROMPT_CHARS:
        raise PromptError(f"{field} has {len(text)} characters; the maximum is {MAX_PROMPT_CHARS}")
    return text


def tokenize_segments(segments, tokenizer) -> list:
    """``parse_prompt`` output -> token stream of ``(id, weight)``; BREAK becomes ``(BREAK_ID, -1.0)``.

    Each segment is tokenized on its own, as A1111 does. Only a segment that is exactly ``("BREAK", -1.0)`` is a
    break (A1111: inside parentheses the weight differs and BREAK is an ordinary word)."""
    stream = []
    for text, weight in segments:
        if text == "BREAK" and weight == -1.0:
            stream.append((BREAK_ID, -1.0))
            continue
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise PromptError(f"prompt weight {weight!r} of segment {text[:40]!r} is not a finite number")
        if abs(weight) > MAX_ABS_WEIGHT:
            raise PromptError(
                f"prompt weight {weight:g} of segment {text[:40]!r} is outside -{MAX_ABS_WEIGHT:g}..{MAX_ABS_WEIGHT:g}"
            )
        ids = tokenizer.encode(text)
        if len(stream) + len(ids) > MAX_PROMPT_TOKENS:
            raise PromptError(f"prompt is longer than {MAX_PROMPT_TOKENS} tokens (the maximum); shorten it")
        stream.extend((int(t), float(weight)) for t in ids)
    return stream


def _first_words(tokenizer, tokens) -> str:
    if not tokens:
        return ""
    text = tokenizer.decode(list(tokens[:REPORT_WORDS])).strip()
    return text + (" ..." if len(tokens) > REPORT_WORDS else "")


def _embedding_uses(layout, spans, tokenizer) -> tuple:
    """Each placed embedding once: the row that carries its first vector names the window and position."""
    locate = getattr(tokenizer, "locate", None)
    if not spans or locate is None:
        return ()
    uses = []
    for w, p in layout.rows:
        if w == EMPTY_WINDOW or not 1 <= p <= len(layout.windows[w].tokens):
            continue
        token = layout.windows[w].tokens[p - 1]
        if token in spans:
            embedding, _ = locate(token)
            uses.append({"name": embedding.name, "vectors": spans[token], "chunk": w, "position": p})
    return tuple(uses)


def plan_stream(stream, tokenizer, strategy="chunk", *, backtrack=20, stride=60, positions=CHUNK_POSITIONS,
                judge=None) -> Plan:
    """Lay out a token stream with a named strategy and build its report (``tokenizer`` is used for decoding).

    A tokenizer with ``embedding_spans`` (``text.embeddings.EmbeddingTokenizer``) marks textual-inversion
    pseudo-id blocks, which the strategies keep whole (``window`` excepted) and the report lists."""
    check_strategy(strategy)
    if isinstance(backtrack, bool) or not isinstance(backtrack, int) or not 0 <= backtrack <= CHUNK_TOKENS - 1:
        raise PromptError(f"chunk_backtrack={backtrack!r} must be an integer in 0..{CHUNK_TOKENS - 1} (0 disables)")
    if isinstance(positions, bool) or not isinstance(positions, int) or not 3 <= positions <= MAX_POSITIONS:
        raise PromptError(f"positions={positions!r} (the text encoder's window length) must be an integer in "
                          f"3..{MAX_POSITIONS}")
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= positions - 2:
        raise PromptError(f"window_stride={stride!r} must be an integer in 1..{positions - 2}")
    spans = getattr(tokenizer, "embedding_spans", None) or None
    # the window length goes only to strategies that need another than CLIP's 77 (an older strategy knows 77 only)
    sized = {} if positions == CHUNK_POSITIONS else {"positions": positions}
    if strategy == "summarize":  # the judge (an encoder, or the position rule) and the decoder for its report
        sized.update(judge=judge, decode=tokenizer.decode)
    layout = LONG_PROMPT_STRATEGIES[strategy](stream, backtrack=backtrack, stride=stride, spans=spans, **sized)
    capacity = layout.windows[0].positions - 2
    chunks = tuple(ChunkInfo(len(w.tokens), capacity, _first_words(tokenizer, w.tokens)) for w in layout.windows)
    total = sum(1 for t, _ in stream if t != BREAK_ID)
    dropped_text = tokenizer.decode(layout.dropped).strip() if layout.dropped else ""
    notes = list(layout.notes)
    if layout.dropped:
        notes.append(f"{len(layout.dropped)} of {total} tokens dropped by long_prompt={strategy!r}: {dropped_text!r}")
    segments = ()
    if layout.summary is not None:
        from .summarize import dropped_segments

        segments = dropped_segments(layout.summary, tokenizer.decode)
    report = TokenReport(strategy, chunks, total, len(layout.dropped), dropped_text, tuple(notes),
                         _embedding_uses(layout, spans, tokenizer), segments)
    return Plan(tuple(layout.windows), tuple(layout.rows), report)


def plan_prompt(segments, tokenizer, strategy="chunk", *, backtrack=20, stride=60,
                positions=CHUNK_POSITIONS, judge=None) -> Plan:  # fmt: skip
    """``parse_prompt`` output -> :class:`Plan`. See the module docstring for the strategies; ``positions`` is
    the text encoder's window length (77 for CLIP, 248 for Long-CLIP)."""
    stream = tokenize_segments(segments, tokenizer)
    return plan_stream(stream, tokenizer, strategy, backtrack=backtrack, stride=stride, positions=positions,
                       judge=judge)
