"""text/schedule.py: A1111's prompt editing and alternation schedules, the AND split, extra-network tags and
plan_prompt (shared/reference/prompt-language-and-networks.md sections 1-3).

The schedules are compared with an independent oracle written here a second way: a recursive, character-level
parser that tries a structure at each bracket and falls back to text (quadratic, fine for tests), where the product
is a one-pass token parser with explicit stacks. The hand-written expectations below were also checked during
development against A1111 v1.10's own algorithm run on its Lark grammar (lark 1.1.5); the reference's [verified]
examples are marked. A1111's Earley parser is ambiguous when a structure's closing bracket is directly followed by a
stray ``[ ] ( ) :`` (``[a:2](``): which parse it takes there depends on Python's hash seed, so the same prompt
schedules differently from one A1111 process to the next. Both sides here take the structure (what A1111 gives
without the stray character, and one of its outcomes); those cases are marked "seed-dependent in A1111".
"""

import math
import re
import time

import pytest

import clipdiffusion
from clipdiffusion.errors import ClipDiffusionError, PromptError
from clipdiffusion.text import networks
from clipdiffusion.text import schedule as sched
from clipdiffusion.text.networks import ExtraNetwork, extract_extra_networks
from clipdiffusion.text.schedule import PromptProgram, counted_program, plan_prompt, prompt_schedule, split_composable

# -- the oracle ------------------------------------------------------------------------------------------------

# Lark's SIGNED_NUMBER laid out as Lark does (INT EXP | DECIMAL EXP? | INT), ASCII digits, then the closing bracket.
_NUMBER_CLOSE = re.compile(
    r"\s*([+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+))\s*\]")


class Unparseable(Exception):
    """Not in the grammar at all: A1111 uses the prompt as written."""


class NoStructure(Exception):
    """The bracket being tried opens no structure."""


def _escape(s, i):
    if i + 1 == len(s) or s[i + 1] == "\n":
        raise Unparseable  # a backslash must escape a character, and "." does not match a newline
    return s[i:i + 2]


def _seq(s, i):
    """A prompt inside brackets, up to the first ] ) : | or the end: (pieces, index)."""
    out = []
    while i < len(s) and s[i] not in "]):|":
        if s[i] == "\\":
            out.append(_escape(s, i))
            i += 2
        elif s[i] in "[(":
            node, i = _structure(s, i)
            out.append(node)
        else:
            out.append(s[i])
            i += 1
    return out, i


def _at(s, i):
    return s[i] if i < len(s) else ""


def _structure(s, i):
    """The structure opened at s[i]: a list (emphasis, verbatim), ("alt", options) or ("edit", before, after,
    literal); raises NoStructure."""
    first, j = _seq(s, i + 1)
    if s[i] == "(":
        if _at(s, j) == ")":
            return ["(", *first, ")"], j + 1
        if _at(s, j) == ":":
            second, k = _seq(s, j + 1)
            if _at(s, k) == ")":
                return ["(", *first, ":", *second, ")"], k + 1
        raise NoStructure
    if _at(s, j) == "]":
        return ["[", *first, "]"], j + 1
    if _at(s, j) == "|":
        options = [first]
        while _at(s, j) == "|":
            option, j = _seq(s, j + 1)
            options.append(option)
        if _at(s, j) == "]":
            return ("alt", options), j + 1
        raise NoStructure
    if _at(s, j) == ":":
        m = _NUMBER_CLOSE.match(s, j + 1)
        if m:
            return ("edit", None, first, m.group(1)), m.end()
        second, k = _seq(s, j + 1)
        if _at(s, k) == ":":
            m = _NUMBER_CLOSE.match(s, k + 1)
            if m:
                return ("edit", first, second, m.group(1)), m.end()
    raise NoStructure


