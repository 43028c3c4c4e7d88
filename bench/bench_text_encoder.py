"""Benchmark: our CLIP text transformer vs transformers' CLIPTextModel at full SD1 CLIP-L size.

Same random weights in both, batch 2 x 77 tokens, fp32 on CPU. Times one encode for clip_skip 1 (last layer) and
clip_skip 2 (penultimate + final LN). transformers has no early exit: its clip skip 2 is what diffusers does,
``output_hidden_states=True`` then ``final_layer_norm(hidden_states[-2])``, so every layer runs; ours stops after
layer 11. Repetitions are interleaved (ours, reference, ours, ...) and the median is reported, because other
processes share the machine.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_text_encoder.py --threads 1 --repeats 7
"""

import argparse
import statistics
import time

import torch
from _machine import machine


def build(seed: int):
    import transformers

    from clipdiffusion.text.clip import SD1_CLIP_L, CLIPTextModel

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                      vocab_size=49408, bos_token_id=49406, eos_token_id=49407)
    ref = transformers.CLIPTextModel(cfg).eval()
    sd = {k.removeprefix("text_model."): v for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
    ours = CLIPTextModel.from_state_dict(sd, SD1_CLIP_L).eval()
    return ours, ref


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ours, ref = build(0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 49406, (args.batch, 77), generator=g)
    ids[:, 0] = 49406
    ids[:, 20:] = 49407  # BOS, 19 tokens, EOS padding as SD1 does

    final_ln = ref.text_model.final_layer_norm if hasattr(ref, "text_model") else ref.final_layer_norm
    runs = {
        ("ours", 1): lambda: ours(ids).hidden,
        ("ref", 1): lambda: ref(ids).last_hidden_state,
        ("ours", 2): lambda: ours(ids, clip_skip=2).hidden,
        ("ref", 2): lambda: final_ln(ref(ids, output_hidden_states=True).hidden_states[-2]),
    }
    times = {key: [] for key in runs}
    with torch.inference_mode():
        for skip in (1, 2):  # parity check and warm-up
            diff = (runs[("ours", skip)]() - runs[("ref", skip)]()).abs().max().item()
            assert diff < 1e-4, f"clip_skip {skip}: outputs differ by {diff}"
        for _ in range(args.repeats):
            for key, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)

    med = {key: statistics.median(v) * 1000 for key, v in times.items()}
    print(f"machine: {machine()}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"batch {args.batch} x 77, fp32, CLIP-L 12 layers ({ours.n_params():,} params); "
          f"median of {args.repeats}")
    print("| clip_skip | ours (ms) | transformers (ms) | ours / transformers |")
    print("|---|---|---|---|")
    for skip in (1, 2):
        o, r = med[("ours", skip)], med[("ref", skip)]
        print(f"| {skip} | {o:.1f} | {r:.1f} | {o / r:.3f} |")
    saving = 1 - med[("ours", 2)] / med[("ours", 1)]
    print(f"early exit: ours clip_skip 2 vs 1 = {med[('ours', 2)] / med[('ours', 1)]:.3f} "
          f"({saving:.1%} less time; 11 of 12 layers)")


if __name__ == "__main__":
    main()
