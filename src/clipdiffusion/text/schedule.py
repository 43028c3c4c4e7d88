"""The prompt language above emphasis: editing ``[from:to:when]``, alternation ``[a|b]``, composable ``AND`` and
extra-network tags ``<lora:name:w>``, with AUTOMATIC1111 v1.10's semantics (``modules/prompt_parser.py``,
``modules/extra_networks.py``; ``shared/reference/prompt-language-and-networks.md`` sections 1-3). Torch-free.

A positive prompt goes through, in A1111's order: tags removed (:func:`extract_extra_networks`), ``AND`` split
(:func:`split_composable`), each part expanded into a step schedule (:func:`prompt_schedule`); every schedule text
is then parsed for emphasis (``prompt.parse_prompt``) and encoded. :func:`plan_prompt` does the three steps and
returns a :class:`PromptProgram`. A negative prompt is only scheduled: ``AND`` and tags stay text there.

Schedules. A1111 parses with a Lark Earley grammar; this module parses the same language in one left-to-right pass.
Inside a bracket the grammar is deterministic (``[`` opens emphasis ``[p]``, editing ``[p:n]`` / ``[p:p:n]`` or
alternation ``[p|p...]``; ``(`` opens ``(p)`` / ``(p:p)``; no stray bracket, colon or bar is allowed), so each
opening bracket either starts one well-formed structure or none. At the top level stray ``[ ] ( ) :`` are text, and
where a bracket could be either, A1111's parser takes the structure (``[a:[b:c:1]:2]`` is one edit, not text around
an inner one); a ``|`` outside an alternation, or a ``\\`` with nothing (or a newline) after it, makes the whole
prompt unparseable, and A1111 then uses it as written at every step (so ``[a|b] c|d`` does not alternate). Emphasis
brackets and escapes are kept as written: ``parse_prompt`` reads them per text later.

``when``: with a ``.`` in the literal it is a fraction, ``int((x - flt_offset) * steps)``; otherwise a step,
``int(x - int_offset)``; clamped to ``steps``; ``int`` truncates toward zero, the float arithmetic is A1111's, so
``0.29`` of 100 steps is step 28 there and here. Only ``when >= 1`` adds a boundary, but ``when <= 0`` still
selects ``to`` from the first step. Any alternation (even one in a branch never shown) makes every step a
boundary, and step ``t`` shows alternative ``(t - 1) mod n``. The schedule is A1111's list exactly:
``[(end_step, text), ...]`` ascending, the last ``end_step == steps``, entries with equal texts not merged.

Decisions where A1111 fails or is not deterministic (each is tested):

- A structure whose closing bracket is directly followed by a stray ``[ ] ( ) :`` (``[a:2](``, ``x[a:2]:``) is
  ambiguous in A1111's grammar, and which parse its Earley parser keeps depends on the Python process's hash seed:
  the same prompt is scheduled in one A1111 process and literal in the next. Here the structure is taken, as A1111
  always does without the stray character.
- A ``when`` too large for a float (``[a:b:1e999]``) crashes A1111 (``int(inf)``); here it is clamped like any
  other large value (``-1e999`` selects ``to`` from the start), with a note from :func:`plan_prompt`.
- Nesting has no depth limit and never recurses (A1111's tree transformer would hit Python's recursion limit);
  ``parse_prompt`` still refuses emphasis nested deeper than ``MAX_NESTING`` in a schedule text.
- The schedule's distinct texts are built once each and shared by the entries that show them; if they would add
  up to more than ``MAX_SCHEDULE_CHARS`` characters (alternations with coprime lengths over many steps of a long
  prompt), :class:`PromptError` names the prompt instead of exhausting memory. ``steps`` is limited to
  ``MAX_SCHEDULE_STEPS``.
- A non-finite ``AND`` weight (a 400-digit number) is a :class:`PromptError` (it would make the whole image NaN);
  so is, from :meth:`ExtraNetwork.lora_weights`, a non-finite multiplier or a ``dyn`` below 1 (:func:`plan_prompt`
  does not raise for tags: :func:`network_info` reports the error as the tag's status).
"""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass

