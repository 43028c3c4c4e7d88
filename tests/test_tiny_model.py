"""The shipped embedded model (``clipdiffusion/tiny/data``): it loads through the same loader as real checkpoints,
fits the package budget, and draws the prompted colours in the prompted places for a few fixed prompts, as the
(validated) judge reads them. Each prompt must come out right for most of a few fixed seeds."""

import pytest

from clipdiffusion.pipeline import TINY_DATA, Pipeline
from clipdiffusion.tiny.captions import parse_caption
from clipdiffusion.tiny.judge import judge, verdict

PROMPTS = [
    "a large red circle in the center on a white background",
    "a large blue square at the top left on a black background",
    "a large yellow triangle at the bottom right on a gray background",
    "a large green circle on the left and a large purple square on the right on a white background",
]
SEEDS = (0, 1, 2, 3)


def _shipped():
    files = sorted(TINY_DATA.glob("*.safetensors"))
    assert len(files) == 1, f"expected exactly one embedded model in {TINY_DATA}, found {files}"
    return files[0]


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.default()


def test_shipped_file_is_small_and_loads_through_the_checkpoint_loader():
    from clipdiffusion.checkpoints.load import load_checkpoint
    from clipdiffusion.checkpoints.safetensors_io import read_header

    path = _shipped()
    assert path.stat().st_size <= 25 * 1024 * 1024
    header = read_header(path)
    assert header.metadata["clipdiffusion.family"] == "tiny"
    loaded = load_checkpoint(path)  # the same strict loader as SD 1.x / 2.x / SDXL files
    assert loaded.family == "tiny" and loaded.prediction == "eps"
    assert any(k.startswith("model.diffusion_model.") for k in header.tensors)  # the LDM single-file layout


@pytest.mark.parametrize("prompt", PROMPTS)
def test_prompted_colours_land_in_the_prompted_cells(pipe, prompt):
    spec = parse_caption(prompt)
    right = 0
    for seed in SEEDS:
        image = pipe.generate(prompt, steps=20, seed=seed, guidance=7.0, sampler="euler").image
        v = verdict(spec, judge(image))
        right += all(o and c for o, c in zip(v.occupied, v.color_ok))
    assert right >= len(SEEDS) // 2 + 1, f"{prompt!r}: colours in place for {right}/{len(SEEDS)} seeds"

