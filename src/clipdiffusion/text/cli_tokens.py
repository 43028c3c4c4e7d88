"""``clipdiffusion tokens "PROMPT"``: how a prompt is weighted, tokenized and laid out in CLIP windows.

Torch-free (prompt.py, tokenizer.py and chunking.py only), so it answers in well under a second. It shows the
count per window as A1111's counter does (``75/75 | 12/75``), where each window starts, the weighted segments,
and every token a strategy drops: truncation is never silent. ``--json`` prints the same as one object (see
:func:`tokens_report`), which the HTTP API can reuse.
"""

import json
import sys

from ..errors import PromptError
from . import chunking
from .prompt import parse_prompt

STDIN = "-"


def add_arguments(parser) -> None:
    parser.add_argument("prompt", help=f'the prompt text; "{STDIN}" reads it from standard input (UTF-8)')
    parser.add_argument(
        "--long-prompt",
        choices=list(chunking.LONG_PROMPT_STRATEGIES),
        default="chunk",
        help="how prompts over 75 tokens are laid out (default: chunk, as AUTOMATIC1111)",
    )
    parser.add_argument(
        "--no-weights",
        action="store_true",
        help="do not parse (x:1.2) [x] or BREAK; brackets are plain text (A1111's emphasis 'None')",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _segments(prompt: str, weights: bool) -> list:
    return parse_prompt(prompt) if weights else [(prompt, 1.0)]


def tokens_report(prompt, *, long_prompt="chunk", weights=True, tokenizer=None) -> dict:
    """Everything the ``tokens`` command shows, as a JSON-ready dict::

        {"prompt", "long_prompt", "weights": bool, "segments": [{"text", "weight"}],
         "tokens": [{"id", "text", "weight"}],           # in prompt order, BREAK markers left out
         "chunks": [{"tokens", "capacity", "first_words", "ids", "weights"}],
         "summary": "75/75 | 12/75", "total_tokens", "dropped_tokens", "dropped_text", "notes": [...],
         "truncate_would_drop": {"tokens", "text"} | None}   # for other strategies, when over 75 tokens
    """
    prompt = chunking.check_prompt_text("prompt", prompt)
    chunking.check_strategy(long_prompt)
    if tokenizer is None:
        from .tokenizer import CLIPTokenizer

        tokenizer = CLIPTokenizer()
    segments = _segments(prompt, weights)
    stream = chunking.tokenize_segments(segments, tokenizer)
    plan = chunking.plan_stream(stream, tokenizer, long_prompt)
    out = {"prompt": prompt, "long_prompt": long_prompt, "weights": bool(weights)}
    out["segments"] = [{"text": text, "weight": weight} for text, weight in segments]
    ids = [t for t, _ in stream if t != chunking.BREAK_ID]
    strings = tokenizer.token_strings(ids)
    token_weights = [w for t, w in stream if t != chunking.BREAK_ID]
    out["tokens"] = [{"id": i, "text": s, "weight": w} for i, s, w in zip(ids, strings, token_weights)]
    out.update(plan.report.to_dict())
    for info, window in zip(out["chunks"], plan.windows):
        info["ids"] = list(window.tokens)
        info["weights"] = list(window.weights)
    out["truncate_would_drop"] = None
    if long_prompt != "truncate" and len(ids) > chunking.CHUNK_TOKENS:
        cut = chunking.plan_stream(stream, tokenizer, "truncate").report
        out["truncate_would_drop"] = {"tokens": cut.dropped_tokens, "text": cut.dropped_text}
    return out


def _weight(w: float) -> str:
    return f"{w:.4g}"


def format_report(report: dict) -> str:
    """The text the command prints for a :func:`tokens_report` dict."""
    chunks = report["chunks"]
    noun = "window" if report["long_prompt"] in ("window", "stretch", "truncate") else "chunk"
    lines = [
        f"{report['total_tokens']} tokens, {len(chunks)} {noun}{'s' if len(chunks) != 1 else ''} "
        f"(long_prompt={report['long_prompt']}): {report['summary']}"
    ]
    width = len(str(len(chunks)))
    for n, c in enumerate(chunks, 1):
        start = c["first_words"] or "(empty: padding only)"
        lines.append(f"  {noun} {n:>{width}}  {c['tokens']:>3}/{c['capacity']}  starts: {start}")
    breaks = [s for s in report["segments"] if (s["text"], s["weight"]) == ("BREAK", -1.0)]
    weighted = [s for s in report["segments"] if s["weight"] != 1.0 and s["text"].strip() and s not in breaks]
    if weighted:
        shown = ", ".join(f"{s['text'].strip()!r} x{_weight(s['weight'])}" for s in weighted[:12])
        more = f", ... ({len(weighted) - 12} more)" if len(weighted) > 12 else ""
        lines.append(f"weighted: {shown}{more}")
    for note in report["notes"]:
        lines.append(f"note: {note}")
    cut = report["truncate_would_drop"]
    if cut:
        lines.append(f"with --long-prompt truncate, {cut['tokens']} tokens would be dropped: {cut['text']!r}")
    return "\n".join(lines)


def _read_prompt(value: str) -> str:
    if value != STDIN:
        return value
    from .tokenizer import decode_prompt_bytes

    text = decode_prompt_bytes(sys.stdin.buffer.read(), "prompt (stdin)")
    return text[:-1] if text.endswith("\n") else text


def run(args) -> int:
    prompt = _read_prompt(args.prompt)
    if not isinstance(prompt, str):
        raise PromptError(f"prompt must be a string, got {type(prompt).__name__}")
    report = tokens_report(prompt, long_prompt=args.long_prompt, weights=not args.no_weights)
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=1))
    else:
        print(format_report(report))
    return 0
