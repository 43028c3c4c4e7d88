"""Training of the tiny model: a few steps per phase on micro sizes, resume, export and loading."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from clipdiffusion.errors import ClipDiffusionError
from clipdiffusion.tiny.batches import ContextBuilder, caption_variants, loose_caption
from clipdiffusion.tiny.train import Trainer, TrainSettings
from clipdiffusion.tiny.world import ObjectSpec, SceneSpec

MICRO = dict(model="micro", minutes=60.0, max_steps=2, clip_batch=8, vae_batch=2, unet_batch=4, pool_size=6,
             warmup=2, log_every=1)  # fmt: skip


def _settings(**kw):
    return TrainSettings(**{**MICRO, **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    trainer = Trainer(out, _settings(), log=lambda line: None)
    return trainer, trainer.run()


def test_all_phases_run_and_log(trained):
    trainer, path = trained
    assert trainer.state["step"] == {"clip": 2, "vae": 2, "pool": 1, "unet": 2}
    entries = [json.loads(line) for line in (trainer.out / "log.jsonl").read_text().splitlines()]
    assert {e["phase"] for e in entries} == {"clip", "vae", "pool", "unet"}
    assert all(np.isfinite(e["loss"]) for e in entries if "loss" in e)
    assert trainer.state["scale_factor"] > 0 and len(trainer.pool["scenes"]) == 6


def test_export_is_a_tiny_ldm_checkpoint_that_loads_and_generates(trained):
    from clipdiffusion import Pipeline
    from clipdiffusion.checkpoints.safetensors_io import read_shapes

    trainer, path = trained
    shapes, dtypes, metadata = read_shapes(path)
    assert metadata["clipdiffusion.family"] == "tiny"
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in shapes
    assert any(k.startswith("first_stage_model.encoder.") for k in shapes)
    assert any(k.startswith("cond_stage_model.transformer.") for k in shapes)
    assert set(dtypes.values()) <= {"F16", "I64"}
    pipe = Pipeline.from_file(path)
    assert pipe.family == "tiny"
    assert abs(pipe.vae.config.scale_factor - trainer.state["scale_factor"]) < 1e-6
    image = pipe.generate("a red circle at the top left", steps=2, seed=3).image
    canvas = trainer.config.image.canvas  # the model's native size travels in the file (32 for micro)
    assert image.size == (canvas, canvas)


@pytest.mark.slow  # two more micro trainings, ~5 s on a loaded 2-core machine
@pytest.mark.parametrize("lr_floor", [None, 0.05])  # the cosine decay follows step counts when capped
def test_resume_continues_exactly(tmp_path, lr_floor):
    # uninterrupted run vs the same run killed after 3 steps and resumed: identical weights
    straight = Trainer(tmp_path / "a", _settings(lr_floor=lr_floor), log=lambda line: None)
    straight.run()
    first = Trainer(tmp_path / "b", _settings(lr_floor=lr_floor), log=lambda line: None)
    assert first.run(stop_after=3) is None
    assert (tmp_path / "b" / "state.pt").exists() and not (tmp_path / "b" / "tiny-sd.safetensors").exists()
    resumed = Trainer(tmp_path / "b", _settings(lr_floor=lr_floor), resume=True, log=lambda line: None)
    assert resumed.state["step"]["clip"] == 2 and resumed.state["step"]["vae"] == 1
    resumed.run()
    assert resumed.state["step"] == straight.state["step"]
    for name in ("text", "vae", "unet", "ema"):
        a, b = straight.models[name].state_dict(), resumed.models[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow  # two micro trainings
def test_resume_after_the_pool_restores_its_scenes(tmp_path):
    straight = Trainer(tmp_path / "a", _settings(), log=lambda line: None)
    straight.run()
    first = Trainer(tmp_path / "b", _settings(), log=lambda line: None)
    assert first.run(stop_after=5) is None  # clip 2, vae 2, pool 1: stopped before the first UNet step
    resumed = Trainer(tmp_path / "b", _settings(), resume=True, log=lambda line: None)
    assert resumed.state["phase"] == 3 and resumed.pool["scenes"] == first.pool["scenes"]
    assert torch.equal(torch.cat(resumed.pool["latents"]), torch.cat(first.pool["latents"]))
    # the contexts are not in state.pt: encoded again from the saved captions, they come out bit-identical
    assert resumed.pool["captions"] == first.pool["captions"]
    assert all(torch.equal(a, b) for a, b in zip(resumed.pool["contexts"], first.pool["contexts"], strict=True))
    resumed.run()
    a, b = straight.models["unet"].state_dict(), resumed.models["unet"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # resumed with another pool_captions, the saved captions no longer index the scenes: a named error
    with pytest.raises(ClipDiffusionError, match="malformed .*24 pooled captions for 6 scenes at pool_captions 2"):
        Trainer(tmp_path / "b", _settings(pool_captions=2), resume=True, log=lambda line: None)


class _Planted:
    def __reduce__(self):  # what a malicious pickle does: call something on load
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_resume_never_runs_code_from_a_planted_state(tmp_path):
    planted = _Planted()
    planted.marker = str(tmp_path / "pwned")
    torch.save({"models": planted}, tmp_path / "state.pt")
    with pytest.raises(ClipDiffusionError, match="resume: .*state.pt.* not a training state this version can read"):
        Trainer(tmp_path, _settings(), resume=True, log=lambda line: None)
    assert not (tmp_path / "pwned").exists()
    torch.save({"models": {}}, tmp_path / "state.pt")  # loadable, but not ours
    with pytest.raises(ClipDiffusionError, match="keys missing"):
        Trainer(tmp_path, _settings(), resume=True, log=lambda line: None)
    keys = ("models", "optimizers", "state", "rng", "torch_rng")
    blob = {**{k: {} for k in keys}, "state": {"settings": {"model": "micro"}}, "pool": {"scenes": [(1,)]}}
    torch.save(blob, tmp_path / "state.pt")  # ours in shape, but the weights and the pool are garbage
    with pytest.raises(ClipDiffusionError, match="resume: the training state in .* is malformed"):
        Trainer(tmp_path, _settings(), resume=True, log=lambda line: None)


def test_refuses_to_clobber_or_resume_nothing(tmp_path, trained):
    trainer, _ = trained
    with pytest.raises(ClipDiffusionError, match="--resume"):
        Trainer(trainer.out, _settings())
    with pytest.raises(ClipDiffusionError, match="state.pt is missing"):
        Trainer(tmp_path / "empty", _settings(), resume=True)
    with pytest.raises(ClipDiffusionError, match="model: unknown preset"):
        TrainSettings(model="huge")
    with pytest.raises(ClipDiffusionError, match=r"lr_floor: 1.5 is outside"):
        TrainSettings(lr_floor=1.5)
    with pytest.raises(ClipDiffusionError, match="device: 'gpu0' is not a torch device"):
        Trainer(tmp_path / "dev", _settings(), device="gpu0")
    assert not (tmp_path / "dev").exists()  # refused before anything is written


def test_context_matches_inference_encoding_including_chunked_prompts(trained):
    trainer, _ = trained
    long = ", ".join(["masterpiece, best quality, highly detailed"] * 12) + ", a red circle at the top left"
    captions = ["a blue square on the left", long, ""]
    groups = ContextBuilder(trainer.text_encoder)(captions)
    lengths = {len(members): ctx.shape[1] for members, ctx in groups}
    assert sorted(ctx.shape[1] for _, ctx in groups) == [77, 154]
    for members, ctx in groups:
        for row, i in enumerate(members):
            expected = trainer.text_encoder.encode(captions[i]).context[0]
            torch.testing.assert_close(ctx[row], expected, rtol=1e-5, atol=1e-5)  # same windows, same model
    assert lengths


def test_pooled_captions_are_encoded_as_inference_encodes_them(trained):
    trainer, _ = trained
    k = trainer.settings.pool_captions
    pool = trainer.pool
    assert k == 4 and len(pool["captions"]) == len(pool["contexts"]) == k * len(pool["scenes"])
    for i, scene in enumerate(pool["scenes"]):  # scene i's captions describe scene i
        for text in pool["captions"][i * k : (i + 1) * k]:
            for o in scene.objects:
                assert o.color in text and o.shape in text
    for text, context in zip(pool["captions"], pool["contexts"]):
        assert context.dtype == torch.float16
        expected = trainer.text_encoder.encode(text).context[0]
        torch.testing.assert_close(context.float(), expected, rtol=2e-3, atol=2e-3)  # fp16 storage


def test_fresh_captions_every_step_still_train(tmp_path):
    trainer = Trainer(tmp_path, _settings(pool_captions=0), log=lambda line: None)
    trainer.run()
    assert trainer.state["step"]["unet"] == 2 and trainer.pool["contexts"] == []
    with pytest.raises(ClipDiffusionError, match=r"pool_captions: 65 is outside \[0, 64\]"):
        TrainSettings(pool_captions=65)


def test_training_captions_never_state_a_held_out_spec(trained):
    trainer, _ = trained
    rng = np.random.default_rng(0)
    for scene in trainer.scenes.draw(200):
        assert not any(v.key() in trainer.scenes.held_out for v in caption_variants(scene.spec()))
        text = loose_caption(scene.spec(), rng, 0.3)
        assert text  # captions of pooled scenes are fresh each time


def test_caption_variants_cover_omissions():
    spec = SceneSpec((ObjectSpec("red", "circle", 0, "small"), ObjectSpec("blue", "square", 4, "large")), "white")
    variants = caption_variants(spec)
    assert len(variants) == 8 and spec in variants
    assert SceneSpec((ObjectSpec("red", "circle", 0), ObjectSpec("blue", "square", 4))) in variants


def test_eval_studies_run_on_a_trained_micro_model(trained, tmp_path):
    from clipdiffusion.cli import main
    from clipdiffusion.tiny import eval as ev

    trainer, path = trained
    heads = ev.load_heads(path.with_name("tiny-clip-heads.safetensors"))
    cases = ev.prompt_set(1)
    scores = ev.clip_score_study(trainer.pipeline(), heads, cases, steps=1)
    assert set(scores) == {"generated", "ground_truth", "mismatched"}
    assert all(-100 <= v <= 100 for v in scores.values())
    rows = ev.clip_skip_study(trainer.pipeline(), cases, steps=1, repeats=1, heads=heads)
    assert sorted(rows) == [1, 2]  # the micro text tower has 2 layers
    assert all(-100 <= r["clip_score"] <= 100 and 0 <= r["recall"] <= 1 for r in rows.values())
    args = ["eval", "--model", str(path), "--per-count", "1", "--steps", "1", "--studies", "clipskip,clipscore",
            "--clip-heads", str(path.with_name("tiny-clip-heads.safetensors")), "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    report = (tmp_path / "report.md").read_text()
    assert "Tiny-CLIP score" in report and "| clip skip | object recall | prompt success | tiny-CLIP score |" in report


def test_train_cli_validates_arguments(tmp_path, capsys):
    from clipdiffusion.cli import main

    assert main(["train-tiny", "--out", str(tmp_path), "--threads", "0"]) == 2
    assert "threads: 0" in capsys.readouterr().err
    assert main(["train-tiny", "--out", str(tmp_path), "--resume", "--threads", "1"]) == 2
    assert "state.pt is missing" in capsys.readouterr().err
    assert main(["train-tiny", "--out", str(tmp_path), "--size-named", "2", "--threads", "1"]) == 2
    assert "size_named: 2.0 is outside [0, 1]" in capsys.readouterr().err
    assert main(["train-tiny", "--out", str(tmp_path), "--unet-lr", "0", "--threads", "1"]) == 2
    assert "unet_lr: 0.0 is outside (0, 1)" in capsys.readouterr().err
    assert main(["train-tiny", "--out", str(tmp_path), "--phase-steps", "1,2,x,4", "--threads", "1"]) == 2
    assert "phase-steps: '1,2,x,4' is not four comma-separated integers" in capsys.readouterr().err
    assert main(["train-tiny", "--out", str(tmp_path), "--phase-steps", "1,2", "--threads", "1"]) == 2
    assert "phase_steps: (1, 2) needs 4 non-negative counts" in capsys.readouterr().err
    assert not (tmp_path / "state.pt").exists()


@pytest.mark.slow  # two micro trainings through the CLI
def test_train_cli_phase_steps_replay_a_run_exactly(tmp_path):
    from safetensors.torch import load_file

    from clipdiffusion.cli import main

    args = ["train-tiny", "--model", "micro", "--pool-size", "6", "--phase-steps", "2,2,1,3", "--threads", "1"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    from clipdiffusion.checkpoints.safetensors_io import load_weights_only

    assert load_weights_only(tmp_path / "a" / "state.pt")["state"]["step"] == {"clip": 2, "vae": 2, "pool": 1,
                                                                               "unet": 3}  # fmt: skip
    a, b = (load_file(tmp_path / run / "tiny-sd.safetensors") for run in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_vae_round_trip_is_judged(trained):
    trainer, _ = trained
    entry = [json.loads(line) for line in (trainer.out / "log.jsonl").read_text().splitlines() if "judged_right" in line]
    assert len(entry) == 1 and 0.0 <= entry[0]["judged_right"] <= 1.0  # two steps: no promise beyond a number


def _attributes(spec):
    return [(o.color, o.shape, o.cell, o.size) for o in spec.objects]


def test_hard_negative_twin_misstates_exactly_one_attribute():
    from clipdiffusion.tiny.captions import parse_caption
    from clipdiffusion.tiny.batches import caption_pair
    from clipdiffusion.tiny.world import sample_spec

    rng = np.random.default_rng(3)
    kinds = set()
    for _ in range(300):
        spec = sample_spec(rng, p_size=1.0, p_background=1.0)
        text, twin = caption_pair(spec, rng, p_tags=0.0)
        said, wrong = parse_caption(text), parse_caption(twin)
        assert said.background == wrong.background and said != wrong
        a, b = _attributes(said), _attributes(wrong)
        if sorted(o[2] for o in a) != sorted(o[2] for o in b):  # an object moved to an empty cell
            kinds.add("cell")
            assert sum(x not in b for x in a) == 1
            continue
        changed = [(x, y) for x, y in zip(a, b) if x != y]  # same cells, same canonical order
        fields = {i for x, y in changed for i in range(4) if x[i] != y[i]}
        assert len(fields) == 1 and fields <= {0, 1}, (text, twin)
        if len(changed) == 2:  # a swap: the same multiset of colours (or shapes), bound to other objects
            kinds.add("swap")
            f = fields.pop()
            assert sorted(x[f] for x, _ in changed) == sorted(y[f] for _, y in changed)
        else:
            kinds.add(("color", "shape")[fields.pop()])
        # the twin is the same sentence but for the changed words (same template, same tags)
        assert len(text.split()) == len(twin.split())
    assert kinds == {"cell", "swap", "color", "shape"}


def test_phase_step_caps_and_cosine_decay(tmp_path):
    with pytest.raises(ClipDiffusionError, match="phase_steps"):
        TrainSettings(phase_steps=(1, 2))
    settings = _settings(max_steps=None, phase_steps=(3, 2, 1, 4), lr_floor=0.05, clip_hard_negatives=True)
    trainer = Trainer(tmp_path, settings, log=lambda line: None)
    lrs = []
    original = trainer._update

    def spy(phase, loss, base_lr):
        original(phase, loss, base_lr)
        if phase == "unet":
            lrs.append(trainer.optimizers["unet"].param_groups[0]["lr"])

    trainer._update = spy
    trainer.run()
    assert trainer.state["step"] == {"clip": 3, "vae": 2, "pool": 1, "unet": 4}
    # warm-up over 2 steps, then cosine from the base towards lr_floor * base at the cap
    base, floor = trainer.settings.unet_lr, trainer.settings.lr_floor
    cosine = [floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * s / 4)) for s in range(4)]
    expected = [base * min(1.0, (s + 1) / 2) * c for s, c in enumerate(cosine)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-6)
    assert lrs[-1] < lrs[1]
    # hard negatives: the twins' accuracy is logged beside the in-batch accuracy
    clip = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines() if '"clip"' in line]
    assert clip and all(0.0 <= e["twin_accuracy"] <= 1.0 for e in clip)


def test_size_named_sets_how_often_captions_state_sizes():
    from clipdiffusion.tiny.captions import parse_caption
    from clipdiffusion.tiny.batches import loosen

    with pytest.raises(ClipDiffusionError, match=r"size_named: -0\.1"):
        TrainSettings(size_named=-0.1)
    rng = np.random.default_rng(0)
    spec = SceneSpec((ObjectSpec("red", "circle", 0, "small"), ObjectSpec("blue", "square", 4, "large")), "white")
    assert all(o.size is None for o in loosen(spec, rng, 0.0).objects)
    assert loosen(spec, rng, 1.0).objects == spec.objects
    # the caption says exactly what the loosened spec keeps: at 0.5 about half the objects carry their size
    named = [o.size is not None for _ in range(400) for o in parse_caption(loose_caption(spec, rng, 0.0, 0.5)).objects]
    assert 0.42 < np.mean(named) < 0.58


def test_unused_phase_time_passes_to_the_next_phase():
    from clipdiffusion.tiny.settings import phase_seconds

    settings = TrainSettings(minutes=1, shares=(1, 1, 1, 1))  # 15 s each
    assert phase_seconds(settings) == {"clip": 15, "vae": 15, "pool": 15, "unet": 15}
    assert phase_seconds(settings, {"clip": 10})["vae"] == 20
    # what a phase leaves flows on; an overrun takes nothing from the next phase's own share
    assert phase_seconds(settings, {"clip": 10, "vae": 12, "pool": 1}) == {"clip": 15, "vae": 20, "pool": 23,
                                                                           "unet": 37}  # fmt: skip
    assert phase_seconds(settings, {"clip": 30, "vae": 15})["pool"] == 15


def test_train_cli_turns_hard_negatives_on(tmp_path):
    from clipdiffusion.cli import main

    args = ["train-tiny", "--model", "micro", "--pool-size", "4", "--phase-steps", "1,1,1,1", "--threads", "1"]
    assert main([*args, "--out", str(tmp_path / "on"), "--clip-hard-negatives", "on"]) == 0
    assert main([*args, "--out", str(tmp_path / "off")]) == 0
    for run, twins in (("on", True), ("off", False)):
        first = json.loads((tmp_path / run / "log.jsonl").read_text().splitlines()[0])
        assert first["phase"] == "clip" and ("twin_accuracy" in first) is twins


def test_cell_targets_name_what_the_caption_states_per_cell():
    from clipdiffusion.tiny.batches import cell_targets
    from clipdiffusion.tiny.world import ObjectSpec, SceneSpec

    spec = SceneSpec((ObjectSpec("red", "circle", 0, "large"), ObjectSpec("orange", "triangle", 8, None)), None)
    t = cell_targets([spec])
    assert t.shape == (1, 9, 3)
    assert t[0, 0].tolist() == [1, 1, 2]  # red (first colour), circle (first shape), large
    assert t[0, 8].tolist() == [6, 3, 0]  # orange (sixth colour), triangle, size left unstated
    assert t[0, 1:8].abs().sum() == 0  # the other cells are empty


def test_readout_loss_trains_the_text_tower(tmp_path):
    from clipdiffusion.cli import main

    args = ["train-tiny", "--model", "micro", "--pool-size", "4", "--phase-steps", "2,1,1,1", "--threads", "1"]
    assert main([*args, "--out", str(tmp_path / "r"), "--clip-readout", "1"]) == 0
    first = json.loads((tmp_path / "r" / "log.jsonl").read_text().splitlines()[0])
    assert first["readout"] > 0 and first["loss"] > first["readout"]  # contrastive + readout
    assert main([*args, "--out", str(tmp_path / "bad"), "--clip-readout", "-1"]) == 2


def test_a_run_slower_than_the_shipped_one_is_told_so(trained):
    """The phases run on the clock: a slower CPU gets fewer steps than the shipped run and a weaker model, so the
    run says which phases fell behind the shipped run's pace (steps per budgeted minute)."""
    from clipdiffusion.tiny.settings import pace_notes, shipped_run

    ref_settings, ref_steps = shipped_run()  # what export wrote into the shipped file's metadata
    assert ref_settings["model"] == "tiny-sd" and ref_steps["unet"] > 1000 and ref_settings["phase_steps"] is None
    mine = {**ref_settings, "minutes": ref_settings["minutes"] / 2}
    half = {p: n // 2 for p, n in ref_steps.items()}  # half the steps in half the minutes: the same pace
    assert pace_notes(mine, half, (ref_settings, ref_steps)) == []
    slow = {**half, "unet": int(half["unet"] * 0.7)}
    notes = pace_notes(mine, slow, (ref_settings, ref_steps))
    assert len(notes) == 1 and notes[0].startswith(f"unet: {slow['unet']} steps, 70% of the shipped run's pace")
    # other presets, step-capped replays and a missing shipped file compare to nothing
    assert pace_notes({**mine, "model": "micro"}, slow, (ref_settings, ref_steps)) == []
    assert pace_notes({**mine, "phase_steps": [1, 1, 1, 1]}, slow, (ref_settings, ref_steps)) == []
    assert pace_notes(mine, slow, None) == []
    # the micro run's own metadata, as export wrote it, reads back in the same form
    from safetensors import safe_open

    with safe_open(str(trained[1]), "np") as f:
        meta = f.metadata()
    settings = json.loads(meta["clipdiffusion.tiny.train_settings"])
    steps = json.loads(meta["clipdiffusion.tiny.steps"])
    assert settings["model"] == "micro" and pace_notes(settings, steps, (ref_settings, ref_steps)) == []


def test_extending_a_finished_runs_unet_equals_a_longer_run(tmp_path):
    """scripts/tiny_extend_unet.py continues a finished run's UNet phase: the result is bit-identical to a run
    whose UNet phase was that long from the start (constant learning rate), and the original run is untouched."""
    import importlib.util
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(__file__).parents[1] / "scripts" / "tiny_extend_unet.py"
    spec = importlib.util.spec_from_file_location("tiny_extend_unet", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    micro = {**MICRO, "max_steps": None}
    short = Trainer(tmp_path / "short", TrainSettings(**micro, phase_steps=(2, 2, 2, 3)), log=lambda line: None).run()
    long = Trainer(tmp_path / "long", TrainSettings(**micro, phase_steps=(2, 2, 2, 5)), log=lambda line: None).run()
    before = load_file(short)
    threads = str(torch.get_num_threads())
    args = [str(tmp_path / "short"), str(tmp_path / "ext"), "--threads", threads]
    assert script.main([*args, "--unet-steps", "5"]) == 0
    extended, reference = load_file(tmp_path / "ext" / "tiny-sd.safetensors"), load_file(long)
    assert extended.keys() == reference.keys()
    assert all(torch.equal(extended[k], reference[k]) for k in reference)
    assert all(torch.equal(before[k], v) for k, v in load_file(short).items())  # the run it started from
    assert script.main([*args, "--unet-steps", "5"]) == 2  # the copy exists: refused, nothing overwritten
    assert script.main([str(tmp_path / "short"), str(tmp_path / "ext2"), "--threads", threads,
                        "--unet-steps", "2"]) == 2  # already past 2 steps


def test_train_cli_ends_with_a_note_when_slower_than_the_shipped_run(tmp_path, monkeypatch, capsys):
    import clipdiffusion.tiny.settings as train
    from clipdiffusion.cli import main

    reference = ({"model": "micro", "minutes": 0.05, "phase_steps": None},
                 {"clip": 10**6, "vae": 10**6, "pool": 6, "unet": 10**6})  # fmt: skip
    monkeypatch.setattr(train, "shipped_run", lambda: reference)
    args = ["train-tiny", "--model", "micro", "--pool-size", "6", "--minutes", "0.05", "--threads", "1"]
    assert main([*args, "--out", str(tmp_path / "slow")]) == 0
    err = capsys.readouterr().err
    assert "note: this machine trained more slowly than the shipped model's run" in err
    assert "unet: " in err and "--phase-steps 1000000,1000000,6,1000000 and a larger --minutes" in err
    monkeypatch.setattr(train, "shipped_run", lambda: None)  # no shipped file to compare with: no note
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert "note:" not in capsys.readouterr().err


def test_window_layouts_match_inference_encoding(trained):
    # the UNet trains on sliding-window contexts exactly as inference builds them (empty-prompt padding rows too)
    trainer, _ = trained
    long = ", ".join(["masterpiece, best quality, highly detailed"] * 12) + ", a red circle at the top left"
    captions = [long, "a blue square on the left", long + ", a green square at the bottom"]
    strategies = ["window", "window", "chunk"]
    for members, ctx in ContextBuilder(trainer.text_encoder)(captions, strategies):
        for row, i in enumerate(members):
            expected = trainer.text_encoder.encode(captions[i], long_prompt=strategies[i]).context[0]
            torch.testing.assert_close(ctx[row], expected, rtol=1e-5, atol=1e-5)


def test_deep_captions_put_objects_at_every_depth(trained):
    from clipdiffusion.tiny.batches import deep_caption

    trainer, _ = trained
    tokenizer = trainer.text_encoder.tokenizer
    rng = np.random.default_rng(0)
    spec = SceneSpec((ObjectSpec("red", "circle", 0, "large"),), "white")
    depths = []
    for _ in range(200):
        text = deep_caption(spec, rng, tokenizer, max_prefix=240)
        assert "red circle" in text
        depths.append(len(tokenizer.encode(text[: text.index("red circle")])))
    depths = np.array(depths)
    # uniform prefix length: every quarter of 0-240 tokens is well represented, deep windows included
    counts = np.histogram(depths, bins=[0, 60, 120, 180, 260])[0]
    assert counts.min() > 25, counts
    assert (depths % 75 > 40).mean() > 0.25  # objects deep inside a 75-token window, not only at its start


def test_init_from_fine_tunes_a_finished_model(trained, tmp_path):
    # a run started from a finished model: its text tower and VAE stay, the UNet continues (its steps only), the
    # scale factor and the base run's record carry over
    from clipdiffusion.checkpoints.safetensors_io import read_shapes

    trainer, path = trained
    settings = _settings(init_from=str(path), phase_steps=(0, 0, 1, 2), deep_objects=1.0, window_share=1.0)
    tuned = Trainer(tmp_path / "ft", settings, log=lambda line: None)
    base = Trainer(tmp_path / "base", _settings(), log=lambda line: None)  # the same preset, fresh weights
    for name in ("text", "vae", "unet"):
        loaded = tuned.models[name].state_dict()
        exported = {k: v.half().float() for k, v in trainer.models["ema" if name == "unet" else name].state_dict().items()}
        for k, v in loaded.items():
            torch.testing.assert_close(v.float(), exported[k], rtol=0, atol=0)
        assert any(not torch.equal(v, base.models[name].state_dict()[k]) for k, v in loaded.items())
    out = tuned.run()
    assert tuned.state["step"] == {"clip": 0, "vae": 0, "pool": 1, "unet": 2}
    assert tuned.state["scale_factor"] == pytest.approx(trainer.state["scale_factor"], rel=1e-3)
    _, _, meta = read_shapes(out)
    assert json.loads(meta["clipdiffusion.tiny.base_steps"]) == trainer.state["step"]
    assert json.loads(meta["clipdiffusion.tiny.train_settings"])["init_from"] == str(path)
    assert all(len(trainer.text_encoder.tokenizer.encode(c)) >= 0 for c in tuned.pool["captions"])
    assert set(tuned.pool["strategies"]) <= {"chunk", "window"}


def test_init_from_refuses_a_model_of_another_size(trained, tmp_path):
    from clipdiffusion.pipeline import TINY_DATA

    shipped = next(TINY_DATA.glob("*.safetensors"))
    with pytest.raises(ClipDiffusionError, match="init_from"):
        Trainer(tmp_path / "x", _settings(init_from=str(shipped)), log=lambda line: None)


def test_long_study_copies_cells_whose_layouts_are_identical(trained):
    # at 0 tokens of tags every prompt fits one window: chunk and window lay it out exactly as truncate does, so
    # their cells are truncate's (same contexts, same images); at 90 tokens they differ and are generated
    from clipdiffusion.tiny import eval as ev

    trainer, _ = trained
    pipe = trainer.pipeline()
    cells: dict = {}
    ev.long_prompt_study(pipe, pipe.text_encoder.tokenizer, lengths=(0, 90), strategies=("truncate", "chunk", "window"),
                         per_count=1, cells=cells, steps=1)  # fmt: skip
    assert "same_as" not in cells["truncate"][0]
    assert cells["chunk"][0]["same_as"] == cells["window"][0]["same_as"] == "truncate"
    assert cells["chunk"][0]["recall"] == cells["truncate"][0]["recall"]
    assert all("same_as" not in cells[s][90] for s in ("truncate", "chunk", "window"))


def test_the_shipped_recipe_reproduces_the_shipped_models_recorded_settings():
    # `train-tiny --recipe shipped` must train what the shipped file records: run E's settings and step counts,
    # then the fine-tune's (only the clock, generous in the recipe, and the base model's path may differ), then the
    # text tower's depth alignment
    from clipdiffusion.tiny.settings import recipe, shipped_run
    from clipdiffusion.pipeline import TINY_DATA
    from clipdiffusion.checkpoints.safetensors_io import read_shapes

    _, _, meta = read_shapes(next(TINY_DATA.glob("*.safetensors")))
    base, finetune, align = recipe("shipped", "BASE.safetensors")
    assert dataclasses.asdict(align) == json.loads(meta["clipdiffusion.tiny.align"])
    recorded = [(json.loads(meta["clipdiffusion.tiny.base_train_settings"]), json.loads(meta["clipdiffusion.tiny.base_steps"])),
                (json.loads(meta["clipdiffusion.tiny.train_settings"]), json.loads(meta["clipdiffusion.tiny.steps"]))]
    for settings, (saved, steps) in zip((base, finetune), recorded):
        mine = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()}
        differ = {k for k in mine if k in saved and mine[k] != saved[k]}
        assert differ <= {"minutes", "phase_steps", "init_from"}, differ
        assert [steps[p] for p in ("clip", "vae", "pool", "unet")] == list(settings.phase_steps)
    assert finetune.init_from == "BASE.safetensors" and finetune.deep_objects > 0
    assert shipped_run()[1] == recorded[0][1]  # pace notes still compare from-scratch runs with run E


def test_train_cli_recipe_refuses_other_settings(tmp_path):
    from clipdiffusion.cli import main

    assert main(["train-tiny", "--recipe", "shipped", "--unet-lr", "1e-3", "--out", str(tmp_path / "r")]) == 2
    with pytest.raises(ClipDiffusionError, match="recipe"):
        from clipdiffusion.tiny.settings import recipe

        recipe("fastest", "x")
