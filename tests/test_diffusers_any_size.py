"""diffusers folders at sizes no public model has (issue 15): the configs say everything needed to build them.

Each case builds a pipeline with random weights from diffusers' and transformers' own classes at off-preset sizes
(widths, levels, layers per block, head counts or widths, transformer depth per level, norm groups, CLIP
width/layers/heads), writes it with ``save_pretrained``, and loads it with ``Pipeline.from_pretrained``. Our
``generate`` (Euler, "normal" schedule, 4 steps, CFG 5, a negative prompt, seed 3) must match diffusers' own
``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` on the same folder (EulerDiscreteScheduler with
"linspace" spacing, the same seeded generator), prompts going through each side's own tokenizer and text encoders.

Tolerance: 2/255 of the pixel range, max abs difference per pixel channel (values in [0, 1]); measured differences
are ~1e-6 (fp32, different operation order). Then ``convert`` writes each as one .safetensors file, which must load
back with the same family, prediction, UNet/VAE/text configs and default size, and give the same image (1e-5).
"""

import dataclasses

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from clipdiffusion.commands.convert import convert  # noqa: E402
from clipdiffusion.checkpoints.detect import family_from_diffusers  # noqa: E402
from clipdiffusion.checkpoints.diffusers_unet import unet_config_from_diffusers, unet_diffusers_to_ldm  # noqa: E402
from clipdiffusion.commands.info import describe_folder  # noqa: E402
from clipdiffusion.checkpoints.diffusers_vae import vae_config_from_diffusers, vae_diffusers_to_ldm  # noqa: E402
from clipdiffusion.checkpoints.load import load_diffusers, tokenizer_pad_notes  # noqa: E402
from clipdiffusion.checkpoints.save import write_tokenizer  # noqa: E402
from clipdiffusion.errors import CheckpointError, ClipDiffusionError  # noqa: E402
from clipdiffusion.diffusion.unet import UNetModel  # noqa: E402
from clipdiffusion.diffusion.vae import AutoencoderKL  # noqa: E402
from clipdiffusion.pipeline import Pipeline  # noqa: E402

TOL = 2 / 255  # max abs pixel difference, pixels in [0, 1]
PROMPT, NEGATIVE, SEED, STEPS, GUIDANCE = "a red circle on a blue square", "blurry, green", 3, 4, 5.0
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                steps_offset=1, timestep_spacing="linspace")
EOS, OPENCLIP_PAD = "<|endoftext|>", "!"  # "!" is id 0: OpenCLIP pads with 0


def _text(hidden_act, width, layers, heads, mlp, projection_dim=None):
    return dict(hidden_act=hidden_act, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=mlp, projection_dim=projection_dim)


