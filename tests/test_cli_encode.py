"""``clipdiffusion encode`` end to end on a tiny HF-layout text encoder file."""

import json

import os

import pytest
import torch

from clipdiffusion.checkpoints.text_encoders import load_text_encoder
from clipdiffusion.cli import main
from clipdiffusion.commands import encode as cli_encode
from clipdiffusion.text.clip import CLIPTextConfig, CLIPTextModel
from clipdiffusion.text.conditioning import WEIGHTINGS

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    from clipdiffusion.checkpoints.safetensors_io import save_file

    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(width=32, layers=3, heads=2))
    with torch.no_grad():
        model.final_layer_norm.bias.normal_(0.2, 0.3)
    path = tmp_path_factory.mktemp("te") / "text_encoder.safetensors"
    save_file({f"text_model.{k}": v for k, v in model.state_dict().items()}, path)
    return path


def test_encode_writes_tensors_and_report(encoder_file, tmp_path, capsys):
    from safetensors import safe_open

    out = tmp_path / "cond.safetensors"
    prompt = "a (red:1.2) cat, " + " ".join(["dog"] * 80)
    rc = main(["encode", prompt, "--text-encoder", str(encoder_file), "--negative", "blurry",
               "--clip-skip", "2", "-o", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "75/75" in printed and "empty-prompt chunk" in printed and str(out) in printed
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert set(tensors) == {"context", "negative_context"}
    assert tensors["context"].shape == tensors["negative_context"].shape == (1, 154, 32)
    report = json.loads(meta["report"])
    assert report["prompt"]["summary"].startswith("75/75 |") and report["negative_prompt"]["summary"] == "1/75"
    settings = json.loads(meta["settings"])
    assert settings["clip_skip"] == 2 and settings["context_lengths"] == [154, 77] and meta["prompt"] == prompt
    expected = load_text_encoder(encoder_file).encode(prompt, "blurry", clip_skip=2)
    torch.testing.assert_close(tensors["context"], expected.context, rtol=0, atol=0)
    torch.testing.assert_close(tensors["negative_context"], expected.negative_context, rtol=0, atol=0)


def test_encode_truncate_reports_dropped_text(encoder_file, tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    prompt = " ".join(["cat"] * 75) + " purple elephant"
    assert main(["encode", prompt, "--text-encoder", str(encoder_file), "--long-prompt", "truncate",
                 "-o", str(out)]) == 0
    assert "purple elephant" in capsys.readouterr().out


def test_encode_user_errors_are_one_line(encoder_file, tmp_path, capsys):
    out = str(tmp_path / "x.safetensors")
    assert main(["encode", "cat", "--text-encoder", str(encoder_file), "--clip-skip", "9", "-o", out]) == 2
    err = capsys.readouterr().err
    assert "clip_skip=9" in err and "1..3" in err and "Traceback" not in err
    assert main(["encode", "cat", "--text-encoder", str(tmp_path / "missing.safetensors"), "-o", out]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["encode", "cat", "--text-encoder", str(encoder_file), "--weighting", "loud", "-o", out])


def test_weighting_choices_match_library():
    assert cli_encode.WEIGHTING_NAMES == list(WEIGHTINGS)


# -- hostile outputs (issue 14) -------------------------------------------------------------------------------


def test_bad_output_is_refused_before_the_encoder_loads(encoder_file, tmp_path, capsys, monkeypatch):
    import clipdiffusion.checkpoints.text_encoders as loading

    def refuse(*a, **k):
        raise AssertionError("the text encoder was loaded before the bad output was refused")

    monkeypatch.setattr(loading, "load_text_encoder", refuse)
    folder = tmp_path / "dir.safetensors"
    folder.mkdir()
    cases = [(folder, "is a folder"), (tmp_path / "missing" / "c.safetensors", "does not exist")]
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    cases.append((fifo, "a pipe"))
    for out, reason in cases:
        assert main(["encode", "cat", "--text-encoder", str(encoder_file), "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"output={str(out)!r}" in err and reason in err, err


@pytest.mark.slow  # a subprocess that imports torch
def test_file_size_limit_keeps_the_previous_file(encoder_file, tmp_path):
    """`ulimit -f`: the write fails with EFBIG (Python ignores SIGXFSZ), one error line, the old file intact."""
    import os
    import resource
    import subprocess
    import sys

    out = tmp_path / "old.safetensors"
    out.write_bytes(b"previous contents")

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    proc = subprocess.run([sys.executable, "-m", "clipdiffusion", "encode", "cat", "--text-encoder",
                           str(encoder_file), "-o", str(out)], capture_output=True, text=True, preexec_fn=limit,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "old.safetensors" in proc.stderr and "File too large" in proc.stderr
    assert out.read_bytes() == b"previous contents"
    assert [p.name for p in tmp_path.iterdir()] == ["old.safetensors"]
