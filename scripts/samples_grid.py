"""README figure: the embedded model's images beside ground-truth renders of the same captions.

    .venv/bin/python scripts/samples_grid.py docs/tiny-samples.png

Top row: `Pipeline.default()` (20 steps, euler, guidance 7, seed 1); bottom row: the synthetic world's renderer.
"""

import sys

from PIL import Image

from clipdiffusion.pipeline import Pipeline
from clipdiffusion.tiny.captions import parse_caption
from clipdiffusion.tiny.world import render_spec

PROMPTS = [
    "a large red circle in the center on a white background",
    "a large blue square at the top left on a black background",
    "a yellow triangle at the bottom right on a gray background",
    "a green circle on the left and a purple square on the right",
    "a large red circle at the top left and a small blue square at the bottom right on a white background",
    "an orange triangle at the top, a blue circle in the center and a green square at the bottom",
]
SCALE = 2


def main(out: str) -> None:
    pipe = Pipeline.default()
    tiles = []
    for prompt in PROMPTS:
        made = pipe.generate(prompt, steps=20, seed=1, guidance=7.0, sampler="euler").image
        truth = render_spec(parse_caption(prompt), seed=1)
        tiles.append((made, truth))
    w, h = tiles[0][0].size
    grid = Image.new("RGB", (len(tiles) * (w + 4) * SCALE, 2 * (h + 4) * SCALE), (255, 255, 255))
    for i, (made, truth) in enumerate(tiles):
        for row, image in enumerate((made, truth)):
            grid.paste(image.resize((w * SCALE, h * SCALE), Image.NEAREST), (i * (w + 4) * SCALE, row * (h + 4) * SCALE))
    grid.save(out)
    for i, prompt in enumerate(PROMPTS, 1):
        print(f"{i}. {prompt}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/tiny-samples.png")
