"""What each long-prompt strategy costs at SD 1.5 size: text-encoder windows and time, context rows, and the UNet
step time those rows cost, against diffusers' only behaviour (truncation to 77 tokens, transformers'
CLIPTextModel and diffusers' UNet2DConditionModel).

A prompt of about 225 tokens of style tags followed by two objects is planned with every strategy. For each:
windows through CLIP-L (for ``summarize`` also the judge's leave-one-out windows), the median encode time, and the
context rows the UNet attends to. Then one UNet step (batch 2, cond + uncond, 64x64 latents) is timed at each
distinct row count, ours and diffusers' at 77 rows on the same random weights. Medians of interleaved repetitions;
other processes may share the CPU.

    OMP_NUM_THREADS=2 .venv/bin/python bench/long_prompt_cost.py [--reps 3] [--threads 2]
"""

import argparse
import statistics
import time

import numpy as np
import torch
from _machine import machine

STRATEGIES = ("truncate", "chunk", "window", "stretch", "summarize")


def build_text():
    import transformers

    from clipdiffusion.text.chunking import EOS_ID
    from clipdiffusion.text.clip import SD1_CLIP_L, CLIPTextModel
    from clipdiffusion.text.conditioning import EncoderSpec, TextEncoder

    config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
    )
    torch.manual_seed(0)
    ref = transformers.CLIPTextModel(config).eval()
    ours = CLIPTextModel(SD1_CLIP_L)
    ours.load_state_dict({k.removeprefix("text_model."): v for k, v in ref.state_dict().items()}, strict=True)
    return ref, TextEncoder("sd1", [EncoderSpec("clip_l", ours.eval(), EOS_ID, True, 1)])


def build_unets():
    import diffusers

    from clipdiffusion.checkpoints.diffusers_unet import unet_config_from_diffusers, unet_diffusers_to_ldm
    from clipdiffusion.diffusion.unet import UNetModel

    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).eval()
    cfg = unet_config_from_diffusers(dict(ref.config))
    ours = UNetModel(cfg, device="meta").eval()
    ours.load_state_dict(unet_diffusers_to_ldm(ref.state_dict(), cfg), strict=True, assign=True)
    return ref, ours


def median_time(fn, reps):
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--unet-reps", type=int, default=2, help="0: skip the UNet table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from clipdiffusion.text.conditioning import SummaryJudge
    from clipdiffusion.tiny.eval import tag_prefix

    ref_text, encoder = build_text()
    tags = tag_prefix(encoder.tokenizer, 225, np.random.default_rng(0))
    prompt = ", ".join(tags) + ", a small red circle at the top left and a large blue square at the bottom right"
    tokens = len(encoder.tokenizer.encode(prompt))
    print(f"machine: {machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}, float32")
    print(f"prompt: {tokens} tokens ({len(tags)} tags, then two objects)")

    rows = {}
    print("\n| strategy | CLIP windows | context rows | encode (s) | tokens kept |")
    print("|---|---|---|---|---|")
    for strategy in STRATEGIES:
        passes = []
        original = SummaryJudge.content_rows

        def counting(self, stream, _original=original):
            out = _original(self, stream)
            passes.append(self.passes)
            self.passes = 0
            return out

        SummaryJudge.content_rows = counting
        try:
            with torch.inference_mode():
                seconds = median_time(lambda: encoder.encode(prompt, long_prompt=strategy), args.reps)
                c = encoder.encode(prompt, long_prompt=strategy)
        finally:
            SummaryJudge.content_rows = original
        plan = c.plan
        windows = len(plan.windows)
        judge = (sum(passes) // (args.reps + 1)) if passes else 0
        kept = plan.report.total_tokens - plan.report.dropped_tokens
        rows[strategy] = c.context.shape[1]
        extra = f" + {judge} (judge)" if judge else ""
        print(f"| {strategy} | {windows}{extra} | {c.context.shape[1]} | {seconds:.3f} | {kept} / {tokens} |")

    ids = torch.tensor([encoder.plan(prompt, "truncate").windows[0].ids()])
    with torch.inference_mode():
        ref_seconds = median_time(lambda: ref_text(ids), args.reps)
    print(f"| diffusers (transformers, truncation) | 1 | 77 | {ref_seconds:.3f} | 75 / {tokens} |")

    if args.unet_reps < 1:
        return
    ref_unet, unet = build_unets()
    x = torch.randn(2, 4, 64, 64)
    t = torch.tensor([500.0, 500.0])
    print("\n| context rows | our UNet step (s) | diffusers UNet step (s) | ours / diffusers at 77 rows |")
    print("|---|---|---|---|")
    with torch.inference_mode():
        context77 = torch.randn(2, 77, 768)
        ref_step = median_time(lambda: ref_unet(x, t, encoder_hidden_states=context77), args.unet_reps)
        for n in sorted(set(rows.values())):
            context = torch.randn(2, n, 768)
            step = median_time(lambda: unet(x, t, context), args.unet_reps)
            print(f"| {n} | {step:.2f} | {ref_step:.2f} (77 rows) | {step / ref_step:.2f} |")


if __name__ == "__main__":
    main()
