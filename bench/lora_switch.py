"""Benchmark: switching LoRAs at SD 1.5 size, ours (merge in place, exact restore from backups) vs diffusers' best
merged configuration (``load_lora_weights`` once per LoRA, then ``fuse_lora`` / ``unfuse_lora``).

Models: an SD 1.5-shaped UNet (diffusers' default UNet2DConditionModel = our UNetConfig SD1 preset, random init)
and a CLIP-L text tower (our CLIPTextConfig SD1_CLIP_L, random), each ONE set of tensors shared by both sides (our
modules are assigned diffusers'/transformers' parameters), so memory holds one model. Two random kohya LoRAs of
rank 32 (alpha 16) on every attention and MLP linear of the UNet and the text tower (``testing.random_lora``, the
layout kohya's sd-scripts write for SD1) are saved as .safetensors and loaded by both.

Timed (median of --reps interleaved repetitions; the loading is timed once):
- load: ours ``Pipeline.load_lora`` (read, validate, map) vs diffusers ``load_lora_weights`` (convert, inject PEFT);
- apply A: ours ``apply_loras([A])`` from the clean model vs diffusers ``fuse_lora(adapter_names=[A])``;
- switch A -> B: ours ``apply_loras([B])`` vs diffusers ``unfuse_lora()`` + ``fuse_lora(adapter_names=[B])``;
- restore: ours ``apply_loras(())`` vs diffusers ``unfuse_lora()``.
After the run, the drift of each side's restored weights from the originals is printed: ours restores from the
backup (0 by construction), diffusers subtracts the delta again.

    OMP_NUM_THREADS=2 .venv/bin/python bench/lora_switch.py --threads 2 --reps 3
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def build():
    """(our Pipeline, diffusers StableDiffusionPipeline) over one set of weights."""
    import diffusers
    import transformers

    from clipdiffusion.checkpoints.diffusers_unet import unet_config_from_diffusers, unet_diffusers_to_ldm
    from clipdiffusion.diffusion.unet import SD1, UNetModel
    from clipdiffusion.families import get_family
    from clipdiffusion.pipeline import Pipeline
    from clipdiffusion.text.clip import SD1_CLIP_L, CLIPTextModel
    from clipdiffusion.text.conditioning import EncoderSpec, TextEncoder

    torch.manual_seed(0)
    ref_unet = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).eval()
    cfg = unet_config_from_diffusers(dict(ref_unet.config))
    assert cfg == SD1, "diffusers' default UNet is not our SD1 preset"
    unet = UNetModel(cfg, device="meta").eval()
    unet.load_state_dict(unet_diffusers_to_ldm(ref_unet.state_dict(), cfg), strict=True, assign=True)

    clip = CLIPTextModel(SD1_CLIP_L).eval()
    c = SD1_CLIP_L
    hf_config = transformers.CLIPTextConfig(vocab_size=c.vocab_size, hidden_size=c.width, intermediate_size=4 * c.width,
                                            num_hidden_layers=c.layers, num_attention_heads=c.heads,
                                            max_position_embeddings=c.max_positions, hidden_act=c.activation,
                                            layer_norm_eps=c.layer_norm_eps)
    with torch.device("meta"):
        hf_clip = transformers.CLIPTextModel(hf_config)
    prefix = "text_model." if any(k.startswith("text_model.") for k in hf_clip.state_dict()) else ""
    missing, unexpected = hf_clip.load_state_dict({prefix + k: v for k, v in clip.state_dict().items()},
                                                  strict=False, assign=True)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    for name, buffer in list(hf_clip.named_buffers()):  # position_ids stayed on meta
        module = hf_clip.get_submodule(name.rsplit(".", 1)[0])
        module.register_buffer(name.rsplit(".", 1)[1], torch.arange(c.max_positions)[None], persistent=False)
    hf_clip.eval()

    family = get_family("sd1")
    recipe = family.towers[0]
    text_encoder = TextEncoder(family, [EncoderSpec(recipe.name, clip, pad_id=recipe.pad_id,
                                                    final_norm=recipe.final_norm)])
    ours = Pipeline(text_encoder, unet, None, "sd1")
    ref = diffusers.StableDiffusionPipeline(vae=None, text_encoder=hf_clip, tokenizer=None, unet=ref_unet,
                                            scheduler=diffusers.EulerDiscreteScheduler(), safety_checker=None,
                                            feature_extractor=None, requires_safety_checker=False)
    return ours, ref


def weights(pipe) -> dict:
    out = {f"unet.{k}": v for k, v in pipe.unet.state_dict().items()}
    out.update({f"te.{k}": v for k, v in pipe.text_encoder.encoders[0].model.state_dict().items()})
    return out


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from clipdiffusion.checkpoints.safetensors_io import save_file
    from clipdiffusion.testing import random_lora

    ours, ref = build()
    folder = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    paths = {}
    for name, seed in (("style_a", 1), ("style_b", 2)):  # PEFT mangles adapters named "A" / "B"
        tensors = random_lora(ours, layout="kohya", rank=args.rank, seed=seed, alpha=args.rank / 2, std=0.01)
        paths[name] = folder / f"{name}.safetensors"
        save_file(tensors, paths[name])
    modules = len({k.rsplit(".", 2)[0] for k in tensors})
    size = sum(p.stat().st_size for p in paths.values()) / 2 / 2**20
    unet_params = sum(p.numel() for p in ours.unet.parameters())
    te_params = sum(p.numel() for p in ours.text_encoder.encoders[0].model.parameters())

    load = {"ours": 0.0, "diffusers": 0.0}
    for name, path in paths.items():
        load["ours"] += timed(lambda: ours.load_lora(path, name))
        load["diffusers"] += timed(lambda: ref.load_lora_weights(str(path), adapter_name=name))
    for component in (ref.unet, ref.text_encoder):  # diffusers really holds the files' factors (not PEFT's zeros)
        for name in paths:
            ups = [v for k, v in component.state_dict().items() if f"lora_B.{name}." in k]
            assert ups and all(bool(v.abs().max() > 0) for v in ups), f"{name}: diffusers loaded no factors"
    ref.set_adapters(["style_a", "style_b"], [0.0, 0.0])  # loaded and inactive; fuse_lora names the adapter to merge

    times = {(side, step): [] for side in ("ours", "diffusers") for step in ("apply A", "switch A->B", "restore")}
    with torch.no_grad():
        for _ in range(args.reps):
            times["ours", "apply A"].append(timed(lambda: ours.apply_loras([("style_a", 1.0, 1.0)])))
            times["ours", "switch A->B"].append(timed(lambda: ours.apply_loras([("style_b", 1.0, 1.0)])))
            times["ours", "restore"].append(timed(lambda: ours.apply_loras(())))
            ref.set_adapters(["style_a"], [1.0])
            times["diffusers", "apply A"].append(timed(lambda: ref.fuse_lora(lora_scale=1.0, adapter_names=["style_a"])))

            def switch():
                ref.unfuse_lora()
                ref.set_adapters(["style_b"], [1.0])
                ref.fuse_lora(lora_scale=1.0, adapter_names=["style_b"])

            times["diffusers", "switch A->B"].append(timed(switch))
            times["diffusers", "restore"].append(timed(ref.unfuse_lora))
    # drift: one more round of each from a snapshot (the tensors are shared, so each side is compared with the
    # weights as they were right before its own round)
    from clipdiffusion.checkpoints.diffusers_unet import unet_diffusers_to_ldm

    def diffusers_weights():
        unet = {k.replace(".base_layer", ""): v for k, v in ref.unet.state_dict().items() if ".lora_" not in k}
        te = {k.replace(".base_layer", ""): v for k, v in ref.text_encoder.state_dict().items() if ".lora_" not in k}
        out = {f"unet.{k}": v for k, v in unet_diffusers_to_ldm(unet, ours.unet.config).items()}
        out.update({f"te.{k.removeprefix('text_model.')}": v for k, v in te.items()})
        return out

    def drift(before, after):
        return max(float((after[k] - v).abs().max()) for k, v in before.items())

    with torch.no_grad():
        snapshot = {k: v.clone() for k, v in weights(ours).items()}
        ours.apply_loras([("style_a", 1.0, 1.0)])
        ours.apply_loras([("style_b", 1.0, 1.0)])
        ours.apply_loras(())
        ours_drift = drift(snapshot, weights(ours))
        ref.set_adapters(["style_a"], [1.0])
        ref.fuse_lora(lora_scale=1.0, adapter_names=["style_a"])
        ref.unfuse_lora()
        ref.set_adapters(["style_b"], [1.0])
        ref.fuse_lora(lora_scale=1.0, adapter_names=["style_b"])
        ref.unfuse_lora()
        diffusers_drift = drift(snapshot, diffusers_weights())
        del snapshot

    print(f"machine: {cpu_model()}; torch {torch.__version__}; threads {torch.get_num_threads()}; dtype float32")
    print(f"model: SD 1.5 UNet ({unet_params:,} params) + CLIP-L ({te_params:,} params); LoRA kohya rank "
          f"{args.rank}, {modules} modules (attention + MLP linears, UNet and text), {size:.0f} MiB per file; "
          f"median of {args.reps}")
    print(f"load (2 files): ours {load['ours']:.2f} s, diffusers {load['diffusers']:.2f} s, "
          f"ours/diffusers {load['ours'] / load['diffusers']:.2f}")
    print("| step | ours (s) | diffusers (s) | ours / diffusers |")
    print("|---|---|---|---|")
    for step in ("apply A", "switch A->B", "restore"):
        a, b = statistics.median(times["ours", step]), statistics.median(times["diffusers", step])
        print(f"| {step} | {a:.3f} | {b:.3f} | {a / b:.2f} |")
    print(f"apply A, switch to B, restore: max |weight - before| ours {ours_drift:.3g}, diffusers "
          f"{diffusers_drift:.3g}")


if __name__ == "__main__":
    main()