from ..errors import PromptError
from .networks import _TAG, extract_extra_networks, network_info
from .prompt import check_text

MAX_SCHEDULE_STEPS = 100_000
# Characters of distinct schedule texts, all parts together; 250 steps of a 200,000-character prompt.
MAX_SCHEDULE_CHARS = 50_000_000
# Characters a token counter tokenizes for one prompt (all its distinct texts): a live counter stays fast.
MAX_COUNTED_CHARS = 2_000_000

# -- schedule grammar ------------------------------------------------------------------------------------------

# Lexer: a text run (anything but the grammar's characters, or a backslash and the character after it, a newline
# excepted), one grammar character, or a backslash that escapes nothing (which makes the prompt unparseable).
_TOKEN = re.compile(r"(?:[^\\\[\]():|]+|\\.)+|[\[\]():|]|\\", re.UNICODE)
# Lark's SIGNED_NUMBER (ASCII digits), with the optional whitespace the grammar allows around it.
_WHEN = re.compile(r"\s*([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*")

_FIRST, _COLON1, _COLON2, _ALT = range(4)


class _Edit:
    """``[before:after:when]``; ``before`` is None for ``[after:when]``."""

    __slots__ = ("before", "after", "literal", "when")

    def __init__(self, before, after, literal):
        self.before, self.after, self.literal, self.when = before, after, literal, 0


class _Alternation:
    __slots__ = ("options",)

    def __init__(self, options):
        self.options = options


class _Frame:
    """An open bracket whose structure is not decided yet. ``sections`` are the item lists between its
    separators; ``seps`` the separators' positions in the prompt."""

    __slots__ = ("bracket", "pos", "state", "sections", "seps")

    def __init__(self, bracket, pos):
        self.bracket, self.pos, self.state = bracket, pos, _FIRST
        self.sections, self.seps = [[]], []


class _ParseError(Exception):
    """The prompt is not in A1111's schedule grammar: it is used as written."""


def _flatten_failed(stack, top) -> None:
    """Every open bracket failed together (a bracket inside a structure must itself be a structure, so when the
    innermost fails, so do all around it): their brackets and separators become text, the structures completed
    inside them stay."""
    for frame in stack:
        if frame.state == _ALT:
            raise _ParseError  # its "|" would be at the top level
        top.append((frame.pos, frame.pos + 1))
        for k, section in enumerate(frame.sections):
            if k:
                top.append((frame.seps[k - 1], frame.seps[k - 1] + 1))
            top.append(section)
    stack.clear()


def _close(frame, end, prompt, nodes):
    """The item the frame becomes when its closing bracket is at ``end``, or None if it is no structure."""
    sections = frame.sections
    if frame.state == _FIRST or frame.bracket == "(":  # emphasis: kept as written, brackets included
        group = [(frame.pos, frame.pos + 1)]
        for k, section in enumerate(sections):
            if k:
                group.append((frame.seps[k - 1], frame.seps[k - 1] + 1))
            group.append(section)
        group.append((end, end + 1))
        return group
    if frame.state == _ALT:
        node = _Alternation(sections)
    else:
        number = sections[-1]
        if len(number) != 1 or type(number[0]) is not tuple:
            return None
        m = _WHEN.fullmatch(prompt, *number[0])
        if m is None:
            return None
        before = sections[0] if frame.state == _COLON2 else None
        node = _Edit(before, sections[-2], m.group(1))
    nodes.append(node)
    return node


