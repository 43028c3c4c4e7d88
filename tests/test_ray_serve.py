"""``serve --ray``: the FastAPI app as a Ray Serve ingress in front of two CPU model replicas (fractional CPUs) on a
private local Ray instance (127.0.0.1, usage stats off), driven through webuiapi: images identical to in-process
generation at the same thread count, ``sd_model_checkpoint`` choosing a multiplexed model, 503 under overload,
and no Ray process left afterwards. Bounded by an alarm; skipped only when ray is not importable."""

from __future__ import annotations

import concurrent.futures
import shutil
import socket
import tempfile
import threading
import time

import numpy as np
import pytest

from clipdiffusion import ray_batch

from test_ray_batch import RAY_REASON, deadline, wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_served_batches_plan_only_consecutive_seeds():
    pytest.importorskip("ray", reason=RAY_REASON)
    from clipdiffusion.request import GenerationRequest
    from clipdiffusion.server.ray_serve import decode_request, encode_request, plan_served

    def payload(**fields):
        return {"request": encode_request(GenerationRequest(**fields)), "missing_loras": "note"}

    payloads = [payload(prompt="a", seed=2), payload(prompt="a", seed=1), payload(prompt="b", seed=3),
                payload(prompt="a", seed=3, steps=5), payload(prompt="a", seed=3)]
    assert plan_served(["m"] * 5, payloads, False) == [("m", [0, 1, 2, 3, 4], None)]
    plan = plan_served(["m", "m", "m", "m", "n"], payloads, True)
    merged = [(model, run) for model, run, request in plan if request is not None]
    assert merged == [("m", [1, 0])]  # seeds 1, 2 of prompt "a": one batch of 2; other shapes/prompts alone
    assert sorted(i for _, run, _ in plan for i in run) == [0, 1, 2, 3, 4]
    assert decode_request(payloads[3]["request"]) == GenerationRequest(prompt="a", seed=3, steps=5)


def test_replica_batching_changes_in_place():
    pytest.importorskip("ray", reason=RAY_REASON)
    from clipdiffusion.errors import ClipDiffusionError
    from clipdiffusion.server.ray_serve import ModelReplica

    replica = ModelReplica(lambda model: model, max_batch=1)
    assert replica.batching == {"max_batch": 1, "unet_batching": False, "batch_wait_s": 0.02}
    assert replica.set_batching(4, True, 0.05) == {"max_batch": 4, "unet_batching": True, "batch_wait_s": 0.05}
    replica.reconfigure({"max_batch": 2})  # Serve's user_config: the keys given change, the rest stay
    assert replica.batching == {"max_batch": 2, "unet_batching": True, "batch_wait_s": 0.05}
    with pytest.raises(ClipDiffusionError, match="max_bach"):
        replica.reconfigure({"max_bach": 2})
    with pytest.raises(ClipDiffusionError, match="max_batch 0"):
        replica.set_batching(0)


def test_worker_threads_run_jobs_at_once_and_stop_together():
    """The ingress's ``Worker(..., threads=n)``: n jobs run at the same time from one bounded queue (none can end
    before all n have started), the next ones wait their turn, a full queue refuses, and ``stop`` fails the queued
    jobs and ends every thread."""
    from clipdiffusion.server.worker import Job, QueueFull, Worker, WorkerStopped

    with pytest.raises(ValueError, match="threads 0"):
        Worker(lambda model: model, threads=0)
    started, lock = [], threading.Lock()
    all_in, release = threading.Event(), threading.Event()
    worker = Worker(lambda model: model, queue_size=3, threads=3).start()

    def work(pipe, control):
        with lock:
            started.append(pipe)
            if len(started) == 3:
                all_in.set()
        release.wait(60)
        return pipe

    running = [worker.submit(Job("t", f"m{i}", work)) for i in range(3)]
    assert all_in.wait(60)  # three jobs running at once: none returns before release
    wait_until(lambda: worker.snapshot()["pending"] == 0, 30, "the queue emptied")
    queued = [worker.submit(Job("t", "q", work)) for _ in range(3)]
    with pytest.raises(QueueFull):
        worker.submit(Job("t", "q", work))
    stopper = threading.Thread(target=worker.stop)
    stopper.start()
    wait_until(lambda: worker.stopping, 30, "the worker stopping")
    release.set()
    stopper.join(30)
    assert not worker.alive
    assert sorted(f.result(5) for f in running) == ["m0", "m1", "m2"]  # each with its own model
    for future in queued:
        with pytest.raises(WorkerStopped):
            future.result(5)
    assert sorted(started) == ["m0", "m1", "m2"]  # the queued jobs never ran


