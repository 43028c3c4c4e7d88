"""`create_app(pipeline_factory, settings) -> FastAPI`: the A1111-compatible API, our own routes and the page.

Handlers validate and translate (cheap, in the event loop or a thread pool), then hand the model work to the
single `Worker` and await its future. Everything a request can get wrong becomes a 4xx whose message names the
field and the value: `RequestError`/`ClipDiffusionError` -> 422, a full queue or a shutdown -> 503, a job that
fails inside the engine -> 500 with the error's type and text, and the worker goes on. `NonFiniteError` (NaN/Inf
from the model's weights or dtype) is a `ClipDiffusionError` but not the request's fault: 500 with its message,
as A1111 answers its NansException.

`pipeline_factory(model_name) -> Pipeline` is called in the worker thread the first time a model is needed
(never with a name outside `settings.models`). Building the app imports neither torch nor the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

from fastapi import Body, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from ..errors import ClipDiffusionError, NonFiniteError
from ..request import GenerationRequest, RequestError
from . import a1111, a1111_extra, images, sampler_names, vae_routes
from .middleware import BasicAuth, BodyLimit
from .own import EncodeRequest, GenerateRequest, TokenizeRequest, encode_stats, generate_plan, heatmaps
from .schemas import Img2ImgRequest, PNGInfoRequest, Txt2ImgRequest, json_safe
from .settings import ServerSettings
from .worker import Job, JobControl, QueueFull, Worker, WorkerStopped

STATIC = Path(__file__).parent / "static"
logger = logging.getLogger("clipdiffusion.server")


class JobFailed(RuntimeError):
    """A job raised something that is not a user error; carries the original for the 500 body."""

    def __init__(self, exc: BaseException):
        self.original = exc
        super().__init__(f"{type(exc).__name__}: {exc}")


class ServerState:
    """Per-app mutable state: the worker, the A1111 options, cached engine tables and tokenizer."""

    def __init__(self, pipeline_factory, settings: ServerSettings, tokenizer_factory=None):
        self.settings = settings
        from ..lora import LoraLibrary

        self.loras = LoraLibrary(settings.lora_dirs)  # one library for every model (torch-free until used)
        pipeline_factory = _with_loras(pipeline_factory, self.loras)
        if settings.embeddings_dir:
            pipeline_factory = _with_embeddings(pipeline_factory, settings.embeddings_dir)
        from ..text.cond_cache import ConditioningCache

        # encoded prompts reused across requests (bit-identical images); cleared when another model loads
        self.conditioning_cache = ConditioningCache()
        pipeline_factory = _with_conditioning_cache(pipeline_factory, self.conditioning_cache)
        self.worker = Worker(pipeline_factory, settings.queue_size, settings.shutdown_timeout)
        self._lock = threading.Lock()
        self.options = {"sd_model_checkpoint": settings.models[0].name,
                        "CLIP_stop_at_last_layers": settings.default_clip_skip, vae_routes.VAE_OPTION: "Automatic"}
        self.vaes = vae_routes.library(settings)  # --vae and --vae-dir files (names only until one is used)
        self._tables: tuple | None = None
        self._tokenizer = None
        self._tokenizer_factory = tokenizer_factory

    def tables(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(sampler names, schedule names) the engine offers."""
        if self._tables is None:
            samplers, schedules = self.settings.samplers, self.settings.schedules
            if samplers is None or schedules is None:
                from ..diffusion import samplers as engine

                samplers = samplers or tuple(engine.SAMPLERS)
                schedules = schedules or tuple(engine.SCHEDULES)
            self._tables = (tuple(samplers), tuple(schedules))
        return self._tables

    def tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                from .tokens import default_tokenizer

                self._tokenizer = (self._tokenizer_factory or default_tokenizer)()
                if self.settings.embeddings_dir:
                    from .tokens import with_embeddings

                    self._tokenizer = with_embeddings(self._tokenizer, self.settings.embeddings_dir)
            return self._tokenizer

    def reset_tokenizer(self) -> None:
        """Forget the tokenizer (after an embeddings refresh, so the counter sees the folder as it is now)."""
        with self._lock:
            self._tokenizer = None

    def options_snapshot(self) -> dict:
        with self._lock:
            return dict(self.options)

    def set_options(self, changes: dict) -> dict:
        updated, ignored, staged = [], [], {}
        for key, value in changes.items():
            if key == "sd_model_checkpoint":
                entry = self.settings.model(str(value))
                if entry is None:
                    raise RequestError(key, value, "not a listed model; available: "
                                       + ", ".join(m.name for m in self.settings.models))
                staged[key] = entry.name
            elif key == "CLIP_stop_at_last_layers":
                staged[key] = a1111.clip_skip_option(value, key, self.settings.limits)
            elif key == vae_routes.VAE_OPTION:
                staged[key] = vae_routes.check_option(self, value)
            else:
                ignored.append(key)
                continue
            updated.append(key)
        with self._lock:
            self.options.update(staged)
        return {"updated": updated, "ignored": ignored}

    async def run(self, kind: str, model: str, work: Callable, control: JobControl) -> Any:
        future = self.worker.submit(Job(kind, model, work, control))
        try:
            return await asyncio.wrap_future(future)
        except NonFiniteError as exc:  # the model is broken, not the request: 500, not 422
            raise JobFailed(exc.for_model(model)) from exc
        except (ClipDiffusionError, QueueFull, WorkerStopped):
            raise
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            raise JobFailed(exc) from exc