def oracle_tree(s):
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\":
            out.append(_escape(s, i))
            i += 2
        elif s[i] == "|":
            raise Unparseable
        elif s[i] in "[(":
            try:
                node, i = _structure(s, i)
                out.append(node)
            except NoStructure:  # a stray bracket: text, and what follows it is read again at the top level
                out.append(s[i])
                i += 1
        else:
            out.append(s[i])
            i += 1
    return out


def _nodes(tree):
    if isinstance(tree, str) or tree is None:
        return
    if isinstance(tree, list):
        for x in tree:
            yield from _nodes(x)
    elif tree[0] == "alt":
        yield tree
        for option in tree[1]:
            yield from _nodes(option)
    else:
        yield tree
        yield from _nodes(tree[1])
        yield from _nodes(tree[2])


def _when(literal, steps, int_offset, flt_offset):
    x = float(literal)
    v = (x - flt_offset) * steps if "." in literal else x - int_offset
    if math.isinf(v):
        return steps if v > 0 else 0  # A1111 crashes here (int(inf)); the product's documented choice
    return min(steps, int(v))


def _text(tree, step, whens):
    if tree is None:
        return ""
    if isinstance(tree, str):
        return tree
    if isinstance(tree, list):
        return "".join(_text(x, step, whens) for x in tree)
    if tree[0] == "alt":
        return _text(tree[1][(step - 1) % len(tree[1])], step, whens)
    return _text(tree[1] if step <= whens[id(tree)] else tree[2], step, whens)


def oracle_schedule(prompt, steps, int_offset=0, flt_offset=0.0):
    try:
        tree = oracle_tree(prompt)
    except Unparseable:
        return [(steps, prompt)]
    ends, whens = {steps}, {}
    for node in _nodes(tree):
        if node[0] == "alt":
            ends.update(range(1, steps + 1))
        else:
            whens[id(node)] = _when(node[3], steps, int_offset, flt_offset)
            if whens[id(node)] >= 1:
                ends.add(whens[id(node)])
    return [(t, _text(tree, t, whens)) for t in sorted(ends)]


# -- hand-written cases ----------------------------------------------------------------------------------------

