"""Issue 19's options for fewer or cheaper UNet evaluations, on tiny random models: NGMS (``s_min_uncond``), Skip
Early CFG (``skip_early_cond``), DeepCache (``deepcache_interval``), ToMe (``token_merging_ratio``) and the
conditioning cache. Off means bit-identical to the code without them; on means the expected number and kind of UNet
evaluations, finite outputs close to (but not equal to) the exact ones, seeds that reproduce, and request errors
that name the field. Speed is measured in bench/fast_options.py, never here."""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from clipdiffusion import fast_options
from clipdiffusion.diffusion import tome
from clipdiffusion.diffusion.deepcache import DeepCacheUNet
from clipdiffusion.diffusion.scheduled import Cond, ScheduledCFGDenoiser, UncondSkip, schedule_steps
from clipdiffusion.diffusion.unet import TINY, TINY_SDXL, UNetModel
from clipdiffusion.infotext import from_infotext, parse_infotext, to_infotext
from clipdiffusion.request import GenerationRequest, RequestError
from clipdiffusion.testing import tiny_pipeline
from clipdiffusion.text.cond_cache import ConditioningCache

BASE = dict(prompt="a red circle", negative_prompt="blue", steps=6, seed=11, width=16, height=16)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(0)


@pytest.fixture(scope="module")
def baseline(pipe):
    return pipe.generate(GenerationRequest(**BASE))


class UNetCalls:
    """Counts the tiny UNet's evaluations: rows per call, and whole vs shallow (DeepCache) passes."""

    def __init__(self, monkeypatch):
        self.rows, self.kinds = [], []
        forward, split = UNetModel.forward, UNetModel.forward_split
        calls = self

        def counted_forward(unet, x, *args, **kwargs):
            calls.rows.append(x.shape[0])
            calls.kinds.append("full")
            return forward(unet, x, *args, **kwargs)

        def counted_split(unet, x, *args, deep=None, **kwargs):
            calls.rows.append(x.shape[0])
            calls.kinds.append("full" if deep is None else "shallow")
            return split(unet, x, *args, deep=deep, **kwargs)

        monkeypatch.setattr(UNetModel, "forward", counted_forward)
        monkeypatch.setattr(UNetModel, "forward_split", counted_split)


def _close_but_different(a, b, bound=0.25):
    assert np.isfinite(a).all()
    diff = np.abs(a - b)
    assert diff.max() > 0, "the option changed nothing"
    assert diff.mean() < bound, f"mean pixel difference {diff.mean()} is not close"


# ---- off: bit-identical --------------------------------------------------------------------------------------


def test_options_off_are_bit_identical_to_no_hooks(pipe, baseline, monkeypatch):
    """With every option off, the hooks are not even in the path: a run with them removed gives the same bits."""
    monkeypatch.setattr(fast_options, "uncond_skip", lambda request: None)
    monkeypatch.setattr(fast_options, "wrap_unet", lambda unet, request: unet)
    monkeypatch.setattr(fast_options, "token_merging", lambda unet, request: nullcontext())
    bare = pipe.generate(GenerationRequest(**BASE))
    assert np.array_equal(bare.pixels, baseline.pixels)
    explicit = pipe.generate(GenerationRequest(**BASE, s_min_uncond=0.0, skip_early_cond=0.0, deepcache_interval=1,
                                               token_merging_ratio=0.0))
    assert np.array_equal(explicit.pixels, baseline.pixels)
    assert fast_options.infotext_pairs(GenerationRequest(**BASE)) == {}


@pytest.mark.parametrize("config", [TINY, TINY_SDXL], ids=["sd1", "sdxl"])
def test_forward_split_full_pass_equals_forward(config):
    torch.manual_seed(0)
    unet = UNetModel(config).eval()
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([500.0, 20.5])
    context = torch.randn(2, 5, config.context_dim)
    y = torch.randn(2, config.adm_in_channels) if config.adm_in_channels else None
    with torch.no_grad():
        out = unet(x, t, context, y)
        for branch in range(len(unet.input_blocks) - 1):
            full, deep = unet.forward_split(x, t, context, y, branch=branch)
            assert torch.equal(full, out), branch
            # the shallow pass with the deep feature of these very inputs is the whole UNet again, exactly
            shallow, _ = unet.forward_split(x, t, context, y, branch=branch, deep=deep)
            assert torch.equal(shallow, out), branch
        with pytest.raises(ValueError, match="branch"):
            unet.forward_split(x, t, context, y, branch=len(unet.input_blocks) - 1)