# name -> (family, prediction, size (w, h), unet kwargs, vae kwargs, [(text kwargs, tokenizer pad)])
CASES = {
    # SD1-like: 2 levels, context 32, a fixed head count, 2 ResBlocks per level, a 3-layer CLIP of width 32.
    "sd1_context32": ("sd1", "eps", (16, 16), dict(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=32, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        dict(block_out_channels=(32, 64), layers_per_block=1),
        [(_text("quick_gelu", 32, 3, 4, 64), EOS)]),
    # SD1-like, 3 levels with attention at the outer two only, 1 ResBlock per level, per-level head counts that
    # keep 8-wide heads, depth 2 at the first level, 8 norm groups, a 3-level VAE (x4) with 8 groups and its own
    # scaling factor, a CLIP of width 24 with 3 heads and a narrow MLP.
    "sd1_three_levels": ("sd1", "eps", (24, 16), dict(
        sample_size=8, block_out_channels=(16, 32, 48), layers_per_block=1, cross_attention_dim=24,
        attention_head_dim=(2, 4, 6), transformer_layers_per_block=(2, 1, 1), norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D")),
        dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8, scaling_factor=0.3),
        [(_text("quick_gelu", 24, 2, 3, 40), EOS)]),
    # SD2-like: linear projections, 16-wide heads given as per-level head counts, depth 2, an OpenCLIP-style
    # (gelu, pads with 0) tower of width 48, v-prediction, upcast attention.
    "sd2_linear_v": ("sd2", "v", (16, 24), dict(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=48,
        attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True, transformer_layers_per_block=2,
        norm_num_groups=16, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
        dict(block_out_channels=(32, 32, 64), layers_per_block=1, norm_num_groups=16),
        [(_text("gelu", 48, 3, 3, 96), OPENCLIP_PAD)]),
    # SDXL-like: two towers (CLIP-L-like 32 wide, bigG-like 48 wide with a 40-wide projection) -> context 80,
    # text_time with 8-wide size embeddings, 3 levels with no attention at the first, depth [0, 1, 2] (mid 2),
    # layers_per_block as a per-level list, 16-wide heads.
    "sdxl_two_towers": ("sdxl", "eps", (24, 16), dict(
        sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=[1, 1, 1], cross_attention_dim=80,
        attention_head_dim=(2, 4, 4), use_linear_projection=True, transformer_layers_per_block=[0, 1, 2],
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=40 + 6 * 8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
        dict(block_out_channels=(32, 64), layers_per_block=1, scaling_factor=0.13025),
        [(_text("quick_gelu", 32, 2, 2, 64), EOS), (_text("gelu", 48, 2, 4, 128, projection_dim=40), OPENCLIP_PAD)]),
}


def _jitter(module):
    with torch.no_grad():  # default inits leave tensors at exactly 0/1; move every weight off them
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return module.eval()


def _tokenizer(root, pad):
    write_tokenizer(root, pad)  # our bundled BPE in transformers' format: no network
    return transformers.CLIPTokenizer.from_pretrained(str(root))


def build_folder(name, root):
    """The case's diffusers pipeline with random weights, written by ``save_pretrained`` to ``root/name``."""
    family, prediction, _, unet_kw, vae_kw, towers = CASES[name]
    torch.manual_seed(sum(map(ord, name)))
    unet = _jitter(diffusers.UNet2DConditionModel(**unet_kw))
    vae = _jitter(diffusers.AutoencoderKL(latent_channels=4, down_block_types=("DownEncoderBlock2D",) * len(
        vae_kw["block_out_channels"]), up_block_types=("UpDecoderBlock2D",) * len(vae_kw["block_out_channels"]),
        **vae_kw))
    parts = {}
    for i, (text_kw, pad) in enumerate(towers):
        suffix = "_2" if i else ""
        config = transformers.CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                                             eos_token_id=49407, pad_token_id=1, **text_kw)
        cls = transformers.CLIPTextModelWithProjection if i else transformers.CLIPTextModel
        parts["text_encoder" + suffix] = _jitter(cls(config))
        parts["tokenizer" + suffix] = _tokenizer(root / f"{name}-tokenizer{suffix}", pad)
    kind = "v_prediction" if prediction == "v" else "epsilon"
    scheduler = diffusers.EulerDiscreteScheduler(**SCHEDULE, prediction_type=kind)
    if family == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline(vae=vae, unet=unet, scheduler=scheduler, **parts)
    else:
        pipe = diffusers.StableDiffusionPipeline(vae=vae, unet=unet, scheduler=scheduler, safety_checker=None,
                                                 feature_extractor=None, requires_safety_checker=False, **parts)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(str(root / name))
    return root / name, pipe


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead, and a shared 2-core machine oversubscribes
    yield tmp_path_factory.mktemp("any-size")
    torch.set_num_threads(threads)


def _ours(pipe, size):
    width, height = size
    return pipe.generate(PROMPT, NEGATIVE, steps=STEPS, guidance=GUIDANCE, seed=SEED, sampler="euler",
                         schedule="normal", width=width, height=height).pixels


def _theirs(pipe, size):
    width, height = size
    return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE, width=width,
                height=height, output_type="np", generator=torch.Generator().manual_seed(SEED)).images


def _text_configs(pipe):
    # a diffusers-style SD2 tower lacks its last layer (removed_layers); the single file restores it
    return [dataclasses.replace(e.model.config, layers=e.model.config.layers + e.removed_layers)
            for e in pipe.text_encoder.encoders]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_off_preset_folder_matches_diffusers_and_converts(name, root):
    family, prediction, size, unet_kw, vae_kw, towers = CASES[name]
    folder, ref = build_folder(name, root)
    ours = Pipeline.from_pretrained(folder)
    assert (ours.family, ours.prediction) == (family, prediction)
    assert ours.unet.config.context_dim == unet_kw["cross_attention_dim"]
    # diffusers' default size: sample_size x the VAE's downsampling; the tokenizers pad as the family's recipes
    assert ours.default_size == unet_kw["sample_size"] * 2 ** (len(vae_kw["block_out_channels"]) - 1)
    assert tokenizer_pad_notes(folder, family, ours.text_encoder.encoders) == ()
    assert describe_folder(folder)["family"] == family  # `info` agrees
    got, expected = _ours(ours, size), _theirs(ref, size)
    assert got.shape == expected.shape == (1, size[1], size[0], 3)
    diff = float(np.abs(got - expected).max())
    print(f"{name}: max abs pixel difference {diff:.2e}")
    assert diff <= TOL, f"{name}: max abs pixel difference {diff} > {TOL}"
    assert expected.std() > 0.02  # not vacuous: the random model draws a structured image, not a flat one

    single = convert(folder, root / f"{name}.safetensors")
    back = Pipeline.from_file(single)
    assert (back.family, back.prediction, back.default_size) == (family, prediction, ours.default_size)
    assert back.unet.config == ours.unet.config and back.vae.config == ours.vae.config
    assert _text_configs(back) == _text_configs(ours)
    np.testing.assert_allclose(_ours(back, size), got, rtol=0, atol=1e-5)


# --- the configs alone: cheap checks of many more variations -----------------------------------------------------

_CROSS, _PLAIN, _CROSS_UP, _PLAIN_UP = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"
UNET_VARIANTS = {
    "one_level": dict(block_out_channels=(32,), layers_per_block=3, cross_attention_dim=16, attention_head_dim=2,
                      down_block_types=(_CROSS,), up_block_types=(_CROSS_UP,)),
    "four_levels_mixed": dict(block_out_channels=(16, 32, 32, 64), layers_per_block=1, cross_attention_dim=24,
                              attention_head_dim=(2, 4, 4, 8), norm_num_groups=16,
                              down_block_types=(_PLAIN, _CROSS, _PLAIN, _CROSS),
                              up_block_types=(_CROSS_UP, _PLAIN_UP, _CROSS_UP, _PLAIN_UP)),
    "deep_middle_plain_last": dict(block_out_channels=(32, 64), layers_per_block=[2, 2], cross_attention_dim=8,
                                   attention_head_dim=(4, 4), transformer_layers_per_block=[3, 4],
                                   use_linear_projection=True, down_block_types=(_CROSS, _PLAIN),
                                   up_block_types=(_PLAIN_UP, _CROSS_UP)),
    "head_count_kept": dict(block_out_channels=(32, 64, 96), layers_per_block=1, cross_attention_dim=12,
                            attention_head_dim=[4, 4, 4], down_block_types=(_CROSS, _CROSS, _PLAIN),
                            up_block_types=(_PLAIN_UP, _CROSS_UP, _CROSS_UP)),
    "xl_like_wide_y": dict(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=40,
                           attention_head_dim=(1, 2), use_linear_projection=True, transformer_layers_per_block=(1, 3),
                           addition_embed_type="text_time", addition_time_embed_dim=4,
                           projection_class_embeddings_input_dim=24 + 6 * 4, down_block_types=(_PLAIN, _CROSS),
                           up_block_types=(_CROSS_UP, _PLAIN_UP)),
}
VAE_VARIANTS = [dict(block_out_channels=(32,), layers_per_block=1), dict(block_out_channels=(8, 16, 16, 32),
                layers_per_block=3, norm_num_groups=8, scaling_factor=0.5), dict(block_out_channels=(32, 64, 64),
                layers_per_block=2, norm_num_groups=16)]  # fmt: skip


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("name", list(UNET_VARIANTS))
def test_unet_variant_builds_the_same_model_as_diffusers(name):
    """diffusers' model on the meta device (no memory, no time), renamed, has exactly our model's keys and shapes."""
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel(**UNET_VARIANTS[name])
    config = unet_config_from_diffusers(dict(theirs.config))
    assert _shapes(unet_diffusers_to_ldm(theirs.state_dict(), config)) == _shapes(
        UNetModel(config, device="meta").state_dict())


@pytest.mark.parametrize("kwargs", VAE_VARIANTS)
def test_vae_variant_builds_the_same_model_as_diffusers(kwargs):
    n = len(kwargs["block_out_channels"])
    with torch.device("meta"):
        theirs = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n,
                                         up_block_types=("UpDecoderBlock2D",) * n, **kwargs)
    config = vae_config_from_diffusers(dict(theirs.config))
    assert config.scale_factor == kwargs.get("scaling_factor", 0.18215) and config.downsample_factor == 2 ** (n - 1)
    assert _shapes(vae_diffusers_to_ldm(theirs.state_dict(), config)) == _shapes(
        AutoencoderKL(config, device="meta").state_dict())


