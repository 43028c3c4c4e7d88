"""The prompt-editing study's plumbing and arithmetic, with stand-in pipelines (no model, a second or two)."""

import json
import math

import pytest

from clipdiffusion.text.schedule import prompt_schedule
from clipdiffusion.tiny import eval_schedule as es
from clipdiffusion.tiny.eval import GroundTruthPipeline, NoisePipeline, _Result
from clipdiffusion.tiny.judge import Judgement, JudgedObject


class DecidesAt:
    """Draws the ground truth of the text the schedule shows at step ``step`` (1-based): a model that decides
    everything at that one step. AND parts are drawn together (the ground truth parses both objects)."""

    def __init__(self, step):
        self.step = step
        self.truth = GroundTruthPipeline()

    def generate(self, prompt, *, seed=0, steps=20, batch_size=1, **_ignored):
        text = next(t for end, t in prompt_schedule(prompt, steps) if end >= self.step)
        return _Result([self.truth.generate(text, seed=seed + i).image for i in range(batch_size)])


def test_standard_errors_and_differences():
    assert es.binomial_se(0.5, 100) == pytest.approx(0.05)
    assert es.binomial_se(0.0, 100) == 0.0 and math.isnan(es.binomial_se(0.5, 0))
    d = es.difference(0.6, 100, 0.5, 100)
    assert d["difference"] == pytest.approx(0.1)
    assert d["se"] == pytest.approx(math.sqrt(0.24 / 100 + 0.25 / 100))
    assert d["z"] == pytest.approx(0.1 / d["se"]) and not d["outside_noise"]
    assert es.difference(0.9, 100, 0.5, 100)["outside_noise"]
    s = es.shares(["a", "a", "b", "neither", "a", "b"], groups=[0, 0, 0, 1, 1, 1])
    assert s["n"] == 6 and sum(s[o]["p"] for o in es.OUTCOMES) == pytest.approx(1.0)
    assert s["a"]["p"] == pytest.approx(0.5) and s["a"]["se"] == pytest.approx(math.sqrt(0.25 / 6))
    # per-prompt shares of "a": 2/3 and 1/3 -> their standard deviation / sqrt(2)
    assert s["a"]["se_prompt"] == pytest.approx(math.sqrt(2 / 36) / math.sqrt(2))
    assert es._pm(s["a"]) == "0.50 ± 0.20 (0.17)" and es._pm({"p": 1.0, "se": 0.0}) == "1.00 ± 0.00"


def test_swap_text_edits_exactly_the_attribute_words():
    base = es.swap_bases("position", 1, 10)[0]
    text = es.swap_text(base.obj, base.background, "position", base.a, base.b, 0.3)
    assert f"at the [{base.a}:{base.b}:0.3] on a {base.background} background" in text
    first, last = prompt_schedule(text, 20)
    assert first[0] == 6 and base.a in first[1] and base.b in last[1] and "[" not in last[1]
    for attribute in es.ATTRIBUTES:
        bases = es.swap_bases(attribute, 5, 10)
        assert all(b.a != b.b and getattr(b.obj, "position" if attribute == "position" else attribute) == b.a
                   for b in bases)  # fmt: skip
        assert len({b.seed for b in bases}) == 5


def test_position_read_needs_one_cell_not_both():
    base = es.SwapBase("position", es.ObjectSpec("red", "circle", 0, "large"), "white", "top left", "bottom", 1)
    obj = lambda cell: JudgedObject("red", "circle", "large", cell, 100, (0, 0, 9, 9))  # noqa: E731
    assert es.read_attribute(base, Judgement("white", (obj(0),))) == "a"
    assert es.read_attribute(base, Judgement("white", (obj(7),))) == "b"
    assert es.read_attribute(base, Judgement("white", (obj(0), obj(7)))) == "neither"
    assert es.read_attribute(base, Judgement("white", ())) == "neither"


def test_swap_study_finds_the_step_a_model_decides_at():
    table = es.swap_study(DecidesAt(10), per_cell=2, per_prompt=2, fractions=(0.2, 0.6), steps=20)
    for attribute, cells in table.items():
        assert cells[0.2]["steps_on_a"] == 4 and cells[0.6]["steps_on_a"] == 12
        assert cells[0.2]["b"]["p"] == 1.0, (attribute, cells[0.2])  # A shown for 4 steps only: B decided
        assert cells[0.6]["a"]["p"] == 1.0, (attribute, cells[0.6])  # A still shown at step 10
        for cell in cells.values():
            assert cell["n"] == 2 and sum(cell[o]["p"] for o in es.OUTCOMES) == pytest.approx(1.0)
    noise = es.swap_study(NoisePipeline(), per_cell=2, per_prompt=1, attributes=("color",), fractions=(0.5,))
    assert sum(noise["color"][0.5][o]["p"] for o in es.OUTCOMES) == pytest.approx(1.0)


def test_alternation_and_and_studies_on_stand_ins():
    alt = es.alternation_study(DecidesAt(10), per_cell=2, per_prompt=2, steps=20)
    assert alt["color red|blue"]["b"]["p"] == 1.0  # step 10 shows the second option
    assert alt["shape circle|square"]["seen"] == {"square": 2}
    both = es.and_study(GroundTruthPipeline(), per_cell=2, per_prompt=2)
    assert both["one prompt"]["success"]["p"] == 1.0 and both["AND"]["recall"] == both["one prompt"]["recall"]
    assert both["difference"]["success"] == {"difference": 0.0, "se": 0.0, "z": 0.0, "outside_noise": False}
    assert " AND " in both["examples"][1] and " AND " not in both["examples"][0]
    assert "| success | 1.00 ± 0.00 | 1.00 ± 0.00 |" in es.and_table(both)
    assert "`[red\\|blue]`" in es.alternation_table(alt)


def test_cli_schedule_study_writes_the_report_and_plot(tmp_path):
    from PIL import Image

    from clipdiffusion.cli import main

    out = tmp_path / "r"
    assert main(["eval", "--reference", "ground-truth", "--studies", "schedule", "--per-count", "1",
                 "--out", str(out)]) == 0  # fmt: skip
    report = (out / "report.md").read_text()
    assert "| color | 0.1 | 2 |" in report and "| size | 0.9 | 18 |" in report and "PARTIAL" not in report
    data = json.loads((out / "report.json").read_text())["schedule"]
    assert data["partial"] is False and set(data["swap"]) == set(es.ATTRIBUTES)
    assert Image.open(out / "schedule.png").size == (560, 340)
    assert main(["eval", "--reference", "noise", "--studies", "schedule", "--per-prompt", "0",
                 "--out", str(out)]) == 2  # fmt: skip
