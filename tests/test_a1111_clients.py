"""Replays of what popular AUTOMATIC1111 clients send, written from their source, against the real server on the
tiny engine (random tiny SD1 weights, a real HTTP server on a loopback port). Every request must get a 200 with
A1111-shaped JSON, or an honest 4xx naming what is unsupported; never a 404 for a route A1111 has.

- AIYA (Kilvoctu/aiyabot, core/settings.py `check` and `populate_global_vars`, core/stablecog.py `dream`,
  core/upscalecog.py, core/viewhandler.py): polls /cmd-flags (a 404 is "API is unreachable", 401 "auth on"), then
  reads /samplers, /prompt-styles, /face-restorers, /embeddings, /hypernetworks, /upscalers, /sd-models, /loras;
  generates with `sampler_index`, `styles: [style or "None"]`, `override_settings.CLIP_stop_at_last_layers`, optional
  hires fix (`hr_scale` 1, `hr_second_pass_steps` = steps / 2, a float) and face restoration; reads each image's
  infotext back through /png-info; upscales with /extra-single-image; interrupts and skips.
- SillyTavern (src/endpoints/stable-diffusion.js, public/scripts/extensions/stable-diffusion/index.js
  `generateSDImage`): GET /options as its ping, /upscalers + /latent-upscale-modes merged, /sd-vae (and Forge's
  /sd-modules, whose failure it tolerates), /samplers, /schedulers, /sd-models, POST /options then /progress until
  idle, and a txt2img whose body is its own request body forwarded (so `url` and `auth` ride along) with
  `enable_hr`, `hr_*`, `denoising_strength`, `clip_skip` at the top level, `save_images: true`, `restore_faces`.
- The txt2img body A1111 v1.10's own API schema declares (`StableDiffusionTxt2ImgProcessingAPI`, every field at
  its default, as /docs shows it): nothing in it may be reported as ignored.
- webuiapi (the installed package): its listing helpers, `util_*` helpers, txt2img with styles, masked img2img,
  the extras.

Hires fix, masks and sampler names are built by other parts of issue 20; the requests that depend on them accept
either the feature (checked) or its honest absence (the field named in `ignored_fields`, or a 422 naming it).
"""

import base64
import io
import json

import httpx
import pytest
import webuiapi
from PIL import Image

from clipdiffusion.server.app import create_app
from clipdiffusion.server.settings import ModelEntry, ServerSettings
from server_fixtures import ServerThread

STYLES = ('name,prompt,negative_prompt\n'
          '"cinematic","cinematic still of {prompt}, film grain","cartoon"\n'
          '"sharp","sharp focus","blurry"\n')
SIZE = 32
HR_FIELDS = ("enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "denoising_strength", "hr_resize_x",
             "hr_resize_y", "hr_sampler_name", "hr_prompt", "hr_negative_prompt")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from clipdiffusion.testing import tiny_pipeline

    folder = tmp_path_factory.mktemp("a1111_clients")
    (folder / "styles.csv").write_text(STYLES)
    (folder / "out").mkdir()
    pipes = []

    def factory(name):
        pipes.append(tiny_pipeline(seed=0))
        return pipes[-1]

    settings = ServerSettings(models=(ModelEntry("tiny-sd15"),), max_width=64, max_height=64, max_steps=20,
                              styles_files=(str(folder / "styles.csv"),), save_dir=str(folder / "out"))
    with ServerThread(create_app(factory, settings)) as running:
        running.out = folder / "out"
        running.pipes = pipes
        yield running
    assert len(pipes) == 1  # one model, loaded once


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def b64png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def generation(r) -> tuple[list, dict]:
    """A txt2img/img2img answer in A1111's shape: (images, info)."""
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"images", "parameters", "info"} and isinstance(body["parameters"], dict)
    info = json.loads(body["info"])
    for key in ("prompt", "all_prompts", "seed", "all_seeds", "infotexts", "sampler_name", "width", "height",
                "styles", "clip_skip", "job_timestamp"):
        assert key in info, key
    return [decode(x) for x in body["images"]], info


def honest_refusal(r, *fields):
    """A 4xx (not 404) whose body names one of `fields`."""
    assert 400 <= r.status_code < 500 and r.status_code != 404, r.text
    assert any(f in r.text for f in fields), r.text


