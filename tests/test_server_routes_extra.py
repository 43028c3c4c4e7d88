"""server/a1111_extra.py and the A1111 request fields of issue 20 (styles, top-level clip_skip, save_images), on
the fake engine through FastAPI's TestClient: A1111's shapes, the values being ours, 4xx naming what we lack."""

import base64
import io
import json

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from clipdiffusion.server import upscalers
from clipdiffusion.server.app import create_app
from clipdiffusion.server.settings import ModelEntry, ServerSettings
from server_fixtures import FAKE_SAMPLERS, FAKE_SCHEDULES, FakePipeline, fake_factory

STYLES = 'name,prompt,negative_prompt\nart,"oil painting of {prompt}",photo\nsharp,"sharp focus",blurry\n'


def b64png(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def unpng(text):
    return Image.open(io.BytesIO(base64.b64decode(text)))


@pytest.fixture()
def app_with(tmp_path):
    made = []

    def make(**changes):
        styles = tmp_path / "styles.csv"
        styles.write_text(STYLES)
        base = ServerSettings(models=(ModelEntry("tiny-a"), ModelEntry("tiny-b", "/secret/dir/b.safetensors")),
                              samplers=FAKE_SAMPLERS, schedules=FAKE_SCHEDULES, max_width=256, max_height=256,
                              max_steps=50, styles_files=(str(styles),))
        pipe = FakePipeline()
        client = TestClient(create_app(fake_factory(pipe), base.replace(**changes)))
        client.__enter__()
        client.pipe = pipe
        made.append(client)
        return client

    yield make
    for client in made:
        client.__exit__(None, None, None)


BODY = {"prompt": "a cat", "negative_prompt": "ugly", "steps": 1, "width": 16, "height": 16, "seed": 3}


def info_of(r):
    assert r.status_code == 200, r.text
    return json.loads(r.json()["info"])


def test_cmd_flags_are_ours_under_a1111_names(app_with, tmp_path):
    c = app_with(api_auth=(("u", "secret-pw"),), port=7861, lora_dirs=(str(tmp_path),))
    flags = c.get("/sdapi/v1/cmd-flags", auth=("u", "secret-pw")).json()
    assert flags["api"] is True and flags["nowebui"] is False and flags["port"] == 7861
    assert flags["listen"] is False and flags["api_auth"] == "<redacted>"
    assert "secret-pw" not in json.dumps(flags) and "/secret/dir" not in json.dumps(flags)
    assert flags["styles_file"] == ["styles.csv"] and flags["lora_dir"] == tmp_path.name
    assert flags["ckpt"] == "b.safetensors" and flags["no_half"] is True and flags["use_cpu"] == ["all"]
    assert flags["max_width"] == 256 and flags["save_dir"] is None and flags["xformers"] is False
    assert c.get("/sdapi/v1/cmd-flags").status_code == 401  # a client learns that auth is on (AIYA's check)


def test_listing_routes_have_a1111_shapes(app_with):
    c = app_with()
    ups = c.get("/sdapi/v1/upscalers").json()
    assert [u["name"] for u in ups] == ["None", "Lanczos", "Nearest"]
    assert set(ups[0]) == {"name", "model_name", "model_path", "model_url", "scale"}
    assert c.get("/sdapi/v1/latent-upscale-modes").json() == [{"name": n} for n in upscalers.LATENT_UPSCALE_MODES]
    assert c.get("/sdapi/v1/prompt-styles").json() == [
        {"name": "art", "prompt": "oil painting of {prompt}", "negative_prompt": "photo"},
        {"name": "sharp", "prompt": "sharp focus", "negative_prompt": "blurry"}]
    for route in ("face-restorers", "hypernetworks", "realesrgan-models", "script-info", "extensions"):
        assert c.get(f"/sdapi/v1/{route}").json() == [], route
    assert c.post("/sdapi/v1/refresh-checkpoints").json() is None
    assert c.post("/sdapi/v1/skip").json() is None


@pytest.mark.slow  # alone, the route's first `import torch` (to ask about CUDA) takes seconds on 2 shared cores
def test_memory_reports_this_process(app_with):
    import resource

    mem = app_with().get("/sdapi/v1/memory").json()
    ram = mem["ram"]
    assert ram["total"] == ram["free"] + ram["used"] and 0 < ram["used"] < ram["total"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert ram["used"] <= peak * 1.05  # the resident size now is at most the peak so far
    import torch

    if torch.cuda.is_available():
        assert mem["cuda"]["system"]["total"] > 0
    else:
        assert mem["cuda"] == {"error": "unavailable"}


def test_unsupported_routes_are_422_naming_them(app_with):
    c = app_with()
    for route in ("interrogate", "create/embedding", "train/hypernetwork", "unload-checkpoint"):
        r = c.post(f"/sdapi/v1/{route}", json={"image": "x", "model": "clip"})
        assert r.status_code == 422 and f"/sdapi/v1/{route}" in r.text and "not supported" in r.text, route


def test_extra_single_image_upscales_with_our_upscalers(app_with):
    c = app_with()
    image = Image.effect_noise((20, 12), 60).convert("RGB")
    r = c.post("/sdapi/v1/extra-single-image", json={"image": b64png(image), "upscaler_1": "Lanczos",
                                                      "upscaling_resize": 2})
    assert r.status_code == 200, r.text
    out = unpng(r.json()["image"])
    # A1111's size rule: each side scaled, then rounded down to a multiple of 8 (40x24 -> 40x24)
    assert out.size == (40, 24) and "Postprocess upscaler: Lanczos" in r.json()["html_info"]
    assert out.tobytes() == image.resize((40, 24), Image.Resampling.LANCZOS).tobytes()
    r = c.post("/sdapi/v1/extra-single-image", json={"image": b64png(image), "upscaler_1": "Nearest",
                                                      "upscaling_resize": 3})
    assert unpng(r.json()["image"]).tobytes() == image.resize((56, 32), Image.Resampling.NEAREST).tobytes()
    # "None": the image back as it is
    r = c.post("/sdapi/v1/extra-single-image", json={"image": b64png(image)})
    assert unpng(r.json()["image"]).tobytes() == image.tobytes()
    # resize_mode 1 with crop: scaled to cover, centred on a canvas of the target size
    r = c.post("/sdapi/v1/extra-single-image", json={"image": b64png(image), "upscaler_1": "Nearest",
                                                      "resize_mode": 1, "upscaling_resize_w": 32,
                                                      "upscaling_resize_h": 32})
    assert unpng(r.json()["image"]).size == (32, 32)
    # a second upscaler blended in by its visibility
    r = c.post("/sdapi/v1/extra-single-image", json={"image": b64png(image), "upscaler_1": "Lanczos",
                                                      "upscaler_2": "Nearest", "extras_upscaler_2_visibility": 0.5})
    want = Image.blend(image.resize((40, 24), Image.Resampling.LANCZOS),
                       image.resize((40, 24), Image.Resampling.NEAREST), 0.5)
    assert unpng(r.json()["image"]).tobytes() == want.tobytes()


@pytest.mark.parametrize("change, field", [
    ({"gfpgan_visibility": 0.5}, "gfpgan_visibility"), ({"codeformer_visibility": 1}, "codeformer_visibility"),
    ({"upscaler_1": "R-ESRGAN 4x+"}, "upscaler_1"), ({"upscaler_1": "Latent"}, "upscaler_1"),
    ({"upscaler_1": "Lanczos", "upscaling_resize": 0.1}, "upscaling_resize"),
    ({"upscaler_1": "Lanczos", "upscaling_resize": 1000}, "upscaling_resize"),
    ({"upscaling_resize": 0}, "upscaling_resize"), ({"image": "not base64!"}, "image")])
def test_extras_refusals_name_the_field(app_with, change, field):
    body = {"image": b64png(Image.new("RGB", (16, 16))), "upscaler_1": "Lanczos", **change}
    r = app_with().post("/sdapi/v1/extra-single-image", json=body)
    assert r.status_code == 422 and field in json.dumps(r.json()["detail"]), r.text
    if field == "gfpgan_visibility":
        assert "face restoration" in r.text


def test_extra_batch_images(app_with):
    c = app_with()
    images = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(3)]
    r = c.post("/sdapi/v1/extra-batch-images", json={"imageList": [{"data": b64png(im), "name": f"{i}"}
                                                                  for i, im in enumerate(images)],
                                                    "upscaler_1": "Nearest", "upscaling_resize": 2})
    assert r.status_code == 200, r.text
    outs = [unpng(x) for x in r.json()["images"]]
    assert [o.size for o in outs] == [(16, 16)] * 3 and [o.getpixel((3, 3))[0] for o in outs] == [0, 40, 80]


def test_styles_are_applied_and_unknown_names_reported(app_with):
    c = app_with()
    info = info_of(c.post("/sdapi/v1/txt2img", json={**BODY, "styles": ["art", "None", "sharp"]}))
    call = c.pipe.calls[-1]
    assert call["prompt"] == "oil painting of a cat, sharp focus"
    assert call["negative_prompt"] == "ugly, photo, blurry"
    assert info["styles"] == ["art", "None", "sharp"] and info["prompt"] == "a cat"
    assert info["all_prompts"] == ["oil painting of a cat, sharp focus"]
    assert info["ignored_fields"] == ["styles[1]"] and info["notes"] == ["Style not found: None"]
    assert "oil painting of a cat, sharp focus" in info["infotexts"][0]
    info = info_of(c.post("/sdapi/v1/txt2img", json={**BODY, "styles": []}))
    assert c.pipe.calls[-1]["prompt"] == "a cat" and info["ignored_fields"] == []
    r = c.post("/sdapi/v1/txt2img", json={**BODY, "styles": "art"})
    assert r.status_code == 422 and "styles" in r.text  # A1111's type: a list of names
    info = info_of(c.post("/sdapi/v1/txt2img", json={**BODY, "styles": ["x", "art", "x", "y"]}))
    assert info["ignored_fields"] == ["styles[0]", "styles[3]"]
    assert c.pipe.calls[-1]["prompt"] == "oil painting of a cat"
    r = c.post("/sdapi/v1/txt2img", json={**BODY, "styles": ["z"] * 10_000})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "styles"]


