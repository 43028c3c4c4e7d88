"""When does the tiny model decide each attribute? Prompt editing, ``AND`` and alternation on the synthetic world.

Three studies, each judged by the validated judge (``judge.py``):

swap         ``[A:B:k]`` on one attribute of a one-object prompt (colour, shape, position or size), at switch
             fractions k = 0.1..0.9: the share of images read as A, as B, or neither. One fixed template,
             ``a {size} {color} {shape} at the {position} on a {background} background``, so that the edited span
             is exactly the attribute's words (``at the [top left:bottom:0.5]`` for position).
and          two-object binding: one caption naming both objects against ``obj1 on bg AND obj2 on bg`` (composable
             diffusion), scored with ``eval.score`` (strict success, object recall, colour binding).
alternation  ``[A|B]`` on the colour (``[red|blue]``) or the shape: the share read as A, as B, or other.

Each cell has ``per_cell`` images: ``per_cell / per_prompt`` prompts, each generated as one batch of
``per_prompt`` consecutive seeds (batching is what makes 3,600+ images fit in minutes on a CPU). The prompts of an
attribute are the same base scenes and (A, B) pairs at every k, with the same seeds, so the k curve is paired.
Standard errors are binomial, ``sqrt(p (1 - p) / n)`` over images; ``se_prompt`` (the spread of per-prompt shares
over the prompts, divided by the square root of their number) is kept beside it, because images of one prompt
are not independent draws.
"""

from dataclasses import dataclass

import numpy as np

from .eval import EVAL_SEED, PromptCase, score
from .judge import judge, verdict
from .world import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, ObjectSpec

STUDY_SEED = EVAL_SEED + 16  # issue 16; a stream of its own, apart from the held-out prompt set
ATTRIBUTES = ("color", "shape", "position", "size")
FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# coarse to fine: a run stopped early still covers the whole range of k for every attribute
RUN_ORDER = (0.1, 0.5, 0.9, 0.3, 0.7, 0.2, 0.4, 0.6, 0.8)
ALTERNATIONS = (("color", "red", "blue"), ("shape", "circle", "square"))
OUTCOMES = ("a", "b", "neither")
TEMPLATE = "a {size} {color} {shape} at the {position} on a {background} background"


def binomial_se(p: float, n: int) -> float:
    """Standard error of a proportion ``p`` over ``n`` independent trials (nan for n = 0)."""
    return float(np.sqrt(p * (1 - p) / n)) if n > 0 else float("nan")


def difference(p1: float, n1: int, p2: float, n2: int) -> dict:
    """``p1 - p2`` with the standard error of a difference of two independent proportions and its z score."""
    se = float(np.sqrt(binomial_se(p1, n1) ** 2 + binomial_se(p2, n2) ** 2))
    d = p1 - p2
    z = d / se if se > 0 else (0.0 if d == 0 else float("inf"))
    return {"difference": d, "se": se, "z": z, "outside_noise": bool(abs(z) > 2)}


def shares(labels: list, groups: list | None = None, outcomes=OUTCOMES) -> dict:
    """{outcome: {"p", "se", "se_prompt"}} plus "n" for a list of outcome labels; ``groups`` (the prompt of each
    label) gives ``se_prompt``, the standard error from the spread between prompts."""
    n = len(labels)
    out: dict = {"n": n}
    for o in outcomes:
        hits = np.array([label == o for label in labels], dtype=float)
        p = float(hits.mean()) if n else float("nan")
        row = {"p": p, "se": binomial_se(p, n)}
        if groups is not None and n:
            per = [hits[[g == key for g in groups]].mean() for key in dict.fromkeys(groups)]
            row["se_prompt"] = float(np.std(per, ddof=1) / np.sqrt(len(per))) if len(per) > 1 else float("nan")
        out[o] = row
    return out


def _edit(a: str, b: str, k: float) -> str:
    return f"[{a}:{b}:{k:g}]"


def swap_text(obj: ObjectSpec, background: str, attribute: str, a: str, b: str, k: float) -> str:
    """The study template with ``attribute`` written as ``[a:b:k]`` (``obj``'s own value of it is not used)."""
    words = {"size": obj.size, "color": obj.color, "shape": obj.shape, "position": obj.position}
    words[attribute] = _edit(a, b, k)
    return TEMPLATE.format(background=background, **words)


@dataclass(frozen=True)
class SwapBase:
    """One prompt of the swap study before k is chosen: the scene with value A, and value B."""

    attribute: str
    obj: ObjectSpec  # carries A
    background: str
    a: str
    b: str
    seed: int


