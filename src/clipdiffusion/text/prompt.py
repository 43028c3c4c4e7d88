"""AUTOMATIC1111's emphasis grammar (``modules/prompt_parser.py: parse_prompt_attention``), reimplemented.

``parse_prompt(text) -> [(text, weight), ...]``:

- ``(x)`` multiplies by 1.1, ``[x]`` by 1/1.1; nesting multiplies (``((x))`` = 1.21).
- ``(x:w)`` multiplies by ``w`` and closes the innermost ``(``; the weight is ``[+-]?[.\\d]+`` with optional
  whitespace around it, so ``(x: 1.2 )`` works and ``((x:1.3))`` is 1.43.
- ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` give the character; a lone ``\\`` is dropped.
- Brackets still open at the end are closed there (an unclosed ``(`` weights everything after it by 1.1);
  a ``)`` or ``]`` with no opener is literal text; ``(x:abc)`` is the literal ``x:abc`` at 1.1.
- ``BREAK`` (uppercase, a whole word, surrounding whitespace consumed) is the segment ``("BREAK", -1.0)``.
  Inside brackets its weight is multiplied too (``(BREAK)`` gives ``("BREAK", -1.1)``), which A1111's chunker
  then treats as the plain word; kept for compatibility.
- Neighbours with equal weights are merged; the empty prompt gives ``[("", 1.0)]``.

Weights are multiplied in the order the brackets close, exactly as A1111 does, so the floats (and therefore
which neighbours merge) are bit-identical to A1111's.

Decisions where A1111 crashes or does something harmful (each is tested):

- A weight the regex accepts but ``float`` does not (``(x:1.2.3)``, ``(x:.)``) raises :class:`PromptError`;
  A1111 raises a bare ``ValueError`` there.
- A non-finite weight raises :class:`PromptError` naming the segment and the value, since it would turn the
  whole conditioning tensor into NaN. ``(x:1e309)``, ``(x:inf)`` and ``(x:nan)`` are *not* weights in this
  grammar (no letters allowed): they are the literal texts ``x:1e309`` etc. at 1.1, as in A1111. Non-finite
  weights come from a long digit string (``(x:1000...0)``, 310 digits) or products that overflow.
- Text inside more than ``MAX_NESTING`` open brackets raises :class:`PromptError`. A1111's cost is
  (segments x nesting depth); the limit keeps the parser linear in the prompt length. Brackets that enclose no
  text cost nothing, so ``"(" * 100_000`` alone parses (to ``[("", 1.0)]``).
- A prompt over ``MAX_PROMPT_CHARS`` characters raises :class:`PromptError`; anything shorter parses in linear
  time (well under a second for 200,000 characters of the worst bracket patterns).
- Non-string input raises :class:`PromptError`; UTF-8 bytes are decoded (an error names the bad bytes).
"""

import math
import re

from ..errors import PromptError

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK = ("BREAK", -1.0)
# Same limit as text/chunking.py's MAX_PROMPT_CHARS: beyond this it is a pasted file, not a prompt.
MAX_PROMPT_CHARS = 200_000
# Text nested deeper than this (1.1**32 = 21x) is an error; see the module docstring.
MAX_NESTING = 32

