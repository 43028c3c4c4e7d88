"""Shared helpers for the server tests: a fake pipeline that honours the real `Pipeline.generate` contract, and a
uvicorn server running in a thread on a free loopback port.

`FakePipeline` is a `Pipeline` whose engine is faked: `generate` itself is the real one (a `GenerationRequest` or
its keywords, validation, seed resolution, n_iter), and it returns the real `GenerationResult` with the real
`AttentionMaps`. The fake engine draws a flat colour from (prompt, seed), so a test can tell which request produced
which image; it calls `callback(step, total, x)` after each step and polls `should_stop` before each, like the
real samplers; a prompt containing "FAIL" raises inside the engine; `gate` (a threading.Semaphore) lets one step
through per release, so a test decides exactly how far a job gets.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from clipdiffusion.pipeline import AttentionMaps, GenerationResult, Pipeline
from clipdiffusion.request import GENERATE_ARGS, GenerationRequest
from clipdiffusion.commands.serve import graceful_server

FAKE_SAMPLERS = ("euler", "euler_a", "heun", "dpmpp_2m", "ddim")
FAKE_SCHEDULES = ("normal", "karras", "ddim")


def prompt_colour(prompt: str, seed: int) -> tuple[int, int, int]:
    digest = hashlib.sha256(f"{prompt}\0{seed}".encode()).digest()
    return digest[0], digest[1], digest[2]


@dataclass(eq=False)
class FakePipeline(Pipeline):
    """`Pipeline.generate` over a fake engine (`_size` and `_generate` are the parts it replaces)."""

    step_delay: float = 0.0
    gate: threading.Semaphore | None = None
    native_size: int = 64
    calls: list = field(default_factory=list)
    name: str = "fake"
    family: str = "tiny"
    text_encoder: object = None

    def _size(self, request: GenerationRequest) -> GenerationRequest:
        return request.replace(width=request.width or self.native_size, height=request.height or self.native_size)

    def _generate(self, request: GenerationRequest, callback, should_stop) -> GenerationResult:
        call = {name: getattr(request, name) for name in GENERATE_ARGS}
        call["steps_done"] = 0
        self.calls.append(call)
        if "FAIL" in request.prompt:
            raise RuntimeError("fake engine failure")
        if request.sampler not in FAKE_SAMPLERS:
            raise ValueError(f"unknown sampler {request.sampler!r}")
        width, height = request.width, request.height
        total = request.steps if request.init_image is None else max(1, int(request.steps * request.strength))
        interrupted = False
        for step in range(1, total + 1):
            if should_stop is not None and should_stop():
                interrupted = True
                break
            if self.gate is not None and not self.gate.acquire(timeout=10):
                raise RuntimeError("fake pipeline: gate never opened")
            if self.step_delay:
                time.sleep(self.step_delay)
            call["steps_done"] = step
            if callback is not None:
                callback(step, total, None)
        seeds = [request.seed + i for i in range(request.batch_size)]
        images = [Image.new("RGB", (width, height), prompt_colour(request.prompt, s)) for s in seeds]
        pixels = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])
        attention = None
        if request.attention_maps:
            # one map per prompt "token" (its words here): token t lights up column t, so a test can check which
            # map belongs to which token
            tokens = request.prompt.split()[:75]
            maps = np.zeros((len(tokens), height // 8, width // 8), dtype=np.float32)
            for t in range(len(tokens)):
                maps[t, :, t % (width // 8)] = 1.0
            attention = AttentionMaps(tokens, maps)
        return GenerationResult(images, seeds, self._infotexts(request, seeds), attention, pixels, interrupted)


@dataclass(frozen=True)
class FakeReport:
    chunks: int

    def to_dict(self) -> dict:
        return {"chunks": self.chunks}


class FakeTextEncoder:
    family = "tiny"

    def encode(self, prompt, negative_prompt="", clip_skip=None, long_prompt="chunk", weighting="a1111"):
        import torch

        from clipdiffusion.text.conditioning import Conditioning

        chunks = 1 + len(prompt) // 200
        g = torch.Generator().manual_seed(len(prompt))
        context = torch.randn(1, 77 * chunks, 32, generator=g)
        negative = torch.zeros(1, 77 * chunks, 32)
        return Conditioning(context, negative, report=FakeReport(chunks))


def fake_factory(pipe: FakePipeline | None = None, loaded: list | None = None):
    """A pipeline_factory returning `pipe` (or a fresh fake) and recording the names it was asked for."""

    def factory(name):
        if loaded is not None:
            loaded.append(name)
        if name == "broken":
            raise RuntimeError("cannot load model 'broken'")
        target = pipe or FakePipeline()
        target.text_encoder = FakeTextEncoder()
        return target

    return factory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """`with ServerThread(app) as server:` serves `app` on http://127.0.0.1:{server.port} until the block ends."""

    def __init__(self, app, port: int | None = None):
        self.port = port or free_port()
        self.server = graceful_server(app, "127.0.0.1", self.port, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 20) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "uvicorn did not stop"

    def __exit__(self, *exc):
        if self.thread.is_alive():
            self.stop()
