"""The ``summarize`` long-prompt strategy: fit any prompt into one 77-position window by keeping its most
informative segments (the seed's "summarization"), never silently.

A prompt is cut into segments at ``,``, ``.`` and ``;`` (the separator stays with the segment before it) and at
BREAK (meaningless in one window: removed and noted). When the prompt fits, nothing changes. Otherwise, in order:

1. exact duplicates (same token ids, weights and separators ignored) are dropped, the first occurrence kept;
2. near-duplicates are dropped, the earlier one kept: segments whose encodings are at least ``NEAR_DUPLICATE``
   similar (cosine) when a judge with an encoder is at hand, else whose token sets overlap by at least
   ``NEAR_DUPLICATE_OVERLAP`` (Jaccard, segments of 2+ tokens);
3. the rest are ranked by importance and kept greedily, most important first, while they fit; the kept ones stay in
   their original order with their weights (and textual-inversion vectors, which no cut ever splits).

Importance comes from a *judge*. :class:`PositionJudge` (no model: the ``tokens`` command without one) ranks earlier
segments higher, so its rule is "deduplicate, then keep whole segments from the start". The encoder's judge lives
in ``text/conditioning.py``: a segment's importance is how much removing it changes the prompt's full chunked
encoding. Every dropped segment is reported with its reason and score. Deterministic: ties go to the earlier
segment. No torch here.
"""

from collections import Counter
from dataclasses import dataclass, field

SEPARATOR_IDS = frozenset({267, 269, 282})  # ",</w>", ".</w>", ";</w>" in the CLIP vocabulary
BREAK_ID = -1  # as in chunking.py
NEAR_DUPLICATE_OVERLAP = 1.0  # Jaccard overlap of two segments' token multisets: 1.0 = same tokens, any order


@dataclass(frozen=True)
class Segment:
    """Consecutive ``(id, weight)`` pairs of the stream, its separator included; ``index`` counts from 0."""

    index: int
    tokens: tuple

    @property
    def key(self) -> tuple:
        return tuple(t for t, _ in self.tokens if t not in SEPARATOR_IDS)

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class Dropped:
    index: int
    tokens: tuple
    reason: str  # "duplicate" | "near-duplicate" | "importance"
    score: float | None = None  # importance, or similarity for a near-duplicate
    of: int | None = None  # the segment kept in its place (duplicates)


@dataclass(frozen=True)
class Summary:
    stream: list  # the kept (id, weight) pairs
    segments: int
    dropped: tuple = ()
    rule: str = ""
    notes: tuple = ()
    scores: dict = field(default_factory=dict)  # index -> importance, when ranked


def near_duplicates(segments) -> list:
    """``(i, j, overlap)`` for segments i < j of 2+ tokens whose token multisets overlap by at least
    ``NEAR_DUPLICATE_OVERLAP`` (Jaccard)."""
    bags = [Counter(s.key) for s in segments]
    pairs = []
    for j in range(len(segments)):
        for i in range(j):
            a, b = bags[i], bags[j]
            if a.total() >= 2 and b.total() >= 2:
                overlap = (a & b).total() / (a | b).total()
                if overlap >= NEAR_DUPLICATE_OVERLAP:
                    pairs.append((i, j, overlap))
    return pairs


class PositionJudge:
    """No encoder: earlier segments matter more."""

    rule = "position (no encoder at hand: deduplicate, then keep whole segments from the start)"

    def importance(self, segments) -> list:
        return [-float(i) for i in range(len(segments))]

    def near_duplicates(self, segments) -> list:
        return near_duplicates(segments)


def _units(pairs, spans) -> list:
    """Pairs grouped so that an embedding's vectors (``spans``: first pseudo id -> vector count) form one unit."""
    units, i = [], 0
    while i < len(pairs):
        n = (spans or {}).get(pairs[i][0], 1)
        units.append(pairs[i:i + n])
        i += len(units[-1])
    return units


