"""``clipdiffusion batch --ray``: the batch job as a Ray Data pipeline (``pip install clipdiffusion[ray]``).

read (the planned engine calls as rows of JSON text) -> ``map`` on CPU tasks (``plan_row``: the request checked
again and its prompt planned, torch-free) -> ``map_batches`` over an actor pool (``GenerateActor``: one loaded
``Pipeline`` per actor, ``num_gpus=1`` per actor when the cluster has GPUs, fractional CPUs sized to what is free,
the torch thread count set explicitly) -> write, in the driver, through the same ``batch.Writer`` as the in-process
run: the PNG by ``atomic_write`` then its manifest line, each id at most once. Both paths call
``batch.run_unit``, so the same plan gives byte-identical PNGs at the same thread count.

A killed actor is restarted by Ray and its batch retried (Ray Data's actor pool defaults: unlimited
``max_restarts``/``max_task_retries``); a retried batch's
rows reach the writer once (Ray Data hands the driver each output block once, and the writer skips an id it has
written), and nothing is written by an actor, so nothing is lost or doubled (``tests/test_ray_batch.py`` kills an
actor process mid-run).

Ray is imported only here, after ``RAY_USAGE_STATS_ENABLED=0`` is set. ``--ray local`` starts a private instance
for the command: every process on 127.0.0.1 (Ray's own switch ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes it use
the loopback address; ``_node_ip_address="127.0.0.1"`` alone is turned into the machine's address by Ray), no
dashboard, its files under a fresh temporary folder; ``ray.shutdown()`` runs in ``finally`` and any process still
running from that folder is then ended (``reap``), so nothing outlives the command.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .batch import JobPlan, Progress, Writer, load_pipeline, request_from_row, run_unit, set_threads, unit_rows
from .errors import ClipDiffusionError

LOOPBACK = "127.0.0.1"
# Ray gives its raylet 30 s to register (fixed in ray/_private/node.py); on a loaded machine it can take longer,
# so a local start is tried again, from scratch, this many times in all.
START_ATTEMPTS = 3


@dataclass(frozen=True)
class RaySettings:
    """``address``: "local" (a private instance), "auto" (the running cluster) or a cluster address. ``actors``
    None: one per GPU, else 1. ``cpus_per_actor`` None: what is free, shared (``actor_resources``)."""

    address: str = "local"
    actors: int | None = None
    cpus_per_actor: float | None = None
    threads: int = 1
    model: str | None = None
    device: str = "cpu"
    dtype: str = "fp32"
    options: tuple = ()  # devices.load_options items (mmap) for every actor's Pipeline.from_*
    num_cpus: int | None = None  # local only: CPUs the private instance offers (default: Ray's count)
    crash_marker: str | None = None  # tests only: the first actor call to create this file kills its process


def import_ray():
    """``ray`` with usage reporting off (set before the import), or a ClipDiffusionError saying how to get it."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the node address stays 127.0.0.1
    # The raylet gives the metrics agent (a Python process) 30 s to come up and aborts the node otherwise; on a
    # loaded machine it needs longer.
    os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")
    try:
        import ray
    except ImportError:
        raise ClipDiffusionError("--ray: Ray is not installed; pip install 'clipdiffusion[ray]'") from None
    return ray


def check_address(address: str) -> str:
    if not isinstance(address, str) or not address or len(address) > 300 or any(c.isspace() for c in address):
        raise ClipDiffusionError(f"--ray {address!r}: expected auto, local or a cluster address (host:port, "
                                 "ray://host:port)")
    return address


