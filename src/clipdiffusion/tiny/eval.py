"""GenEval-style prompt adherence on the synthetic world, for any pipeline.

A "pipeline" here is anything with ``generate(prompt, *, seed, steps, guidance, sampler, clip_skip, long_prompt)``
returning an object with ``.image`` (``clipdiffusion.Pipeline`` does). Two stand-ins live below: one that draws
the ground truth of the prompt (must score ~1.0: checks the prompt set, parser and judge together) and one that
draws noise (must score ~0). Images are read by the validated judge (``judge.py``).

Metrics (over the fixed held-out prompt set, per specified object unless noted):
  success_k  strict per-prompt success for k objects: every object right (cell occupied, colour, shape, size when
             given), no extra object, background right when given;
  color / shape / position / size  the object in the specified cell has the right attribute (position: the cell
             holds an object at all); shape is also split by whether the prompt names the object's size;
  binding    prompts with 2-3 objects: of the specified objects whose colour appears somewhere in the image, the
             share drawn with that colour in the right cell (colour swapped between objects counts as a miss);
  background prompts that name one; extra  mean number of objects in cells the prompt does not name.
"""

from dataclasses import dataclass, field

import numpy as np

from .captions import caption, long_caption, parse_caption, tag_prefix  # noqa: F401 (tag_prefix: re-export)
from .judge import judge, verdict
from .world import SceneSpec, render_spec, sample_spec

EVAL_SEED = 20_240_601  # the held-out prompt set; training never samples these specs (see held_out_keys)
DEFAULT_PER_COUNT = 50


@dataclass(frozen=True)
class PromptCase:
    prompt: str
    spec: SceneSpec
    seed: int


def prompt_set(per_count: int = DEFAULT_PER_COUNT, seed: int = EVAL_SEED) -> list[PromptCase]:
    """The fixed held-out set: ``per_count`` prompts each with 1, 2 and 3 objects, sizes and backgrounds named
    about half the time, no style tags (the long-prompt study adds them)."""
    cases = []
    for k in (1, 2, 3):
        rng = np.random.default_rng([seed, k])  # one stream per count: smaller sets are prefixes of larger
        for i in range(per_count):
            spec = sample_spec(rng, k, p_size=0.5, p_background=0.6)
            cases.append(PromptCase(caption(spec, rng, p_tags=0.0), spec, seed + 1000 * k + i))
    return cases


def held_out_keys(per_count: int = 200, seed: int = EVAL_SEED) -> frozenset:
    """Spec keys training must skip: a superset of every prompt set up to ``per_count`` per object count."""
    return frozenset(case.spec.key() for case in prompt_set(per_count, seed))


@dataclass
class EvalReport:
    n: dict = field(default_factory=dict)  # objects -> prompts
    success: dict = field(default_factory=dict)  # objects -> strict success rate
    accuracy: dict = field(default_factory=dict)  # color, shape, position, size, binding, background, recall
    extra: float = 0.0
    failures: list = field(default_factory=list)  # (prompt, what the judge saw), first few
    cases: list = field(default_factory=list)  # [objects, success 0/1, objects recalled] per prompt, in order

    def table(self) -> str:
        lines = ["| metric | value | n |", "|---|---|---|"]
        for k in sorted(self.success):
            lines.append(f"| success, {k} object{'s' if k > 1 else ''} | {self.success[k]:.3f} | {self.n[k]} |")
        for name, (value, count) in self.accuracy.items():
            lines.append(f"| {name} accuracy | {value:.3f} | {count} |")
        lines.append(f"| extra objects per prompt | {self.extra:.3f} | {sum(self.n.values())} |")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"n": self.n, "success": self.success, "extra": self.extra,
                "accuracy": {k: v[0] for k, v in self.accuracy.items()}, "cases": self.cases}  # fmt: skip


def evaluate(pipe, cases: list[PromptCase], *, steps=20, guidance=7.0, sampler="euler", clip_skip=1,
             long_prompt="chunk", progress=None, images=None) -> EvalReport:  # fmt: skip
    """Generate one image per case and score it. ``progress(i, n)`` is called after each image; the images are
    appended to ``images`` when a list is given."""
    return score(judged_cases(pipe, cases, steps=steps, guidance=guidance, sampler=sampler, clip_skip=clip_skip,
                              long_prompt=long_prompt, progress=progress, images=images))