@pytest.mark.parametrize("change,key", [
    (dict(layers_per_block=[2, 1]), "layers_per_block"),  # one num_res_blocks in the LDM UNet
    (dict(attention_head_dim=[2, 8]), "attention_head_dim"),  # neither a fixed count nor a fixed width
    (dict(num_class_embeds=10), "num_class_embeds"),
    (dict(block_out_channels=(32, 48)), "block_out_channels"),  # LDM levels are multiples of the first
    (dict(transformer_layers_per_block=[[1], [1]]), "transformer_layers_per_block"),
    (dict(mid_block_type="UNetMidBlock2D"), "mid_block_type"),
])
def test_variations_our_unet_cannot_build_are_refused_by_key(change, key):
    base = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=(2, 4),
                down_block_types=(_CROSS, _CROSS), up_block_types=(_CROSS_UP, _CROSS_UP))
    with pytest.raises(ClipDiffusionError, match=key):
        unet_config_from_diffusers(dict(base, **change))


def test_vae_latent_normalisation_is_refused():
    with pytest.raises(ClipDiffusionError, match="latents_mean"):
        vae_config_from_diffusers({"block_out_channels": [32], "latents_mean": [0.0] * 4})


def _tower(width, act="quick_gelu"):
    return {"hidden_size": width, "hidden_act": act}


