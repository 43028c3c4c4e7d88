"""Does a learned word draw the taught object? The textual-inversion study on the synthetic world (issue 17).

One fixed template, ``a {word} at the {position} on a {background} background``, over every position and
background (27 prompts), each generated as one batch of ``per_prompt`` consecutive seeds; the same prompts and
seeds in every arm, so the arms are paired:

description  the object's own words ("large purple triangle"): what the model does when told in its language;
word         the learned word, its embedding loaded through ``Pipeline.load_textual_inversion`` (the user's path);
untrained    another made-up word loaded the same way with the *initial* vectors of the training run (the init
             text's token rows, cycled): the same number of vectors, never trained;
plain        the learned word's text with no embedding loaded (what CLIP's BPE makes of a made-up word).

Each image is read by the validated judge (``judge.py``) at the prompt's cell: the object there must have the
taught colour, shape and size ("object"); "strict" also wants the background right and nothing elsewhere.
Standard errors are binomial over images, with the between-prompt standard error (``se_prompt``) beside them;
differences between arms carry the SE of a difference of independent proportions and z (|z| <= 2: inside the
noise, reported as such).
"""

from __future__ import annotations

from .eval_schedule import binomial_se, difference
from .judge import judge
from .world import BACKGROUNDS, POSITIONS

TEMPLATE = "a {word} at the {position} on a {background} background"
STUDY_SEED = 20_240_617  # issue 17; apart from the held-out prompt set and issue 16's stream
METRICS = ("position", "color", "shape", "size", "object", "strict")
ARMS = ("description", "word", "untrained", "plain")


def prompts(word: str) -> list:
    """(prompt, cell, background) for every position and background."""
    return [(TEMPLATE.format(word=word, position=p, background=b), POSITIONS.index(p), b)
            for b in BACKGROUNDS for p in POSITIONS]  # fmt: skip


def read(image, cell: int, background: str, target: tuple) -> dict:
    """The metrics of one image: ``target`` = (size, colour, shape) expected in ``cell``."""
    seen = judge(image)
    found = seen.at(cell)
    size, color, shape = target
    out = {"position": found is not None,
           "color": found is not None and found.color == color,
           "shape": found is not None and found.shape == shape,
           "size": found is not None and (size is None or found.size == size)}  # fmt: skip
    out["object"] = out["position"] and out["color"] and out["shape"] and out["size"]
    extra = sum(1 for o in seen.objects if o.cell != cell)
    out["strict"] = out["object"] and extra == 0 and seen.background == background
    out["seen"] = "nothing" if found is None else f"{found.size} {found.color} {found.shape}"
    return out


def summarise(rows: list) -> dict:
    """rows: (prompt index, metrics dict) -> {metric: {"p", "se", "se_prompt", "n"}}."""
    import numpy as np

    out = {}
    for m in METRICS:
        hits = np.array([r[m] for _, r in rows], dtype=float)
        groups = [g for g, _ in rows]
        p = float(hits.mean()) if len(hits) else float("nan")
        per = [hits[[g == key for g in groups]].mean() for key in dict.fromkeys(groups)]
        se_prompt = float(np.std(per, ddof=1) / np.sqrt(len(per))) if len(per) > 1 else float("nan")
        out[m] = {"p": p, "se": binomial_se(p, len(hits)), "se_prompt": se_prompt, "n": len(hits)}
    seen: dict = {}
    for _, r in rows:
        if "seen" in r:
            seen[r["seen"]] = seen.get(r["seen"], 0) + 1
    out["seen"] = dict(sorted(seen.items(), key=lambda kv: -kv[1]))  # what the prompt's cell held, most common first
    return out


def run_arm(pipe, word: str, target: tuple, *, per_prompt: int, steps: int, guidance: float, sampler: str,
            progress=None) -> dict:
    """Generate and judge every prompt of the template for ``word``; returns the summary and the rows."""
    rows = []
    cases = prompts(word)
    for i, (prompt, cell, background) in enumerate(cases):
        result = pipe.generate(prompt, seed=STUDY_SEED + 1000 * i, batch_size=per_prompt, steps=steps,
                               guidance=guidance, sampler=sampler)  # fmt: skip
        for image in result.images:
            rows.append((i, read(image, cell, background, target)))
        if progress is not None:
            progress(i + 1, len(cases))
    return {"word": word, "example": cases[0][0], "summary": summarise(rows)}


def comparisons(arms: dict) -> dict:
    """word against every other arm, for "object" and "strict"."""
    out = {}
    if "word" not in arms:
        return out
    w = arms["word"]["summary"]
    for other in ("description", "untrained", "plain"):
        if other not in arms:
            continue
        o = arms[other]["summary"]
        out[other] = {m: difference(w[m]["p"], w[m]["n"], o[m]["p"], o[m]["n"]) for m in ("object", "strict")}
    return out


def table(arms: dict) -> str:
    lines = ["| arm | prompt (first of 27) | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 2) + "|"]
    for name in ARMS:
        if name not in arms:
            continue
        s = arms[name]["summary"]
        cells = " | ".join(f"{s[m]['p']:.3f} ± {s[m]['se']:.3f} ({s[m]['se_prompt']:.3f})" for m in METRICS)
        lines.append(f"| {name} | `{arms[name]['example']}` | {cells} |")
    lines += ["", "What the prompt's cell held (most common first):", ""]
    for name in ARMS:
        if name in arms and arms[name]["summary"].get("seen"):
            seen = arms[name]["summary"]["seen"]
            lines.append(f"- {name}: " + ", ".join(f"{k} {v}" for k, v in list(seen.items())[:5]))
    return "\n".join(lines)


def comparison_table(diffs: dict) -> str:
    lines = ["| word minus | metric | difference | SE | z | |", "|---|---|---|---|---|---|"]
    for other, per in diffs.items():
        for m, d in per.items():
            verdict = "outside the noise" if d["outside_noise"] else "inside the noise"
            lines.append(f"| {other} | {m} | {d['difference']:+.3f} | {d['se']:.3f} | {d['z']:.1f} | {verdict} |")
    return "\n".join(lines)