# ---- NGMS and Skip Early CFG ---------------------------------------------------------------------------------


class FakeModel:
    """D(x, sigma, context): a value per context (its first number), so the combination can be read off."""

    sigmas = torch.linspace(0.03, 14.6, 1000)

    def __init__(self):
        self.rows = []

    def __call__(self, x, sigma, context, y=None):
        self.rows.append(x.shape[0])
        return x * 0 + context[:, :1, :1].reshape(-1, 1, 1, 1)


def _scheduled(skip, guidance=7.0):
    conds = {"p": Cond(torch.full((1, 3, 4), 2.0))}
    negative = {"n": Cond(torch.full((1, 3, 4), 1.0))}
    model = FakeModel()
    return ScheduledCFGDenoiser(model, conds, [(1.0, ((10, "p"),))], ((10, "n"),), negative, guidance,
                                skip=skip), model


def test_ngms_skips_every_other_call_below_the_sigma():
    """A1111: ``(step % 2 or s_min_uncond_all) and s_min_uncond > 0 and sigma[0] < s_min_uncond``."""
    sigmas = [10.0, 8.0, 6.0, 4.0, 2.0, 1.0, 0.5]
    cfg, model = _scheduled(UncondSkip(total=7, s_min_uncond=5.0))
    outs = [float(cfg(torch.zeros(1, 1, 2, 2), torch.tensor([s])).flatten()[0]) for s in sigmas]
    skipped = [neg is None for _, neg in cfg.history]
    assert skipped == [False, False, False, True, False, True, False]  # odd counters with sigma < 5
    assert model.rows == [2, 2, 2, 1, 2, 1, 2]
    # a skipped call is the cond prediction (guidance off); the others are uncond + 7 (cond - uncond) = 8
    assert outs == [8.0, 8.0, 8.0, 2.0, 8.0, 2.0, 8.0]
    cfg_all, _ = _scheduled(UncondSkip(total=7, s_min_uncond=5.0, s_min_uncond_all=True))
    for s in sigmas:
        cfg_all(torch.zeros(1, 1, 2, 2), torch.tensor([s]))
    assert [neg is None for _, neg in cfg_all.history] == [False, False, False, True, True, True, True]


def test_skip_early_cfg_counts_calls_over_a1111s_total():
    rule = UncondSkip(total=schedule_steps("euler", 20), skip_early_cond=0.25)
    assert [c for c in range(20) if rule.skips(c, 1.0)] == [0, 1, 2, 3, 4, 5]  # c / 20 <= 0.25
    heun = UncondSkip(total=schedule_steps("heun", 10), skip_early_cond=0.25)  # A1111: 2 x steps for Heun
    assert [c for c in range(19) if heun.skips(c, 1.0)] == [0, 1, 2, 3, 4, 5]
    assert not UncondSkip(total=20).active and not UncondSkip(total=20).skips(0, 0.01)


@pytest.mark.slow
def test_ngms_in_the_pipeline_evaluates_fewer_rows(pipe, baseline, monkeypatch):
    calls = UNetCalls(monkeypatch)
    steps = BASE["steps"]
    r = pipe.generate(GenerationRequest(**BASE, s_min_uncond=1000.0))  # every sigma is below: odd calls skip
    assert calls.rows == [2 if c % 2 == 0 else 1 for c in range(steps)]
    _close_but_different(r.pixels, baseline.pixels)
    again = pipe.generate(GenerationRequest(**BASE, s_min_uncond=1000.0))
    assert np.array_equal(again.pixels, r.pixels)
    calls.rows.clear()
    pipe.generate(GenerationRequest(**BASE, s_min_uncond=1000.0, s_min_uncond_all=True))
    assert calls.rows == [1] * steps
    calls.rows.clear()
    pipe.generate(GenerationRequest(**BASE, s_min_uncond=0.001))  # below every sigma of the schedule: no skip
    assert calls.rows == [2] * steps