def _with_conditioning_cache(factory: Callable, cache) -> Callable:
    """The pipeline factory, each model it loads encoding through the server's conditioning cache (emptied first:
    its entries belong to the previous model)."""

    def load(name: str):
        pipe = factory(name)
        cache.clear()
        if hasattr(pipe, "enable_conditioning_cache"):
            pipe.enable_conditioning_cache(cache=cache)
        return pipe

    return load


def _with_loras(factory: Callable, library) -> Callable:
    """The pipeline factory, each model it loads sharing the server's LoRA library (``--loras DIR``)."""

    def load(name: str):
        pipe = factory(name)
        if hasattr(pipe, "apply_loras"):
            pipe.loras = library
        return pipe

    return load


def _lora_routes(app: FastAPI, state: ServerState) -> None:
    """A1111's ``GET /sdapi/v1/loras`` (``[{name, alias, path, metadata}]``, the path relative to its --loras
    folder) and ``POST /sdapi/v1/refresh-loras`` (rescan the folders; answers null as A1111's does)."""

    @app.get("/sdapi/v1/loras", tags=["a1111"])
    async def loras() -> list[dict]:
        return await run_in_threadpool(lambda: [e.describe() for e in state.loras.entries()])

    @app.post("/sdapi/v1/refresh-loras", tags=["a1111"])
    async def refresh_loras() -> None:
        await run_in_threadpool(state.loras.refresh)
        return None


def _with_embeddings(factory: Callable, folder: str) -> Callable:
    """The pipeline factory, plus loading the embeddings folder into each model it loads."""

    def load(name: str):
        pipe = factory(name)
        if getattr(pipe, "text_encoder", None) is not None and hasattr(pipe, "load_embeddings"):
            report = pipe.load_embeddings(folder)
            logger.info("embeddings for %s: %d loaded, %d skipped", name, len(report.loaded), len(report.skipped))
            for skipped, entry in report.skipped.items():
                logger.info("embedding %s skipped: %s", skipped, entry.get("reason"))
        return pipe

    return load


def _embeddings_info(pipe) -> dict:
    info = getattr(pipe, "embeddings_info", None)
    return info() if info is not None and getattr(pipe, "text_encoder", None) is not None else \
        {"loaded": {}, "skipped": {}}


def _embedding_routes(app: FastAPI, state: ServerState) -> None:
    """A1111's ``GET /sdapi/v1/embeddings`` (the selected model's embeddings: ``{"loaded": {name: {step,
    sd_checkpoint, sd_checkpoint_name, shape, vectors}}, "skipped": {name: {..., reason}}}``) and ``POST
    /sdapi/v1/refresh-embeddings`` (rescan the --embeddings folder; answers with the same body). Both run in the
    model worker, so a rescan never changes the embeddings under a running generation."""

    @app.get("/sdapi/v1/embeddings", tags=["a1111"])
    async def embeddings() -> dict:
        model = state.options_snapshot()["sd_model_checkpoint"]
        return await state.run("embeddings", model, lambda pipe, control: _embeddings_info(pipe), JobControl())

    @app.post("/sdapi/v1/refresh-embeddings", tags=["a1111"])
    async def refresh_embeddings() -> dict:
        folder = state.settings.embeddings_dir
        model = state.options_snapshot()["sd_model_checkpoint"]

        def work(pipe, control):
            if folder and getattr(pipe, "text_encoder", None) is not None and hasattr(pipe, "load_embeddings"):
                pipe.load_embeddings(folder)
            return _embeddings_info(pipe)

        result = await state.run("refresh-embeddings", model, work, JobControl())
        state.reset_tokenizer()
        return result


