"""parse_prompt: A1111's documented examples, edge cases, the documented errors, and a differential test against
a plain (quadratic) model of A1111's algorithm. Weights are compared exactly: A1111 merges neighbours by float
equality, so the multiplication order is part of the behaviour."""

import random
import re
import time

import pytest

from clipdiffusion.errors import PromptError
from clipdiffusion.text.prompt import MAX_NESTING, MAX_PROMPT_CHARS, parse_prompt

P, S = 1.1, 1 / 1.1  # "(" and "[" multipliers


def test_a1111_docstring_examples():
    assert parse_prompt("normal text") == [("normal text", 1.0)]
    assert parse_prompt("an (important) word") == [("an ", 1.0), ("important", P), (" word", 1.0)]
    assert parse_prompt("(unbalanced") == [("unbalanced", P)]
    assert parse_prompt("\\(literal\\]") == [("(literal]", 1.0)]
    assert parse_prompt("(unnecessary)(parens)") == [("unnecessaryparens", P)]
    # one "(" stays open before "house", so everything after it gets an extra x1.1 at the end
    assert parse_prompt("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ("a ", 1.0),
        ("house", 1.0 * 1.3 * P * P),
        (" ", 1.0 * P),
        ("on", 1.0 * S * P),
        (" a ", 1.0 * P),
        ("hill", 1.0 * 0.5 * P),
        (", sun, ", 1.0 * P),
        ("sky", 1.0 * P * P * P * P),
        (".", 1.0 * P),
    ]
    # the reference note's rounded values, for the reader
    assert [round(w, 4) for _, w in parse_prompt("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")] == [
        1.0, 1.573, 1.1, 1.0, 1.1, 0.55, 1.1, 1.4641, 1.1]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("((x))", [("x", 1.0 * P * P)]),
        ("[[x]]", [("x", 1.0 * S * S)]),
        ("((house:1.3))", [("house", 1.0 * 1.3 * P)]),
        ("(x: 1.2 )", [("x", 1.2)]),
        ("(x:-0.5)", [("x", -0.5)]),
        ("(x:+2)", [("x", 2.0)]),
        ("(x:.5)", [("x", 0.5)]),
        ("(x:abc)", [("x:abc", P)]),
        ("cat:1.2)", [("cat:1.2)", 1.0)]),
        ("a ) b ] c", [("a ) b ] c", 1.0)]),
        ("[x:1.2]", [("x:1.2", S)]),
        ("(x:1e309)", [("x:1e309", P)]),  # letters are not part of a weight: literal text
        ("(x:inf)", [("x:inf", P)]),
        ("(x:nan)", [("x:nan", P)]),
        ("\\\\", [("\\", 1.0)]),
        ("a\\b", [("ab", 1.0)]),  # a lone backslash is dropped
        ("(a[b)c]", [("a", P), ("b", S * P), ("c", S)]),  # interleaved brackets close independently
        ("", [("", 1.0)]),
        ("()", [("", 1.0)]),
        ("(((((", [("", 1.0)]),
        ("[(x)]y", [("xy", 1.0)]),  # 1.1 * (1/1.1) is exactly 1.0 in floats, so A1111 merges x with y
    ],
)
def test_grammar_cases(text, expected):
    assert parse_prompt(text) == expected


