"""``clipdiffusion serve --ray``: the same FastAPI app (``server.app.create_app``) as a Ray Serve ingress in front of
model replicas (``pip install clipdiffusion[ray]``).

- ``Ingress``: ``@serve.ingress`` with the app built on the replica (``__serve_build_asgi_app__``). Its pipeline
  factory gives ``RemotePipeline`` proxies instead of models, and its worker is the app's ``Worker`` with several
  threads (``Worker(..., threads=n)``), so requests reach the model replicas in parallel; every route, its
  validation, its 422/500 answers and the app's bounded queue (503) are unchanged. Ray Serve adds its own
  backpressure in front (``max_ongoing_requests``/``max_queued_requests``: 503 when both are full).
- ``ModelReplica`` (``replicas`` of them, fractional CPUs, one GPU each when there are GPUs): the models, loaded on
  demand by Serve model multiplexing (``@serve.multiplexed``; the A1111 option ``sd_model_checkpoint`` picks the
  model id, so requests for one model go to replicas that have it loaded) and a ``@serve.batch`` handler that takes
  the requests that arrive together. Requests that differ only by consecutive seeds can run as one UNet batch
  (``unet_batching``); that is off by default because a batch is not bit-identical to single calls on CPU (up to
  1/255, see ``clipdiffusion.batch``), and a served image should be what ``generate`` gives for its seed.

Images cross between replicas as PNG bytes (lossless), requests as JSON text of ``GenerationRequest`` fields (an
init image or mask as PNG bytes). Under ``--ray`` the running job's progress and interrupt stay in the ingress (the
model replica finishes the call), and the per-model routes that need the model object in the ingress
(``/api/encode``, attention maps, embeddings listing, ``sd_vae`` swaps) answer with what the proxy can say or
an error naming the limitation. Ray is imported only here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import threading
from typing import Any

from ..batch import set_threads, shape_key
from ..errors import ClipDiffusionError
from ..ray_batch import import_ray
from ..request import GenerationRequest
from .worker import Worker

import_ray()  # RAY_USAGE_STATS_ENABLED=0 and the loopback switch before ray is imported
from ray import serve  # noqa: E402

MAX_MODELS_PER_REPLICA = 2

# -- requests and results across processes ---------------------------------------------------------------------


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _image(data: bytes):
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def encode_request(request: GenerationRequest) -> str:
    fields = {f.name: getattr(request, f.name) for f in dataclasses.fields(request)}
    for name in ("init_image", "mask"):
        fields[name] = None if fields[name] is None else _png(fields[name]).hex()
    return json.dumps(fields)


def decode_request(text: str) -> GenerationRequest:
    fields = json.loads(text)
    for name in ("init_image", "mask"):
        if fields.get(name) is not None:
            fields[name] = _image(bytes.fromhex(fields[name]))
    for name in ("styles", "loras"):
        fields[name] = tuple(tuple(x) if isinstance(x, list) else x for x in fields.get(name, ()))
    return GenerationRequest.create(**fields)


@dataclasses.dataclass
class RemoteResult:
    """What the app reads of a ``GenerationResult``."""

    images: list
    seeds: list
    infotexts: list
    notes: tuple = ()
    interrupted: bool = False
    attention: Any = None

    @property
    def image(self):
        return self.images[0]


class RemotePipeline:
    """The ingress's stand-in for a model: ``generate`` runs on a model replica (multiplexed by model name)."""

    def __init__(self, model: str, handle, info: dict):
        self.model = model
        self.handle = handle
        self.family = info["family"]
        self.name = info["name"]
        self.prediction = info.get("prediction", "eps")

    def generate(self, request, *, callback=None, should_stop=None, missing_loras="error"):
        if getattr(request, "attention_maps", False):
            raise ClipDiffusionError("attention_maps: not available under serve --ray")
        if should_stop is not None and should_stop():
            raise ClipDiffusionError("interrupted before the model replica started")
        payload = {"request": encode_request(request), "missing_loras": missing_loras}
        out = self.handle.options(multiplexed_model_id=self.model).generate.remote(payload).result()
        if "error" in out:
            kind, message = out["error"]
            raise (ClipDiffusionError if kind == "user" else RuntimeError)(message)
        if callback is not None and request.steps:
            callback(request.steps, request.steps, None)
        return RemoteResult([_image(b) for b in out["images"]], out["seeds"], out["infotexts"],
                            tuple(out["notes"]))