def _generate_work(plan: a1111.GenerationPlan, pipe, control: JobControl):
    """Runs in the worker: the request's n_iter engine calls, seeds consecutive across the whole batch as in A1111
    (the plan's seed is already resolved). The results' notes (prompt tags not applied, ...) go to `plan.notes`."""
    from ..families import get_family

    request = plan.request
    vae_routes.apply_vae(plan, pipe)  # the VAE this request asked for (sd_vae), or the checkpoint's own
    if plan.a1111_clip_skip and not get_family(pipe.family).a1111_clip_skip:
        request = dataclasses.replace(request, clip_skip=None)  # as A1111: the setting does not move this family
        plan.ignored.append(plan.clip_skip_field)
    images, seeds, infotexts, attention = [], [], [], None
    for iteration in range(request.n_iter):
        if control.should_stop():
            break
        control.begin_iteration(iteration)
        result = pipe.generate(request.for_iteration(iteration), callback=control.on_step,
                               should_stop=control.should_stop, missing_loras=plan.missing_loras)
        images += result.images
        seeds += result.seeds
        infotexts += result.infotexts
        if iteration == 0:
            attention = result.attention
        plan.notes.extend(n for n in getattr(result, "notes", ()) if n not in plan.notes)
    return images, seeds, infotexts, attention


def _error_body(exc: ClipDiffusionError) -> dict:
    loc = ["body", *exc.field.split(".")] if isinstance(exc, RequestError) else ["body"]
    item = {"loc": loc, "msg": str(exc), "type": "value_error"}
    value = getattr(exc, "value", None)
    if isinstance(value, str):
        item["input"] = value[:200]
    elif isinstance(value, int) or isinstance(value, float) and math.isfinite(value):
        item["input"] = value
    return {"detail": [item]}


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ClipDiffusionError)
    async def _user_error(request: Request, exc: ClipDiffusionError):
        return JSONResponse(_error_body(exc), status_code=422)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        # FastAPI's own handler echoes the offending input, and a NaN/Infinity literal there cannot be encoded
        # (a 500 instead of the 422): report the same errors with non-finite numbers as strings.
        return JSONResponse({"detail": json_safe(jsonable_encoder(exc.errors(), sqlalchemy_safe=False))},
                            status_code=422)  # fmt: skip

    @app.exception_handler(QueueFull)
    async def _busy(request: Request, exc: QueueFull):
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "2"})

    @app.exception_handler(WorkerStopped)
    async def _stopping(request: Request, exc: WorkerStopped):
        return JSONResponse({"detail": str(exc)}, status_code=503)

    @app.exception_handler(JobFailed)
    async def _failed(request: Request, exc: JobFailed):
        body = {"error": type(exc.original).__name__, "detail": str(exc.original), "errors": str(exc)}
        return JSONResponse(body, status_code=500)


def _preload(state: ServerState) -> None:
    model = state.options_snapshot()["sd_model_checkpoint"]
    future = state.worker.submit(Job("load", model, lambda pipe, control: None))

    def report(f):
        if f.exception() is not None:
            logger.error("could not load model %r: %s", model, f.exception())
        else:
            logger.info("model %r loaded", model)

    future.add_done_callback(report)


