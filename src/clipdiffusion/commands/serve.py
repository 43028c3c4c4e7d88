"""`clipdiffusion serve`: run the HTTP API and the web page with uvicorn.

Binds 127.0.0.1 unless --listen: the API can run arbitrary prompts on your machine, so exposing it is a choice,
and --api-auth user:password puts HTTP basic auth in front of every route (pages and docs included).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..errors import ClipDiffusionError
from ..server.settings import ServerSettings, default_models, parse_api_auth

_DEFAULTS = ServerSettings()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", metavar="FILE",
                        help="a .safetensors file or diffusers folder to serve (repeat for several; clients pick "
                             "by name); default: the embedded tiny model")
    parser.add_argument("--text-encoder", metavar="FILE|FOLDER",
                        help="replace the text tower of every served model (SD1/SD2): a fine-tuned CLIP-L or "
                             "Long-CLIP (248 positions), as for generate --text-encoder")
    parser.add_argument("--vae", "--vae-path", dest="vae", metavar="FILE|FOLDER",
                        help="a VAE file (or diffusers AutoencoderKL folder) that the sd_vae option \"Automatic\" "
                             "decodes with, for every served model (as A1111's --vae-path)")
    parser.add_argument("--vae-dir", action="append", metavar="DIR",
                        help="a folder of VAE files (.safetensors .ckpt .pt, diffusers folders; repeatable): GET "
                             "/sdapi/v1/sd-vae lists them, clients pick one with sd_vae, POST /sdapi/v1/refresh-vae "
                             "rescans")
    from .. import devices

    devices.add_arguments(parser)
    parser.add_argument("--host", default=None, help="address to bind (default 127.0.0.1; 0.0.0.0 with --listen)")
    parser.add_argument("--port", type=int, default=_DEFAULTS.port, help="port (default %(default)s)")
    parser.add_argument("--listen", action="store_true", help="accept connections from other machines")
    parser.add_argument("--api-auth", metavar="USER:PASSWORD",
                        help="require HTTP basic auth on every route (user:password[,user:password])")
    parser.add_argument("--loras", action="append", metavar="DIR",
                        help="a folder of LoRA .safetensors files (repeatable): prompts apply them with "
                             "<lora:name:weight>; GET /sdapi/v1/loras lists them, POST /sdapi/v1/refresh-loras "
                             "rescans")
    parser.add_argument("--max-width", type=int, default=_DEFAULTS.max_width, help="default %(default)s")
    parser.add_argument("--max-height", type=int, default=_DEFAULTS.max_height, help="default %(default)s")
    parser.add_argument("--max-steps", type=int, default=_DEFAULTS.max_steps, help="default %(default)s")
    parser.add_argument("--max-batch-size", type=int, default=_DEFAULTS.max_batch_size, help="default %(default)s")
    parser.add_argument("--max-prompt-chars", type=int, default=_DEFAULTS.max_prompt_chars,
                        help="default %(default)s")
    parser.add_argument("--max-body-mb", type=int, default=_DEFAULTS.max_body_bytes // 2**20,
                        help="largest request body in MiB (default %(default)s)")
    parser.add_argument("--embeddings", metavar="DIR",
                        help="a folder of textual-inversion embeddings, loaded into each model; "
                             "POST /sdapi/v1/refresh-embeddings rescans it")
    parser.add_argument("--styles-file", action="append", metavar="FILE",
                        help="an A1111 styles.csv (name,prompt,negative_prompt; repeatable, a later file's style "
                             "replaces one of the same name): requests apply them with \"styles\", GET "
                             "/sdapi/v1/prompt-styles lists them; default: none")
    parser.add_argument("--save-dir", metavar="DIR",
                        help="where save_images: true writes PNGs (DIR/txt2img-images, DIR/img2img-images, as "
                             "A1111's output folders); default: none, and save_images is reported as ignored")
    parser.add_argument("--queue-size", type=int, default=_DEFAULTS.queue_size,
                        help="jobs that may wait behind the running one before requests get 503 "
                             "(default %(default)s)")
    ray = parser.add_argument_group("Ray Serve", "serve on Ray (pip install clipdiffusion[ray]): the same API as an "
                                                 "ingress in front of model replicas")
    ray.add_argument("--ray", nargs="?", const="local", metavar="auto|local|ADDRESS",
                     help="local (default when given): a private Ray instance on 127.0.0.1; auto: the running "
                          "cluster; or a cluster address")
    ray.add_argument("--replicas", type=int, default=2, help="model replicas (default %(default)s)")
    ray.add_argument("--cpus-per-replica", type=float, default=0.5, help="default %(default)s")
    ray.add_argument("--gpus-per-replica", type=float, default=0.0, help="default %(default)s (1 on a GPU cluster)")
    ray.add_argument("--max-ongoing", type=int, default=8,
                     help="requests the ingress runs at once before queueing (default %(default)s)")
    ray.add_argument("--max-queued", type=int, default=16,
                     help="requests queued in front of the ingress before 503 (default %(default)s)")


def build_settings(args: argparse.Namespace) -> ServerSettings:
    for path in args.model or ():
        if not os.path.exists(path):
            raise ClipDiffusionError(f"--model {path!r}: no such file or folder")
    text_encoder = getattr(args, "text_encoder", None)
    if text_encoder is not None and not os.path.exists(text_encoder):
        raise ClipDiffusionError(f"--text-encoder {text_encoder!r}: no such file or folder")
    lora_dirs = tuple(os.path.abspath(d) for d in getattr(args, "loras", None) or ())
    for folder in lora_dirs:
        if not os.path.isdir(folder):
            raise ClipDiffusionError(f"--loras {folder!r}: no such folder")
    embeddings = getattr(args, "embeddings", None)
    if embeddings is not None and not os.path.isdir(embeddings):
        raise ClipDiffusionError(f"--embeddings {embeddings!r}: no such folder")
    lora_dirs = tuple(os.path.abspath(d) for d in getattr(args, "loras", None) or ())
    for folder in lora_dirs:
        if not os.path.isdir(folder):
            raise ClipDiffusionError(f"--loras {folder!r}: no such folder")
    styles_files = tuple(os.path.abspath(f) for f in getattr(args, "styles_file", None) or ())
    save_dir = getattr(args, "save_dir", None)
    if save_dir is not None and not os.path.isdir(save_dir):
        raise ClipDiffusionError(f"--save-dir {save_dir!r}: no such folder")
    vae = getattr(args, "vae", None)
    if vae is not None and not os.path.exists(vae):
        raise ClipDiffusionError(f"--vae {vae!r}: no such file or folder")
    vae_dirs = tuple(os.path.abspath(d) for d in getattr(args, "vae_dir", None) or ())
    for folder in vae_dirs:
        if not os.path.isdir(folder):
            raise ClipDiffusionError(f"--vae-dir {folder!r}: no such folder")
    from ..devices import from_args, load_options

    device, dtype = from_args(args)
    host = args.host or ("0.0.0.0" if args.listen else _DEFAULTS.host)
    if not 0 < args.port < 65536:
        raise ClipDiffusionError(f"--port must be in 1..65535, got {args.port}")
    return ServerSettings(
        host=host, port=args.port, models=default_models(args.model), lora_dirs=lora_dirs,
        api_auth=parse_api_auth(args.api_auth) if args.api_auth else (),
        max_width=args.max_width, max_height=args.max_height, max_steps=args.max_steps,
        max_batch_size=args.max_batch_size, max_prompt_chars=args.max_prompt_chars,
        max_body_bytes=args.max_body_mb * 2**20, queue_size=args.queue_size, preload=True,
        text_encoder=os.path.abspath(text_encoder) if text_encoder is not None else None,
        text_positions=_text_positions(text_encoder),
        embeddings_dir=os.path.abspath(embeddings) if embeddings is not None else None, device=device, dtype=dtype,
        mmap=bool(getattr(args, "mmap", False)), compile=load_options(args).get("compile", "off"),
        styles_files=styles_files, save_dir=os.path.abspath(save_dir) if save_dir is not None else None,
        vae=os.path.abspath(vae) if vae is not None else None, vae_dirs=vae_dirs)


def _text_positions(text_encoder) -> int:
    """The replacement tower's window length (77 without one), read from its header for the token counter."""
    if text_encoder is None:
        return 77
    from ..checkpoints.text_encoders import text_encoder_positions

    return text_encoder_positions(text_encoder)