class RemoteFactory:
    """The ingress's pipeline factory: model name -> ``RemotePipeline`` on the model deployment ``handle``, one per
    model, kept (a proxy holds no weights), so the worker's threads switching models cost one ``describe`` call
    per model, not one per switch."""

    def __init__(self, handle):
        self.handle = handle
        self._proxies: dict[str, RemotePipeline] = {}
        self._lock = threading.Lock()

    def __call__(self, model: str) -> RemotePipeline:
        with self._lock:
            if model not in self._proxies:
                info = self.handle.options(multiplexed_model_id=model).describe.remote().result()
                self._proxies[model] = RemotePipeline(model, self.handle, info)
            return self._proxies[model]


# -- the deployments -------------------------------------------------------------------------------------------


class ModelReplica:
    """Loads models by name with ``pipeline_factory`` (multiplexed, at most ``max_models`` per replica) and runs
    generations; requests that arrive together are taken as one ``@serve.batch``."""

    def __init__(self, pipeline_factory, threads: int = 1, unet_batching: bool = False, max_batch: int = 4,
                 batch_wait_s: float = 0.02, settings=None):
        set_threads(threads)
        if settings is not None:  # the server's --loras and --embeddings, as create_app wraps its factory
            from ..lora import LoraLibrary
            from .app import _with_embeddings, _with_loras

            pipeline_factory = _with_loras(pipeline_factory, LoraLibrary(settings.lora_dirs))
            if settings.embeddings_dir:
                pipeline_factory = _with_embeddings(pipeline_factory, settings.embeddings_dir)
        self.factory = pipeline_factory
        self.threads = threads
        self.lock = threading.Lock()  # one model call at a time per replica
        self.batches: list[int] = []  # sizes of the batches taken (for tests and benchmarks)
        self.calls = 0
        self.set_batching(max_batch, unet_batching, batch_wait_s)

    def set_batching(self, max_batch: int, unet_batching: bool = False, batch_wait_s: float = 0.02) -> dict:
        """Change this replica's request batching in place (no restart, the models stay loaded): up to
        ``max_batch`` requests taken together (1: one at a time), waiting at most ``batch_wait_s`` for them;
        ``unet_batching`` merges consecutive seeds into one UNet batch. Returns the settings now in force."""
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= 64:
            raise ClipDiffusionError(f"max_batch {max_batch!r}: must be an integer in [1, 64]")
        if not isinstance(batch_wait_s, (int, float)) or not 0 <= batch_wait_s <= 10:
            raise ClipDiffusionError(f"batch_wait_s {batch_wait_s!r}: must be in [0, 10] seconds")
        self.unet_batching = bool(unet_batching)
        self._batched.set_max_batch_size(max_batch)
        self._batched.set_batch_wait_timeout_s(float(batch_wait_s))
        self.batching = {"max_batch": max_batch, "unet_batching": self.unet_batching,
                         "batch_wait_s": float(batch_wait_s)}
        return dict(self.batching)

    def reconfigure(self, config: dict) -> None:
        """Serve's ``user_config`` hook: ``{"max_batch": 4, "unet_batching": false, "batch_wait_s": 0.02}``
        (any subset) changes the batching of every replica without restarting it (``set_batching``)."""
        unknown = sorted(set(config) - set(self.batching))
        if unknown:
            raise ClipDiffusionError(f"user_config: unknown key(s) {unknown}; expected some of {sorted(self.batching)}")
        self.set_batching(**{**self.batching, **dict(config)})

    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS_PER_REPLICA)
    async def _load(self, model_id: str):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.factory, model_id)

    async def describe(self) -> dict:
        pipe = await self._load(serve.get_multiplexed_model_id())
        return {"family": pipe.family, "name": getattr(pipe, "name", "model"),
                "prediction": getattr(pipe, "prediction", "eps")}

    async def stats(self) -> dict:
        """Sizes of the batches taken, model calls made, the batching in force and this replica's process id."""
        import os

        return {"batches": list(self.batches), "calls": self.calls, "batching": dict(self.batching),
                "pid": os.getpid()}

    async def generate(self, payload: dict) -> dict:
        return await self._batched(serve.get_multiplexed_model_id(), payload)

    def _run(self, pipe, request: GenerationRequest, missing: str) -> dict:
        with self.lock:
            set_threads(self.threads)
            self.calls += 1
            result = pipe.generate(request, missing_loras=missing)
        return {"images": [_png(im) for im in result.images], "seeds": [int(s) for s in result.seeds],
                "infotexts": list(result.infotexts), "notes": list(getattr(result, "notes", ()))}

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.02)
    async def _batched(self, model_ids: list, payloads: list) -> list:
        self.batches.append(len(payloads))
        loop = asyncio.get_running_loop()
        out: list = [None] * len(payloads)
        groups = plan_served(model_ids, payloads, self.unet_batching)
        for model_id, indices, merged in groups:
            try:
                pipe = await self._load(model_id)
                if merged is not None:  # consecutive seeds of one request shape: one UNet batch
                    result = await loop.run_in_executor(None, self._run, pipe, merged,
                                                        payloads[indices[0]]["missing_loras"])
                    for k, i in enumerate(indices):
                        out[i] = {key: (value[k:k + 1] if key in ("images", "seeds", "infotexts") else value)
                                  for key, value in result.items()}
                    continue
                for i in indices:
                    request = decode_request(payloads[i]["request"])
                    out[i] = await loop.run_in_executor(None, self._run, pipe, request,
                                                        payloads[i]["missing_loras"])
            except ClipDiffusionError as exc:
                for i in indices:
                    out[i] = out[i] or {"error": ["user", str(exc)]}
            except Exception as exc:  # noqa: BLE001 - one request's failure answers that request
                for i in indices:
                    out[i] = out[i] or {"error": ["engine", f"{type(exc).__name__}: {exc}"]}
        return out


