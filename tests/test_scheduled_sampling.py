"""Sampling follows the prompt's schedule call by call, as A1111 v1.10 does (reference: prompt-language-and-networks
sections 1-3): prompt editing and alternation with A1111's call counter (0 at the start of each run, +1 per model
call, corrector calls included; first entry with counter <= end step, so boundaries are late by one call; the
first entry again past the end), schedules over 2 * steps for Heun, img2img counted from the first step run over
the nominal steps, negative scheduling, AND as a sum of weighted deltas batched into one model call, each
distinct text encoded once, extra-network tags taken out and reported, the infotext verbatim.

The per-call texts are read back from what the model was given: the tiny pipeline's UNet is replaced by a
recording fake whose output is the mean of its context (an analytic denoiser), and each block of B context rows
of every call is matched to the encoding of one text. The expected sequences come from a hand-written oracle per
prompt (the text at schedule step t), turned into calls by the A1111 rule, never from the planner under test.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from clipdiffusion.diffusion.samplers import SAMPLERS
from clipdiffusion.diffusion.scheduled import (
    SECOND_ORDER, Cond, ScheduledCFGDenoiser, entry_at, schedule_steps)
from clipdiffusion.infotext import from_infotext
from clipdiffusion.testing import tiny_pipeline
from clipdiffusion.text.networks import NOT_APPLIED

# -- oracles: the text at schedule step t (1-based) of a prompt, by hand -----------------------------------------


def edit(a, b, when):
    """[a:b:when] over `steps` (A1111 collect_steps: '.' means a fraction, int() truncates, clamp to steps)."""
    def at(t, steps):
        w = min(steps, int(float(when) * steps if "." in str(when) else int(when)))
        return a if t <= w else b
    return at


def alternate(*options):
    return lambda t, steps: options[(t - 1) % len(options)]


def constant(text):
    return lambda t, steps: text


def a1111_calls(oracle, total, calls):
    """A1111's text per model call: counter c picks the first entry with c <= end, i.e. the text at step
    max(c, 1); past the last end step (c > total) the first entry, the text at step 1."""
    return [oracle(max(c, 1) if c <= total else 1, total) for c in range(calls)]


# -- the recording fake UNet -------------------------------------------------------------------------------------


class RecordingUNet(torch.nn.Module):
    """Stands in for the UNet: records each call's context and returns eps = the mean of each row's context
    (an analytic model: a text's prediction is a number known in advance)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.contexts = []

    def forward(self, x, timesteps, context, y=None, **kwargs):
        self.contexts.append(context.detach().clone())
        return torch.zeros_like(x) + context.float().mean(dim=(1, 2)).view(-1, 1, 1, 1)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(0)


@pytest.fixture()
def fake(pipe):
    real = pipe.unet
    pipe.unet = RecordingUNet(real.config)
    yield pipe.unet
    pipe.unet = real


def encodings(pipe, texts):
    """text -> its context [T, D], each text encoded alone."""
    return {t: pipe.text_encoder.encode(t, "", equalize=False).context[0] for t in texts}


def identify(block, table):
    """The text whose encoding a block of identical rows [B,T,D] is (to 1e-5: another batch may round apart)."""
    assert all(torch.equal(row, block[0]) for row in block), "rows of one block differ"
    hits = [t for t, c in table.items() if c.shape == block[0].shape and torch.allclose(c, block[0], atol=1e-5)]
    assert len(hits) == 1, (hits, list(table))
    return hits[0]


def calls_seen(unet, table, batch):
    """Per model call, the texts of its blocks of `batch` rows, in batch order."""
    out = []
    for context in unet.contexts:
        assert context.shape[0] % batch == 0
        out.append([identify(context[i:i + batch], table) for i in range(0, context.shape[0], batch)])
    return out


def expected_calls(sampler, steps, run=None):
    """Model calls of a run of `run` (default all) of `steps` steps: the second-order samplers (Heun, DPM2, DPM2 a,
    DPM++ 2S a, DPM++ SDE) make 2 per step but 1 on the last."""
    run = steps if run is None else run
    return 2 * run - 1 if sampler in SECOND_ORDER else run


# -- the counter rule on its own ----------------------------------------------------------------------------------


def test_entry_at_is_inclusive_late_by_one_and_falls_back_to_the_first_entry():
    schedule = [(10, "a"), (20, "b")]
    assert [entry_at(schedule, c) for c in range(24)] == ["a"] * 11 + ["b"] * 10 + ["a"] * 3
    assert [entry_at([(1, "x"), (2, "y"), (3, "x"), (4, "y")], c) for c in range(5)] == ["x", "x", "y", "x", "y"]


def test_only_heun_is_second_order_and_every_other_sampler_calls_once_per_step():
    sigmas = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    for name, sample in SAMPLERS.items():
        calls = []

        def model(x, sigma):
            calls.append(1)
            return torch.zeros_like(x)

        sample(model, torch.zeros(1, 1, 2, 2), sigmas, generator=torch.Generator().manual_seed(0))
        per_step = 2 if name in SECOND_ORDER else 1
        assert len(calls) == per_step * 4 - (per_step - 1), name
        assert schedule_steps(name, 4) == per_step * 4


# -- the per-call switch through the whole pipeline, every sampler ------------------------------------------------

EDITS = ["0", "1", "3", "0.5", "0.99", "8", "25", "-2"]


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_prompt_editing_switches_on_the_a1111_call(pipe, fake, sampler):
    steps = 4
    total = schedule_steps(sampler, steps)
    calls = expected_calls(sampler, steps)
    table = encodings(pipe, ["red circle", "blue square", "", "n1", "n2", "green", "x", "y"])
    for when in EDITS:
        fake.contexts.clear()
        pipe.generate(f"[red circle:blue square:{when}]", steps=steps, seed=1, sampler=sampler)
        seen = calls_seen(fake, table, 1)
        want = a1111_calls(edit("red circle", "blue square", when), total, calls)
        assert [blocks[1] for blocks in seen] == want, (sampler, when)
        assert all(blocks[0] == "" for blocks in seen)
    # alternation, nested, negative scheduling, all in one request
    fake.contexts.clear()
    pipe.generate("[green:[x|y]:2]", "[n1:n2:2]", steps=steps, seed=1, sampler=sampler)
    seen = calls_seen(fake, table, 1)
    nested = lambda t, total: "green" if t <= 2 else ("x", "y")[(t - 1) % 2]  # noqa: E731
    assert [b[1] for b in seen] == a1111_calls(nested, total, calls)
    assert [b[0] for b in seen] == a1111_calls(edit("n1", "n2", 2), total, calls)


def test_heun_schedules_over_twice_the_steps_and_counts_the_corrector_calls(pipe, fake):
    table = encodings(pipe, ["a", "b", ""])
    pipe.generate("[a:b:0.5]", steps=4, seed=1, sampler="heun")  # 7 calls over 8: a up to counter 4
    assert [b[1] for b in calls_seen(fake, table, 1)] == ["a"] * 5 + ["b"] * 2
    fake.contexts.clear()
    pipe.generate("[a|b]", steps=3, seed=1, sampler="heun")  # flips inside a step, as A1111's does
    assert [b[1] for b in calls_seen(fake, table, 1)] == ["a", "a", "b", "a", "b"]


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_img2img_counts_from_the_first_step_run_over_the_nominal_steps(pipe, fake, sampler):
    from PIL import Image

    table = encodings(pipe, ["a", "b", ""])
    init = Image.new("RGB", (32, 32), (200, 30, 30))
    steps, strength = 8, 0.5  # int(8 * 0.5) = 4 steps run
    total, calls = schedule_steps(sampler, steps), expected_calls(sampler, steps, run=4)
    for when in ("0.5", "2", "0.2"):
        fake.contexts.clear()
        pipe.generate(f"[a:b:{when}]", steps=steps, seed=1, sampler=sampler, init_image=init, strength=strength)
        assert [b[1] for b in calls_seen(fake, table, 1)] == a1111_calls(edit("a", "b", when), total, calls)
    # [a:b:0.5] over 8 nominal euler steps keeps a for counters 0..4: the 4-call run never switches (A1111 too)
    fake.contexts.clear()
    pipe.generate("[a:b:0.5]", steps=8, seed=1, init_image=init, strength=0.5)
    assert {b[1] for b in calls_seen(fake, table, 1)} == {"a"}


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_batch_rows_follow_the_same_schedule(pipe, fake, sampler):
    table = encodings(pipe, ["a", "b", "n1", "n2"])
    pipe.generate("[a:b:1]", "[n1|n2]", steps=3, seed=1, batch_size=3, sampler=sampler)
    total, calls = schedule_steps(sampler, 3), expected_calls(sampler, 3)
    want = zip(a1111_calls(alternate("n1", "n2"), total, calls), a1111_calls(edit("a", "b", 1), total, calls))
    assert calls_seen(fake, table, 3) == [list(pair) for pair in want]
    assert all(c.shape[0] == 6 for c in fake.contexts)  # uncond and cond of all 3 images: one call


# -- AND ----------------------------------------------------------------------------------------------------------


def analytic(values):
    """A model denoiser D(x, sigma, context, y) whose prediction per row is the row's context value."""
    calls = []

    def model(x, sigma, context, y=None):
        calls.append(context.shape[0])
        return torch.zeros_like(x) + context[:, 0, 0].view(-1, 1, 1, 1)

    model.calls = calls
    return model


def const_cond(value, length=4, batch=2):
    return Cond(torch.full((batch, length, 3), float(value)))


def test_and_is_a_sum_of_weighted_deltas_in_one_model_call():
    model = analytic(None)
    conds = {"a": const_cond(2.0), "b": const_cond(-1.0), "c": const_cond(5.0)}
    parts = [(1.0, [(4, "a")]), (0.7, [(1, "b"), (4, "c")])]
    cfg = ScheduledCFGDenoiser(model, conds, parts, [(4, "u")], {"u": const_cond(0.5)}, guidance=3.0)
    x = torch.zeros(2, 1, 2, 2)
    u, g = 0.5, 3.0
    first = cfg(x, torch.ones(2))  # counter 0: a, b
    second = cfg(x, torch.ones(2))  # counter 1: a, b (late by one)
    third = cfg(x, torch.ones(2))  # counter 2: a, c
    assert torch.allclose(first, torch.full_like(x, u + g * 1.0 * (2 - u) + g * 0.7 * (-1 - u)))
    assert torch.equal(second, first)
    assert torch.allclose(third, torch.full_like(x, u + g * (2 - u) + g * 0.7 * (5 - u)))
    assert model.calls == [6, 6, 6]  # uncond + two sub-prompts, batch 2: one call each
    assert cfg.history == [(("a", "b"), "u"), (("a", "b"), "u"), (("a", "c"), "u")]


def test_and_runs_each_context_length_as_its_own_call_never_padded():
    model = analytic(None)
    conds = {"a": const_cond(2.0, length=8), "b": const_cond(-1.0)}
    cfg = ScheduledCFGDenoiser(model, conds, [(1.0, [(2, "a")]), (0.5, [(2, "b")])], [(2, "u")],
                               {"u": const_cond(0.5)}, guidance=2.0)
    out = cfg(torch.zeros(2, 1, 2, 2), torch.ones(2))
    assert model.calls == [4, 2]  # uncond with b (both 4 rows long), then a (8) alone
    assert torch.allclose(out, torch.full_like(out, 0.5 + 2 * (2 - 0.5) + 2 * 0.5 * (-1 - 0.5)))


def test_guidance_one_skips_the_uncond_only_where_it_cancels():
    conds = {"a": const_cond(2.0), "b": const_cond(-1.0)}
    neg = ([(2, "u")], {"u": const_cond(0.5)})
    x = torch.zeros(2, 1, 2, 2)
    # weights summing to 1 at guidance 1: no uncond; A1111's skip rule (first sub-prompt for U, scale 1)
    model = analytic(None)
    cfg = ScheduledCFGDenoiser(model, conds, [(0.25, [(2, "a")]), (0.75, [(2, "b")])], *neg, guidance=1.0)
    assert torch.allclose(cfg(x, torch.ones(2)), torch.full_like(x, 0.25 * 2 + 0.75 * -1))
    assert model.calls == [4] and cfg.history[0][1] is None
    # weights not summing to 1: the uncond does not cancel, and is computed (A1111 at cfg 1)
    model = analytic(None)
    cfg = ScheduledCFGDenoiser(model, conds, [(1.0, [(2, "a")]), (1.0, [(2, "b")])], *neg, guidance=1.0)
    assert torch.allclose(cfg(x, torch.ones(2)), torch.full_like(x, 0.5 + (2 - 0.5) + (-1 - 0.5)))
    assert model.calls == [6]
    # one plain prompt at guidance 1: the cond alone, unchanged
    model = analytic(None)
    cfg = ScheduledCFGDenoiser(model, {"a": conds["a"]}, [(1.0, [(2, "a")])], *neg, guidance=1.0)
    assert torch.equal(cfg(x, torch.ones(2)), torch.full_like(x, 2.0)) and model.calls == [2]


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_and_through_the_pipeline_one_call_per_step_with_its_own_schedules(pipe, fake, sampler):
    table = encodings(pipe, ["a", "b", "c", "d", "n"])
    pipe.generate("[a:b:1] AND [c|d] :0.5", "n", steps=3, seed=1, batch_size=2, sampler=sampler)
    total, calls = schedule_steps(sampler, 3), expected_calls(sampler, 3)
    # the parts are "[a:b:1] " -> "[a:b:1]" (trailing space stripped) and " [c|d]": " c" encodes like "c"
    want = zip(a1111_calls(edit("a", "b", 1), total, calls), a1111_calls(alternate("c", "d"), total, calls))
    assert calls_seen(fake, table, 2) == [["n", first, second] for first, second in want]
    assert len(fake.contexts) == calls  # one model call per guidance step


def test_sdxl_pooled_vectors_follow_the_schedule_and_an_edited_empty_negative_is_encoded():
    p = tiny_pipeline(0, family="sdxl")
    p.unet, ys = RecordingUNet(p.unet.config), []
    forward = p.unet.forward
    p.unet.forward = lambda x, t, context, y=None, **kw: (ys.append(y.clone()), forward(x, t, context, y))[1]
    p.generate("[a:b:1]", steps=3, seed=1)
    enc = p.text_encoder.encode_texts(["a", "b"], [""])
    want = [p._sdxl_vector(enc.prompts[t].pooled, 32, 32, 1) for t in ("a", "a", "b")]
    assert not bool(enc.negatives[""].context.any()) and not bool(enc.negatives[""].pooled.any())  # zeros
    for y, w in zip(ys, want):  # [uncond; cond]
        torch.testing.assert_close(y[1:], w, rtol=1e-5, atol=1e-5)
    # an empty negative that is one text of a schedule is encoded (A1111 zeroes only an all-empty negative)
    enc = p.text_encoder.encode_texts(["a"], ["", "x"])
    assert bool(enc.negatives[""].context.any()) and bool(enc.negatives[""].pooled.any())


def test_and_combination_in_the_pipeline_matches_a_hand_computation(pipe, fake):
    """One Euler step to sigma 0 returns the denoised estimate D = x - sigma * eps, and the fake's eps per text is
    its context's mean: D = x - sigma * (m_n + g * sum_j w_j (m_j - m_n))."""
    from clipdiffusion.diffusion.denoiser import Denoiser
    from clipdiffusion.diffusion.samplers import get_sigmas_normal

    table = encodings(pipe, ["a", "b", "n"])
    m = {t: float(c.float().mean()) for t, c in table.items()}
    latents = []
    pipe.generate("a AND b :-0.4", "n", steps=1, seed=3, guidance=4.0, callback=lambda i, n, x: latents.append(x))
    sigma = float(get_sigmas_normal(Denoiser(fake).sigmas, 1)[0])
    x0 = torch.randn((1, fake.config.in_channels, 16, 16), generator=torch.Generator().manual_seed(3)) * sigma
    eps = m["n"] + 4.0 * (1.0 * (m["a"] - m["n"]) - 0.4 * (m["b"] - m["n"]))
    torch.testing.assert_close(latents[0], x0 - sigma * eps, rtol=1e-5, atol=1e-4)


# -- encoding once, tags, notes, infotext -------------------------------------------------------------------------


@pytest.fixture()
def encoder_batches(pipe):
    """The token-id batches the text tower runs (one entry per tower call)."""
    model = pipe.text_encoder.encoders[0].model
    batches, forward = [], model.forward

    def recording(ids, *args, **kwargs):
        batches.append(ids.clone())
        return forward(ids, *args, **kwargs)

    model.forward = recording
    yield batches
    del model.forward


def decoded(pipe, ids):
    tok = pipe.text_encoder.tokenizer
    return tok.decode([int(i) for i in ids if int(i) not in (tok.bos_id, tok.eos_id)]).strip()


def test_each_distinct_text_is_encoded_once_in_one_batch(pipe, fake, encoder_batches):
    # distinct strings: "a", "b" (part 1), " c", " a" (parts 2 and 3: A1111 keeps leading spaces), "dull", "grey"
    pipe.generate("[a:b:2] AND [c|a] AND [c:a:1]", "[dull:grey:2]", steps=4, seed=1)
    assert len(encoder_batches) == 1  # one tower call for everything
    # "a" and " a" are distinct texts with the same tokens: their one window goes through the tower once
    assert sorted(decoded(pipe, row) for row in encoder_batches[0]) == ["a", "b", "c", "dull", "grey"]
    # one model call per step: the uncond and each distinct text of that call (parts using the same text share)
    assert [c.shape[0] for c in fake.contexts] == [3, 3, 3, 4]
    encoder_batches.clear()
    pipe.generate("a plain prompt", steps=2, seed=1)  # plain: the prompt and the negative, as ever
    assert [decoded(pipe, row) for row in encoder_batches[0]] == ["a plain prompt", ""]


def test_tags_are_taken_out_reported_and_stay_text_in_the_negative(pipe, fake, encoder_batches):
    r = pipe.generate("a red circle <lora:detail:0.8> <hypernet:h:1>", "<lora:neg:1> blurry", steps=2, seed=1,
                      missing_loras="note")  # A1111's rule for an unknown LoRA: a note, generation goes on
    texts = [decoded(pipe, row) for row in encoder_batches[0]]
    assert len(texts) == 2 and texts[0] == "a red circle"  # the tags are gone before encoding
    assert "lora" in texts[1] and "neg" in texts[1] and "blurry" in texts[1]  # the negative's tag is text
    assert r.notes[0] == f"<hypernet:h:1>: {NOT_APPLIED}: hypernetworks are not supported"
    assert r.notes[-1] == "Lora not found: detail" and not any("neg" in n and "not found" in n for n in r.notes)
    assert any("<lora:neg:1>" in n and "text" in n for n in r.notes[1:])  # the negative's tag: said to be text
    assert r.infotexts[0].startswith("a red circle <lora:detail:0.8> <hypernet:h:1>\n")
    plain = pipe.generate("a red circle", steps=2, seed=1)
    assert plain.notes == ()


@pytest.mark.parametrize("family, prompt, negative, guidance, batch", [
    ("sd1", "a red circle", "blurry", 6.0, 2),
    ("sd1", ", ".join(["a red circle on a white background"] * 12), "", 7.0, 1),  # 2 chunks vs 1: two calls
    ("sd1", "a red circle", "blurry", 1.0, 1),
    ("sdxl", "a red circle", "", 5.0, 2),
])
def test_plain_prompts_give_bit_identical_images_to_the_plain_guidance(family, prompt, negative, guidance, batch,
                                                                        monkeypatch):
    """A prompt without schedule syntax, AND or tags: the same pixels as the plain CFGDenoiser over encode()."""
    from clipdiffusion.conditioning_schedule import ScheduledConditioning
    from clipdiffusion.diffusion.denoiser import CFGDenoiser

    p = tiny_pipeline(0, family=family)
    kw = dict(steps=3, seed=5, guidance=guidance, batch_size=batch, sampler="heun")
    new = p.generate(prompt, negative, **kw)

    def plain(self, model, g):
        cond = p.text_encoder.encode(prompt, negative, equalize=False)
        expand = lambda t: t.float().expand(batch, -1, -1)  # noqa: E731
        y = None if cond.pooled is None else p._sdxl_vector(cond.pooled, 32, 32, batch)
        ny = None if cond.negative_pooled is None else p._sdxl_vector(cond.negative_pooled, 32, 32, batch)
        return CFGDenoiser(model, expand(cond.context), expand(cond.negative_context), g, y=y, negative_y=ny)

    monkeypatch.setattr(ScheduledConditioning, "denoiser", plain)
    old = p.generate(prompt, negative, **kw)
    np.testing.assert_array_equal(new.pixels, old.pixels)


def test_infotext_round_trip_reproduces_a_scheduled_prompt(pipe, tmp_path):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    prompt = "[red:blue:2] circle AND small square :0.6 <lora:detail:0.8>"
    negative = "[green|yellow] <lora:x:1>"
    first = pipe.generate(prompt, negative, steps=4, seed=11, sampler="heun", guidance=5.0, missing_loras="note")
    info = PngInfo()
    info.add_text("parameters", first.infotexts[0])
    buf = io.BytesIO()
    first.image.save(buf, format="PNG", pnginfo=info)
    text = Image.open(io.BytesIO(buf.getvalue())).text["parameters"]
    request = from_infotext(text)
    assert (request.prompt, request.negative_prompt) == (prompt, negative)
    again = pipe.generate(request, missing_loras="note")
    np.testing.assert_array_equal(again.pixels, first.pixels)
    other = pipe.generate("red circle AND small square :0.6", negative, steps=4, seed=11, sampler="heun",
                          guidance=5.0)
    assert np.abs(other.pixels - first.pixels).max() > 0  # the schedule mattered


# -- reporting: CLI and server ------------------------------------------------------------------------------------


def test_cli_prints_the_notes_to_stderr(tmp_path, capsys, monkeypatch):
    from clipdiffusion import cli
    from clipdiffusion.commands import generate as command

    monkeypatch.setattr(command, "load_pipeline", lambda *args, **kwargs: tiny_pipeline(0))
    code = cli.main(["generate", "a circle <hypernet:h:0.8>", "--steps", "1", "--seed", "1",
                     "-o", str(tmp_path / "out.png")])
    assert code == 0
    err = capsys.readouterr().err
    assert f"note: <hypernet:h:0.8>: {NOT_APPLIED}: hypernetworks are not supported" in err
    code = cli.main(["generate", "a circle <lora:detail:0.8>", "--steps", "1", "-o", str(tmp_path / "out.png")])
    assert code == 2  # our CLI: an unknown LoRA is an error naming it (the A1111 routes note it instead)
    assert "LoRA 'detail' not found" in capsys.readouterr().err


def test_server_routes_report_the_notes():
    import json

    import httpx

    from clipdiffusion.server.app import create_app
    from clipdiffusion.server.settings import ModelEntry, ServerSettings
    from server_fixtures import FAKE_SAMPLERS, FAKE_SCHEDULES, FakePipeline, ServerThread, fake_factory

    settings = ServerSettings(models=(ModelEntry("tiny-a"),), samplers=FAKE_SAMPLERS, schedules=FAKE_SCHEDULES)
    with ServerThread(create_app(fake_factory(FakePipeline()), settings)) as server:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            r = c.post("/sdapi/v1/txt2img", json={"prompt": "a <lora:detail:0.8>", "steps": 2, "width": 64,
                                                  "height": 64})
            assert r.status_code == 200, r.text
            info = json.loads(r.json()["info"])
            note = "Lora not found: detail"  # A1111's words, in its comments; generation goes on
            assert info["notes"] == [note] and info["comments"] == note + "\n"
            assert info["prompt"] == "a <lora:detail:0.8>" and info["infotexts"][0].startswith("a <lora:detail:0.8>")
            r = c.post("/api/generate", json={"prompt": "a <lora:detail:0.8>", "steps": 2})
            assert r.status_code == 422 and "LoRA 'detail' not found" in r.text  # our route: an error naming it
            r = c.post("/api/generate", json={"prompt": "a <hypernet:h:1>", "steps": 2})
            assert r.status_code == 200, r.text
            assert r.json()["notes"] == [f"<hypernet:h:1>: {NOT_APPLIED}: hypernetworks are not supported"]
            r = c.post("/api/generate", json={"prompt": "a plain one", "steps": 2})
            assert r.json()["notes"] == []


def test_math_of_the_oracle_matches_the_reference_table():
    """The oracle itself against the reference's 20-step examples (section 1.3)."""
    at = lambda when, t: edit("a", "b", when)(t, 20)  # noqa: E731
    assert [at("10", t) for t in (10, 11)] == ["a", "b"] and at("0.99", 19) == "a" and at("0.99", 20) == "b"
    assert {at(w, t) for w in ("0.04", "0", "-3") for t in range(1, 21)} == {"b"}
    assert {at("1.0", t) for t in range(1, 21)} == {"a"} and [at("1", 1), at("1", 2)] == ["a", "b"]
    assert a1111_calls(edit("a", "b", "10"), 20, 24) == ["a"] * 11 + ["b"] * 10 + ["a"] * 3
    assert math.isclose(int(0.99 * 20), 19)


def test_attention_maps_of_a_scheduled_prompt_are_its_first_texts_and_say_so(pipe):
    r = pipe.generate("[red:blue:1] circle AND square", steps=3, seed=1, attention_maps=True)
    assert r.attention.tokens == ["red", "circle"] and r.attention.maps.shape == (2, 16, 16)
    assert float(np.abs(r.attention.maps).sum()) > 0
    assert any(n.startswith("attention maps: the tokens of 'red circle'") for n in r.notes)
    plain = pipe.generate("red circle", steps=3, seed=1, attention_maps=True)
    assert plain.notes == () and plain.attention.tokens == ["red", "circle"]
