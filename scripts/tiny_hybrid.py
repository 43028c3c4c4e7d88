"""A tiny-model checkpoint made of two others' parts: the text encoder of one and the VAE (with its scale factor) of
another (and optionally the UNet of a third), for UNet sweeps that ask which of a run's frozen parts a UNet learns well on
(``scripts/tiny_unet_sweep.py --base HYBRID``; the sweep trains the UNet afresh, so the one kept here is moot).

    python scripts/tiny_hybrid.py --text RUN_A/tiny-sd.safetensors --vae RUN_B/tiny-sd.safetensors --out H.safetensors
"""

import argparse
import json
import sys

from safetensors import safe_open
from safetensors.numpy import save_file

TEXT, VAE, UNET = "cond_stage_model.", "first_stage_model.", "model.diffusion_model."


def read(path):
    with safe_open(path, "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--text", required=True, help="checkpoint whose text encoder (and UNet) the hybrid takes")
    parser.add_argument("--vae", required=True, help="checkpoint whose VAE and scale factor the hybrid takes")
    parser.add_argument("--unet", help="checkpoint (or UNet-only file) whose UNet the hybrid takes instead")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    text, meta = read(args.text)
    vae, vae_meta = read(args.vae)
    if meta.get("clipdiffusion.family") != "tiny":
        sys.exit(f"text: {args.text} is not a tiny-family checkpoint")
    if vae_meta.get("clipdiffusion.family") != "tiny":
        sys.exit(f"vae: {args.vae} is not a tiny-family checkpoint")
    if json.loads(meta["clipdiffusion.vae_config"]) | {"scale_factor": 0} != json.loads(
            vae_meta["clipdiffusion.vae_config"]) | {"scale_factor": 0}:  # fmt: skip
        sys.exit(f"vae: {args.vae} has another VAE shape than {args.text}")
    merged = {k: v for k, v in text.items() if not k.startswith(VAE)}
    merged.update({k: v for k, v in vae.items() if k.startswith(VAE)})
    meta["clipdiffusion.vae_config"] = vae_meta["clipdiffusion.vae_config"]
    if args.unet:
        unet, unet_meta = read(args.unet)
        if not any(k.startswith(UNET) for k in unet):
            sys.exit(f"unet: {args.unet} holds no {UNET}* tensors")
        merged = {k: v for k, v in merged.items() if not k.startswith(UNET)}
        merged.update({k: v for k, v in unet.items() if k.startswith(UNET)})
        for key in ("clipdiffusion.unet_config", "clipdiffusion.tiny.train_settings", "clipdiffusion.tiny.steps"):
            if key in unet_meta:
                meta[key] = unet_meta[key]
    meta["clipdiffusion.tiny.hybrid"] = json.dumps({"text": args.text, "vae": args.vae, "unet": args.unet})
    save_file(merged, args.out, metadata=meta)
    print(f"{args.out}: text encoder of {args.text}, VAE of {args.vae}, UNet of {args.unet or args.text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
