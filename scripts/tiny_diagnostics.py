"""Diagnostics of trained tiny models, for comparing training runs (figures in eval/training.md).

``roundtrip``: the share of fresh scenes (1, 2 and 3 objects) whose VAE encode/decode the judge reads entirely
right: the ceiling of the model's adherence.

``latent``: how far apart the VAE puts scenes that differ in one attribute. For single-object scenes, the L2
distance between the (scaled, unit-std) latents of the same scene drawn in each pair of colours, and of shapes;
mean and 10th percentile. Small distances make the UNet's job harder: its loss barely notices the difference.

``twins``: the tiny CLIP's image-text test with hard negatives: for fresh renders, does the true caption score above
the same caption with one shape, colour or cell changed? (Not the training twins: each attribute separately.)

    python scripts/tiny_diagnostics.py roundtrip RUN/tiny-sd.safetensors [...]
    python scripts/tiny_diagnostics.py latent RUN/tiny-sd.safetensors [...]
    python scripts/tiny_diagnostics.py twins RUN/tiny-sd.safetensors RUN/tiny-clip-heads.safetensors
    python scripts/tiny_diagnostics.py context RUN/tiny-sd.safetensors [...]
    python scripts/tiny_diagnostics.py readout [--clip-skip N] RUN/tiny-sd.safetensors [...]
    python scripts/tiny_diagnostics.py longpos RUN/tiny-sd.safetensors [PER_COUNT]

``context``: how far apart the frozen text encoder puts captions that differ in one word, as the UNet sees them.
For one-object captions (the same template), each pair of colours and of shapes: the largest per-position L2
distance between the two cross-attention contexts, over the mean row norm; mean and 10th percentile.

``readout``: how easily cross-attention reads the scene back out of the frozen text encoder's context, which is the
UNet's task in miniature. Nine learned queries (one per cell) attend over the context of a caption (1-3 objects,
no style tags) through one small head, and linear layers name the colour and shape in each cell (or "empty").
Trained for a fixed, short budget on captions of fresh scenes, it reports accuracy on other captions: per occupied
cell colour, shape and both (bound), and a caption entirely right. The same seed and budget for every checkpoint.

``longpos``: why long-prompt recall varies with the length of the tag run. The long-prompt study's prompts (more of
them), generated with the chunk strategy; each object's recall is tallied by where its first word ("a") lands: which
75-token chunk, and at what position inside it. Objects whose colour and shape repeat in a prompt are left out.
"""

import dataclasses
import itertools
import sys

import numpy as np
import torch
import torch.nn.functional as F

from clipdiffusion.pipeline import Pipeline
from clipdiffusion.tiny.captions import caption
from clipdiffusion.tiny.eval import clip_scores, load_heads
from clipdiffusion.tiny.models import to_pixels
from clipdiffusion.tiny.world import COLORS, SHAPES, realize, render, sample_spec


def roundtrip(paths, n=150, seed=5):
    from clipdiffusion.tiny.judge import judge, verdict

    for path in paths:
        vae = Pipeline.from_file(path).vae
        rng = np.random.default_rng(seed)
        right = {1: [], 2: [], 3: []}
        for _ in range(n):
            scene = realize(sample_spec(rng, p_size=1.0, p_background=1.0), rng)
            with torch.no_grad():
                decoded = vae.decode(vae.encode(to_pixels([render(scene, 64)])).mean)
            image = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte()[0].permute(1, 2, 0).numpy()
            right[len(scene.objects)].append(verdict(scene.spec(), judge(image)).success)
        cells = ", ".join(f"{k} object(s) {np.mean(v):.3f} of {len(v)}" for k, v in right.items())
        print(f"{path}: VAE round trip judged right, {cells}")


def latent(paths, n=40, seed=0):
    for path in paths:
        vae = Pipeline.from_file(path).vae
        scale = vae.config.scale_factor
        rng = np.random.default_rng(seed)
        dist = {"colour": [], "shape": []}
        for _ in range(n):
            scene = realize(sample_spec(rng, 1, p_size=1.0, p_background=1.0), rng)
            obj = scene.objects[0]

            def z(**change):
                variant = dataclasses.replace(scene, objects=(dataclasses.replace(obj, **change),))
                with torch.no_grad():
                    return vae.encode(to_pixels([render(variant, 64)])).mean[0] * scale

            for name, attr, values in (("colour", "color", COLORS), ("shape", "shape", SHAPES)):
                zs = {v: z(**{attr: v}) for v in values}
                dist[name] += [(zs[a] - zs[b]).norm().item() for a, b in itertools.combinations(values, 2)]
        cells = ", ".join(f"{k} {np.mean(v):.2f} (p10 {np.percentile(v, 10):.2f})" for k, v in dist.items())
        print(f"{path}: scale factor {scale:.3f}; latent distance {cells}")


