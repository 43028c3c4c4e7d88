"""What the HTTP server costs on top of the engine: one txt2img through the A1111 API (webuiapi client ->
uvicorn -> validation -> worker queue -> Pipeline.generate -> PNG + base64 -> JSON) against the same
`Pipeline.generate` called directly in this process (the reference: the engine with no server around it).

Also: throughput with concurrent clients (the worker serialises jobs, so this shows the queue adds no stall), and
the latency of /api/tokenize (the page's live counter). Repetitions are interleaved and medians reported, since
other work shares the CPU.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_server.py --reps 15 --size 64 --steps 4
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line), "")
    except OSError:
        model = ""
    import torch

    return (f"machine: {model or platform.processor()}; torch {torch.__version__}; "
            f"threads {torch.get_num_threads()}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()

    import httpx
    import webuiapi

    from clipdiffusion.server.app import create_app
    from clipdiffusion.server.settings import ModelEntry, ServerSettings
    from clipdiffusion.testing import tiny_pipeline
    from server_fixtures import ServerThread

    pipe = tiny_pipeline(seed=0)
    params = dict(prompt="a red circle above a blue square", negative_prompt="blurry", steps=args.steps,
                  width=args.size, height=args.size)
    settings = ServerSettings(models=(ModelEntry("tiny"),), queue_size=2 * args.clients)
    direct, served, tokenize = [], [], []
    with ServerThread(create_app(lambda name: pipe, settings)) as server:
        client = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
        http = httpx.Client(base_url=server.url)
        kwargs = dict(params, cfg_scale=7.0, sampler_name="Euler")
        client.txt2img(seed=0, **kwargs)  # warm-up both paths
        pipe.generate(seed=0, guidance=7.0, sampler="euler", **params)
        for rep in range(args.reps):
            t = time.perf_counter()
            pipe.generate(seed=rep, guidance=7.0, sampler="euler", **params)
            direct.append(time.perf_counter() - t)
            t = time.perf_counter()
            result = client.txt2img(seed=rep, **kwargs)
            served.append(time.perf_counter() - t)
            assert result.image.size == (args.size, args.size)
            t = time.perf_counter()
            http.post("/api/tokenize", json={"prompt": params["prompt"] * 4, "long_prompt": "chunk"}).raise_for_status()
            tokenize.append(time.perf_counter() - t)

        # throughput: N jobs from N concurrent clients vs N direct calls in a row
        n = args.clients * 3
        t = time.perf_counter()
        for i in range(n):
            pipe.generate(seed=i, guidance=7.0, sampler="euler", **params)
        serial_s = time.perf_counter() - t
        errors = []

        def worker(k):
            c = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
            for i in range(3):
                try:
                    c.txt2img(seed=100 * k + i, **kwargs)
                except Exception as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)

        t = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(args.clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        concurrent_s = time.perf_counter() - t
        http.close()

    med_d, med_s = statistics.median(direct) * 1e3, statistics.median(served) * 1e3
    print(machine())
    print(f"tiny pipeline, {args.size}x{args.size}, {args.steps} steps euler, CFG; median of {args.reps} interleaved")
    print("| path | ms per image | ratio to direct |")
    print("|---|---|---|")
    print(f"| Pipeline.generate (direct) | {med_d:.1f} | 1.00 |")
    print(f"| webuiapi -> /sdapi/v1/txt2img | {med_s:.1f} | {med_s / med_d:.2f} |")
    print(f"server overhead per request: {med_s - med_d:.1f} ms (HTTP, JSON, queue hand-off, PNG, base64)")
    print(f"/api/tokenize (4x prompt, chunk): median {statistics.median(tokenize) * 1e3:.1f} ms")
    print(f"throughput, {n} images: direct serial {n / serial_s:.2f} img/s; {args.clients} concurrent HTTP "
          f"clients {n / concurrent_s:.2f} img/s (ratio {serial_s / concurrent_s:.2f}); errors {len(errors)}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