def test_break():
    assert parse_prompt("a BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]
    assert parse_prompt("a BREAK BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)]
    assert parse_prompt("BREAK") == [("", 1.0), ("BREAK", -1.0), ("", 1.0)]
    assert parse_prompt("a break b BREAKS xBREAK") == [("a break b BREAKS xBREAK", 1.0)]
    assert parse_prompt("a\n BREAK\t(b)") == [("a", 1.0), ("BREAK", -1.0), ("", 1.0), ("b", P)]
    # inside brackets the weight is multiplied too, so A1111's chunker sees an ordinary word
    assert parse_prompt("(BREAK)") == [("", P), ("BREAK", -1.0 * P), ("", P)]


def test_weights_are_multiplied_in_closing_order():
    # inner closes first: ((1.0 * 1.3) * 0.7) * 1.1, not 1.0 * (1.3 * 0.7 * 1.1)
    [(text, weight)] = parse_prompt("(((x:1.3):0.7))")
    assert text == "x" and weight == ((1.0 * 1.3) * 0.7) * P


def test_non_numeric_weight_is_an_error():
    with pytest.raises(PromptError, match=r"weight '1\.2\.3' in ':1\.2\.3\)' is not a number"):
        parse_prompt("(x:1.2.3)")
    with pytest.raises(PromptError, match="is not a number"):
        parse_prompt("(x: . )")


def test_non_finite_weight_is_an_error():
    with pytest.raises(PromptError, match=r"weight of 'x' is inf"):
        parse_prompt("(x:1" + "0" * 310 + ")")
    with pytest.raises(PromptError, match=r"weight of 'y' is inf"):
        parse_prompt("((y:1" + "0" * 200 + "):1" + "0" * 200 + ")")
    with pytest.raises(PromptError, match=r"weight of 'z' is nan"):
        parse_prompt("((z:0):1" + "0" * 400 + ")")


def test_input_type_and_length_errors():
    for bad in (None, 3, ["a"]):
        with pytest.raises(PromptError, match="prompt must be a string"):
            parse_prompt(bad)
    assert parse_prompt("(caf\u00e9)".encode("utf-8")) == [("caf\u00e9", P)]
    with pytest.raises(PromptError, match="prompt is not UTF-8"):
        parse_prompt(b"\xff")
    with pytest.raises(PromptError, match=f"the maximum is {MAX_PROMPT_CHARS}"):
        parse_prompt("a" * (MAX_PROMPT_CHARS + 1))


def test_nesting_limit():
    deep = "(" * MAX_NESTING + "x" + ")" * MAX_NESTING
    [(text, weight)] = parse_prompt(deep)
    assert text == "x" and weight == pytest.approx(P**MAX_NESTING, rel=1e-12)
    with pytest.raises(PromptError, match=f"inside {MAX_NESTING + 1} open brackets; the maximum is {MAX_NESTING}"):
        parse_prompt("(" * (MAX_NESTING + 1) + "x")
    assert parse_prompt("(" * 100_000) == [("", 1.0)]  # empty brackets cost nothing


@pytest.mark.parametrize(
    "text",
    [
        "(" * (MAX_PROMPT_CHARS - 1),
        "(" * (MAX_NESTING - 1) + "(a)" * ((MAX_PROMPT_CHARS - MAX_NESTING) // 3),
        "a:" * (MAX_PROMPT_CHARS // 2),
        "a BREAK " * (MAX_PROMPT_CHARS // 8),
        ("masterpiece, (best:1.2) [x] \\( " * 7000)[:MAX_PROMPT_CHARS],
    ],
    ids=["opens", "deep-groups", "colons", "breaks", "tags"],
)
def test_longest_prompts_parse_in_linear_time(text):
    # not a speed assertion: a quadratic parser takes minutes here, a linear one well under a second
    start = time.perf_counter()
    parse_prompt(text)
    assert time.perf_counter() - start < 20


# --- differential test against a plain model of A1111's algorithm -------------------------------------------

_MODEL_TOKENS = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")


def _model(text):
    """A1111's algorithm as its docstring describes it: one entry per token, ranges multiplied per bracket."""
    res, rounds, squares = [], [], []

    def mul(start, m):
        for entry in res[start:]:
            entry[1] *= m

    for m in _MODEL_TOKENS.finditer(text):
        tok, w = m.group(0), m.group(1)
        if tok.startswith("\\"):
            res.append([tok[1:], 1.0])
        elif tok == "(":
            rounds.append(len(res))
        elif tok == "[":
            squares.append(len(res))
        elif w is not None and rounds:
            mul(rounds.pop(), float(w))
        elif tok == ")" and rounds:
            mul(rounds.pop(), P)
        elif tok == "]" and squares:
            mul(squares.pop(), S)
        else:
            for i, part in enumerate(re.split(r"\s*\bBREAK\b\s*", tok)):
                if i:
                    res.append(["BREAK", -1.0])
                res.append([part, 1.0])
    for start in rounds:
        mul(start, P)
    for start in squares:
        mul(start, S)
    if not res:
        return [("", 1.0)]
    out = []
    for text_, w in res:
        if out and out[-1][1] == w:
            out[-1] = (out[-1][0] + text_, w)
        else:
            out.append((text_, w))
    return out


def test_matches_plain_model_on_random_bracket_soup():
    rng = random.Random(42)
    atoms = ["a", "b c", " ", "(", ")", "[", "]", ":", ":1.3)", ": 0.5 )", ":-2)", "\\(", "\\)", "\\", "\\\\",
             "BREAK", " BREAK ", "x,", "1.1", ":abc)", "\\]", "[", "(("]
    for _ in range(3000):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 25)))
        try:
            expected = _model(text)
        except ValueError:
            with pytest.raises(PromptError):
                parse_prompt(text)
            continue
        assert parse_prompt(text) == expected, text
