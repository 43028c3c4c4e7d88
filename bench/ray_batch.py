"""Beyond one machine, measured on this one: the batch job in-process against Ray Data with 1 and 2 actors, the
Ray path's overhead, one engine call of a seed batch against single calls, and Ray Serve with and without
request batching, on the embedded tiny model (64x64).

    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python bench/ray_batch.py --images 8 --steps 8

Prints the CPU, the torch thread count, every figure and the per-stage costs (text encoder, UNet+sampler, VAE,
PNG) that README's throughput model uses. Ray runs a private instance on 127.0.0.1 with usage stats off, shut
down at the end. Wall times include Ray's actor start (model load) unless said otherwise; other work shares
these cores, so treat small differences as noise.
"""

from __future__ import annotations

import argparse
import json
import os
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--serve-requests", type=int, default=8)
    parser.add_argument("--skip-serve", action="store_true")
    args = parser.parse_args()

    import torch

    from clipdiffusion import batch, ray_batch

    batch.set_threads(1)
    print(f"CPU: {machine()}, {os.cpu_count()} logical cores; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); job: {args.images} images, {args.steps} steps, 64x64, tiny model")
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

    # -- Ray Data ------------------------------------------------------------------------------------------------
    t = time.perf_counter()
    with ray_batch.ray_session("local", num_cpus=2) as ray:
        init = time.perf_counter() - t
        print(f"ray {ray.__version__}: ray.init {init:.1f} s")
        results = {}
        for actors in (1, 2):
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
        print(f"ray path overhead vs in-process (1 actor, incl. actor start, excl. ray.init): "
              f"{results[1][0] - local:+.2f} s on a {local:.2f} s job")

        # -- Ray Serve: batched vs single-request handling ---------------------------------------------------------
        if not args.skip_serve:
            serve_bench(ray, args, tmp)
    print(f"ray shut down; processes left: {len(ray_batch.ray_processes())}")


def serve_bench(ray, args, tmp):
    import concurrent.futures
    import socket

    import httpx
    from ray import serve

    from clipdiffusion.commands.serve import pipeline_factory
    from clipdiffusion.server import ray_serve
    from clipdiffusion.server.settings import ServerSettings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = ServerSettings(preload=False, queue_size=64)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    body = {"prompt": "a red circle", "steps": args.steps, "width": 64, "height": 64}
    try:
        for label, options in (("single-request (max_batch 1)", {"max_batch": 1}),
                               ("@serve.batch of 4, UNet batching on", {"max_batch": 4, "unet_batching": True})):
            serve.run(ray_serve.deployments(settings, pipeline_factory(settings), replicas=2, cpus_per_replica=0.5,
                                            max_ongoing_requests=64, max_queued_requests=64, **options),
                      name="bench", route_prefix="/")
            httpx.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", json={**body, "seed": 1}, timeout=600)  # warm
            httpx.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", json={**body, "seed": 2}, timeout=600)
            t = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(args.serve_requests) as pool:
                codes = list(pool.map(lambda i: httpx.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img",
                                                           json={**body, "seed": 1000 + i}, timeout=600).status_code,
                                      range(args.serve_requests)))
            wall = time.perf_counter() - t
            print(f"ray serve, 2 replicas, {label}: {args.serve_requests} concurrent txt2img in {wall:.2f} s = "
                  f"{args.serve_requests / wall:.2f} images/s; statuses {sorted(set(codes))}")
            serve.delete("bench")
    finally:
        serve.shutdown()


if __name__ == "__main__":
    main()
