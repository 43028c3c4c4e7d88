"""The token report behind /api/tokenize and the page's live counter. Torch-free, cheap: runs in the handler
thread, never in the model worker.

`text.schedule` reads the prompt language first, as A1111's counter does (tags out, AND parts, each part
scheduled over the UI's steps); every schedule text is counted and the headline is the largest. `text.chunking`
decides the layout and reports counts and dropped text; this module adds the per-token view the page needs to
colour chunk boundaries and dropped words, by mapping each prompt token to the output row that carries it.
"""

from __future__ import annotations


def _chunking():
    from ..text import chunking

    return chunking


def default_tokenizer():
    from ..text.tokenizer import CLIPTokenizer

    return CLIPTokenizer()


def with_embeddings(tokenizer, folder):
    """``tokenizer`` that also knows the embeddings of ``folder`` (names and vector counts only: safetensors
    headers, pickles through the weights-only loader), so the counter counts each as its vectors."""
    from ..checkpoints.embeddings import counting_tokenizer

    return counting_tokenizer(tokenizer, folder)[0]


def default_parse(text: str):
    from ..text.prompt import parse_prompt

    return parse_prompt(text)


DEFAULT_STEPS = 20


def _count(text, strategy, tokenizer, parse, chunking, positions=77) -> dict:
    report = chunking.plan_stream(chunking.tokenize_segments(parse(text), tokenizer), tokenizer, strategy,
                                  positions=positions).report
    chunks = report.chunks
    # A1111's number: every closed chunk counts in full, the last one its tokens
    count = sum(c.capacity for c in chunks[:-1]) + chunks[-1].tokens if chunks else 0
    return {"count": count, "total_tokens": report.total_tokens, "summary": report.summary(),
            "dropped_tokens": report.dropped_tokens}


def token_report(prompt: str, strategy: str, tokenizer, parse=default_parse, *, steps: int = DEFAULT_STEPS,
                 negative: bool = False, positions: int = 77) -> dict:
    """For the *headline* text (the schedule text with the most tokens; a plain prompt's is the prompt itself):
    `TokenReport.to_dict()` plus `tokens`, one entry per token (BREAK included, as a marker) with its text, weight
    and the chunk that carries it (None when the strategy drops it). Plus the prompt language, as
    `schedule.counted_program` gives it: `steps`, `negative`, `text` (the prompt without tags), `texts` (each
    distinct text once, with its `summary` and counts), `headline` (its index there), `schedule` (`part`, `start`,
    `end`, `text_index` per entry), `parts` (`text`, `weight`) and `networks` (each tag with its `status`);
    `notes` has the headline's chunking notes, then the prompt language's. `positions`: the text encoder's
    window length (77; a Long-CLIP tower's 248, `ServerSettings.text_positions`)."""
    from ..text.schedule import counted_program, plan_prompt

    chunking = _chunking()
    chunking.check_prompt_text("prompt", prompt)
    chunking.check_strategy(strategy)
    program = plan_prompt(prompt, steps, negative=negative)
    info = counted_program(program, lambda text: _count(text, strategy, tokenizer, parse, chunking, positions))
    stream = chunking.tokenize_segments(parse(info["texts"][info["headline"]]["text"]), tokenizer)
    plan = chunking.plan_stream(stream, tokenizer, strategy, positions=positions)
    report = plan.report.to_dict()
    report["tokens"] = _token_view(stream, plan, tokenizer, chunking)
    report["notes"] += info.pop("notes")
    report.update(info, negative=bool(negative))
    return report


def _token_view(stream, plan, tokenizer, chunking) -> list[dict]:
    # Output rows list content tokens in prompt order (chunk, truncate, stretch, and window, which keeps every
    # token once); the rows at positions 1..len(tokens) of a window are its content.
    carriers = []
    for window_index, position in plan.rows:
        if window_index == chunking.EMPTY_WINDOW:
            continue
        window = plan.windows[window_index]
        if 1 <= position <= len(window.tokens):
            carriers.append((window_index, window.tokens[position - 1]))
    view, next_row = [], 0
    for token_id, weight in stream:
        if token_id == chunking.BREAK_ID:
            view.append({"id": None, "text": "BREAK", "weight": None, "chunk": None, "break": True})
            continue
        chunk = None
        if next_row < len(carriers) and carriers[next_row][1] == token_id:
            chunk = carriers[next_row][0]
            next_row += 1
        view.append({"id": token_id, "text": tokenizer.decode([token_id]), "weight": weight, "chunk": chunk,
                     "break": False})
    return view