def test_family_comes_from_the_structure_not_the_widths():
    unet = {"cross_attention_dim": 32}
    assert family_from_diffusers(unet, False, text_configs={"text_encoder": _tower(32)}) == "sd1"
    assert family_from_diffusers(unet, False, text_configs={"text_encoder": {"hidden_size": 32}}) == "sd1"
    assert family_from_diffusers(unet, False, text_configs={"text_encoder": _tower(32, "gelu")}) == "sd2"
    xl = {"cross_attention_dim": 80, "addition_embed_type": "text_time"}
    assert family_from_diffusers(xl, True, text_configs={"text_encoder": _tower(32),
                                                         "text_encoder_2": _tower(48, "gelu")}) == "sdxl"
    # the public widths need no text configs (and a public model is still recognised with them)
    assert family_from_diffusers({"cross_attention_dim": 1024}, False) == "sd2"
    assert family_from_diffusers({"cross_attention_dim": 768}, False,
                                 text_configs={"text_encoder": _tower(768)}) == "sd1"


@pytest.mark.parametrize("unet,towers,words", [
    ({"cross_attention_dim": 48, "addition_embed_type": "text_time"}, {"text_encoder_2": _tower(48, "gelu")},
     ["SDXL refiner is not supported"]),
    ({"cross_attention_dim": 32, "in_channels": 8}, {"text_encoder": _tower(32)}, ["in_channels=8", "pix2pix"]),
    ({"cross_attention_dim": 64}, {"text_encoder": _tower(32), "text_encoder_2": _tower(32)},
     ["unknown model family", "text_encoder_2"]),
    ({"cross_attention_dim": 32, "addition_embed_type": "text_time"}, {"text_encoder": _tower(32)},
     ["unknown model family"]),
    ({"cross_attention_dim": 32}, {}, ["unknown model family", "text encoders: none"]),
    ({"cross_attention_dim": 40}, {"text_encoder": _tower(32)}, ["cross_attention_dim=40", "hidden_size 32"]),
    ({"cross_attention_dim": 32}, {"text_encoder": _tower(32, ["gelu"])}, ["text_encoder/config.json",
                                                                           "hidden_act=['gelu']"]),
])
def test_structures_we_do_not_run_are_refused(unet, towers, words):
    with pytest.raises(CheckpointError) as info:
        family_from_diffusers(unet, "text_encoder_2" in towers, path="f", text_configs=towers)
    assert all(word in str(info.value) for word in words), str(info.value)


