"""Shared helpers for the server tests: a fake pipeline that honours the `Pipeline.generate` contract, and a
uvicorn server running in a thread on a free loopback port.

The fake draws a flat colour from (prompt, seed), so a test can tell which request produced which image; it
calls `callback(step, total, x)` after each step and polls `should_stop` before each, like the real samplers;
a prompt containing "FAIL" raises inside the engine; `gate` (a threading.Semaphore) lets one step through per
release, so a test decides exactly how far a job gets.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from clipdiffusion.infotext import GenerationParameters, format_infotext
from clipdiffusion.server.cli import graceful_server

FAKE_SAMPLERS = ("euler", "euler_a", "heun", "dpmpp_2m", "ddim")
FAKE_SCHEDULES = ("normal", "karras", "ddim")


def prompt_colour(prompt: str, seed: int) -> tuple[int, int, int]:
    digest = hashlib.sha256(f"{prompt}\0{seed}".encode()).digest()
    return digest[0], digest[1], digest[2]


@dataclass
class FakeResult:
    images: list
    seeds: list
    infotexts: list
    attention: object = None

    @property
    def image(self):
        return self.images[0]


@dataclass
class FakePipeline:
    step_delay: float = 0.0
    gate: threading.Semaphore | None = None
    native_size: int = 64
    calls: list = field(default_factory=list)
    model_name: str = "fake"

    def generate(self, prompt, negative_prompt="", *, steps=20, guidance=7.0, seed=-1, sampler="euler",
                 schedule="normal", width=None, height=None, clip_skip=1, long_prompt="chunk", weighting="a1111",
                 batch_size=1, init_image=None, strength=0.75, attention_maps=False, callback=None,
                 should_stop=None):
        call = dict(prompt=prompt, negative_prompt=negative_prompt, steps=steps, guidance=guidance, seed=seed,
                    sampler=sampler, schedule=schedule, width=width, height=height, clip_skip=clip_skip,
                    long_prompt=long_prompt, weighting=weighting, batch_size=batch_size, init_image=init_image,
                    strength=strength, attention_maps=attention_maps, steps_done=0)
        self.calls.append(call)
        if "FAIL" in prompt:
            raise RuntimeError("fake engine failure")
        if sampler not in FAKE_SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}")
        width, height = width or self.native_size, height or self.native_size
        seed = seed if seed >= 0 else 12345
        total = steps if init_image is None else max(1, int(steps * strength))
        for step in range(1, total + 1):
            if should_stop is not None and should_stop():
                break
            if self.gate is not None and not self.gate.acquire(timeout=10):
                raise RuntimeError("fake pipeline: gate never opened")
            if self.step_delay:
                time.sleep(self.step_delay)
            call["steps_done"] = step
            if callback is not None:
                callback(step, total, None)
        seeds = [seed + i for i in range(batch_size)]
        images = [Image.new("RGB", (width, height), prompt_colour(prompt, s)) for s in seeds]
        infotexts = [format_infotext(GenerationParameters(
            prompt=prompt, negative_prompt=negative_prompt, steps=steps, sampler=sampler, schedule=schedule,
            guidance=guidance, seed=s, width=width, height=height, model=self.model_name, clip_skip=clip_skip))
            for s in seeds]
        attention = None
        if attention_maps:
            # (T, h, w): token t lights up column t, so a test can check which map belongs to which token
            attention = np.zeros((77, height // 8, width // 8), dtype=np.float32)
            for t in range(77):
                attention[t, :, t % (width // 8)] = 1.0
        return FakeResult(images, seeds, infotexts, attention)


class FakeTextEncoder:
    family = "tiny"

    def encode(self, prompt, negative_prompt="", clip_skip=1, long_prompt="chunk", weighting="a1111"):
        import torch

        chunks = 1 + len(prompt) // 200
        g = torch.Generator().manual_seed(len(prompt))
        context = torch.randn(1, 77 * chunks, 32, generator=g)
        negative = torch.zeros(1, 77 * chunks, 32)

        @dataclass
        class Cond:
            context: object
            negative_context: object
            pooled: object = None
            negative_pooled: object = None
            report: object = None

        return Cond(context, negative, report={"chunks": chunks})


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
