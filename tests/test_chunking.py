"""Long-prompt strategies: chunk boundaries, A1111 comma backtracking and BREAK, truncation reports, window merge,
stretch length, padding per family. Pure Python, no torch."""

import pytest

from clipdiffusion.errors import PromptError
from clipdiffusion.text import chunking
from clipdiffusion.text.chunking import (
    BOS_ID,
    BREAK_ID,
    COMMA_ID,
    EMPTY_WINDOW,
    EOS_ID,
    LONG_PROMPT_STRATEGIES,
    plan_prompt,
    plan_stream,
)
from clipdiffusion.text.tokenizer import BOS_ID as TOKENIZER_BOS
from clipdiffusion.text.tokenizer import EOS_ID as TOKENIZER_EOS
from clipdiffusion.text.tokenizer import CLIPTokenizer


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer()


BREAK = ("BREAK", -1.0)


def words(word, n):
    return " ".join([word] * n)


def contents(plan):
    return [list(w.tokens) for w in plan.windows]


def test_special_ids_match_tokenizer(tok):
    assert (BOS_ID, EOS_ID) == (TOKENIZER_BOS, TOKENIZER_EOS)


def test_single_token_words_and_comma_id(tok):
    assert len(tok.encode("cat")) == 1 and len(tok.encode("dog")) == 1
    assert tok.encode(",") == [COMMA_ID]


@pytest.mark.parametrize("n,chunks", [(0, 1), (1, 1), (75, 1), (76, 2), (150, 2), (151, 3)])
def test_chunk_boundaries(tok, n, chunks):
    plan = plan_prompt([(words("cat", n), 1.0)], tok, "chunk")
    assert len(plan.windows) == chunks
    assert len(plan.rows) == 77 * chunks
    assert plan.report.total_tokens == n
    assert sum(c.tokens for c in plan.report.chunks) == n


def test_report_summary_and_first_words(tok):
    plan = plan_prompt([(words("cat", 87), 1.0)], tok, "chunk")
    assert plan.report.summary() == "75/75 | 12/75"
    assert plan.report.chunks[0].first_words.startswith("cat cat")
    assert plan.report.to_dict()["summary"] == "75/75 | 12/75"


def test_comma_backtracking_moves_tail(tok):
    # comma at index 70; when the 76th token arrives, 75 - 70 = 5 <= 20, so the 4 dogs after it move on
    text = words("cat", 70) + " , " + words("dog", 10)
    plan = plan_prompt([(text, 1.0)], tok, "chunk")
    a, b = contents(plan)
    assert len(a) == 71 and a[-1] == COMMA_ID
    assert b == tok.encode(words("dog", 10))
    hard = plan_prompt([(text, 1.0)], tok, "chunk", backtrack=0)
    assert [len(c) for c in contents(hard)] == [75, 6]


def test_comma_too_far_back_hard_splits(tok):
    text = words("cat", 50) + " , " + words("dog", 30)  # comma at index 50: 75 - 50 = 25 > 20
    plan = plan_prompt([(text, 1.0)], tok, "chunk")
    assert [len(c) for c in contents(plan)] == [75, 6]
    wider = plan_prompt([(text, 1.0)], tok, "chunk", backtrack=25)
    assert [len(c) for c in contents(wider)] == [51, 30]


def test_comma_arriving_at_full_chunk_starts_next_chunk(tok):
    text = words("cat", 75) + " , dog"
    a, b = contents(plan_prompt([(text, 1.0)], tok, "chunk"))
    assert len(a) == 75 and b == [COMMA_ID] + tok.encode("dog")


def test_break(tok):
    cat, dog = tok.encode("cat"), tok.encode("dog")
    assert contents(plan_prompt([("cat", 1.0), BREAK, ("dog", 1.0)], tok)) == [cat, dog]
    # leading and doubled BREAK make all-padding chunks, as A1111
    assert contents(plan_prompt([BREAK, ("dog", 1.0)], tok)) == [[], dog]
    assert contents(plan_prompt([("cat", 1.0), BREAK, BREAK, ("dog", 1.0)], tok)) == [cat, [], dog]
    # a trailing BREAK adds nothing; BREAK alone and the empty prompt are one padding chunk
    assert contents(plan_prompt([("cat", 1.0), BREAK], tok)) == [cat]
    assert contents(plan_prompt([BREAK], tok)) == [[]]
    assert contents(plan_prompt([("", 1.0)], tok)) == [[]]
    # only weight exactly -1 is a break (A1111: "(BREAK)" is the word BREAK)
    assert contents(plan_prompt([("BREAK", -1.1)], tok)) == [tok.encode("BREAK")]


