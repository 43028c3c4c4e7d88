"""``clipdiffusion batch --ray``: the batch job as a Ray Data pipeline (``pip install clipdiffusion[ray]``).

read (the planned engine calls as rows of JSON text) -> ``map`` on CPU tasks (``plan_row``: the request checked
again and its prompt planned, torch-free) -> ``map_batches`` over an actor pool (``GenerateActor``: one loaded
``Pipeline`` per actor, ``num_gpus=1`` per actor when the cluster has GPUs, fractional CPUs sized to what is free,
the torch thread count set explicitly) -> write, in the driver, through the same ``batch.Writer`` as the in-process
run: the PNG by ``atomic_write`` then its manifest line, each id at most once. Both paths call
``batch.run_unit``, so the same plan gives byte-identical PNGs at the same thread count.

A killed actor is restarted by Ray and its batch retried (Ray Data's actor pool: unlimited ``max_restarts`` and
``max_task_retries``, which a request that kills its worker every time would turn into an endless loop). The bound
is ours: a small ``Ledger`` actor records each engine call's starts and finishes, and an actor refuses to start a
call whose worker has already died ``max_attempts`` times in it; the job then stops with an error naming the
request (``map_batches``' own ``max_restarts``/``max_task_retries`` keywords are deprecated in Ray 2.60 and go in
2.64). A retried batch's rows reach the writer once (Ray Data hands the driver each output block once, and the
writer skips an id it has written), and nothing is written by an actor, so nothing is lost or doubled
(``tests/test_ray_batch.py`` kills an actor process mid-run, and makes one request kill its worker every time).

Ray is imported only here, after ``RAY_USAGE_STATS_ENABLED=0`` is set. ``--ray local`` starts a private instance
for the command: every process on 127.0.0.1 (Ray's own switch ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes it use
the loopback address; ``_node_ip_address="127.0.0.1"`` alone is turned into the machine's address by Ray), no
dashboard, its files under a fresh temporary folder, its workers at the command's own priority (Ray renices its
workers by 15 unless ``RAY_worker_niceness`` says otherwise; on a busy machine they then starve for minutes);
``ray.shutdown()`` runs in ``finally`` and any process still running from that folder is then ended (``reap``). A
watchdog process (``watch``, in its own session so Ctrl-C does not reach it) does the same if the command dies
before its ``finally`` runs (killed, or crashed in Ray's shutdown), so nothing outlives the command.
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
    max_attempts: int = 3  # tries of one engine call whose actor dies; then the job stops naming its request
    crash_marker: str | None = None  # tests only: the first actor call to create this file kills its process
    crash_on: str | None = None  # tests only: the engine call holding this id kills its actor every time


def import_ray():
    """``ray`` with usage reporting off (set before the import), or a ClipDiffusionError saying how to get it."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the node address stays 127.0.0.1
    # The raylet gives the metrics agent (a Python process) 30 s to come up and aborts the node otherwise; on a
    # loaded machine it needs longer.
    os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")
    # Ray renices its workers by 15 by default: behind other work on a busy machine the model actors and replicas
    # then wait minutes for a core. They run at the priority of the command that started them instead.
    os.environ.setdefault("RAY_worker_niceness", "0")
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
def ray_session(address: str = "local", *, num_cpus: int | None = None, namespace: str | None = None,
                temp_root: str = "/tmp"):
    """``ray.init`` for the duration of the block, ``ray.shutdown()`` after it whatever happens. A local instance
    stays on 127.0.0.1 with its files in a new folder under ``temp_root`` (keep it short: Ray's socket paths must
    fit 107 bytes; tests pass their own to check ``session_processes(temp_root)``); processes left from that folder
    are ended, by this process or, if it dies first, by its watchdog."""
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
        temp_dir = tempfile.mkdtemp(prefix="cdray-", dir=temp_root)
        guard = start_watchdog(temp_dir)
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
                stop_watchdog(guard)


def start_watchdog(temp_dir: str):
    """A process (``watch``) that waits for this one to close the pipe it reads, or to die, then ends what is left
    of the instance in ``temp_dir``. Its own session: a Ctrl-C in the terminal does not reach it."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen([sys.executable, "-c", "from clipdiffusion.ray_batch import watch; watch()"],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)  # the pipe is not inherited by Ray's processes (PEP 446)
    proc.stdin.write(os.fsencode(temp_dir) + b"\n")
    proc.stdin.flush()
    return proc


def stop_watchdog(proc, timeout: float = 30.0) -> None:
    """Close the watchdog's pipe (it then checks once, finds nothing, and exits) and wait for it."""
    with contextlib.suppress(OSError):
        proc.stdin.close()
    try:
        proc.wait(timeout)
    except Exception:  # noqa: BLE001 - never leave it behind
        proc.kill()
        proc.wait()


def watch() -> None:
    """The watchdog's body (``start_watchdog``): the session folder from the first line of stdin, then wait for end
    of input (the driver closed the pipe after its own clean-up, or died), then ``reap`` the folder's processes
    and remove it."""
    import sys

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    temp_dir = sys.stdin.buffer.readline().rstrip(b"\n").decode()
    if not temp_dir:
        return
    while sys.stdin.buffer.read(65536):
        pass
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


