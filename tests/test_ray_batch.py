"""``clipdiffusion batch --ray`` on a private local Ray instance (127.0.0.1, usage stats off): the same plan gives
byte-identical PNGs to the in-process run, an actor process killed mid-run loses and doubles nothing, a request
that kills its worker every time stops the job after a bounded number of tries with an error naming it, and no Ray
process outlives the module (one instance for the module's Ray jobs: ``ray.init`` is 12-40 s here). Every step is
bounded by an alarm and nothing waits on a guessed duration; skipped only when ray is not importable (CI installs
the extra)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager

import pytest

from clipdiffusion import batch, ray_batch
from clipdiffusion.errors import ClipDiffusionError

RAY_REASON = "ray is not installed (pip install 'clipdiffusion[ray]'; CI installs it)"


@contextmanager
def deadline(seconds: int):
    def expired(signum, frame):
        raise TimeoutError(f"the Ray run took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_base_install_never_imports_ray():
    code = ("import sys, clipdiffusion.batch, clipdiffusion.commands.batch, clipdiffusion.cli;"
            "sys.exit(1 if any(m == 'ray' or m.startswith('ray.') for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


class FakeRay:
    def __init__(self, resources):
        self.resources = resources

    def available_resources(self):
        return self.resources


def test_actor_resources_leave_room_for_the_read_task():
    settings = ray_batch.RaySettings(actors=2)
    actors, cpus, gpus = ray_batch.actor_resources(FakeRay({"CPU": 2.0}), settings)
    assert (actors, gpus) == (2, 0.0) and actors * cpus < 2.0  # two whole CPUs would deadlock the read task
    assert ray_batch.actor_resources(FakeRay({"CPU": 16.0, "GPU": 4.0}), ray_batch.RaySettings()) == (4, 1.0, 1.0)
    assert ray_batch.actor_resources(FakeRay({"CPU": 8.0}), ray_batch.RaySettings()) == (1, 1.0, 0.0)
    with pytest.raises(ClipDiffusionError, match="cpus-per-actor 3"):
        ray_batch.actor_resources(FakeRay({"CPU": 2.0}), ray_batch.RaySettings(cpus_per_actor=3))
    with pytest.raises(ClipDiffusionError, match="--actors 0"):
        ray_batch.actor_resources(FakeRay({"CPU": 2.0}), ray_batch.RaySettings(actors=0))
    with pytest.raises(ClipDiffusionError, match="--ray 'a b'"):
        ray_batch.check_address("a b")


def test_rows_round_trip():
    from clipdiffusion.batch import BatchItem, Unit, request_from_row, unit_rows
    from clipdiffusion.request import GenerationRequest

    request = GenerationRequest(prompt="a <lora:x:0.5> cat", seed=3, loras=(("y", 1.0, 0.5),), styles=("s",),
                                width=16, height=16)
    (row,) = unit_rows([Unit([BatchItem("a", request), BatchItem("b", request.replace(seed=4))])])
    back, ids = request_from_row(row)
    assert ids == ["a", "b"] and back == request.replace(batch_size=2)
    with pytest.raises(ClipDiffusionError):
        request_from_row({"request": json.dumps({"stpes": 1}), "ids": "[]"})


def test_ledger_counts_deaths_and_refuses_a_call_past_the_limit():
    ledger = ray_batch.Ledger()
    assert ledger.begin(["a"], 2) and ledger.begin(["b", "c"], 2)
    ledger.end(["a"])
    assert ledger.begin(["b", "c"], 2)  # its worker died once in it: tried again
    assert ledger.begin(["a"], 2)  # a finished call redone with its batch: no death counted
    ledger.end(["a"])
    assert ledger.report() == {"refused": None, "unfinished": [(["b", "c"], 2)]}
    assert not ledger.begin(["b", "c"], 2)  # two deaths: refused, and not counted as a start
    assert ledger.report() == {"refused": (["b", "c"], 2), "unfinished": [(["b", "c"], 2)]}
    with pytest.raises(ClipDiffusionError, match=r"--max-attempts 0"):
        ray_batch.check_attempts(0)
    with pytest.raises(ClipDiffusionError, match=r"--max-attempts True"):
        ray_batch.check_attempts(True)


def wait_until(condition, seconds: float, what: str):
    """Poll ``condition`` until it is true; fail naming ``what`` after ``seconds`` (a bound, not a guess)."""
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"{what}: still not so after {seconds} s")
        time.sleep(0.1)


def test_the_watchdog_ends_a_local_instance_whose_driver_died():
    """The driver is SIGKILLed before its clean-up can run: its watchdog ends what it started (here a stand-in
    process whose command line names the session folder, as Ray's do) and removes the folder."""
    root = tempfile.mkdtemp(prefix="cdt-", dir="/tmp")
    folder = tempfile.mkdtemp(prefix="cdray-", dir=root)
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", folder],
                                start_new_session=True)
    driver = subprocess.Popen([sys.executable, "-c", "import sys, time; from clipdiffusion import ray_batch; "
                               "ray_batch.start_watchdog(sys.argv[1]); print('ok', flush=True); time.sleep(600)",
                               folder], stdout=subprocess.PIPE)
    try:
        assert driver.stdout.readline() == b"ok\n"
        driver.kill()
        driver.wait(30)
        assert stand_in.wait(60) is not None  # ended by the watchdog (SIGTERM, then SIGKILL)
        wait_until(lambda: not os.path.exists(folder), 30, "the session folder removed")
    finally:
        for proc in (stand_in, driver):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        os.rmdir(root)