def test_skip_early_cfg_in_the_pipeline(pipe, baseline, monkeypatch):
    calls = UNetCalls(monkeypatch)
    r = pipe.generate(GenerationRequest(**BASE, skip_early_cond=0.5))  # counters 0..3 of 6 (c / 6 <= 0.5)
    assert calls.rows == [1, 1, 1, 1, 2, 2]
    _close_but_different(r.pixels, baseline.pixels)
    calls.rows.clear()
    guidance_one = pipe.generate(GenerationRequest(**BASE, guidance=1.0, skip_early_cond=0.5))
    plain = pipe.generate(GenerationRequest(**BASE, guidance=1.0))
    assert np.array_equal(guidance_one.pixels, plain.pixels)  # nothing to skip at guidance 1: the same image


# ---- DeepCache -----------------------------------------------------------------------------------------------


def test_deepcache_runs_the_whole_unet_every_n_steps(pipe, baseline, monkeypatch):
    calls = UNetCalls(monkeypatch)
    request = GenerationRequest(**{**BASE, "steps": 7}, deepcache_interval=3)
    r = pipe.generate(request)
    assert calls.kinds == ["full", "shallow", "shallow", "full", "shallow", "shallow", "full"]
    assert calls.rows == [2] * 7
    exact = pipe.generate(GenerationRequest(**{**BASE, "steps": 7}))
    _close_but_different(r.pixels, exact.pixels)
    assert np.array_equal(pipe.generate(request).pixels, r.pixels)


def test_deepcache_with_ngms_keeps_rows_apart(pipe, monkeypatch):
    """The uncond is skipped on odd calls; a shallow call must find every one of its rows' features (cond rows
    from this interval), else it runs the whole UNet."""
    calls = UNetCalls(monkeypatch)
    r = pipe.generate(GenerationRequest(**BASE, deepcache_interval=2, s_min_uncond=1000.0, batch_size=2))
    assert calls.rows == [4, 2, 4, 2, 4, 2]
    assert calls.kinds == ["full", "shallow", "full", "shallow", "full", "shallow"]
    assert np.isfinite(r.pixels).all()
    # the two images of the batch share a context but not their features: image 2 equals its own single run
    single = pipe.generate(GenerationRequest(**{**BASE, "seed": BASE["seed"] + 1}, deepcache_interval=2,
                                             s_min_uncond=1000.0))
    assert np.allclose(r.pixels[1], single.pixels[0], atol=2e-6)


def test_deepcache_wrapper_counts_and_refuses_bad_values():
    torch.manual_seed(1)
    unet = UNetModel(TINY).eval()
    cached = DeepCacheUNet(unet, 2)
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 32)
    with torch.no_grad():
        for t in (900.0, 900.0, 700.0, 500.0, 300.0):  # the repeated level is the same step (a second text)
            cached(x, torch.tensor([t]), context)
    assert (cached.full_calls, cached.shallow_calls) == (3, 2)
    with pytest.raises(ValueError, match="deepcache_interval"):
        DeepCacheUNet(unet, -1)
    with pytest.raises(ValueError, match="deepcache_interval"):
        DeepCacheUNet(object(), 3)


# ---- token merging -------------------------------------------------------------------------------------------


def _brute_force_merge(x, h, w, r):
    """ToMe's merge and unmerge written out with loops, for the first-token-per-cell destinations."""
    B, N, C = x.shape
    dst = [i * w + j for i in range(0, h - h % 2, 2) for j in range(0, w - w % 2, 2)]
    src = [p for p in range(N) if p not in dst]
    out = x.clone()
    for b in range(B):
        m = x[b] / x[b].norm(dim=-1, keepdim=True)
        best = [(max((float(m[s] @ m[d]), -k) for k, d in enumerate(dst)), s) for s in src]
        ranked = sorted(range(len(src)), key=lambda i: -best[i][0][0])  # stable: ties keep source order
        merged = {src[i]: dst[-best[i][0][1]] for i in ranked[:r]}
        for d in dst:
            group = [d] + [s for s, into in merged.items() if into == d]
            out[b, d] = x[b, group].mean(dim=0)
        for s, into in merged.items():
            out[b, s] = out[b, into]
    return out