def create_app(pipeline_factory: Callable[[str], Any], settings: ServerSettings | None = None, *,
               tokenizer_factory: Callable[[], Any] | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    state = ServerState(pipeline_factory, settings, tokenizer_factory)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.worker.start()
        if settings.preload:
            _preload(state)
            await run_in_threadpool(state.tables)  # imports the engine now, not in the first request's handler
        try:
            yield
        finally:
            await run_in_threadpool(state.worker.stop)

    app = FastAPI(title="clipdiffusion", version="0.1.0", lifespan=lifespan,
                  description="AUTOMATIC1111-compatible API (a subset) and clipdiffusion's own routes.")
    app.state.server = state
    _install_error_handlers(app)
    _a1111_routes(app, state)
    _own_routes(app, state)
    _embedding_routes(app, state)
    _lora_routes(app, state)
    vae_routes.install(app, state)
    a1111_extra.register(app, state)  # cmd-flags, upscalers, prompt-styles, memory, extras, ... (A1111's shapes)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    # The last added runs first: auth, then the size limit, so strangers cannot even make us read a body.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if settings.api_auth:
        app.add_middleware(BasicAuth, credentials=settings.api_auth)
    return app


def _a1111_routes(app: FastAPI, state: ServerState) -> None:
    settings = state.settings

    async def generate(req: Txt2ImgRequest, kind: str) -> dict:
        samplers, schedules = state.tables()
        options = state.options_snapshot()
        plan = await run_in_threadpool(a1111.plan_a1111, req, settings, options, samplers, schedules)
        await run_in_threadpool(vae_routes.resolve_plan, state, plan, options)
        request = plan.request
        steps = request.steps if request.init_image is None else max(1, int(request.steps * request.strength))
        if request.enable_hr:  # both passes (the pipeline's callback counts across them)
            steps += request.hr_second_pass_steps or request.steps
        control = JobControl(steps=steps, iterations=request.n_iter)
        pictures, seeds, infotexts, _ = await state.run(kind, plan.model, partial(_generate_work, plan), control)
        if plan.save_images:  # into --save-dir only; a write failure is a note, the images still come back
            plan.notes += await run_in_threadpool(a1111_extra.save_pngs, settings, kind, pictures, infotexts, seeds)
        encoded = []
        if req.send_images:
            encoded = await run_in_threadpool(
                lambda: [images.encode_png(im, infotexts[i] if i < len(infotexts) else None)
                         for i, im in enumerate(pictures)])
        return {"images": encoded, "parameters": a1111.response_parameters(req),
                "info": a1111.info_json(req, plan, seeds, infotexts, control.interrupted)}

    @app.post("/sdapi/v1/txt2img", tags=["a1111"])
    async def txt2img(req: Txt2ImgRequest) -> dict:
        return await generate(req, "txt2img")

    @app.post("/sdapi/v1/img2img", tags=["a1111"])
    async def img2img(req: Img2ImgRequest) -> dict:
        return await generate(req, "img2img")

    @app.get("/sdapi/v1/sd-models", tags=["a1111"])
    async def sd_models() -> list[dict]:
        return [{"title": m.name, "model_name": m.name, "hash": None, "sha256": None, "filename": m.filename,
                 "config": None} for m in settings.models]

    @app.get("/sdapi/v1/options", tags=["a1111"])
    async def get_options() -> dict:
        return {**state.options_snapshot(), "sd_checkpoint_hash": None, "samples_format": "png"}

    @app.post("/sdapi/v1/options", tags=["a1111"])
    async def set_options(changes: dict[str, Any] = Body(...)) -> dict:
        return state.set_options(changes)

    @app.get("/sdapi/v1/samplers", tags=["a1111"])
    async def samplers() -> list[dict]:
        return sampler_names.sampler_items(state.tables()[0])

    @app.get("/sdapi/v1/schedulers", tags=["a1111"])
    async def schedulers() -> list[dict]:
        return sampler_names.scheduler_items(state.tables()[1])

    @app.get("/sdapi/v1/scripts", tags=["a1111"])
    async def scripts() -> dict:
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/progress", tags=["a1111"])
    async def progress(skip_current_image: bool = False) -> dict:
        snap = state.worker.snapshot()
        job, pending = snap["running"], snap["pending"]
        idle = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                "job_count": pending, "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
        if job is None:
            return {"progress": 0.0, "eta_relative": 0.0, "state": idle, "current_image": None, "textinfo": None}
        control = job.control
        done = control.fraction()
        elapsed = time.monotonic() - control.started
        eta = elapsed / done - elapsed if done > 0 else 0.0
        state_dict = {**idle, "interrupted": control.interrupted, "job": job.kind, "job_count": 1 + pending,
                      "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.submitted)),
                      "job_no": control.iteration, "sampling_step": control.step, "sampling_steps": control.steps}
        return {"progress": done, "eta_relative": eta, "state": state_dict, "current_image": None,
                "textinfo": f"step {control.step}/{control.steps}"}

    @app.post("/sdapi/v1/interrupt", tags=["a1111"])
    async def interrupt() -> dict:
        state.worker.interrupt()
        return {}

    @app.post("/sdapi/v1/png-info", tags=["a1111"])
    async def png_info(req: PNGInfoRequest) -> dict:
        max_pixels = settings.max_width * settings.max_height * 4
        text, items = await run_in_threadpool(images.read_png_text, req.image, max_pixels)
        return {"info": text, "items": items, "parameters": a1111.parse_parameters(text)}


def _own_routes(app: FastAPI, state: ServerState) -> None:
    settings = state.settings

    def weightings() -> list[str]:
        from ..text.conditioning import WEIGHTINGS  # torch-side module: imported in a pool thread

        return list(WEIGHTINGS)

    @app.get("/api/info", tags=["clipdiffusion"])
    async def info() -> dict:
        samplers, schedules = await run_in_threadpool(state.tables)
        from ..text.chunking import LONG_PROMPT_STRATEGIES

        limits = settings.limits
        from ..devices import resolve

        placement = await run_in_threadpool(resolve, settings.device, settings.dtype)
        return {"models": [m.name for m in settings.models], "options": state.options_snapshot(),
                "placement": {"device": settings.device, "dtype": settings.dtype, "resolved": placement.to_dict(),
                              "note": "per model, its family may upcast the VAE (SDXL's overflows in fp16)"},
                "conditioning_cache": state.conditioning_cache.stats(),
                "samplers": list(samplers), "schedules": list(schedules),
                "long_prompt": list(LONG_PROMPT_STRATEGIES), "weighting": await run_in_threadpool(weightings),
                "limits": {"max_width": limits.max_width, "max_height": limits.max_height,
                           "max_steps": limits.max_steps, "max_batch_size": limits.max_batch_size,
                           "max_prompt_chars": limits.max_prompt_chars}}

    @app.post("/api/tokenize", tags=["clipdiffusion"])
    async def tokenize(req: TokenizeRequest) -> dict:
        GenerationRequest.create(settings.limits, prompt=req.prompt, long_prompt=req.long_prompt, steps=req.steps)
        from .tokens import token_report

        return await run_in_threadpool(lambda: token_report(req.prompt, req.long_prompt, state.tokenizer(),
                                                            steps=req.steps, negative=req.negative,
                                                            positions=settings.text_positions))

    @app.post("/api/encode", tags=["clipdiffusion"])
    async def encode(req: EncodeRequest) -> dict:
        request = GenerationRequest.create(settings.limits, prompt=req.prompt, negative_prompt=req.negative_prompt,
                                           clip_skip=req.clip_skip, long_prompt=req.long_prompt,
                                           weighting=req.weighting)
        model = _model(state, req.model)
        return await state.run("encode", model, partial(encode_stats, request), JobControl())

    @app.post("/api/generate", tags=["clipdiffusion"])
    async def generate(req: GenerateRequest) -> dict:
        samplers, schedules = state.tables()
        plan = generate_plan(req, settings, _model(state, req.model), samplers, schedules)
        await run_in_threadpool(vae_routes.resolve_plan, state, plan, state.options_snapshot())
        control = JobControl(steps=plan.request.steps, iterations=1)
        pictures, seeds, infotexts, attention = await state.run("generate", plan.model,
                                                                partial(_generate_work, plan), control)

        def encode_all():  # the labels are the result's own: the conditioning's token plan, tokenized once
            return ([images.encode_png(im, infotexts[i] if i < len(infotexts) else None)
                     for i, im in enumerate(pictures)], heatmaps(attention))

        encoded, maps = await run_in_threadpool(encode_all)
        return {"images": encoded, "seeds": seeds, "infotexts": infotexts, "attention": maps,
                "interrupted": control.interrupted, "model": plan.model, "notes": plan.notes}


def _model(state: ServerState, name: str | None) -> str:
    if name is None:
        return state.options_snapshot()["sd_model_checkpoint"]
    entry = state.settings.model(name)
    if entry is None:
        raise RequestError("model", name, "not a listed model; available: "
                           + ", ".join(m.name for m in state.settings.models))
    return entry.name
