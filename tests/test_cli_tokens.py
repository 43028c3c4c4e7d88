"""The ``tokens`` command through ``clipdiffusion.cli.main``: counts per chunk, chunk starts, dropped text,
``--json`` structure, ``--no-weights``, errors as one line, and no torch import."""

import io
import json
import subprocess
import sys

import pytest

from clipdiffusion.cli import main
from clipdiffusion.text.tokenizer import CLIPTokenizer

CAT_ID = 2368  # "cat</w>"


def _run(capsys, *argv):
    rc = main(["tokens", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_short_prompt(capsys):
    rc, out, err = _run(capsys, "a photo of a cat")
    assert rc == 0 and err == ""
    assert out.splitlines()[0] == "5 tokens, 1 chunk (long_prompt=chunk): 5/75"
    assert "starts: a photo of a cat" in out


def test_long_prompt_chunks_and_truncate_hint(capsys):
    rc, out, _ = _run(capsys, "cat " * 80)
    assert rc == 0
    assert out.splitlines()[0] == "80 tokens, 2 chunks (long_prompt=chunk): 75/75 | 5/75"
    assert "with --long-prompt truncate, 5 tokens would be dropped: 'cat cat cat cat cat'" in out


def test_truncate_reports_dropped_words(capsys):
    prompt = "cat " * 75 + "a purple dragon"
    rc, out, _ = _run(capsys, prompt, "--long-prompt", "truncate")
    assert rc == 0
    assert out.splitlines()[0] == "78 tokens, 1 window (long_prompt=truncate): 75/75"
    assert "dropped: 3 of 78 tokens: 'a purple dragon'" in out
    assert "note:" not in out  # chunking's own drop note is replaced by the line in the user's words


def test_reports_use_the_users_words(capsys):
    # digits are separate tokens, so decoded text would read "tag 2 1 ,"; the report shows what was typed
    prompt = ", ".join(f"tag{i}" for i in range(40))
    _, out, _ = _run(capsys, prompt, "--long-prompt", "truncate")
    assert "starts: tag0, tag1, tag2, ..." in out
    assert "dropped: 74 of 149 tokens: '…21, tag22, tag23," in out  # the cut falls inside "tag21,"
    _, out, _ = _run(capsys, "(red)hair (big)(cat), [x] BREAK y")
    assert "starts: redhair bigcat, x" in out
    _, out, _ = _run(capsys, prompt, "--long-prompt", "window", "--json")
    report = json.loads(out)
    starts = [c["starts_with"] for c in report["chunks"]]
    assert starts[0] == "tag0, tag1, tag2, ..." and all(s for s in starts)
    words = report["words"]
    assert words[report["tokens"][0]["word"]] == {"text": "tag0,", "tokens": [0, 3]}  # tag 0 ,
    assert [t["word"] for t in report["tokens"][:5]] == [0, 0, 0, 1, 1]
    assert "".join(w["text"] for w in words).replace(",", "") == prompt.replace(",", "").replace(" ", "")
    for index, word in enumerate(words):  # each word once, its token range points back at it
        assert all(report["tokens"][k]["word"] == index for k in range(*word["tokens"]))


def test_weights_and_break_in_text_output(capsys):
    rc, out, _ = _run(capsys, "a (red:1.3) [cube] BREAK a dog")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == "5 tokens, 2 chunks (long_prompt=chunk): 3/75 | 2/75"
    assert "starts: a dog" in lines[2]
    assert "weighted: 'red' x1.3, 'cube' x0.9091" in out


def test_json_structure(capsys):
    rc, out, _ = _run(capsys, "a (red:1.5) cat, " + "dog " * 80, "--json")
    assert rc == 0
    report = json.loads(out)
    assert report["long_prompt"] == "chunk" and report["weights"] is True
    assert report["segments"][:2] == [{"text": "a ", "weight": 1.0}, {"text": "red", "weight": 1.5}]
    tok = CLIPTokenizer()
    ids = [t["id"] for t in report["tokens"]]
    assert ids == tok.encode("a ") + tok.encode("red") + tok.encode(" cat, " + "dog " * 80)
    assert [t["weight"] for t in report["tokens"][:3]] == [1.0, 1.5, 1.0]
    assert report["tokens"][2]["text"] == "cat"
    assert report["total_tokens"] == len(ids) == 84
    assert [c["tokens"] for c in report["chunks"]] == [75, 9]  # a hard split: the comma is too far back
    assert report["summary"] == "75/75 | 9/75"
    assert report["chunks"][0]["ids"] == ids[:75] and report["chunks"][1]["ids"] == ids[75:]
    assert report["chunks"][0]["weights"][1] == 1.5
    assert report["chunks"][0]["first_words"].startswith("a red cat")
    assert report["dropped_tokens"] == 0
    assert report["truncate_would_drop"]["tokens"] == 9


def test_json_truncate_and_stretch(capsys):
    _, out, _ = _run(capsys, "cat " * 250, "--json", "--long-prompt", "truncate")
    report = json.loads(out)
    assert (report["dropped_tokens"], report["summary"], report["truncate_would_drop"]) == (175, "75/75", None)
    assert report["dropped_text"] == " ".join(["cat"] * 175)
    _, out, _ = _run(capsys, "cat " * 250, "--json", "--long-prompt", "stretch")
    report = json.loads(out)
    assert report["summary"] == "246/246" and report["dropped_tokens"] == 4


def test_no_weights_keeps_brackets_as_text(capsys):
    _, out, _ = _run(capsys, "(red:1.2) BREAK x", "--json", "--no-weights")
    report = json.loads(out)
    assert report["weights"] is False
    assert report["segments"] == [{"text": "(red:1.2) BREAK x", "weight": 1.0}]
    assert [t["text"] for t in report["tokens"]] == ["(", "red", ":", "1", ".", "2", ")", "break", "x"]
    assert {t["weight"] for t in report["tokens"]} == {1.0} and len(report["chunks"]) == 1


def test_user_errors_are_one_line(capsys):
    rc, out, err = _run(capsys, "(x:1.2.3)")
    assert rc == 2 and out == ""
    assert err == "clipdiffusion tokens: error: prompt weight '1.2.3' in ':1.2.3)' is not a number\n"
    rc, _, err = _run(capsys, "caf\udcc3")  # a non-UTF-8 argv byte, as Python passes it on
    assert rc == 2 and "0xC3" in err and err.count("\n") == 1
    rc, _, err = _run(capsys, "a" * 200_001)
    assert rc == 2 and "200001 characters" in err
    with pytest.raises(SystemExit) as exc:
        main(["tokens", "x", "--long-prompt", "banana"])
    assert exc.value.code == 2


def test_prompt_from_stdin(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("a cat\n".encode())))
    rc, out, _ = _run(capsys, "-", "--json")
    assert rc == 0 and json.loads(out)["prompt"] == "a cat"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xffcat")))
    rc, _, err = _run(capsys, "-")
    assert rc == 2 and "prompt (stdin) is not UTF-8" in err


def test_tokens_command_does_not_import_torch():
    code = (
        "import sys, io, contextlib\n"
        "from clipdiffusion.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    rc = main(['tokens', 'caf\u00e9 (a:1.2) [b] ' * 40, '--json'])\n"
        "assert rc == 0, rc\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_report_without_word_alignment_falls_back_to_decoded_text():
    from clipdiffusion.commands.tokens import format_report, tokens_report

    class StandIn:  # a tokenizer with only the agreed interface (no encode_words)
        def __init__(self):
            self._tok = CLIPTokenizer()

        def encode(self, text):
            return self._tok.encode(text)

        def decode(self, ids):
            return self._tok.decode(ids)

        def token_strings(self, ids):
            return self._tok.token_strings(ids)

    report = tokens_report("cat " * 80, long_prompt="truncate", tokenizer=StandIn())
    assert report["chunks"][0]["starts_with"] is None and report["dropped_words"] == ""
    assert report["tokens"][0] == {"id": CAT_ID, "text": "cat", "weight": 1.0, "word": None}
    assert report["words"] == []
    text = format_report(report)
    assert "starts: cat cat cat" in text and "5 of 80 tokens dropped" in text


@pytest.mark.parametrize("long_prompt", ["chunk", "truncate", "window", "stretch"])
def test_json_size_is_linear_in_the_prompt(capsys, long_prompt):
    # Each token once named its whole word, so one long word grew the output as tokens x word length.
    sizes = {}
    for n in (5_000, 10_000):
        prompt = "ab" * (n // 2)
        rc, out, _ = _run(capsys, prompt, "--json", "--long-prompt", long_prompt)
        assert rc == 0
        report = json.loads(out)
        assert report["words"] == [{"text": prompt, "tokens": [0, report["total_tokens"]]}]
        assert {t["word"] for t in report["tokens"]} == {0}
        sizes[n] = len(out)
        assert len(out) < 200 * n + 10_000, (n, len(out))
    assert 1.8 < sizes[10_000] / sizes[5_000] < 2.2, sizes