def swap_bases(attribute: str, prompts: int, per_prompt: int, seed: int = STUDY_SEED) -> list[SwapBase]:
    """``prompts`` random one-object scenes (every attribute named) with a random (A, B) pair of ``attribute``;
    seeds ``seed + per_prompt * i`` onwards, distinct for every prompt of every attribute."""
    index = ATTRIBUTES.index(attribute)
    rng = np.random.default_rng([seed, index])
    values = {"color": list(COLORS), "shape": list(SHAPES), "position": list(POSITIONS), "size": list(SIZES)}
    bases = []
    for i in range(prompts):
        a, b = (values[attribute][j] for j in rng.choice(len(values[attribute]), size=2, replace=False))
        obj = ObjectSpec(color=list(COLORS)[rng.integers(len(COLORS))], shape=SHAPES[rng.integers(len(SHAPES))],
                         cell=int(rng.integers(9)), size=list(SIZES)[rng.integers(len(SIZES))])  # fmt: skip
        obj = _with(obj, attribute, a)
        background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        bases.append(SwapBase(attribute, obj, background, a, b, seed + 1_000_000 * (index + 1) + per_prompt * i))
    return bases


def _with(obj: ObjectSpec, attribute: str, value: str) -> ObjectSpec:
    if attribute == "position":
        return ObjectSpec(obj.color, obj.shape, POSITIONS.index(value), obj.size)
    return ObjectSpec(**{**obj.__dict__, attribute: value})


def read_attribute(base: SwapBase, judgement) -> str:
    """"a", "b" or "neither": what the judge reads for the swapped attribute. Colour, shape and size are read
    from the object in the prompt's cell (none there: neither). Position: A when cell A holds an object and cell B
    none, B the other way round, neither when both or none do."""
    if base.attribute == "position":
        at_a = judgement.at(POSITIONS.index(base.a)) is not None
        at_b = judgement.at(POSITIONS.index(base.b)) is not None
        return "a" if at_a and not at_b else "b" if at_b and not at_a else "neither"
    found = judgement.at(base.obj.cell)
    value = None if found is None else getattr(found, base.attribute)
    return "a" if value == base.a else "b" if value == base.b else "neither"


def _images(pipe, prompt: str, seed: int, count: int, gen: dict) -> list:
    """``count`` images of consecutive seeds, in one batch where the pipeline batches (stand-ins do not)."""
    result = pipe.generate(prompt, seed=seed, batch_size=count, **gen)
    images = list(result.images)
    if len(images) == count:
        return images
    return [pipe.generate(prompt, seed=seed + i, **gen).image for i in range(count)]


def _steps_on_a(prompt: str, steps: int) -> int:
    """How many of ``steps`` steps show the prompt's first text (A), from the schedule the pipeline uses."""
    from ..text.schedule import prompt_schedule

    return prompt_schedule(prompt, steps)[0][0] if "[" in prompt else steps


