"""The family table: one record per family, each disagreement the code had settled to one value."""

import pytest

from clipdiffusion import families
from clipdiffusion.errors import ClipDiffusionError
from clipdiffusion.families import FAMILIES, get_family


def test_the_table_agrees_with_the_tokenizer_and_prediction_names():
    from clipdiffusion.diffusion.denoiser import PREDICTIONS
    from clipdiffusion.text.tokenizer import EOS_ID

    assert families.EOS_ID == EOS_ID
    assert set(families.PREDICTIONS) == set(PREDICTIONS)
    assert all(f.default_prediction in PREDICTIONS for f in FAMILIES.values())


def test_sd2_native_size_follows_the_prediction_type():
    # 768-v models are v at 768 px; 512-base models are eps at 512 px (was 768 in detect.py, 512 in pipeline.py)
    sd2 = get_family("sd2")
    assert sd2.native_size_for("v") == 768 and sd2.native_size_for("eps") == 512
    assert sd2.native_size_for(None) == 768 and sd2.default_prediction == "v"
    assert get_family("sd1").native_size_for("v") == 512 and get_family("sdxl").native_size_for("eps") == 1024


def test_encoder_recipes():
    sd1, sd2, sdxl = get_family("sd1"), get_family("sd2"), get_family("sdxl")
    assert [(t.pad_id, t.final_norm, t.default_clip_skip) for t in sd1.towers] == [(49407, True, 1)]
    assert [(t.pad_id, t.final_norm, t.default_clip_skip) for t in sd2.towers] == [(0, True, 2)]
    assert [(t.name, t.pad_id, t.final_norm) for t in sdxl.towers] == [("clip_l", 49407, False), ("clip_g", 0, False)]
    assert (sd1.default_clip_skip, sd2.default_clip_skip, sdxl.default_clip_skip) == (1, 2, 2)
    assert sdxl.pooled and not sd1.pooled and sdxl.zero_empty_negative and not sd2.zero_empty_negative
    assert [f.name for f in FAMILIES.values() if f.a1111_clip_skip] == ["sd1", "tiny"]
    assert sdxl.tower("clip_g").pad_id == 0
    with pytest.raises(ClipDiffusionError, match="clip_h"):
        sdxl.tower("clip_h")


@pytest.mark.parametrize("bad", ["sd3", "", None, ["sd1"], 1])
def test_unknown_family_is_a_named_error(bad):
    with pytest.raises(ClipDiffusionError, match="family="):
        get_family(bad)
