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


def test_importance_is_the_change_when_a_segments_rows_leave_the_chunked_encoding(encoder):
    """The judge's scores against an independent computation through the public encode(): the prompt encoded
    once, chunked; a segment's score is 1 - cos between the mean of all content rows and the mean of the others."""
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

    text = "".join(texts)
    n = len(tok.encode(text))
    rows = encoder.encode(text, long_prompt="chunk").context[0, 1:1 + n]
    bounds = [0]
    for x in texts:
        bounds.append(bounds[-1] + len(tok.encode(x)))
    for i, score in enumerate(scores):
        keep = [r for r in range(n) if not bounds[i] <= r < bounds[i + 1]]
        expected = 1 - torch.nn.functional.cosine_similarity(rows.mean(0), rows[keep].mean(0), dim=0)
        assert score == pytest.approx(float(expected), abs=1e-5)
    assert len(set(scores)) == 4 and all(s > 0 for s in scores)
    assert judge.passes == 1  # the prompt, one window, encoded once


def test_the_one_object_among_repeated_tags_is_the_most_important_segment(encoder):
    """A prompt past one chunk: thirty repeated style tags, then one object phrase. The object's rows are the
    distinct ones, so it scores highest and the summary keeps it. (Re-encoding each leave-one-out text instead
    moved the chunk boundary, and that shift set the score: every tag then outscored the object, ~2700e-6 against
    ~880e-6 on this tower.)"""
    from clipdiffusion.text.conditioning import SummaryJudge
    from clipdiffusion.text.summarize import split_segments, summarize

    tok = encoder.embeddings.wrap(encoder.tokenizer)
    tags = ["hdr,", " masterpiece,", " best quality,", " sharp focus,", " 8k,", " bokeh,"] * 5
    text = "".join(tags) + " a red circle at the top left"
    stream = [(t, 1.0) for t in tok.encode(text)]
    assert len(stream) > 75
    segments, _ = split_segments(stream, 75)
    judge = SummaryJudge(encoder, tok, "a1111", encoder.embeddings)
    scores = judge.importance(segments)
    assert judge.passes == 2  # one encoding of the prompt's two chunks
    assert max(range(len(scores)), key=scores.__getitem__) == len(segments) - 1
    kept = summarize(stream, 75, judge).stream
    assert kept[-len(segments[-1]):] == list(segments[-1].tokens)


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