@pytest.fixture(scope="module")
def local_ray():
    """One private instance for this module's Ray jobs, under its own folder; on the way out, every process of it
    must end (``session_processes``), or the module fails and they are ended."""
    pytest.importorskip("ray", reason=RAY_REASON)
    root = tempfile.mkdtemp(prefix="cdt-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    try:
        with ExitStack() as stack:
            with deadline(300):
                ray = stack.enter_context(ray_batch.ray_session("local", num_cpus=2, temp_root=root))
            yield ray
            with deadline(120):
                stack.close()
        wait_until(lambda: not ray_batch.session_processes(root), 30, "the instance's processes ended")
    finally:
        left = ray_batch.reap(root)
        shutil.rmtree(root, ignore_errors=True)
    assert not left, left


def job_file(tmp_path, rows) -> object:
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def manifest_of(out) -> list:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ray_job_matches_in_process_and_survives_a_killed_actor(local_ray, tmp_path):
    rows = [{"id": f"img-{i}", "prompt": p, "steps": 1, "seed": 10 + i, "width": 32, "height": 32}
            for i, p in enumerate(["a red circle", "a blue square", "a green circle", "a red square"])]
    requests = job_file(tmp_path, rows)
    local_out, ray_out = tmp_path / "local", tmp_path / "ray"
    local_out.mkdir()
    ray_out.mkdir()

    batch.run_local(batch.load_pipeline(), batch.prepare(batch.read_jsonl(requests), local_out), threads=1)

    marker = tmp_path / "killed-once"  # the first actor call to create it kills its own process: no timing guess
    settings = ray_batch.RaySettings(actors=2, threads=1, crash_marker=str(marker))
    seen = []
    with deadline(300):
        written = ray_batch.run_in_session(local_ray, batch.prepare(batch.read_jsonl(requests), ray_out), settings,
                                           on_row=seen.append)
    assert marker.exists()  # an actor process did die mid-run
    killed = int(marker.read_text())
    assert killed not in {row["pid"] for row in seen}  # its batch was redone by another (or restarted) actor
    assert not os.path.exists(f"/proc/{killed}")
    assert written == 4
    manifest = manifest_of(ray_out)
    assert sorted(r["id"] for r in manifest) == [r["id"] for r in rows]  # each once: none lost, none doubled
    for record in manifest:
        assert (ray_out / record["file"]).read_bytes() == (local_out / record["file"]).read_bytes(), record["id"]
    local = {r["id"]: r for r in manifest_of(local_out)}
    assert all(local[r["id"]]["sha256"] == r["sha256"] and local[r["id"]]["seed"] == r["seed"] for r in manifest)
    # a rerun has nothing to do and starts no Ray at all
    assert batch.prepare(batch.read_jsonl(requests), ray_out).todo == []


@pytest.mark.slow
def test_a_request_that_kills_its_worker_every_time_stops_the_job_naming_it(local_ray, tmp_path):
    rows = [{"id": name, "prompt": "a red circle", "steps": 1, "seed": seed, "width": 32, "height": 32}
            for name, seed in (("fine", 1), ("boom", 7))]
    out = tmp_path / "out"
    out.mkdir()
    settings = ray_batch.RaySettings(actors=1, threads=1, max_attempts=2, crash_on="boom")
    t = time.monotonic()
    with deadline(300), pytest.raises(ClipDiffusionError) as failure:
        ray_batch.run_in_session(local_ray, batch.prepare(batch.read_jsonl(job_file(tmp_path, rows)), out),
                                 settings)
    message = str(failure.value)
    assert "request 'boom' died 2 time(s) (--max-attempts 2)" in message, message
    assert "rerun" in message
    written = [r["id"] for r in manifest_of(out)] if (out / "manifest.jsonl").exists() else []
    assert written in ([], ["fine"])  # what was written is kept, once; the crashing request never is
    print(f"stopped after {time.monotonic() - t:.1f} s: {message}")
