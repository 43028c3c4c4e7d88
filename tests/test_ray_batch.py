"""``clipdiffusion batch --ray`` on a private local Ray instance (127.0.0.1, usage stats off): the same plan gives
byte-identical PNGs to the in-process run, an actor process killed mid-run loses and doubles nothing, and no Ray
process outlives the run. Bounded by an alarm; skipped only when ray is not importable (CI installs the extra)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

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


@pytest.mark.slow
def test_ray_job_matches_in_process_and_survives_a_killed_actor(tmp_path):
    pytest.importorskip("ray", reason=RAY_REASON)
    before = set(ray_batch.ray_processes())
    rows = [{"id": f"img-{i}", "prompt": p, "steps": 1, "seed": 10 + i, "width": 32, "height": 32}
            for i, p in enumerate(["a red circle", "a blue square", "a green circle", "a red square"])]
    requests = tmp_path / "r.jsonl"
    requests.write_text("".join(json.dumps(r) + "\n" for r in rows))
    local_out, ray_out = tmp_path / "local", tmp_path / "ray"
    local_out.mkdir()
    ray_out.mkdir()

    batch.run_local(batch.load_pipeline(), batch.prepare(batch.read_jsonl(requests), local_out), threads=1)

    marker = tmp_path / "killed-once"
    settings = ray_batch.RaySettings(address="local", actors=2, threads=1, num_cpus=2, crash_marker=str(marker))
    seen = []
    with deadline(900):
        written = ray_batch.run_ray(batch.prepare(batch.read_jsonl(requests), ray_out), settings,
                                    on_row=seen.append)
    assert marker.exists()  # an actor process did die mid-run
    killed = int(marker.read_text())
    assert killed not in {row["pid"] for row in seen}  # its batch was redone by another (or restarted) actor
    assert written == 4
    manifest = [json.loads(line) for line in (ray_out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in manifest) == [r["id"] for r in rows]  # each once: none lost, none doubled
    for record in manifest:
        assert (ray_out / record["file"]).read_bytes() == (local_out / record["file"]).read_bytes(), record["id"]
    local = {json.loads(line)["id"]: json.loads(line) for line in (local_out / "manifest.jsonl").read_text()
             .splitlines()}
    assert all(local[r["id"]]["sha256"] == r["sha256"] and local[r["id"]]["seed"] == r["seed"] for r in manifest)
    # a rerun has nothing to do and starts no Ray at all
    assert batch.prepare(batch.read_jsonl(requests), ray_out).todo == []
    # nothing of the instance is left running
    end = time.monotonic() + 15
    while (left := set(ray_batch.ray_processes()) - before) and time.monotonic() < end:
        time.sleep(0.2)
    assert not left, [open(f"/proc/{p}/cmdline", "rb").read()[:200] for p in left if os.path.exists(f"/proc/{p}")]