CASES = [  # (prompt, steps, schedule)
    # the reference's table, 20 steps [verified]
    ("[a:b:10]", 20, [(10, "a"), (20, "b")]),
    ("[a:b:0.5]", 20, [(10, "a"), (20, "b")]),
    ("[a:b:0.99]", 20, [(19, "a"), (20, "b")]),  # 19.8 truncated
    ("[a:b:0.04]", 20, [(20, "b")]),
    ("[a:b:0]", 20, [(20, "b")]),
    ("[a:b:-3]", 20, [(20, "b")]),
    ("[a:b:1.0]", 20, [(20, "a")]),  # has ".": 1.0 * 20
    ("[a:b:1]", 20, [(1, "a"), (20, "b")]),
    ("[a:b:25]", 20, [(20, "a")]),  # clamped
    # nesting [verified]
    ("[a:[b|c]:3]", 6, [(1, "a"), (2, "a"), (3, "a"), (4, "c"), (5, "b"), (6, "c")]),
    ("(a:[b:c:2])", 20, [(2, "(a:b)"), (20, "(a:c)")]),
    # the number: Lark's SIGNED_NUMBER, whitespace around it, A1111's float arithmetic
    ("[a:b:1e1]", 20, [(10, "a"), (20, "b")]),  # no ".": a step
    ("[a:b:1E+1]", 20, [(10, "a"), (20, "b")]),
    ("[a:b:1e-1]", 20, [(20, "b")]),  # int(0.1) = 0
    ("[a:b: 5 ]", 20, [(5, "a"), (20, "b")]),
    ("[a:b:\t5\n]", 20, [(5, "a"), (20, "b")]),
    ("[a:b:+3]", 20, [(3, "a"), (20, "b")]),
    ("[a:b:.5]", 20, [(10, "a"), (20, "b")]),
    ("[a:b:5.]", 20, [(20, "a")]),  # "5." is a fraction: 100, clamped
    ("[a:b:0.29]", 100, [(28, "a"), (100, "b")]),  # 0.29 * 100 = 28.999999999999996
    ("[a:b:0.7]", 10, [(7, "a"), (10, "b")]),  # 7.000000000000001
    ("[a:b:５]", 20, [(20, "[a:b:５]")]),  # digits are ASCII only
    ("[a:b:- 5]", 20, [(20, "[a:b:- 5]")]),
    ("[a:b:\\5]", 20, [(20, "[a:b:\\5]")]),
    ("[: -5]", 20, [(20, "")]),
    # A1111's list exactly: entries whose text repeats are kept
    ("[a:a:5]", 20, [(5, "a"), (20, "a")]),
    ("[::5]", 20, [(5, ""), (20, "")]),
    ("[[a|b]:c:0]", 3, [(1, "c"), (2, "c"), (3, "c")]),  # an alternation never shown still adds every step
    # adding and removing
    ("a [dog:5]", 20, [(5, "a "), (20, "a dog")]),
    ("a [cat::5] b", 20, [(5, "a cat b"), (20, "a  b")]),
    ("a [:cat:5] b", 20, [(5, "a  b"), (20, "a cat b")]),
    ("[a :5 ]", 20, [(5, ""), (20, "a ")]),
    ("[a: :5]", 20, [(5, "a"), (20, " ")]),
    ("[ a : b : 5 ]", 20, [(5, " a "), (20, " b ")]),
    # alternation, empty alternatives
    ("[fe|]male", 4, [(1, "female"), (2, "male"), (3, "female"), (4, "male")]),
    ("[a||b]", 4, [(1, "a"), (2, ""), (3, "b"), (4, "a")]),
    ("[|]", 3, [(1, ""), (2, ""), (3, "")]),
    ("[[a|b]|c]", 4, [(1, "a"), (2, "c"), (3, "a"), (4, "c")]),
    ("[a|[b:c:2]]", 4, [(1, "a"), (2, "b"), (3, "a"), (4, "c")]),
    ("[[a:b:2]|c]", 4, [(1, "a"), (2, "c"), (3, "b"), (4, "c")]),
    ("[a [b|c] d:e:2]", 4, [(1, "a b d"), (2, "a c d"), (3, "e"), (4, "e")]),
    ("[a:b:3] [c:d:3]", 6, [(3, "a c"), (6, "b d")]),
    ("[a:b:2] [c|d]", 4, [(1, "a c"), (2, "a d"), (3, "b c"), (4, "b d")]),
    # emphasis kept as written, schedules inside it
    ("((a [b:c:1]:1.2) d)", 20, [(1, "((a b:1.2) d)"), (20, "((a c:1.2) d)")]),
    ("[a:(b):2]", 20, [(2, "a"), (20, "(b)")]),
    ("[a]", 20, [(20, "[a]")]),
    ("[]", 20, [(20, "[]")]),
    ("()", 20, [(20, "()")]),
    # escapes are kept as written (parse_prompt reads them later)
    ("\\[a:b:5\\]", 20, [(20, "\\[a:b:5\\]")]),
    ("[a\\:b:c:5]", 20, [(5, "a\\:b"), (20, "c")]),
    ("\\(a\\) [x:y:2]", 20, [(2, "\\(a\\) x"), (20, "\\(a\\) y")]),
    ("[a\\|b]", 4, [(4, "[a\\|b]")]),
    # stray brackets and colons are text; the structures around them still count
    ("[a:b:5", 20, [(20, "[a:b:5")]),
    ("[[a:b:5]", 20, [(5, "[a"), (20, "[b")]),
    ("[:]", 20, [(20, "[:]")]),
    ("[a:b:c]", 20, [(20, "[a:b:c]")]),
    ("[a:b:1:2]", 20, [(20, "[a:b:1:2]")]),
    ("[a:b:[c]]", 20, [(20, "[a:b:[c]]")]),
    ("(x [a:b:3] y ] )", 20, [(3, "(x a y ] )"), (20, "(x b y ] )")]),
    ("(a:b:c) [x:y:1]", 20, [(1, "(a:b:c) x"), (20, "(a:b:c) y")]),
    ("[a:[b:c:1]:2]", 20, [(1, "a"), (2, "a"), (20, "c")]),  # the outer edit, not text around the inner one
    ("][a:2]", 20, [(2, "]"), (20, "]a")]),
    (":[a:2]", 20, [(2, ":"), (20, ":a")]),
    ("([a:2]", 20, [(2, "("), (20, "(a")]),
    ("[a:2] (", 20, [(2, " ("), (20, "a (")]),
    ("([a:2])", 20, [(2, "()"), (20, "(a)")]),
    ("[[a:2]]", 20, [(2, "[]"), (20, "[a]")]),
    ("[a|b](", 4, [(1, "a("), (2, "b("), (3, "a("), (4, "b(")]),
    ("[a|b]]", 4, [(1, "a]"), (2, "b]"), (3, "a]"), (4, "b]")]),
    # seed-dependent in A1111 (see the module docstring): the structure is taken
    ("[a:2](", 20, [(2, "("), (20, "a(")]),
    ("[a:2]:", 20, [(2, ":"), (20, "a:")]),
    ("[a:2])", 20, [(2, ")"), (20, "a)")]),
    ("x[a:2](", 20, [(2, "x("), (20, "xa(")]),
    ("[a:[b:c:1]:2]]", 20, [(1, "a]"), (2, "a]"), (20, "c]")]),
    ("[a:[b:1]:c:2]", 20, [(1, "[a::c:2]"), (20, "[a:b:c:2]")]),
    # not in the grammar at all: the prompt as written at every step
    ("a|b", 20, [(20, "a|b")]),
    ("[a|b] c|d", 6, [(6, "[a|b] c|d")]),  # a "|" outside [a|b] spoils the whole prompt [verified]
    ("[a|b", 6, [(6, "[a|b")]),
    ("[a|b:5]", 4, [(4, "[a|b:5]")]),
    ("[(a|b)|c]", 4, [(4, "[(a|b)|c]")]),
    ("[a:b:2]|", 20, [(20, "[a:b:2]|")]),
    ("\\", 6, [(6, "\\")]),
    ("a\\", 6, [(6, "a\\")]),
    ("a\\\nb[x:y:2]", 6, [(6, "a\\\nb[x:y:2]")]),
    # AND and tags are not this function's business
    ("AND [a|b]", 2, [(1, "AND a"), (2, "AND b")]),
    ("<lora:x:1> [a:b:1]", 20, [(1, "<lora:x:1> a"), (20, "<lora:x:1> b")]),
]


