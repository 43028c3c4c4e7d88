"""The tiny text tower's depth alignment (issue 18, tiny/align.py): an object's rows behind filler tags are pulled
to the rows of the same words without the tags, and nothing else moves much."""

import json

import pytest
import torch

from clipdiffusion.errors import ClipDiffusionError
from clipdiffusion.testing import tiny_pipeline
from clipdiffusion.tiny import align


def test_alignment_lowers_depth_drift_and_keeps_short_captions():
    pipe = tiny_pipeline(seed=3)
    te = pipe.text_encoder
    spec = te.encoders[0]
    short = torch.tensor([te.plan("a red circle at the top left", long_prompt="truncate").windows[0].ids(spec.pad_id)])
    with torch.no_grad():
        before_rows = spec.model(short, final_norm=spec.final_norm).hidden.clone()
    before = align.depth_drift(te, n=12, depths=(0, 30))
    assert before[0] == 0.0 and before[30] > 0.0
    result = align.align_text_encoder(te, align.AlignSettings(steps=40, batch=12, lr=1e-3), log=lambda _: None)
    after = align.depth_drift(te, n=12, depths=(0, 30))
    assert after[0] == 0.0
    assert after[30] < 0.6 * before[30], (before, after)
    assert result["last"][0] < result["first"][0]
    with torch.no_grad():
        after_rows = spec.model(short, final_norm=spec.final_norm).hidden
    # a caption with no tags in front is its own target: it moves far less than the drift that was removed
    moved = float((after_rows - before_rows).pow(2).sum() / before_rows.pow(2).sum())
    assert moved < before[30] - after[30], (moved, before, after)
    assert not any(p.requires_grad for p in spec.model.parameters())


def test_row_maps_point_at_the_same_words():
    pipe = tiny_pipeline(seed=1)
    te = pipe.text_encoder
    import numpy as np

    from clipdiffusion.tiny.batches import Scenes

    rng = np.random.default_rng(0)
    full, alone, rows = align._batch(te, Scenes(rng, frozenset()), rng, 16, 40)
    assert len(rows) == full.shape[0] == alone.shape[0] and rows
    for b, (student, teacher) in enumerate(rows):
        assert len(student) == len(teacher) >= 1
        assert full[b, student].tolist() == alone[b, teacher].tolist()  # same token ids, at their two depths
        assert student[0] >= teacher[0]


def test_align_file_writes_a_model_with_its_record(tmp_path):
    from clipdiffusion.checkpoints.save import save_checkpoint
    from clipdiffusion.checkpoints.safetensors_io import read_shapes
    from clipdiffusion.pipeline import Pipeline

    src = save_checkpoint(tiny_pipeline(seed=2), tmp_path / "src.safetensors", {"clipdiffusion.tiny.steps": "{}"},
                          dtype=torch.float16)
    path = align.align_file(src, tmp_path / "out", align.AlignSettings(steps=2, batch=4), log=lambda _: None)
    _, _, meta = read_shapes(path)
    assert json.loads(meta["clipdiffusion.tiny.align"])["steps"] == 2
    assert set(json.loads(meta["clipdiffusion.tiny.align_drift"])) >= {"before", "after", "first", "last"}
    assert meta["clipdiffusion.tiny.steps"] == "{}"  # the source's record is kept
    a, b = Pipeline.from_file(src), Pipeline.from_file(path)
    for (name, x), (_, y) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert torch.equal(x, y), name  # only the text tower changes
    with pytest.raises(ClipDiffusionError, match="init-from"):
        align.align_file(tmp_path / "missing.safetensors", tmp_path / "x")


def test_train_cli_align_needs_a_model(tmp_path):
    from clipdiffusion.cli import main

    assert main(["train-tiny", "--align-text", "5", "--out", str(tmp_path / "a")]) == 2


def test_align_file_refuses_a_bad_output_before_the_work(tmp_path):
    from clipdiffusion.checkpoints.save import save_checkpoint

    src = save_checkpoint(tiny_pipeline(seed=2), tmp_path / "src.safetensors", {}, dtype=torch.float16)
    (tmp_path / "taken").write_text("a file, not a folder")
    seen = []
    with pytest.raises(ClipDiffusionError, match="out: .*taken"):
        align.align_file(src, tmp_path / "taken", align.AlignSettings(steps=2, batch=4), log=seen.append)
    assert seen == []  # refused before any drift or training step ran
    assert (tmp_path / "taken").read_text() == "a file, not a folder"