@pytest.mark.parametrize("h,w,ratio", [(4, 4, 0.5), (6, 4, 0.3), (5, 3, 0.4)])
def test_token_merging_matches_the_written_out_maths(h, w, ratio):
    torch.manual_seed(2)
    x = torch.randn(2, h * w, 8, dtype=torch.float64)
    merge, unmerge = tome.merge_functions(x, h, w, ratio, random=False)
    r = min(int(h * w * ratio), h * w - (h // 2) * (w // 2))
    merged = merge(x)
    assert merged.shape == (2, h * w - r, 8)
    assert torch.allclose(unmerge(merged), _brute_force_merge(x, h, w, r), atol=1e-12)


def test_token_merging_identity_and_seeds():
    x = torch.randn(2, 16, 4)
    merge, unmerge = tome.merge_functions(x, 4, 4, 0.0)
    assert merge is unmerge and torch.equal(merge(x), x)
    picks = []
    for seed in (3, 3, 4):
        hook = tome.TokenMerging(0.5, seed)
        merge, unmerge = hook(x, 4, 4)
        picks.append(unmerge(merge(x)))
    assert torch.equal(picks[0], picks[1]) and not torch.equal(picks[0], picks[2])
    with pytest.raises(ValueError, match="token_merging_ratio"):
        tome.TokenMerging(1.5)


@pytest.mark.slow
def test_token_merging_in_the_pipeline(pipe, baseline, monkeypatch):
    from clipdiffusion.diffusion import attention

    seen = []
    forward = attention.CrossAttention.forward

    def recorded(self, x, context=None, recorder=None):
        if context is None:
            seen.append(x.shape[1])
        return forward(self, x, context, recorder)

    monkeypatch.setattr(attention.CrossAttention, "forward", recorded)
    request = GenerationRequest(**BASE, token_merging_ratio=0.5)
    r = pipe.generate(request)
    tokens = (BASE["width"] // 2) * (BASE["height"] // 2)  # tiny VAE x2: 8 x 8 latents at the first level
    # per UNet call: the 3 first-level transformers (down 1, up 2) see tokens - r; the second level's 3 and the
    # middle one see all of theirs
    per_call = sorted(seen[:7])
    assert per_call == sorted([tokens - tokens // 2] * 3 + [tokens // 4] * 4)
    _close_but_different(r.pixels, baseline.pixels)
    assert np.array_equal(pipe.generate(request).pixels, r.pixels)
    other_seed = pipe.generate(GenerationRequest(**{**BASE, "seed": 12}, token_merging_ratio=0.5))
    assert not np.array_equal(other_seed.pixels, r.pixels)
    assert all(layer.token_merge is None for layer in tome.highest_resolution_transformers(pipe.unet))


# ---- the request, the infotext, the CLI and the A1111 adapter -------------------------------------------------


@pytest.mark.parametrize("name,value", [("s_min_uncond", -1.0), ("s_min_uncond", math.nan),
                                        ("skip_early_cond", 1.5), ("skip_early_cond", -0.1),
                                        ("deepcache_interval", -3), ("token_merging_ratio", 1.2),
                                        ("token_merging_ratio", math.inf), ("s_min_uncond_all", 1)])
def test_bad_values_name_the_field(name, value):
    with pytest.raises(RequestError) as info:
        GenerationRequest(**{name: value})
    assert info.value.field == name and str(info.value).startswith(f"{name}=")


def test_infotext_round_trip_and_a1111_text():
    request = GenerationRequest(prompt="x", seed=4, s_min_uncond=1.5, s_min_uncond_all=True, skip_early_cond=0.2,
                                deepcache_interval=3, token_merging_ratio=0.5)
    text = to_infotext(request)
    for pair in ("NGMS: 1.5", "NGMS all steps: True", "Skip Early CFG: 0.2", "Token merging ratio: 0.5",
                 "DeepCache interval: 3"):
        assert pair in text
    assert from_infotext(text) == request
    a1111 = "cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, NGMS: 2, Token merging ratio: 0.3"
    parsed = from_infotext(a1111)
    assert (parsed.s_min_uncond, parsed.token_merging_ratio) == (2.0, 0.3)
    assert "NGMS" in parse_infotext(a1111).extra
    with pytest.raises(RequestError) as info:
        from_infotext(a1111.replace("NGMS: 2", "NGMS: lots"))
    assert info.value.field == "s_min_uncond"


def test_cli_flags_build_the_request():
    import argparse

    from clipdiffusion.commands import generate

    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    args = parser.parse_args(["cat", "--s-min-uncond", "2", "--s-min-uncond-all", "--skip-early-cfg", "0.1",
                              "--deepcache", "3", "--tome", "0.4"])
    r = generate.build_request(args)
    assert (r.s_min_uncond, r.s_min_uncond_all, r.skip_early_cond, r.deepcache_interval,
            r.token_merging_ratio) == (2.0, True, 0.1, 3, 0.4)
    with pytest.raises(RequestError) as info:
        generate.build_request(parser.parse_args(["cat", "--tome", "2"]))
    assert info.value.field == "token_merging_ratio"


def test_speed_presets_on_the_command_line():
    """generate and batch default to --speed fast (NGMS 2 on all steps + DeepCache 2); --exact / --speed exact is
    sampling as diffusers does it; a flag given wins over the preset for its own field only; eval defaults to exact."""
    import argparse

    from clipdiffusion.commands import batch, eval as eval_cmd, generate

    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)

    def fields(*argv):
        r = generate.build_request(parser.parse_args(["cat", *argv]))
        return (r.s_min_uncond, r.s_min_uncond_all, r.skip_early_cond, r.deepcache_interval, r.token_merging_ratio)

    assert fields() == (2.0, True, 0.0, 2, 0.0) == fields("--speed", "fast")
    assert fields("--exact") == fields("--speed", "exact") == (0.0, False, 0.0, 0, 0.0)
    assert fields("--deepcache", "0") == (2.0, True, 0.0, 0, 0.0)
    assert fields("--exact", "--tome", "0.5") == (0.0, False, 0.0, 0, 0.5)
    assert fields("--s-min-uncond", "0", "--deepcache", "3") == (0.0, False, 0.0, 3, 0.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["cat", "--speed", "fastest"])
    with pytest.raises(RequestError) as info:
        fast_options.preset("fastest")
    assert info.value.field == "speed"

    bparser = argparse.ArgumentParser()
    batch.add_arguments(bparser)
    shared = batch.shared_options(bparser.parse_args(["--prompts", "p.txt", "--out", "o"]))
    assert (shared["s_min_uncond"], shared["deepcache_interval"]) == (2.0, 2)
    shared = batch.shared_options(bparser.parse_args(["--prompts", "p.txt", "--out", "o", "--exact"]))
    assert (shared["s_min_uncond"], shared["deepcache_interval"]) == (0.0, 0)

    eparser = argparse.ArgumentParser()
    eval_cmd.add_arguments(eparser)
    exact = fast_options.request_fields(eparser.parse_args([]))
    assert fast_options.changed(exact) == {}
    assert fast_options.changed(fast_options.request_fields(eparser.parse_args(["--speed", "fast"]))) == \
        fast_options.SPEEDS["fast"]


def test_batch_lines_override_the_speed_preset(tmp_path):
    from clipdiffusion.batch import read_jsonl

    lines = tmp_path / "r.jsonl"
    lines.write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y", "deepcache_interval": 0}\n')
    a, b = read_jsonl(lines, fast_options.preset("fast"))
    assert (a.request.deepcache_interval, a.request.s_min_uncond) == (2, 2.0)
    assert (b.request.deepcache_interval, b.request.s_min_uncond) == (0, 2.0)


def test_deepcache_on_an_inpainting_unet():
    """The inpainting wrapper (latent + mask + masked-image latent channels) splits like the plain UNet, so the
    fast preset works with inpainting checkpoints: the full pass equals forward, the shallow pass with its own
    deep feature is the whole UNet again."""
    from dataclasses import replace

    from clipdiffusion.diffusion.unet import ConcatConditionedUNet

    torch.manual_seed(0)
    inner = UNetModel(replace(TINY, in_channels=TINY.in_channels * 2 + 1)).eval()
    unet = ConcatConditionedUNet(inner, torch.randn(1, TINY.in_channels + 1, 8, 8))
    x = torch.randn(2, TINY.in_channels, 8, 8)
    t = torch.tensor([500.0, 500.0])
    context = torch.randn(2, 5, TINY.context_dim)
    with torch.no_grad():
        out = unet(x, t, context)
        full, deep = unet.forward_split(x, t, context)
        assert torch.equal(full, out)
        shallow, _ = unet.forward_split(x, t, context, deep=deep)
        assert torch.equal(shallow, out)
        wrapped = DeepCacheUNet(unet, 2)
        assert torch.equal(wrapped(x, t, context), out)


def test_a1111_override_settings_map_to_the_request():
    from clipdiffusion.server.a1111 import fast_option_values
    from clipdiffusion.server.schemas import Txt2ImgRequest

    body = Txt2ImgRequest(prompt="x", override_settings={"s_min_uncond": 2, "skip_early_cond": 0.1,
                                                         "token_merging_ratio": 0.5, "s_min_uncond_all": True,
                                                         "deepcache_interval": 2.0, "sd_vae": "Automatic"})
    overrides = dict(body.override_settings)
    values, names = fast_option_values(body, overrides)
    assert values == {"s_min_uncond": 2, "skip_early_cond": 0.1, "token_merging_ratio": 0.5,
                      "s_min_uncond_all": True, "deepcache_interval": 2}
    assert isinstance(values["deepcache_interval"], int)
    assert overrides == {"sd_vae": "Automatic"}  # the others are honoured, so not listed as ignored
    assert names["token_merging_ratio"] == "override_settings.token_merging_ratio"
    body = Txt2ImgRequest(prompt="x", s_min_uncond=3.0, override_settings={"s_min_uncond": 2})
    values, names = fast_option_values(body, dict(body.override_settings))
    assert values == {"s_min_uncond": 3.0} and names == {"s_min_uncond": "s_min_uncond"}  # the body wins
    bad = Txt2ImgRequest(prompt="x", override_settings={"token_merging_ratio": 5})
    values, names = fast_option_values(bad, dict(bad.override_settings))
    with pytest.raises(RequestError) as info:
        try:
            GenerationRequest.create(**values)
        except RequestError as exc:
            raise exc.renamed(names) from None
    assert info.value.field == "override_settings.token_merging_ratio"


# ---- the conditioning cache ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_conditioning_cache_hit_is_bit_identical_and_invalidates(baseline):
    pipe = tiny_pipeline(0)
    cache = pipe.enable_conditioning_cache(max_entries=8)
    first = pipe.generate(GenerationRequest(**BASE))
    assert (cache.hits, cache.misses) == (0, 1)
    hit = pipe.generate(GenerationRequest(**BASE))
    assert (cache.hits, cache.misses) == (1, 1)
    assert np.array_equal(hit.pixels, first.pixels) and np.array_equal(hit.pixels, baseline.pixels)
    pipe.generate(GenerationRequest(**{**BASE, "negative_prompt": "green"}))
    pipe.generate(GenerationRequest(**BASE, clip_skip=2))
    pipe.generate(GenerationRequest(**BASE, weighting="comfy"))
    assert (cache.hits, cache.misses) == (1, 4)
    # an in-place weight change (what merging a LoRA into the text encoder does) is a miss, and is used
    model = pipe.text_encoder.encoders[0].model
    weight = model.embeddings.token_embedding.weight
    with torch.no_grad():
        weight.mul_(1.5)
    changed = pipe.generate(GenerationRequest(**BASE))
    assert cache.misses == 5 and not np.array_equal(changed.pixels, first.pixels)
    fresh = tiny_pipeline(0)
    with torch.no_grad():
        fresh.text_encoder.encoders[0].model.embeddings.token_embedding.weight.mul_(1.5)
    assert np.array_equal(fresh.generate(GenerationRequest(**BASE)).pixels, changed.pixels)
    with torch.no_grad():
        weight.div_(1.5)
    # another text encoder object of the same weights never hits the old entries
    pipe.text_encoder = tiny_pipeline(0).text_encoder
    pipe.generate(GenerationRequest(**BASE))
    assert cache.misses == 6
    assert cache.stats()["entries"] == len(cache) <= 8


def test_conditioning_cache_embeddings_invalidate(tmp_path):
    from clipdiffusion.text.embeddings import Embedding

    pipe = tiny_pipeline(0)
    cache = pipe.enable_conditioning_cache()
    request = GenerationRequest(**{**BASE, "prompt": "a wugthing circle"})
    before = pipe.generate(request)
    width = pipe.text_encoder.encoders[0].model.config.width
    pipe.text_encoder.add_embedding(Embedding(name="wugthing", vectors=1, widths=(width,),
                                              tensors=(torch.ones(1, width),)))
    after = pipe.generate(request)
    assert cache.hits == 0 and cache.misses == 2
    assert not np.array_equal(before.pixels, after.pixels)


def test_conditioning_cache_is_bounded():
    cache = ConditioningCache(max_entries=2)
    pipe = tiny_pipeline(0)
    pipe.enable_conditioning_cache(cache=cache)
    encoder = pipe._conditioning_encoder()
    for text in ("a", "b", "c", "a"):
        encoder.encode_texts([text], [""])
    assert (len(cache), cache.evictions, cache.hits, cache.misses) == (2, 2, 0, 4)
    one = cache.bytes // 2
    small = ConditioningCache(max_entries=10, max_bytes=one + 1)
    pipe.enable_conditioning_cache(cache=small)
    encoder = pipe._conditioning_encoder()
    for text in ("a", "b"):
        encoder.encode_texts([text], [""])
    assert len(small) == 1 and small.bytes <= one + 1
    assert pipe.enable_conditioning_cache(max_entries=0) is None and pipe._conditioning_encoder() is pipe.text_encoder
    with pytest.raises(ValueError, match="max_entries"):
        ConditioningCache(max_entries=-1)


@pytest.mark.slow
def test_server_routes_honour_the_options_and_report_the_cache():
    import httpx

    from clipdiffusion.server.app import create_app
    from clipdiffusion.server.settings import ServerSettings

    from server_fixtures import ServerThread

    settings = ServerSettings(samplers=("euler",), schedules=("normal",))
    body = {"prompt": "a red circle", "negative_prompt": "blue", "steps": 3, "seed": 7, "width": 16, "height": 16}
    with ServerThread(create_app(lambda name: tiny_pipeline(0), settings)) as server, \
            httpx.Client(base_url=server.url, timeout=120) as client:
        first = client.post("/sdapi/v1/txt2img", json=body).json()
        second = client.post("/sdapi/v1/txt2img", json=body).json()
        assert first["images"] == second["images"]  # the second encoded nothing: a cache hit, the same bits
        stats = client.get("/api/info").json()["conditioning_cache"]
        assert (stats["hits"], stats["misses"], stats["entries"]) == (1, 1, 1)
        merged = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {
            "token_merging_ratio": 0.5, "s_min_uncond": 1000}}).json()
        info = __import__("json").loads(merged["info"])
        assert "Token merging ratio: 0.5" in info["infotexts"][0] and "NGMS: 1000" in info["infotexts"][0]
        assert not [name for name in info["ignored_fields"] if "token_merging" in name or "s_min" in name]
        assert merged["images"] != first["images"]
        bad = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"skip_early_cond": 2}})
        assert bad.status_code == 422 and "override_settings.skip_early_cond" in bad.text
