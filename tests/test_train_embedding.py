"""Textual inversion (``embedding_training``, ``embedding_data``, ``train-embedding``) on tiny random models."""

import io
import math
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from clipdiffusion.checkpoints.safetensors_io import load_file, read_shapes
from clipdiffusion.embedding_data import description_examples, folder_examples, parse_description
from clipdiffusion.embedding_training import (
    EmbeddingSettings,
    EmbeddingTrainer,
    Example,
    caption_tokens,
    check_name,
    init_vectors,
    save_embedding,
)
from clipdiffusion.errors import ClipDiffusionError
from clipdiffusion.testing import tiny_pipeline
from clipdiffusion.text.tokenizer import CLIPTokenizer

NAME = "zorblat"
VOCAB = 49408


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two threads made these tests 14x slower (they wait on each
    other), and the trainer's default is one thread for the same reason."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _examples(n=3, size=32):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        pixels = np.zeros((size, size, 3), np.uint8)
        x, y = rng.integers(0, size // 2, 2)
        pixels[y:y + size // 2, x:x + size // 2] = (140, 40, 200)
        out.append(Example(Image.fromarray(pixels), f"a {NAME} on a black background", f"image {i}"))
    return out


def _state(pipe):
    modules = {"unet": pipe.unet, "vae": pipe.vae}
    modules.update({f"text.{s.name}": s.model for s in pipe.text_encoder.encoders})
    return {f"{m}.{k}": v.detach().clone() for m, mod in modules.items() for k, v in mod.state_dict().items()}


# ---- the loss and the gradient path ------------------------------------------------------------------------------


@pytest.mark.slow  # ~5-7 s on the shared 2-core machine
def test_loss_decreases_on_a_fixed_batch():
    pipe = tiny_pipeline(0)
    trainer = EmbeddingTrainer(pipe, NAME, _examples(2), EmbeddingSettings(vectors=2))
    params = trainer.parameters()
    optimizer = torch.optim.AdamW(params, lr=0.05, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    rows = [0, 1]
    t = torch.tensor([300, 800])
    noise = torch.randn(2, 4, 16, 16, generator=g)
    losses = []
    with trainer.frozen():
        for _ in range(6):
            loss = trainer.loss(params, rows, t, noise)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        assert params[0].grad is not None and float(params[0].grad.abs().sum()) > 0
        same = float(trainer.loss(trainer.parameters(), rows, t, noise).detach())
    # a random UNet barely listens to its context, so the effect is small, but every step lowers this batch's loss
    # (measured: 1.1379 -> 1.1322 in 30 steps), and the init vectors still give the first loss exactly
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 5e-4 and same == losses[0]


def test_only_the_new_vectors_change_and_runs_are_reproducible():
    pipe = tiny_pipeline(0)
    before = _state(pipe)
    flags = {k: p.requires_grad for k, p in pipe.unet.named_parameters()}
    settings = EmbeddingSettings(vectors=3, steps=3, batch_size=1, lr=0.01, seed=5)
    a = EmbeddingTrainer(pipe, NAME, _examples(), settings).run()
    after = _state(pipe)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "model weights changed"
    assert {k: p.requires_grad for k, p in pipe.unet.named_parameters()} == flags
    assert a.steps == 3 and len(a.losses) == 3 and not a.stopped
    learned, init = a.vectors["clip_l"], a.init_vectors["clip_l"]
    assert learned.shape == (3, 32) and not torch.equal(learned, init)
    # init: "*"'s token row, cycled to 3 vectors
    star = CLIPTokenizer().encode("*")
    table = pipe.text_encoder.encoders[0].model.embeddings.token_embedding.weight
    assert torch.equal(init, table[[star[0]] * 3])
    b = EmbeddingTrainer(pipe, NAME, _examples(), settings).run()
    assert torch.equal(b.vectors["clip_l"], learned)
    c = EmbeddingTrainer(pipe, NAME, _examples(), EmbeddingSettings(**{**settings.__dict__, "seed": 6})).run()
    assert not torch.equal(c.vectors["clip_l"], learned)


def test_sdxl_learns_both_towers_and_the_file_has_both(tmp_path):
    pipe = tiny_pipeline(0, family="sdxl")
    before = _state(pipe)
    trained = EmbeddingTrainer(pipe, NAME, _examples(2), EmbeddingSettings(vectors=2, steps=2, batch_size=2)).run()
    assert all(torch.equal(before[k], v) for k, v in _state(pipe).items())
    assert set(trained.vectors) == {"clip_l", "clip_g"}
    for name, v in trained.vectors.items():
        assert not torch.equal(v, trained.init_vectors[name])
    assert set(trained.tensors()) == {"clip_l", "clip_g"}
    path = tmp_path / f"{NAME}.safetensors"
    save_embedding(path, trained, model=pipe.name, family=pipe.family)
    from clipdiffusion.checkpoints.embeddings import embedding_for

    embedding = embedding_for(path, pipe.text_encoder)
    assert embedding.widths == (16, 16) and embedding.vectors == 2
    for tensor, tower in zip(embedding.tensors, ("clip_l", "clip_g")):
        assert torch.equal(tensor, trained.vectors[tower])


def test_init_text_vectors_cycle_and_empty_is_zeros():
    pipe = tiny_pipeline(0)
    table = pipe.text_encoder.encoders[0].model.embeddings.token_embedding.weight
    ids = CLIPTokenizer().encode("purple triangle")
    v = init_vectors(pipe.text_encoder, "purple triangle", 5)["clip_l"]
    assert torch.equal(v, table[[ids[i % len(ids)] for i in range(5)]])
    assert torch.count_nonzero(init_vectors(pipe.text_encoder, "", 2)["clip_l"]) == 0


def test_caption_tokens_place_the_pseudo_ids_where_a_prompt_would():
    tok = CLIPTokenizer()
    ids = caption_tokens(tok, "a Zorblat at the top, zorblat!", NAME, 2, VOCAB)
    plain = tok.encode("a x at the top, x!")
    x = tok.encode("x")[0]
    expected = [t for p in plain for t in ([VOCAB, VOCAB + 1] if p == x else [p])]
    assert ids == expected
    with pytest.raises(ClipDiffusionError, match="does not contain"):
        caption_tokens(tok, "two zorblats", NAME, 2, VOCAB)  # a longer word is not the name
    with pytest.raises(ClipDiffusionError, match="one CLIP window"):
        caption_tokens(tok, "a zorblat " + "red " * 70, NAME, 8, VOCAB)


# ---- the file ------------------------------------------------------------------------------------------------


def test_saved_file_round_trips_and_loads_as_an_embedding(tmp_path):
    pipe = tiny_pipeline(0)
    trained = EmbeddingTrainer(pipe, NAME, _examples(2), EmbeddingSettings(vectors=2, steps=2, batch_size=1)).run()
    path = tmp_path / f"{NAME}.safetensors"
    save_embedding(path, trained, model=pipe.name, family=pipe.family)
    tensors = load_file(path)
    assert list(tensors) == ["emb_params"]
    assert torch.equal(tensors["emb_params"], trained.vectors["clip_l"])
    _, _, meta = read_shapes(path)
    assert meta["name"] == NAME and meta["step"] == "2" and meta["init_text"] == "*"
    assert meta["model"] == pipe.name and meta["stopped"] == "completed"

    from clipdiffusion.checkpoints.embeddings import embedding_for

    embedding = embedding_for(path, pipe.text_encoder)
    assert embedding.name == NAME and embedding.vectors == 2
    assert torch.equal(embedding.tensors[0], trained.vectors["clip_l"])
    if hasattr(pipe, "load_textual_inversion"):
        # the public path: the learned rows are what a prompt with the word feeds the text model
        pipe.load_textual_inversion(path)
        cond = pipe.text_encoder.encode(f"a {NAME} on a black background")
        spec = pipe.text_encoder.encoders[0]
        ids = [49406] + caption_tokens(CLIPTokenizer(), f"a {NAME} on a black background", NAME, 2, VOCAB)
        ids = ids + [49407] * (77 - len(ids))
        with torch.no_grad():
            direct = spec.model(torch.tensor([ids]), extra_embeddings=trained.vectors["clip_l"]).hidden
        assert torch.allclose(cond.context, direct, atol=1e-5)


# ---- data sources --------------------------------------------------------------------------------------------


def _png(width, height, color=(140, 40, 200)):
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(width, height):
    """A valid PNG header declaring a huge image (the pixel data need not be there: the size is checked first)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def test_folder_captions_templates_and_conversions(tmp_path):
    (tmp_path / "a.png").write_bytes(_png(40, 30))
    Image.new("RGBA", (16, 16), (1, 2, 3, 0)).save(tmp_path / "b.png")
    Image.new("L", (20, 20), 7).save(tmp_path / "c.jpg")
    (tmp_path / "b.txt").write_text("a photo of [name] on grass")
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / ".hidden.png").write_bytes(b"ignored")
    examples = folder_examples(tmp_path, NAME, "a drawing of [name]")
    assert [e.caption for e in examples] == [f"a drawing of {NAME}", f"a photo of {NAME} on grass",
                                             f"a drawing of {NAME}"]
    assert all(e.image.mode == "RGB" for e in examples)
    assert examples[0].image.size == (40, 30)


@pytest.mark.parametrize("setup, match", [
    (lambda d: None, "no image files"),
    (lambda d: (d / "x.png").write_bytes(b"not an image at all"), "x.png"),
    (lambda d: (d / "x.png").write_bytes(b""), "empty file"),
    (lambda d: (d / "x.png").write_bytes(_bomb_png(100_000, 100_000)), "larger than"),
    (lambda d: ((d / "x.png").write_bytes(_png(8, 8)), (d / "x.txt").write_text("no word here")), "neither"),
    (lambda d: ((d / "x.png").write_bytes(_png(8, 8)), (d / "x.txt").write_bytes(b"\xff\xfe\xfa")), "UTF-8"),
])  # fmt: skip
def test_folder_errors_name_the_file(tmp_path, setup, match):
    setup(tmp_path)
    with pytest.raises(ClipDiffusionError, match=match):
        folder_examples(tmp_path, NAME)


def test_folder_and_template_errors(tmp_path):
    with pytest.raises(ClipDiffusionError, match="does not exist"):
        folder_examples(tmp_path / "missing", NAME)
    (tmp_path / "x.png").write_bytes(_png(8, 8))
    with pytest.raises(ClipDiffusionError, match="neither"):
        folder_examples(tmp_path, NAME, "a photo")
    with pytest.raises(ClipDiffusionError, match="is not a folder"):
        folder_examples(tmp_path / "x.png", NAME)


def test_describe_renders_the_object_with_the_word_in_its_place():
    from clipdiffusion.tiny.judge import judge

    assert parse_description("Triangle large purple") == ("large", "purple", "triangle")
    assert parse_description("red circle") == (None, "red", "circle")
    for bad in ("purple", "large purple triangle circle", "a purple triangle", "", "huge red circle"):
        with pytest.raises(ClipDiffusionError, match="describe"):
            parse_description(bad)
    examples = description_examples("large purple triangle", NAME, 6, seed=3)
    again = description_examples("large purple triangle", NAME, 6, seed=3)
    assert [e.caption for e in again] == [e.caption for e in examples]
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(again, examples))
    for e in examples:
        assert NAME in e.caption and "purple" not in e.caption and "triangle" not in e.caption
        seen = judge(e.image).objects
        assert len(seen) == 1 and (seen[0].color, seen[0].shape, seen[0].size) == ("purple", "triangle", "large")
    held = description_examples("large purple triangle", NAME, 12, seed=3, cells=[0, 8], backgrounds=["gray"])
    assert all({o.cell for o in judge(e.image).objects} <= {0, 8} and "gray" in e.caption for e in held)


# ---- settings and the command ----------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("vectors", 0), ("vectors", 76), ("vectors", 1.5), ("steps", 0), ("batch_size", 0), ("batch_size", True),
    ("lr", 0.0), ("lr", math.nan), ("lr", 2.0), ("seed", -1), ("time_limit", 0), ("time_limit", math.inf),
    ("init_text", None),
])  # fmt: skip
def test_settings_errors_name_the_field_and_value(field, value):
    with pytest.raises(ClipDiffusionError, match=field):
        EmbeddingSettings(**{field: value})


@pytest.mark.parametrize("name", ["", "two words", "1abc", "../evil", "a" * 65, "name.pt", None])
def test_bad_names(name):
    with pytest.raises(ClipDiffusionError, match="name"):
        check_name(name)


def test_time_limit_is_honoured():
    pipe = tiny_pipeline(0)
    start = time.perf_counter()
    trained = EmbeddingTrainer(pipe, NAME, _examples(2), EmbeddingSettings(steps=1_000_000, time_limit=1.0)).run()
    elapsed = time.perf_counter() - start
    assert trained.stopped == "time limit" and trained.steps < 1_000_000 and len(trained.losses) == trained.steps
    assert elapsed < 1.0 + 3.0  # the limit counts the setup too; at most one step past it
    if trained.steps:
        assert not torch.equal(trained.vectors["clip_l"], trained.init_vectors["clip_l"])


def _cli(args, monkeypatch, capsys):
    from clipdiffusion import cli
    from clipdiffusion.commands import train_embedding

    monkeypatch.setattr(train_embedding, "_load_model", lambda path: tiny_pipeline(0))
    code = cli.main(["train-embedding", *args])
    return code, capsys.readouterr()


def test_cli_trains_and_saves_with_time_limit(tmp_path, monkeypatch, capsys):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_png(32, 32))
    out = tmp_path / f"{NAME}.safetensors"
    code, io_ = _cli([NAME, "--images", str(tmp_path / "img"), "--steps", "100000", "--time-limit", "0.3",
                      "--out", str(out), "--threads", "1"], monkeypatch, capsys)
    assert code == 0, io_.err
    assert io_.out.strip() == str(out) and "torch threads: 1" in io_.err and "time limit" in io_.err
    _, _, meta = read_shapes(out)
    assert meta["stopped"] == "time limit" and int(meta["step"]) >= 0
    assert load_file(out)["emb_params"].shape == (3, 32)  # the default: 3 vectors


@pytest.mark.parametrize("args, match", [
    (["--describe", "purple", "--steps", "1"], "describe"),
    (["--describe", "red circle", "--caption", "a [name]"], "caption"),
    (["--describe", "red circle", "--out", "x.pt"], "safetensors"),
    (["--describe", "red circle", "--vectors", "0"], "vectors"),
    (["--describe", "red circle", "--lr", "-1"], "lr"),
    (["--describe", "red circle", "--time-limit", "-5"], "time_limit"),
    (["--describe", "red circle", "--threads", "0"], "threads"),
    (["--describe", "red circle", "--scenes", "0"], "scenes"),
    (["--images", ".", "--scenes", "5"], "scenes"),
    (["--images", "/nonexistent/folder"], "does not exist"),
])  # fmt: skip
def test_cli_argument_errors(args, match, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, io_ = _cli([NAME, *args], monkeypatch, capsys)
    assert code == 2 and match in io_.err, io_.err
    assert not list(tmp_path.iterdir())  # nothing written


def test_cli_needs_exactly_one_source(monkeypatch, capsys):
    for args in ([NAME], [NAME, "--images", "x", "--describe", "red circle"]):
        with pytest.raises(SystemExit) as exc:
            _cli(args, monkeypatch, capsys)
        assert exc.value.code == 2
    code, io_ = _cli(["bad name", "--describe", "red circle"], monkeypatch, capsys)
    assert code == 2 and "not a valid embedding name" in io_.err


# ---- the study ---------------------------------------------------------------------------------------------------


def test_study_reads_the_taught_object_and_compares_arms():
    from clipdiffusion.tiny import eval_embedding as ee
    from clipdiffusion.tiny.world import ObjectSpec, SceneSpec, render_spec

    target = ("large", "purple", "triangle")
    right = render_spec(SceneSpec((ObjectSpec("purple", "triangle", 2, "large"),), "gray"), 1)
    wrong = render_spec(SceneSpec((ObjectSpec("purple", "circle", 2, "large"),
                                   ObjectSpec("red", "square", 6, "small")), "gray"), 1)  # fmt: skip
    assert all(ee.read(right, 2, "gray", target).values())
    assert ee.read(right, 5, "gray", target)["position"] is False
    got = ee.read(wrong, 2, "gray", target)
    assert got["position"] and got["color"] and not got["shape"] and not got["object"] and not got["strict"]
    assert len(ee.prompts("blicket")) == 27 and ee.prompts("blicket")[0][0].startswith("a blicket at the top left")
    rows = [(i // 4, {m: i % 4 != 0 for m in ee.METRICS}) for i in range(108)]
    s = ee.summarise(rows)
    assert s["object"]["p"] == 0.75 and s["object"]["n"] == 108 and s["object"]["se_prompt"] == 0.0
    assert abs(s["object"]["se"] - math.sqrt(0.75 * 0.25 / 108)) < 1e-12
    low = ee.summarise([(i // 4, {m: i % 2 == 0 for m in ee.METRICS}) for i in range(108)])
    diff = ee.comparisons({"word": {"summary": s}, "untrained": {"summary": low}})["untrained"]["object"]
    assert abs(diff["difference"] - 0.25) < 1e-12 and diff["z"] > 2 and diff["outside_noise"]


def test_eval_embedding_study_runs_through_the_public_path(tmp_path, monkeypatch, capsys):
    import json

    from clipdiffusion import cli
    from clipdiffusion.commands import eval as eval_command

    pipe = tiny_pipeline(0)
    trained = EmbeddingTrainer(pipe, NAME, _examples(1), EmbeddingSettings(vectors=2, steps=1, batch_size=1)).run()
    path = tmp_path / f"{NAME}.safetensors"
    save_embedding(path, trained, extra_metadata={"source": "describe:large purple triangle"})
    from clipdiffusion.tiny import eval_embedding as ee

    monkeypatch.setattr(eval_command, "_load", lambda args: pipe)
    every = ee.prompts
    monkeypatch.setattr(ee, "prompts", lambda word: every(word)[::9])  # 3 of the 27 prompts: seconds, not a minute
    out = tmp_path / "report"
    code = cli.main(["eval", "--studies", "embedding", "--embedding", str(path), "--per-prompt", "1", "--steps", "1",
                     "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())["embedding"]
    assert not report["partial"] and set(report["arms"]) == {"description", "plain", "word", "untrained"}
    assert report["arms"]["word"]["summary"]["object"]["n"] == 3
    assert report["arms"]["word"]["example"] == "a zorblat at the top left on a black background"
    assert set(report["comparisons"]) == {"description", "untrained", "plain"}
    untrained = load_file(out / "wug.safetensors")["emb_params"]
    assert torch.equal(untrained, trained.init_vectors["clip_l"])
    plain = tmp_path / "plain.safetensors"
    save_embedding(plain, trained)  # trained on images: the study does not know the object
    code = cli.main(["eval", "--studies", "embedding", "--embedding", str(plain), "--out", str(out)])
    assert code == 2 and "not trained with --describe" in capsys.readouterr().err