def test_break_ignored_and_reported_outside_chunk(tok):
    for strategy in ("truncate", "window", "stretch"):
        plan = plan_prompt([("cat", 1.0), BREAK, ("dog", 1.0)], tok, strategy)
        assert contents(plan) == [tok.encode("cat dog")]
        assert any("BREAK" in note for note in plan.report.notes)


def test_truncate_reports_dropped_words(tok):
    text = words("cat", 75) + " purple elephant"
    plan = plan_prompt([(text, 1.0)], tok, "truncate")
    assert len(plan.windows) == 1 and len(plan.windows[0].tokens) == 75
    assert plan.report.dropped_tokens == 2
    assert plan.report.dropped_text == "purple elephant"
    assert any("purple elephant" in n for n in plan.report.notes)
    short = plan_prompt([("cat", 1.0)], tok, "truncate")
    assert short.report.dropped_tokens == 0 and short.report.notes == ()


@pytest.mark.parametrize("n,stride", [(76, 60), (130, 60), (300, 60), (301, 75), (200, 1), (160, 37)])
def test_window_merge_keeps_every_token_once_in_order(n, stride, tok):
    stream = [(1000 + i, 1.0 + i / 1000) for i in range(n)]
    plan = plan_stream(stream, tok, "window", stride=stride)
    ids = [plan.windows[w].ids()[p] if w != EMPTY_WINDOW else None for w, p in plan.rows]
    weights = [plan.windows[w].position_weights()[p] for w, p in plan.rows if w != EMPTY_WINDOW]
    assert ids[0] == BOS_ID and ids[n + 1] == EOS_ID
    assert ids[1:n + 1] == [t for t, _ in stream]
    assert weights[1:n + 1] == [w for _, w in stream]
    assert len(plan.rows) % 77 == 0 and len(plan.rows) - (n + 2) < 77
    assert all(w == EMPTY_WINDOW and p == r % 77 for r, (w, p) in enumerate(plan.rows) if r >= n + 2)
    for win in plan.windows:
        assert len(win.tokens) == 75  # every window full; the last is aligned to the end
    # each token comes from the earliest window that holds it (most left context under causal attention)
    starts = [win.tokens[0] - 1000 for win in plan.windows]
    assert starts[0] == 0 and all(b - a <= stride for a, b in zip(starts, starts[1:]))
    for i, (w, p) in enumerate(plan.rows[1:n + 1]):
        assert w == min(k for k, s in enumerate(starts) if s <= i < s + 75)


def test_window_short_prompt_equals_chunk(tok):
    segs = [("a red cat", 1.0), ("sitting", 1.3)]
    win, chk = plan_prompt(segs, tok, "window"), plan_prompt(segs, tok, "chunk")
    assert (win.windows, win.rows) == (chk.windows, chk.rows)


def test_stretch_length_and_truncation(tok):
    plan = plan_prompt([(words("cat", 200), 1.0)], tok, "stretch")
    assert plan.positions == 248 and len(plan.rows) == 248 and len(plan.windows[0].ids()) == 248
    assert plan.report.summary() == "200/246"
    long = plan_prompt([(words("cat", 250), 1.0)], tok, "stretch")
    assert long.report.dropped_tokens == 4 and len(long.windows[0].tokens) == 246


def test_padding_ids_per_family(tok):
    win = plan_prompt([("a cat", 1.0)], tok, "chunk").windows[0]
    cat = tok.encode("a cat")
    assert win.ids() == [BOS_ID, *cat, EOS_ID] + [EOS_ID] * (75 - len(cat))  # CLIP-L / SD1: EOS padding
    assert win.ids(pad_id=0) == [BOS_ID, *cat, EOS_ID] + [0] * (75 - len(cat))  # OpenCLIP: zeros after EOS
    assert len(win.ids(0)) == 77


def test_weights_travel_with_tokens_and_segments_tokenize_separately(tok):
    segs = [(words("cat", 74), 1.0), ("red dog", 1.5), ("sky", 0.5)]
    plan = plan_prompt(segs, tok, "chunk", backtrack=0)
    assert plan.windows[0].position_weights()[-2:] == [1.5, 1.0]  # last content token, then EOS
    assert plan.windows[1].weights == (1.5, 0.5)
    assert plan.windows[1].position_weights()[0] == 1.0 and set(plan.windows[1].position_weights()[3:]) == {1.0}
    joined = plan_prompt([("ab", 1.0), ("cd", 1.0)], tok)
    assert list(joined.windows[0].tokens) == tok.encode("ab") + tok.encode("cd")