@pytest.mark.parametrize("prompt, steps, expected", CASES, ids=[repr(c[0]) for c in CASES])
def test_hand_written_schedules(prompt, steps, expected):
    assert prompt_schedule(prompt, steps) == expected
    assert oracle_schedule(prompt, steps) == expected


def test_hires_offsets():
    # base 20 steps, hires 10 (reference section 1.3): offsets 20 and 1.0 [verified]
    hires = dict(int_offset=20, flt_offset=1.0)
    assert prompt_schedule("[a:b:25]", 10, **hires) == [(5, "a"), (10, "b")]
    assert prompt_schedule("[a:b:1.5]", 10, **hires) == [(5, "a"), (10, "b")]
    assert prompt_schedule("[a:b:15]", 10, **hires) == [(10, "b")]
    assert prompt_schedule("[a:b:0.5]", 10, **hires) == [(10, "b")]
    for prompt in ("[a:b:25]", "[a:[b|c]:1.2] [d:e:23]", "[x:y:0.99]"):
        for steps in (1, 7, 10):
            assert prompt_schedule(prompt, steps, **hires) == oracle_schedule(prompt, steps, 20, 1.0)


def test_a_when_beyond_any_float_is_clamped_not_a_crash():
    # A1111 raises OverflowError (int(inf)); here +inf is the last step and -inf before the first
    assert prompt_schedule("[a:b:1e999]", 20) == [(20, "a")]
    assert prompt_schedule("[a:b:-1e999]", 20) == [(20, "b")]
    assert prompt_schedule("[a:b:1.5e999]", 20) == [(20, "a")]
    program = plan_prompt("[a:b:1e999]", 20)
    assert program.notes and "1e999" in program.notes[0]


