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

``context``: how far apart the frozen text encoder puts captions that differ in one word, as the UNet sees them.
For one-object captions (the same template), each pair of colours and of shapes: the largest per-position L2
distance between the two cross-attention contexts, over the mean row norm; mean and 10th percentile.
"""

import dataclasses
import itertools
import sys

import numpy as np
import torch

from clipdiffusion.pipeline import Pipeline
from clipdiffusion.tiny.captions import caption
from clipdiffusion.tiny.eval import clip_scores, load_heads
from clipdiffusion.tiny.train import to_pixels
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


if __name__ == "__main__":
    torch.set_num_threads(2)
    if sys.argv[1:2] == ["roundtrip"]:
        roundtrip(sys.argv[2:])
    elif sys.argv[1:2] == ["latent"]:
        latent(sys.argv[2:])
    elif sys.argv[1:2] == ["context"]:
        context(sys.argv[2:])
    elif sys.argv[1:2] == ["twins"]:
        twins(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