class Ledger:
    """Engine calls begun and finished by the actors (a small actor with no CPU of its own). A start that did not
    finish is a worker that died in that call; ``begin`` refuses a call that has had ``limit`` of them, and the
    driver asks ``report`` which request that was."""

    def __init__(self):
        self.calls: dict[str, list] = {}  # first id -> [ids, begun, finished]
        self.refused: tuple | None = None  # (ids, deaths) of the call refused

    def begin(self, ids: list, limit: int | None = None) -> bool:
        """Record a start; False (and not recorded) when the call's worker has died ``limit`` times already."""
        entry = self.calls.setdefault(ids[0], [list(ids), 0, 0])
        deaths = entry[1] - entry[2]  # starts that never finished (this call is not running anywhere else)
        if limit is not None and deaths >= limit:
            self.refused = (list(ids), deaths)
            return False
        entry[1] += 1
        return True

    def end(self, ids: list) -> None:
        self.calls[ids[0]][2] += 1

    def report(self) -> dict:
        """``refused``: (ids, deaths) or None; ``unfinished``: ``[(ids, starts that did not finish)]``, most first."""
        out = [(ids, begun - done) for ids, begun, done in self.calls.values() if begun > done]
        return {"refused": self.refused, "unfinished": sorted(out, key=lambda item: -item[1])}


class GenerateActor:
    """One loaded pipeline; ``__call__`` runs a batch of engine calls (rows) and returns one row per image: id,
    seed, file, png (bytes), sha256, batch, timings (JSON text). Each call is recorded in ``ledger`` (a ``Ledger``
    actor handle) before and after it runs, and not run when its worker has died ``max_attempts`` times in it."""

    def __init__(self, model=None, device="cpu", dtype="fp32", threads=1, crash_marker=None, options=(),
                 ledger=None, max_attempts=3, crash_on=None):
        set_threads(threads)
        self.pipe = load_pipeline(model, device=device, dtype=dtype, **dict(options))
        self.threads = threads
        self.crash_marker = crash_marker
        self.crash_on = crash_on
        self.ledger = ledger
        self.max_attempts = max_attempts

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
            if self.ledger is not None:
                import ray

                if not ray.get(self.ledger.begin.remote(ids, self.max_attempts)):
                    raise ClipDiffusionError(f"request {ids[0]!r}: its worker died {self.max_attempts} time(s) in "
                                             "it; not tried again")
            if self.crash_on is not None and self.crash_on in ids:
                os.kill(os.getpid(), signal.SIGKILL)  # a request that kills its worker every time
            for image in run_unit(self.pipe, request, ids):
                for key in out:
                    value = image.get(key)
                    out[key].append(json.dumps(value) if key == "timings" else value)
                out["pid"][-1] = os.getpid()
            if self.ledger is not None:
                ray.get(self.ledger.end.remote(ids))
        return out


def check_attempts(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100:
        raise ClipDiffusionError(f"--max-attempts {value!r}: must be an integer in [1, 100]")
    return value


def build_dataset(ray, plan: JobPlan, settings: RaySettings, ledger=None):
    check_attempts(settings.max_attempts)
    actors, cpus, gpus = actor_resources(ray, settings)
    rows = unit_rows(plan.units)
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 4 * actors)))
    dataset = dataset.map(plan_row, num_cpus=0.05)
    return dataset.map_batches(
        GenerateActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus,
        num_gpus=gpus, zero_copy_batch=False,
        fn_constructor_kwargs={"model": settings.model, "device": settings.device if not gpus else "cuda",
                               "dtype": settings.dtype, "threads": settings.threads,
                               "crash_marker": settings.crash_marker, "options": settings.options,
                               "ledger": ledger, "max_attempts": settings.max_attempts,
                               "crash_on": settings.crash_on}), \
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
    ledger = ray.remote(num_cpus=0)(Ledger).remote()
    dataset, _ = build_dataset(ray, plan, settings, ledger)
    try:
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
    except Exception as exc:  # noqa: BLE001 - a dead worker is named below; anything else goes on as it was
        report = ray.get(ledger.report.remote(), timeout=60)
        refused = report["refused"]
        if refused is not None:
            (ids, deaths), others = refused, [u for u in report["unfinished"] if u[0] != refused[0]]
        elif _worker_died(ray, exc) and report["unfinished"]:
            (ids, deaths), others = report["unfinished"][0], report["unfinished"][1:]
        else:
            raise
        batch_note = f" (one engine call with {', '.join(map(repr, ids[1:]))})" if len(ids) > 1 else ""
        also = f"; also running then: {', '.join(repr(i[0]) for i, _ in others[:5])}" if others else ""
        raise ClipDiffusionError(
            f"--ray: the worker running request {ids[0]!r}{batch_note} died {deaths} time(s) (--max-attempts "
            f"{settings.max_attempts}), so the job stopped{also}; the {written} image(s) written are kept: rerun "
            "to retry, or leave that request out") from exc
    finally:
        ray.kill(ledger)
    missing = [item.id for item in plan.todo if item.id not in writer.written]
    if missing:
        raise ClipDiffusionError(f"--ray: {len(missing)} images did not come back (first: {missing[0]!r}); rerun "
                                 "to make them (finished ones are kept)")
    return written


def _worker_died(ray, exc: BaseException) -> bool:
    """Whether ``exc`` or an exception it wraps is Ray's report of a dead actor or worker process."""
    kinds = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError)
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kinds) or "ActorDiedError" in type(exc).__name__:
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _absolute_model(settings: RaySettings) -> RaySettings:
    import dataclasses

    return dataclasses.replace(settings, model=str(Path(settings.model).resolve()))