def hires_outcome(r, width, height, hr_scale):
    """Hires fix done (bigger image, A1111's infotext keys) or honestly not: `enable_hr` named as ignored, or a
    422 naming an hr field. Returns the images when there are some."""
    if r.status_code != 200:
        honest_refusal(r, *HR_FIELDS)
        return []
    images, info = generation(r)
    if "enable_hr" in info["ignored_fields"]:
        assert all(im.size == (width, height) for im in images)
    else:  # the hires-fix part of issue 20 is in: the image is the upscaled one and says so
        want = (int(width * hr_scale), int(height * hr_scale))  # A1111: hr_upscale_to_x = int(width * hr_scale)
        assert all(im.size == want for im in images), ([im.size for im in images], want)
        assert "Hires upscale" in info["infotexts"][0] or hr_scale == 1
    return images


# -- AIYA -----------------------------------------------------------------------------------------------------------


def test_aiya_startup(client):
    # settings.check: "lazy method to see if --api commandline argument is not set": 404 means no API
    r = client.get("/sdapi/v1/cmd-flags")
    assert r.status_code == 200 and isinstance(r.json(), dict) and r.json()["api"] is True
    # SD.Next probe: A1111 has no /sdapi/v1/version either (404 there too); AIYA catches the KeyError
    samplers = [s["name"] for s in client.get("/sdapi/v1/samplers").json()]
    style_names = {"None": ""}
    for s2 in client.get("/sdapi/v1/prompt-styles").json():
        style_names[s2["name"]] = s2["prompt"], s2["negative_prompt"]
    facefix = [s3["name"] for s3 in client.get("/sdapi/v1/face-restorers").json()]
    embeddings = client.get("/sdapi/v1/embeddings").json()
    shapes = {name: e["shape"] for key in ("loaded", "skipped") for name, e in embeddings[key].items()}
    hypernetworks = client.get("/sdapi/v1/hypernetworks").json()
    hyper_names = [s5["name"] for s5 in hypernetworks if isinstance(s5, dict) and "name" in s5]
    upscalers = [s6["name"] for s6 in client.get("/sdapi/v1/upscalers").json()]
    models = client.get("/sdapi/v1/sd-models").json()
    model_info = {m["title"]: (m["title"], m.get("name") or m["model_name"], m["hash"], m["filename"])
                  for m in models}
    loras = [s7["alias"] for s7 in client.get("/sdapi/v1/loras").json()]
    assert {"Euler a", "Euler", "DPM++ 2M"} <= set(samplers)
    assert style_names == {"None": "", "cinematic": ("cinematic still of {prompt}, film grain", "cartoon"),
                           "sharp": ("sharp focus", "blurry")}
    assert facefix == [] and hyper_names == [] and shapes == {} and loras == []
    assert upscalers == ["None", "Lanczos", "Nearest"]
    assert list(model_info) == ["tiny-sd15"] and model_info["tiny-sd15"][3] == "embedded"


def aiya_payload(**changes):
    """stablecog.dream's payload (its defaults: style "None", clip skip 1, no face fix, no hires)."""
    payload = {"prompt": "a red circle", "negative_prompt": "", "steps": 4, "width": SIZE, "height": SIZE,
               "cfg_scale": 7.0, "sampler_index": "Euler a", "seed": 11, "seed_resize_from_h": -1,
               "seed_resize_from_w": -1, "denoising_strength": None, "n_iter": 1, "batch_size": 2,
               "styles": ["None"], "override_settings": {"CLIP_stop_at_last_layers": 1}}
    payload.update(changes)
    return payload


def test_aiya_generation_and_png_info(client):
    # a model picked in the bot's models.csv: POST /options first
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sd15"})
    assert r.status_code == 200
    r = client.post("/sdapi/v1/txt2img", json=aiya_payload(styles=["cinematic"]))
    images, info = generation(r)
    assert [im.size for im in images] == [(SIZE, SIZE)] * 2 and info["all_seeds"] == [11, 12]
    assert info["all_prompts"][0] == "cinematic still of a red circle, film grain"
    assert info["all_negative_prompts"][0] == "cartoon" and info["styles"] == ["cinematic"]
    assert info["ignored_fields"] == []
    for i, b64 in enumerate(r.json()["images"]):
        png = client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + b64})
        assert png.status_code == 200
        text = png.json().get("info")
        assert f"Seed: {11 + i}" in text and text.startswith("cinematic still of a red circle")
    # the bot's default style "None" (A1111's no-style): generated unstyled, the name reported
    images, info = generation(client.post("/sdapi/v1/txt2img", json=aiya_payload(batch_size=1)))
    assert info["all_prompts"] == ["a red circle"] and info["ignored_fields"] == ["styles[0]"]
    assert "Style not found: None" in info["comments"]
    # face restoration: A1111 would run CodeFormer; we name both fields
    images, info = generation(client.post("/sdapi/v1/txt2img", json=aiya_payload(
        batch_size=1, restore_faces=True, override_settings={"CLIP_stop_at_last_layers": 2,
                                                             "face_restoration_model": "CodeFormer"})))
    assert info["ignored_fields"] == ["restore_faces", "styles[0]", "override_settings.face_restoration_model"]
    assert info["clip_skip"] == 2


