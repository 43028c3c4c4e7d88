"""``clipdiffusion eval``: prompt adherence of a model on the synthetic world (GenEval-style table, long-prompt,
clip-skip and prompt-editing studies). Writes ``report.md``, ``report.json``, ``long_prompt.png`` and
``schedule.png`` to ``--out``; the schedule study rewrites the report after every cell (marked PARTIAL until done)."""

import json
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import ClipDiffusionError

STUDIES = ("main", "long", "clipskip", "clipscore", "schedule", "embedding")
REFERENCES = ("ground-truth", "noise")


def add_arguments(parser):
    parser.add_argument("--model", help="checkpoint file or diffusers folder (default: the embedded tiny model)")
    parser.add_argument("--reference", choices=REFERENCES,
                        help="score a stand-in, not a model: the ground truth (ceiling) or noise (floor)")
    parser.add_argument("--per-count", type=int, default=50, help="prompts per object count (1, 2, 3)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.0)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--studies", default="main", help=f"comma list of {', '.join(STUDIES)}")
    parser.add_argument("--lengths", default="0,40,60,90,120,150,225", help="long-prompt study: style-tag tokens")
    parser.add_argument("--strategies", default="truncate,chunk,window,stretch,summarize",
                        help="long-prompt study: comma list of long_prompt strategies")
    parser.add_argument("--clip-heads", help="tiny-clip-heads.safetensors from training (for the clipscore study)")
    parser.add_argument("--per-prompt", type=int, default=10,
                        help="schedule study: images per prompt, one batch of consecutive seeds (fewer: more "
                             "independent prompts per cell, slower)")
    parser.add_argument("--embedding", metavar="FILE",
                        help="embedding study: a file from `train-embedding --describe` (its word is the file stem)")
    parser.add_argument("--untrained-word", default="wug",
                        help="embedding study: the made-up word that gets the run's initial vectors (default wug)")
    parser.add_argument("--out", default="eval/latest", help="report folder")
    from ..fast_options import add_arguments as add_fast_arguments

    add_fast_arguments(parser)  # --s-min-uncond, --skip-early-cfg, --deepcache, --tome: every study's generations
    from .. import devices

    devices.add_arguments(parser)


def _load(args):
    from ..tiny.eval import GroundTruthPipeline, NoisePipeline

    if args.reference == "ground-truth":
        from ..text.tokenizer import CLIPTokenizer

        return GroundTruthPipeline(tokenizer=CLIPTokenizer())
    if args.reference == "noise":
        return NoisePipeline()
    from ..devices import from_args, load_options
    from ..pipeline import Pipeline

    device, dtype = from_args(args)
    if args.model:
        return Pipeline.from_file(args.model, device=device, dtype=dtype, **load_options(args))
    return Pipeline.default(device=device, dtype=dtype, **load_options(args))


def _tokenizer(pipe):
    tokenizer = getattr(getattr(pipe, "text_encoder", None), "tokenizer", None)
    if tokenizer is None:
        from ..text.tokenizer import CLIPTokenizer

        tokenizer = CLIPTokenizer()
    return tokenizer