def test_bad_arguments_are_prompt_errors():
    for steps in (0, -1, 1.5, True, "20", sched.MAX_SCHEDULE_STEPS + 1):
        with pytest.raises(PromptError, match="steps"):
            prompt_schedule("a", steps)
    with pytest.raises(PromptError, match="string"):
        prompt_schedule(b"a", 20)
    with pytest.raises(PromptError, match="characters"):
        prompt_schedule("a" * 200_001, 20)
    with pytest.raises(PromptError, match="flt_offset"):
        prompt_schedule("a", 20, flt_offset=math.nan)
    with pytest.raises(PromptError, match="int_offset"):
        prompt_schedule("a", 20, int_offset=1.5)
    assert issubclass(PromptError, ClipDiffusionError)


# -- properties ------------------------------------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

BOUNDED = settings(max_examples=300, deadline=None, derandomize=True, database=None)
PIECES = ["[", "]", "(", ")", ":", "|", "\\", "a", "b", "1", ".", "5", " ", "cat", "red dog", "-2", "0.5", "1e1",
          "[a|b]", "[x:y:3]", "\n"]
prompts = st.lists(st.sampled_from(PIECES), max_size=30).map("".join)


@BOUNDED
@given(prompts, st.integers(1, 12))
def test_schedule_matches_the_oracle_and_keeps_its_invariants(prompt, steps):
    got = prompt_schedule(prompt, steps)
    assert got == oracle_schedule(prompt, steps)
    ends = [end for end, _ in got]
    assert ends == sorted(set(ends)) and ends[-1] == steps and ends[0] >= 1
    assert all(isinstance(text, str) and len(text) <= len(prompt) for _, text in got)


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(prompts, st.integers(1, 8), st.integers(-3, 30), st.sampled_from([0.0, 1.0, 0.5]))
def test_schedule_with_offsets_matches_the_oracle(prompt, steps, int_offset, flt_offset):
    got = prompt_schedule(prompt, steps, int_offset=int_offset, flt_offset=flt_offset)
    assert got == oracle_schedule(prompt, steps, int_offset, flt_offset)


@BOUNDED
@given(st.text(max_size=40))
def test_any_text_schedules_and_plans_without_surprises(text):
    got = prompt_schedule(text, 5)
    assert [end for end, _ in got][-1] == 5
    try:
        program = plan_prompt(text, 5)
    except PromptError as err:  # only an AND weight too large for a float
        assert "AND weight" in str(err)
        return
    assert all(schedule[-1][0] == 5 for _, schedule in program.parts)
    assert len(program.parts) == len(program.part_texts) == len(re.findall(r"\bAND\b", program.text)) + 1


# -- size and depth --------------------------------------------------------------------------------------------


def test_ten_thousand_alternations_over_a_thousand_steps_share_their_texts():
    prompt = "[a|b] " * 10_000
    start = time.perf_counter()
    got = prompt_schedule(prompt, 1000)
    elapsed = time.perf_counter() - start
    assert [end for end, _ in got] == list(range(1, 1001))
    assert got[0][1] == "a " * 10_000 and got[1][1] == "b " * 10_000
    assert len({id(text) for _, text in got}) == 2  # two texts built, shared by the 1000 entries
    assert elapsed < 20, elapsed  # generous: 2 shared cores; a few tenths of a second normally


