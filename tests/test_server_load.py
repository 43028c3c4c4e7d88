"""A bounded load test on loopback: 10 concurrent clients mixing valid generations with invalid requests against
the real tiny engine. Every valid request must get its image (right size, right seed), every invalid one its
error naming the field, the server's RSS must stay flat after warm-up, and the worker must survive.

Bounded to about 20 s of load; run with -s to see the numbers (also written to artifacts/server_load.json).
"""

import base64
import io
import json
import os
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from clipdiffusion.server.app import create_app
from clipdiffusion.server.settings import ModelEntry, ServerSettings
from server_fixtures import ServerThread

pytestmark = pytest.mark.slow

CLIENTS = 10
ROUNDS = 8  # per client; each round is one valid generation plus one invalid request and a tokenize
LOAD_BUDGET_S = 20.0
RSS_GROWTH_LIMIT_MB = 64.0
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def valid_body(client: int, round_: int) -> dict:
    return {"prompt": f"a red circle number {client}", "seed": 1000 * client + round_, "steps": 2, "width": 16,
            "height": 16, "sampler_name": ("Euler", "Euler a", "DPM++ 2M")[round_ % 3], "cfg_scale": 5}


# (path, body or raw bytes, expected status, text the error must contain)
INVALID = [
    ("/sdapi/v1/txt2img", {"prompt": "p", "steps": 2, "width": 4096, "height": 16}, 422, "width"),
    ("/sdapi/v1/txt2img", {"prompt": "p", "steps": 2, "width": 16, "height": 16, "sampler_name": "DPM adaptive"}, 422,
     "sampler_name"),
    ("/sdapi/v1/img2img", {"prompt": "p", "init_images": ["not base64!"], "steps": 2, "width": 16, "height": 16}, 422,
     "init_images"),
    ("/sdapi/v1/txt2img", {"prompt": "p", "override_settings": {"sd_model_checkpoint": "/etc/passwd"}}, 422,
     "sd_model_checkpoint"),
    ("/sdapi/v1/txt2img", {"prompt": "x" * 5000}, 422, "prompt"),
    ("/sdapi/v1/txt2img", b"{not json", 422, "json"),
    ("/sdapi/v1/txt2img", {"prompt": "p", "steps": "lots"}, 422, "steps"),
    ("/api/generate", {"prompt": "p", "long_prompt": "squeeze"}, 422, "long_prompt"),
]


def run_client(url: str, index: int, deadline: float, results: dict) -> None:
    stats = {"valid_ok": 0, "invalid_ok": 0, "tokenize_ok": 0, "failures": []}
    with httpx.Client(base_url=url, timeout=60) as c:
        for round_ in range(ROUNDS):
            if time.monotonic() > deadline:
                break
            body = valid_body(index, round_)
            r = c.post("/sdapi/v1/txt2img", json=body)
            if r.status_code == 200:
                data = r.json()
                image = Image.open(io.BytesIO(base64.b64decode(data["images"][0])))
                info = json.loads(data["info"])
                if image.size == (16, 16) and info["seed"] == body["seed"]:
                    stats["valid_ok"] += 1
                else:
                    stats["failures"].append(f"wrong image {image.size} seed {info['seed']} for {body['seed']}")
            else:
                stats["failures"].append(f"valid request got {r.status_code}: {r.text[:200]}")
            path, payload, status, needle = INVALID[(index + round_) % len(INVALID)]
            if isinstance(payload, bytes):
                r = c.post(path, content=payload, headers={"content-type": "application/json"})
            else:
                r = c.post(path, json=payload)
            if r.status_code == status and needle in r.text:
                stats["invalid_ok"] += 1
            else:
                stats["failures"].append(f"{path} {payload!r:.60}: got {r.status_code} {r.text[:200]}")
            r = c.post("/api/tokenize", json={"prompt": body["prompt"], "long_prompt": "chunk"})
            if r.status_code == 200 and r.json()["summary"] == f"{4 + len(str(index))}/75":  # CLIP splits digits
                stats["tokenize_ok"] += 1
            else:
                stats["failures"].append(f"tokenize got {r.status_code}: {r.text[:200]}")
            c.get("/sdapi/v1/progress").raise_for_status()
    results[index] = stats


def test_concurrent_mixed_load_keeps_memory_flat():
    from clipdiffusion.testing import tiny_pipeline

    settings = ServerSettings(models=(ModelEntry("tiny"),), max_width=64, max_height=64, max_steps=20,
                              max_prompt_chars=1000, queue_size=CLIENTS + 2)
    app = create_app(lambda name: tiny_pipeline(seed=0), settings)
    with ServerThread(app) as server:
        # warm-up: model load, first-call allocations, tokenizer caches
        warm = {}
        run_client(server.url, 99, time.monotonic() + 30, warm)
        assert warm[99]["failures"] == []
        rss_before = rss_mb()
        results, threads = {}, []
        start = time.monotonic()
        deadline = start + LOAD_BUDGET_S
        for i in range(CLIENTS):
            threads.append(threading.Thread(target=run_client, args=(server.url, i, deadline, results)))
            threads[-1].start()
        for t in threads:
            t.join(LOAD_BUDGET_S + 30)
        elapsed = time.monotonic() - start
        rss_after = rss_mb()
        worker = app.state.server.worker
        assert worker.alive
        with httpx.Client(base_url=server.url) as c:
            assert c.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0

    failures = [f for s in results.values() for f in s["failures"]]
    totals = {k: sum(s[k] for s in results.values()) for k in ("valid_ok", "invalid_ok", "tokenize_ok")}
    numbers = {"clients": CLIENTS, "seconds": round(elapsed, 2), **totals, "failures": len(failures),
               "rss_before_mb": round(rss_before, 1), "rss_after_mb": round(rss_after, 1),
               "rss_growth_mb": round(rss_after - rss_before, 1), "jobs_completed": worker.completed,
               "jobs_failed": worker.failed}
    print("\nserver load:", json.dumps(numbers))
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "server_load.json").write_text(json.dumps(numbers, indent=2))
    assert len(results) == CLIENTS and failures == [], failures[:5]
    assert totals["valid_ok"] == totals["invalid_ok"] == totals["tokenize_ok"] >= CLIENTS * 2
    assert rss_after - rss_before < RSS_GROWTH_LIMIT_MB
