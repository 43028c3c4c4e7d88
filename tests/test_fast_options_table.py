"""scripts/fast_options_table.py: per-option adherence paired against a baseline, on synthetic report.json files."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from clipdiffusion.errors import ClipDiffusionError

_SPEC = importlib.util.spec_from_file_location(
    "fast_options_table", Path(__file__).resolve().parents[1] / "scripts" / "fast_options_table.py")
fot = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(fot)

HEAD = {"model": "embedded tiny model", "steps": 20, "guidance": 7.0, "sampler": "euler"}
# 4 prompts: objects 1, 2, 3, 3
BASE = [[1, 1, 1], [2, 1, 2], [3, 1, 3], [3, 0, 2]]


def _write(tmp_path, name, cases, **head):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps({**HEAD, **head, "main": {"cases": cases}}))
    return folder


def test_summary_counts_success_by_objects_and_pooled_recall():
    s = fot.summary([tuple(c) for c in BASE])
    assert s["by_count"] == {1: 1.0, 2: 1.0, 3: 0.5}
    assert s["success"] == 0.75
    assert s["recall"] == pytest.approx(8 / 9)


def test_paired_difference_and_standard_error():
    run = [(1, 1, 1), (2, 0, 1), (3, 0, 2), (3, 0, 2)]  # loses prompts 2 and 3, one object each
    d = fot.paired([tuple(c) for c in BASE], run)
    diffs = [0, -1, -1, 0]
    mean = sum(diffs) / 4
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 3)
    assert d["success"] == pytest.approx((mean, sd / 2))
    # recall: the mean of the per-prompt differences is the difference of the pooled recalls
    assert d["recall"][0] == pytest.approx(fot.summary(run)["recall"] - 8 / 9)
    assert d["by_count"][3] == pytest.approx((-0.5, 0.5))
    assert fot.verdict(*d["success"]) == "within noise"  # -0.5 vs SE 0.29: under 2 SE


def test_verdicts():
    assert fot.verdict(0.0, 0.0) == "same"
    assert fot.verdict(-0.05, 0.01) == "worse"
    assert fot.verdict(0.05, 0.01) == "better"
    assert fot.verdict(-0.01, 0.01) == "within noise"


def test_table_rows_and_times(tmp_path):
    base = _write(tmp_path, "baseline", BASE)
    same = _write(tmp_path, "ngms", BASE)
    worse = _write(tmp_path, "deepcache3", [[1, 0, 0], [2, 0, 1], [3, 0, 2], [3, 0, 2]])
    times = {"configs": {"baseline": {"seconds": 10.0}, "diffusers": {"seconds": 12.5}, "ngms": {"seconds": 8.0}}}
    lines = fot.table(base, [same, worse], times)
    rows = [line for line in lines if line.startswith("| ")][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| baseline", "| ngms", "| deepcache3"]
    assert "| 8.0 | 0.80x | 0.64x |" in rows[1] and "(same)" in rows[1]
    assert "| - | - | - |" in rows[2]  # no time for deepcache3
    assert "-0.750 ± 0.250 (worse)" in rows[2]


def test_mismatched_runs_are_refused(tmp_path):
    base = _write(tmp_path, "baseline", BASE)
    other_prompts = _write(tmp_path, "shuffled", [BASE[1], BASE[0], BASE[2], BASE[3]])
    with pytest.raises(ClipDiffusionError, match="same prompts"):
        fot.table(base, [other_prompts])
    other_steps = _write(tmp_path, "steps10", BASE, steps=10)
    with pytest.raises(ClipDiffusionError, match="not a paired comparison"):
        fot.table(base, [other_steps])


def test_bad_reports_name_the_run_and_field(tmp_path):
    missing = tmp_path / "empty"
    missing.mkdir()
    with pytest.raises(ClipDiffusionError, match="empty.*cannot read"):
        fot.load_run(missing)
    old = tmp_path / "old"
    old.mkdir()
    (old / "report.json").write_text(json.dumps({**HEAD, "main": {"success": {}}}))
    with pytest.raises(ClipDiffusionError, match="no main.cases"):
        fot.load_run(old)
    bad = _write(tmp_path, "bad", [[2, 1, 3]])
    with pytest.raises(ClipDiffusionError, match=r"main.cases\[0\].*\[2, 1, 3\]"):
        fot.load_run(bad)


def test_main_prints_the_table_and_reports_errors(tmp_path, capsys):
    base = _write(tmp_path, "baseline", BASE)
    assert fot.main([str(base), str(_write(tmp_path, "ngms", BASE))]) == 0
    assert "| ngms |" in capsys.readouterr().out
    assert fot.main([str(base), str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