def test_too_many_distinct_texts_are_refused(monkeypatch):
    # alternations of 2, 3, 5 and 7 options repeat only every 210 steps: 200 different texts
    prompt = "[a|b] [a|b|c] [a|b|c|d|e] [a|b|c|d|e|f|g] " + "x" * 1000
    assert len({text for _, text in prompt_schedule(prompt, 200)}) == 200
    monkeypatch.setattr(sched, "MAX_SCHEDULE_CHARS", 100_000)
    with pytest.raises(PromptError, match="different texts"):
        prompt_schedule(prompt, 200)
    with pytest.raises(PromptError, match="different texts"):
        plan_prompt(prompt + " AND " + prompt, 60)  # the budget is shared by the AND parts
    assert len(prompt_schedule(prompt, 20)) == 20


def test_deep_nesting_never_recurses():
    depth = 5000
    emphasis = "(" * depth + "[a:b:3]" + ")" * depth
    assert prompt_schedule(emphasis, 6) == [(3, "(" * depth + "a" + ")" * depth), (6, "(" * depth + "b" + ")" * depth)]
    edits = "[" * depth + "x" + "".join(f":y{k}:{k % 7 + 1}]" for k in range(depth))
    got = prompt_schedule(edits, 7)
    assert [end for end, _ in got] == list(range(1, 8))
    small = "[" * 40 + "x" + "".join(f":y{k}:{k % 7 + 1}]" for k in range(40))
    assert prompt_schedule(small, 7) == oracle_schedule(small, 7)
    unclosed = "[" * 100_000 + "a:b:1"
    assert prompt_schedule(unclosed, 3) == [(3, unclosed)]


def test_long_prompts_parse_in_linear_time():
    timings = {}
    for n in (20_000, 80_000):
        prompt = ("(a [b:c:2] d:1.1) [e|f] \\[ ]:(" * (n // 30))[:n]
        start = time.perf_counter()
        prompt_schedule(prompt, 4)
        timings[n] = time.perf_counter() - start
    assert timings[80_000] < 20 * timings[20_000] + 1.0, timings  # linear would be 4x


# -- AND -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt, expected", [
    # [verified] list, section 2.1
    ("x and y", [("x and y", 1.0)]),
    ("ANDROID", [("ANDROID", 1.0)]),
    ("a_AND_b", [("a_AND_b", 1.0)]),
    ("cat,AND,dog", [("cat,", 1.0), (",dog", 1.0)]),
    ("cat AND ", [("cat", 1.0), ("", 1.0)]),
    ("x AND y : 0.5", [("x", 1.0), (" y", 0.5)]),
    ("x AND y:.5", [("x", 1.0), (" y", 0.5)]),
    ("x AND y: -2", [("x", 1.0), (" y", -2.0)]),
    ("x AND y:1.2.3", [("x", 1.0), (" y:1.2.3", 1.0)]),
    ("x AND a (dog:1.2)", [("x", 1.0), (" a (dog:1.2)", 1.0)]),
    # more
    ("", [("", 1.0)]),
    ("  cat  ", [("  cat", 1.0)]),
    ("cat:2", [("cat", 2.0)]),
    ("cat:5.", [("cat", 5.0)]),
    ("cat:+1", [("cat", 1.0)]),
    ("cat: 1e3", [("cat: 1e3", 1.0)]),
    ("AND", [("", 1.0), ("", 1.0)]),
    ("a ANDAND b", [("a ANDAND b", 1.0)]),
    ("éAND b", [("éAND b", 1.0)]),
    ("a\nAND\nb:0.5\n", [("a", 1.0), ("\nb", 0.5)]),
    ("[a:b:5] AND [c|d]", [("[a:b:5]", 1.0), (" [c|d]", 1.0)]),
])
def test_split_composable(prompt, expected):
    assert split_composable(prompt) == expected


