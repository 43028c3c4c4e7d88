"""The token report behind /api/tokenize and the page's live counter. Torch-free, cheap: runs in the handler
thread, never in the model worker.

`text.chunking` decides the layout and reports counts and dropped text; this module adds the per-token view
the page needs to colour chunk boundaries and dropped words, by mapping each prompt token to the output row
that carries it.
"""

from __future__ import annotations


def _chunking():
    from ..text import chunking

    return chunking


def default_tokenizer():
    from ..text.tokenizer import CLIPTokenizer

    return CLIPTokenizer()


def default_parse(text: str):
    from ..text.prompt import parse_prompt

    return parse_prompt(text)


def token_report(prompt: str, strategy: str, tokenizer, parse=default_parse) -> dict:
    """`TokenReport.to_dict()` plus `tokens`: one entry per prompt token (BREAK included, as a marker) with
    its text, weight and the chunk that carries it (None when the strategy drops it)."""
    chunking = _chunking()
    chunking.check_prompt_text("prompt", prompt)
    chunking.check_strategy(strategy)
    stream = chunking.tokenize_segments(parse(prompt), tokenizer)
    plan = chunking.plan_stream(stream, tokenizer, strategy)
    report = plan.report.to_dict()
    report["tokens"] = _token_view(stream, plan, tokenizer, chunking)
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
