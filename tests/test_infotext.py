"""A1111 infotext: builder, parser, round trips, and texts as A1111 writes them."""

import pytest

from clipdiffusion.errors import ClipDiffusionError
from clipdiffusion.infotext import SAMPLER_NAMES, GenerationParameters, format_infotext, parse_infotext


def test_format_matches_a1111_layout():
    p = GenerationParameters(prompt="a red circle", negative_prompt="blurry", steps=20, sampler="euler_a",
                             schedule="karras", guidance=7.0, seed=1, width=512, height=512, model="tiny",
                             clip_skip=2)
    assert format_infotext(p) == (
        "a red circle\nNegative prompt: blurry\n"
        "Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, "
        "Model: tiny, Clip skip: 2"
    )


@pytest.mark.parametrize("sampler", sorted(SAMPLER_NAMES))
def test_round_trip(sampler):
    p = GenerationParameters(prompt="(red:1.3) cat, BREAK\nsecond line", negative_prompt="ugly, lowres\nbad: x",
                             steps=3, sampler=sampler, schedule="ddim", guidance=7.5, seed=4294967295,
                             width=64, height=48, model='my, "model"', clip_skip=3, strength=0.6,
                             long_prompt="window", weighting="none", extra={"Version": "v1.10, x"})
    assert parse_infotext(format_infotext(p)) == p


def test_round_trip_without_negative_and_defaults():
    p = GenerationParameters(prompt="dog", steps=1, sampler="ddim", schedule="normal", guidance=0.0, seed=0,
                             width=8, height=8)
    text = format_infotext(p)
    assert "Negative prompt" not in text and "Clip skip" not in text and parse_infotext(text).clip_skip is None
    assert parse_infotext(text) == p


def test_parses_a1111_text_with_old_sampler_names_and_unknown_keys():
    text = (
        "masterpiece, 1girl\nNegative prompt: (worst quality:1.4),\nlowres\n"
        'Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 3051, Size: 512x768, Model hash: 6ce0161689, '
        'Model: v1-5-pruned-emaonly, Lora hashes: "foo: 123, bar: 456", Clip skip: 2, Version: v1.6.0'
    )
    p = parse_infotext(text)
    assert p.prompt == "masterpiece, 1girl"
    assert p.negative_prompt == "(worst quality:1.4),\nlowres"
    assert (p.steps, p.sampler, p.schedule, p.guidance, p.seed) == (28, "dpmpp_2m", "karras", 7.5, 3051)
    assert (p.width, p.height, p.clip_skip, p.model) == (512, 768, 2, "v1-5-pruned-emaonly")
    assert p.extra == {"Model hash": "6ce0161689", "Lora hashes": "foo: 123, bar: 456", "Version": "v1.6.0"}


def test_unknown_sampler_is_kept_verbatim_and_prompt_only_text():
    assert parse_infotext("a, b\nSteps: 5, Sampler: DPM adaptive, Seed: 2").sampler == "DPM adaptive"
    p = parse_infotext("just a prompt")
    assert p.prompt == "just a prompt" and p.steps is None


def test_bad_numbers_name_the_field():
    with pytest.raises(ClipDiffusionError, match="Steps.*'many'"):
        parse_infotext("p\nSteps: many, Sampler: Euler, Seed: 1")
