"""``clipdiffusion generate "PROMPT" -o out.png``: a thin client of ``Pipeline.generate``. The arguments become a
``GenerationRequest`` (its defaults are argparse's), checked before the model loads.

Progress and the generation's notes (a ``<lora:...>`` tag that was not applied) go to stderr; each image is a
PNG whose "parameters" text chunk holds the A1111 infotext (the prompt verbatim), so A1111's "PNG Info" tab, our
server and ``infotext.parse_infotext`` read the settings back. ``--seed -1`` (the default) picks a seed and records
it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..errors import ClipDiffusionError, NonFiniteError


def add_arguments(parser):
    from ..diffusion.samplers import SAMPLERS, SCHEDULES
    from ..request import DEFAULTS, LONG_PROMPTS, WEIGHTINGS

    d = DEFAULTS  # one set of defaults: GenerationRequest's
    parser.add_argument("prompt", help="the prompt (A1111 syntax: emphasis, BREAK, [a:b:when] editing, [a|b] "
                                       "alternation, AND with :weight; <lora:name:weight> applies a LoRA of "
                                       "--loras)")
    parser.add_argument("--model", metavar="FILE|FOLDER",
                        help="a .safetensors checkpoint or a diffusers folder (default: the embedded tiny model)")
    from .. import devices

    devices.add_arguments(parser)
    parser.add_argument("--text-encoder", metavar="FILE|FOLDER",
                        help="replace the model's text tower (SD1/SD2): a fine-tuned CLIP-L or Long-CLIP (248 "
                             "positions: one window of up to 246 tokens) as .safetensors/.pt (weights only), "
                             "OpenAI-CLIP, transformers or SD1 layout, or a text_encoder folder")
    parser.add_argument("--vae", "--vae-path", dest="vae", metavar="FILE|FOLDER",
                        help="decode with this VAE instead of the model's own: an LDM VAE file (SD's "
                             "vae-ft-mse-840000-ema-pruned, SDXL's sdxl_vae; .safetensors, or .ckpt/.pt read "
                             "weights-only) or a diffusers AutoencoderKL folder; the model's scale factor is kept")
    parser.add_argument("--negative", default=d["negative_prompt"], metavar="TEXT", help="negative prompt")
    parser.add_argument("--steps", type=int, default=d["steps"])
    parser.add_argument("--seed", type=int, default=d["seed"], help="-1 picks a random seed (recorded in the PNG)")
    parser.add_argument("--sampler", default=d["sampler"], metavar="NAME",
                        help=f"ours ({', '.join(SAMPLERS)}) or an A1111 name (\"DPM++ 2M SDE\", \"DPM2 a Karras\", "
                             "k_lms, ...)")
    parser.add_argument("--schedule", "--scheduler", dest="schedule", default=None, metavar="NAME",
                        help=f"ours ({', '.join(SCHEDULES)}) or an A1111 label (\"SGM Uniform\", ...); default: "
                             f"A1111's Automatic for an A1111 sampler name, else {d['schedule']}")
    parser.add_argument("--guidance", type=float, default=d["guidance"], help="classifier-free guidance scale (CFG)")
    parser.add_argument("--width", type=int, default=d["width"], help="default: the model's native size")
    parser.add_argument("--height", type=int, default=d["height"], help="default: the model's native size")
    parser.add_argument("--clip-skip", type=int, default=d["clip_skip"],
                        help="A1111 counting: 1 = last layer, 2 = penultimate (default: the model's own, SD1 1, "
                             "SD2/SDXL 2)")
    parser.add_argument("--long-prompt", choices=list(LONG_PROMPTS), default=d["long_prompt"])
    parser.add_argument("--weighting", choices=list(WEIGHTINGS), default=d["weighting"])
    parser.add_argument("--batch-size", type=int, default=d["batch_size"])
    parser.add_argument("--prediction", choices=("eps", "v"),
                        help="override the detected prediction type (SD2 768-v models are v)")
    parser.add_argument("--init-image", metavar="PNG", help="img2img: start from this image")
    parser.add_argument("--strength", type=float, default=d["strength"],
                        help="img2img denoising strength in (0, 1]")
    inpaint = parser.add_argument_group(
        "inpainting", "A1111's inpainting (needs --init-image): --mask is white where the image is repainted")
    inpaint.add_argument("--mask", metavar="IMAGE", help="the mask (white = repaint; an alpha channel counts)")
    inpaint.add_argument("--mask-blur", type=int, default=d["mask_blur"], metavar="N",
                         help=f"Gaussian blur of the mask in pixels (default {d['mask_blur']})")
    inpaint.add_argument("--inpainting-fill", choices=INPAINT_FILLS, default=INPAINT_FILLS[d["inpainting_fill"]],
                         help="what the masked area starts from (default fill: blurred surrounding colours)")
    inpaint.add_argument("--inpaint-full-res", action="store_true",
                         help="inpaint only the masked area (plus --inpaint-padding) at --width x --height and "
                              "paste it back (A1111's 'Only masked')")
    inpaint.add_argument("--inpaint-padding", type=int, default=d["inpaint_full_res_padding"], metavar="PX",
                         help="pixels around the mask for --inpaint-full-res")
    inpaint.add_argument("--mask-invert", action="store_true", help="repaint what the mask does not cover")
    inpaint.add_argument("--resize-mode", choices=RESIZE_MODES, default=RESIZE_MODES[d["resize_mode"]],
                         help="how the init image is fitted to --width x --height (A1111's resize modes)")
    hires = parser.add_argument_group(
        "hires fix", "A1111's hires fix: a first pass at --width x --height, an upscale, then an img2img second pass "
                     "at --denoising-strength; on when --hr, --hr-scale, --hr-resize-x/-y or --hr-upscaler is given")
    hires.add_argument("--hr", action="store_true", help="hires fix with the defaults (x2, Latent)")
    hires.add_argument("--hr-scale", type=float, metavar="X", help=f"upscale factor (default {d['hr_scale']:g})")
    hires.add_argument("--hr-resize-x", type=int, metavar="W", help="upscale to this width instead (A1111's rules)")
    hires.add_argument("--hr-resize-y", type=int, metavar="H", help="upscale to this height instead")
    hires.add_argument("--hr-upscaler", metavar="NAME",
                       help="Latent, Latent (antialiased), Latent (bicubic), Latent (bicubic antialiased), "
                            "Latent (nearest), Latent (nearest-exact), None, Lanczos or Nearest (default Latent)")
    hires.add_argument("--hr-steps", type=int, metavar="N", help="second-pass steps (default: --steps)")
    hires.add_argument("--denoising-strength", type=float, metavar="S",
                       help=f"second-pass denoising strength in (0, 1] (default {d['hr_strength']:g})")
    hires.add_argument("--hr-prompt", metavar="TEXT", help="second-pass prompt (default: the prompt)")
    hires.add_argument("--hr-negative", metavar="TEXT", help="second-pass negative prompt (default: --negative)")
    hires.add_argument("--hr-sampler", choices=list(SAMPLERS), help="second-pass sampler (default: --sampler)")
    hires.add_argument("--hr-schedule", choices=list(SCHEDULES), help="second-pass schedule (default: --schedule)")
    parser.add_argument("--loras", action="append", metavar="DIR",
                        help="a folder of LoRA .safetensors files, named by file stem (repeatable)")
    parser.add_argument("--lora", action="append", metavar="NAME:W[:UNET_W]",
                        help="apply the LoRA NAME (from --loras) with weight W on both text encoder and UNet, or "
                             "W on the text encoder and UNET_W on the UNet (repeatable; adds to the prompt's tags)")
    from ..fast_options import CLI_SPEED, add_arguments as add_fast_arguments

    add_fast_arguments(parser, speed=CLI_SPEED)  # --speed fast|exact, --s-min-uncond, --deepcache, --tome, ...
    parser.add_argument("-o", "--output", default="out.png",
                        help="PNG path; with --batch-size N > 1, NAME-0.png ... NAME-(N-1).png")
    parser.add_argument("--embeddings", metavar="DIR",
                        help="a folder of textual-inversion embeddings (.pt .bin .safetensors); each file's stem "
                             "in the prompt or the negative prompt stands for its vectors")


INPAINT_FILLS = ("fill", "original", "latent-noise", "latent-nothing")  # inpainting_fill 0..3
RESIZE_MODES = ("just-resize", "crop-and-resize", "resize-and-fill", "latent-upscale")  # resize_mode 0..3


def inpaint_fields(args, mask=None) -> dict:
    """The inpainting and resize fields of the command line (the CLI's "only masked" is off unless asked)."""
    fields = dict(resize_mode=RESIZE_MODES.index(getattr(args, "resize_mode", RESIZE_MODES[0])))
    if mask is not None:
        fields.update(mask=mask, mask_blur=args.mask_blur, inpainting_fill=INPAINT_FILLS.index(args.inpainting_fill),
                      inpaint_full_res=bool(args.inpaint_full_res), inpaint_full_res_padding=args.inpaint_padding,
                      inpainting_mask_invert=int(bool(args.mask_invert)))
    return fields


def build_request(args, init_image=None, mask=None):
    """The GenerationRequest of the command line: every value checked here, before any model loads."""
    from ..fast_options import request_fields
    from ..request import GenerationRequest

    return GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative, steps=args.steps, guidance=args.guidance, seed=args.seed,
        **sampler_fields(args), width=args.width, height=args.height,
        clip_skip=args.clip_skip, long_prompt=args.long_prompt, weighting=args.weighting,
        batch_size=args.batch_size, init_image=init_image, strength=args.strength,
        loras=parse_lora_args(getattr(args, "lora", None)), **request_fields(args), **hires_fields(args),
        **inpaint_fields(args, mask),
    )  # fmt: skip


