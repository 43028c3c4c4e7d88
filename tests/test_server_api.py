"""The HTTP API end to end: uvicorn on a loopback port, driven by the `webuiapi` client and raw httpx.

The engine is `server_fixtures.FakePipeline` (honours the generate contract, draws a colour from prompt and seed)
so these tests exercise the server, not the model; `test_tiny_pipeline_end_to_end` runs the real tiny engine.
"""

import base64
import io
import json
import threading
import time

import httpx
import pytest
import webuiapi
from PIL import Image

from clipdiffusion.server.app import create_app
from clipdiffusion.server.settings import ModelEntry, ServerSettings
from server_fixtures import (FAKE_SAMPLERS, FAKE_SCHEDULES, FakePipeline, ServerThread, fake_factory,
                             prompt_colour)

MODELS = (ModelEntry("tiny-a"), ModelEntry("tiny-b", "/secret/dir/tiny-b.safetensors"), ModelEntry("broken"))


def settings(**changes):
    base = ServerSettings(models=MODELS, samplers=FAKE_SAMPLERS, schedules=FAKE_SCHEDULES, max_width=256,
                          max_height=256, max_steps=50, max_batch_size=4, max_n_iter=3, max_prompt_chars=500,
                          max_body_bytes=200_000, queue_size=4)
    return base.replace(**changes)


@pytest.fixture(scope="module")
def served():
    pipe, loaded = FakePipeline(), []
    with ServerThread(create_app(fake_factory(pipe, loaded), settings())) as server:
        server.pipe, server.loaded = pipe, loaded
        yield server


@pytest.fixture()
def client(served):
    served.pipe.calls.clear()
    with httpx.Client(base_url=served.url, timeout=30) as c:
        yield c


def api(server, **kw):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, **kw)


def b64png(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def field_error(response, field):
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert any(field in ".".join(map(str, d["loc"])) for d in detail), detail
    return " ".join(d["msg"] for d in detail)


def test_webuiapi_txt2img_returns_images_seeds_and_parameters(served):
    result = api(served).txt2img(prompt="a red circle", negative_prompt="blurry", seed=7, steps=3, cfg_scale=5,
                                 width=64, height=32, batch_size=2, n_iter=2, sampler_name="Euler a")
    assert len(result.images) == 4
    assert all(im.size == (64, 32) for im in result.images)
    # seeds are consecutive over the whole batch, as A1111 numbers them
    assert result.info["all_seeds"] == [7, 8, 9, 10] and result.info["seed"] == 7
    assert [im.getpixel((0, 0)) for im in result.images] == [prompt_colour("a red circle", s) for s in (7, 8, 9, 10)]
    assert result.info["sampler_name"] == "Euler a" and result.info["ignored_fields"] == []
    assert result.parameters["prompt"] == "a red circle" and result.parameters["steps"] == 3
    call = served.pipe.calls[-1]
    assert (call["sampler"], call["guidance"], call["negative_prompt"], call["seed"]) == ("euler_a", 5.0, "blurry", 9)
    # the PNG carries the infotext, and png-info reads it back
    info = api(served).png_info(result.images[0])
    assert info.json["parameters"]["Seed"] == 7 and info.json["parameters"]["Prompt"] == "a red circle"
    assert "Steps: 3" in info.info


def test_random_seed_is_reported(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 16, "height": 16})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["seed"] >= 0 and info["all_seeds"] == [info["seed"]]
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert image.getpixel((0, 0)) == prompt_colour("x", info["seed"])


# "DPM++ 2M" without a scheduler: A1111 v1.10's Automatic for it is Karras (its 'scheduler' option)
@pytest.mark.parametrize("name, sampler, schedule", [
    ("Euler", "euler", "normal"), ("DPM++ 2M", "dpmpp_2m", "karras"), ("k_dpmpp_2m_ka", "dpmpp_2m", "karras"),
    ("DPM++ 2M Karras", "dpmpp_2m", "karras"), ("heun", "heun", "normal"), ("DDIM", "ddim", "normal")])
def test_a1111_sampler_names_map_to_ours(client, served, name, sampler, schedule):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "p", "steps": 1, "width": 16, "height": 16,
                                               "sampler_name": name})
    assert r.status_code == 200, r.text
    assert (served.pipe.calls[-1]["sampler"], served.pipe.calls[-1]["schedule"]) == (sampler, schedule)