def context(paths, n=40, seed=0):
    for path in paths:
        encoder = Pipeline.from_file(path).text_encoder
        rng = np.random.default_rng(seed)
        dist = {"colour": [], "shape": []}
        for _ in range(n):
            spec = sample_spec(rng, 1, p_size=0.5, p_background=0.5)
            template_seed = int(rng.integers(2**32))
            for name, attr, values in (("colour", "color", list(COLORS)), ("shape", "shape", list(SHAPES))):
                rows = []
                for v in values:
                    variant = dataclasses.replace(spec, objects=(dataclasses.replace(spec.objects[0], **{attr: v}),))
                    text = caption(variant, np.random.default_rng(template_seed), p_tags=0.0)
                    rows.append(encoder.encode(text).context[0])  # [77, D]
                norm = torch.stack(rows).norm(dim=-1).mean()
                dist[name] += [((a - b).norm(dim=-1).max() / norm).item() for a, b in itertools.combinations(rows, 2)]
        cells = ", ".join(f"{k} {np.mean(v):.3f} (p10 {np.percentile(v, 10):.3f})" for k, v in dist.items())
        print(f"{path}: context distance / norm, {cells}")


def twins(path, heads_path, n=200, seed=7):
    pipe, heads = Pipeline.from_file(path), load_heads(heads_path)
    rng = np.random.default_rng(seed)
    right = {"shape": [], "color": [], "cell": []}
    for i in range(n):
        scene = realize(sample_spec(rng, p_size=1.0, p_background=1.0), rng)
        spec, image = scene.spec(), render(scene, 64)
        j = int(rng.integers(len(spec.objects)))
        obj = spec.objects[j]
        for attr, values in (("shape", SHAPES), ("color", list(COLORS)), ("cell", range(9))):
            others = [v for v in values if v != getattr(obj, attr)]
            if attr == "cell":
                others = [c for c in others if all(c != o.cell for o in spec.objects)]
            wrong = dataclasses.replace(obj, **{attr: others[int(rng.integers(len(others)))]})
            twin = dataclasses.replace(spec, objects=tuple(wrong if k == j else o for k, o in enumerate(spec.objects)))
            texts = [caption(s, np.random.default_rng(i), p_tags=0.0) for s in (spec, twin)]
            scores = clip_scores(heads, pipe.text_encoder, [image, image], texts)
            right[attr].append(scores[0] > scores[1])
    print(f"{path}: true caption above its twin, " + ", ".join(f"{k} {np.mean(v):.3f}" for k, v in right.items()))


def readout(paths, clip_skip=1, n_train=4000, n_test=1000, steps=(200, 500), seed=3):
    rng = np.random.default_rng(seed)
    specs = [sample_spec(rng, p_size=0.8, p_background=0.7) for _ in range(n_train + n_test)]
    texts = [caption(s, np.random.default_rng(int(rng.integers(2**32))), p_tags=0.0) for s in specs]
    colours, shapes = list(COLORS), list(SHAPES)
    colour_y = torch.zeros(len(specs), 9, dtype=torch.long)  # 0: empty cell
    shape_y = torch.zeros(len(specs), 9, dtype=torch.long)
    for i, spec in enumerate(specs):
        for o in spec.objects:
            colour_y[i, o.cell] = 1 + colours.index(o.color)
            shape_y[i, o.cell] = 1 + shapes.index(o.shape)
    for path in paths:
        encoder = Pipeline.from_file(path).text_encoder
        spec = encoder.encoders[0]
        with torch.no_grad():  # captions without tags fit one window: [N, 77] ids -> [N, 77, D], in batches
            ids = torch.tensor([encoder.plan(t).windows[0].ids(spec.pad_id) for t in texts])
            ctx = torch.cat([spec.model(ids[i : i + 500], clip_skip=clip_skip, final_norm=spec.final_norm).hidden
                             for i in range(0, len(ids), 500)])  # fmt: skip
        ctx = ctx / ctx.norm(dim=-1).mean()  # one scale for every run: the readout sees geometry, not norm
        torch.manual_seed(seed)
        width = 32
        queries = torch.nn.Parameter(torch.randn(9, width) / width**0.5)
        key, value = torch.nn.Linear(ctx.shape[-1], width), torch.nn.Linear(ctx.shape[-1], width)
        head = torch.nn.Linear(width, 1 + len(colours) + 1 + len(shapes))
        params = [queries, *key.parameters(), *value.parameters(), *head.parameters()]
        opt = torch.optim.Adam(params, lr=1e-2)

        def read(index):
            c = ctx[index]
            attn = torch.softmax(torch.einsum("qw,btw->bqt", queries, key(c)) / width**0.5, dim=-1)
            out = head(torch.einsum("bqt,btw->bqw", attn, value(c)))  # [b, 9, 7 + 4]
            return out[..., : 1 + len(colours)], out[..., 1 + len(colours) :]

        gen = torch.Generator().manual_seed(seed)
        cells = []
        for step in range(1, max(steps) + 1):
            index = torch.randint(n_train, (128,), generator=gen)
            c_logits, s_logits = read(index)
            loss = F.cross_entropy(c_logits.flatten(0, 1), colour_y[index].flatten()) + F.cross_entropy(
                s_logits.flatten(0, 1), shape_y[index].flatten())  # fmt: skip
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step in steps:
                with torch.no_grad():
                    test = torch.arange(n_train, n_train + n_test)
                    c_logits, s_logits = read(test)
                    c_ok = c_logits.argmax(-1) == colour_y[test]
                    s_ok = s_logits.argmax(-1) == shape_y[test]
                    occupied = colour_y[test] > 0
                    scene_ok = (c_ok & s_ok).all(dim=1).float().mean().item()
                    cells.append(f"{step} steps: colour {c_ok[occupied].float().mean():.3f} shape "
                                 f"{s_ok[occupied].float().mean():.3f} bound {(c_ok & s_ok)[occupied].float().mean():.3f}"
                                 f" caption {scene_ok:.3f}")  # fmt: skip
        print(f"{path}: readout at clip skip {clip_skip}, " + "; ".join(cells), flush=True)