def test_aiya_img2img(client):
    init = Image.new("RGB", (48, 40), (200, 30, 30))
    r = client.post("/sdapi/v1/img2img", json=aiya_payload(
        batch_size=1, init_images=["data:image/png;base64," + b64png(init)], denoising_strength=0.5))
    images, info = generation(r)
    assert images[0].size == (SIZE, SIZE) and info["denoising_strength"] == 0.5


def test_aiya_hires_fix(client):
    # highres_payload: hr_scale 1, hr_second_pass_steps int(steps) / 2 (a float in Python 3)
    r = client.post("/sdapi/v1/txt2img", json=aiya_payload(
        batch_size=1, enable_hr=True, hr_upscaler="Latent", hr_scale=1, hr_second_pass_steps=4 / 2,
        denoising_strength=0.5))
    hires_outcome(r, SIZE, SIZE, 1)


def test_aiya_upscale(client):
    image = Image.effect_noise((24, 16), 50).convert("RGB")
    payload = {"upscaling_resize": 2, "upscaler_1": "Lanczos", "image": "data:image/png;base64," + b64png(image),
               "gfpgan_visibility": 0.0, "codeformer_visibility": 0.0, "upscale_first": False}
    r = client.post("/sdapi/v1/extra-single-image", json=payload)
    assert r.status_code == 200 and set(r.json()) == {"html_info", "image"}
    assert decode(r.json()["image"]).tobytes() == image.resize((48, 32), Image.Resampling.LANCZOS).tobytes()
    r = client.post("/sdapi/v1/extra-single-image", json={**payload, "upscaler_2": "Nearest",
                                                           "extras_upscaler_2_visibility": 0.3})
    assert r.status_code == 200 and decode(r.json()["image"]).size == (48, 32)
    # the bot's defaults name upscalers we do not have, and face restoration: refused by name
    honest_refusal(client.post("/sdapi/v1/extra-single-image", json={**payload, "upscaler_1": "ESRGAN_4x"}),
                   "upscaler_1")
    honest_refusal(client.post("/sdapi/v1/extra-single-image", json={**payload, "gfpgan_visibility": 0.5}),
                   "gfpgan_visibility")


def test_aiya_progress_interrupt_skip(client):
    progress = client.get("/sdapi/v1/progress").json()
    assert progress["state"]["job"] == "" and progress["progress"] == 0
    assert client.post("/sdapi/v1/interrupt").status_code == 200
    assert client.post("/sdapi/v1/skip").status_code == 200
    honest_refusal(client.post("/sdapi/v1/interrogate", json={"image": "x", "model": "clip"}), "interrogate")


# -- SillyTavern ----------------------------------------------------------------------------------------------------


def test_sillytavern_setup_calls(client):
    assert client.get("/sdapi/v1/options").status_code == 200  # its ping
    upscalers = [x["name"] for x in client.get("/sdapi/v1/upscalers").json()]
    latent = [x["name"] for x in client.get("/sdapi/v1/latent-upscale-modes").json()]
    merged = upscalers[:1] + latent + upscalers[1:]  # "0 = None, then Latent Upscalers, then Upscalers"
    assert merged[0] == "None" and "Lanczos" in merged
    # VAEs: A1111's /sd-vae or Forge's /sd-modules, whichever answers a list
    answers = [client.get("/sdapi/v1/sd-vae"), client.get("/sdapi/v1/sd-modules")]
    data = next(a.json() for a in answers if a.status_code == 200)
    assert isinstance(data, list) and all("model_name" in x for x in data)
    assert [x["name"] for x in client.get("/sdapi/v1/samplers").json()]
    assert "Automatic" in [x["label"] for x in client.get("/sdapi/v1/schedulers").json()]
    models = [{"value": x["title"], "text": x["title"]} for x in client.get("/sdapi/v1/sd-models").json()]
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] in [m["value"] for m in models]
    # set-model: POST /options, then poll /progress until progress 0 and job_count 0
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": models[0]["value"]}).status_code == 200
    progress = client.get("/sdapi/v1/progress").json()
    assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0