def test_styles_count_against_the_prompt_limit(app_with):
    c = app_with(max_prompt_chars=20)
    r = c.post("/sdapi/v1/txt2img", json={**BODY, "styles": ["art"]})  # 24 characters once styled
    assert r.status_code == 422 and "prompt" in r.text


def test_top_level_clip_skip(app_with):
    c = app_with()
    info = info_of(c.post("/sdapi/v1/txt2img", json={**BODY, "clip_skip": 2}))
    assert c.pipe.calls[-1]["clip_skip"] == 2 and info["clip_skip"] == 2 and info["ignored_fields"] == []
    # both given: the override wins (A1111 reads the setting), a different top-level value is named
    info = info_of(c.post("/sdapi/v1/txt2img", json={**BODY, "clip_skip": 3,
                                                     "override_settings": {"CLIP_stop_at_last_layers": 2}}))
    assert c.pipe.calls[-1]["clip_skip"] == 2 and info["ignored_fields"] == ["clip_skip"]
    info = info_of(c.post("/sdapi/v1/txt2img", json={**BODY, "clip_skip": 2,
                                                     "override_settings": {"CLIP_stop_at_last_layers": 2}}))
    assert info["ignored_fields"] == []
    r = c.post("/sdapi/v1/txt2img", json={**BODY, "clip_skip": 0})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "clip_skip"]
    # on a family whose A1111 clip skip does not move the encoder, the field it came from is named
    c.pipe.family = "sdxl"
    try:
        info = info_of(c.post("/sdapi/v1/txt2img", json={**BODY, "clip_skip": 2}))
        assert c.pipe.calls[-1]["clip_skip"] is None and "clip_skip" in info["ignored_fields"]
    finally:
        c.pipe.family = "tiny"


