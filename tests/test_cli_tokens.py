"""The ``tokens`` command through ``clipdiffusion.cli.main``: counts per chunk, chunk starts, dropped text,
``--json`` structure, ``--no-weights``, errors as one line, and no torch import."""

import io
import json
import subprocess
import sys

import pytest

from clipdiffusion.cli import main
from clipdiffusion.text.networks import APPLIED
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


# -- the prompt language: schedules, AND parts, extra-network tags (issue 16) ----------------------------------

NEW_KEYS = {"steps", "negative", "text", "texts", "headline", "schedule", "parts", "networks"}


@pytest.mark.parametrize("prompt, options", [
    ("a photo of a cat", {}), ("cat " * 80, {"long_prompt": "truncate"}), ("(red:1.3) [x] BREAK y", {}),
    ("(x:1.2) [y]", {"weights": False}), ("", {}), ("tag0, " * 40, {"long_prompt": "window"}),
])
def test_plain_prompts_report_as_before_plus_new_keys(prompt, options):
    from clipdiffusion.commands.tokens import prompt_report, tokens_report

    tok = CLIPTokenizer()
    report = prompt_report(prompt, tokenizer=tok, **options)
    # A1111 strips a composable part's trailing whitespace, AND or not; CLIP's tokens are the same either way
    text = prompt.rstrip()
    before = tokens_report(text, tokenizer=tok, **options)
    assert {k: v for k, v in report.items() if k not in NEW_KEYS} == before | {"prompt": prompt}
    assert [t["id"] for t in before["tokens"]] == [t["id"] for t in tokens_report(prompt, tokenizer=tok,
                                                                                   **options)["tokens"]]
    assert [t["text"] for t in report["texts"]] == [text] and report["headline"] == 0
    assert report["schedule"] == [{"part": 0, "start": 1, "end": 20, "text_index": 0}]
    assert report["parts"] == [{"text": text, "weight": 1.0}]
    assert report["networks"] == [] and report["steps"] == 20 and report["negative"] is False


def test_schedule_is_shown_with_step_ranges_and_counts(capsys):
    rc, out, _ = _run(capsys, "a [cat:big dog:10] on a mat", "--steps", "20")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == "6 tokens, 1 chunk (long_prompt=chunk): 6/75"  # the larger of the two texts
    assert "starts: a big dog on a mat" in lines[1]
    assert lines[2] == "schedule over 20 steps (the count above is the text with the most tokens):"
    assert lines[3] == "  steps  1-10    5/75  'a cat on a mat'"
    assert lines[4] == "  steps 11-20    6/75  'a big dog on a mat'"
    rc, out, _ = _run(capsys, "[fe|]male [a|b]", "--steps", "3")
    assert out.splitlines()[2:] == ["schedule over 3 steps (the count above is the text with the most tokens):",
                                    "  step  1      2/75  'female a'", "  step  2      2/75  'male b'",
                                    "  step  3      2/75  'female a'"]


def test_long_schedules_are_cut_in_text_but_complete_in_json(capsys):
    rc, out, _ = _run(capsys, "[a|b c]", "--steps", "100")
    assert rc == 0 and "... (60 more step ranges; --json lists them all)" in out
    rc, out, _ = _run(capsys, "[a|b c]", "--steps", "100", "--json")
    report = json.loads(out)
    assert len(report["schedule"]) == 100 and [t["text"] for t in report["texts"]] == ["a", "b c"]
    assert report["headline"] == 1 and report["summary"] == "2/75"


def test_and_parts_and_tags(capsys):
    prompt = "a cat <lora:detail:0.8> AND a hat:0.5 <lyco:style:1:te=0> <hypernet:h:1> <foo:bar> <lora:bad:x>"
    rc, out, _ = _run(capsys, prompt, "--steps", "4")
    assert rc == 0
    assert "  AND part 1, weight 1:" in out and "  AND part 2, weight 0.5:" in out
    assert "    steps 1-4    2/75  'a cat'" in out and "    steps 1-4    2/75  ' a hat'" in out
    assert f"tag <lora:detail:0.8>: lora 'detail' te 0.8, unet 0.8: {APPLIED}" in out
    assert f"tag <lyco:style:1:te=0>: lora 'style' te 0, unet 0: {APPLIED}" in out
    assert "tag <hypernet:h:1>: hypernet 'h': not applied: hypernetworks are not supported" in out
    assert "tag <foo:bar>: foo 'bar': not applied: unknown extra network kind 'foo'" in out
    assert "tag <lora:bad:x>: lora 'bad': not applied: <lora:bad:x>: te multiplier 'x' is not a number" in out
    rc, out, _ = _run(capsys, prompt, "--json")
    report = json.loads(out)
    assert report["text"] == "a cat  AND a hat:0.5    " and report["prompt"] == prompt
    assert report["parts"] == [{"text": "a cat", "weight": 1.0}, {"text": " a hat", "weight": 0.5}]
    assert [(n["kind"], n["name"], n["applied"]) for n in report["networks"]] == [
        ("lora", "detail", True), ("lora", "style", True), ("hypernet", "h", False), ("foo", "bar", False),
        ("lora", "bad", False)]
    assert report["networks"][0]["positional"] == ["0.8"] and report["networks"][1]["named"] == [["te", "0"]]
    assert report["networks"][4]["te"] is None