def test_folder_refusals_come_before_any_weights_are_read(tmp_path):
    """Configs only (no weight files): the refusals need nothing else."""
    import json

    def folder(name, unet, vae=None, towers=("text_encoder",), kind="StableDiffusionPipeline"):
        root = tmp_path / name
        files = {"model_index.json": {"_class_name": kind}, "unet/config.json": dict(
            block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
            down_block_types=[_CROSS, _PLAIN], up_block_types=[_PLAIN_UP, _CROSS_UP], **unet),
            "vae/config.json": dict(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                                    up_block_types=["UpDecoderBlock2D"] * 2, **(vae or {}))}  # fmt: skip
        files.update({f"{sub}/config.json": dict(_tower(32), num_hidden_layers=2, num_attention_heads=4)
                      for sub in towers})  # fmt: skip
        for rel, data in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(json.dumps(data))
        return root

    with pytest.raises(CheckpointError, match="in_channels=8"):
        load_diffusers(folder("pix2pix", {"in_channels": 8}))
    with pytest.raises(CheckpointError, match="SDXL refiner"):
        load_diffusers(folder("refiner", {"addition_embed_type": "text_time", "projection_class_embeddings_input_dim":
                                          32 + 6 * 8, "addition_time_embed_dim": 8},
                              towers=("text_encoder_2",), kind="StableDiffusionXLPipeline"))
    with pytest.raises(CheckpointError, match="latent_channels=8"):
        load_diffusers(folder("latents", {}, {"latent_channels": 8}))
    small_vocab = folder("small-vocab", {})
    config = json.loads((small_vocab / "text_encoder" / "config.json").read_text())
    (small_vocab / "text_encoder" / "config.json").write_text(json.dumps(dict(config, vocab_size=1000)))
    with pytest.raises(CheckpointError, match="vocab_size=1000: smaller than CLIP's 49408"):
        load_diffusers(small_vocab)  # a tiny test tokenizer's vocabulary: refused at load, not at the first prompt
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model"):  # the configs pass: weights are next
        load_diffusers(folder("fine", {}))


def test_a_tokenizer_that_pads_otherwise_is_noted(tmp_path):
    from types import SimpleNamespace

    write_tokenizer(tmp_path / "tokenizer", OPENCLIP_PAD)
    sd1 = [SimpleNamespace(name="clip_l", pad_id=49407)]
    (note,) = tokenizer_pad_notes(tmp_path, "sd1", sd1)
    assert "'!' (id 0)" in note and "49407" in note
    assert tokenizer_pad_notes(tmp_path, "sd2", [SimpleNamespace(name="clip_h", pad_id=0)]) == ()
    (tmp_path / "tokenizer" / "tokenizer_config.json").write_text("{broken")
    assert tokenizer_pad_notes(tmp_path, "sd1", sd1) == ()  # the tokenizer is never read otherwise