def test_scheduler_field_and_unknown_names(client, served):
    body = {"prompt": "p", "steps": 1, "width": 16, "height": 16, "sampler_name": "Euler", "scheduler": "Karras"}
    assert client.post("/sdapi/v1/txt2img", json=body).status_code == 200
    assert served.pipe.calls[-1]["schedule"] == "karras"
    msg = field_error(client.post("/sdapi/v1/txt2img", json={**body, "sampler_name": "LMS"}), "sampler_name")
    assert "'LMS'" in msg and "Euler a" in msg
    msg = field_error(client.post("/sdapi/v1/txt2img", json={**body, "scheduler": "beta"}), "scheduler")
    assert "'beta'" in msg


def test_listings(client):
    samplers = client.get("/sdapi/v1/samplers").json()
    names = [s["name"] for s in samplers]
    assert {"Euler a", "Euler", "Heun", "DPM++ 2M", "DDIM"} <= set(names)
    assert all(set(s) == {"name", "aliases", "options"} for s in samplers)
    schedulers = client.get("/sdapi/v1/schedulers").json()
    assert {"automatic", "karras", "normal"} <= {s["name"] for s in schedulers}
    assert "exponential" not in {s["name"] for s in schedulers}  # the engine has no such schedule
    models = client.get("/sdapi/v1/sd-models").json()
    assert [m["title"] for m in models] == ["tiny-a", "tiny-b", "broken"]
    assert "/secret" not in json.dumps(models)  # paths stay on the server
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}


def test_clip_skip_and_model_via_override_settings_and_options(client, served):
    body = {"prompt": "p", "steps": 1, "width": 16, "height": 16}
    r = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"CLIP_stop_at_last_layers": 2}})
    assert r.status_code == 200 and served.pipe.calls[-1]["clip_skip"] == 2
    assert json.loads(r.json()["info"])["clip_skip"] == 2
    assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 3, "sd_model_checkpoint": "tiny-b",
                                                  "foo": 1}).json() == {
        "updated": ["CLIP_stop_at_last_layers", "sd_model_checkpoint"], "ignored": ["foo"]}
    try:
        opts = client.get("/sdapi/v1/options").json()
        assert opts["CLIP_stop_at_last_layers"] == 3 and opts["sd_model_checkpoint"] == "tiny-b"
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200 and served.pipe.calls[-1]["clip_skip"] == 3
        assert json.loads(r.json()["info"])["sd_model_name"] == "tiny-b" and served.loaded[-1] == "tiny-b"
    finally:
        client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1, "sd_model_checkpoint": "tiny-a"})
    field_error(client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "/etc/passwd"}), "sd_model_checkpoint")
    field_error(client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {
        "sd_model_checkpoint": "../x.safetensors"}}), "sd_model_checkpoint")
    field_error(client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {
        "CLIP_stop_at_last_layers": 0}}), "CLIP_stop_at_last_layers")
    assert "/etc/passwd" not in served.loaded and "../x.safetensors" not in served.loaded


def test_unknown_fields_are_accepted_and_listed(client):
    r = client.post("/sdapi/v1/txt2img", json={
        "prompt": "p", "steps": 1, "width": 16, "height": 16, "tiling": True, "restore_faces": False,
        "my_extension_field": {"a": 1}, "styles": [], "override_settings": {"img2img_fix_steps": True}})
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["info"])["ignored_fields"] == [
        "my_extension_field", "tiling", "override_settings.img2img_fix_steps"]  # enable_hr: tests/test_hires_fix.py


@pytest.mark.parametrize("change, field", [
    ({"width": 512}, "width"), ({"height": 100}, "height"), ({"width": 0}, "width"), ({"steps": 0}, "steps"),
    ({"steps": 51}, "steps"), ({"batch_size": 5}, "batch_size"), ({"n_iter": 4}, "n_iter"),
    ({"prompt": "x" * 501}, "prompt"), ({"negative_prompt": "y" * 501}, "negative_prompt"),
    ({"steps": "many"}, "steps"), ({"cfg_scale": "nan"}, "cfg_scale"), ({"seed": -5}, "seed"),
    ({"width": 16.5}, "width"), ({"steps": True}, "steps"), ({"cfg_scale": False}, "cfg_scale"),
    ({"seed": True}, "seed")])
