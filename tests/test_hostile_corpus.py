"""Every broken or malicious file in tests/hostile_corpus.py, through the commands users run.

A refused file gets exit 2 and one line naming it (and the field, where the case names one); no traceback; a
malicious pickle runs no code; a failed ``generate`` leaves the image already at ``-o`` as it was, and a failed
``convert`` writes nothing. Files whose weights hold NaN/Inf load, but ``generate`` names the stage where the values
appear instead of drawing a black image, and ``info --check`` names the tensor.

Each test runs every case and reports all the failing ones together. FIFOs and device links run in a subprocess
with a timeout: opening them must never block.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import hostile_corpus
from clipdiffusion.cli import main

OLD_IMAGE = b"\x89PNG\r\n\x1a\n an image the user already had"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, hostile_corpus.build(root)


def _run(case, argv, capsys):
    """(exit code, stderr+stdout text) of ``clipdiffusion ARGV``, in-process or, for isolated cases, in a child."""
    if case.isolate:
        try:
            done = subprocess.run([sys.executable, "-m", "clipdiffusion", *argv], capture_output=True, text=True,
                                  timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip
        except subprocess.TimeoutExpired:
            return None, "timed out (blocked on the file?)"
        return done.returncode, done.stderr + done.stdout
    try:
        code = main(argv)
    except BaseException as exc:  # noqa: BLE001 - any escape is the failure being tested for
        captured = capsys.readouterr()
        return "raised", f"{type(exc).__name__}: {exc}"[:300] + captured.err[-300:]
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def _error_line(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if ": error: " in line]
    return errors[0] if len(errors) == 1 else None


def _check_refusal(case, code, text, what) -> str | None:
    if code != 2:
        return f"{case.name}: {what} exit {code!r}, expected 2: {text.strip()[-300:]}"
    if "Traceback" in text:
        return f"{case.name}: {what} printed a traceback"
    line = _error_line(text)
    if line is None:
        return f"{case.name}: {what} did not print exactly one error line: {text.strip()[-300:]}"
    if case.path.name not in line:
        return f"{case.name}: {what} error does not name the file: {line[:300]}"
    if case.kind == "refused" and case.mention and case.mention.lower() not in line.lower():
        return f"{case.name}: {what} error does not mention {case.mention!r}: {line[:300]}"
    return None


def _report(problems):
    assert not problems, f"{len(problems)} cases failed:\n" + "\n".join(problems)


def test_the_corpus_is_large_and_varied(corpus):
    root, cases = corpus
    names = [c.name for c in cases]
    assert len(cases) >= 60 and len(set(names)) == len(names)
    kinds = {c.kind for c in cases}
    assert kinds == {"refused", "nonfinite"}
    for word in ("truncated", "overlapping", "int8", "nan", "meta-", "malicious", "traversal", "fifo", "symlink",
                 "index-", "unet-block-out"):  # fmt: skip
        assert any(word in n for n in names), word


def test_info_refuses_each_bad_file_in_one_line(corpus, capsys):
    root, cases = corpus
    problems = []
    for case in cases:
        code, text = _run(case, ["info", str(case.path)], capsys)
        if case.kind == "nonfinite":
            if code != 0:
                problems.append(f"{case.name}: info exit {code!r} on a well-formed file: {text[-300:]}")
            continue
        if "container" in case.tags or code != 0:
            problems.append(_check_refusal(case, code, text, "info"))
    _report([p for p in problems if p])
    assert not (root / hostile_corpus.MARKER_NAME).exists(), "a malicious pickle ran code"


def test_info_check_names_non_finite_tensors(corpus, capsys):
    root, cases = corpus
    problems = []
    for case in cases:
        code, text = _run(case, ["info", "--check", str(case.path)], capsys)
        if case.kind == "refused":
            if "container" in case.tags or code != 0:
                problems.append(_check_refusal(case, code, text, "info --check"))
        elif code in (0, "raised", None) or "Traceback" in text or "non-finite" not in text.lower():
            problems.append(f"{case.name}: info --check exit {code!r} without naming non-finite tensors: "
                            f"{text[-300:]}")  # fmt: skip
    _report([p for p in problems if p])


def test_generate_refuses_and_keeps_the_old_image(corpus, capsys, tmp_path):
    root, cases = corpus
    out = tmp_path / "old.png"
    problems = []
    for case in cases:
        out.write_bytes(OLD_IMAGE)
        argv = ["generate", "a red circle", "--model", str(case.path), "--steps", "2", "--seed", "1", "-o", str(out)]
        code, text = _run(case, argv, capsys)
        problem = _check_refusal(case, code, text, "generate")
        if problem is None and case.kind == "nonfinite" and case.mention.lower() not in text.lower():
            problem = f"{case.name}: generate error does not name the stage {case.mention!r}: {text[-300:]}"
        problems.append(problem)
        if out.read_bytes() != OLD_IMAGE:
            problems.append(f"{case.name}: generate changed the image already at -o")
        leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != out.name)
        if leftovers:
            problems.append(f"{case.name}: generate left files behind: {leftovers}")
    _report([p for p in problems if p])
    assert not (root / hostile_corpus.MARKER_NAME).exists(), "a malicious pickle ran code"


def test_convert_refuses_and_writes_nothing(corpus, capsys, tmp_path):
    root, cases = corpus
    problems = []
    for i, case in enumerate(cases):
        out = tmp_path / f"out{i}.safetensors"
        code, text = _run(case, ["convert", str(case.path), str(out)], capsys)
        if case.kind == "nonfinite" and code == 0:
            continue  # a faithful copy of what the file holds is a fine outcome; generate names the problem
        problems.append(_check_refusal(case, code, text, "convert"))
        if out.exists():
            problems.append(f"{case.name}: a refused convert wrote {out.name}")
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")]
    if leftovers:
        problems.append(f"temporary files left behind: {leftovers[:5]}")
    _report([p for p in problems if p])
    assert not (root / hostile_corpus.MARKER_NAME).exists(), "a malicious pickle ran code"


def test_zip_traversal_writes_nothing_outside(corpus):
    root, _ = corpus
    escaped = [p for p in (root.parent, root.parent.parent) for p in p.glob(hostile_corpus.MARKER_NAME + "*")]
    assert not escaped


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file regardless of its mode")
def test_unreadable_file_is_one_line(corpus, capsys, tmp_path):
    _, cases = corpus
    good = next(Path(c.path).parent.parent / "_base" / "good.safetensors" for c in cases)
    locked = tmp_path / "locked.safetensors"
    locked.write_bytes(good.read_bytes())
    locked.chmod(0)
    code, text = _run(hostile_corpus.Case("locked", locked), ["info", str(locked)], capsys)
    assert code == 2 and "locked.safetensors" in text