def test_negative_prompts_keep_and_and_tags_as_text(capsys):
    rc, out, _ = _run(capsys, "blurry AND <lora:x:1> [ugly:bad:2]", "--negative", "--steps", "4", "--json")
    report = json.loads(out)
    assert report["negative"] is True and report["networks"] == []
    assert [t["text"] for t in report["texts"]] == ["blurry AND <lora:x:1> ugly", "blurry AND <lora:x:1> bad"]
    assert any("AND is text" in n for n in report["notes"])


def test_unparseable_schedules_and_bad_steps(capsys):
    rc, out, _ = _run(capsys, "[a|b] c|d")
    assert rc == 0 and "note: schedule syntax could not be parsed" in out
    assert "starts: a|b c|d" in out and "weighted: 'a|b' x0.9091" in out  # then [a|b] is emphasis, 1/1.1
    rc, out, err = _run(capsys, "a", "--steps", "0")
    assert rc == 2 and out == "" and err.count("\n") == 1 and "steps" in err


def test_json_size_is_linear_for_scheduled_prompts(capsys):
    sizes = {}
    for n in (2_000, 4_000):
        rc, out, _ = _run(capsys, "[ab|cd] " * (n // 8), "--json", "--steps", "10")
        assert rc == 0
        report = json.loads(out)
        assert len(report["texts"]) == 2 and len(report["schedule"]) == 10
        sizes[n] = len(out)
    assert 1.8 < sizes[4_000] / sizes[2_000] < 2.2, sizes


def test_tokenize_route_reports_the_schedule():
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from clipdiffusion.server.app import create_app
    from clipdiffusion.server.settings import ModelEntry, ServerSettings
    from server_fixtures import FAKE_SAMPLERS, FAKE_SCHEDULES, fake_factory

    settings = ServerSettings(models=(ModelEntry("tiny-a"),), samplers=FAKE_SAMPLERS, schedules=FAKE_SCHEDULES,
                              max_steps=50)
    with TestClient(create_app(fake_factory(), settings)) as client:
        r = client.post("/api/tokenize", json={"prompt": "a [cat|big dog] <lora:x:0.5> AND b", "steps": 4})
        assert r.status_code == 200, r.text
        report = r.json()
        assert report["summary"] == "3/75" and [t["id"] for t in report["tokens"]] == CLIPTokenizer().encode(
            "a big dog")
        assert [t["text"] for t in report["texts"]] == ["a cat", "a big dog", " b"] and report["headline"] == 1
        assert [(e["part"], e["start"], e["end"], e["text_index"]) for e in report["schedule"]] == [
            (0, 1, 1, 0), (0, 2, 2, 1), (0, 3, 3, 0), (0, 4, 4, 1), (1, 1, 4, 2)]
        assert report["parts"] == [{"text": "a [cat|big dog]", "weight": 1.0}, {"text": " b", "weight": 1.0}]
        (lora,) = report["networks"]
        assert (lora["te"], lora["unet"], lora["applied"]) == (0.5, 0.5, True) and lora["status"] == APPLIED
        report = client.post("/api/tokenize", json={"prompt": "a AND <lora:x:1>", "negative": True}).json()
        assert [t["text"] for t in report["texts"]] == ["a AND <lora:x:1>"] and report["networks"] == []
        plain = client.post("/api/tokenize", json={"prompt": "a cat"}).json()
        assert plain["steps"] == 20 and plain["summary"] == "2/75" and plain["notes"] == []
        for steps in (0, 51):
            r = client.post("/api/tokenize", json={"prompt": "a", "steps": steps})
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "steps"]


def test_prompt_report_properties():
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from clipdiffusion.commands.tokens import format_report, prompt_report
    from clipdiffusion.errors import PromptError

    tok = CLIPTokenizer()
    pieces = ["[", "]", "(", ")", ":", "|", "\\", "a", "cat", " ", "1", "0.5", " AND ", "<lora:x:1>", "<y:z>",
              ":2", "BREAK", "\n"]

    @settings(max_examples=60, deadline=None, derandomize=True, database=None)
    @given(st.lists(st.sampled_from(pieces), max_size=25).map("".join), st.integers(1, 6), st.booleans(),
           st.booleans())
    def check(prompt, steps, negative, weights):
        try:
            report = prompt_report(prompt, steps=steps, negative=negative, weights=weights, tokenizer=tok)
        except PromptError:
            hypothesis.event("refused by the emphasis parser")
            return
        assert json.loads(json.dumps(report, allow_nan=False)) == report and isinstance(format_report(report), str)
        texts, headline = report["texts"], report["headline"]
        assert report["summary"] == texts[headline]["summary"]
        assert max(t["count"] for t in texts) == texts[headline]["count"]
        assert {e["text_index"] for e in report["schedule"]} == set(range(len(texts)))
        for p in range(len(report["parts"])):
            entries = [e for e in report["schedule"] if e["part"] == p]
            assert entries[0]["start"] == 1 and entries[-1]["end"] == steps
            assert all(a["end"] + 1 == b["start"] for a, b in zip(entries, entries[1:]))
        assert (report["networks"] == []) >= negative and (len(report["parts"]) == 1) >= negative

    check()
