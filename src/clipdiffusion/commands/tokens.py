"""``clipdiffusion tokens "PROMPT"``: how a prompt is weighted, tokenized and laid out in CLIP windows.

Torch-free (prompt.py, schedule.py, tokenizer.py and chunking.py only), so it answers in well under a second. It
shows the count per window as A1111's counter does (``75/75 | 12/75``), where each window starts, the weighted
segments, and every token a strategy drops: truncation is never silent. The prompt language comes first, as in
A1111's counter: extra-network tags are taken out (and listed: none is applied yet), ``AND`` parts are split, and
each part is scheduled over ``--steps``; every text of the schedule is counted and the headline is the largest.
``--json`` prints the same as one object (see :func:`prompt_report`).

``--embeddings DIR`` counts textual-inversion embeddings as their vectors (a name becomes one unit of n positions,
never split across chunks). Shapes come from ``.safetensors`` headers without torch; ``.pt``/``.bin`` files have no
header, so for them torch is imported (lazily) and the file read through the weights-only unpickler.
"""

import json
import sys

from ..errors import PromptError
from ..text import chunking
from ..text.prompt import BREAK, parse_prompt
from ..text.schedule import counted_program, plan_prompt

STDIN = "-"
REPORT_TOKENS = 8  # tokens whose words show where a window starts
DEFAULT_STEPS = 20  # A1111's default, which its counter schedules with
SHOWN_RANGES = 40  # schedule lines in the text output (--json has them all)


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
        help="do not parse (x:1.2) [x] or BREAK; brackets are plain text (A1111's emphasis 'None'; "
        "[from:to:when] and [a|b] still apply, as there)",
    )
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"steps that [from:to:when] and [a|b] are scheduled over (default {DEFAULT_STEPS})")
    parser.add_argument("--negative", action="store_true",
                        help="count it as a negative prompt: AND and <lora:...> tags are text there, as in A1111")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--embeddings", metavar="DIR",
                        help="a folder of textual-inversion embeddings: their names count as their vectors "
                             "(.safetensors read from the header; .pt/.bin need torch)")


def _segments(prompt: str, weights: bool) -> list:
    return parse_prompt(prompt) if weights else [(prompt, 1.0)]


def tokens_report(prompt, *, long_prompt="chunk", weights=True, tokenizer=None) -> dict:
    """Everything the ``tokens`` command shows, as a JSON-ready dict::

        {"prompt", "long_prompt", "weights": bool, "segments": [{"text", "weight"}],
         "tokens": [{"id", "text", "weight", "word"}],   # prompt order, BREAK markers left out
         "words": [{"text", "tokens": [start, stop]}],   # the user's words, each once
         "chunks": [{"tokens", "capacity", "first_words", "starts_with", "ids", "weights"}],
         "summary": "75/75 | 12/75", "total_tokens", "dropped_tokens", "dropped_text", "dropped_words",
         "notes": [...], "truncate_would_drop": {"tokens", "text", "words"} | None}  # other strategies, >75 tokens

    ``first_words`` and ``dropped_text`` are decoded tokens (chunking's report); ``starts_with``,
    ``dropped_words`` and ``words`` are the user's own words, which keep the spacing that tokens lose. A token's
    ``word`` is the index in ``words`` of the word it belongs to (None when the tokenizer cannot tell), and
    ``words[i]["tokens"]`` is the range ``[start, stop)`` of its tokens in ``tokens``: each word is listed once,
    so the report stays linear in the prompt's length however long a word is.
    """
    prompt = chunking.check_prompt_text("prompt", prompt)
    chunking.check_strategy(long_prompt)
    if tokenizer is None:
        from ..text.tokenizer import CLIPTokenizer

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
    locate = getattr(tokenizer, "locate", None)
    if locate is not None:
        for token in out["tokens"]:
            found = locate(token["id"])
            if found is not None:  # an embedding's k-th vector: the unit is its name and its vector count
                token.update(embedding=found[0].name, vector=found[1], vectors=found[0].vectors)
    out.update(plan.report.to_dict())
    for info, window in zip(out["chunks"], plan.windows):
        info["ids"] = list(window.tokens)
        info["weights"] = list(window.weights)
    labels = _token_words(segments, tokenizer, ids)
    ranges = _window_ranges(plan, ids, long_prompt)
    out["words"] = _word_list(labels) if labels else []
    if labels:
        for index, word in enumerate(out["words"]):
            for k in range(*word["tokens"]):
                out["tokens"][k]["word"] = index
    else:
        for token in out["tokens"]:
            token["word"] = None
    for info, span in zip(out["chunks"], ranges or [None] * len(plan.windows)):
        info["starts_with"] = _render(labels, strings, *span, limit=REPORT_TOKENS) if labels and span else None
    out["dropped_words"] = ""
    if plan.report.dropped_tokens and labels and ranges:
        kept = ranges[-1][1]
        if len(ids) - kept == plan.report.dropped_tokens:
            out["dropped_words"] = _render(labels, strings, kept, len(ids))
    out["truncate_would_drop"] = None
    if long_prompt != "truncate" and len(ids) > chunking.CHUNK_TOKENS:
        cut = chunking.plan_stream(stream, tokenizer, "truncate").report
        words = _render(labels, strings, chunking.CHUNK_TOKENS, len(ids)) if labels else cut.dropped_text
        out["truncate_would_drop"] = {"tokens": cut.dropped_tokens, "text": cut.dropped_text, "words": words}
    return out


