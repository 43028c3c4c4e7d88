"""Which rows of a long prompt's context lose its objects? (issue 18; figures in eval/depth-rows/)

    python scripts/tiny_rows_diagnostic.py MODEL PER_COUNT LENGTHS MODES

Prompts of the long-prompt study (objects after LENGTHS tokens of style tags, PER_COUNT prompts per object count),
one window (the truncate strategy), 20 Euler steps at guidance 7. Before the UNet sees a prompt's context, one
group of rows is replaced; object recall says whether those rows were the trouble:

- ``normal``: nothing replaced.
- ``pad_empty``: the padding rows after EOS -> the empty prompt's rows at the same positions.
- ``eos_pad_empty``: the EOS row and the padding rows -> the empty prompt's.
- ``tags_null``: the tag rows -> the empty prompt's rows at those positions (no tags to attend to).
- ``objects_alone``: the object rows (and EOS) -> the rows of the same words encoded with no tags in front,
  at the positions they have in the long prompt (same words, the depth the UNet reads well).
"""

import dataclasses
import re
import sys
import time

import numpy as np
import torch

from clipdiffusion.pipeline import Pipeline
from clipdiffusion.tiny.eval import long_prompt_cases
from clipdiffusion.tiny.judge import judge, verdict

MODES = ("normal", "pad_empty", "eos_pad_empty", "tags_null", "objects_alone")


def object_start(prompt, spec) -> int:
    """Character offset of the first object phrase ("a [size] colour shape") in the prompt."""
    starts = []
    for obj in spec.objects:
        size = "(?:small |large )?" if obj.size is None else obj.size + " "
        found = re.search(r"\ba " + size + f"{obj.color} {obj.shape}\\b", prompt)
        if found:
            starts.append(found.start())
    return min(starts)


def main(argv) -> int:
    if len(argv) != 4:
        sys.exit(__doc__)
    path, per_count = argv[0], int(argv[1])
    lengths = [int(v) for v in argv[2].split(",")]
    modes = argv[3].split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        sys.exit(f"MODES: unknown {unknown} (choose from {', '.join(MODES)})")
    torch.set_num_threads(1)
    pipe = Pipeline.from_file(path)
    encoder = pipe.text_encoder
    tokenizer = encoder.tokenizer
    original = encoder.encode_texts

    def rows_of(text):
        return original([text], [""], long_prompt="truncate").prompts[text].context  # [1, 77, D]

    empty = rows_of("")
    edit = {}

    def encode_texts(texts, negative_texts=(), *args, **kwargs):
        out = original(texts, negative_texts, *args, **kwargs)
        if edit.get("fn") is not None:
            for text, encoded in list(out.prompts.items()):
                out.prompts[text] = dataclasses.replace(encoded, context=edit["fn"](encoded.context.clone()))
        return out

    encoder.encode_texts = encode_texts
    print(f"model {path}; {per_count * 3} prompts per cell, truncate, 20 steps, euler, guidance 7")
    print("| tags | rows replaced | object recall | ± | objects | prompt success |")
    print("|---|---|---|---|---|---|")
    for length in lengths:
        cases = long_prompt_cases(tokenizer, length, per_count)
        for mode in modes:
            hits = total = successes = 0
            start = time.time()
            for case in cases:
                n = min(len(tokenizer.encode(case.prompt)), 75)
                eos = n + 1
                first = object_start(case.prompt, case.spec)
                n_tags = len(tokenizer.encode(case.prompt[:first]))
                objects = case.prompt[first:]
                alone = rows_of(objects) if mode == "objects_alone" else None

                def fn(c, eos=eos, n_tags=n_tags, alone=alone, n_objects=len(tokenizer.encode(objects))):
                    if mode == "pad_empty":
                        c[:, eos + 1:] = empty[:, eos + 1:]
                    elif mode == "eos_pad_empty":
                        c[:, eos:] = empty[:, eos:]
                    elif mode == "tags_null":
                        c[:, 1:1 + n_tags] = empty[:, 1:1 + n_tags]
                    elif mode == "objects_alone":
                        end = min(1 + n_tags + n_objects, 76)
                        c[:, 1 + n_tags:end] = alone[:, 1:end - n_tags]
                        if end == eos:
                            c[:, eos] = alone[:, 1 + n_objects]
                    return c

                edit["fn"] = None if mode == "normal" else fn
                image = pipe.generate(case.prompt, seed=case.seed, steps=20, guidance=7.0, long_prompt="truncate").image
                v = verdict(case.spec, judge(image))
                hits += sum(v.objects_ok)
                total += len(v.objects_ok)
                successes += v.success
            r = hits / total
            print(f"| {length} | {mode} | {r:.3f} | {np.sqrt(r * (1 - r) / total):.3f} | {total} | "
                  f"{successes / len(cases):.3f} |  <!-- {time.time() - start:.0f} s -->", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