def judged_cases(pipe, cases: list[PromptCase], *, steps=20, guidance=7.0, sampler="euler", clip_skip=1,
                 long_prompt="chunk", progress=None, images=None) -> list:  # fmt: skip
    """``[(case, judgement, verdict)]``, one image per case (``evaluate`` without the aggregation)."""
    outcomes = []
    for i, case in enumerate(cases):
        result = pipe.generate(case.prompt, seed=case.seed, steps=steps, guidance=guidance, sampler=sampler,
                               clip_skip=clip_skip, long_prompt=long_prompt)  # fmt: skip
        seen = judge(result.image)
        if images is not None:
            images.append(result.image)
        outcomes.append((case, seen, verdict(case.spec, seen)))
        if progress is not None:
            progress(i + 1, len(cases))
    return outcomes


def score(outcomes) -> EvalReport:
    """Aggregate (case, judgement, verdict) triples into the report's metrics."""
    report = EvalReport()
    names = ("color", "shape", "position", "size", "binding", "background", "recall", "shape (size named)",
             "shape (size open)")  # fmt: skip
    tallies = {name: [0, 0] for name in names}

    def tally(name, hits, total):
        tallies[name][0] += hits
        tallies[name][1] += total

    extra = 0
    for case, seen, v in outcomes:
        k = len(case.spec.objects)
        report.n[k] = report.n.get(k, 0) + 1
        report.success[k] = report.success.get(k, 0) + v.success
        tally("color", sum(v.color_ok), k)
        tally("shape", sum(v.shape_ok), k)
        tally("position", sum(v.occupied), k)
        tally("recall", sum(v.objects_ok), k)
        for o, ok in zip(case.spec.objects, v.shape_ok):  # an open size is harder: the model must pick one
            tally("shape (size named)" if o.size is not None else "shape (size open)", int(ok), 1)
        sized = [ok for o, ok in zip(case.spec.objects, v.size_ok) if o.size is not None]
        tally("size", sum(sized), len(sized))
        if case.spec.background is not None:
            tally("background", int(v.background_ok), 1)
        if k > 1:
            present = {o.color for o in seen.objects}
            bound = [ok for o, ok in zip(case.spec.objects, v.color_ok) if o.color in present]
            tally("binding", sum(bound), len(bound))
        extra += v.extra
        report.cases.append([k, int(v.success), int(sum(v.objects_ok))])
        if not v.success and len(report.failures) < 10:
            saw = ", ".join(f"{o.size} {o.color} {o.shape} at {o.position}" for o in seen.objects) or "nothing"
            report.failures.append((case.prompt, f"{seen.background} background; {saw}"))
    report.success = {k: report.success[k] / report.n[k] for k in sorted(report.n)}
    report.accuracy = {name: (h / t if t else float("nan"), t) for name, (h, t) in tallies.items()}
    report.extra = extra / max(1, len(outcomes))
    return report


# ---------------------------------------------------------------------------------------------------------------
# Stand-in pipelines (for tests and as the ceiling / floor of every table)


@dataclass(frozen=True)
class _Result:
    images: list

    @property
    def image(self):
        return self.images[0]


class GroundTruthPipeline:
    """Draws exactly what the prompt says (parsed with ``parse_caption``); open attributes come from the seed.

    With a ``tokenizer`` it sees only what a text encoder would: under ``long_prompt="truncate"`` the words past
    the first 75 tokens are gone (246 for ``stretch``), so its long-prompt table is each strategy's ceiling."""

    def __init__(self, canvas: int = 64, tokenizer=None):
        self.canvas = canvas
        self.tokenizer = tokenizer

    def generate(self, prompt, *, seed=0, long_prompt="chunk", **_ignored):
        # summarize keeps a choice of segments, not a prefix: drawn as chunk (its ceiling is the full prompt)
        limit = {"truncate": 75, "stretch": 246}.get(long_prompt)
        if self.tokenizer is not None and limit is not None:
            prompt = self.tokenizer.decode(self.tokenizer.encode(prompt)[:limit])
        words = prompt.split()
        while words:  # a cut-off last object (no position yet) is not drawn
            try:
                spec = parse_caption(" ".join(words))
                break
            except ValueError:
                words.pop()
        else:
            from PIL import Image

            return _Result([Image.new("RGB", (self.canvas, self.canvas), (128, 128, 128))])
        return _Result([render_spec(spec, seed=max(seed, 0), canvas=self.canvas)])


class NoisePipeline:
    """Uniform noise: the floor."""

    def __init__(self, canvas: int = 64):
        self.canvas = canvas

    def generate(self, prompt, *, seed=0, **_ignored):
        from PIL import Image

        rng = np.random.default_rng(max(seed, 0))
        return _Result([Image.fromarray(rng.integers(0, 256, (self.canvas, self.canvas, 3), dtype=np.uint8))])