def swap_study(pipe, *, per_cell=100, per_prompt=10, attributes=ATTRIBUTES, fractions=FRACTIONS, progress=None,
               on_cell=None, **gen) -> dict:  # fmt: skip
    """{attribute: {k: cell}}, cell = shares(...) plus the A-step count and an example prompt. Runs the fractions
    in ``RUN_ORDER`` (coarse first); ``on_cell(table)`` after each cell lets a caller save partial results."""
    per_prompt = max(1, min(per_prompt, per_cell))
    prompts = -(-per_cell // per_prompt)
    steps = gen.get("steps", 20)
    table: dict = {a: {} for a in attributes}
    order = [k for k in RUN_ORDER if k in fractions] + [k for k in fractions if k not in RUN_ORDER]
    bases = {a: swap_bases(a, prompts, per_prompt) for a in attributes}
    for k in order:
        for attribute in attributes:
            labels, groups = [], []
            for i, base in enumerate(bases[attribute]):
                prompt = swap_text(base.obj, base.background, attribute, base.a, base.b, k)
                for image in _images(pipe, prompt, base.seed, per_prompt, gen):
                    labels.append(read_attribute(base, judge(image)))
                    groups.append(i)
            example = swap_text(bases[attribute][0].obj, bases[attribute][0].background, attribute,
                                bases[attribute][0].a, bases[attribute][0].b, k)  # fmt: skip
            cell = shares(labels, groups)
            cell.update(prompts=prompts, steps_on_a=_steps_on_a(example, steps), example=example)
            table[attribute][k] = cell
            if progress is not None:
                progress(attribute, k, cell)
            if on_cell is not None:
                on_cell(table)
    return {a: dict(sorted(cells.items())) for a, cells in table.items()}


# ---------------------------------------------------------------------------------------------------------------
# AND against one prompt


def _phrase(obj: ObjectSpec) -> str:
    return " ".join(["a"] + ([obj.size] if obj.size else []) + [obj.color, obj.shape, "at the", obj.position])


def and_cases(prompts: int, per_prompt: int, seed: int = STUDY_SEED) -> list[tuple[PromptCase, PromptCase]]:
    """(one caption, AND prompt) pairs of the same two-object scene and seed. Colours differ between the two
    objects (otherwise binding cannot fail); sizes named half the time; the background always named."""
    from .world import sample_spec

    rng = np.random.default_rng([seed, 100])
    pairs = []
    while len(pairs) < prompts:
        spec = sample_spec(rng, 2, p_size=0.5, p_background=1.0)
        if spec.objects[0].color == spec.objects[1].color:
            continue
        first, second = (spec.objects[j] for j in rng.permutation(2))
        bg = f"on a {spec.background} background"
        one = f"{_phrase(first)} and {_phrase(second)} {bg}"
        both = f"{_phrase(first)} {bg} AND {_phrase(second)} {bg}"
        case_seed = seed + 10_000_000 + per_prompt * len(pairs)
        pairs.append((PromptCase(one, spec, case_seed), PromptCase(both, spec, case_seed)))
    return pairs


def _scored(outcomes) -> dict:
    report = score(outcomes)
    n = report.n.get(2, 0)
    rows = {"success": (report.success.get(2, 0.0), n)}
    for name in ("recall", "binding", "color", "position"):
        rows[name] = report.accuracy[name]
    return {name: {"p": float(p), "n": int(count), "se": binomial_se(float(p), int(count))}
            for name, (p, count) in rows.items()}  # fmt: skip


def and_study(pipe, *, per_cell=100, per_prompt=10, progress=None, **gen) -> dict:
    """{"one prompt": metrics, "AND": metrics, "difference": {metric: difference(...)}, "examples": [...]};
    metrics = {name: {"p", "n", "se"}} for success, recall, binding, colour and position."""
    per_prompt = max(1, min(per_prompt, per_cell))
    prompts = -(-per_cell // per_prompt)
    outcomes: dict = {"one prompt": [], "AND": []}
    pairs = and_cases(prompts, per_prompt)
    for i, pair in enumerate(pairs):
        for name, case in zip(outcomes, pair):
            for j, image in enumerate(_images(pipe, case.prompt, case.seed, per_prompt, gen)):
                seen = judge(image)
                outcomes[name].append((PromptCase(case.prompt, case.spec, case.seed + j), seen,
                                       verdict(case.spec, seen)))  # fmt: skip
        if progress is not None:
            progress(i + 1, len(pairs))
    result: dict = {name: _scored(rows) for name, rows in outcomes.items()}
    one, both = result["one prompt"], result["AND"]
    result["difference"] = {m: difference(both[m]["p"], both[m]["n"], one[m]["p"], one[m]["n"]) for m in one}
    result["examples"] = [pairs[0][0].prompt, pairs[0][1].prompt]
    return result


# ---------------------------------------------------------------------------------------------------------------
# Alternation


def alternation_study(pipe, *, per_cell=100, per_prompt=10, alternations=ALTERNATIONS, progress=None,
                      **gen) -> dict:  # fmt: skip
    """{"color red|blue": shares(...) with "a" = A, "b" = B, "neither" = anything else, plus "seen": counts of
    every value read}. One-object scenes with the other attributes random (for a shape alternation the colour is
    random; for a colour one the shape); the object's cell decides what is read."""
    per_prompt = max(1, min(per_prompt, per_cell))
    prompts = -(-per_cell // per_prompt)
    out = {}
    for index, (attribute, a, b) in enumerate(alternations):
        rng = np.random.default_rng([STUDY_SEED, 200 + index])
        labels, groups, seen = [], [], {}
        for i in range(prompts):
            obj = ObjectSpec(color=list(COLORS)[rng.integers(len(COLORS))], shape=SHAPES[rng.integers(len(SHAPES))],
                             cell=int(rng.integers(9)), size=list(SIZES)[rng.integers(len(SIZES))])  # fmt: skip
            background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
            words = {"size": obj.size, "color": obj.color, "shape": obj.shape, "position": obj.position}
            words[attribute] = f"[{a}|{b}]"
            prompt = TEMPLATE.format(background=background, **words)
            seed = STUDY_SEED + 20_000_000 + 1_000_000 * index + per_prompt * i
            base = SwapBase(attribute, obj, background, a, b, seed)
            for image in _images(pipe, prompt, seed, per_prompt, gen):
                judgement = judge(image)
                found = judgement.at(obj.cell)
                value = "nothing" if found is None else getattr(found, attribute)
                seen[value] = seen.get(value, 0) + 1
                labels.append(read_attribute(base, judgement))
                groups.append(i)
            if progress is not None:
                progress(f"{attribute} {a}|{b}", i + 1, prompts)
        cell = shares(labels, groups)
        cell.update(prompts=prompts, seen=dict(sorted(seen.items(), key=lambda kv: -kv[1])), example=prompt)
        out[f"{attribute} {a}|{b}"] = cell
    return out


# ---------------------------------------------------------------------------------------------------------------
# Report


def _pm(row: dict) -> str:
    """``p ± binomial SE``, then the between-prompt SE in brackets where it is known."""
    text = f"{row['p']:.2f} ± {row['se']:.2f}"
    spread = row.get("se_prompt")
    return text if spread is None or spread != spread else f"{text} ({spread:.2f})"


def swap_table(table: dict) -> str:
    """Markdown: one row per (attribute, k): steps on A, share A, share B, neither (each ± binomial SE), n."""
    lines = ["| attribute | k | steps on A | read as A | read as B | neither | n |", "|---|---|---|---|---|---|---|"]
    for attribute, cells in table.items():
        for k, cell in cells.items():
            lines.append(f"| {attribute} | {k:g} | {cell['steps_on_a']} | {_pm(cell['a'])} | {_pm(cell['b'])} | "
                         f"{_pm(cell['neither'])} | {cell['n']} |")
    return "\n".join(lines)


def and_table(result: dict) -> str:
    one, both, diff = result["one prompt"], result["AND"], result["difference"]
    lines = ["| metric | one prompt | AND | AND - one | z | outside noise (abs z > 2) | n |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for m in one:
        d = diff[m]
        lines.append(f"| {m} | {_pm(one[m])} | {_pm(both[m])} | {d['difference']:+.2f} ± {d['se']:.2f} | "
                     f"{d['z']:+.1f} | {'yes' if d['outside_noise'] else 'no'} | {one[m]['n']} / {both[m]['n']} |")
    return "\n".join(lines)


def alternation_table(result: dict) -> str:
    lines = ["| alternation | read as A | read as B | other | what the judge read | n |", "|---|---|---|---|---|---|"]
    for name, cell in result.items():
        seen = ", ".join(f"{v} {c}" for v, c in cell["seen"].items())
        attribute, pair = name.split(" ", 1)
        shown = "`[" + pair.replace("|", "\\|") + "]`"  # a bare | would end the table cell
        lines.append(f"| {shown} ({attribute}) | {_pm(cell['a'])} | {_pm(cell['b'])} | {_pm(cell['neither'])} | "
                     f"{seen} | {cell['n']} |")
    return "\n".join(lines)


def plot_swap_png(table: dict, path, *, title="share read as B vs k in [A:B:k], bars: 1 SE between prompts") -> None:
    """Share read as B per attribute against k, with error bars of one standard error between prompts (the
    binomial one where there is a single prompt); PIL only (as ``eval.plot_png``)."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 560, 340, 50, 110, 30, 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)

    def at(x, y):
        return left + (width - left - right) * x, height - bottom - (height - top - bottom) * y

    draw.text((left, 8), title, fill="black")
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        _, y = at(0, tick)
        draw.line([(left, y), (width - right, y)], fill=(225, 225, 225))
        draw.text((8, y - 6), f"{tick:.2f}", fill="black")
        px, _ = at(tick, 0)
        draw.text((px - 8, height - bottom + 6), f"{tick:g}", fill="black")
    draw.text((width - right - 200, height - 14), "k (fraction of steps on A)", fill="black")
    draw.line([at(0, 0), at(1, 0)], fill="black")
    draw.line([at(0, 0), at(0, 1)], fill="black")
    palette = [(220, 30, 30), (30, 60, 220), (30, 150, 30), (250, 140, 20), (140, 40, 200)]
    for i, (name, cells) in enumerate(table.items()):
        color = palette[i % len(palette)]
        nudge = 3 * (i - (len(table) - 1) / 2)  # series nudged sideways so that error bars do not overlap
        points = []
        for k in sorted(cells):
            row = cells[k]["b"]
            p, se = row["p"], row.get("se_prompt", row["se"])
            se = row["se"] if se != se else se  # one prompt: no spread between prompts
            px, py = at(k, p)
            px += nudge
            _, y_lo = at(k, max(0.0, p - se))
            _, y_hi = at(k, min(1.0, p + se))
            draw.line([(px, y_lo), (px, y_hi)], fill=color)
            points.append((px, py))
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for px, py in points:
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=color)
        draw.text((width - right + 10, top + 16 * i), name, fill=color)
    image.save(path)