def run(args) -> int:
    from ..tiny import eval as ev

    studies = [s.strip() for s in args.studies.split(",") if s.strip()]
    for s in studies:
        if s not in STUDIES:
            raise ClipDiffusionError(f"studies: unknown study {s!r} (one of {', '.join(STUDIES)})")
    if not 1 <= args.per_count <= 200:
        raise ClipDiffusionError(f"per-count: {args.per_count} is outside 1..200")
    try:
        lengths = tuple(int(v) for v in args.lengths.split(","))
    except ValueError:
        raise ClipDiffusionError(f"lengths: {args.lengths!r} is not a comma list of integers") from None
    from ..devices import from_args, load_options

    from_args(args)  # --device/--dtype checked before the report folder is made
    load_options(args)  # --compile too
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from .. import fast_options

    fast = fast_options.changed(fast_options.request_fields(args))
    pipe = fast_options.with_options(_load(args), fast)
    name = args.reference or args.model or "embedded tiny model"
    gen = {"steps": args.steps, "guidance": args.guidance, "sampler": args.sampler}
    cases = ev.prompt_set(args.per_count)
    command = " ".join(sys.argv[1:]) if sys.argv[1:2] == ["eval"] else "eval"
    lines = [f"# Synthetic-world evaluation: {name}", "",
             (f"{len(cases)} held-out prompts, " if {"main", "clipscore"} & set(studies) else "")
             + f"{args.steps} steps, guidance {args.guidance}, sampler {args.sampler}",
             f"command: `clipdiffusion {command}`", ""]  # fmt: skip
    results: dict = {"model": name, **gen}
    if fast:
        results["options"] = fast
        lines[-1:-1] = ["options: " + ", ".join(f"{k}={v}" for k, v in fast.items())]
    placement = getattr(pipe, "placement", None)
    if placement is not None:
        results["placement"] = placement.to_dict()
        if not (placement.is_default and placement.reason == "as asked"):
            lines[-1:-1] = [f"placement: {placement.describe()}"]

    def progress(i, n):
        print(f"\r  {i}/{n}", end="", file=sys.stderr, flush=True)

    if "main" in studies:
        start = time.perf_counter()
        report = ev.evaluate(pipe, cases, progress=progress, **gen)
        print(file=sys.stderr)
        results["main"] = report.as_dict()
        results["main"]["seconds"] = time.perf_counter() - start
        lines += ["## Prompt adherence", "", report.table(), "", "First failures:", ""]
        lines += [f"- `{p}` -> {saw}" for p, saw in report.failures] or ["- none"]
        lines.append("")
        print(report.table())
    if "long" in studies:
        from ..text.chunking import check_strategy

        strategies = tuple(check_strategy(s.strip()) for s in args.strategies.split(",") if s.strip())
        cells: dict = {}
        per = max(1, args.per_count // 5)
        table = ev.long_prompt_study(
            pipe, _tokenizer(pipe), lengths=lengths, strategies=strategies, per_count=per, cells=cells,
            progress=lambda s, n, r: print(f"  {s:9s} {n:4d} tokens: recall {r:.3f}", file=sys.stderr), **gen,
        )  # fmt: skip
        ev.plot_png(table, out / "long_prompt.png")
        results["long_prompt"] = table
        results["long_prompt_cells"] = cells
        lines += long_report_lines(cells, lengths, 3 * per)
    heads = None
    if "clipscore" in studies:
        if not args.clip_heads or getattr(pipe, "text_encoder", None) is None:
            raise ClipDiffusionError("studies: clipscore needs --clip-heads FILE and a model (not a --reference)")
        heads = ev.load_heads(args.clip_heads)
    if "clipskip" in studies:
        # a third of the prompts, balanced over 1, 2 and 3 objects (each count's prompts are a prefix stream)
        subset = ev.prompt_set(max(1, args.per_count // 3))
        rows = ev.clip_skip_study(pipe, subset, heads=heads, **gen)
        results["clip_skip"] = rows
        base = rows[1]["encode_s"]
        score_head = " tiny-CLIP score |" if heads is not None else ""
        lines += ["## Clip skip", "", f"| clip skip | object recall | prompt success |{score_head} "
                  "encoder time (s) | time saved |", "|---" * (5 + (heads is not None)) + "|"]  # fmt: skip
        for skip, row in rows.items():
            saved = 1 - row["encode_s"] / base if base == base and base > 0 else float("nan")
            success = float(np.mean(list(row["success"].values())))
            score = f" {row['clip_score']:.2f} |" if heads is not None else ""
            lines.append(f"| {skip} | {row['recall']:.3f} | {success:.3f} |{score} {row['encode_s']:.4f} | "
                         f"{saved:.1%} |")
        lines.append("")
    if "clipscore" in studies:
        scores = ev.clip_score_study(pipe, heads, cases, **gen)
        results["clip_score"] = scores
        lines += ["## Tiny-CLIP score (cosine x 100)", "", "| images | score |", "|---|---|"]
        lines += [f"| {k.replace('_', ' ')} | {v:.2f} |" for k, v in scores.items()] + [""]
    if "schedule" in studies:
        _schedule_study(pipe, args, gen, out, lines, results)
    if "embedding" in studies:
        _embedding_study(pipe, args, gen, out, lines, results)
    _write(out, lines, results)
    print(f"wrote {out / 'report.md'}", file=sys.stderr)
    return 0


def _write(out, lines, results):
    from ..fileio import atomic_write

    atomic_write(out / "report.md", lambda f: f.write("\n".join(lines).encode()))
    atomic_write(out / "report.json", lambda f: f.write(json.dumps(results, indent=1, default=str).encode()))


def _schedule_lines(res: dict, per_cell: int, per_prompt: int, steps: int, partial: bool) -> list:
    from ..tiny import eval_schedule as es

    lines = ["## When each attribute is decided: prompt editing, AND, alternation", ""]
    if partial:
        lines += ["**PARTIAL: the run has not finished; the cells below are the ones done so far.**", ""]
    lines += [f"{per_cell} images per cell: {-(-per_cell // max(1, min(per_prompt, per_cell)))} prompts x "
              f"{min(per_prompt, per_cell)} seeds (one batch each). ± is the binomial standard error over images; "
              "in brackets, where known, the standard error from the spread between prompts (`se_prompt` in "
              "report.json): the honest one when the seeds of one prompt agree with each other.", ""]
    if res.get("and"):
        lines += ["### AND (composable diffusion) against one prompt, two-object scenes", "",
                  f"one prompt: `{res['and']['examples'][0]}`", "", f"AND: `{res['and']['examples'][1]}`", "",
                  es.and_table(res["and"]), ""]
    if res.get("alternation"):
        lines += ["### Alternation `[A|B]` (the prompt switches every step)", "",
                  es.alternation_table(res["alternation"]), ""]
    swap = res.get("swap") or {}
    if any(swap.values()):
        lines += [f"### `[A:B:k]`: A for the first int(k x {steps}) steps, then B", "",
                  f"Template: `{es.TEMPLATE}`, the swapped attribute written as `[A:B:k]`; A and B random distinct "
                  "values per prompt; the same prompts and seeds at every k.", "",
                  es.swap_table({a: c for a, c in swap.items() if c}), "", "![share read as B](schedule.png)", ""]
    return lines


def _schedule_study(pipe, args, gen, out, lines, results):
    from ..tiny import eval_schedule as es

    if not 1 <= args.per_prompt <= 64:
        raise ClipDiffusionError(f"per-prompt: {args.per_prompt} is outside 1..64")
    res: dict = {"per_cell": args.per_count, "per_prompt": args.per_prompt, "and": None, "alternation": None,
                 "swap": {}}
    results["schedule"] = res
    common = {"per_cell": args.per_count, "per_prompt": args.per_prompt, **gen}
    start = time.perf_counter()

    def save(partial=True):
        res["seconds"] = time.perf_counter() - start
        res["partial"] = partial
        if any(res["swap"].values()):
            es.plot_swap_png(res["swap"], out / "schedule.png")
        _write(out, lines + _schedule_lines(res, args.per_count, args.per_prompt, args.steps, partial), results)

    def tick(what, i, n):
        print(f"  {what} {i}/{n} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

    res["and"] = es.and_study(pipe, progress=lambda i, n: tick("AND", i, n), **common)
    save()
    res["alternation"] = es.alternation_study(pipe, progress=tick, **common)
    save()

    def cell_done(attribute, k, cell):
        tick(f"swap {attribute} k={k:g}: A {cell['a']['p']:.2f} B {cell['b']['p']:.2f}", 1, 1)

    def on_cell(table):
        res["swap"] = {a: dict(sorted(c.items())) for a, c in table.items()}
        save()

    res["swap"] = es.swap_study(pipe, progress=cell_done, on_cell=on_cell, **common)
    res["seconds"] = time.perf_counter() - start
    res["partial"] = False
    es.plot_swap_png(res["swap"], out / "schedule.png")
    lines += _schedule_lines(res, args.per_count, args.per_prompt, args.steps, False)


def _embedding_study(pipe, args, gen, out, lines, results):
    """Issue 17: a learned word against the object's description, an untrained word and the bare word
    (``tiny/eval_embedding.py``); the report is rewritten after every arm (PARTIAL until done)."""
    from ..checkpoints.safetensors_io import read_shapes
    from ..embedding_data import parse_description
    from ..embedding_training import EmbeddingSettings, TrainedEmbedding, check_name, init_vectors, save_embedding
    from ..tiny import eval_embedding as ee

    if not args.embedding or getattr(pipe, "text_encoder", None) is None:
        raise ClipDiffusionError("studies: embedding needs --embedding FILE and a model (not a --reference)")
    if not 1 <= args.per_prompt <= 64:
        raise ClipDiffusionError(f"per-prompt: {args.per_prompt} is outside 1..64")
    path = Path(args.embedding)
    word, untrained = check_name(path.stem), check_name(args.untrained_word)
    if word.lower() == untrained.lower():
        raise ClipDiffusionError(f"untrained-word: {untrained!r} is the embedding's own word")
    _, _, meta = read_shapes(path)
    source = meta.get("source", "")
    if not source.startswith("describe:"):
        raise ClipDiffusionError(f"embedding: {str(path)!r} was not trained with --describe (metadata source "
                                 f"{source!r}), so the study does not know which object it should draw")
    description = source.removeprefix("describe:")
    target = parse_description(description)
    phrase = " ".join(w for w in target if w)
    # the untrained word: the run's initial vectors (init text, vector count) in a file of its own
    settings = EmbeddingSettings(vectors=int(meta.get("vectors", "1")), init_text=meta.get("init_text", "*"))
    start_vectors = init_vectors(pipe.text_encoder, settings.init_text, settings.vectors)
    untrained_path = out / f"{untrained}.safetensors"
    save_embedding(untrained_path, TrainedEmbedding(untrained, start_vectors, start_vectors, 0, settings=settings),
                   model=pipe.name, family=pipe.family, extra_metadata={"source": "untrained (init vectors)"})
    res: dict = {"word": word, "description": phrase, "untrained_word": untrained, "per_prompt": args.per_prompt,
                 "embedding_metadata": meta, "arms": {}, "partial": True}
    results["embedding"] = res
    start = time.perf_counter()
    head = ["## A learned word against the description, an untrained word and the bare word", "",
            f"Embedding `{path.name}` ({meta.get('vectors')} vectors, {meta.get('step')} steps from "
            f"{meta.get('init_text')!r}); taught object: {phrase}. Template `{ee.TEMPLATE}` over 9 positions x 3 "
            f"backgrounds, {args.per_prompt} seeds each (the same seeds in every arm). Cells: share ± binomial SE "
            "(between-prompt SE). object = the prompt's cell holds an object of the taught colour, shape and size; "
            "strict = that, the right background and nothing elsewhere.", ""]  # fmt: skip

    def save(partial=True):
        res["seconds"] = time.perf_counter() - start
        res["partial"] = partial
        res["comparisons"] = ee.comparisons(res["arms"])
        body = head + (["**PARTIAL: the run has not finished; the arms below are the ones done so far.**", ""]
                       if partial else []) + [ee.table(res["arms"]), ""]  # fmt: skip
        if res["comparisons"]:
            body += [ee.comparison_table(res["comparisons"]), ""]
        _write(out, lines + body, results)
        return body

    def arm(name, text):
        def progress(i, n):
            print(f"\r  {name}: {i}/{n} prompts ({time.perf_counter() - start:.0f} s)", end="", file=sys.stderr,
                  flush=True)

        res["arms"][name] = ee.run_arm(pipe, text, target, per_prompt=args.per_prompt, progress=progress, **gen)
        print(file=sys.stderr)
        save()

    arm("description", phrase)
    arm("plain", word)  # before the embedding is loaded: the made-up word as CLIP's BPE reads it
    pipe.load_textual_inversion(path)
    pipe.load_textual_inversion(untrained_path)
    arm("word", word)
    arm("untrained", untrained)
    lines += save(partial=False)


def long_report_lines(cells: dict, lengths, prompts: int) -> list:
    """The long-prompt study's markdown: recall, success and seconds per (strategy, length) cell, and the plot."""
    header = "| strategy | " + " | ".join(f"{n} tok" for n in lengths) + " |"
    rule = "|---" * (len(lengths) + 1) + "|"

    def table(cell):
        return [header, rule] + [f"| {s} | " + " | ".join(cell(c[n]) for n in lengths) + " |" for s, c in cells.items()]

    return [f"## Long prompts: objects after N tokens of style tags ({prompts} prompts per cell)", "",
            "Object recall (± standard error between prompts):", "",
            *table(lambda c: f"{c['recall']:.3f} ± {c['recall_se']:.3f}"),
            "", "Prompt success (every object right; ± binomial standard error):", "",
            *table(lambda c: f"{c['success']:.3f} ± {c['success_se']:.3f}"),
            "", "Seconds per cell (generation and judging; \"= s\": the same contexts as strategy s, whose images "
            "it reuses):", "",
            *table(lambda c: f"= {c['same_as']}" if c.get("same_as") else f"{c['seconds']:.0f}"),
            "", "![long prompts](long_prompt.png)", ""]  # fmt: skip
