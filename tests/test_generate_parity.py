"""Whole-generation parity with diffusers' StableDiffusionPipeline on identical tiny random weights.

diffusers' UNet and VAE are built tiny and random, converted to ours through the rename tables, and both sides get
identical conditioning (our Conditioning passed as prompt_embeds / negative_prompt_embeds) and the same seed.
Tolerance: 1e-3 in pixel values (output_type="np", range [0, 1]); measured differences are ~3e-6.

Scheduler alignment (what each diffusers scheduler needs to run the same sigmas as our sampler):
- euler / euler_a: Euler(Ancestral)DiscreteScheduler with timestep_spacing="linspace" equals our "normal" schedule
  when every linspace timestep is an integer (4 steps: 999, 666, 333, 0); use_karras_sigmas=True equals "karras".
  Their init_noise_sigma is sigma_max, as ours.
- heun: HeunDiscreteScheduler with "linspace" spacing (it interleaves the doubled timesteps itself).
- dpmpp_2m: DPMSolverMultistepScheduler (dpmsolver++, order 2) with our timesteps passed as custom `timesteps`.
- ddim: DDIMScheduler with "leading" spacing, steps_offset=1 and set_alpha_to_one=True equals our "ddim" schedule.
  With set_alpha_to_one=False (the SD scheduler config) diffusers stops at sigma(t=0) = 0.029 instead of 0: not
  aligned, by design (we end at 0 like A1111).
- img2img: StableDiffusionImg2ImgPipeline with the Euler "linspace" scheduler; both sample the VAE posterior and
  then the noise from the seed's generator, and run the last int(steps * strength) steps.
- VP-space schedulers (DPM-Solver, DDIM) start from unit-variance latents, which is sqrt(sigma^2 + 1) in sigma
  units; we start from sigma * noise (k-diffusion, A1111). The test hands diffusers the same start by passing
  latents = noise * sigma / sqrt(sigma^2 + 1).
"""

import math

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from clipdiffusion.checkpoints.diffusers_unet import unet_config_from_diffusers, unet_diffusers_to_ldm  # noqa: E402
from clipdiffusion.checkpoints.diffusers_vae import vae_config_from_diffusers, vae_diffusers_to_ldm  # noqa: E402
from clipdiffusion.diffusion.unet import UNetModel  # noqa: E402
from clipdiffusion.diffusion.vae import AutoencoderKL  # noqa: E402
from clipdiffusion.pipeline import Pipeline  # noqa: E402
from clipdiffusion.testing import tiny_pipeline  # noqa: E402

ATOL = 1e-3  # pixel values in [0, 1]
SIZE = 16  # pixels; 8x8 latents through the x2 tiny VAE
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _jitter(module):
    with torch.no_grad():  # default init leaves some tensors at exactly 0/1; move every weight off it
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return module.eval()


def _ours_from_diffusers(diffusers, unet):
    """A tiny random diffusers VAE beside ``unet``, and both converted to ours through the rename tables."""
    vae = _jitter(diffusers.AutoencoderKL(
        block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2))
    ucfg, vcfg = unet_config_from_diffusers(dict(unet.config)), vae_config_from_diffusers(dict(vae.config))
    our_unet = UNetModel(ucfg).eval()
    our_unet.load_state_dict(unet_diffusers_to_ldm(unet.state_dict(), ucfg), strict=True)
    our_vae = AutoencoderKL(vcfg).eval()
    our_vae.load_state_dict(vae_diffusers_to_ldm(vae.state_dict(), vcfg), strict=True)
    return vae, our_unet, our_vae