def test_limits_and_types_are_422_naming_the_field(client, served, change, field):
    body = {"prompt": "p", "steps": 2, "width": 16, "height": 16, **change}
    field_error(client.post("/sdapi/v1/txt2img", json=body), field)
    assert served.pipe.calls == []


def test_a1111_errors_name_a1111_fields_and_limits_are_the_requests(client, served):
    body = {"prompt": "p", "steps": 1, "width": 16, "height": 16}
    assert "cfg_scale=150.0" in field_error(client.post("/sdapi/v1/txt2img", json={**body, "cfg_scale": 150}),
                                            "cfg_scale")
    init = b64png(Image.new("RGB", (16, 16)))
    for strength in (0, 1.5):
        field_error(client.post("/sdapi/v1/img2img", json={**body, "init_images": [init],
                                                          "denoising_strength": strength}), "denoising_strength")
    overrides = {"override_settings": {"CLIP_stop_at_last_layers": 49}}
    field_error(client.post("/sdapi/v1/txt2img", json={**body, **overrides}), "CLIP_stop_at_last_layers")
    assert served.pipe.calls == []
    # one seed range ([0, 2**64)) and one clip-skip range ([1, 48]) everywhere
    r = client.post("/sdapi/v1/txt2img", json={**body, "seed": 2**64 - 1, "override_settings": {
        "CLIP_stop_at_last_layers": 24}})
    assert r.status_code == 200, r.text
    assert (served.pipe.calls[-1]["seed"], served.pipe.calls[-1]["clip_skip"]) == (2**64 - 1, 24)
    field_error(client.post("/sdapi/v1/txt2img", json={**body, "seed": 2**64}), "seed")
    field_error(client.post("/api/generate", json={**body, "seed": 2**64 - 1, "batch_size": 2}), "seed")
    field_error(client.post("/api/generate", json={"prompt": "p", "weighting": "loud"}), "weighting")


def test_img2img_with_webuiapi_and_bad_uploads(served, client):
    init = Image.new("RGB", (40, 24), (10, 200, 30))
    result = api(served).img2img(images=[init], prompt="a cat", denoising_strength=0.5, steps=4, width=32,
                                 height=16, seed=3)
    call = served.pipe.calls[-1]
    # the route passes the init image at its own size; the engine fits it to 32x16 (resize_mode, issue 20)
    assert call["strength"] == 0.5 and call["init_image"].size == (40, 24) and call["resize_mode"] == 0
    assert call["init_image"].getpixel((5, 5)) == (10, 200, 30)
    assert result.images[0].size == (32, 16) and result.info["denoising_strength"] == 0.5
    assert result.json["parameters"]["init_images"] is None  # not echoed back unless include_init_images
    body = {"prompt": "p", "steps": 1, "width": 16, "height": 16}
    assert "base64" in field_error(client.post("/sdapi/v1/img2img", json={**body, "init_images": ["%%%"]}),
                                   "init_images")
    junk = base64.b64encode(b"this is not an image").decode()
    assert "image" in field_error(client.post("/sdapi/v1/img2img", json={**body, "init_images": [junk]}),
                                  "init_images")
    field_error(client.post("/sdapi/v1/img2img", json={**body, "init_images": ["http://169.254.169.254/x.png"]}),
                "init_images")
    field_error(client.post("/sdapi/v1/img2img", json={**body, "init_images": []}), "init_images")
    field_error(client.post("/sdapi/v1/img2img", json={**body, "init_images": [b64png(init)],
                                                      "denoising_strength": 1.5}), "denoising_strength")
    r = client.post("/sdapi/v1/png-info", json={"image": junk})
    field_error(r, "image")


def test_body_size_limit_is_413(client):
    r = client.post("/sdapi/v1/img2img", json={"prompt": "p", "init_images": ["A" * 300_000]})
    assert r.status_code == 413 and "body size" in r.text

    def chunks():
        for _ in range(30):
            yield b"x" * 10_000

    r = client.post("/sdapi/v1/txt2img", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_failing_job_is_500_and_worker_survives(client, served):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "FAIL now", "steps": 1, "width": 16, "height": 16})
    assert r.status_code == 500 and r.json()["error"] == "RuntimeError" and "fake engine" in r.json()["detail"]
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "fine", "steps": 1, "width": 16, "height": 16})
    assert r.status_code == 200
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "p", "steps": 1, "width": 16, "height": 16,
                                               "override_settings": {"sd_model_checkpoint": "broken"}})
    assert r.status_code == 500 and "cannot load model" in r.json()["detail"]
    assert client.post("/sdapi/v1/txt2img", json={"prompt": "ok", "steps": 1, "width": 16,
                                                  "height": 16}).status_code == 200


