"""The generate command on a tiny random checkpoint written to disk."""

import numpy as np
import pytest
from PIL import Image

from clipdiffusion.cli import main
from clipdiffusion.infotext import parse_infotext


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from clipdiffusion.checkpoints.save import save_checkpoint
    from clipdiffusion.testing import tiny_pipeline

    path = tmp_path_factory.mktemp("model") / "tiny-random.safetensors"
    save_checkpoint(tiny_pipeline(0), path)
    return path


def run(model, *args):
    return main(["generate", "--model", str(model), "--width", "32", "--height", "32", "--steps", "2", *args])


def test_writes_png_with_infotext_and_progress(model, tmp_path, capsys):
    out = tmp_path / "a.png"
    assert run(model, "a red circle", "--negative", "blurry, dark", "--sampler", "euler_a", "--schedule", "karras",
               "--clip-skip", "2", "--guidance", "4.5", "-o", str(out)) == 0
    captured = capsys.readouterr()
    assert "2/2" in captured.err and str(out) in captured.out
    image = Image.open(out)
    assert image.size == (32, 32)
    p = parse_infotext(image.text["parameters"])
    assert (p.prompt, p.negative_prompt, p.sampler, p.schedule, p.clip_skip, p.guidance, p.steps) == (
        "a red circle", "blurry, dark", "euler_a", "karras", 2, 4.5, 2)
    assert p.model == "tiny-random" and 0 <= p.seed < 2**32  # --seed -1 records the seed it picked


def test_png_parameters_reproduce_the_image(model, tmp_path):
    first = tmp_path / "first.png"
    assert run(model, "a blue square", "--sampler", "dpmpp_2m", "-o", str(first)) == 0
    p = parse_infotext(Image.open(first).text["parameters"])
    second = tmp_path / "second.png"
    assert run(model, p.prompt, "--sampler", p.sampler, "--seed", str(p.seed), "-o", str(second)) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))


def test_batch_names_and_consecutive_seeds(model, tmp_path, capsys):
    assert run(model, "x", "--batch-size", "2", "--seed", "10", "-o", str(tmp_path / "b.png")) == 0
    seeds = [parse_infotext(Image.open(tmp_path / f"b-{i}.png").text["parameters"]).seed for i in range(2)]
    assert seeds == [10, 11]


@pytest.mark.parametrize("args, message", [
    (["--width", "31"], "width=31"),
    (["--steps", "0"], "steps=0"),
    (["--guidance", "-2"], "guidance=-2"),
    (["-o", "out.jpg"], "output='out.jpg'"),
    (["--init-image", "/nonexistent.png"], "init-image"),
])
def test_user_errors_exit_2_with_one_line(model, args, message, capsys):
    assert run(model, "x", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("clipdiffusion generate: error:")


def test_unknown_sampler_is_rejected_by_argparse(model, capsys):
    with pytest.raises(SystemExit) as exc:
        run(model, "x", "--sampler", "lms")
    assert exc.value.code == 2 and "euler_a" in capsys.readouterr().err


def test_img2img_from_the_command_line(model, tmp_path):
    init = tmp_path / "init.png"
    Image.new("RGB", (32, 32), "red").save(init)
    out = tmp_path / "i2i.png"
    assert run(model, "x", "--init-image", str(init), "--strength", "0.5", "-o", str(out)) == 0
    assert parse_infotext(Image.open(out).text["parameters"]).strength == 0.5


def test_missing_embedded_model_is_a_clear_error(monkeypatch, capsys, tmp_path):
    import clipdiffusion.pipeline as pl

    monkeypatch.setattr(pl, "TINY_DATA", tmp_path)
    assert main(["generate", "x", "-o", str(tmp_path / "x.png")]) == 2
    assert "embedded tiny model is missing" in capsys.readouterr().err


def test_native_size_comes_from_the_checkpoint(model, tmp_path):
    out = tmp_path / "native.png"
    assert main(["generate", "--model", str(model), "--steps", "1", "x", "-o", str(out)]) == 0
    assert Image.open(out).size == (32, 32)  # tiny_pipeline's default_size, saved as modelspec.resolution