_HIRES_ARGS = {"hr_scale": "hr_scale", "hr_resize_x": "hr_resize_x", "hr_resize_y": "hr_resize_y",
               "hr_upscaler": "hr_upscaler", "hr_steps": "hr_second_pass_steps", "denoising_strength": "hr_strength",
               "hr_prompt": "hr_prompt", "hr_negative": "hr_negative_prompt", "hr_sampler": "hr_sampler",
               "hr_schedule": "hr_schedule"}


def hires_fields(args) -> dict:
    """The hires-fix fields of the command line: ``enable_hr`` when --hr or an --hr-scale/--hr-resize-x/-y/
    --hr-upscaler is given; the other --hr-* options and --denoising-strength need it."""
    given = {field: getattr(args, arg, None) for arg, field in _HIRES_ARGS.items()}
    given = {field: value for field, value in given.items() if value is not None}
    enable = bool(getattr(args, "hr", False)) or any(
        name in given for name in ("hr_scale", "hr_resize_x", "hr_resize_y", "hr_upscaler"))
    if not enable:
        if given:
            option = next(arg for arg, field in _HIRES_ARGS.items() if field in given)
            raise ClipDiffusionError(f"--{option.replace('_', '-')}: a hires-fix option; turn hires fix on with --hr, "
                                     "--hr-scale, --hr-resize-x/-y or --hr-upscaler (img2img uses --strength)")
        return {}
    return {"enable_hr": True, **given}


