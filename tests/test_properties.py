"""Property-based tests (hypothesis) for the torch-free text path: the emphasis parser, the tokenizer and the
``tokens --json`` report. Inputs are drawn from alphabets rich in the grammar's special characters.

Bounded and reproducible: ``derandomize=True`` (the same examples every run, so CI cannot flake on a new draw),
no example database on disk, a capped number of examples per test; the file runs in seconds.
"""

import json
import math

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from clipdiffusion.errors import PromptError  # noqa: E402
from clipdiffusion.text import chunking  # noqa: E402
from clipdiffusion.commands.tokens import format_report, tokens_report  # noqa: E402
from clipdiffusion.text.prompt import BREAK, parse_prompt  # noqa: E402
from clipdiffusion.text.tokenizer import VOCAB_SIZE, CLIPTokenizer  # noqa: E402

BOUNDED = settings(max_examples=150, deadline=None, derandomize=True, database=None)
TOKENIZER = CLIPTokenizer()

# Fragments that exercise the grammar: brackets, weights, escapes, BREAK, punctuation, digits, non-ASCII.
FRAGMENTS = ["(", ")", "[", "]", ":", "\\", "\\(", "\\)", ":1.2)", ": 0.5 )", ":-1)", ":.)", ":1.2.3)", "BREAK",
             " BREAK ", ",", ", ", " ", "a", "cat", "red", "1", "0.5", "e", "é", "猫", "&amp;", "'s", "<|endoftext|>",
             "\n", "\t", "BREAKfast", "9" * 12]
grammar_text = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=6)), max_size=40).map("".join)
SPECIAL = "\\()[]"


def escape(text: str) -> str:
    return "".join("\\" + c if c in SPECIAL else c for c in text)


# -- prompt parser -------------------------------------------------------------------------------------------


@BOUNDED
@given(grammar_text)
def test_parse_prompt_raises_only_prompt_error_and_gives_finite_merged_segments(text):
    try:
        segments = parse_prompt(text)
    except PromptError:
        hypothesis.event("refused")
        return
    assert segments and all(isinstance(t, str) and isinstance(w, float) for t, w in segments)
    assert all(math.isfinite(w) for _, w in segments)
    assert all(a[1] != b[1] for a, b in zip(segments, segments[1:]))  # equal neighbours are merged
    assert (BREAK in segments) <= ("BREAK" in text)
    # nothing invented: every character of the parsed texts is in the input, and no more text than was given
    joined = "".join(t for t, _ in segments)
    assert set(joined) <= set(text) and len(joined) <= len(text)


@BOUNDED
@given(st.text(max_size=200))
def test_escaped_text_parses_to_itself(text):
    assume("BREAK" not in text)
    assert parse_prompt(escape(text)) == [(text, 1.0)]


@BOUNDED
@given(st.text(min_size=1, max_size=60), st.integers(min_value=-5000, max_value=5000))
def test_explicit_weight_applies_to_the_whole_escaped_text(text, milli):
    assume("BREAK" not in text)
    weight = f"{milli / 1000:.3f}"
    assert parse_prompt(f"({escape(text)}:{weight})") == [(text, float(weight))]
    assert parse_prompt(f"({escape(text)})") == [(text, 1.1)]
    assert parse_prompt(f"[{escape(text)}]") == [(text, 1 / 1.1)]


@BOUNDED
@given(st.one_of(st.integers(), st.floats(), st.binary(max_size=20), st.none(), st.lists(st.text(), max_size=3)))
def test_non_text_prompts_are_prompt_errors(value):
    try:
        parse_prompt(value)
    except PromptError:
        return
    assert isinstance(value, bytes)  # UTF-8 bytes are decoded


# -- tokenizer -----------------------------------------------------------------------------------------------


@BOUNDED
@given(st.one_of(grammar_text, st.text(max_size=120),
                 st.text(alphabet=st.characters(categories=["Cs", "Cc", "Zs", "L", "M", "N", "P", "S"]),
                         max_size=60)))