def pipeline_factory(settings: ServerSettings):
    """name -> Pipeline, for listed models only (the worker calls it when a request selects a model)."""

    def load(name: str):
        from ..pipeline import Pipeline

        entry = settings.model(name)
        if entry is None:  # the app validates names first; this guards the factory on its own
            raise ClipDiffusionError(f"model {name!r} is not listed")
        te = settings.text_encoder
        place = {"device": settings.device, "dtype": settings.dtype, "mmap": settings.mmap,
                 "compile": settings.compile}
        if entry.source is None:
            return Pipeline.default(text_encoder=te, **place)
        if os.path.isdir(entry.source):
            return Pipeline.from_pretrained(entry.source, text_encoder=te, **place)
        return Pipeline.from_file(entry.source, text_encoder=te, **place)

    return load


def graceful_server(app, host: str, port: int, log_level: str = "info"):
    """A uvicorn.Server that, on shutdown (Ctrl-C, SIGTERM), first stops the model worker: the running job is
    interrupted and answers with what it has, queued jobs answer 503, and only then does uvicorn wait for the
    connections to finish. Plain uvicorn would wait for every queued generation to run before exiting."""
    import asyncio

    import uvicorn

    class GracefulServer(uvicorn.Server):
        async def shutdown(self, sockets=None):
            await asyncio.get_running_loop().run_in_executor(None, app.state.server.worker.stop)
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=30)
    return GracefulServer(config)


def run(args: argparse.Namespace) -> int:
    from ..server.app import create_app

    settings = build_settings(args)
    log = logging.getLogger("clipdiffusion.server")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("clipdiffusion serve: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_auth:
        print(f"clipdiffusion serve: warning: listening on {settings.host} without --api-auth; anyone who can "
              "reach this port can use the API", file=sys.stderr)
    if getattr(args, "ray", None) is not None:
        from ..server.ray_serve import run_server

        print(f"clipdiffusion serve: Ray Serve at http://{settings.host}:{settings.port}/", file=sys.stderr)
        run_server(settings, pipeline_factory(settings), address=args.ray, replicas=args.replicas,
                   cpus_per_replica=args.cpus_per_replica, gpus_per_replica=args.gpus_per_replica,
                   max_ongoing_requests=args.max_ongoing, max_queued_requests=args.max_queued)
        return 0
    app = create_app(pipeline_factory(settings), settings)
    print(f"clipdiffusion serve: http://{settings.host}:{settings.port}/ (API docs at /docs)", file=sys.stderr)
    graceful_server(app, settings.host, settings.port).run()
    return 0