def sillytavern_body(**settings):
    """generateSDImage's payload for the A1111 source, as its server forwards it (JSON.stringify drops undefined:
    no seed when the seed setting is -1, no sd_vae when none is picked; forge_additional_modules is unset for A1111)."""
    sd = {"sampler": "DDIM", "scheduler": "normal", "steps": 4, "scale": 7, "width": SIZE, "height": SIZE,
          "restore_faces": False, "enable_hr": False, "hr_upscaler": "Latent", "hr_scale": 2.0,
          "denoising_strength": 0.7, "hr_second_pass_steps": 0, "seed": 5, "clip_skip": 1}
    sd.update(settings)
    body = {"url": "http://127.0.0.1:7860", "auth": "",  # getSDRequestBody(): the server's own routing fields
            "prompt": "a blue square", "negative_prompt": "lowres", "sampler_name": sd["sampler"],
            "scheduler": sd["scheduler"], "steps": sd["steps"], "cfg_scale": sd["scale"], "width": sd["width"],
            "height": sd["height"], "restore_faces": sd["restore_faces"], "enable_hr": sd["enable_hr"],
            "hr_upscaler": sd["hr_upscaler"], "hr_scale": sd["hr_scale"], "hr_additional_modules": [],
            "denoising_strength": sd["denoising_strength"], "hr_second_pass_steps": sd["hr_second_pass_steps"],
            "override_settings": {"CLIP_stop_at_last_layers": sd["clip_skip"]},
            "override_settings_restore_afterwards": True, "clip_skip": sd["clip_skip"], "save_images": True,
            "send_images": True, "do_not_save_grid": False, "do_not_save_samples": False}
    if sd["seed"] >= 0:
        body["seed"] = sd["seed"]
    return body


def test_sillytavern_txt2img_saves_and_names_only_its_routing_fields(client, server):
    assert "forge_preset" not in client.get("/sdapi/v1/options").json()  # so it unsets the Forge field
    before = set((server.out / "txt2img-images").glob("*.png")) if (server.out / "txt2img-images").exists() else set()
    r = client.post("/sdapi/v1/txt2img", json=sillytavern_body())
    if r.status_code != 200:  # "DDIM" / "normal" depend on the sampler table
        honest_refusal(r, "sampler_name", "scheduler")
        return
    images, info = generation(r)
    assert images[0].size == (SIZE, SIZE) and info["seed"] == 5 and info["clip_skip"] == 1
    assert info["ignored_fields"] == ["auth", "url"]  # SillyTavern's own fields, forwarded verbatim
    saved = set((server.out / "txt2img-images").glob("*.png")) - before
    assert len(saved) == 1 and "Seed: 5" in Image.open(saved.pop()).info["parameters"]


@pytest.mark.parametrize("hr_scale, second_pass", [(2.0, 0), (1.5, 2)])
def test_sillytavern_hires_fix(client, hr_scale, second_pass):
    r = client.post("/sdapi/v1/txt2img", json=sillytavern_body(
        enable_hr=True, hr_scale=hr_scale, hr_second_pass_steps=second_pass, sampler="Euler a",
        scheduler="automatic", width=24, height=24))
    hires_outcome(r, 24, 24, hr_scale)


def test_sillytavern_restore_faces_is_named(client):
    images, info = generation(client.post("/sdapi/v1/txt2img", json=sillytavern_body(
        restore_faces=True, sampler="Euler", scheduler="automatic")))
    assert "restore_faces" in info["ignored_fields"]


# -- A1111's own txt2img schema ---------------------------------------------------------------------------------------

A1111_TXT2IMG_DEFAULTS = {  # StableDiffusionTxt2ImgProcessingAPI (v1.10), every field at its declared default
    "prompt": "", "negative_prompt": "", "styles": None, "seed": -1, "subseed": -1, "subseed_strength": 0,
    "seed_resize_from_h": -1, "seed_resize_from_w": -1, "sampler_name": None, "scheduler": None, "batch_size": 1,
    "n_iter": 1, "steps": 50, "cfg_scale": 7.0, "width": 512, "height": 512, "restore_faces": None, "tiling": None,
    "do_not_save_samples": False, "do_not_save_grid": False, "eta": None, "denoising_strength": 0.75,
    "s_min_uncond": None, "s_churn": None, "s_tmax": None, "s_tmin": None, "s_noise": None,
    "override_settings": None, "override_settings_restore_afterwards": True, "refiner_checkpoint": None,
    "refiner_switch_at": None, "disable_extra_networks": False, "firstpass_image": None, "comments": None,
    "enable_hr": False, "firstphase_width": 0, "firstphase_height": 0, "hr_scale": 2.0, "hr_upscaler": None,
    "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0, "hr_checkpoint_name": None,
    "hr_sampler_name": None, "hr_scheduler": None, "hr_prompt": "", "hr_negative_prompt": "",
    "force_task_id": None, "sampler_index": "Euler", "script_name": None, "script_args": [], "send_images": True,
    "save_images": False, "alwayson_scripts": {}, "infotext": None,
}


