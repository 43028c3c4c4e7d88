"""The judge must be right on fresh ground-truth renders before its verdicts count."""

import numpy as np

from clipdiffusion.tiny.judge import judge, validate, verdict
from clipdiffusion.tiny.world import ObjectSpec, SceneSpec, render_spec


def test_judge_is_at_least_99_percent_right_per_attribute_on_fresh_renders():
    # fresh seed: never used for training or the eval prompt set
    accuracy = validate(n=150, seed=424242)
    for attribute, value in accuracy.items():
        if attribute != "scene":
            assert value >= 0.99, (attribute, accuracy)
    assert accuracy["scene"] >= 0.97, accuracy


def test_judge_works_at_128_pixels():
    accuracy = validate(n=40, seed=7, canvas=128)
    assert min(accuracy.values()) >= 0.97, accuracy


def test_judge_survives_blur_and_noise():
    # generated images are softer and noisier than renders; the judge must not fall apart on them
    accuracy = validate(n=60, seed=99, noise=10.0)
    assert min(accuracy.values()) >= 0.9, accuracy


def test_judge_reads_a_known_scene():
    spec = SceneSpec(
        (ObjectSpec("orange", "triangle", 0, "large"), ObjectSpec("purple", "circle", 5, "small")), "gray"
    )
    j = judge(render_spec(spec, seed=3))
    assert j.background == "gray"
    assert [(o.color, o.shape, o.size, o.position) for o in j.objects] == [
        ("orange", "triangle", "large", "top left"),
        ("purple", "circle", "small", "right"),
    ]
    assert verdict(spec, j).success


def test_verdict_fails_wrong_colour_missing_and_extra_objects():
    truth = SceneSpec((ObjectSpec("red", "square", 4, "large"), ObjectSpec("blue", "circle", 2)), "white")
    image = render_spec(truth, seed=0)
    asked = SceneSpec((ObjectSpec("green", "square", 4), ObjectSpec("blue", "circle", 6)), "black")
    v = verdict(asked, judge(image))
    assert v.occupied == (True, False) and v.color_ok == (False, False) and v.shape_ok == (True, False)
    assert v.extra == 1 and not v.background_ok and not v.success


def test_noise_image_has_no_success():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    spec = SceneSpec((ObjectSpec("red", "circle", 4),))
    assert not verdict(spec, judge(noise)).success