def _text_count(text, long_prompt, weights, tokenizer) -> dict:
    report = chunking.plan_stream(chunking.tokenize_segments(_segments(text, weights), tokenizer), tokenizer,
                                  long_prompt).report
    chunks = report.chunks
    # A1111's number: every closed chunk counts in full, the last one its tokens
    count = sum(c.capacity for c in chunks[:-1]) + chunks[-1].tokens if chunks else 0
    return {"count": count, "total_tokens": report.total_tokens, "summary": report.summary(),
            "dropped_tokens": report.dropped_tokens}


def prompt_report(prompt, *, steps=DEFAULT_STEPS, negative=False, long_prompt="chunk", weights=True,
                  tokenizer=None) -> dict:
    """What the ``tokens`` command shows for a whole prompt: :func:`tokens_report` of the *headline* text (the
    schedule text with the most tokens, as A1111's counter shows the maximum; for a prompt without tags, ``AND``,
    editing or alternation that is the prompt itself), with ``prompt`` the prompt as given, plus::

        {"steps", "negative", "text": the prompt without its tags,
         "texts": [{"text", "count", "total_tokens", "summary", "dropped_tokens"}],  # each distinct text once
         "headline": index in texts of the text the other fields describe,
         "schedule": [{"part", "start", "end", "text_index"}],   # steps start..end (1-based) show texts[text_index]
         "parts": [{"text", "weight"}],                           # AND parts (one for a negative prompt)
         "networks": [{"kind", "name", "text", "positional", "named", "te", "unet", "dyn", "applied", "status"}]}

    ``notes`` has the headline's chunking notes, then the prompt language's (:func:`schedule.plan_prompt`)."""
    prompt = chunking.check_prompt_text("prompt", prompt)
    chunking.check_strategy(long_prompt)
    if tokenizer is None:
        from ..text.tokenizer import CLIPTokenizer

        tokenizer = CLIPTokenizer()
    program = plan_prompt(prompt, steps, negative=negative)
    info = counted_program(program, lambda text: _text_count(text, long_prompt, weights, tokenizer))
    out = tokens_report(info["texts"][info["headline"]]["text"], long_prompt=long_prompt, weights=weights,
                        tokenizer=tokenizer)
    out["prompt"] = prompt
    out["notes"] += info.pop("notes")
    out.update(info, negative=bool(negative))
    return out


def _token_words(segments, tokenizer, ids):
    """``(word, starts_word, glued_to_previous_word)`` per content token, the word as the user wrote it (after the tokenizer's cleaning);
    None if the tokenizer cannot tell (a stand-in without ``encode_words``) or disagrees with ``ids``."""
    encode_words = getattr(tokenizer, "encode_words", None)
    if encode_words is None:
        return None
    labels, seen, spaced = [], [], True
    for text, weight in segments:
        if (text, weight) == BREAK:
            spaced = True
            continue  # the chunker's break marker, not text
        for n, (word, word_ids) in enumerate(encode_words(text)):
            # glued: "(red hair), x" has "," right after "hair" although they are in different segments
            glued = n == 0 and not spaced and not text[:1].isspace()
            labels += [(word, k == 0, glued) for k in range(len(word_ids))]
            seen += word_ids
        if text:
            spaced = text[-1].isspace()
    return labels if seen == ids else None