@contextlib.contextmanager
def ray_session(address: str = "local", *, num_cpus: int | None = None, namespace: str | None = None):
    """``ray.init`` for the duration of the block, ``ray.shutdown()`` after it whatever happens. A local instance
    stays on 127.0.0.1 with its files in a new temporary folder; processes left from that folder are ended."""
    ray = import_ray()
    address = check_address(address)
    options = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False,
               "namespace": namespace}
    if address != "local":
        try:
            ray.init(address=address, **options)
            yield ray
        finally:
            ray.shutdown()
        return
    for attempt in range(1, START_ATTEMPTS + 1):
        temp_dir = tempfile.mkdtemp(prefix="cdray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        try:
            try:
                ray.init(address=address, _node_ip_address=LOOPBACK, _temp_dir=temp_dir, num_cpus=num_cpus,
                         **options)
            except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception when its node starts too slowly
                if attempt == START_ATTEMPTS or "timed out during startup" not in str(exc):
                    raise
                continue  # the finally below cleans this attempt up first
            yield ray
            return
        finally:
            try:
                ray.shutdown()
            finally:
                reap(temp_dir)
                shutil.rmtree(temp_dir, ignore_errors=True)


def session_processes(temp_dir: str) -> list[int]:
    """Ids of processes whose command line names ``temp_dir`` (the raylet, GCS, agents and workers of a local
    instance started there), this process excepted."""
    pids, me = [], os.getpid()
    needle = os.fsencode(temp_dir)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                if needle in f.read():
                    pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def ray_processes() -> list[int]:
    """Ids of every Ray process of this user (raylet, gcs_server, workers, agents): for tests' clean-up checks."""
    pids, me, uid = [], os.getpid(), os.getuid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if os.stat(f"/proc/{entry.name}").st_uid != uid:
                continue
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if any(word in cmd for word in (b"raylet", b"gcs_server", b"ray::", b"default_worker.py",
                                        b"ray/dashboard/agent.py", b"runtime_env/agent")):
            pids.append(int(entry.name))
    return pids


def reap(temp_dir: str, grace: float = 5.0) -> list[int]:
    """End the processes of the instance in ``temp_dir`` that ``ray.shutdown`` left: SIGTERM, then SIGKILL after
    ``grace`` seconds. Returns the ids that had to be signalled."""
    deadline = time.monotonic() + 2.0
    while (pids := session_processes(temp_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)  # shutdown's own signals usually finish them in a moment
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_processes(temp_dir):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        end = time.monotonic() + grace
        while session_processes(temp_dir) and time.monotonic() < end:
            time.sleep(0.1)
    return pids


def actor_resources(ray, settings: RaySettings) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor): one actor per GPU when there are GPUs; CPUs per actor sized so
    the pool and the pipeline's read and plan tasks fit in what the cluster has free (two actors with one CPU each
    on two CPUs would leave none for the read task, and the job would wait forever)."""
    free = ray.available_resources()
    gpus = int(free.get("GPU", 0))
    actors = settings.actors if settings.actors is not None else max(1, gpus)
    if isinstance(actors, bool) or not isinstance(actors, int) or not 1 <= actors <= 1024:
        raise ClipDiffusionError(f"--actors {actors!r}: must be an integer in [1, 1024]")
    cpus = float(free.get("CPU", 1.0))
    if settings.cpus_per_actor is not None:
        per = settings.cpus_per_actor
        if not 0 < per <= max(cpus, 0.01):
            raise ClipDiffusionError(f"--cpus-per-actor {per!r}: must be in (0, {cpus:g}] (free CPUs)")
    else:
        per = max(0.01, min(1.0, (cpus - 0.25) / actors))  # a quarter CPU left for the read/plan/write tasks
        per = round(per, 2)
    return actors, per, (1.0 if gpus >= actors else 0.0)


def plan_row(row: dict) -> dict:
    """CPU task (torch-free): the row's request validated again and its prompts planned (``plan_prompt``: tags,
    AND, editing schedules), so a bad row fails before a model actor spends time on it."""
    from .text.schedule import plan_prompt

    request, ids = request_from_row(row)
    plan_prompt(request.prompt, request.steps)
    plan_prompt(request.negative_prompt, request.steps, negative=True)
    return {**row, "n": len(ids)}


class GenerateActor:
    """One loaded pipeline; ``__call__`` runs a batch of engine calls (rows) and returns one row per image: id,
    seed, file, png (bytes), sha256, batch, timings (JSON text)."""

    def __init__(self, model=None, device="cpu", dtype="fp32", threads=1, crash_marker=None, options=()):
        set_threads(threads)
        self.pipe = load_pipeline(model, device=device, dtype=dtype, **dict(options))
        self.threads = threads
        self.crash_marker = crash_marker

    def __call__(self, rows: dict) -> dict:
        import json

        set_threads(self.threads)
        if self.crash_marker is not None:
            try:
                fd = os.open(self.crash_marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)  # a worker dying mid-run, once per job
        out = {k: [] for k in ("id", "seed", "file", "png", "sha256", "batch", "timings", "pid")}
        for request_text, ids_text in zip(rows["request"], rows["ids"]):
            request, ids = request_from_row({"request": request_text, "ids": ids_text})
            for image in run_unit(self.pipe, request, ids):
                for key in out:
                    value = image.get(key)
                    out[key].append(json.dumps(value) if key == "timings" else value)
                out["pid"][-1] = os.getpid()
        return out


def build_dataset(ray, plan: JobPlan, settings: RaySettings):
    actors, cpus, gpus = actor_resources(ray, settings)
    rows = unit_rows(plan.units)
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 4 * actors)))
    dataset = dataset.map(plan_row, num_cpus=0.05)
    return dataset.map_batches(
        GenerateActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus,
        num_gpus=gpus, zero_copy_batch=False,
        fn_constructor_kwargs={"model": settings.model, "device": settings.device if not gpus else "cuda",
                               "dtype": settings.dtype, "threads": settings.threads,
                               "crash_marker": settings.crash_marker, "options": settings.options}), \
        (actors, cpus, gpus)


def run_ray(plan: JobPlan, settings: RaySettings, *, progress: Progress | None = None, on_row=None) -> int:
    """Run ``plan`` on Ray (a session opened and closed here); the driver writes every output. Returns the number
    of images written."""
    with ray_session(settings.address, num_cpus=settings.num_cpus) as ray:
        return run_in_session(ray, plan, settings, progress=progress, on_row=on_row)


def run_in_session(ray, plan: JobPlan, settings: RaySettings, *, progress: Progress | None = None,
                   on_row=None) -> int:
    """``run_ray`` inside an open Ray session (benchmarks run several jobs in one)."""
    import json

    if settings.model is not None:
        settings = _absolute_model(settings)
    writer = Writer(plan.manifest)
    written = 0
    ray.data.DataContext.get_current().enable_progress_bars = False
    dataset, _ = build_dataset(ray, plan, settings)
    for row in dataset.iter_rows():
        row = dict(row)
        row["timings"] = json.loads(row["timings"])
        row["png"] = bytes(row["png"])
        row["seed"] = int(row["seed"])
        row["batch"] = int(row["batch"])
        pid = row.pop("pid")
        if writer.write(row):
            written += 1
            if progress is not None:
                progress.advance(1)
        if on_row is not None:
            on_row({**row, "pid": pid})
    missing = [item.id for item in plan.todo if item.id not in writer.written]
    if missing:
        raise ClipDiffusionError(f"--ray: {len(missing)} images did not come back (first: {missing[0]!r}); rerun "
                                 "to make them (finished ones are kept)")
    return written


def _absolute_model(settings: RaySettings) -> RaySettings:
    import dataclasses

    return dataclasses.replace(settings, model=str(Path(settings.model).resolve()))
