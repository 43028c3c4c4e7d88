"""LoRA parity with diffusers' ``load_lora_weights`` + ``fuse_lora(lora_scale=s)`` on identical tiny random weights.

Both sides start from the same weights: diffusers' UNet built tiny and random and converted to ours through the
rename tables (as tests/test_generate_parity.py does), our tiny text towers written out as transformers
``CLIPTextModel`` / ``CLIPTextModelWithProjection`` (``text_encoder_to_diffusers``). One random LoRA file (alpha
given, so alpha/rank matters) is loaded by both: diffusers converts the kohya names itself (SD1: diffusers paths;
SDXL: sgm/LDM paths, renumbered with the UNet config) or reads the PEFT names natively.

Compared, tightest first:
- every fused weight against ours after ``apply_loras``: max |difference| < 1e-6 (float32; the deltas are ~1e-2);
- the prompt context (and SDXL pooled vector) from diffusers' fused text encoders on our token ids against our
  ``TextEncoder.encode``: < 1e-5;
- the generated image, diffusers' pipeline given those embeddings against ours given the ``<lora:...>`` tag:
  < 2/255 per pixel value (measured with both parts: SD1 4e-6, SDXL 6e-6; weights 6e-8 / 9e-8, context 1.3e-6 /
  7e-7);
and each comparison is shown not to be vacuous: the LoRA moves the image by far more than the tolerance.
Cases: UNet only, text encoder only and both, for an SD1-style and an SDXL-style model, plus the PEFT layout (SD1).
"""

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from clipdiffusion.checkpoints.diffusers_unet import unet_diffusers_to_ldm  # noqa: E402
from clipdiffusion.checkpoints.safetensors_io import save_file  # noqa: E402
from clipdiffusion.checkpoints.text_layouts import text_encoder_to_diffusers  # noqa: E402
from clipdiffusion.pipeline import Pipeline  # noqa: E402
from clipdiffusion.testing import random_lora, tiny_pipeline  # noqa: E402
from clipdiffusion.text.tokenizer import BOS_ID, EOS_ID, CLIPTokenizer  # noqa: E402
from test_generate_parity import SD_SCHEDULE, _jitter, _ours_from_diffusers  # noqa: E402

WEIGHT_ATOL = 1e-6
CONTEXT_ATOL = 1e-5
PIXEL_ATOL = 2 / 255
SIZE = 16
PROMPT, NEGATIVE = "a red circle", "blurry"


def _hf_towers(text_encoder, family):
    """transformers copies of our towers (identical weights), CLIPTextModel then CLIPTextModelWithProjection."""
    towers = []
    for folder, tensors, cfg in text_encoder_to_diffusers(family, text_encoder.encoders):
        config = transformers.CLIPTextConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_width or 4 * cfg.width,
            num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, max_position_embeddings=cfg.max_positions,
            hidden_act=cfg.activation, layer_norm_eps=cfg.layer_norm_eps, projection_dim=cfg.projection_dim or 512)
        cls = transformers.CLIPTextModelWithProjection if cfg.projection_dim else transformers.CLIPTextModel
        model = cls(config).eval()
        if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers 5 names
            tensors = {k.removeprefix("text_model."): v for k, v in tensors.items()}
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
        towers.append(model)
    return towers


def _sd1():
    torch.manual_seed(0)
    unet = _jitter(diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")))
    vae, our_unet, our_vae = _ours_from_diffusers(diffusers, unet)
    ours = Pipeline(tiny_pipeline(0).text_encoder, our_unet, our_vae, "sd1", "eps", default_size=SIZE)
    (hf_te,) = _hf_towers(ours.text_encoder, "sd1")
    sched = diffusers.EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="linspace")
    ref = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=hf_te, tokenizer=None, unet=unet, scheduler=sched,
                                            safety_checker=None, feature_extractor=None,
                                            requires_safety_checker=False)
    return ref, ours


def _sdxl():
    torch.manual_seed(1)
    unet = _jitter(diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8))
    vae, our_unet, our_vae = _ours_from_diffusers(diffusers, unet)
    ours = Pipeline(tiny_pipeline(0, "sdxl").text_encoder, our_unet, our_vae, "sdxl", "eps", default_size=SIZE)
    te1, te2 = _hf_towers(ours.text_encoder, "sdxl")
    sched = diffusers.EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="linspace")
    ref = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=None,
                                              tokenizer_2=None, unet=unet, scheduler=sched)
    return ref, ours


BUILD = {"sd1": _sd1, "sdxl": _sdxl}
KW = dict(steps=2, seed=2, guidance=5.0, width=SIZE, height=SIZE)  # linspace 999, 0: integer timesteps