def test_a_non_finite_and_weight_is_refused():
    with pytest.raises(PromptError, match="AND weight"):
        split_composable("a AND b:" + "9" * 400)


# -- extra-network tags ----------------------------------------------------------------------------------------


def test_tags_are_removed_without_whitespace_cleanup():
    text, tags = extract_extra_networks("a <lora:x:1> b")  # [verified]
    assert text == "a  b"
    assert tags == [ExtraNetwork("lora", "x", ("1",), (), "<lora:x:1>")]
    text, tags = extract_extra_networks("< lora:x> <lora :x> <lora:> <:x> <lora:x")
    assert text == "< lora:x> <lora :x> <lora:> <:x> <lora:x" and tags == []
    text, tags = extract_extra_networks("<lyco:y:0.5:unet=0.2><hypernet:h:0.3>c<foo:bar:baz=1:a=b=c>")
    assert text == "c"
    assert [(t.kind, t.name) for t in tags] == [("lora", "y"), ("hypernet", "h"), ("foo", "bar")]
    assert tags[0].text == "<lyco:y:0.5:unet=0.2>" and tags[0].named == (("unet", "0.2"),)
    assert tags[2].positional == ("a=b=c",) and tags[2].named == (("baz", "1"),)
    assert extract_extra_networks("<LORA:x:1>")[1][0].kind == "LORA"  # kinds are case-sensitive: unknown
    text, tags = extract_extra_networks("<lora:a<lora:b:1>")  # the regex's own reading
    assert text == "" and tags[0].name == "a<lora" and tags[0].positional == ("b", "1")


@pytest.mark.parametrize("tag, weights", [
    ("<lora:x>", (1.0, 1.0, None)),
    ("<lora:x:0.8>", (0.8, 0.8, None)),
    ("<lora:x:1:0.5>", (1.0, 0.5, None)),
    ("<lora:x:unet=0.3>", (1.0, 0.3, None)),
    ("<lora:x:0.5:te=0>", (0.0, 0.0, None)),  # unet defaults to the final te
    ("<lora:x:1:1:8>", (1.0, 1.0, 8)),
    ("<lora:x:dyn=4:te=2:unet=3>", (2.0, 3.0, 4)),
    ("<lyco:x: 0.5 >", (0.5, 0.5, None)),
    ("<lora:x:1:te=2:te=3>", (3.0, 3.0, None)),  # a repeated key: the last counts
])
def test_lora_weights(tag, weights):
    (network,) = extract_extra_networks(tag)[1]
    assert network.lora_weights() == weights


@pytest.mark.parametrize("tag, value", [("<lora:x:abc>", "'abc'"), ("<lora:x:1:unet=z>", "'z'"),
                                        ("<lora:x:1:1:8.5>", "'8.5'"), ("<lora:x:inf>", "'inf'"),
                                        ("<lora:x:1:1:0>", "dyn 0"), ("<lora:te=1>", "names no network")])
def test_bad_lora_arguments_name_the_tag_and_value(tag, value):
    (network,) = extract_extra_networks(tag)[1]
    with pytest.raises(PromptError) as err:
        network.lora_weights()
    assert tag in str(err.value) and value in str(err.value)


# -- plan_prompt -----------------------------------------------------------------------------------------------