def sampler_fields(args) -> dict:
    """--sampler/--schedule (ours or A1111's spellings, as the server takes them) -> engine names."""
    from ..diffusion.samplers import SAMPLERS, SCHEDULES
    from ..server.sampler_names import resolve_sampler, resolve_schedule

    sampler, implied = resolve_sampler(args.sampler, tuple(SAMPLERS), "--sampler")
    return {"sampler": sampler, "schedule": resolve_schedule(args.schedule, tuple(SCHEDULES), implied, "--schedule")}


def parse_lora_args(items) -> tuple:
    """``--lora NAME:W`` / ``NAME:TE:UNET`` -> ``GenerationRequest.loras`` items ``(name, te, unet)``."""
    import math

    out = []
    for item in items or ():
        name, *weights = item.split(":")
        try:
            numbers = [float(w) for w in weights] or [1.0]
        except ValueError:
            numbers = []
        if not name or not 1 <= len(numbers) <= 2 or not all(math.isfinite(x) for x in numbers):
            raise ClipDiffusionError(f"--lora {item!r}: expected NAME, NAME:WEIGHT or NAME:TE_WEIGHT:UNET_WEIGHT "
                                     "with finite numbers")
        out.append((name, numbers[0], numbers[-1]))
    return tuple(out)


def load_pipeline(model, prediction=None, text_encoder=None, *, device="cpu", dtype="fp32", vae=None, **options):
    """``options``: ``devices.load_options`` (``mmap``)."""
    from ..pipeline import Pipeline

    place = {"device": device, "dtype": dtype, "vae": vae, **options}
    if model is None:
        pipe = Pipeline.default(text_encoder=text_encoder, **place)
        if prediction is not None:
            pipe.prediction = prediction
        return pipe
    path = Path(model)
    if path.is_dir():
        return Pipeline.from_pretrained(path, prediction=prediction, text_encoder=text_encoder, **place)
    return Pipeline.from_file(path, prediction=prediction, text_encoder=text_encoder, **place)


class ProgressBar:
    """One self-overwriting line on stderr: [#####-----] step/total, seconds per step."""

    def __init__(self, stream=None, width: int = 30):
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.start = time.perf_counter()
        self.open_line = False

    def __call__(self, step, total, latents=None):
        filled = round(self.width * step / total)
        rate = (time.perf_counter() - self.start) / step
        self.stream.write(f"\r[{'#' * filled}{'-' * (self.width - filled)}] {step}/{total} {rate:.2f}s/step")
        self.open_line = step != total
        if step == total:
            self.stream.write("\n")
        self.stream.flush()

    def close(self):
        """End a bar left half-drawn (an error or interrupt mid-sampling), so the next message gets its own line."""
        if self.open_line:
            self.stream.write("\n")
            self.stream.flush()
            self.open_line = False