def test_ignored_fields_name_what_we_do_not_do(app_with):
    info = info_of(app_with().post("/sdapi/v1/txt2img", json={
        **BODY, "restore_faces": True, "tiling": True, "subseed_strength": 0.5, "save_images": True,
        "override_settings": {"face_restoration_model": "CodeFormer", "CLIP_stop_at_last_layers": 1}}))
    assert info["ignored_fields"] == ["restore_faces", "save_images", "subseed_strength", "tiling",
                                      "override_settings.face_restoration_model"]


def test_save_images_writes_into_the_save_dir_only(app_with, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    c = app_with(save_dir=str(out))
    info = info_of(c.post("/sdapi/v1/txt2img", json={**BODY, "batch_size": 2, "save_images": True,
                                                     "send_images": False}))
    assert "save_images" not in info["ignored_fields"]
    files = sorted(p.name for p in (out / "txt2img-images").iterdir())
    assert files == ["00000-3.png", "00001-4.png"]
    saved = Image.open(out / "txt2img-images" / "00001-4.png")
    assert "Seed: 4" in saved.info["parameters"] and saved.size == (16, 16)
    # numbering continues after what is there; img2img has its own folder
    info_of(c.post("/sdapi/v1/txt2img", json={**BODY, "save_images": True}))
    assert (out / "txt2img-images" / "00002-3.png").exists()
    info_of(c.post("/sdapi/v1/img2img", json={**BODY, "save_images": True,
                                              "init_images": [b64png(Image.new("RGB", (16, 16)))]}))
    assert [p.name for p in (out / "img2img-images").iterdir()] == ["00000-3.png"]
    # without save_images nothing is written
    info_of(c.post("/sdapi/v1/txt2img", json=BODY))
    assert len(list((out / "txt2img-images").iterdir())) == 3
    assert sorted(p.name for p in out.iterdir()) == ["img2img-images", "txt2img-images"]


def test_save_images_failure_is_a_note_not_an_error(app_with, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "txt2img-images").write_text("a file where the folder should be")
    c = app_with(save_dir=str(out))
    r = c.post("/sdapi/v1/txt2img", json={**BODY, "save_images": True})
    info = info_of(r)
    assert len(r.json()["images"]) == 1 and any("save_images" in n for n in info["notes"])
    assert str(tmp_path) not in json.dumps(info)  # the server's paths stay on the server