def test_bad_input(tok):
    with pytest.raises(PromptError, match="long_prompt='slide'.*truncate, chunk, window, stretch"):
        plan_prompt([("cat", 1.0)], tok, "slide")
    with pytest.raises(PromptError, match="nan"):
        plan_prompt([("cat", float("nan"))], tok)
    with pytest.raises(PromptError, match="weight 1e\\+44 of segment 'cat' is outside -1000..1000"):
        plan_prompt([("cat", 1e44)], tok)
    assert plan_prompt([("cat", -5.0)], tok).windows[0].weights == (-5.0,)  # negative weights are allowed (A1111)
    with pytest.raises(PromptError, match="10000"):
        plan_prompt([(words("cat", chunking.MAX_PROMPT_TOKENS + 1), 1.0)], tok)
    with pytest.raises(PromptError, match="window_stride=0"):
        plan_prompt([("cat", 1.0)], tok, "window", stride=0)
    with pytest.raises(PromptError, match="chunk_backtrack=75"):
        plan_prompt([("cat", 1.0)], tok, backtrack=75)
    with pytest.raises(PromptError, match="prompt must be a string"):
        chunking.check_prompt_text("prompt", 3)
    with pytest.raises(PromptError, match="characters"):
        chunking.check_prompt_text("negative_prompt", "x" * (chunking.MAX_PROMPT_CHARS + 1))
    assert set(LONG_PROMPT_STRATEGIES) == {"truncate", "chunk", "window", "stretch", "summarize"}
    assert BREAK_ID < 0


def test_chunking_and_encode_parser_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, argparse; import clipdiffusion.text.chunking; from clipdiffusion.commands import encode as cli_encode; "
            "cli_encode.add_arguments(argparse.ArgumentParser()); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def _a1111_tokenize_line(stream, backtrack):
    """The control flow of A1111's ``sd_hijack_clip.py: tokenize_line`` (v1.10, read at 5ad03e65) on a token
    stream, kept literal (no embeddings): an independent oracle for ``chunk``. Returns padded 77-id chunks."""
    chunks, chunk, mults = [], [], []
    last_comma = -1

    def next_chunk():
        nonlocal chunk, mults, last_comma
        to_add = 75 - len(chunk)
        chunks.append(([BOS_ID] + chunk + [EOS_ID] * to_add + [EOS_ID], [1.0] + mults + [1.0] * to_add + [1.0]))
        chunk, mults, last_comma = [], [], -1

    for token, weight in stream:
        if token == BREAK_ID:
            next_chunk()
            continue
        if token == COMMA_ID:
            last_comma = len(chunk)
        elif backtrack != 0 and len(chunk) == 75 and last_comma != -1 and len(chunk) - last_comma <= backtrack:
            cut = last_comma + 1
            reloc, reloc_mults = chunk[cut:], mults[cut:]
            chunk, mults = chunk[:cut], mults[:cut]
            next_chunk()
            chunk, mults = reloc, reloc_mults
        if len(chunk) == 75:
            next_chunk()
        chunk.append(token)
        mults.append(weight)
    if chunk or not chunks:
        next_chunk()
    return chunks


def test_chunk_matches_a1111_control_flow_on_random_streams(tok):
    import random

    rng = random.Random(0)
    for trial in range(300):
        n = rng.choice([0, 1, 74, 75, 76, rng.randrange(300)])
        p_comma, p_break = rng.choice([0.0, 0.05, 0.3]), rng.choice([0.0, 0.01, 0.1])
        stream = []
        for _ in range(n):
            r = rng.random()
            token = BREAK_ID if r < p_break else COMMA_ID if r < p_break + p_comma else rng.randrange(300, 49000)
            stream.append((token, -1.0 if token == BREAK_ID else rng.choice([1.0, 1.1, 0.9, 1.5])))
        backtrack = rng.choice([0, 1, 5, 20, 74])
        plan = plan_stream(stream, tok, "chunk", backtrack=backtrack)
        ours = [(w.ids(), w.position_weights()) for w in plan.windows]
        assert ours == _a1111_tokenize_line(stream, backtrack), (trial, backtrack)
