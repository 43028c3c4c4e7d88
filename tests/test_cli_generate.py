"""The generate command on a tiny random checkpoint written to disk."""

import errno
import os

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
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("[")]  # progress
    assert len(err) == 1 and message in err[0] and err[0].startswith("clipdiffusion generate: error:")


def test_unknown_sampler_is_an_error_listing_the_choices(model, capsys):
    # --sampler takes ours and A1111's spellings (tests/test_samplers_more.py), so it is checked after argparse
    assert run(model, "x", "--sampler", "nosuch") == 2
    err = capsys.readouterr().err
    assert "--sampler='nosuch'" in err and "euler_a" in err and "DPM++ 2M SDE" in err


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


# -- hostile outputs and init images (issue 14) ---------------------------------------------------------------


def png_declaring(width, height, idat=b"garbage", text: dict | None = None) -> bytes:
    """A PNG whose header declares width x height, with an IDAT that is not a valid image: only the header
    can be read, so anything that decodes pixels fails (or allocates width x height first)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    body = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    for key, value in (text or {}).items():
        body += chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))
    return body + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture()
def no_model(monkeypatch):
    """Fails the test if the command gets as far as loading a model."""
    import clipdiffusion.commands.generate as cg

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad argument was refused")

    monkeypatch.setattr(cg, "load_pipeline", refuse)


@pytest.fixture()
def fake_model(monkeypatch):
    """A stand-in pipeline (no torch work): these tests are about where the PNG goes, not what is in it."""
    import types

    import clipdiffusion.commands.generate as cg
    from clipdiffusion.infotext import GenerationParameters, format_infotext

    def generate(request, *, callback=None, should_stop=None):
        seeds = [max(request.seed, 0) + i for i in range(request.batch_size)]
        infotexts = [format_infotext(GenerationParameters(prompt=request.prompt, seed=s, steps=1, width=32,
                                                          height=32)) for s in seeds]
        images = [Image.new("RGB", (32, 32), (s % 256, 0, 0)) for s in seeds]
        return types.SimpleNamespace(images=images, seeds=seeds, infotexts=infotexts)

    monkeypatch.setattr(cg, "load_pipeline", lambda *a, **k: types.SimpleNamespace(generate=generate))


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("[")]  # progress
    assert len(err) == 1 and err[0].startswith("clipdiffusion generate: error:"), err
    return err[0]


@pytest.mark.parametrize("args, message", [(["--steps", "0"], "steps=0"), (["--clip-skip", "49"], "clip_skip=49"),
                                           (["--guidance", "nan"], "guidance=nan"), (["--seed", "-2"], "seed=-2"),
                                           (["--strength", "0"], "strength=0.0"), (["--width", "9000"], "width=9000")])
def test_request_errors_come_before_the_model_loads(no_model, tmp_path, capsys, args, message):
    assert main(["generate", "x", *args, "-o", str(tmp_path / "x.png")]) == 2
    assert message in one_error_line(capsys)


def test_bad_outputs_are_refused_before_the_model_loads(no_model, tmp_path, capsys):
    folder = tmp_path / "dir.png"
    folder.mkdir()
    assert main(["generate", "x", "-o", str(folder)]) == 2
    assert f"output={str(folder)!r}" in (line := one_error_line(capsys)) and "is a folder" in line
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    assert main(["generate", "x", "-o", str(fifo)]) == 2
    assert "fifo.png" in (line := one_error_line(capsys)) and "a pipe" in line
    assert main(["generate", "x", "-o", str(tmp_path / "missing" / "a.png")]) == 2
    assert "does not exist" in one_error_line(capsys)
    (tmp_path / "c-1.png").mkdir()
    assert main(["generate", "x", "--batch-size", "2", "-o", str(tmp_path / "c.png")]) == 2
    assert "c-1.png" in one_error_line(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_folder_is_refused(no_model, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["generate", "x", "-o", str(locked / "a.png")]) == 2
        assert "not writable" in one_error_line(capsys)
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "No space left on device"), (errno.EFBIG, "File too large")])
def test_failed_write_keeps_the_previous_image(fake_model, tmp_path, capsys, monkeypatch, code, reason):
    out = tmp_path / "old_good.png"
    Image.new("RGB", (8, 8), "blue").save(out)
    before = out.read_bytes()

    def failing_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(Image.Image, "save", failing_save)
    assert main(["generate", "x", "-o", str(out)]) == 2
    line = one_error_line(capsys)
    assert f"output={str(out)!r}" in line and reason in line and "unchanged" in line
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old_good.png"]  # no temporary file left behind


def test_written_png_replaces_the_old_one_with_normal_permissions(fake_model, tmp_path):
    out = tmp_path / "a.png"
    Image.new("RGB", (8, 8), "blue").save(out)
    out.chmod(0o640)
    assert main(["generate", "x", "-o", str(out)]) == 0
    assert Image.open(out).size == (32, 32) and (out.stat().st_mode & 0o777) == 0o640
    fresh = tmp_path / "fresh.png"
    assert main(["generate", "x", "-o", str(fresh)]) == 0
    umask = os.umask(0o022)
    os.umask(umask)
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~umask
    # A link where the output goes is replaced by the image; what it points to is never written through it.
    before = out.read_bytes()
    link = tmp_path / "link.png"
    link.symlink_to(out)
    assert main(["generate", "x", "--seed", "5", "-o", str(link)]) == 0
    assert not link.is_symlink() and parse_infotext(Image.open(link).text["parameters"]).seed == 5
    assert out.read_bytes() == before
    full = tmp_path / "full.png"
    full.symlink_to("/dev/full")
    assert main(["generate", "x", "--seed", "6", "-o", str(full)]) == 0
    assert full.is_file() and not full.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "fresh.png", "full.png", "link.png"]


@pytest.mark.parametrize("size", [(20000, 20000), (5000, 5000), (9000, 16)])
def test_oversized_init_image_is_refused_from_its_header(no_model, tmp_path, capsys, size):
    init = tmp_path / "bomb.png"
    init.write_bytes(png_declaring(*size))
    out = tmp_path / "out.png"
    assert main(["generate", "x", "--init-image", str(init), "-o", str(out)]) == 2
    line = one_error_line(capsys)
    assert f"init-image={str(init)!r}" in line and f"{size[0]}x{size[1]}" in line
    assert not out.exists()


def test_unreadable_init_images_are_one_line(no_model, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(png_declaring(16, 16))  # a valid header, garbage pixel data
    assert main(["generate", "x", "--init-image", str(broken), "-o", str(tmp_path / "o.png")]) == 2
    assert "init-image" in one_error_line(capsys)
    assert main(["generate", "x", "--init-image", str(tmp_path), "-o", str(tmp_path / "o.png")]) == 2
    assert "init-image" in one_error_line(capsys)
