"""The summarize strategy's selection rules (torch-free part: text/summarize.py)."""

from clipdiffusion.text.summarize import PositionJudge, describe, split_segments, summarize
from clipdiffusion.text.tokenizer import CLIPTokenizer

TOK = CLIPTokenizer()


def stream(text, weight=1.0):
    return [(t, weight) for t in TOK.encode(text)]


def text_of(pairs):
    return TOK.decode([t for t, _ in pairs]).strip()


def test_fitting_prompt_is_unchanged_even_with_duplicates():
    s = stream("red, red, blue circle")
    out = summarize(s, 75)
    assert out.stream == s and out.dropped == ()


def test_segments_split_after_separators_and_break_is_noted():
    s = stream("a cat, a dog. a bird; a fish") + [(-1, -1.0)] + stream("a cow")
    segments, notes = split_segments(s, 75)
    assert [text_of(x.tokens) for x in segments] == ["a cat ,", "a dog .", "a bird ;", "a fish", "a cow"]
    assert any("BREAK" in n for n in notes)


def test_exact_duplicates_go_first_keeping_the_first_occurrence():
    tags = ", ".join(f"tag{i}" for i in range(30))
    s = stream("a red circle, " + tags + ", a red circle, " + tags)
    out = summarize(s, 75)
    assert sum(len(x.tokens) for x in out.dropped) + len(out.stream) == len(s)
    dups = [d for d in out.dropped if d.reason == "duplicate"]
    assert dups and all(d.of < d.index for d in dups)
    assert text_of(out.stream).startswith("a red circle ,")
    assert len(out.stream) <= 75


def test_importance_keeps_the_best_segments_in_original_order_with_weights():
    parts = [f"word{i} thing{i}" for i in range(40)]
    s = []
    for i, p in enumerate(parts):
        s += stream(p + ",", weight=1.0 + i / 100)

    class Favourite:
        rule = "test"

        def importance(self, segments):  # favour odd-numbered segments, later ones more
            return [(1000 if "1" in text_of(x.tokens)[-3:] else 0) + x.index for x in segments]

        def near_duplicates(self, segments):
            return []

    out = summarize(s, 75, Favourite())
    assert len(out.stream) <= 75
    # order and weights preserved: the kept stream is the kept segments, in input order
    segments, _ = split_segments(s, 75)
    gone = {d.index for d in out.dropped}
    assert out.stream == [p for x in segments if x.index not in gone for p in x.tokens]
    assert all(d.reason == "importance" for d in out.dropped)
    best_dropped = max(d.score for d in out.dropped)
    assert min(out.scores[i] for i in out.scores if i not in {d.index for d in out.dropped}) >= best_dropped - 1000


def test_position_rule_keeps_the_start_and_reports_every_drop():
    s = stream(", ".join(f"thing number {i}" for i in range(40)))
    out = summarize(s, 75)
    assert text_of(out.stream).startswith("thing number 0 ,")
    lines = describe(out, TOK.decode)
    assert len(lines) == len(out.dropped) > 0
    assert all("importance" in line or "duplicate" in line for line in lines)
    kept = {x.index for x in split_segments(s, 75)[0]} - {d.index for d in out.dropped}
    assert kept == set(range(len(kept)))  # a prefix of the segments
    assert "position" in out.rule


def test_near_duplicates_by_token_overlap_without_encoder():
    filler = ", ".join(f"thing number {i}" for i in range(20))
    s = stream("a big red shiny circle, " + filler + ", a red big shiny circle")
    out = summarize(s, 75)
    near = [d for d in out.dropped if d.reason == "near-duplicate"]
    last = len(split_segments(s, 75)[0]) - 1
    assert any(d.index == last and d.of == 0 and d.score == 1.0 for d in near)


def test_a_long_segment_is_cut_but_embedding_vectors_stay_together():
    s = [(320, 1.0)] * 74 + [(49408, 1.2), (49409, 1.2)] + [(321, 1.0)] * 10
    segments, notes = split_segments(s, 75, {49408: 2})
    assert all(len(x) <= 75 for x in segments)
    for x in segments:  # both vectors in one piece
        ids = [t for t, _ in x.tokens]
        assert (49408 in ids) == (49409 in ids)
    assert notes
    out = summarize(s, 75, spans={49408: 2})
    assert len(out.stream) <= 75


