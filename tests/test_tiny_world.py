"""The synthetic world: vocabulary, determinism, rendering geometry, captions and their parser."""

import numpy as np
import pytest

from clipdiffusion.errors import ClipDiffusionError, PromptError
from clipdiffusion.tiny.captions import STYLE_TAGS, caption, long_caption, parse_caption
from clipdiffusion.tiny.world import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    ObjectSpec,
    SceneSpec,
    check_spec,
    object_box,
    realize,
    render,
    render_spec,
    sample_scene,
    sample_spec,
)


def test_vocabulary_is_the_issue_vocabulary():
    # other tools evaluate images against exactly these words and values
    assert BACKGROUNDS == {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
    assert COLORS["red"] == (220, 30, 30) and COLORS["purple"] == (140, 40, 200) and len(COLORS) == 6
    assert SHAPES == ("circle", "square", "triangle")
    assert set(SIZES) == {"small", "large"}
    assert POSITIONS[0] == "top left" and POSITIONS[4] == "center" and POSITIONS[8] == "bottom right"


def test_style_tags_carry_no_world_words():
    vocab = set(COLORS) | set(SHAPES) | set(SIZES) | set(BACKGROUNDS) | {"background", "center", "middle"}
    vocab |= {w for p in POSITIONS for w in p.split()}
    for tag in STYLE_TAGS:
        assert not set(tag.split()) & vocab, tag


def test_deterministic_from_seed():
    def draw(seed):
        rng = np.random.default_rng(seed)
        spec = sample_spec(rng)
        return caption(spec, rng, p_tags=0.5), np.asarray(render(realize(spec, rng)))

    (c1, a1), (c2, a2), (c3, _) = draw(3), draw(3), draw(4)
    assert c1 == c2 and np.array_equal(a1, a2)
    assert c1 != c3


def test_render_places_object_in_its_cell_with_its_colour():
    spec = SceneSpec((ObjectSpec("red", "square", 8, "large"),), "white")
    image = np.asarray(render_spec(spec, seed=0, canvas=64)).astype(int)
    assert image.shape == (64, 64, 3)
    assert tuple(image[0, 0]) == (255, 255, 255)
    assert tuple(image[53, 53]) == COLORS["red"]  # centre of the bottom-right cell
    assert tuple(image[32, 32]) == (255, 255, 255)


def test_render_is_anti_aliased_and_objects_stay_in_their_cells():
    rng = np.random.default_rng(0)
    blended = 0
    for _ in range(50):
        scene = sample_scene(rng)
        pixels = np.asarray(render(scene)).reshape(-1, 3)
        pure = {tuple(v) for v in BACKGROUNDS.values()} | {tuple(v) for v in COLORS.values()}
        blended += sum(tuple(p) not in pure for p in pixels)
        for obj in scene.objects:
            cx, cy, extent = object_box(obj, 64)
            col, row = obj.cell % 3, obj.cell // 3
            assert col * 64 / 3 <= cx - extent / 2 and cx + extent / 2 <= (col + 1) * 64 / 3
            assert row * 64 / 3 <= cy - extent / 2 and cy + extent / 2 <= (row + 1) * 64 / 3
    assert blended > 0


def test_sizes_are_about_an_eighth_and_a_quarter():
    for size, fraction in (("small", 1 / 8), ("large", 1 / 4)):
        spec = SceneSpec((ObjectSpec("blue", "square", 4, size),), "black")
        pixels = np.asarray(render_spec(spec, seed=1, canvas=128)).astype(float)
        covered = (pixels[..., 2] / 220).sum()  # blue channel: exact area coverage
        assert abs(np.sqrt(covered) / 128 - fraction) < fraction * 0.15


def test_caption_round_trip_through_parser():
    rng = np.random.default_rng(11)
    long_seen = 0
    for _ in range(300):
        spec = sample_spec(rng)
        text = caption(spec, rng, p_tags=0.5)
        long_seen += len(text.split()) > 60
        assert parse_caption(text) == spec, text
    assert long_seen > 0  # style tags make some prompts long enough to pass 77 tokens


def test_caption_examples_from_the_issue_parse():
    spec = parse_caption(
        "a large red circle at the top left and a small blue square at the bottom right on a white background"
    )
    assert spec.background == "white"
    assert spec.objects == (ObjectSpec("red", "circle", 0, "large"), ObjectSpec("blue", "square", 8, "small"))
    spec = parse_caption("on a gray background, a green triangle in the center")
    assert spec == SceneSpec((ObjectSpec("green", "triangle", 4),), "gray")


def test_long_caption_puts_objects_after_tags():
    rng = np.random.default_rng(2)
    spec = SceneSpec((ObjectSpec("yellow", "circle", 1),))
    text = long_caption(spec, rng, ["masterpiece"] * 30)
    assert text.startswith("masterpiece, ") and parse_caption(text) == spec


@pytest.mark.parametrize(
    "text",
    ["a cat", "a red circle", "a red circle at the top and a blue square at the top", "a large circle at the top"],
)
def test_parser_rejects_bad_captions(text):
    with pytest.raises(PromptError):
        parse_caption(text)


def test_check_spec_names_field_and_value():
    with pytest.raises(ClipDiffusionError, match="color: unknown value 'pink'"):
        check_spec(SceneSpec((ObjectSpec("pink", "circle", 0),)))
    with pytest.raises(ClipDiffusionError, match="canvas"):
        render(sample_scene(np.random.default_rng(0)), canvas=8)


def test_world_judge_and_eval_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, clipdiffusion.tiny.world, clipdiffusion.tiny.captions, clipdiffusion.tiny.judge, "
            "clipdiffusion.tiny.eval, clipdiffusion.commands.eval; print('torch' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
