"""Each fast option's adherence against the exact baseline, paired prompt by prompt, as one markdown table.

    python scripts/fast_options_table.py BASELINE RUN [RUN ...] [--times FIGURES.json]

BASELINE and each RUN are ``clipdiffusion eval --studies main`` folders (report.json) of the same model, steps,
guidance and sampler, whose ``main.cases`` list every prompt as ``[objects, success 0/1, objects recalled]`` in
the same prompt order. Per run: success with 1, 2 and 3 objects, overall success, object recall (recalled objects
/ objects), and the paired difference to the baseline with its standard error: the per-prompt differences d_i
(success: s_i - b_i; recall: (r_i - q_i) / mean objects, so that their mean is the difference of the pooled
recalls), mean(d) +- sd(d) / sqrt(n). "within noise" when |mean| < 2 SE, "same" when every prompt agrees.
The row label is the folder's name; ``--times`` adds each row's seconds per image from ``bench/fast_options.py
--json`` (configs named like the folders: baseline, ngms, deepcache3, ...), with its ratio to the exact baseline
and to diffusers when that run has them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from clipdiffusion.errors import ClipDiffusionError

HEAD_KEYS = ("model", "steps", "guidance", "sampler")


def load_run(folder) -> tuple[dict, list]:
    """(head, cases) of an ``eval --studies main`` folder; cases are ``(objects, success, recalled)`` ints."""
    path = Path(folder) / "report.json"
    try:
        report = json.loads(path.read_text())
    except OSError as exc:
        raise ClipDiffusionError(f"run {str(folder)!r}: cannot read {path} ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ClipDiffusionError(f"run {str(folder)!r}: {path} is not JSON ({exc})") from None
    cases = (report.get("main") or {}).get("cases") if isinstance(report, dict) else None
    if not isinstance(cases, list) or not cases:
        raise ClipDiffusionError(f"run {str(folder)!r}: report.json has no main.cases (needs an `eval --studies "
                                 "main` made after per-prompt outcomes were added)")
    out = []
    for i, case in enumerate(cases):
        ok = (isinstance(case, list) and len(case) == 3 and all(isinstance(v, int) for v in case)
              and case[0] >= 1 and case[1] in (0, 1) and 0 <= case[2] <= case[0])
        if not ok:
            raise ClipDiffusionError(f"run {str(folder)!r}: main.cases[{i}] must be [objects >= 1, success 0/1, "
                                     f"recalled 0..objects], got {case!r}")
        out.append(tuple(case))
    return {k: report.get(k) for k in HEAD_KEYS}, out


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error (sample sd / sqrt(n)) of ``values``."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def summary(cases) -> dict:
    """Success by object count (1, 2, 3, ... as present), overall success and pooled object recall."""
    out = {"n": len(cases), "success": sum(c[1] for c in cases) / len(cases),
           "recall": sum(c[2] for c in cases) / sum(c[0] for c in cases), "by_count": {}}
    for k in sorted({c[0] for c in cases}):
        group = [c for c in cases if c[0] == k]
        out["by_count"][k] = sum(c[1] for c in group) / len(group)
    return out


def paired(base, run) -> dict:
    """Paired differences run - base: overall success, success by object count, pooled recall; each (mean, se)."""
    if len(base) != len(run):
        raise ClipDiffusionError(f"cases: the baseline has {len(base)} prompts, the run {len(run)}")
    for i, (b, r) in enumerate(zip(base, run)):
        if b[0] != r[0]:
            raise ClipDiffusionError(f"cases[{i}]: {r[0]} objects in the run, {b[0]} in the baseline; the runs did "
                                     "not evaluate the same prompts in the same order")
    mean_objects = sum(b[0] for b in base) / len(base)
    out = {"success": mean_se([r[1] - b[1] for b, r in zip(base, run)]),
           "recall": mean_se([(r[2] - b[2]) / mean_objects for b, r in zip(base, run)]), "by_count": {}}
    for k in sorted({b[0] for b in base}):
        out["by_count"][k] = mean_se([r[1] - b[1] for b, r in zip(base, run) if b[0] == k])
    return out


def verdict(mean: float, se: float) -> str:
    if mean == 0 and (se == 0 or math.isnan(se)):
        return "same"
    if math.isnan(se) or abs(mean) >= 2 * se:
        return "better" if mean > 0 else "worse"
    return "within noise"


def _diff(mean_se_pair, long: bool = False) -> str:
    mean, se = mean_se_pair
    text = f"{mean:+.3f} ± {se:.3f}"
    return f"{text} ({verdict(mean, se)})" if long else text


def table(baseline, runs, times: dict | None = None) -> list[str]:
    """Markdown lines: one row for the baseline, one per run, in the order given."""
    base_head, base_cases = load_run(baseline)
    rows = [(Path(baseline).name, base_cases)]
    for folder in runs:
        head, cases = load_run(folder)
        if head != base_head:
            raise ClipDiffusionError(f"run {str(folder)!r}: made with {head}, the baseline with {base_head}; "
                                     "not a paired comparison")
        rows.append((Path(folder).name, cases))
    counts = sorted({c[0] for c in base_cases})
    configs = (times or {}).get("configs", {})
    base_s, ref_s = (configs.get("baseline") or {}).get("seconds"), (configs.get("diffusers") or {}).get("seconds")
    head = ["option"]
    if times:
        head += ["s / image", "vs exact", "vs diffusers"]
    head += [f"success, {k} object{'s' if k > 1 else ''}" for k in counts]
    head += ["success", "Δ success (paired ± SE)", "object recall", "Δ recall (paired ± SE)"]
    lines = [f"{base_head['steps']} steps, guidance {base_head['guidance']}, {base_head['sampler']}, model "
             f"{base_head['model']}; {len(base_cases)} prompts, paired against {Path(baseline).name!r}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, cases in rows:
        s, d = summary(cases), paired(base_cases, cases)
        cells = [name]
        if times:
            seconds = (configs.get(name) or {}).get("seconds")
            cells += [f"{seconds:.1f}" if seconds else "-",
                      f"{seconds / base_s:.2f}x" if seconds and base_s else "-",
                      f"{seconds / ref_s:.2f}x" if seconds and ref_s else "-"]
        for k in counts:
            cell = f"{s['by_count'][k]:.3f}"
            cells.append(cell if name == rows[0][0] else f"{cell} ({_diff(d['by_count'][k])})")
        same = name == rows[0][0]
        cells += [f"{s['success']:.3f}", "-" if same else _diff(d["success"], True),
                  f"{s['recall']:.3f}", "-" if same else _diff(d["recall"], True)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", type=Path)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--times", type=Path, default=None, help="figures from bench/fast_options.py --json")
    args = parser.parse_args(argv)
    try:
        times = json.loads(args.times.read_text()) if args.times else None
        print("\n".join(table(args.baseline, args.runs, times)))
    except (OSError, ValueError) as exc:  # ClipDiffusionError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