def test_own_generate_with_attention_maps(client, served):
    r = client.post("/api/generate", json={"prompt": "red cat", "steps": 2, "width": 32, "height": 16, "seed": 4,
                                           "sampler": "euler_a", "schedule": "karras", "clip_skip": 2,
                                           "long_prompt": "truncate", "attention_maps": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seeds"] == [4] and len(body["images"]) == 1
    call = served.pipe.calls[-1]
    assert (call["sampler"], call["schedule"], call["clip_skip"], call["long_prompt"]) == (
        "euler_a", "karras", 2, "truncate")
    maps = body["attention"]["maps"]
    assert len(maps) == len(body["attention"]["tokens"]) > 0
    first = Image.open(io.BytesIO(base64.b64decode(maps[1])))
    assert first.size == (4, 2) and first.getpixel((1, 0)) == 255 and first.getpixel((0, 0)) == 0
    field_error(client.post("/api/generate", json={"prompt": "p", "bogus": 1}), "bogus")
    field_error(client.post("/api/generate", json={"prompt": "p", "long_prompt": "squeeze"}), "long_prompt")
    field_error(client.post("/api/generate", json={"prompt": "p", "model": "/etc/passwd"}), "model")


def test_own_generate_speed_presets(client, served):
    """Our API samples exactly unless the body asks for speed "fast" (the page's default): then the request
    carries the CLI's fast preset; an unknown preset is a 422 naming "speed"."""
    from clipdiffusion.fast_options import SPEEDS

    base = {"prompt": "red cat", "steps": 2, "width": 32, "height": 16, "seed": 4}
    assert client.post("/api/generate", json=base).status_code == 200
    call = served.pipe.calls[-1]
    assert (call["s_min_uncond"], call["deepcache_interval"]) == (0.0, 0)
    assert client.post("/api/generate", json={**base, "speed": "fast"}).status_code == 200
    call = served.pipe.calls[-1]
    assert {k: call[k] for k in SPEEDS["fast"]} == SPEEDS["fast"]
    field_error(client.post("/api/generate", json={**base, "speed": "ludicrous"}), "speed")


def test_own_encode_statistics(client):
    r = client.post("/api/encode", json={"prompt": "a" * 250, "clip_skip": 2})
    assert r.status_code == 200, r.text
    stats = r.json()
    assert stats["context"]["shape"] == [1, 154, 32] and len(stats["context"]["chunk_mean_norms"]) == 2
    assert stats["negative_context"]["max"] == 0.0 and stats["report"] == {"chunks": 2}


def test_tokenize_reports_chunks_and_dropped_words(client):
    pytest.importorskip("clipdiffusion.text.prompt")
    prompt = ", ".join(f"word{i}" for i in range(40))
    r = client.post("/api/tokenize", json={"prompt": prompt, "long_prompt": "truncate"})
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["summary"] == "75/75" and report["dropped_tokens"] > 0
    dropped = [t for t in report["tokens"] if t["chunk"] is None]
    assert len(dropped) == report["dropped_tokens"]
    assert report["dropped_text"].replace(" ", "").endswith("word39")  # CLIP splits digits: "word 3 9"
    report = client.post("/api/tokenize", json={"prompt": prompt, "long_prompt": "chunk"}).json()
    assert report["dropped_tokens"] == 0 and " | " in report["summary"]
    assert {t["chunk"] for t in report["tokens"]} == {0, 1}
    field_error(client.post("/api/tokenize", json={"prompt": "x", "long_prompt": "nope"}), "body")


def test_docs_page_and_openapi(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/api/generate", "/api/tokenize"} <= set(spec["paths"])
    info = client.get("/api/info").json()
    assert {"a1111", "comfy"} <= set(info["weighting"]) and info["long_prompt"][:2] == ["truncate", "chunk"]
    assert info["models"] == ["tiny-a", "tiny-b", "broken"] and info["limits"]["max_width"] == 256
    page = client.get("/")
    assert page.status_code == 200 and "clipdiffusion" in page.text


def test_auth_guards_every_route():
    pipe = FakePipeline()
    app = create_app(fake_factory(pipe), settings(api_auth=(("alice", "s3cret"),)))
    with ServerThread(app) as server, httpx.Client(base_url=server.url) as c:
        for path in ("/", "/docs", "/openapi.json", "/sdapi/v1/sd-models", "/static/app.js"):
            r = c.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic"), path
        assert c.get("/sdapi/v1/sd-models", auth=("alice", "wrong")).status_code == 401
        assert c.get("/sdapi/v1/sd-models", auth=("bob", "s3cret")).status_code == 401
        assert c.get("/sdapi/v1/sd-models", auth=("alice", "s3cret")).status_code == 200
        client = api(server, username="alice", password="s3cret")
        assert client.txt2img(prompt="hi", steps=1, width=16, height=16).image.size == (16, 16)
        with pytest.raises(RuntimeError):
            api(server).txt2img(prompt="hi", steps=1, width=16, height=16)


def _post_in_thread(url, body, out):
    def run():
        with httpx.Client(timeout=30) as c:
            out.append(c.post(url, json=body))

    t = threading.Thread(target=run)
    t.start()
    return t


def _wait(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_full_queue_is_503_and_interrupt_stops_the_running_job():
    gate = threading.Semaphore(0)
    pipe = FakePipeline(gate=gate)
    app = create_app(fake_factory(pipe), settings(queue_size=1))
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        body = {"prompt": "slow", "steps": 40, "width": 16, "height": 16}
        out1, out2 = [], []
        t1 = _post_in_thread(server.url + "/sdapi/v1/txt2img", body, out1)
        _wait(lambda: c.get("/sdapi/v1/progress").json()["state"]["job_count"] == 1)
        t2 = _post_in_thread(server.url + "/sdapi/v1/txt2img", {**body, "prompt": "queued", "steps": 2}, out2)
        _wait(lambda: c.get("/sdapi/v1/progress").json()["state"]["job_count"] == 2)
        r = c.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 503 and "queue is full" in r.json()["detail"]
        gate.release(3)  # three steps, then interrupt
        _wait(lambda: c.get("/sdapi/v1/progress").json()["state"]["sampling_step"] == 3)
        progress = c.get("/sdapi/v1/progress").json()
        assert progress["progress"] == 3 / 40 and progress["state"]["sampling_steps"] == 40
        assert c.post("/sdapi/v1/interrupt").json() == {}
        gate.release(100)
        t1.join(10)
        t2.join(10)
        assert out1[0].status_code == 200 and json.loads(out1[0].json()["info"])["interrupted"] is True
        assert pipe.calls[0]["steps_done"] in (3, 4)  # the step already waiting at the gate may finish
        assert out2[0].status_code == 200 and pipe.calls[1]["steps_done"] == 2  # the next job runs in full
        idle = c.get("/sdapi/v1/progress").json()
        assert idle["progress"] == 0 and idle["state"]["job_count"] == 0


def test_worker_shutdown_interrupts_running_and_cancels_queued():
    from clipdiffusion.server.worker import Job, JobControl, QueueFull, Worker, WorkerStopped

    gate = threading.Semaphore(0)
    pipe = FakePipeline(gate=gate)
    worker = Worker(fake_factory(pipe), queue_size=1).start()

    def work(pipe, control):
        return pipe.generate("p", steps=50, callback=control.on_step, should_stop=control.should_stop)

    running = worker.submit(Job("t", "m", work, JobControl(steps=50)))
    _wait(lambda: worker.snapshot()["running"] is not None)
    queued = worker.submit(Job("t", "m", work, JobControl(steps=50)))
    with pytest.raises(QueueFull):
        worker.submit(Job("t", "m", work, JobControl(steps=50)))
    gate.release(2)
    _wait(lambda: pipe.calls[0]["steps_done"] == 2)
    stopper = threading.Thread(target=worker.stop)
    stopper.start()
    _wait(lambda: worker.stopping)
    gate.release(100)
    stopper.join(10)
    assert not worker.alive
    assert running.result(5).images and pipe.calls[0]["steps_done"] in (2, 3)  # finished early, cleanly
    with pytest.raises(WorkerStopped):
        queued.result(5)
    assert len(pipe.calls) == 1  # the queued job never ran
    with pytest.raises(WorkerStopped):
        worker.submit(Job("t", "m", work))


def test_worker_stop_interrupts_the_running_job_before_anything_else():
    """stop() raises the stop flag and interrupts the running job in one step: by the time it drains the queue (or
    anyone sees `stopping`), the job is already told to stop, so it cannot run on to its last step meanwhile."""
    import queue as queue_module

    from clipdiffusion.server.worker import Job, JobControl, Worker, WorkerStopped

    seen = []

    class SpyQueue(queue_module.Queue):
        def get_nowait(self):
            seen.append((worker.stopping, control.interrupted))
            return super().get_nowait()

    gate = threading.Semaphore(0)
    pipe = FakePipeline(gate=gate)
    worker = Worker(fake_factory(pipe), queue_size=2)
    worker._queue = SpyQueue(maxsize=2)
    worker.start()
    control = JobControl(steps=50)

    def work(pipe, control):
        return pipe.generate("p", steps=50, callback=control.on_step, should_stop=control.should_stop)

    running = worker.submit(Job("t", "m", work, control))
    _wait(lambda: worker.snapshot()["running"] is not None)
    queued = worker.submit(Job("t", "m", work, JobControl(steps=50)))
    stopper = threading.Thread(target=worker.stop)
    stopper.start()
    _wait(lambda: worker.stopping)
    gate.release(100)
    stopper.join(10)
    assert seen and seen[0] == (True, True)  # interrupted before the first job was drained
    assert running.result(5).images and pipe.calls[0]["steps_done"] <= 1
    with pytest.raises(WorkerStopped):
        queued.result(5)


def test_serve_command_line():
    from clipdiffusion.cli import build_parser, main
    from clipdiffusion.commands.serve import build_settings

    parser = build_parser(only="serve")
    s = build_settings(parser.parse_args(["serve"]))
    assert (s.host, s.port, s.api_auth, len(s.models), s.models[0].source) == ("127.0.0.1", 7860, (), 1, None)
    s = build_settings(parser.parse_args(["serve", "--listen", "--api-auth", "a:b,c:d:e", "--max-width", "256",
                                          "--model", __file__]))
    assert s.host == "0.0.0.0" and s.api_auth == (("a", "b"), ("c", "d:e")) and s.max_width == 256
    assert s.models[0].name == "test_server_api.py" and s.models[0].filename == "test_server_api.py"
    assert main(["serve", "--model", "/no/such/model.safetensors"]) == 2
    assert main(["serve", "--api-auth", "nopassword"]) == 2
    assert main(["serve", "--max-steps", "0"]) == 2


def test_tiny_pipeline_end_to_end():
    """The real engine (random tiny weights) behind the real server: A1111 client, attention maps, encode."""
    from clipdiffusion.testing import tiny_pipeline

    pipes = []

    def factory(name):
        pipes.append(tiny_pipeline(seed=0))
        return pipes[-1]

    s = ServerSettings(models=(ModelEntry("tiny"),), max_width=64, max_height=64)
    with ServerThread(create_app(factory, s)) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        names = [x["name"] for x in c.get("/sdapi/v1/samplers").json()]
        assert {"Euler", "Euler a", "DPM++ 2M"} <= set(names)
        result = api(server).txt2img(prompt="a red circle", seed=5, steps=2, width=32, height=32, batch_size=2,
                                     sampler_name="DPM++ 2M", scheduler="karras")
        assert [im.size for im in result.images] == [(32, 32)] * 2 and result.info["all_seeds"] == [5, 6]
        again = api(server).txt2img(prompt="a red circle", seed=6, steps=2, width=32, height=32,
                                    sampler_name="DPM++ 2M", scheduler="karras")
        # seed 6 alone reproduces the second image of the batch
        assert again.images[0].tobytes() == result.images[1].tobytes()
        assert "Seed: 5" in result.info["infotexts"][0]
        r = c.post("/api/generate", json={"prompt": "red cat", "steps": 2, "width": 32, "height": 32, "seed": 1,
                                          "attention_maps": True})
        assert r.status_code == 200, r.text
        attention = r.json()["attention"]
        assert attention["tokens"] == ["red", "cat"] and len(attention["maps"]) == 2
        stats = c.post("/api/encode", json={"prompt": "red cat", "clip_skip": 2}).json()
        assert stats["context"]["shape"][1] == 77 and stats["report"]["prompt"]["summary"] == "2/75"
        field_error(c.post("/api/encode", json={"prompt": "red cat", "clip_skip": 9}), "body")
    assert len(pipes) == 1  # loaded once, by the worker


def test_server_shutdown_answers_in_flight_requests():
    """Ctrl-C while a job runs and another waits: the running one answers (interrupted), the queued one 503."""
    gate = threading.Semaphore(0)
    pipe = FakePipeline(gate=gate)
    app = create_app(fake_factory(pipe), settings())
    server = ServerThread(app)
    with server, httpx.Client(base_url=server.url, timeout=30) as c:
        body = {"prompt": "slow", "steps": 40, "width": 16, "height": 16}
        out1, out2 = [], []
        t1 = _post_in_thread(server.url + "/sdapi/v1/txt2img", body, out1)
        _wait(lambda: c.get("/sdapi/v1/progress").json()["state"]["job_count"] == 1)
        t2 = _post_in_thread(server.url + "/sdapi/v1/txt2img", body, out2)
        _wait(lambda: c.get("/sdapi/v1/progress").json()["state"]["job_count"] == 2)
        gate.release(2)
        stopping = time.monotonic()
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        _wait(lambda: app.state.server.worker.stopping)
        gate.release(100)
        stopper.join(20)
        t1.join(10)
        t2.join(10)
        assert time.monotonic() - stopping < 10
    assert out1[0].status_code == 200 and json.loads(out1[0].json()["info"])["interrupted"] is True
    assert out2[0].status_code == 503 and "shutting down" in out2[0].json()["detail"]
    assert len(pipe.calls) == 1 and pipe.calls[0]["steps_done"] < 40


def test_webuiapi_helpers_and_preload():
    loaded = []
    app = create_app(fake_factory(FakePipeline(), loaded), settings(preload=True))
    with ServerThread(app) as server:
        _wait(lambda: loaded == ["tiny-a"])  # the default model loads at startup, before any request
        client = api(server)
        assert client.util_get_model_names() == ["broken", "tiny-a", "tiny-b"]
        client.util_set_model("tiny-b", find_closest=False)
        assert client.util_get_current_model() == "tiny-b"
        assert "Euler a" in client.util_get_sampler_names() and "karras" in client.util_get_scheduler_names()
        client.util_wait_for_ready(check_interval=0.05)
        assert client.interrupt() == {}
        body = {"prompt": "p", "steps": 1, "width": 16, "height": 16, "init_images": ["x"] * 5}
        with httpx.Client(base_url=server.url) as c:
            field_error(c.post("/sdapi/v1/img2img", json=body), "init_images")


def test_null_fields_take_defaults(client, served):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "p", "negative_prompt": None, "seed": None, "steps": 2,
                                               "width": 16, "height": 16, "sampler_name": None, "scheduler": None,
                                               "override_settings": None, "cfg_scale": None})
    assert r.status_code == 200, r.text
    call = served.pipe.calls[-1]
    assert (call["negative_prompt"], call["sampler"], call["guidance"]) == ("", "euler", 7.0)


def test_a1111_clip_skip_does_not_move_sd2_or_sdxl_encoders(client, served):
    """A1111 applies CLIP_stop_at_last_layers to SD1-style models only; on SD2/SDXL the family default is used and
    the setting is reported as ignored. Our own route passes clip_skip through as given."""
    body = {"prompt": "p", "steps": 1, "width": 16, "height": 16,
            "override_settings": {"CLIP_stop_at_last_layers": 2}}
    served.pipe.family = "sdxl"
    try:
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200 and served.pipe.calls[-1]["clip_skip"] is None
        assert "override_settings.CLIP_stop_at_last_layers" in json.loads(r.json()["info"])["ignored_fields"]
        r = client.post("/api/generate", json={"prompt": "p", "steps": 1, "width": 16, "height": 16, "clip_skip": 3})
        assert r.status_code == 200 and served.pipe.calls[-1]["clip_skip"] == 3
    finally:
        del served.pipe.family
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200 and served.pipe.calls[-1]["clip_skip"] == 2