@pytest.fixture(scope="module")
def built():
    """Each family's (diffusers pipeline, ours, our image without LoRA), built once for the module; every case
    unfuses and unloads its LoRA from diffusers' pipeline afterwards (ours restores itself)."""
    cache = {}

    def get(family):
        if family not in cache:
            ref, ours = BUILD[family]()
            ref.set_progress_bar_config(disable=True)
            cache[family] = ref, ours, ours.generate(PROMPT, NEGATIVE, **KW).pixels
        return cache[family]

    return get


def _ids(text, pad):
    ids = [BOS_ID, *CLIPTokenizer().encode(text), EOS_ID]
    return torch.tensor([ids + [pad] * (77 - len(ids))])


@torch.no_grad()
def _ref_embeds(ref, family, text):
    """(context [1,77,D], pooled or None) from diffusers' (fused) text encoders, as our family encodes."""
    if family == "sd1":
        return ref.text_encoder(_ids(text, EOS_ID)).last_hidden_state, None
    first = ref.text_encoder(_ids(text, EOS_ID), output_hidden_states=True)
    second = ref.text_encoder_2(_ids(text, 0), output_hidden_states=True)
    return torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1), second.text_embeds


def _base(state):
    """A PEFT-wrapped module's state dict as the plain module's: fused weights under ``base_layer``, adapters out."""
    return {k.replace(".base_layer", ""): v for k, v in state.items() if ".lora_" not in k}


def _check_weights(ref, ours, family):
    unet = unet_diffusers_to_ldm(_base(ref.unet.state_dict()), ours.unet.config)
    mine = ours.unet.state_dict()
    worst = max(float((unet[k] - mine[k]).abs().max()) for k in mine)
    assert worst < WEIGHT_ATOL, worst
    towers = [ref.text_encoder] + ([ref.text_encoder_2] if family == "sdxl" else [])
    for spec, hf in zip(ours.text_encoder.encoders, towers):
        theirs = _base(hf.state_dict())
        for key, value in spec.model.state_dict().items():
            other = theirs.get(f"text_model.{key}", theirs.get(key))
            assert other is not None, key
            assert float((other - value).abs().max()) < WEIGHT_ATOL, key


@pytest.mark.slow
@pytest.mark.parametrize("family, layout, parts", [
    ("sd1", "kohya", "unet"), ("sd1", "kohya", "te"), ("sd1", "kohya", "both"), ("sd1", "peft", "both"),
    ("sdxl", "kohya_ldm", "unet"), ("sdxl", "kohya_ldm", "te"), ("sdxl", "kohya_ldm", "both"),
])
def test_lora_matches_diffusers_fuse_lora(tmp_path, built, family, layout, parts):
    ref, ours, plain = built(family)
    scale = 0.7
    alpha = None if layout == "peft" else 2.0  # rank 4: kohya scale alpha/rank = 0.5
    tensors = random_lora(ours, layout=layout, rank=4, seed=3, alpha=alpha, std=0.3,
                          unet=parts != "te", text=parts != "unet")
    name = f"{layout}-{parts}"
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, path)
    ours.load_lora(path)
    ref.load_lora_weights(dict(tensors), adapter_name="style")
    ref.fuse_lora(lora_scale=scale)
    try:
        got = ours.generate(f"{PROMPT} <lora:{name}:{scale}>", NEGATIVE, **KW)
        _check_weights(ref, ours, family)  # the weights as the tagged generation left them merged

        context, pooled = _ref_embeds(ref, family, PROMPT)
        negative, negative_pooled = _ref_embeds(ref, family, NEGATIVE)
        cond = ours.text_encoder.encode(PROMPT, NEGATIVE)
        assert float((cond.context - context).abs().max()) < CONTEXT_ATOL
        if pooled is not None:
            assert float((cond.pooled - pooled).abs().max()) < CONTEXT_ATOL
        embeds = dict(prompt_embeds=context, negative_prompt_embeds=negative)
        if pooled is not None:
            embeds.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled)
        expected = ref(**embeds, guidance_scale=KW["guidance"], num_inference_steps=KW["steps"], width=SIZE,
                       height=SIZE, output_type="np", generator=torch.Generator().manual_seed(KW["seed"])).images
    finally:
        ref.unfuse_lora()
        ref.unload_lora_weights()
    assert np.abs(got.pixels - expected).max() < PIXEL_ATOL
    assert np.abs(plain - expected).max() > 10 * PIXEL_ATOL  # the LoRA moved the image: not a vacuous match
