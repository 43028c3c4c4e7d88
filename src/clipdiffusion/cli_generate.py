"""``clipdiffusion generate "PROMPT" -o out.png``: a thin client of ``Pipeline.generate``.

Progress goes to stderr; each image is a PNG whose "parameters" text chunk holds the A1111 infotext, so A1111's
"PNG Info" tab, our server and ``infotext.parse_infotext`` read the settings back. ``--seed -1`` (the default)
picks a seed and records it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .errors import ClipDiffusionError


def add_arguments(parser):
    from .diffusion.samplers import SAMPLERS, SCHEDULES
    from .text.chunking import LONG_PROMPT_STRATEGIES
    from .text.conditioning import WEIGHTINGS

    parser.add_argument("prompt", help="the prompt (A1111 emphasis syntax, BREAK)")
    parser.add_argument("--model", metavar="FILE|FOLDER",
                        help="a .safetensors checkpoint or a diffusers folder (default: the embedded tiny model)")
    parser.add_argument("--negative", default="", metavar="TEXT", help="negative prompt")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=-1, help="-1 picks a random seed (recorded in the PNG)")
    parser.add_argument("--sampler", choices=list(SAMPLERS), default="euler")
    parser.add_argument("--schedule", choices=list(SCHEDULES), default="normal")
    parser.add_argument("--guidance", type=float, default=7.0, help="classifier-free guidance scale (CFG)")
    parser.add_argument("--width", type=int, help="default: the model's native size")
    parser.add_argument("--height", type=int, help="default: the model's native size")
    parser.add_argument("--clip-skip", type=int, default=None,
                        help="A1111 counting: 1 = last layer, 2 = penultimate (default: the model's own, SD1 1, "
                             "SD2/SDXL 2)")
    parser.add_argument("--long-prompt", choices=list(LONG_PROMPT_STRATEGIES), default="chunk")
    parser.add_argument("--weighting", choices=list(WEIGHTINGS), default="a1111")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--prediction", choices=("eps", "v"),
                        help="override the detected prediction type (SD2 768-v models are v)")
    parser.add_argument("--init-image", metavar="PNG", help="img2img: start from this image")
    parser.add_argument("--strength", type=float, default=0.75, help="img2img denoising strength in (0, 1]")
    parser.add_argument("-o", "--output", default="out.png",
                        help="PNG path; with --batch-size N > 1, NAME-0.png ... NAME-(N-1).png")


def load_pipeline(model, prediction=None):
    from .pipeline import Pipeline

    if model is None:
        pipe = Pipeline.default()
        if prediction is not None:
            pipe.prediction = prediction
        return pipe
    path = Path(model)
    if path.is_dir():
        return Pipeline.from_pretrained(path, prediction=prediction)
    return Pipeline.from_file(path, prediction=prediction)


class ProgressBar:
    """One self-overwriting line on stderr: [#####-----] step/total, seconds per step."""

    def __init__(self, stream=None, width: int = 30):
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.start = time.perf_counter()

    def __call__(self, step, total, latents=None):
        filled = round(self.width * step / total)
        rate = (time.perf_counter() - self.start) / step
        self.stream.write(f"\r[{'#' * filled}{'-' * (self.width - filled)}] {step}/{total} {rate:.2f}s/step")
        if step == total:
            self.stream.write("\n")
        self.stream.flush()


def output_paths(output, n: int) -> list[Path]:
    path = Path(output)
    if path.suffix.lower() != ".png":
        raise ClipDiffusionError(f"output={str(output)!r}: must end in .png")
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]


def save_png(image, path, infotext: str):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", infotext)
    image.save(path, format="PNG", pnginfo=info)


def run(args) -> int:
    paths = output_paths(args.output, args.batch_size if isinstance(args.batch_size, int) else 1)
    for path in paths:
        if not path.parent.is_dir():
            raise ClipDiffusionError(f"output={str(path)!r}: folder {str(path.parent)!r} does not exist")
    init_image = None
    if args.init_image:
        from PIL import Image, UnidentifiedImageError

        try:
            init_image = Image.open(args.init_image)
            init_image.load()
        except (OSError, UnidentifiedImageError) as exc:
            raise ClipDiffusionError(f"init-image={args.init_image!r}: cannot read ({exc})") from None
    pipe = load_pipeline(args.model, args.prediction)
    result = pipe.generate(
        args.prompt, args.negative, steps=args.steps, guidance=args.guidance, seed=args.seed, sampler=args.sampler,
        schedule=args.schedule, width=args.width, height=args.height, clip_skip=args.clip_skip,
        long_prompt=args.long_prompt, weighting=args.weighting, batch_size=args.batch_size, init_image=init_image,
        strength=args.strength, callback=ProgressBar(),
    )
    for image, seed, infotext, path in zip(result.images, result.seeds, result.infotexts, paths):
        save_png(image, path, infotext)
        print(f"{path} (seed {seed})")
    return 0
