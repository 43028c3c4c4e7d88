"""Merge long-prompt study reports that ran side by side (one strategy group per process) into one report.

    python scripts/merge_long_reports.py OUT RUN_A RUN_B [...]

Each RUN is an ``eval --studies long`` folder (report.json) of the same model, lengths and prompts; OUT gets
report.json, report.md (the commands of every run) and long_prompt.png, with the strategies in the study's order.
"""

import json
import sys
from pathlib import Path

from clipdiffusion.commands.eval import long_report_lines
from clipdiffusion.tiny import eval as ev


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 3:
        sys.exit(__doc__)
    out, runs = Path(argv[0]), [Path(a) for a in argv[1:]]
    cells, commands, meta = {}, [], None
    for run in runs:
        report = json.loads((run / "report.json").read_text())
        head = {k: report.get(k) for k in ("model", "steps", "guidance", "sampler")}
        if meta is not None and head != meta:
            sys.exit(f"{run}: made with {head}, not {meta} like the first run")
        meta = head
        for strategy, by_length in report["long_prompt_cells"].items():
            if strategy in cells:
                sys.exit(f"{run}: strategy {strategy!r} is in two runs")
            cells[strategy] = {int(n): c for n, c in by_length.items()}
        md = (run / "report.md").read_text().splitlines()
        commands += [line for line in md if line.startswith("command:")]
    lengths = sorted({n for c in cells.values() for n in c})
    if any(sorted(c) != lengths for c in cells.values()):
        sys.exit("the runs measured different lengths")
    order = [s for s in ev.LONG_STRATEGIES if s in cells] + [s for s in cells if s not in ev.LONG_STRATEGIES]
    cells = {s: cells[s] for s in order}
    prompts = {c["prompts"] for by_length in cells.values() for c in by_length.values()}
    if len(prompts) != 1:
        sys.exit(f"the runs used different prompt counts: {sorted(prompts)}")
    table = {s: {n: c["recall"] for n, c in by_length.items()} for s, by_length in cells.items()}
    out.mkdir(parents=True, exist_ok=True)
    ev.plot_png(table, out / "long_prompt.png")
    (out / "report.json").write_text(json.dumps({**meta, "long_prompt": table, "long_prompt_cells": cells}, indent=1))
    lines = [f"# Synthetic-world evaluation: {meta['model']}", "",
             f"{meta['steps']} steps, guidance {meta['guidance']}, sampler {meta['sampler']}",
             *commands, f"merged by `python scripts/merge_long_reports.py {' '.join(argv)}`", "",
             *long_report_lines(cells, lengths, prompts.pop())]  # fmt: skip
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(out / "report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