def longpos(path, per_count=20, lengths=(0, 20, 40, 60, 90, 120, 150)):
    import re

    from clipdiffusion.tiny.eval import long_prompt_cases
    from clipdiffusion.tiny.judge import judge, verdict

    if per_count < 1:
        sys.exit(f"longpos: PER_COUNT must be at least 1, got {per_count}")
    pipe = Pipeline.from_file(path)
    encoder = pipe.text_encoder
    tokenizer = encoder.tokenizer
    buckets = {}  # (chunk, position bucket) -> [hits, total]
    by_length = {}
    for length in lengths:
        for case in long_prompt_cases(tokenizer, length, per_count):
            plan = encoder.plan(case.prompt, long_prompt="chunk")
            starts = np.cumsum([0] + [len(w.tokens) for w in plan.windows])
            seen = judge(pipe.generate(case.prompt, seed=case.seed, steps=20, guidance=7.0).image)
            v = verdict(case.spec, seen)
            for obj, ok in zip(case.spec.objects, v.objects_ok):
                words = ("(?:small |large )?" if obj.size is None else obj.size + " ") + f"{obj.color} {obj.shape}"
                found = [m.start() for m in re.finditer(r"\ba " + words + r"\b", case.prompt)]
                if len(found) != 1:
                    continue
                index = len(tokenizer.encode(case.prompt[: found[0]]))  # words tokenize alone in CLIP's BPE
                window = int(np.searchsorted(starts, index, side="right") - 1)
                position = index - int(starts[window])
                key = (window, min(position // 15, 4))
                buckets.setdefault(key, [0, 0])
                buckets[key][0] += int(ok)
                buckets[key][1] += 1
                by_length.setdefault(length, [0, 0])
                by_length[length][0] += int(ok)
                by_length[length][1] += 1
        hits, total = by_length[length]
        print(f"{length} tokens of tags: recall {hits / total:.3f} of {total} objects", flush=True)
    print("chunk | object starts at position | recall | objects")
    for (window, bucket), (hits, total) in sorted(buckets.items()):
        span = f"{15 * bucket}-{15 * bucket + 14}" if bucket < 4 else "60-74"
        print(f"{window + 1} | {span} | {hits / total:.3f} | {total}")


if __name__ == "__main__":
    torch.set_num_threads(2)
    if sys.argv[1:2] == ["roundtrip"]:
        roundtrip(sys.argv[2:])
    elif sys.argv[1:2] == ["latent"]:
        latent(sys.argv[2:])
    elif sys.argv[1:2] == ["context"]:
        context(sys.argv[2:])
    elif sys.argv[1:2] == ["readout"]:  # readout [--clip-skip N] PATH...
        skip = int(sys.argv[3]) if sys.argv[2:3] == ["--clip-skip"] else 1
        readout(sys.argv[4:] if sys.argv[2:3] == ["--clip-skip"] else sys.argv[2:], clip_skip=skip)
    elif sys.argv[1:2] == ["longpos"]:
        if len(sys.argv) < 3 or not all(a.isdigit() for a in sys.argv[3:4]):
            sys.exit("usage: tiny_diagnostics.py longpos MODEL [PER_COUNT, a positive integer]")
        longpos(sys.argv[2], *[int(a) for a in sys.argv[3:4]])
    elif sys.argv[1:2] == ["twins"]:
        twins(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