def plan_served(model_ids: list, payloads: list, unet_batching: bool) -> list:
    """``[(model_id, indices, merged request or None)]``: by model; with ``unet_batching``, txt2img requests of one
    shape, prompt and LoRA setting whose seeds are consecutive become one request of ``batch_size`` n."""
    out = []
    by_model: dict[str, list[int]] = {}
    for i, model_id in enumerate(model_ids):
        by_model.setdefault(model_id, []).append(i)
    for model_id, indices in by_model.items():
        if not unet_batching:
            out.append((model_id, indices, None))
            continue
        requests = {i: decode_request(payloads[i]["request"]) for i in indices}
        runs: list[list[int]] = []
        for i in sorted(indices, key=lambda i: (shape_key(requests[i]), requests[i].prompt, requests[i].seed)):
            r = requests[i]
            if runs:
                last = requests[runs[-1][-1]]
                if (r.init_image is None and last.init_image is None and r.batch_size == 1 and r.n_iter == 1
                        and r.seed == last.seed + 1 and last.seed != -1
                        and dataclasses.replace(r, seed=last.seed) == last
                        and payloads[i]["missing_loras"] == payloads[runs[-1][-1]]["missing_loras"]):
                    runs[-1].append(i)
                    continue
            runs.append([i])
        for run in runs:
            first = requests[run[0]]
            merged = dataclasses.replace(first, batch_size=len(run)) if len(run) > 1 else None
            out.append((model_id, run, merged))
    return out


def deployments(settings, pipeline_factory, *, replicas: int = 2, cpus_per_replica: float = 0.5,
                gpus_per_replica: float = 0.0, threads: int = 1, max_ongoing_requests: int = 8,
                max_queued_requests: int = 16, max_batch: int = 4, batch_wait_s: float = 0.02,
                unet_batching: bool = False, max_models: int = 2):
    """The Serve application (``Ingress.bind(ModelReplica.bind(...))``) for ``serve.run``."""
    models = serve.deployment(
        ModelReplica, name="models", num_replicas=replicas, max_ongoing_requests=max(max_batch, 1) * 2,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
    ).bind(pipeline_factory, threads, unet_batching, max_batch, batch_wait_s, settings)

    class Ingress:
        def __init__(self, model_handle):
            self.model_handle = model_handle

        def __serve_build_asgi_app__(self):
            from .app import create_app

            factory = RemoteFactory(self.model_handle)
            app = create_app(factory, settings)
            # jobs are proxies that wait on the replicas, so several run at once (enough to fill every batch)
            app.state.server.worker = Worker(factory, settings.queue_size, settings.shutdown_timeout,
                                             threads=max(2, replicas * max_batch))
            return app

    ingress = serve.deployment(
        serve.ingress()(Ingress), name="ingress", num_replicas=1, max_ongoing_requests=max_ongoing_requests,
        max_queued_requests=max_queued_requests, ray_actor_options={"num_cpus": 0.1},
    )
    return ingress.bind(models)


def run_server(settings, pipeline_factory, *, address: str = "local", port: int | None = None, **options):
    """``serve --ray``: Ray Serve on ``settings.host``:``port`` until interrupted; Ray shut down after."""
    import time

    from ..ray_batch import ray_session

    with ray_session(address, namespace="clipdiffusion"):
        serve.start(http_options={"host": settings.host, "port": port or settings.port})
        try:
            serve.run(deployments(settings, pipeline_factory, **options), name="clipdiffusion", route_prefix="/")
            while True:
                time.sleep(1.0)
        finally:
            serve.shutdown()