def test_a1111_schema_defaults_are_all_honoured_or_neutral(client):
    body = {**A1111_TXT2IMG_DEFAULTS, "prompt": "a green triangle", "steps": 3, "width": SIZE, "height": SIZE}
    images, info = generation(client.post("/sdapi/v1/txt2img", json=body))
    assert info["ignored_fields"] == [] and info["sampler_name"] == "Euler" and images[0].size == (SIZE, SIZE)
    assert r_parameters_roundtrip(client, body)


def r_parameters_roundtrip(client, body) -> bool:
    """A1111's `parameters` echo the request: a client may resend them as the next request."""
    r = client.post("/sdapi/v1/txt2img", json={**body, "seed": 9})
    again = client.post("/sdapi/v1/txt2img", json=r.json()["parameters"])
    return again.status_code == 200 and json.loads(again.json()["info"])["seed"] == 9 and \
        again.json()["images"] == r.json()["images"]


# -- webuiapi -------------------------------------------------------------------------------------------------------


def test_webuiapi_helpers(server):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler a", steps=3)
    assert api.get_cmd_flags()["api"] is True
    assert "Euler a" in api.util_get_sampler_names()
    assert "Automatic" in [s["label"] for s in api.get_schedulers()]
    assert api.util_get_model_names() == ["tiny-sd15"]
    api.util_set_model("tiny-sd15")
    assert api.util_get_current_model() == "tiny-sd15"
    api.util_wait_for_ready(check_interval=0.1)
    assert [u["name"] for u in api.get_upscalers()] == ["None", "Lanczos", "Nearest"]
    assert isinstance(api.get_latent_upscale_modes(), list) and isinstance(api.get_sd_vae(), list)
    assert api.get_hypernetworks() == [] and api.get_face_restorers() == [] and api.get_realesrgan_models() == []
    assert [s["name"] for s in api.get_prompt_styles()] == ["cinematic", "sharp"]
    assert api.get_loras() == [] and api.get_embeddings() == {"loaded": {}, "skipped": {}}
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    assert api.refresh_checkpoints() is None
    memory = api.get_memory()
    assert memory["ram"]["used"] > 0 and "cuda" in memory
    assert api.interrupt() == {} and api.skip() is None


def test_webuiapi_txt2img_with_styles_and_extras(server):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler a", steps=3)
    result = api.txt2img(prompt="a cat", styles=["sharp"], seed=4, width=SIZE, height=SIZE, negative_prompt="ugly")
    assert result.info["all_prompts"] == ["a cat, sharp focus"]
    assert result.info["all_negative_prompts"] == ["ugly, blurry"] and result.info["ignored_fields"] == []
    assert api.png_info(result.image).info.startswith("a cat, sharp focus\nNegative prompt: ugly, blurry")
    up = api.extra_single_image(result.image, upscaler_1="Lanczos", upscaling_resize=2)
    assert up.image.size == (2 * SIZE, 2 * SIZE)
    batch = api.extra_batch_images([result.image, result.image], upscaler_1="Nearest", upscaling_resize=1.5)
    assert [im.size for im in batch.images] == [(48, 48)] * 2
    with pytest.raises(RuntimeError) as refused:  # webuiapi raises on any non-200
        api.extra_single_image(result.image, upscaler_1="R-ESRGAN 4x+")
    assert refused.value.args[0] == 422 and "upscaler_1" in refused.value.args[1]


def test_webuiapi_masked_img2img(server):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler", steps=4)
    init = Image.new("RGB", (SIZE, SIZE), (30, 160, 40))
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (8, 8, 24, 24))
    try:
        result = api.img2img(images=[init], mask_image=mask, inpainting_fill=1, mask_blur=0, prompt="a cat",
                             denoising_strength=0.8, width=SIZE, height=SIZE, seed=2)
    except RuntimeError as exc:  # a 4xx naming the mask fields is honest too
        status, text = exc.args
        assert 400 <= status < 500 and status != 404 and ("mask" in text or "inpaint" in text), exc.args
        return
    assert result.image.size == (SIZE, SIZE)
    if "mask" in result.info["ignored_fields"]:
        return  # inpainting not in yet: the whole image was repainted, and the response says the mask was not used
    # inpainting in: outside the mask the picture stays the init image, up to the VAE round trip
    import numpy as np

    out = np.asarray(result.image, dtype=np.float32)
    keep = np.asarray(mask) == 0
    assert np.abs(out[keep] - np.asarray(init, dtype=np.float32)[keep]).mean() < 40