# A1111's token regex, alternatives in the same order: escapes, lone backslash, openers, ":weight)" closer,
# closers, plain text, a lone ":". \d and \s are Unicode-aware, as in A1111 (so "(x:１.５)" is 1.5 there too).
_TOKENS = re.compile(
    r"""
      \\[()\[\]\\]                     # escaped bracket or backslash
    | \\                               # a lone backslash, dropped
    | [(\[]
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)
    | [)\]]
    | [^\\()\[\]:]+
    | :
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def _check_prompt(text) -> str:
    if isinstance(text, (bytes, bytearray, memoryview)):
        from .tokenizer import decode_prompt_bytes

        text = decode_prompt_bytes(text, "prompt")
    if not isinstance(text, str):
        raise PromptError(f"prompt must be a string, got {type(text).__name__}: {text!r:.60}")
    if len(text) > MAX_PROMPT_CHARS:
        raise PromptError(f"prompt has {len(text)} characters; the maximum is {MAX_PROMPT_CHARS}")
    return text


class _Segments:
    """A1111's ``res`` list, except that consecutive appends with nothing in between are stored as one entry.

    Two such appends would receive the same multipliers in the same order, so A1111 merges them at the end
    anyway; storing them together keeps the work per bracket proportional to the entries it actually spans."""

    def __init__(self):
        self.texts = []  # list of lists of str (joined at the end)
        self.weights = []
        self.depth = 0  # open brackets, for MAX_NESTING
        self._sealed = True  # a bracket event happened since the last append: the next append is a new entry

    def append(self, text: str, weight: float, source: str) -> None:
        if not self._sealed and self.weights[-1] == weight:
            self.texts[-1].append(text)
            return
        if self.depth > MAX_NESTING:
            raise PromptError(
                f"prompt text {source[:40]!r} is inside {self.depth} open brackets; the maximum is {MAX_NESTING}"
            )
        self.texts.append([text])
        self.weights.append(weight)
        self._sealed = False

    def mark(self) -> int:
        """Position where a bracket opens; later appends start a new entry."""
        self._sealed = True
        return len(self.weights)

    def multiply(self, start: int, multiplier: float) -> None:
        weights = self.weights
        for p in range(start, len(weights)):
            weights[p] *= multiplier
        self._sealed = True


def _append_text(res: _Segments, text: str) -> None:
    if "BREAK" not in text:
        res.append(text, 1.0, text)
        return
    for i, part in enumerate(_BREAK.split(text)):
        if i:
            res.append(BREAK[0], BREAK[1], text)
        res.append(part, 1.0, text)


def _parse_weight(value: str, match: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise PromptError(f"prompt weight {value!r} in {match!r} is not a number") from None


def parse_prompt(text) -> list:
    """A1111 emphasis parse: ``"a (b:1.2) c"`` -> ``[("a ", 1.0), ("b", 1.2), (" c", 1.0)]``.

    See the module docstring for the grammar and the documented errors."""
    text = _check_prompt(text)
    res = _Segments()
    round_open, square_open = [], []
    for m in _TOKENS.finditer(text):
        token = m.group(0)
        weight = m.group("weight")
        if token[0] == "\\":
            res.append(token[1:], 1.0, token)
        elif token == "(":
            round_open.append(res.mark())
            res.depth += 1
        elif token == "[":
            square_open.append(res.mark())
            res.depth += 1
        elif weight is not None and round_open:
            res.multiply(round_open.pop(), _parse_weight(weight, token))
            res.depth -= 1
        elif token == ")" and round_open:
            res.multiply(round_open.pop(), ROUND_MULTIPLIER)
            res.depth -= 1
        elif token == "]" and square_open:
            res.multiply(square_open.pop(), SQUARE_MULTIPLIER)
            res.depth -= 1
        else:
            _append_text(res, token)
    # A1111 closes the leftovers outermost first: all "(" in order, then all "["
    for start in round_open:
        res.multiply(start, ROUND_MULTIPLIER)
    for start in square_open:
        res.multiply(start, SQUARE_MULTIPLIER)
    return _merged(res)


def _merged(res: _Segments) -> list:
    out = []
    for parts, weight in zip(res.texts, res.weights):
        piece = "".join(parts)
        if not math.isfinite(weight):
            raise PromptError(f"prompt weight of {piece[:40]!r} is {weight} (not finite); use a smaller weight")
        if out and out[-1][1] == weight:
            out[-1] = (out[-1][0] + piece, weight)
        else:
            out.append((piece, weight))
    return out or [("", 1.0)]


def check_text(prompt, field: str = "prompt") -> str:
    """``prompt`` if it is a string of at most ``MAX_PROMPT_CHARS`` characters, else a ``PromptError`` naming
    ``field``."""
    if not isinstance(prompt, str):
        raise PromptError(f"{field} must be a string, got {type(prompt).__name__}: {prompt!r:.60}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise PromptError(f"{field} has {len(prompt)} characters; the maximum is {MAX_PROMPT_CHARS}")
    return prompt
