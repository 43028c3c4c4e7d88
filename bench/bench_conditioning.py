"""Prompt -> conditioning speed: ours (TextEncoder.encode) vs the A1111 algorithm run on transformers' CLIPTextModel.

Both use the same random full-size SD1 CLIP-L weights and the same token windows (our plan). The reference does
what AUTOMATIC1111's ``sd_hijack_clip.py`` does, prompt and negative in separate calls: one transformers forward
per chunk with ``output_hidden_states``, ``hidden_states[-clip_skip]`` (+ final LN when > 1), z*w with the mean
restored, chunks concatenated, the shorter side padded with encoded empty-prompt chunks ("Pad prompt/negative
prompt"). Ours runs all windows of both prompts and the empty prompt in one batch and stops at the clip-skip
layer. Repetitions are interleaved and the
median is reported, because other processes share the CPU. The max abs difference of the outputs is printed too.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_conditioning.py [--reps 5]
"""

import argparse
import statistics
import time

import torch
from _machine import machine


def build(seed=0):
    import transformers

    from clipdiffusion.text.chunking import EOS_ID
    from clipdiffusion.text.clip import SD1_CLIP_L, CLIPTextModel
    from clipdiffusion.text.conditioning import EncoderSpec, TextEncoder

    config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
    )
    torch.manual_seed(seed)
    ref = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():
        ref.final_layer_norm.bias.normal_(0.1, 0.2)  # so the means A1111 restores are not ~0
    ours = CLIPTextModel(SD1_CLIP_L)
    ours.load_state_dict({k.removeprefix("text_model."): v for k, v in ref.state_dict().items()}, strict=True)
    encoder = TextEncoder("sd1", [EncoderSpec("clip_l", ours.eval(), EOS_ID, True, 1)])
    return ref, encoder


def reference_encode(ref, plan, clip_skip):
    """A1111's ``forward`` for one prompt (cond and uncond are separate calls there): one forward per chunk."""
    zs = []
    with torch.no_grad():
        for window in plan.windows:
            out = ref(torch.tensor([window.ids()]), output_hidden_states=clip_skip > 1)
            z = out.last_hidden_state if clip_skip == 1 else ref.final_layer_norm(out.hidden_states[-clip_skip])
            original = z.mean()
            z = z * torch.tensor([window.position_weights()])[..., None]
            z = z * (original / z.mean())
            zs.append(z)
    return torch.hstack(zs)


def reference_pair(ref, plans, empty, clip_skip):
    """cond and uncond, the shorter padded with the empty-prompt chunk (A1111 "Pad prompt/negative prompt"; A1111
    encodes ``""`` once when the model loads, so ``empty`` is precomputed outside the timing)."""
    cond, uncond = (reference_encode(ref, p, clip_skip) for p in plans)
    while uncond.shape[1] < cond.shape[1]:
        uncond = torch.hstack([uncond, empty])
    while cond.shape[1] < uncond.shape[1]:
        cond = torch.hstack([cond, empty])
    return cond, uncond


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    ref, encoder = build()
    negative = "blurry, low quality, (watermark:1.2)"
    prompts = {
        "short (1 chunk)": "a photograph of an (astronaut:1.2) riding a horse on the moon, detailed, 8k",
        "long (3 chunks)": ", ".join(["a (red:1.1) cat sitting on a wooden chair next to a window"] * 14),
    }
    print(f"machine: {machine()}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    empty_plan = encoder.plan("")
    for label, prompt in prompts.items():
        for clip_skip in (1, 2):
            plans = [encoder.plan(prompt), encoder.plan(negative, field_name="negative_prompt")]
            empty = reference_encode(ref, empty_plan, clip_skip)
            ours_t, ref_t = [], []
            for _ in range(args.reps):  # interleaved
                t0 = time.perf_counter()
                cond = encoder.encode(prompt, negative, clip_skip=clip_skip)
                t1 = time.perf_counter()
                z = reference_pair(ref, plans, empty, clip_skip)
                t2 = time.perf_counter()
                ours_t.append(t1 - t0)
                ref_t.append(t2 - t1)
            diff = max((cond.context[0] - z[0]).abs().max().item(),
                       (cond.negative_context[0] - z[1]).abs().max().item())
            a, b = statistics.median(ours_t), statistics.median(ref_t)
            print(f"{label}, clip_skip={clip_skip}, tokens {plans[0].report.summary()}: ours {a * 1000:.1f} ms, "
                  f"transformers A1111-loop {b * 1000:.1f} ms, ratio ours/ref {a / b:.2f}, max|diff| {diff:.2e}")


if __name__ == "__main__":
    main()