def output_paths(output, n: int) -> list[Path]:
    path = Path(output)
    if path.suffix.lower() != ".png":
        raise ClipDiffusionError(f"output={str(output)!r}: must end in .png")
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]


def check_outputs(paths: list[Path]) -> None:
    """Refuse, before the model loads, outputs that can never be written: a folder, a device, a missing or
    unwritable folder."""
    from ..fileio import check_output

    for path in paths:
        check_output(path, "output")


def save_png(image, path, infotext: str):
    """Write the PNG through a temporary file renamed onto `path`: a failed write (full disk, ``ulimit -f``)
    is one ClipDiffusionError naming the path, and an image already at `path` is kept intact."""
    from PIL.PngImagePlugin import PngInfo

    from ..fileio import atomic_write

    info = PngInfo()
    info.add_text("parameters", infotext)
    atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=info), field="output")


def read_init_image(path: str, option: str = "init-image"):
    """The --init-image (or --mask: ``option``) as a loaded PIL image, its declared size checked against the
    pipeline's limits before any pixel is decoded (a PNG header can declare 20000x20000 in a few bytes)."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    from ..request import LIMITS

    shown = f"{option}={path!r}"
    limit = Image.MAX_IMAGE_PIXELS
    try:
        # PIL's own bomb check (a warning, then an error at twice its limit) would speak before ours, without
        # the size; ours is stricter (the pipeline's limits), so PIL's is lifted while the header is read.
        Image.MAX_IMAGE_PIXELS = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ClipDiffusionError(f"{shown}: cannot read ({exc})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    width, height = image.size
    side, pixels = min(LIMITS.max_width, LIMITS.max_height), LIMITS.max_pixels
    if width < 1 or height < 1 or width > side or height > side or width * height > pixels:
        image.close()
        raise ClipDiffusionError(f"{shown}: the image is {width}x{height}; at most {side} pixels a side and "
                                 f"{pixels} pixels in all")
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, MemoryError, Image.DecompressionBombError) as exc:
        raise ClipDiffusionError(f"{shown}: cannot read ({type(exc).__name__}: {exc})") from None
    return image


def run(args) -> int:
    paths = output_paths(args.output, args.batch_size if isinstance(args.batch_size, int) else 1)
    check_outputs(paths)
    init_image = read_init_image(args.init_image) if args.init_image else None
    mask = getattr(args, "mask", None)
    if mask is not None and init_image is None:
        raise ClipDiffusionError(f"--mask {mask!r}: inpainting needs --init-image")
    mask = read_init_image(mask, "mask") if mask is not None else None
    request = build_request(args, init_image, mask)
    from ..devices import from_args, load_options

    device, dtype = from_args(args)  # checked before the model loads
    lora_dirs = getattr(args, "loras", None) or ()
    for folder in lora_dirs:  # before the model loads
        if not Path(folder).is_dir():
            raise ClipDiffusionError(f"--loras {folder!r}: no such folder")
    embeddings = getattr(args, "embeddings", None)
    if embeddings is not None:
        from ..checkpoints.embeddings import scan_folder

        scan_folder(embeddings)  # a missing folder fails before the model loads
    if args.text_encoder is not None and not Path(args.text_encoder).exists():
        raise ClipDiffusionError(f"--text-encoder {args.text_encoder!r}: no such file or folder")
    vae = getattr(args, "vae", None)
    if vae is not None and not Path(vae).exists():
        raise ClipDiffusionError(f"--vae {vae!r}: no such file or folder")
    pipe = load_pipeline(args.model, args.prediction, args.text_encoder, device=device, dtype=dtype, vae=vae,
                         **load_options(args))  # fmt: skip
    if embeddings is not None:
        from ..checkpoints.embeddings import describe_report

        for line in describe_report(pipe.load_embeddings(embeddings)):
            print(line, file=sys.stderr)
    for folder in lora_dirs:
        pipe.load_loras(folder)
    progress = ProgressBar()
    try:
        result = pipe.generate(request, callback=progress)
    except NonFiniteError as exc:
        raise exc.for_model(args.model or "the embedded tiny model") from None
    finally:
        progress.close()
    for note in getattr(result, "notes", ()):  # what the prompt asked that was not done (a <lora:...> tag)
        print(f"note: {note}", file=sys.stderr)
    for image, seed, infotext, path in zip(result.images, result.seeds, result.infotexts, paths):
        save_png(image, path, infotext)
        print(f"{path} (seed {seed})")
    return 0