@pytest.mark.slow
def test_serve_ray_through_webuiapi(tmp_path):
    pytest.importorskip("ray", reason=RAY_REASON)
    webuiapi = pytest.importorskip("webuiapi")
    import httpx

    from clipdiffusion.batch import set_threads
    from clipdiffusion.checkpoints.save import save_checkpoint
    from clipdiffusion.commands.serve import pipeline_factory
    from clipdiffusion.pipeline import Pipeline
    from clipdiffusion.server.settings import EMBEDDED_MODEL, ModelEntry, ServerSettings
    from clipdiffusion.testing import tiny_pipeline

    set_threads(1)
    other = tmp_path / "tinyrand.safetensors"
    save_checkpoint(tiny_pipeline(1), other)
    settings = ServerSettings(models=(ModelEntry(EMBEDDED_MODEL), ModelEntry("tinyrand", str(other))),
                              preload=False, queue_size=2)
    root = tempfile.mkdtemp(prefix="cdt-", dir="/tmp")  # this test's instance: session_processes(root) at the end
    port = free_port()
    with deadline(600):
        from clipdiffusion.server import ray_serve

        with ray_batch.ray_session("local", num_cpus=2, namespace="clipdiffusion-test", temp_root=root):
            from ray import serve

            serve.start(http_options={"host": "127.0.0.1", "port": port})
            try:
                serve.run(ray_serve.deployments(settings, pipeline_factory(settings), replicas=2,
                                                cpus_per_replica=0.5, max_ongoing_requests=2, max_queued_requests=2,
                                                max_batch=4),
                          name="clipdiffusion", route_prefix="/")
                api = webuiapi.WebUIApi(host="127.0.0.1", port=port)

                # four concurrent txt2img requests over the two replicas; the queue holds 2 ongoing + 2 queued,
                # so a request may still meet a full queue while an earlier one is being handed on: a 503 is
                # backpressure working, and a client retries it
                def one(seed):
                    for attempt in range(10):
                        try:
                            return api.txt2img(prompt="a red circle", negative_prompt="", steps=2, seed=seed,
                                               cfg_scale=7, width=64, height=64, sampler_name="Euler")
                        except RuntimeError as e:
                            if e.args[0] != 503 or attempt == 9:
                                raise
                            time.sleep(1.0)

                with concurrent.futures.ThreadPoolExecutor(4) as pool:
                    results = list(pool.map(one, [11, 12, 13, 14]))

                # the multiplexed second model, picked with sd_model_checkpoint
                api.set_options({"sd_model_checkpoint": "tinyrand"})
                assert api.get_options()["sd_model_checkpoint"] == "tinyrand"
                other_result = api.txt2img(prompt="a red circle", steps=2, seed=5, cfg_scale=7, width=32,
                                           height=32, sampler_name="Euler")
                api.set_options({"sd_model_checkpoint": EMBEDDED_MODEL})

                # overload: more concurrent requests than the ingress and its queue take answer 503
                body = {"prompt": "x", "steps": 2, "seed": 1, "width": 64, "height": 64}

                def raw(_):
                    return httpx.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", json=body, timeout=300).status_code

                with concurrent.futures.ThreadPoolExecutor(12) as pool:
                    codes = list(pool.map(raw, range(12)))
                bad = httpx.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", json={**body, "steps": -1}, timeout=60)
            finally:
                serve.shutdown()

    # identical to generating in this process at the same thread count
    pipe = Pipeline.default()
    for seed, result in zip([11, 12, 13, 14], results):
        local = pipe.generate("a red circle", steps=2, seed=seed, guidance=7, width=64, height=64)
        assert np.array_equal(np.asarray(result.image.convert("RGB")), np.asarray(local.image)), seed
        assert f"Seed: {seed}," in result.info["infotexts"][0]
    tiny = Pipeline.from_file(other)
    local = tiny.generate("a red circle", steps=2, seed=5, guidance=7, width=32, height=32)
    assert np.array_equal(np.asarray(other_result.image.convert("RGB")), np.asarray(local.image))
    assert 503 in codes and 200 in codes and set(codes) <= {200, 503}, codes
    assert bad.status_code == 422 and "steps" in bad.text

    try:
        wait_until(lambda: not ray_batch.session_processes(root), 30, "the instance's processes ended")
    finally:
        left = ray_batch.reap(root)
        shutil.rmtree(root, ignore_errors=True)
    assert not left, left