@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    unet = _jitter(diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")))
    vae, our_unet, our_vae = _ours_from_diffusers(diffusers, unet)
    text_encoder = tiny_pipeline(0).text_encoder
    return unet, vae, our_unet, our_vae, text_encoder


def _pipes(models, scheduler, prediction="eps"):
    unet, vae, our_unet, our_vae, text_encoder = models
    ref = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                            scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                            requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ours = Pipeline(text_encoder, our_unet, our_vae, "sd1", prediction, default_size=SIZE)
    return ref, ours


def _compare(models, scheduler, sampler, schedule, *, prediction="eps", steps=4, seed=3, vp_start=None,
             ref_kwargs=None):
    ref, ours = _pipes(models, scheduler, prediction)
    prompt, negative, guidance = "a red circle", "blurry", 6.0
    got = ours.generate(prompt, negative, steps=steps, seed=seed, sampler=sampler, schedule=schedule,
                        guidance=guidance, width=SIZE, height=SIZE)
    cond = ours.text_encoder.encode(prompt, negative)
    kwargs = dict(ref_kwargs or {})
    if vp_start is not None:  # start VP schedulers from our sigma-scaled noise (see the module docstring)
        noise = torch.randn((1, 4, SIZE // 2, SIZE // 2), generator=torch.Generator().manual_seed(seed))
        kwargs["latents"] = noise * vp_start / math.sqrt(vp_start**2 + 1)
    if "timesteps" not in kwargs:
        kwargs["num_inference_steps"] = steps
    expected = ref(**cond.to_diffusers(), guidance_scale=guidance, height=SIZE, width=SIZE, output_type="np",
                   generator=torch.Generator().manual_seed(seed), **kwargs).images
    assert np.abs(got.pixels - expected).max() < ATOL
    # and the comparison is not vacuous: another seed gives another image
    other = ours.generate(prompt, negative, steps=steps, seed=seed + 1, sampler=sampler, schedule=schedule,
                          guidance=guidance, width=SIZE, height=SIZE)
    assert np.abs(other.pixels - expected).max() > 10 * ATOL


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_euler_normal_matches_euler_discrete_linspace(models, prediction):
    kind = "epsilon" if prediction == "eps" else "v_prediction"
    sched = diffusers.EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="linspace", prediction_type=kind)
    _compare(models, sched, "euler", "normal", prediction=prediction)


def test_euler_karras_matches_euler_discrete_karras(models):
    sched = diffusers.EulerDiscreteScheduler(**SD_SCHEDULE, use_karras_sigmas=True)
    _compare(models, sched, "euler", "karras", steps=3)


def test_euler_ancestral_matches_including_the_step_noise(models):
    sched = diffusers.EulerAncestralDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="linspace")
    _compare(models, sched, "euler_a", "normal")


def test_dpmpp_2m_matches_dpm_solver_multistep(models):
    sched = diffusers.DPMSolverMultistepScheduler(**SD_SCHEDULE, algorithm_type="dpmsolver++", solver_order=2,
                                                  final_sigmas_type="zero")
    sigma_max = float(((1 - sched.alphas_cumprod[999]) / sched.alphas_cumprod[999]) ** 0.5)
    _compare(models, sched, "dpmpp_2m", "normal", vp_start=sigma_max, ref_kwargs={"timesteps": [999, 666, 333, 0]})


def test_ddim_matches_ddim_scheduler(models):
    sched = diffusers.DDIMScheduler(**SD_SCHEDULE, steps_offset=1, set_alpha_to_one=True, clip_sample=False,
                                    timestep_spacing="leading")
    sigma_start = float(((1 - sched.alphas_cumprod[751]) / sched.alphas_cumprod[751]) ** 0.5)  # first of 751..1
    _compare(models, sched, "ddim", "ddim", vp_start=sigma_start)


def test_heun_matches_heun_discrete(models):
    sched = diffusers.HeunDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="linspace")
    _compare(models, sched, "heun", "normal")


def test_sdxl_size_conditioning_matches_stable_diffusion_xl_pipeline():
    torch.manual_seed(1)
    unet = _jitter(diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8))
    vae, our_unet, our_vae = _ours_from_diffusers(diffusers, unet)
    ours = Pipeline(tiny_pipeline(0, "sdxl").text_encoder, our_unet, our_vae, "sdxl", "eps", default_size=SIZE)
    sched = diffusers.EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="linspace")
    ref = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                              tokenizer_2=None, unet=unet, scheduler=sched)
    ref.set_progress_bar_config(disable=True)
    width, height = 24, 16  # not square, so a swapped (h, w) would show
    got = ours.generate("a cat", "a dog", steps=4, seed=2, guidance=5.0, width=width, height=height)
    cond = ours.text_encoder.encode("a cat", "a dog")
    expected = ref(**cond.to_diffusers(), guidance_scale=5.0, width=width, height=height, num_inference_steps=4,
                   output_type="np", generator=torch.Generator().manual_seed(2)).images
    assert np.abs(got.pixels - expected).max() < ATOL


def test_img2img_matches_stable_diffusion_img2img_pipeline(models):
    from PIL import Image

    unet, vae, our_unet, our_vae, text_encoder = models
    sched = diffusers.EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="linspace")
    ref = diffusers.StableDiffusionImg2ImgPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ours = Pipeline(text_encoder, our_unet, our_vae, "sd1", "eps", default_size=SIZE)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    got = ours.generate("a red circle", "blurry", steps=4, strength=0.5, seed=4, guidance=6.0, init_image=image)
    cond = ours.text_encoder.encode("a red circle", "blurry")
    expected = ref(**cond.to_diffusers(), image=image, strength=0.5, num_inference_steps=4, guidance_scale=6.0,
                   output_type="np", generator=torch.Generator().manual_seed(4)).images
    assert np.abs(got.pixels - expected).max() < ATOL
