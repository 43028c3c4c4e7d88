"""``clipdiffusion batch`` in-process: reading and checking request files, file names from ids, the manifest and
resuming (no id written twice, a crash between a PNG and its manifest line repaired with identical bytes), and the
seed-batched engine calls being bit-identical to one call per image. Tiny random model, 2-3 steps."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from clipdiffusion import batch
from clipdiffusion.batch import BatchItem, Manifest, file_name, plan_units, prepare, read_jsonl, read_prompts
from clipdiffusion.cli import main
from clipdiffusion.errors import ClipDiffusionError
from clipdiffusion.request import GenerationRequest


@pytest.fixture(scope="module")
def pipe():
    from clipdiffusion.testing import tiny_pipeline

    return tiny_pipeline(0)


def write_lines(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [
    {"id": "red-5", "prompt": "a red circle", "steps": 1, "seed": 5},
    {"id": "red-6", "prompt": "a red circle", "steps": 1, "seed": 6},
    {"id": "red-7", "prompt": "a red circle", "steps": 1, "seed": 7},
    {"id": "blue", "prompt": "a blue square", "negative_prompt": "red", "steps": 1, "seed": 1, "guidance": 5},
    {"id": "other-size", "prompt": "a red circle", "steps": 1, "seed": 8, "width": 16, "height": 16},
]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_job(pipe, tmp_path, rows=ROWS, **kwargs):
    requests = write_lines(tmp_path / "requests.jsonl", rows)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    plan = prepare(read_jsonl(requests), out, **kwargs)
    written = batch.run_local(pipe, plan, threads=1)
    return out, plan, written


def manifest_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_manifest_pngs_and_infotext(pipe, tmp_path):
    out, plan, written = run_job(pipe, tmp_path)
    assert written == 5
    records = manifest_lines(out)
    assert [r["id"] for r in records] == ["red-5", "red-6", "red-7", "blue", "other-size"]
    for record in records:
        png = out / record["file"]
        assert record["sha256"] == sha(png)
        assert set(record["timings"]) == {"encode", "sample", "vae", "png", "total"}
        assert all(v >= 0 for v in record["timings"].values())
        with Image.open(png) as image:
            params = image.text["parameters"]
            assert image.size == ((16, 16) if record["id"] == "other-size" else (32, 32))
        assert f"Seed: {record['seed']}" in params
    assert [r["seed"] for r in records] == [5, 6, 7, 1, 8]
    assert all(r["batch"] == 1 for r in records)
    with Image.open(out / "other-size.png") as image:
        assert image.size == (16, 16)
    with Image.open(out / "blue.png") as image:
        assert image.text["parameters"].startswith("a blue square\nNegative prompt: red\n")
        assert "CFG scale: 5" in image.text["parameters"]


def test_default_plan_is_one_image_per_call_and_matches_generate(pipe, tmp_path):
    out, plan, _ = run_job(pipe, tmp_path)
    assert all(len(u.items) == 1 for u in plan.units)
    # ordered by shape: the 32x32 guidance-7 requests first, then the others
    assert [u.items[0].id for u in plan.units] == ["red-5", "red-6", "red-7", "blue", "other-size"]
    import numpy as np

    direct = pipe.generate("a red circle", steps=1, seed=6)
    with Image.open(out / "red-6.png") as image:
        assert np.array_equal(np.asarray(image), np.asarray(direct.image))
        assert image.text["parameters"] == direct.infotexts[0]


def test_seed_batches_are_close_but_not_promised_identical(pipe, tmp_path):
    """--max-batch > 1 runs consecutive seeds as one UNet batch: measured within 1/255 of one call per image (the
    CPU kernels block batches differently), which is why it is not the default."""
    import numpy as np

    (tmp_path / "batched").mkdir()
    (tmp_path / "single").mkdir()
    out, batched, _ = run_job(pipe, tmp_path / "batched", max_unit=8)
    single, _, _ = run_job(pipe, tmp_path / "single")
    assert [len(u.items) for u in batched.units] == [3, 1, 1]
    for record in manifest_lines(out):
        with Image.open(out / record["file"]) as a, Image.open(single / record["file"]) as b:
            assert np.abs(np.asarray(a).astype(int) - np.asarray(b)).max() <= 1, record["id"]
            assert a.text == b.text


def test_resume_skips_done_and_redoes_missing_or_changed(pipe, tmp_path):
    out, _, _ = run_job(pipe, tmp_path)
    before = {r["id"]: r["sha256"] for r in manifest_lines(out)}
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    # rerun: nothing to do, nothing written
    plan = prepare(read_jsonl(tmp_path / "requests.jsonl"), out)
    assert plan.todo == [] and len(plan.skipped) == 5
    assert batch.run_local(pipe, plan) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == mtimes
    # a deleted PNG and a changed one are made again (same seeds: the same bytes); the others are not touched
    (out / "blue.png").unlink()
    (out / "red-6.png").write_bytes(b"not the image")
    plan = prepare(read_jsonl(tmp_path / "requests.jsonl"), out)
    assert sorted(i.id for i in plan.todo) == ["blue", "red-6"]
    assert batch.run_local(pipe, plan) == 2
    assert sha(out / "blue.png") == before["blue"] and sha(out / "red-6.png") == before["red-6"]
    assert (out / "red-5.png").stat().st_mtime_ns == mtimes["red-5.png"]
    # the latest record per id counts; the manifest only grew
    latest = Manifest.open(out).records
    assert {k: v["sha256"] for k, v in latest.items()} == before
    assert len(manifest_lines(out)) == 7


def test_crash_between_png_and_manifest_line(pipe, tmp_path, monkeypatch):
    """The PNG of 'red-7' is written, then the process dies before its manifest line: the rerun writes that PNG
    again (identical bytes) and every id ends with exactly one manifest line; no id is written twice."""
    requests = write_lines(tmp_path / "requests.jsonl", ROWS)
    out = tmp_path / "out"
    out.mkdir()
    real_append = Manifest.append

    def dying_append(self, record):
        if record["id"] == "red-7":
            raise KeyboardInterrupt("killed")
        real_append(self, record)

    monkeypatch.setattr(Manifest, "append", dying_append)
    with pytest.raises(KeyboardInterrupt):
        batch.run_local(pipe, prepare(read_jsonl(requests), out), threads=1)
    assert (out / "red-7.png").exists() and [r["id"] for r in manifest_lines(out)] == ["red-5", "red-6"]
    crashed = (out / "red-7.png").read_bytes()
    monkeypatch.setattr(Manifest, "append", real_append)
    writes = []
    real_write = batch.Writer.write
    monkeypatch.setattr(batch.Writer, "write", lambda self, row: writes.append(row["id"]) or real_write(self, row))
    batch.run_local(pipe, prepare(read_jsonl(requests), out), threads=1)
    assert writes == ["red-7", "blue", "other-size"]
    assert (out / "red-7.png").read_bytes() == crashed
    ids = [r["id"] for r in manifest_lines(out)]
    assert sorted(ids) == sorted(r["id"] for r in ROWS) and len(ids) == len(set(ids))
    assert not list(out.glob(".*.tmp"))  # no temporary file left


def test_writer_never_writes_an_id_twice(tmp_path):
    manifest = Manifest.open(tmp_path)
    writer = batch.Writer(manifest)
    data = b"\x89PNG fake"
    row = {"id": "x", "seed": 1, "file": "x.png", "png": data, "sha256": hashlib.sha256(data).hexdigest(),
           "batch": 1, "timings": {}}
    assert writer.write(row) is True
    assert writer.write(dict(row)) is False  # a retried task's repeat
    assert len(manifest_lines(tmp_path)) == 1
    with pytest.raises(ClipDiffusionError, match="sha256"):
        writer.write({**row, "id": "y", "file": "y.png", "sha256": "0" * 64})
    # the file name comes from the id, whatever the row says
    assert writer.write({**row, "id": "z", "file": "../escape.png"}) is True
    assert (tmp_path / "z.png").read_bytes() == data and not (tmp_path.parent / "escape.png").exists()
    assert manifest_lines(tmp_path)[-1]["file"] == "z.png"


def test_torn_manifest_line_is_dropped(tmp_path):
    good = {"id": "a", "file": "a.png", "sha256": "ab", "seed": 1}
    (tmp_path / "manifest.jsonl").write_bytes(json.dumps(good).encode() + b"\n" + b'{"id": "b", "fi')
    manifest = Manifest.open(tmp_path)
    assert list(manifest.records) == ["a"] and manifest.dropped == 1
    assert (tmp_path / "manifest.jsonl").read_bytes() == json.dumps(good).encode() + b"\n"


@pytest.mark.parametrize("item_id", ["../../etc/passwd", "a/b", "/abs", ".hidden", "..", "manifest.jsonl",
                                     "con", "ü-ñ", "a\\b", "x" * 200, "MANIFEST.JSONL"])
def test_ids_become_safe_file_names(item_id):
    name = file_name(item_id)
    assert "/" not in name and "\\" not in name and not name.startswith(".") and name.endswith(".png")
    assert Path(name).name == name and len(name) <= 113
    assert name != "manifest.jsonl"
    if item_id not in ("con",):
        assert name != item_id + ".png" or item_id.isascii()


def test_distinct_ids_never_share_a_file():
    ids = ["a/b", "a_b", "a b", "a?b", "a//b", "ab"]
    assert len({file_name(i) for i in ids}) == len(ids)
    assert file_name("plain-id_1.x") == "plain-id_1.x.png"


def test_hostile_ids_stay_inside_the_output_folder(pipe, tmp_path):
    rows = [{"id": "../escape", "prompt": "x", "steps": 1, "seed": 1},
            {"id": "sub/dir/name", "prompt": "x", "steps": 1, "seed": 2},
            {"id": 7, "prompt": "x", "steps": 1, "seed": 3}]
    out, _, written = run_job(pipe, tmp_path, rows)
    assert written == 3
    assert not (tmp_path / "escape.png").exists() and not (out / "sub").exists()
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 4 and "manifest.jsonl" in names and "7.png" in names
    assert [r["id"] for r in manifest_lines(out)] == ["../escape", "sub/dir/name", "7"]


@pytest.mark.parametrize("line, message", [
    ('{"id": "a", "prompt": "x", "stpes": 3}', r":2: unknown field 'stpes'"),
    ('{"id": "first", "prompt": "x"}', r":2: id='first' is also on line 1"),
    ('{"id": "a", "prompt": "x", "steps": -1}', r":2: steps=-1"),
    ('{"id": "a", "prompt": "x", "guidance": NaN}', r":2: NaN is not a number"),
    ('{"id": "a", "prompt": "x"', r":2: not JSON"),
    ('["a", "x"]', r":2: expected a JSON object, got list"),
    ('{"prompt": "x"}', r":2: missing field 'id'"),
    ('{"id": "", "prompt": "x"}', r":2: id=''"),
    ('{"id": "a\\u0000b", "prompt": "x"}', r":2: id="),
    ('{"id": true, "prompt": "x"}', r":2: id=True: must be a string or an integer"),
    ('{"id": "a", "init_image": "/etc/passwd"}', r":2: init_image='/etc/passwd': images cannot be given"),
    ('{"id": "a", "batch_size": 4}', r":2: batch_size=4: one line is one image"),
    ('{"id": "a", "sampler": "Euler a"}', r":2: sampler='Euler a'"),
    ('{"id": "a", "sampler": "nosuch"}', r":2: sampler='nosuch': unknown sampler"),
    ('{"id": "a", "prompt": 5}', r":2: prompt=5"),
])
def test_hostile_lines_name_the_line_and_field(tmp_path, line, message):
    path = write_lines(tmp_path / "r.jsonl", ['{"id": "first", "prompt": "ok"}', line])
    with pytest.raises(ClipDiffusionError, match=message):
        read_jsonl(path)


def test_hostile_files(tmp_path):
    (tmp_path / "bin.jsonl").write_bytes(b'{"id": "a"}\n\xff\xfe\n')
    with pytest.raises(ClipDiffusionError, match=r"bin.jsonl:2: not UTF-8"):
        read_jsonl(tmp_path / "bin.jsonl")
    (tmp_path / "long.jsonl").write_bytes(b'{"id": "a", "prompt": "' + b"x" * (batch.MAX_LINE_BYTES + 10) + b'"}\n')
    with pytest.raises(ClipDiffusionError, match=r"long.jsonl:1: the line is over"):
        read_jsonl(tmp_path / "long.jsonl")
    with pytest.raises(ClipDiffusionError, match="cannot read"):
        read_jsonl(tmp_path / "missing.jsonl")
    # blank lines and comments are skipped; line numbers stay the file's
    path = write_lines(tmp_path / "ok.jsonl", ["", "# a comment", '{"id": "a", "prompt": "x"}'])
    assert [(i.id, i.line) for i in read_jsonl(path)] == [("a", 3)]


def test_prompts_file_with_shared_options(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\n\na blue square, (big:1.2)\n", encoding="utf-8")
    items = read_prompts(path, {"steps": 3, "seed": 10}, n_seeds=2)
    assert [(i.id, i.request.prompt, i.request.seed) for i in items] == [
        ("p00001-s0", "a red circle", 10), ("p00001-s1", "a red circle", 11),
        ("p00003-s0", "a blue square, (big:1.2)", 10), ("p00003-s1", "a blue square, (big:1.2)", 11)]
    assert all(i.request.steps == 3 for i in items)
    units = plan_units(items, max_unit=4)
    assert [[i.id for i in u.items] for u in units] == [["p00001-s0", "p00001-s1"], ["p00003-s0", "p00003-s1"]]
    with pytest.raises(ClipDiffusionError, match=r"prompts.txt:1: steps=0"):
        read_prompts(path, {"steps": 0})
    with pytest.raises(ClipDiffusionError, match="n-seeds=0"):
        read_prompts(path, {}, n_seeds=0)


def test_planning_groups_by_shape_and_consecutive_seeds():
    def item(i, seed, **fields):
        return BatchItem(f"i{i}", GenerationRequest(prompt=fields.pop("prompt", "a"), seed=seed, **fields))

    items = [item(0, 1), item(1, 2), item(2, 4), item(3, 5, steps=3), item(4, 5), item(5, 6, prompt="b"),
             item(6, 3)]
    units = plan_units(items, max_unit=2)
    assert [[i.id for i in u.items] for u in units] == [["i0", "i1"], ["i2", "i4"], ["i5"], ["i6"], ["i3"]]
    assert units[0].request.batch_size == 2 and units[0].request.seed == 1
    assert batch.shape_key(items[0].request) != batch.shape_key(items[3].request)
    assert batch.shape_key(items[0].request) == batch.shape_key(items[5].request)  # prompts differ, shape same
    with pytest.raises(ClipDiffusionError, match="resolve the seed"):
        plan_units([item(0, -1)])


def test_random_seeds_are_resolved_and_recorded(pipe, tmp_path):
    out, plan, _ = run_job(pipe, tmp_path, [{"id": "r", "prompt": "x", "steps": 1}])
    (record,) = manifest_lines(out)
    assert 0 <= record["seed"] < 2**32 and plan.todo[0].request.seed == record["seed"]


@pytest.mark.slow  # loads the embedded model
def test_cli(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n", encoding="utf-8")
    out = tmp_path / "out"
    args = ["batch", "--prompts", str(prompts), "--out", str(out), "--steps", "1", "--seed", "3", "--n-seeds", "2",
            "--width", "16", "--height", "16"]
    assert main(args) == 0
    assert "2 images written" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["manifest.jsonl", "p00001-s0.png", "p00001-s1.png"]
    assert main(args) == 0
    assert "2 already done, 0 to make" in capsys.readouterr().err
    bad = write_lines(tmp_path / "bad.jsonl", ['{"id": "a", "colour": "red"}'])
    assert main(["batch", str(bad), "--out", str(out)]) == 2
    assert "bad.jsonl:1: unknown field 'colour'" in capsys.readouterr().err
    assert main(["batch", "--out", str(out)]) == 2
    assert "either REQUESTS.jsonl or --prompts" in capsys.readouterr().err
    assert main(["batch", str(bad), "--out", str(tmp_path / "no" / "such")]) == 2
