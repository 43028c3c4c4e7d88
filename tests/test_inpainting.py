"""Inpainting (issue 20): masks on ordinary models as A1111 does them, 9-channel inpainting checkpoints, the CLI
and the A1111 route.

- The helpers (mask blur, crop region, resize modes, fill) against hand-computed geometry and A1111's rules.
- Masked img2img on the embedded trained tiny model: before the final overlay, the decoded pixels away from the
  mask are within the VAE's round-trip error of the original (measured on the same image), while the masked area
  is repainted; after the overlay they are the original exactly.
- The final latents outside the latent mask equal the init latents exactly (the per-call and final blends).
- Invert, each fill mode (checked on the start latents: "latent noise" is the seed's noise, "latent nothing" is 0),
  "only masked" crop and paste-back geometry, resize modes.
- 9-channel parity: our path against diffusers' StableDiffusionInpaintPipeline on identical tiny random weights
  (Euler, "linspace" spacing, strength 0.5 and 0.75, blend off as diffusers has it). Tolerance 1e-3 in pixel
  values inside the mask (measured 6.2e-6 and 4.2e-6); outside it ours is the original (the overlay), to 1e-6
  (measured 3e-8). Round trip on the embedded model (64 px, mask the centre 32 px): the VAE's own error away from
  the mask is at most 0.227, the inpainted raw decode's 0.199; inside the mask 0.045 mean against 0.003.
- Detection and loading of 9-channel single files and diffusers folders; SDXL-layout 9-channel UNet runs.
- CLI `generate --init-image --mask` and the A1111 img2img route with webuiapi's `mask_image`, hostile masks.
"""

import base64
import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from clipdiffusion import inpaint
from clipdiffusion.pipeline import Pipeline
from clipdiffusion.request import RequestError
from clipdiffusion.testing import tiny_pipeline

SIZE = 32


