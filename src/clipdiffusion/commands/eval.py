"""``clipdiffusion eval``: prompt adherence of a model on the synthetic world (GenEval-style table, long-prompt
and clip-skip studies). Writes ``report.md``, ``report.json`` and ``long_prompt.png`` to ``--out``."""

import json
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import ClipDiffusionError

STUDIES = ("main", "long", "clipskip", "clipscore")
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
    parser.add_argument("--lengths", default="0,40,60,90,120,150", help="long-prompt study: style-tag tokens")
    parser.add_argument("--clip-heads", help="tiny-clip-heads.safetensors from training (for the clipscore study)")
    parser.add_argument("--out", default="eval/latest", help="report folder")


def _load(args):
    from ..tiny.eval import GroundTruthPipeline, NoisePipeline

    if args.reference == "ground-truth":
        from ..text.tokenizer import CLIPTokenizer

        return GroundTruthPipeline(tokenizer=CLIPTokenizer())
    if args.reference == "noise":
        return NoisePipeline()
    from ..pipeline import Pipeline

    return Pipeline.from_file(args.model) if args.model else Pipeline.default()


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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = _load(args)
    name = args.reference or args.model or "embedded tiny model"
    gen = {"steps": args.steps, "guidance": args.guidance, "sampler": args.sampler}
    cases = ev.prompt_set(args.per_count)
    command = " ".join(sys.argv[1:]) if sys.argv[1:2] == ["eval"] else "eval"
    lines = [f"# Synthetic-world evaluation: {name}", "",
             f"{len(cases)} held-out prompts, {args.steps} steps, guidance {args.guidance}, sampler {args.sampler}",
             f"command: `clipdiffusion {command}`", ""]  # fmt: skip
    results: dict = {"model": name, **gen}

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
        table = ev.long_prompt_study(
            pipe, _tokenizer(pipe), lengths=lengths, per_count=max(1, args.per_count // 5),
            progress=lambda s, n, r: print(f"  {s:9s} {n:4d} tokens: recall {r:.3f}", file=sys.stderr), **gen,
        )  # fmt: skip
        ev.plot_png(table, out / "long_prompt.png")
        results["long_prompt"] = table
        header = "| strategy | " + " | ".join(f"{n} tok" for n in lengths) + " |"
        lines += ["## Long prompts: object recall after N tokens of style tags", "", header,
                  "|---" * (len(lengths) + 1) + "|"]  # fmt: skip
        lines += [f"| {s} | " + " | ".join(f"{t[n]:.3f}" for n in lengths) + " |" for s, t in table.items()]
        lines += ["", "![long prompts](long_prompt.png)", ""]
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
    (out / "report.md").write_text("\n".join(lines))
    (out / "report.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {out / 'report.md'}", file=sys.stderr)
    return 0