def _word_list(labels) -> list:
    """``[{"text": word, "tokens": [start, stop)}]``, one entry per word of ``_token_words`` labels."""
    words = []
    for k, (word, starts_word, _glued) in enumerate(labels):
        if starts_word or not words:
            words.append({"text": word, "tokens": [k, k + 1]})
        else:
            words[-1]["tokens"][1] = k + 1
    return words


def _window_ranges(plan, ids, strategy):
    """``(start, stop)`` in the content-token stream for each window, or None if they cannot be matched.

    ``window`` overlaps: its output rows 1..n carry the tokens in prompt order, each from the window it is taken
    from, which gives each window's start. The other strategies lay windows out one after the other."""
    ranges = []
    if strategy == "window" and len(plan.windows) > 1:
        starts = {}
        for token, (w, position) in enumerate(plan.rows[1:len(ids) + 1]):
            starts.setdefault(w, token - (position - 1))
        for w, window in enumerate(plan.windows):
            start = starts.get(w, -1)
            ranges.append((start, start + len(window.tokens)))
    else:
        offset = 0
        for window in plan.windows:
            ranges.append((offset, offset + len(window.tokens)))
            offset += len(window.tokens)
    ok = all(a >= 0 and ids[a:b] == list(w.tokens) for (a, b), w in zip(ranges, plan.windows))
    return ranges if ok else None


def _render(labels, strings, start, stop, limit=None) -> str:
    """The user's words for content tokens ``[start, stop)``. A word cut by the range shows the tokens inside it
    with "…" on the cut side; ``limit`` shows the words of the first ``limit`` tokens, then " ..."."""
    if start >= stop:
        return ""
    shown = stop
    if limit is not None and stop - start > limit:
        shown = start + limit
        while shown < stop and not labels[shown][1]:
            shown += 1  # finish the word
    out, i = "", start
    while i < shown:
        end = i + 1
        while end < len(labels) and not labels[end][1]:
            end += 1
        word, starts_word, glued = labels[i]
        cut_left, cut_right = not starts_word, end > stop
        if cut_left or cut_right:
            word = ("…" if cut_left else "") + "".join(strings[i:min(end, stop)]) + ("…" if cut_right else "")
        out += word if not out or (glued and not cut_left) else " " + word
        i = min(end, stop)
    return out + (" ..." if shown < stop else "")


def _weight(w: float) -> str:
    return f"{w:.4g}"


def format_report(report: dict) -> str:
    """The text the command prints for a :func:`tokens_report` dict."""
    chunks = report["chunks"]
    noun = "window" if report["long_prompt"] in ("window", "stretch", "truncate", "summarize") else "chunk"
    lines = [
        f"{report['total_tokens']} tokens, {len(chunks)} {noun}{'s' if len(chunks) != 1 else ''} "
        f"(long_prompt={report['long_prompt']}): {report['summary']}"
    ]
    width = len(str(len(chunks)))
    for n, c in enumerate(chunks, 1):
        start = c.get("starts_with") or c["first_words"] or "(empty: padding only)"
        lines.append(f"  {noun} {n:>{width}}  {c['tokens']:>3}/{c['capacity']}  starts: {start}")
    breaks = [s for s in report["segments"] if (s["text"], s["weight"]) == ("BREAK", -1.0)]
    weighted = [s for s in report["segments"] if s["weight"] != 1.0 and s["text"].strip() and s not in breaks]
    if weighted:
        shown = ", ".join(f"{s['text'].strip()!r} x{_weight(s['weight'])}" for s in weighted[:12])
        more = f", ... ({len(weighted) - 12} more)" if len(weighted) > 12 else ""
        lines.append(f"weighted: {shown}{more}")
    dropped = report.get("dropped_words")
    for note in report["notes"]:
        if dropped and "dropped by long_prompt" in note:
            continue  # said below in the user's words
        lines.append(f"note: {note}")
    if dropped:
        lines.append(f"dropped: {report['dropped_tokens']} of {report['total_tokens']} tokens: {dropped!r}")
    cut = report["truncate_would_drop"]
    if cut:
        lines.append(f"with --long-prompt truncate, {cut['tokens']} tokens would be dropped: {cut['words']!r}")
    for use in report.get("embeddings", ()):
        first = use["position"]
        where = f"position {first}" if use["vectors"] == 1 else f"positions {first}-{first + use['vectors'] - 1}"
        lines.append(f"embedding {use['name']!r}: {use['vectors']} vector{'s' if use['vectors'] != 1 else ''}, "
                     f"{noun} {use['chunk'] + 1} {where}")
    lines += _format_program(report)
    return "\n".join(lines)