def _parse(prompt: str):
    """``(items, nodes)``: the prompt as a tree of items (``(start, end)`` spans of the prompt, lists rendered in
    order, edit and alternation nodes) and every node in it; raises :class:`_ParseError`."""
    top, stack, nodes = [], [], []
    for m in _TOKEN.finditer(prompt):
        start, end = m.span()
        char = prompt[start]
        if end - start > 1 or char not in "[]():|\\":
            (stack[-1].sections[-1] if stack else top).append((start, end))
            continue
        while True:  # at most twice: once inside the open brackets, once more at the top level if they failed
            frame = stack[-1] if stack else None
            if char == "\\":
                raise _ParseError
            if frame is None:
                if char in "[(":
                    stack.append(_Frame(char, start))
                elif char == "|":
                    raise _ParseError
                else:
                    top.append((start, end))  # a stray bracket or colon is text
                break
            failed = False
            if char in "[(":
                if frame.state == _COLON2:
                    failed = True  # only a number may follow the second colon
                else:
                    stack.append(_Frame(char, start))
            elif char == ":":
                if frame.bracket == "[" and frame.state in (_FIRST, _COLON1):
                    frame.state += 1
                elif frame.bracket == "(" and frame.state == _FIRST:
                    frame.state = _COLON1
                else:
                    failed = True
                if not failed:
                    frame.seps.append(start)
                    frame.sections.append([])
            elif char == "|":
                if frame.bracket == "[" and frame.state in (_FIRST, _ALT):
                    frame.state = _ALT
                    frame.seps.append(start)
                    frame.sections.append([])
                else:
                    failed = True
            else:  # a closing bracket
                item = _close(frame, start, prompt, nodes) if (char == "]") == (frame.bracket == "[") else None
                if item is None:
                    failed = True
                else:
                    stack.pop()
                    (stack[-1].sections[-1] if stack else top).append(item)
            if not failed:
                break
            _flatten_failed(stack, top)
    _flatten_failed(stack, top)
    return top, nodes


def _render(prompt: str, items, step: int) -> str:
    """The text at ``step`` (no recursion: nesting depth is unbounded)."""
    out = []
    stack = [iter(items)]
    while stack:
        for item in stack[-1]:
            kind = type(item)
            if kind is tuple:
                out.append(prompt[item[0]:item[1]])
                continue
            if kind is list:
                branch = item
            elif kind is _Edit:
                branch = item.before if step <= item.when else item.after
            else:
                branch = item.options[(step - 1) % len(item.options)]
            if branch:
                stack.append(iter(branch))
                break
        else:
            stack.pop()
    return "".join(out)


def _when(literal: str, steps: int, int_offset: int, flt_offset: float) -> int:
    value = float(literal)
    value = (value - flt_offset) * steps if "." in literal else value - int_offset
    if math.isinf(value):
        return steps if value > 0 else 0
    return min(steps, int(value))


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_SCHEDULE_STEPS:
        raise PromptError(f"schedule steps must be an integer from 1 to {MAX_SCHEDULE_STEPS}, got {steps!r}")
    return steps


def _schedule(prompt: str, steps: int, int_offset=0, flt_offset=0.0, budget=None):
    """``(schedule, notes)``; ``budget`` is a one-element list of characters still allowed (shared by parts)."""
    if budget is None:
        budget = [MAX_SCHEDULE_CHARS]
    try:
        items, nodes = _parse(prompt)
    except _ParseError:
        return [(steps, prompt)], ["schedule syntax could not be parsed (a '|' outside [a|b], or a '\\' that "
                                   "escapes nothing): the prompt is used as written at every step"]
    notes = []
    boundaries = {steps}
    whens, sizes = set(), set()
    for node in nodes:
        if type(node) is _Edit:
            node.when = _when(node.literal, steps, int_offset, flt_offset)
            if math.isinf(float(node.literal)):
                notes.append(f"[...:{node.literal}]: the step is beyond any float; taken as "
                             f"{'the last step' if node.when > 0 else 'before the first step'}")
            whens.add(node.when)
            if node.when >= 1:
                boundaries.add(node.when)
        else:
            sizes.add(len(node.options))
    if sizes:
        boundaries.update(range(1, steps + 1))
    whens, sizes = sorted(whens), sorted(sizes)
    texts, out = {}, []
    for step in sorted(boundaries):
        # Two steps with the same choice in every edit and alternation show the same text: build it once.
        key = (bisect.bisect_left(whens, step), tuple((step - 1) % n for n in sizes))
        text = texts.get(key)
        if text is None:
            text = texts[key] = _render(prompt, items, step)
            budget[0] -= len(text)
            if budget[0] < 0:
                raise PromptError(
                    f"prompt {prompt[:40]!r}... over {steps} steps has {len(texts)}+ different texts of up to "
                    f"{len(prompt)} characters (more than {MAX_SCHEDULE_CHARS} in all); use fewer steps or a "
                    "shorter prompt")
        out.append((step, text))
    return out, notes