def _noise_image(size=(SIZE, SIZE), seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _box_mask(size, box):
    m = np.zeros((size[1], size[0]), np.uint8)
    x1, y1, x2, y2 = box
    m[y1:y2, x1:x2] = 255
    return Image.fromarray(m, "L")


# -- helpers -------------------------------------------------------------------------------------------------


def test_blur_kernel_rule_and_profile():
    assert [inpaint.kernel_size(s) for s in (1, 2, 4, 8, 64)] == [7, 11, 21, 41, 321]  # 2 * int(2.5 s + 0.5) + 1
    impulse = np.zeros((41, 41), np.uint8)
    impulse[20, 20] = 255
    out = np.asarray(inpaint.blur_mask(Image.fromarray(impulse), 4, 0), dtype=np.float64)
    k = inpaint._gaussian(4)
    assert len(k) == 21
    np.testing.assert_allclose(out[20, 10:31], 255 * k, atol=0.5 + 1e-9)  # along the row only
    assert out[19].max() == 0 and out[21].max() == 0
    both = np.asarray(inpaint.blur_mask(Image.fromarray(impulse), 2, 3), dtype=np.float64)
    ky, kx = inpaint._gaussian(3), inpaint._gaussian(2)
    expected = 255 * np.outer(np.pad(ky, (41 - len(ky)) // 2), np.pad(kx, (41 - len(kx)) // 2))
    assert np.abs(both - expected).max() <= 1.0  # rounded to 8 bits after each pass
    # reflect-101 border: a white edge column stays symmetric, no darkening from a zero border
    edge = np.zeros((8, 16), np.uint8)
    edge[:, :4] = 255
    blurred = np.asarray(inpaint.blur_mask(Image.fromarray(edge), 1, 0))
    assert blurred[:, 0].min() == 255 and blurred[0, 3] < 255 and blurred[0, 4] > 0


def test_binary_mask_reads_alpha_or_luminance():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (0, 0, 0, 200))
    rgba.putpixel((2, 2), (255, 255, 255, 100))
    m = np.asarray(inpaint.binary_mask(rgba))
    assert m[1, 1] == 255 and m[2, 2] == 0 and m[0, 0] == 0  # alpha rounded at 128, colour ignored
    opaque = Image.new("RGBA", (4, 4), (255, 255, 255, 255))
    assert np.asarray(inpaint.binary_mask(opaque)).min() == 255  # all opaque: its luminance
    assert np.asarray(inpaint.binary_mask(Image.new("RGB", (2, 2), (255, 0, 0)))).max() == 76  # L of red


def test_crop_region_and_aspect_expansion():
    mask = _box_mask((100, 80), (10, 20, 30, 28))
    assert inpaint.crop_region(mask, 0) == (10, 20, 30, 28)
    assert inpaint.crop_region(mask, 4) == (6, 16, 34, 32)
    assert inpaint.crop_region(Image.new("L", (8, 8)), 4) is None
    # 28 x 16 widened to 1:1: 12 more rows, 6 above and 6 below
    assert inpaint.expand_crop_region((6, 16, 34, 32), 64, 64, 100, 80) == (6, 10, 34, 38)
    # against the bottom edge: shifted up, never out of the image
    assert inpaint.expand_crop_region((6, 70, 34, 80), 64, 64, 100, 80) == (6, 52, 34, 80)
    # tall region, wide request: grows sideways, clamped at the left edge
    assert inpaint.expand_crop_region((0, 0, 10, 40), 64, 32, 100, 80) == (0, 0, 80, 40)


def test_resize_modes_geometry():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue, right half red
    just = inpaint.resize_image(0, image, 16, 16)
    crop = inpaint.resize_image(1, image, 16, 16)  # scaled to 32x16, centre 16 columns kept
    fill = inpaint.resize_image(2, image, 16, 16)  # scaled to 16x8, centred, rows above/below stretched
    assert just.size == crop.size == fill.size == (16, 16)
    assert crop.getpixel((0, 0))[2] > 200 and crop.getpixel((15, 15))[0] > 200
    assert fill.getpixel((0, 0)) == fill.getpixel((0, 4)) and fill.getpixel((15, 15)) == fill.getpixel((15, 11))
    assert fill.getpixel((0, 0))[2] > 200 and fill.getpixel((15, 0))[0] > 200


def test_fill_mode_paints_the_hole_with_its_surroundings():
    image = Image.new("RGB", (32, 32), (200, 40, 40))
    image.paste((0, 0, 255), (10, 10, 22, 22))
    filled = np.asarray(inpaint.fill_masked(image, _box_mask((32, 32), (10, 10, 22, 22))), dtype=np.int32)
    assert np.abs(filled[16, 16] - [200, 40, 40]).max() <= 2  # the blue hole now holds the red around it
    assert (filled[0, 0] == [200, 40, 40]).all()


# -- ordinary (4-channel) models ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return tiny_pipeline(0)


@pytest.fixture(scope="module")
def trained():
    return Pipeline.default()


@pytest.mark.slow  # loads the embedded model (~12 s)
def test_unmasked_pixels_within_the_vae_round_trip_error(trained, monkeypatch):
    """Before the overlay: the latents outside the mask are the init latents at every step, so the decoded pixels
    there are the VAE's reconstruction of the original. Measured: the round trip's error, and the inpainted
    image's error away from the mask (2 latent pixels of margin for the decoder's reach), on the same image."""
    size = trained.default_size
    init = trained.generate("a red circle", steps=8, seed=3).image
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    mask = _box_mask((size, size), box)
    away = np.ones((size, size), bool)
    margin = 2 * trained.latent_factor
    away[box[1] - margin:box[3] + margin, box[0] - margin:box[2] + margin] = False
    original = np.asarray(init, dtype=np.float32) / 255.0
    with torch.no_grad():
        z = trained.vae.encode(inpaint.to_pixels(init)).mode()
        round_trip = (trained.vae.decode(z).clamp(-1, 1)[0].permute(1, 2, 0).numpy() + 1) / 2
    vae_error = np.abs(round_trip - original)[away].max()
    monkeypatch.setattr(inpaint, "composite_pixels", lambda pixels, init: pixels)  # the raw decode
    raw = trained.generate("a large green triangle in the center", steps=8, seed=5, init_image=init, mask=mask,
                           mask_blur=0,
                           inpainting_fill=1, inpaint_full_res=False, strength=1.0).pixels[0]
    monkeypatch.undo()
    # the posterior sample (not its mode) was decoded: allow the sample's spread on top of the round trip
    assert np.abs(raw - original)[away].max() <= vae_error + 0.05, (np.abs(raw - original)[away].max(), vae_error)
    inside = np.asarray(mask) > 0  # repainted: the asked triangle sits in the masked centre
    assert np.abs(raw - original)[inside].mean() > max(0.02, 5 * np.abs(round_trip - original)[inside].mean())
    final = trained.generate("a large green triangle in the center", steps=8, seed=5, init_image=init, mask=mask,
                             mask_blur=0,
                             inpainting_fill=1, inpaint_full_res=False, strength=1.0)
    unmasked = np.asarray(mask) == 0
    assert np.abs(final.pixels[0] - original)[unmasked].max() < 1e-6  # the overlay puts the original back
    assert np.array_equal(np.asarray(final.image)[unmasked], np.asarray(init)[unmasked])


def test_invert_equals_the_inverted_mask(tiny):
    init, mask = _noise_image(), _box_mask((SIZE, SIZE), (4, 6, 20, 18))
    inverted = Image.fromarray(255 - np.asarray(mask), "L")
    common = dict(steps=2, seed=7, init_image=init, inpaint_full_res=False)
    a = tiny.generate("x", mask=mask, inpainting_mask_invert=1, **common)
    b = tiny.generate("x", mask=inverted, **common)
    assert np.array_equal(a.pixels, b.pixels)
    assert "Mask mode: Inpaint not masked" in a.infotexts[0] and "Mask mode" not in b.infotexts[0]
    # and inverting changes which pixels are kept
    plain = tiny.generate("x", mask=mask, mask_blur=0, **common)
    kept = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(plain.image)[kept], np.asarray(init)[kept])
    assert not np.array_equal(np.asarray(a.image)[kept], np.asarray(init)[kept])


@pytest.mark.parametrize("fill", [0, 1, 2, 3])
def test_fill_modes_start_latents(tiny, fill):
    init, mask = _noise_image(), _box_mask((SIZE, SIZE), (8, 8, 24, 24))
    from clipdiffusion.request import GenerationRequest

    request = GenerationRequest(init_image=init, mask=mask, mask_blur=0, inpainting_fill=fill,
                                inpaint_full_res=False, seed=11, width=SIZE, height=SIZE)
    prepared = inpaint.prepare_init(request, SIZE, SIZE)
    sigmas = torch.linspace(10, 0, 5)
    x, left, z, nmask, c_concat = tiny._inpaint_start([torch.Generator().manual_seed(11)], sigmas, SIZE, SIZE,
                                                      prepared, 0.5, "cpu")
    assert c_concat is None and len(left) == 3 and left[0] == sigmas[2]
    g = torch.Generator().manual_seed(11)  # what the generator draws: the posterior sample, then the noise
    posterior = tiny.vae.encode(inpaint.to_pixels(prepared.image))
    sample = posterior.sample(g).float() * tiny.vae.config.scale_factor
    noise = torch.randn(sample.shape, generator=g)
    inside, outside = nmask.bool().expand_as(z), ~nmask.bool().expand_as(z)
    assert nmask.sum() == 64 and torch.equal(z[outside], sample[outside])
    expected_inside = {0: sample, 1: sample, 2: noise, 3: torch.zeros_like(sample)}[fill]
    assert torch.allclose(z[inside], expected_inside[inside])
    assert torch.allclose(x, z + noise * sigmas[2])
    hole = np.asarray(prepared.image, dtype=np.float32)[8:24, 8:24]
    original = np.asarray(init, dtype=np.float32)[8:24, 8:24]
    assert (np.abs(hole - original).mean() > 30) == (fill == 0)  # only "fill" repaints the pixels first


def test_final_latents_outside_the_mask_are_the_init_latents(tiny):
    """A1111's blend: outside the (latent) mask the sampled latents end exactly at the init latents."""
    from clipdiffusion.request import GenerationRequest

    init, mask = _noise_image(), _box_mask((SIZE, SIZE), (8, 8, 24, 24))
    fields = dict(init_image=init, mask=mask, mask_blur=0, inpainting_fill=1, inpaint_full_res=False, seed=9,
                  width=SIZE, height=SIZE, steps=4, strength=0.75)
    result = tiny.generate(GenerationRequest(**fields))
    prepared = inpaint.prepare_init(GenerationRequest(**fields), SIZE, SIZE)
    sigmas = torch.linspace(10, 0, 5)  # only the draws matter here: the same generator, the same z
    _, _, z, nmask, _ = tiny._inpaint_start([torch.Generator().manual_seed(9)], sigmas, SIZE, SIZE, prepared, 0.75,
                                            "cpu")
    outside = ~nmask.bool().expand_as(z)
    assert torch.equal(result.latents[outside], z[outside])
    assert (result.latents[~outside] - z[~outside]).abs().mean() > 0.1  # the inside was sampled


def test_full_res_crops_the_mask_and_pastes_back(tiny):
    init = _noise_image((48, 40), seed=1)
    mask = _box_mask((48, 40), (30, 4, 38, 12))
    result = tiny.generate("x", steps=2, seed=3, init_image=init, mask=mask, width=16, height=16, mask_blur=0,
                           inpaint_full_res=True, inpaint_full_res_padding=2)
    assert result.image.size == (48, 40)  # the whole original, as A1111 returns it
    out, original = np.asarray(result.image).astype(int), np.asarray(init).astype(int)
    changed = np.argwhere(np.abs(out - original).max(axis=2) > 0)
    # the crop: (28, 2, 40, 14) is already square, so the changes lie in the mask, pasted where it was
    assert changed.size and changed[:, 1].min() >= 30 and changed[:, 1].max() < 38
    assert changed[:, 0].min() >= 4 and changed[:, 0].max() < 12
    assert "Inpaint area: Only masked, Masked area padding: 2" in result.infotexts[0]
    prepared = inpaint.prepare_init(result_request(init, mask, padding=2), 16, 16)
    assert prepared.paste_to == (28, 2, 12, 12) and prepared.image.size == (16, 16)
    blank = tiny.generate("x", steps=2, seed=3, init_image=init, mask=Image.new("L", (48, 40)), width=16,
                          height=16, inpaint_full_res=True)
    assert blank.image.size == (16, 16) and any("blank" in note for note in blank.notes)


def result_request(init, mask, padding):
    from clipdiffusion.request import GenerationRequest

    return GenerationRequest(init_image=init, mask=mask, mask_blur=0, inpaint_full_res=True,
                             inpaint_full_res_padding=padding, width=16, height=16)


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_resize_modes_run(tiny, mode):
    init = _noise_image((40, 24), seed=2)
    result = tiny.generate("x", steps=2, seed=1, init_image=init, width=SIZE, height=SIZE, resize_mode=mode)
    assert result.image.size == (SIZE, SIZE)
    masked = tiny.generate("x", steps=2, seed=1, init_image=init, width=SIZE, height=SIZE, resize_mode=mode,
                           mask=_box_mask((40, 24), (5, 5, 20, 20)), inpaint_full_res=False)
    assert masked.image.size == (SIZE, SIZE)


def test_mask_of_another_size_is_resized_with_a_note(tiny):
    init = _noise_image()
    result = tiny.generate("x", steps=2, seed=1, init_image=init, mask=_box_mask((64, 64), (8, 8, 40, 40)),
                           inpaint_full_res=False)
    assert any("64x64 resized" in note for note in result.notes)


def test_request_checks_name_the_mask_fields():
    from clipdiffusion.request import GenerationRequest

    image = Image.new("RGB", (8, 8))
    for field, value in (("mask_blur", 65), ("mask_blur_x", -1), ("inpainting_fill", 4), ("resize_mode", 5),
                         ("inpaint_full_res_padding", 300)):
        with pytest.raises(RequestError) as info:
            GenerationRequest(init_image=image, mask=image, **{field: value})
        assert info.value.field == field
    with pytest.raises(RequestError, match="init_image"):
        GenerationRequest(mask=image)
    with pytest.raises(RequestError) as info:
        GenerationRequest(init_image=image, mask="not an image")
    assert info.value.field == "mask"


# -- 9-channel inpainting models ------------------------------------------------------------------------------


def _nine_channel(family="sd1", seed=1):
    from clipdiffusion.diffusion import unet as U

    pipe = tiny_pipeline(0, family=family)
    config = dataclasses.replace(pipe.unet.config, in_channels=9)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    pipe.unet = U.UNetModel(config).eval()
    torch.random.set_rng_state(state)
    return pipe


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_nine_channel_model_runs_txt2img_and_masked_img2img(family):
    pipe = _nine_channel(family)
    assert inpaint.is_inpainting_unet(pipe.unet.config)
    seen = []
    inner = pipe.unet.forward

    def spy(x, *args, **kwargs):
        seen.append(x[:, 4:].clone())
        return inner(x, *args, **kwargs)

    pipe.unet.forward = spy
    txt = pipe.generate("x", steps=2, seed=1)
    assert txt.image.size == (SIZE, SIZE) and torch.equal(seen[0][:, 0], torch.ones_like(seen[0][:, 0]))
    seen.clear()
    mask = _box_mask((SIZE, SIZE), (0, 0, 16, SIZE))
    img = pipe.generate("x", steps=2, seed=1, init_image=_noise_image(), mask=mask, mask_blur=0,
                        inpaint_full_res=False)
    assert img.image.size == (SIZE, SIZE)
    channel = seen[0][0, 0]  # the mask at latent size: left half 1
    assert channel[:, :8].min() == 1 and channel[:, 8:].max() == 0


@pytest.mark.slow  # diffusers' pipeline, ~30 s on 2 shared cores
def test_nine_channel_parity_with_diffusers_inpaint_pipeline():
    diffusers = pytest.importorskip("diffusers")
    from test_generate_parity import SD_SCHEDULE, _jitter, _ours_from_diffusers

    size = 16
    torch.manual_seed(0)
    unet = _jitter(diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=9, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        cross_attention_dim=32, attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")))
    vae, our_unet, our_vae = _ours_from_diffusers(diffusers, unet)
    ours = Pipeline(tiny_pipeline(0).text_encoder, our_unet, our_vae, "sd1", "eps", default_size=size)
    ours.blend_inpainting_models = False  # diffusers does not blend for 9-channel UNets
    sched = diffusers.EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="linspace")
    ref = diffusers.StableDiffusionInpaintPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    image = _noise_image((size, size))
    mask = _box_mask((size, size), (2, 4, 10, 12))
    inside = np.asarray(mask) > 0
    cond = ours.text_encoder.encode("a red circle", "blurry")
    for strength in (0.5, 0.75):
        got = ours.generate("a red circle", "blurry", steps=4, strength=strength, seed=4, guidance=6.0,
                            init_image=image, mask=mask, mask_blur=0, inpainting_fill=1, inpaint_full_res=False)
        expected = ref(**cond.to_diffusers(), image=image, mask_image=mask, strength=strength, num_inference_steps=4,
                       guidance_scale=6.0, output_type="np", generator=torch.Generator().manual_seed(4)).images[0]
        assert np.abs(got.pixels[0] - expected)[inside].max() < 1e-3
        assert np.abs(got.pixels[0] - np.asarray(image) / 255.0)[~inside].max() < 1e-6
        other = ours.generate("a red circle", "blurry", steps=4, strength=strength, seed=5, guidance=6.0,
                              init_image=image, mask=mask, mask_blur=0, inpainting_fill=1, inpaint_full_res=False)
        assert np.abs(other.pixels[0] - expected)[inside].max() > 1e-2  # not vacuous


@pytest.mark.slow  # writes and loads two checkpoints (~8 s)
def test_nine_channel_checkpoints_are_detected_and_loaded(tmp_path):
    from test_detect import U, full_shapes

    from clipdiffusion.checkpoints.detect import detect_family
    from clipdiffusion.checkpoints.load import load_checkpoint, load_diffusers
    from clipdiffusion.checkpoints.save import save_checkpoint, save_diffusers

    fam = detect_family(full_shapes("sd1", **{U + "input_blocks.0.0.weight": (320, 9, 3, 3)}))
    assert fam.name == "sd1" and fam.in_channels == 9 and any("inpainting" in n for n in fam.notes)
    pipe = _nine_channel()
    save_checkpoint(pipe, tmp_path / "inpaint.safetensors")
    loaded = load_checkpoint(tmp_path / "inpaint.safetensors")
    assert loaded.unet.config.in_channels == 9 and torch.equal(
        loaded.unet.state_dict()["input_blocks.0.0.weight"], pipe.unet.state_dict()["input_blocks.0.0.weight"])
    folder = save_diffusers(pipe, tmp_path / "inpaint-folder")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionInpaintPipeline"}))
    again = load_diffusers(folder)
    assert again.unet.config.in_channels == 9
    a = Pipeline._from_loaded(again, "x").generate("x", steps=2, seed=1, width=SIZE, height=SIZE)
    b = pipe.generate("x", steps=2, seed=1, width=SIZE, height=SIZE)
    assert np.abs(a.pixels - b.pixels).max() < 1e-5


# -- CLI and server ------------------------------------------------------------------------------------------


@pytest.mark.slow  # four CLI runs (~6 s)
def test_cli_generate_with_a_mask(tmp_path, capsys):
    from clipdiffusion.checkpoints.save import save_checkpoint
    from clipdiffusion.cli import main
    from clipdiffusion.infotext import parse_infotext

    model = tmp_path / "tiny.safetensors"
    save_checkpoint(tiny_pipeline(0), model)
    init, mask = _noise_image(), _box_mask((SIZE, SIZE), (8, 8, 24, 24))
    init.save(tmp_path / "init.png")
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    args = ["generate", "x", "--model", str(model), "--steps", "2", "--seed", "3", "--init-image",
            str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"), "-o", str(out)]
    assert main(args + ["--mask-blur", "0", "--inpainting-fill", "original"]) == 0
    kept = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB"))[kept], np.asarray(init)[kept])
    assert main(args + ["--inpaint-full-res", "--inpaint-padding", "4", "--mask-invert"]) == 0
    text = Image.open(out).text["parameters"]
    assert "Inpaint area: Only masked" in text and "Mask mode: Inpaint not masked" in text
    assert parse_infotext(text).seed == 3
    capsys.readouterr()
    base = ["generate", "x", "--model", str(model), "--steps", "2", "-o", str(out)]
    assert main(base + ["--mask", str(tmp_path / "mask.png")]) == 2  # no --init-image
    assert "--mask" in capsys.readouterr().err
    (tmp_path / "junk.png").write_bytes(b"not an image")
    assert main(base + ["--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "junk.png")]) == 2
    assert "mask=" in capsys.readouterr().err


def _b64(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.slow  # a real server with the tiny engine (~8 s)
def test_a1111_img2img_mask_with_webuiapi_and_hostile_masks():
    import httpx
    import webuiapi
    from server_fixtures import ServerThread

    from clipdiffusion.server.app import create_app
    from clipdiffusion.server.settings import ModelEntry, ServerSettings

    settings = ServerSettings(models=(ModelEntry("tiny"),), max_width=64, max_height=64)
    init, mask = _noise_image(), _box_mask((SIZE, SIZE), (8, 8, 24, 24))
    with ServerThread(create_app(lambda name: tiny_pipeline(0), settings)) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
        result = api.img2img(images=[init], mask_image=mask, prompt="x", seed=2, steps=2, width=SIZE, height=SIZE,
                             mask_blur=0, inpainting_fill=1, inpaint_full_res=False, denoising_strength=0.9)
        kept = np.asarray(mask) == 0
        out = np.asarray(result.image.convert("RGB"))
        assert np.array_equal(out[kept], np.asarray(init)[kept]) and not np.array_equal(out, np.asarray(init))
        assert result.info["ignored_fields"] == []
        full = api.img2img(images=[init], mask_image=mask, prompt="x", seed=2, steps=2, width=16, height=16,
                           inpaint_full_res=True, inpaint_full_res_padding=4)
        assert full.image.size == (SIZE, SIZE) and "Only masked" in full.info["infotexts"][0]
        body = {"prompt": "x", "steps": 2, "width": SIZE, "height": SIZE, "init_images": [_b64(init)]}
        for bad, words in (("%%%", "base64"), (base64.b64encode(b"nope").decode(), "image")):
            r = client.post("/sdapi/v1/img2img", json={**body, "mask": bad})
            assert r.status_code == 422 and "mask" in r.text and words in r.text, r.text
        # a PNG header declaring 20000 x 20000 pixels: refused from the header, naming the field
        huge = _b64(Image.new("L", (1, 1)))
        raw = bytearray(base64.b64decode(huge))
        raw[16:24] = (20000).to_bytes(4, "big") * 2
        r = client.post("/sdapi/v1/img2img", json={**body, "mask": base64.b64encode(bytes(raw)).decode()})
        assert r.status_code == 422 and "mask" in r.text and "20000x20000" in r.text, r.text
        r = client.post("/sdapi/v1/img2img", json={**body, "mask": _b64(mask), "inpainting_fill": 7})
        assert r.status_code == 422 and "inpainting_fill" in r.text
        r = client.post("/sdapi/v1/img2img", json={**body, "mask": _b64(_box_mask((48, 48), (1, 1, 9, 9))),
                                                   "inpaint_full_res": False})
        assert r.status_code == 200, r.text
        assert any("48x48 resized" in note for note in json.loads(r.json()["info"])["notes"])
