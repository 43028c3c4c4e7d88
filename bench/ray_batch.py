"""Beyond one machine, measured on this one: the batch job in-process against Ray Data with 1 and 2 actors, the
Ray path's overhead, one engine call of a seed batch against single calls, and Ray Serve with and without
request batching, on the embedded tiny model (64x64).

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/ray_batch.py --images 8 --steps 8

Prints the CPU, the torch thread count and dtype, every figure and the per-stage costs (text encoder,
UNet+sampler, VAE, PNG) that README's throughput model uses. Ray runs a private instance on 127.0.0.1 with usage
stats off, shut down at the end. Wall times include Ray's actor start (model load) unless said otherwise; other
work shares these cores, so treat small differences as noise.

Ray Serve part: ONE model replica (0.5 CPU, the ingress 0.1) deployed once; its batching is switched in place
between rounds (``ModelReplica.set_batching``: same process, model loaded once) among single-request handling
(``@serve.batch`` max 1), batches of up to 4 run one request after another, and batches of up to 4 with
consecutive seeds merged into one UNet batch; each round sends ``--serve-requests`` concurrent txt2img requests
over HTTP, the configurations interleaved round by round. The whole run has a ``--deadline``; Ray is cleaned up
whatever happens (Ctrl-C included: the session's watchdog process ends what the driver could not).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine  # noqa: E402


def job(n: int, steps: int, tmp: Path):
    path = tmp / "requests.jsonl"
    path.write_text("".join(json.dumps({"id": f"img-{i}", "prompt": f"a red circle number {i}", "steps": steps,
                                        "seed": 100 + i}) + "\n" for i in range(n)))
    return path


def fresh(tmp: Path, name: str) -> Path:
    out = tmp / name
    out.mkdir()
    return out


def stage_means(out: Path) -> dict:
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    return {k: statistics.mean(r["timings"][k] / r["batch"] if k != "png" else r["timings"][k] for r in records)
            for k in ("encode", "sample", "vae", "png", "total")}


def writer_cost(batch, tmp: Path, n: int = 40, size: int = 400_000) -> float:
    """Seconds per image of the job's one writer (``batch.Writer``: sha256 check, atomic PNG write with fsync, one
    fsynced manifest line) for a PNG of ``size`` bytes (a 512x512 SD image is ~0.4 MB); the median of ``n``."""
    import hashlib

    writer = batch.Writer(batch.Manifest.open(fresh(tmp, "writer")))
    times = []
    for i in range(n):
        data = os.urandom(size)
        row = {"id": f"w{i}", "seed": i, "png": data, "sha256": hashlib.sha256(data).hexdigest(), "batch": 1,
               "timings": {}}
        t = time.perf_counter()
        writer.write(row)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--serve-requests", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="Ray Serve: rounds of each configuration")
    parser.add_argument("--skip-serve", action="store_true")
    parser.add_argument("--skip-data", action="store_true", help="only the in-process figures and Ray Serve")
    parser.add_argument("--deadline", type=int, default=1800, help="seconds for the whole run (then it stops)")
    args = parser.parse_args()

    def expired(signum, frame):
        raise TimeoutError(f"--deadline {args.deadline} s passed")

    signal.signal(signal.SIGALRM, expired)
    signal.alarm(args.deadline)
    try:
        run(args)
    finally:
        signal.alarm(0)


def run(args):
    import torch

    from clipdiffusion import batch, ray_batch

    batch.set_threads(1)
    print(f"CPU: {machine()}, {os.cpu_count()} logical cores; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), fp32; job: {args.images} images, {args.steps} steps, 64x64, "
          f"tiny model; load average {os.getloadavg()[0]:.1f}")
    tmp = Path(tempfile.mkdtemp(prefix="raybench-"))
    requests = job(args.images, args.steps, tmp)
    items = batch.read_jsonl(requests)

    # -- in-process ----------------------------------------------------------------------------------------------
    t = time.perf_counter()
    pipe = batch.load_pipeline()
    load = time.perf_counter() - t
    out = fresh(tmp, "local")
    t = time.perf_counter()
    batch.run_local(pipe, batch.prepare(items, out), threads=1)
    local = time.perf_counter() - t
    stages = stage_means(out)
    print(f"in-process: model load {load:.2f} s; job {local:.2f} s = {local / args.images:.3f} s/image")
    print("  per image: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in stages.items()))

    # one engine call of 4 seeds against 4 calls (what UNet batching buys, and why it is opt-in)
    reps = []
    for _ in range(2):
        t = time.perf_counter()
        for s in range(4):
            pipe.generate("a red circle", steps=args.steps, seed=s)
        single = time.perf_counter() - t
        t = time.perf_counter()
        pipe.generate("a red circle", steps=args.steps, seed=0, batch_size=4)
        reps.append((single, time.perf_counter() - t))
    single, batched = min(r[0] for r in reps), min(r[1] for r in reps)
    print(f"engine: 4 single calls {single:.2f} s, one batch_size=4 call {batched:.2f} s ({single / batched:.2f}x)")
    print(f"writer (sha256 + atomic write + fsync + manifest line), 0.4 MB PNG: "
          f"{writer_cost(batch, tmp) * 1000:.1f} ms/image (median of 40)")
    if args.skip_data and args.skip_serve:
        return

    # -- Ray Data ------------------------------------------------------------------------------------------------
    root = tempfile.mkdtemp(prefix="cdb-", dir="/tmp")  # the instance's folder goes in here
    try:
        ray_part(args, ray_batch, batch, items, tmp, local, root)
    finally:
        print(f"ray shut down; processes of its instance left: {len(ray_batch.session_processes(root))}")
        shutil.rmtree(root, ignore_errors=True)


def ray_part(args, ray_batch, batch, items, tmp, local, root):
    t = time.perf_counter()
    with ray_batch.ray_session("local", num_cpus=2, temp_root=root) as ray:
        init = time.perf_counter() - t
        print(f"ray {ray.__version__}: ray.init {init:.1f} s")
        results = {}
        for actors in (() if args.skip_data else (1, 2)):
            out = fresh(tmp, f"ray{actors}")
            settings = ray_batch.RaySettings(actors=actors, threads=1)
            t = time.perf_counter()
            first = []
            ray_batch.run_in_session(ray, batch.prepare(items, out), settings,
                                     on_row=lambda row: first.append(time.perf_counter()))
            wall = time.perf_counter() - t
            steady = (first[-1] - first[0]) / max(1, len(first) - 1) if len(first) > 1 else float("nan")
            same = all((out / f"img-{i}.png").read_bytes() == (tmp / "local" / f"img-{i}.png").read_bytes()
                       for i in range(args.images))
            results[actors] = (wall, steady)
            print(f"ray data, {actors} actor(s): job {wall:.2f} s (incl. actor start), first image after "
                  f"{first[0] - t:.2f} s, then {steady:.3f} s/image; bytes identical to in-process: {same}")
        if results:
            print(f"ray path overhead vs in-process (1 actor, incl. actor start, excl. ray.init): "
                  f"{results[1][0] - local:+.2f} s on a {local:.2f} s job")

        # -- Ray Serve: batched vs single-request handling ---------------------------------------------------------
        if not args.skip_serve:
            serve_bench(ray, args, tmp)



SERVE_CONFIGS = (("single-request (@serve.batch max 1)", {"max_batch": 1, "unet_batching": False}),
                 ("@serve.batch max 4, run one by one", {"max_batch": 4, "unet_batching": False}),
                 ("@serve.batch max 4, UNet batching", {"max_batch": 4, "unet_batching": True}))


def serve_bench(ray, args, tmp):
    import base64
    import concurrent.futures
    import io
    import socket

    import httpx
    import numpy as np
    from PIL import Image
    from ray import serve

    from clipdiffusion.commands.serve import pipeline_factory
    from clipdiffusion.server import ray_serve
    from clipdiffusion.server.settings import ServerSettings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/sdapi/v1/txt2img"
    settings = ServerSettings(preload=False, queue_size=64)
    body = {"prompt": "a red circle", "steps": args.steps, "width": 64, "height": 64, "sampler_name": "Euler"}
    n = args.serve_requests
    interrupted = False
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        t = time.perf_counter()
        serve.run(ray_serve.deployments(settings, pipeline_factory(settings), replicas=1, cpus_per_replica=0.5,
                                        max_ongoing_requests=64, max_queued_requests=64, max_batch=4),
                  name="bench", route_prefix="/")
        models = serve.get_deployment_handle("models", app_name="bench")
        for seed in (1, 2):  # the replica loads its model on the first request
            httpx.post(url, json={**body, "seed": seed}, timeout=600).raise_for_status()
        print(f"ray serve: 1 replica (0.5 CPU) + ingress (0.1 CPU) up and warm in {time.perf_counter() - t:.1f} s")

        def one(i):
            response = httpx.post(url, json={**body, "seed": 1000 + i}, timeout=600)
            response.raise_for_status()
            data = base64.b64decode(response.json()["images"][0])
            return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

        walls = {label: [] for label, _ in SERVE_CONFIGS}
        images, batches, pids = {}, {}, set()
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            for r in range(args.rounds):
                order = SERVE_CONFIGS[r % 3:] + SERVE_CONFIGS[:r % 3]  # interleaved, each first in turn
                for label, config in order:
                    models.set_batching.remote(config["max_batch"], config["unet_batching"]).result()
                    before = models.stats.remote().result()
                    t = time.perf_counter()
                    out = list(pool.map(one, range(n)))
                    walls[label].append(time.perf_counter() - t)
                    after = models.stats.remote().result()
                    pids.add(after["pid"])
                    batches.setdefault(label, []).extend(after["batches"][len(before["batches"]):])
                    images.setdefault(label, out)
                    print(f"  round {r + 1}, {label}: {n} concurrent in {walls[label][-1]:.2f} s")
        base = statistics.median(walls[SERVE_CONFIGS[0][0]])
        print(f"ray serve, 1 replica, {n} concurrent txt2img ({args.steps} steps, 64x64), median of {args.rounds} "
              f"interleaved rounds; same replica process throughout: {len(pids) == 1}")
        for label, _ in SERVE_CONFIGS:
            wall = statistics.median(walls[label])
            same = all(np.array_equal(a, b) for a, b in zip(images[label], images[SERVE_CONFIGS[0][0]]))
            sizes = sorted(set(batches[label]))
            print(f"  {label}: {wall:.2f} s = {n / wall:.2f} images/s, {base / wall:.2f}x single-request; "
                  f"batch sizes taken {sizes}; pixels identical to single-request: {same}")
        serve.delete("bench")
    except BaseException:
        interrupted = True  # Ctrl-C or the deadline: Ray's own shutdown then ends Serve (serve.shutdown may hang)
        raise
    finally:
        if not interrupted:
            serve.shutdown()


if __name__ == "__main__":
    main()