def _check_offsets(int_offset, flt_offset):
    if isinstance(int_offset, bool) or not isinstance(int_offset, int):
        raise PromptError(f"int_offset must be an integer, got {int_offset!r}")
    if isinstance(flt_offset, bool) or not isinstance(flt_offset, (int, float)) or not math.isfinite(flt_offset):
        raise PromptError(f"flt_offset must be a finite number, got {flt_offset!r}")
    return int_offset, float(flt_offset)


def prompt_schedule(prompt: str, steps: int, *, int_offset: int = 0, flt_offset: float = 0.0) -> list:
    """A1111's step schedule of one prompt: ``[(end_step, text), ...]`` (see the module docstring).

    ``"[a:b:10]"`` over 20 steps is ``[(10, "a"), (20, "b")]``: text ``a`` at steps 1..10, ``b`` at 11..20. For a
    hires pass A1111 schedules over the hires steps with ``int_offset`` = the first pass's steps and
    ``flt_offset`` = 1.0, so ``[a:b:25]`` switches at hires step 5 after a 20-step first pass."""
    prompt = check_text(prompt)
    steps = _check_steps(steps)
    int_offset, flt_offset = _check_offsets(int_offset, flt_offset)
    return _schedule(prompt, steps, int_offset, flt_offset)[0]


# -- AND -------------------------------------------------------------------------------------------------------

_AND = re.compile(r"\bAND\b")
# A part's optional trailing weight: " : 1.5", ":.5", ": -2" (A1111's number form), then only whitespace.
_PART = re.compile(r"(?P<text>.*?)(?:\s*:\s*(?P<weight>[-+]?(?:\d+\.?|\d*\.\d+)))?\s*", re.S)


def split_composable(prompt: str) -> list:
    """A1111's composable-diffusion split: ``"a cat AND a dog:0.5"`` -> ``[("a cat", 1.0), (" a dog", 0.5)]``.

    ``AND`` is case-sensitive and a whole word (``ANDROID``, ``x and y``, ``a_AND_b`` are not split). Each part
    keeps its leading whitespace and loses its trailing whitespace; a trailing weight that is not exactly a number
    (``y:1.2.3``, ``a (dog:1.2)``) stays in the text with weight 1. ``"cat AND "`` ends with an empty part."""
    prompt = check_text(prompt)
    parts = []
    for piece in _AND.split(prompt):
        m = _PART.fullmatch(piece)
        weight = 1.0 if m["weight"] is None else float(m["weight"])
        if not math.isfinite(weight):
            raise PromptError(f"AND weight {m['weight'][:40]!r} of {m['text'][:40]!r} is not finite")
        parts.append((m["text"], weight))
    return parts


# -- the whole positive or negative prompt ---------------------------------------------------------------------