def test_encode_never_raises_but_prompt_error_and_ids_are_in_range(text):
    try:
        ids = TOKENIZER.encode(text)
    except PromptError:
        assert any("\ud800" <= c <= "\udfff" for c in text)  # only unpaired surrogates are refused
        hypothesis.event("refused: surrogate")
        return
    assert all(type(i) is int and 0 <= i < VOCAB_SIZE for i in ids)
    assert [i for _, word_ids in TOKENIZER.encode_words(text) for i in word_ids] == ids
    assert len(TOKENIZER.token_strings(ids)) == len(ids)
    assert isinstance(TOKENIZER.decode(ids), str)


ascii_words = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80)


@BOUNDED
@given(ascii_words)
def test_decode_encode_round_trip_is_stable(text):
    once = TOKENIZER.decode(TOKENIZER.encode(text))
    twice = TOKENIZER.decode(TOKENIZER.encode(once))
    assert twice == once
    if "&" not in text:  # html.unescape (applied twice) can change text that contains entities
        assert TOKENIZER.encode(once) == TOKENIZER.encode(text)


@BOUNDED
@given(st.lists(st.integers(min_value=0, max_value=VOCAB_SIZE - 1), max_size=30))
def test_decode_accepts_any_ids(ids):
    assert isinstance(TOKENIZER.decode(ids), str)
    assert len(TOKENIZER.token_strings(ids)) == len(ids)


# -- tokens --json -------------------------------------------------------------------------------------------


@BOUNDED
@given(grammar_text, st.sampled_from(sorted(chunking.LONG_PROMPT_STRATEGIES)), st.booleans())
def test_tokens_report_is_json_linear_and_consistent(text, strategy, weights):
    try:
        report = tokens_report(text, long_prompt=strategy, weights=weights, tokenizer=TOKENIZER)
    except PromptError:
        assert weights  # without weights nothing is parsed, and the text itself is always accepted here
        hypothesis.event("refused by the parser")
        return
    out = json.dumps(report, ensure_ascii=False, indent=1, allow_nan=False)
    assert len(out) < 200 * len(text) + 10_000
    assert isinstance(format_report(report), str)
    tokens, chunks, words = report["tokens"], report["chunks"], report["words"]
    assert report["total_tokens"] == len(tokens)
    assert report["summary"] == " | ".join(f"{c['tokens']}/{c['capacity']}" for c in chunks)
    assert all(c["tokens"] == len(c["ids"]) == len(c["weights"]) <= c["capacity"] for c in chunks)
    kept = sum(c["tokens"] for c in chunks)
    if strategy in ("chunk", "truncate", "stretch"):
        assert kept + report["dropped_tokens"] == len(tokens)
        assert [i for c in chunks for i in c["ids"]] == [t["id"] for t in tokens][:kept]
    else:  # window: overlapping windows carry every token at least once
        assert report["dropped_tokens"] == 0 and kept >= len(tokens)
    assert all(math.isfinite(t["weight"]) for t in tokens)
    if words:  # the words tile the tokens, in order, and every token points back at its word
        assert words[0]["tokens"][0] == 0 and words[-1]["tokens"][1] == len(tokens)
        assert all(a["tokens"][1] == b["tokens"][0] for a, b in zip(words, words[1:]))
        assert all(w["tokens"][0] < w["tokens"][1] for w in words)
        assert all(tokens[k]["word"] == i for i, w in enumerate(words) for k in range(*w["tokens"]))
    else:
        assert all(t["word"] is None for t in tokens)
    segments = [(s["text"], s["weight"]) for s in report["segments"]]
    assert segments == (parse_prompt(text) if weights else [(text, 1.0)])
    assert (BREAK in segments) <= weights


@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(st.text(alphabet="ab,( )", min_size=1, max_size=40), st.integers(min_value=2, max_value=6))
def test_tokens_report_size_grows_linearly(unit, times):
    small = json.dumps(tokens_report(unit * 50, weights=False, tokenizer=TOKENIZER))
    large = json.dumps(tokens_report(unit * 50 * times, weights=False, tokenizer=TOKENIZER))
    assert len(large) < times * len(small) * 1.2 + 10_000