def test_plan_positive_prompt():
    program = plan_prompt("a <lora:d:0.8> [cat|dog] AND hat:0.5 <foo:x>", 4)
    assert isinstance(program, PromptProgram)
    assert program.text == "a  [cat|dog] AND hat:0.5 "
    assert [(n.kind, n.name) for n in program.networks] == [("lora", "d"), ("foo", "x")]
    assert program.parts == ((1.0, ((1, "a  cat"), (2, "a  dog"), (3, "a  cat"), (4, "a  dog"))),
                             (0.5, ((4, " hat"),)))
    assert program.part_texts == ("a  [cat|dog]", " hat") and program.steps == 4 and program.notes == ()
    assert program.texts() == ["a  cat", "a  dog", " hat"]
    info = program.to_dict()
    assert info["texts"] == ["a  cat", "a  dog", " hat"]
    assert info["schedule"][:2] == [{"part": 0, "start": 1, "end": 1, "text_index": 0},
                                    {"part": 0, "start": 2, "end": 2, "text_index": 1}]
    assert info["schedule"][-1] == {"part": 1, "start": 1, "end": 4, "text_index": 2}
    assert info["parts"] == [{"text": "a  [cat|dog]", "weight": 1.0}, {"text": " hat", "weight": 0.5}]
    lora, foo = info["networks"]
    assert (lora["te"], lora["unet"], lora["dyn"], lora["applied"]) == (0.8, 0.8, None, True)  # issue 17
    assert lora["status"] == networks.APPLIED
    assert foo["status"].startswith("not applied: unknown extra network kind 'foo'")


def test_plan_negative_prompt_keeps_and_and_tags_as_text():
    program = plan_prompt("blurry AND <lora:x:1> [ugly:bad:2]", 4, negative=True)
    assert program.networks == ()
    assert program.parts == ((1.0, ((2, "blurry AND <lora:x:1> ugly"), (4, "blurry AND <lora:x:1> bad"))),)
    assert any("AND is text" in n for n in program.notes) and any("<lora:x:1>" in n for n in program.notes)
    assert plan_prompt("blurry", 4, negative=True).notes == ()


def test_plan_notes_an_unparseable_part():
    program = plan_prompt("a|b AND [c|d]", 2)
    assert program.parts == ((1.0, ((2, "a|b"),)), (1.0, ((1, " c"), (2, " d"))))
    assert program.notes == ("AND part 1: schedule syntax could not be parsed (a '|' outside [a|b], or a '\\' "
                             "that escapes nothing): the prompt is used as written at every step",)
    assert plan_prompt("a|b", 2).notes[0].startswith("schedule syntax could not be parsed")


def test_plan_hires_offsets_and_bad_lora_tags_do_not_raise():
    program = plan_prompt("[a:b:25] <lora:x:abc>", 10, int_offset=20, flt_offset=1.0)
    assert program.parts[0][1] == ((5, "a"), (10, "b"))  # the part lost its trailing space
    status = program.to_dict()["networks"][0]["status"]
    assert status == "not applied: <lora:x:abc>: te multiplier 'abc' is not a number"


def test_counted_program_headline_is_the_largest_count():
    program = plan_prompt("[a b c|d] AND e f", 4)
    info = counted_program(program, lambda text: {"count": len(text.split()), "total_tokens": len(text)})
    assert [t["text"] for t in info["texts"]] == ["a b c", "d", " e f"]
    assert info["headline"] == 0 and info["texts"][0] == {"text": "a b c", "count": 3, "total_tokens": 5}
    info = counted_program(plan_prompt("[x|y]", 2), lambda text: {"count": 1, "total_tokens": 1})
    assert info["headline"] == 0  # the first on ties


def test_the_token_counter_refuses_schedules_too_large_to_count(monkeypatch):
    program = plan_prompt("[a|b|c] " + "x" * 300, 10)
    count = lambda text: {"count": 1, "total_tokens": 1}  # noqa: E731
    assert len(counted_program(program, count)["texts"]) == 3
    monkeypatch.setattr(sched, "MAX_COUNTED_CHARS", 600)
    with pytest.raises(PromptError, match="counts at most 600"):
        counted_program(program, count)


def test_top_level_exports():
    assert clipdiffusion.prompt_schedule is prompt_schedule
    assert clipdiffusion.split_composable is split_composable
    assert {"prompt_schedule", "split_composable"} <= set(dir(clipdiffusion))