@dataclass(frozen=True)
class PromptProgram:
    """Everything sampling needs from one prompt, built once per generation by :func:`plan_prompt`.

    ``parts[i] = (weight, schedule)`` per ``AND`` part (one part for a negative prompt), ``part_texts[i]`` the
    part's text before scheduling. ``notes`` says whatever was not taken at face value; nothing is silent."""

    text: str
    networks: tuple
    parts: tuple
    notes: tuple
    part_texts: tuple = ()
    steps: int = 0

    def texts(self) -> list:
        """The distinct schedule texts of all parts, in order of first use: what has to be encoded."""
        return list(dict.fromkeys(text for _, schedule in self.parts for _, text in schedule))

    def to_dict(self) -> dict:
        """JSON-ready, linear in the prompt: each distinct text once, schedule entries refer to it by index."""
        texts = self.texts()
        index = {text: k for k, text in enumerate(texts)}
        schedule, parts = [], []
        for p, ((weight, entries), text) in enumerate(zip(self.parts, self.part_texts)):
            parts.append({"text": text, "weight": weight})
            start = 1
            for end, t in entries:
                schedule.append({"part": p, "start": start, "end": end, "text_index": index[t]})
                start = end + 1
        return {"steps": self.steps, "text": self.text, "texts": texts, "schedule": schedule, "parts": parts,
                "networks": [network_info(n) for n in self.networks], "notes": list(self.notes)}


def counted_program(program: PromptProgram, count) -> dict:
    """:meth:`PromptProgram.to_dict` for token counters: ``texts[i]`` becomes ``{"text": text, **count(text)}``
    (``count`` returns at least ``"count"`` and ``"total_tokens"``), and ``headline`` is the index of the text with
    the most tokens, the first on ties: A1111's counter shows the largest count over all texts of all parts."""
    info = program.to_dict()
    total = sum(len(text) for text in info["texts"])
    if total > MAX_COUNTED_CHARS:
        raise PromptError(f"prompt {program.text[:40]!r}... over {program.steps} steps has {len(info['texts'])} "
                          f"different texts, {total} characters in all; the token counter counts at most "
                          f"{MAX_COUNTED_CHARS}: use fewer steps")
    info["texts"] = [{"text": text, **count(text)} for text in info["texts"]]
    counts = [(t["count"], t["total_tokens"]) for t in info["texts"]]
    info["headline"] = counts.index(max(counts))
    return info


def plan_prompt(prompt: str, steps: int, *, negative: bool = False, int_offset: int = 0,
                flt_offset: float = 0.0) -> PromptProgram:
    """A1111's processing of one prompt: for a positive prompt, tags out, ``AND`` split, every part scheduled;
    for ``negative=True`` only the schedule (``AND`` and tags are text there, as in A1111)."""
    prompt = check_text(prompt)
    steps = _check_steps(steps)
    int_offset, flt_offset = _check_offsets(int_offset, flt_offset)
    notes, networks = [], []
    if negative:
        text, pieces = prompt, [(prompt, 1.0)]
        if _AND.search(prompt):
            notes.append("negative prompt: AND is text here (A1111 does not split negative prompts)")
        tags = [m.group(0) for m in _TAG.finditer(prompt)]
        if tags:
            notes.append(f"negative prompt: {', '.join(t[:60] for t in tags[:5])} "
                         f"{'is' if len(tags) == 1 else 'are'} text here (A1111 reads no tags in negative prompts)")
    else:
        # The tags are data for the caller, who says what it applies (network_info: nothing yet).
        text, networks = extract_extra_networks(prompt)
        pieces = split_composable(text)
    budget = [MAX_SCHEDULE_CHARS]
    parts = []
    for p, (piece, weight) in enumerate(pieces):
        schedule, part_notes = _schedule(piece, steps, int_offset, flt_offset, budget)
        where = f"AND part {p + 1}: " if len(pieces) > 1 else ""
        notes += [where + note for note in part_notes]
        parts.append((weight, tuple(schedule)))
    return PromptProgram(text, tuple(networks), tuple(parts), tuple(notes), tuple(t for t, _ in pieces), steps)