# ---------------------------------------------------------------------------------------------------------------
# Studies


def long_prompt_cases(tokenizer, n_tokens: int, per_count: int = 10, seed: int = EVAL_SEED + 1):
    """Prompt-set specs with their objects placed after ``n_tokens`` tokens of style tags."""
    rng = np.random.default_rng(seed)
    cases = []
    for base in prompt_set(per_count):
        prefix = tag_prefix(tokenizer, n_tokens, rng)
        text = long_caption(base.spec, rng, prefix) if prefix else base.prompt
        cases.append(PromptCase(text, base.spec, base.seed))
    return cases


LONG_STRATEGIES = ("truncate", "chunk", "window", "stretch", "summarize")
LONG_LENGTHS = (0, 40, 60, 90, 120, 150, 225)


def long_cell(outcomes) -> dict:
    """Object recall and prompt success of one (strategy, length) cell with standard errors. Objects of one
    prompt share an image, so recall's error is the cluster (per-prompt) one: the ratio estimator's
    ``sqrt(n/(n-1) * sum((hits_i - R * objects_i)^2)) / sum(objects_i)``; success's is binomial over prompts."""
    hits = [sum(v.objects_ok) for _, _, v in outcomes]
    sizes = [len(case.spec.objects) for case, _, _ in outcomes]
    wins = [int(v.success) for _, _, v in outcomes]
    n, total = len(outcomes), sum(sizes)
    recall = sum(hits) / total if total else float("nan")
    spread = sum((h - recall * k) ** 2 for h, k in zip(hits, sizes))
    recall_se = (n / (n - 1) * spread) ** 0.5 / total if n > 1 else float("nan")
    success = sum(wins) / n if n else float("nan")
    success_se = (success * (1 - success) / n) ** 0.5 if n else float("nan")
    return {"recall": recall, "recall_se": recall_se, "success": success, "success_se": success_se,
            "prompts": n, "objects": total}


def long_prompt_study(pipe, tokenizer, *, lengths=LONG_LENGTHS, strategies=LONG_STRATEGIES, per_count=10,
                      progress=None, cells=None, **gen):
    """Object recall per (strategy, prefix length): ``{strategy: {length: recall}}``. The prompts of one length
    are the same for every strategy (3 * ``per_count`` of them: 1, 2 and 3 objects). ``cells``, a dict, receives
    ``{strategy: {length: long_cell(...) + seconds}}``. Where a strategy lays out every prompt of a length exactly
    as an earlier one did (the same windows and rows: prompts that fit one window), the contexts and hence the
    images are the same, so that cell is copied (``same_as`` names the strategy it was generated with)."""
    import time

    encoder = getattr(pipe, "text_encoder", None)
    table: dict = {s: {} for s in strategies}
    for length in lengths:
        cases = long_prompt_cases(tokenizer, length, per_count)
        done: dict = {}  # layout of every prompt -> (strategy, cell)
        for strategy in strategies:
            start = time.perf_counter()
            layout = None
            if encoder is not None:
                plans = [encoder.plan(case.prompt, long_prompt=strategy) for case in cases]
                layout = tuple(repr((p.windows, p.rows)) for p in plans)
            if layout in done:
                first, cell = done[layout]
                cell = {**cell, "seconds": time.perf_counter() - start, "same_as": first}
            else:
                outcomes = judged_cases(pipe, cases, long_prompt=strategy, **gen)
                cell = long_cell(outcomes)
                cell["seconds"] = time.perf_counter() - start
                if layout is not None:
                    done[layout] = (strategy, cell)
            table[strategy][length] = cell["recall"]
            if cells is not None:
                cells.setdefault(strategy, {})[length] = cell
            if progress is not None:
                progress(strategy, length, table[strategy][length])
    return table