def test_deterministic():
    s = stream(", ".join(f"tag{i % 17} item{i}" for i in range(60)))
    assert summarize(s, 75) == summarize(s, 75)
    assert PositionJudge().importance([1, 2, 3]) == [0.0, -1.0, -2.0]


# ---- with an encoder (tiny random towers) -------------------------------------------------------------------------

import pytest  # noqa: E402

from clipdiffusion.testing import tiny_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def encoder():
    import torch

    torch.set_num_threads(1)
    return tiny_pipeline(0).text_encoder


def long_prompt(n=30):
    return ", ".join(f"word{i} item{i} thing{i}" for i in range(n)) + ", (a red circle:1.3)"


def test_summarize_gives_one_window_and_reports_every_dropped_segment(encoder):
    prompt = long_prompt()
    c = encoder.encode(prompt, long_prompt="summarize")
    assert c.context.shape[1] == 77
    report = c.report.prompt
    assert report.strategy == "summarize" and len(report.chunks) == 1
    assert report.dropped_segments and all(d["reason"] in ("duplicate", "near-duplicate", "importance")
                                           for d in report.dropped_segments)
    assert sum(d["tokens"] for d in report.dropped_segments) == report.dropped_tokens
    assert report.chunks[0].tokens + report.dropped_tokens == report.total_tokens
    assert any("rule encoder" in n for n in report.notes)
    assert encoder.encode(prompt, long_prompt="summarize").context.equal(c.context)  # deterministic


def test_importance_is_the_leave_one_out_change_of_the_chunked_encoding(encoder):
    """The judge's scores against an independent computation through the public encode()."""
    import torch

    from clipdiffusion.text.conditioning import SummaryJudge
    from clipdiffusion.text.summarize import split_segments

    texts = ["a red circle,", " a blue square at the top,", " hdr,", " a green triangle"]
    tok = encoder.embeddings.wrap(encoder.tokenizer)
    stream = [(t, 1.0) for x in texts for t in tok.encode(x)]
    segments, _ = split_segments(stream, 75)
    assert len(segments) == 4
    judge = SummaryJudge(encoder, tok, "a1111", encoder.embeddings)
    scores = judge.importance(segments)

    def vector(text):
        c = encoder.encode(text, long_prompt="chunk").context[0]
        n = len(tok.encode(text))
        return c[1:1 + n].mean(0)

    full = vector("".join(texts))
    for i, score in enumerate(scores):
        without = vector("".join(t for k, t in enumerate(texts) if k != i))
        expected = 1 - torch.nn.functional.cosine_similarity(full, without, dim=0)
        assert score == pytest.approx(float(expected), abs=1e-5)
    assert judge.passes == 5  # one batch: the prompt and four leave-one-out texts, one window each


def test_summarize_keeps_weights_and_the_kept_order(encoder):
    prompt = long_prompt()
    window = encoder.plan(prompt, "summarize").windows[0]
    full = [p for w in encoder.plan(prompt, "chunk", chunk_backtrack=0).windows for p in zip(w.tokens, w.weights)]
    kept = list(zip(window.tokens, window.weights))
    it = iter(full)
    assert all(p in it for p in kept)  # a subsequence of the prompt's (token, weight) pairs, in order
    assert 1.3 in window.weights  # the weighted object survives with its weight


def test_a_fitting_prompt_is_untouched_by_summarize(encoder):
    prompt = "a red circle, a red circle, hdr"
    a = encoder.encode(prompt, long_prompt="summarize")
    b = encoder.encode(prompt, long_prompt="chunk")
    assert a.context.equal(b.context) and a.report.prompt.dropped_segments == ()


def test_tokens_command_uses_the_position_rule_and_says_so(capsys):
    from clipdiffusion.cli import main

    assert main(["tokens", "--long-prompt", "summarize", "--json", long_prompt()]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    text = json.dumps(out)
    assert "rule position" in text and "dropped_segments" in text