def split_segments(stream, capacity: int, spans=None) -> tuple:
    """``(segments, notes)``. A segment longer than ``capacity`` is cut into pieces of at most ``capacity``
    tokens, never inside an embedding (``spans``: first pseudo id -> vector count)."""
    segments, current, notes, breaks = [], [], [], 0

    def close():
        nonlocal current
        if current:
            segments.append(current)
        current = []

    for token, weight in stream:
        if token == BREAK_ID:
            breaks += 1
            close()
            continue
        current.append((token, weight))
        if token in SEPARATOR_IDS:
            close()
    close()
    if breaks:
        notes.append(f"summarize: {breaks} BREAK(s) ignored (the summary is one window)")
    pieces = []
    for seg in segments:
        if len(seg) <= capacity:
            pieces.append(seg)
            continue
        piece = []
        for unit in _units(seg, spans):
            if piece and len(piece) + len(unit) > capacity:
                pieces.append(piece)
                piece = []
            piece = piece + unit
        pieces.append(piece)
    if len(pieces) > len(segments):
        notes.append(f"summarize: segments longer than {capacity} tokens were cut into pieces of at most {capacity}")
    return [Segment(i, tuple(p)) for i, p in enumerate(pieces)], notes


def summarize(stream, capacity: int = 75, judge=None, spans=None) -> Summary:
    """Choose the segments of ``stream`` (``(id, weight)`` pairs, BREAK as ``(-1, -1.0)``) that fit in
    ``capacity`` tokens. ``judge`` has ``importance(segments) -> [float]`` (higher = keep) and
    ``near_duplicates(segments) -> [(i, j, similarity)]`` (positions in the list given, i < j); default
    :class:`PositionJudge`."""
    judge = judge or PositionJudge()
    stream = list(stream)
    segments, notes = split_segments(stream, capacity, spans)
    total = sum(len(s) for s in segments)
    rule = getattr(judge, "rule", type(judge).__name__)
    if total <= capacity:
        return Summary([p for s in segments for p in s.tokens], len(segments), (), rule, tuple(notes))

    dropped, alive = [], []
    first = {}
    for seg in segments:  # 1. exact duplicates
        if seg.key and seg.key in first:
            dropped.append(Dropped(seg.index, seg.tokens, "duplicate", None, first[seg.key]))
        else:
            first.setdefault(seg.key, seg.index)
            alive.append(seg)

    if sum(len(s) for s in alive) > capacity:  # 2. near-duplicates, the later one goes
        gone = set()
        for i, j, similarity in sorted(judge.near_duplicates(alive), key=lambda p: (p[1], p[0])):
            if i in gone or j in gone:
                continue
            gone.add(j)
            seg = alive[j]
            dropped.append(Dropped(seg.index, seg.tokens, "near-duplicate", float(similarity), alive[i].index))
        alive = [s for k, s in enumerate(alive) if k not in gone]

    scores = {}
    if sum(len(s) for s in alive) > capacity:  # 3. importance, kept greedily while they fit
        values = judge.importance(alive)
        scores = {s.index: float(v) for s, v in zip(alive, values)}
        order = sorted(range(len(alive)), key=lambda k: (-values[k], k))
        room, keep = capacity, set()
        for k in order:
            if len(alive[k]) <= room:  # an embedding longer than the window never fits: dropped, reported
                keep.add(k)
                room -= len(alive[k])
        for k, seg in enumerate(alive):
            if k not in keep:
                dropped.append(Dropped(seg.index, seg.tokens, "importance", float(values[k])))
        alive = [s for k, s in enumerate(alive) if k in keep]

    kept = [p for s in alive for p in s.tokens]
    dropped.sort(key=lambda d: d.index)
    return Summary(kept, len(segments), tuple(dropped), rule, tuple(notes), scores)


def dropped_segments(summary: Summary, decode) -> tuple:
    """The report's record of each dropped segment: ``{"index", "text", "tokens", "reason", "score", "of"}``."""
    return tuple({"index": d.index, "text": decode([t for t, _ in d.tokens]).strip(), "tokens": len(d.tokens),
                  "reason": d.reason, "score": d.score, "of": d.of} for d in summary.dropped)


def describe(summary: Summary, decode) -> list:
    """One line per dropped segment, for the report: ``decode(ids) -> text`` (pseudo ids included)."""
    lines = []
    for d in summary.dropped:
        text = decode([t for t, _ in d.tokens]).strip()
        if d.reason == "duplicate":
            lines.append(f"dropped segment {d.index} {text!r}: duplicate of segment {d.of}")
        elif d.reason == "near-duplicate":
            lines.append(f"dropped segment {d.index} {text!r}: near-duplicate of segment {d.of} "
                         f"(similarity {d.score:.3f})")
        else:
            lines.append(f"dropped segment {d.index} {text!r}: importance {d.score:.4g}")
    return lines