def clip_skip_study(pipe, cases, *, skips=(1, 2, 3, 4), repeats=3, heads=None, **gen) -> dict:
    """Adherence, tiny-CLIP score (with ``heads``) and text-encoder time per clip skip. Time is the median over
    ``repeats`` passes of encoding every prompt (skipped layers are never computed, so higher skips should be
    cheaper). The score always uses the full text tower: it rates the image, not the conditioning."""
    import time

    rows = {}
    encoder = getattr(pipe, "text_encoder", None)
    top = encoder.max_clip_skip if encoder is not None else max(skips)
    for skip in [k for k in skips if k <= top]:
        images = []
        report = evaluate(pipe, cases, clip_skip=skip, images=images, **gen)
        seconds = float("nan")
        if encoder is not None:
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                for case in cases:
                    encoder.encode(case.prompt, clip_skip=skip)
                times.append(time.perf_counter() - start)
            seconds = float(np.median(times))
        rows[skip] = {"recall": report.accuracy["recall"][0], "success": report.success, "encode_s": seconds}
        if heads is not None:
            rows[skip]["clip_score"] = float(np.mean(clip_scores(heads, encoder, images, [c.prompt for c in cases])))
    return rows


def load_heads(path):
    """The contrastive heads written by training (``tiny-clip-heads.safetensors``)."""
    from ..checkpoints.safetensors_io import load_file, read_shapes
    from .models import PRESETS, ContrastiveHeads

    _, _, metadata = read_shapes(path)
    heads = ContrastiveHeads(PRESETS[metadata.get("clipdiffusion.tiny.model", "tiny-sd")])
    heads.load_state_dict(load_file(path))
    return heads.eval()


def clip_scores(heads, text_encoder, images, prompts) -> list:
    """Tiny-CLIP score (cosine x 100, as CLIPScore) of each image against its prompt; images are resized to the
    image tower's canvas."""
    import torch
    import torch.nn.functional as F

    from .models import to_pixels

    canvas = heads.image.config.canvas
    pixels = to_pixels([im.convert("RGB").resize((canvas, canvas)) for im in images])
    spec = text_encoder.encoders[0]
    ids = [text_encoder.plan(p, long_prompt="truncate").windows[0].ids(spec.pad_id) for p in prompts]
    with torch.no_grad():
        pooled = spec.model(torch.tensor(ids), pooled=True).pooled  # [B, D]
        text = F.normalize(heads.text_projection(pooled), dim=-1)  # [B, P]
        image = F.normalize(heads.image(pixels), dim=-1)  # [B, P]
    return (100 * (text * image).sum(-1)).tolist()


def clip_score_study(pipe, heads, cases, **gen) -> dict:
    """Mean tiny-CLIP score of generated images, of ground-truth renders of the same prompts (the ceiling),
    and of renders of a shuffled prompt (the floor)."""
    generated = [pipe.generate(c.prompt, seed=c.seed, **gen).image for c in cases]
    truth = [render_spec(c.spec, c.seed) for c in cases]
    prompts = [c.prompt for c in cases]
    shuffled = prompts[1:] + prompts[:1]
    encoder = pipe.text_encoder
    mean = lambda values: float(np.mean(values))  # noqa: E731
    return {"generated": mean(clip_scores(heads, encoder, generated, prompts)),
            "ground_truth": mean(clip_scores(heads, encoder, truth, prompts)),
            "mismatched": mean(clip_scores(heads, encoder, truth, shuffled))}  # fmt: skip


def plot_png(table: dict, path, *, title="object recall vs tokens of style tags before the objects") -> None:
    """A small line plot of {series: {x: y in 0..1}} drawn with PIL (no matplotlib)."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 560, 340, 50, 120, 30, 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    xs = sorted({x for series in table.values() for x in series})
    x_max = max(xs) if xs and max(xs) > 0 else 1

    def at(x, y):
        return left + (width - left - right) * x / x_max, height - bottom - (height - top - bottom) * y

    draw.text((left, 8), title, fill="black")
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        _, y = at(0, tick)
        draw.line([(left, y), (width - right, y)], fill=(225, 225, 225))
        draw.text((8, y - 6), f"{tick:.2f}", fill="black")
    for x in xs:
        px, _ = at(x, 0)
        draw.text((px - 8, height - bottom + 6), str(x), fill="black")
    draw.text((width - right - 150, height - 14), "tokens before the objects", fill="black")
    draw.line([at(0, 0), at(x_max, 0)], fill="black")
    draw.line([at(0, 0), at(0, 1)], fill="black")
    palette = [(220, 30, 30), (30, 60, 220), (30, 150, 30), (250, 140, 20), (140, 40, 200)]
    for i, (name, series) in enumerate(table.items()):
        color = palette[i % len(palette)]
        # series nudged 2 px apart so that equal ones (chunk = window = 1.0) stay visible
        points = [(px, py - 2 * i) for px, py in (at(x, series[x]) for x in sorted(series))]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for px, py in points:
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=color)
        draw.text((width - right + 10, top + 16 * i), name, fill=color)
    image.save(path)