def _short(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _step_ranges(entries):
    """Consecutive schedule entries that show the same text, joined: ``[(start, end, text_index)]``."""
    ranges = []
    for e in entries:
        if ranges and ranges[-1][2] == e["text_index"]:
            ranges[-1][1] = e["end"]
        else:
            ranges.append([e["start"], e["end"], e["text_index"]])
    return ranges


def _format_program(report: dict) -> list:
    """The schedule, the AND parts and the tags, when the prompt has any (a plain prompt adds nothing)."""
    if "schedule" not in report:
        return []
    lines = []
    texts, parts = report["texts"], report["parts"]
    if len(parts) > 1 or len(texts) > 1:
        width = len(str(report["steps"]))
        lines.append(f"schedule over {report['steps']} steps"
                     + (" (the count above is the text with the most tokens):" if len(texts) > 1 else ":"))
        shown = 0
        for p, part in enumerate(parts):
            indent = "  "
            if len(parts) > 1:
                lines.append(f"  AND part {p + 1}, weight {_weight(part['weight'])}:")
                indent = "    "
            ranges = _step_ranges(e for e in report["schedule"] if e["part"] == p)
            for start, end, k in ranges:
                shown += 1
                if shown > SHOWN_RANGES:
                    continue
                steps = f"step  {start:>{width}}" + " " * (width + 1) if start == end else \
                    f"steps {start:>{width}}-{end:<{width}}"
                lines.append(f"{indent}{steps}  {texts[k]['summary']:>6}  {_short(texts[k]['text'])}")
        if shown > SHOWN_RANGES:
            lines.append(f"  ... ({shown - SHOWN_RANGES} more step ranges; --json lists them all)")
    for n in report["networks"]:
        weights = ""
        if n["te"] is not None:
            weights = f" te {_weight(n['te'])}, unet {_weight(n['unet'])}"
            weights += f", dyn {n['dyn']}" if n["dyn"] is not None else ""
        lines.append(f"tag {n['text'][:80]}: {n['kind']} {n['name']!r}{weights}: {n['status']}")
    return lines


def _read_prompt(value: str) -> str:
    if value != STDIN:
        return value
    from ..text.tokenizer import decode_prompt_bytes

    text = decode_prompt_bytes(sys.stdin.buffer.read(), "prompt (stdin)")
    return text[:-1] if text.endswith("\n") else text


def run(args) -> int:
    prompt = _read_prompt(args.prompt)
    if not isinstance(prompt, str):
        raise PromptError(f"prompt must be a string, got {type(prompt).__name__}")
    tokenizer = None
    if getattr(args, "embeddings", None) is not None:
        from ..checkpoints.embeddings import counting_tokenizer
        from ..text.tokenizer import CLIPTokenizer

        tokenizer, folder = counting_tokenizer(CLIPTokenizer(), args.embeddings)
        for name, entry in folder.skipped.items():
            print(f"note: embedding {name} skipped: {entry['reason']}", file=sys.stderr)
    report = prompt_report(prompt, steps=args.steps, negative=args.negative, long_prompt=args.long_prompt,
                           weights=not args.no_weights, tokenizer=tokenizer)
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=1))
    else:
        print(format_report(report))
    return 0
