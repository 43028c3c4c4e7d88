"""TextEncoder.encode on tiny random CLIP towers: weighting math, clip skip (negative included), equal lengths,
long-prompt rows, SDXL concat/pooled/zero negative, to_diffusers, bad input, and parity with transformers."""

import pytest
import torch

from clipdiffusion.errors import ClipDiffusionError, PromptError
from clipdiffusion.text.chunking import BOS_ID, EOS_ID
from clipdiffusion.text.clip import CLIPTextConfig, CLIPTextModel, stretch_position_embedding
from clipdiffusion.text.conditioning import WEIGHTINGS, Conditioning, EncoderSpec, TextEncoder
from clipdiffusion.text.weighting import _weight_a1111
from clipdiffusion.text.prompt import parse_prompt
from clipdiffusion.text.tokenizer import CLIPTokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def parse():
    return parse_prompt


def tiny_model(seed, width=32, layers=3, projection_dim=None):
    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(width=width, layers=layers, heads=2, projection_dim=projection_dim)).eval()
    with torch.no_grad():  # a non-trivial final LN, so that hidden means are not ~0 as with a fresh LayerNorm
        model.final_layer_norm.weight.normal_(1.0, 0.3)
        model.final_layer_norm.bias.normal_(0.2, 0.3)
    return model


@pytest.fixture(scope="module")
def sd1(tok, parse):
    return TextEncoder("sd1", [EncoderSpec("clip_l", tiny_model(0), EOS_ID, True, 1)], tok, parse=parse)


@pytest.fixture(scope="module")
def sdxl(tok, parse):
    specs = [
        EncoderSpec("clip_l", tiny_model(1, width=32), EOS_ID, False, 2),
        EncoderSpec("clip_g", tiny_model(2, width=48, layers=4, projection_dim=24), 0, False, 2),
    ]
    return TextEncoder("sdxl", specs, tok, parse=parse)


def window_ids(tok, text, pad=EOS_ID, positions=77):
    ids = tok.encode(text)
    return [BOS_ID, *ids, EOS_ID] + [pad] * (positions - len(ids) - 2)


def direct(spec, ids, clip_skip, **kw):
    with torch.no_grad():
        return spec.model(torch.tensor([ids]), clip_skip=clip_skip, final_norm=spec.final_norm, **kw)


def test_shapes_and_to_diffusers(sd1):
    cond = sd1.encode("a red cat", "blurry")
    assert isinstance(cond, Conditioning)
    assert cond.context.shape == cond.negative_context.shape == (1, 77, 32)
    assert cond.pooled is None and cond.context_lengths == (77, 77)
    assert set(cond.to_diffusers()) == {"prompt_embeds", "negative_prompt_embeds"}
    assert cond.report.prompt.summary() == "3/75"


@pytest.mark.parametrize("clip_skip", [1, 2, 3])
def test_clip_skip_applies_to_prompt_and_negative(sd1, tok, clip_skip):
    spec = sd1.encoders[0]
    cond = sd1.encode("a red cat", "blurry photo", clip_skip=clip_skip, weighting="none")
    assert torch.equal(cond.context[0], direct(spec, window_ids(tok, "a red cat"), clip_skip).hidden[0])
    assert torch.equal(cond.negative_context[0], direct(spec, window_ids(tok, "blurry photo"), clip_skip).hidden[0])


def test_clip_skip_out_of_range(sd1):
    for bad in (0, 4, "2", True, 1.5):
        with pytest.raises(ClipDiffusionError, match=r"clip_skip=.*1\.\.3"):
            sd1.encode("cat", clip_skip=bad)


def test_a1111_weighting_restores_mean(sd1):
    plain = sd1.encode("cat dog sky", weighting="none").context[0]
    cond = sd1.encode("(cat:1.5) dog (sky:0.5)", weighting="a1111").context[0]
    weights = torch.ones(77)
    weights[1], weights[3] = 1.5, 0.5
    expected = plain * weights[:, None]
    expected = expected * (plain.mean() / expected.mean())
    torch.testing.assert_close(cond, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cond.mean(), plain.mean(), rtol=1e-5, atol=1e-7)


def test_grammar_and_break_end_to_end(sd1, tok):
    cond = sd1.encode("a (red:1.3) cat BREAK [dog]", "BREAK blurry", weighting="ignore")
    assert cond.report.prompt.summary() == "3/75 | 1/75"
    assert cond.report.negative_prompt.summary() == "0/75 | 1/75"  # leading BREAK: an all-padding chunk (A1111)
    assert cond.context.shape == cond.negative_context.shape == (1, 154, 32)
    dog = direct(sd1.encoders[0], window_ids(tok, "dog"), 1).hidden[0]
    torch.testing.assert_close(cond.context[0, 77:], dog, rtol=0, atol=1e-6)


def test_a1111_per_chunk_and_unweighted_chunk_untouched(sd1):
    text = " ".join(["cat"] * 75)
    plain = sd1.encode(text + " dog", weighting="none").context[0]
    cond = sd1.encode(text + " (dog:2.0)", weighting="a1111").context[0]
    assert torch.equal(cond[:77], plain[:77])  # chunk 1 has no weights: bit-identical
    torch.testing.assert_close(cond[77:].mean(), plain[77:].mean(), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(cond[77:], plain[77:])


def test_a1111_mean_guard():
    z = torch.randn(2, 5, 4)
    z = z - z.mean(dim=(1, 2), keepdim=True)  # original mean exactly ~0 ...
    w = torch.ones(2, 5)
    w[:, 2] = 3.0
    out = _weight_a1111(z, w, None)  # ... so no rescale (it would squash the window to ~0): plain z * w
    torch.testing.assert_close(out, z * w[..., None])
    flat = torch.ones(1, 3, 2)
    wf = torch.tensor([[1.0, 0.0, 1.0]])
    base = flat.clone()
    base[0, 1] = -2.0  # weighting token 1 to 0 moves the mean from 0 to +: no sign flip, no blow-up
    out = _weight_a1111(base, wf, None)
    torch.testing.assert_close(out, base * wf[..., None])


def test_comfy_weighting_lerps_from_empty(sd1):
    plain = sd1.encode("cat dog", weighting="none").context[0]
    empty = sd1.encode("", weighting="none").context[0]
    cond = sd1.encode("(cat:1.5) dog", weighting="comfy").context[0]
    expected = plain.clone()
    expected[1] = empty[1] + (plain[1] - empty[1]) * 1.5
    torch.testing.assert_close(cond, expected, rtol=1e-5, atol=1e-6)


def test_comfy_without_weights_is_plain(sd1):
    for long_prompt in ("truncate", "chunk", "window", "stretch"):
        plain = sd1.encode("cat dog", "ugly", long_prompt=long_prompt, weighting="none")
        comfy = sd1.encode("cat dog", "ugly", long_prompt=long_prompt, weighting="comfy")
        assert torch.equal(plain.context, comfy.context) and torch.equal(plain.negative_context, comfy.negative_context)


def test_conditioning_carries_its_plan_and_token_rows(sd1, tok):
    cond = sd1.encode("a red cat", "ugly", equalize=False)
    assert cond.plan == sd1.plan("a red cat") and cond.negative_plan == sd1.plan("ugly")
    assert cond.token_rows() == list(zip([1, 2, 3], tok.encode("a red cat")))
    long = sd1.encode(" ".join(["cat"] * 80), long_prompt="chunk")
    rows = long.token_rows()
    assert len(rows) == 80 and rows[75][0] == 77 + 1  # the second chunk's first token follows its BOS
    assert sd1.encode("BREAK").token_rows() == [] and sd1.encode("").token_rows() == []


def test_ignore_weighting_drops_weights(sd1):
    a = sd1.encode("(cat:1.5) dog", weighting="ignore").context
    b = sd1.encode("cat dog", weighting="a1111").context
    assert torch.equal(a, b)


@pytest.mark.parametrize("long_prompt", ["truncate", "chunk", "window", "stretch"])
def test_none_weighting_is_literal_text_as_tokens_no_weights(sd1, tok, long_prompt):
    """weighting="none" (A1111's emphasis "None") and `clipdiffusion tokens --no-weights` lay out the same tokens:
    brackets, (x:1.2) and BREAK are text, every weight 1."""
    from clipdiffusion.commands.tokens import tokens_report

    prompt = "a (red:1.3) cat BREAK [dog] " + ", ".join(["(tag:0.5)"] * 20)
    plan = sd1.plan(prompt, long_prompt, "none")
    report = tokens_report(prompt, long_prompt=long_prompt, weights=False, tokenizer=tok)
    assert [list(w.tokens) for w in plan.windows] == [c["ids"] for c in report["chunks"]]
    assert {w for window in plan.windows for w in window.weights} == {1.0}
    literal_ids = tok.encode("a (red:1.3) cat break [dog]")  # window tokens: content only, no BOS
    assert list(plan.windows[0].tokens[:len(literal_ids)]) == literal_ids
    literal = sd1.encode(prompt, weighting="none").context
    escaped = prompt.translate({ord(c): "\\" + c for c in "()[]"}).replace("BREAK", "break")
    assert torch.equal(literal, sd1.encode(escaped, weighting="a1111").context)


def test_negative_and_positive_equal_length(sd1):
    long = " ".join(["cat"] * 100)
    cond = sd1.encode(long, "blurry")
    empty = sd1.encode("", weighting="none").context[0]
    assert cond.context.shape == cond.negative_context.shape == (1, 154, 32)
    assert cond.context_lengths == (154, 77)
    torch.testing.assert_close(cond.negative_context[0, 77:], empty, rtol=0, atol=1e-6)
    assert any("empty-prompt chunk" in n for n in cond.report.notes)
    swapped = sd1.encode("blurry", long)
    assert swapped.context.shape == (1, 154, 32) and torch.allclose(swapped.context[0, 77:], empty, atol=1e-6)
    unequal = sd1.encode(long, "blurry", equalize=False)
    assert unequal.negative_context.shape == (1, 77, 32)
    with pytest.raises(ClipDiffusionError, match="equalize"):
        unequal.to_diffusers()


def test_chunks_are_encoded_independently(sd1, tok):
    text = " ".join(["cat"] * 75) + " red dog"
    cond = sd1.encode(text, weighting="none")
    second = direct(sd1.encoders[0], window_ids(tok, "red dog"), 1).hidden[0]
    torch.testing.assert_close(cond.context[0, 77:], second, rtol=0, atol=1e-6)


def test_window_rows(sd1):
    text = " ".join(["cat", "dog"] * 50)  # 100 tokens: windows at 0 and 25
    cond = sd1.encode(text, "", long_prompt="window", weighting="none")
    empty = sd1.encode("", weighting="none").context[0]
    assert cond.context.shape == (1, 154, 32) and cond.negative_context.shape == (1, 154, 32)
    chunked = sd1.encode(text, long_prompt="chunk", weighting="none").context[0]
    torch.testing.assert_close(cond.context[0, :76], chunked[:76], rtol=0, atol=1e-6)  # BOS + first 75 tokens
    torch.testing.assert_close(cond.context[0, 102:], empty[102 - 77:], rtol=0, atol=1e-6)  # padding rows


def test_stretch(sd1, tok):
    spec = sd1.encoders[0]
    text = " ".join(["cat"] * 100)
    cond = sd1.encode(text, "dog", long_prompt="stretch", weighting="none")
    assert cond.context.shape == cond.negative_context.shape == (1, 248, 32)
    table = stretch_position_embedding(spec.model.embeddings.position_embedding.weight.detach())
    ref = direct(spec, window_ids(tok, text, positions=248), 1, position_embedding=table).hidden[0]
    torch.testing.assert_close(cond.context[0], ref, rtol=0, atol=1e-6)


def test_sdxl_concat_pooled_and_zero_negative(sdxl, tok):
    l_spec, g_spec = sdxl.encoders
    cond = sdxl.encode("a red cat", "", weighting="none")
    assert cond.context.shape == (1, 77, 80) and cond.pooled.shape == (1, 24)
    l_ref = direct(l_spec, window_ids(tok, "a red cat"), 2).hidden[0]
    g_out = direct(g_spec, window_ids(tok, "a red cat", pad=0), 2, pooled=True)
    torch.testing.assert_close(cond.context[0, :, :32], l_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.context[0, :, 32:], g_out.hidden[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.pooled, g_out.pooled, rtol=0, atol=1e-6)
    assert torch.count_nonzero(cond.negative_context) == 0 and torch.count_nonzero(cond.negative_pooled) == 0
    assert cond.negative_context.shape == (1, 77, 80) and cond.negative_pooled.shape == (1, 24)
    d = cond.to_diffusers()
    assert set(d) == {"prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                      "negative_pooled_prompt_embeds"}
    neg = sdxl.encode("a red cat", "blurry", weighting="none")
    assert torch.count_nonzero(neg.negative_context) > 0 and torch.count_nonzero(neg.negative_pooled) > 0


def test_sdxl_pooled_from_first_chunk_unweighted_and_zero_padding(sdxl, tok):
    long = "(red:1.4) cat " + " ".join(["dog"] * 90)
    cond = sdxl.encode(long, "", weighting="a1111")
    first = "red cat " + " ".join(["dog"] * 73)
    ref = direct(sdxl.encoders[1], window_ids(tok, first, pad=0), 2, pooled=True).pooled
    torch.testing.assert_close(cond.pooled, ref, rtol=0, atol=1e-6)
    assert cond.context.shape == cond.negative_context.shape == (1, 154, 80)
    assert torch.count_nonzero(cond.negative_context) == 0


def test_sdxl_clip_skip_moves_both_towers(sdxl, tok):
    # default (None) and 2 are the penultimate layer; 3 moves both towers one layer earlier
    default = sdxl.encode("a red cat", "blurry", weighting="none")
    assert torch.equal(default.context, sdxl.encode("a red cat", "blurry", clip_skip=2, weighting="none").context)
    cond = sdxl.encode("a red cat", "blurry", clip_skip=3, weighting="none")
    l_ref = direct(sdxl.encoders[0], window_ids(tok, "blurry"), 3).hidden[0]
    g_ref = direct(sdxl.encoders[1], window_ids(tok, "blurry", pad=0), 3).hidden[0]
    torch.testing.assert_close(cond.negative_context[0], torch.cat([l_ref, g_ref], -1), rtol=0, atol=1e-6)
    with pytest.raises(ClipDiffusionError, match=r"1\.\.3"):
        sdxl.encode("cat", clip_skip=4)


def test_bad_input(sd1, tok):
    with pytest.raises(PromptError, match="prompt must be a string"):
        sd1.encode(None)
    with pytest.raises(PromptError, match="negative_prompt"):
        sd1.encode("cat", 5)
    with pytest.raises(ClipDiffusionError, match="weighting='loud'.*a1111, comfy, none"):
        sd1.encode("cat", weighting="loud")
    with pytest.raises(ClipDiffusionError, match="long_prompt='x'"):
        sd1.encode("cat", long_prompt="x")
    nan = TextEncoder("sd1", sd1.encoders, tok, parse=lambda text: [(text, float("nan"))])
    with pytest.raises(PromptError, match="nan"):
        nan.encode("cat")
    with pytest.raises(PromptError, match="10000"):
        sd1.encode("cat " * 10_001)
    with pytest.raises(ClipDiffusionError, match="family"):
        TextEncoder("sd3", sd1.encoders, tok)
    assert list(WEIGHTINGS) == ["a1111", "comfy", "none", "ignore"]  # A1111's emphasis None / Ignore


@pytest.mark.slow  # importing transformers takes ~5 s on 2 shared cores
@pytest.mark.parametrize("clip_skip", [1, 2])
@pytest.mark.parametrize("pad_id,default_skip", [(EOS_ID, 1), (0, 2)])
def test_parity_with_transformers(tok, parse, clip_skip, pad_id, default_skip):
    """Our context equals diffusers' encode_prompt logic on the same weights: hidden_states[-(skip)] + final LN on
    ids padded to 77 (EOS for CLIP-L, 0 after EOS for OpenCLIP). Tolerance 1e-5 (float32, same op order)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=BOS_ID, eos_token_id=EOS_ID,
    )
    torch.manual_seed(7)
    ref = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = CLIPTextModel(CLIPTextConfig(width=32, layers=3, heads=2))
    sd = {k.removeprefix("text_model."): v for k, v in ref.state_dict().items()}
    ours.load_state_dict(sd, strict=True)
    enc = TextEncoder("sd1", [EncoderSpec("clip", ours.eval(), pad_id, True, default_skip)], tok, parse=parse)
    prompt, negative = "a photograph of an astronaut riding a horse", "blurry, low quality"
    cond = enc.encode(prompt, negative, clip_skip=clip_skip, long_prompt="truncate", weighting="none")
    layer = clip_skip  # hidden_states[-layer] whatever the family default; diffusers' SD1 clip_skip = layer - 1
    for text, got in ((prompt, cond.context), (negative, cond.negative_context)):
        ids = torch.tensor([window_ids(tok, text, pad=pad_id)])
        with torch.no_grad():
            out = ref(ids, output_hidden_states=True)
            want = ref.final_layer_norm(out.hidden_states[-layer])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _hf_pair(transformers, seed, width, layers, act, projection_dim=None):
    """A tiny random transformers tower and ours with the same weights."""
    config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=2, max_position_embeddings=77, hidden_act=act, bos_token_id=BOS_ID,
        eos_token_id=EOS_ID, projection_dim=projection_dim or 512,
    )
    torch.manual_seed(seed)
    cls = transformers.CLIPTextModelWithProjection if projection_dim else transformers.CLIPTextModel
    ref = cls(config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = CLIPTextModel(CLIPTextConfig(width=width, layers=layers, heads=2, activation=act,
                                        projection_dim=projection_dim))
    ours.load_state_dict({k.removeprefix("text_model."): v for k, v in ref.state_dict().items()}, strict=True)
    return ref, ours.eval()


@pytest.mark.slow  # importing transformers takes ~5 s on 2 shared cores
def test_long_prompt_parity_with_a1111_loop_on_transformers(tok, parse):
    """Three weighted chunks and an equalised negative equal A1111's per-chunk algorithm run on transformers
    (``hidden_states[-2]`` + final LN, z*w, mean restored per chunk, empty-chunk padding). Tolerance 1e-5."""
    transformers = pytest.importorskip("transformers")
    ref, ours = _hf_pair(transformers, 3, 32, 3, "quick_gelu")
    enc = TextEncoder("sd1", [EncoderSpec("clip_l", ours, EOS_ID, True, 1)], tok, parse=parse)
    prompt = ", ".join(["a (red:1.3) cat on a [wooden] chair"] * 20)
    cond = enc.encode(prompt, "blurry, (low quality:1.2)", clip_skip=2)

    def a1111(plan):
        zs = []
        with torch.no_grad():
            for window in plan.windows:
                z = ref.final_layer_norm(ref(torch.tensor([window.ids()]), output_hidden_states=True).hidden_states[-2])
                original = z.mean()
                z = z * torch.tensor([window.position_weights()])[..., None]
                zs.append(z * (original / z.mean()))
        return torch.hstack(zs)

    want = a1111(enc.plan(prompt))
    assert want.shape == (1, 231, 32)
    uncond = a1111(enc.plan("blurry, (low quality:1.2)"))
    empty = a1111(enc.plan(""))
    want_neg = torch.hstack([uncond, empty, empty])
    torch.testing.assert_close(cond.context, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond.negative_context, want_neg, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # importing transformers takes ~5 s on 2 shared cores
def test_sdxl_parity_with_diffusers_logic(tok, parse):
    """SDXL as diffusers' ``StableDiffusionXLPipeline.encode_prompt`` computes it: both towers'
    ``hidden_states[-2]`` without final LN (diffusers ``clip_skip=None``; ours None or 2), concatenated on channels; pooled
    = the projected bigG output (``text_embeds``); CLIP-L ids padded with EOS, bigG ids with 0. Tolerance 1e-5."""
    transformers = pytest.importorskip("transformers")
    ref_l, ours_l = _hf_pair(transformers, 4, 32, 3, "quick_gelu")
    ref_g, ours_g = _hf_pair(transformers, 5, 48, 4, "gelu", projection_dim=24)
    enc = TextEncoder("sdxl", [EncoderSpec("clip_l", ours_l, EOS_ID, False, 2),
                               EncoderSpec("clip_g", ours_g, 0, False, 2)], tok, parse=parse)
    for clip_skip in (None, 2, 3):
        cond = enc.encode("a photograph of an astronaut riding a horse", "ugly", clip_skip=clip_skip,
                          long_prompt="truncate", weighting="none")
        for text, got, pooled in (("a photograph of an astronaut riding a horse", cond.context, cond.pooled),
                                  ("ugly", cond.negative_context, cond.negative_pooled)):
            with torch.no_grad():
                out_l = ref_l(torch.tensor([window_ids(tok, text)]), output_hidden_states=True)
                out_g = ref_g(torch.tensor([window_ids(tok, text, pad=0)]), output_hidden_states=True)
            layer = clip_skip or 2  # diffusers: hidden_states[-(clip_skip_diffusers + 2)], clip_skip_diffusers = ours-2
            want = torch.cat([out_l.hidden_states[-layer], out_g.hidden_states[-layer]], dim=-1)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(pooled, out_g.text_embeds, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("long_prompt", ["truncate", "chunk", "window", "stretch"])
@pytest.mark.parametrize("weighting", ["a1111", "comfy", "ignore"])  # "none" reads BREAK as text: other rows
def test_every_strategy_and_weighting_gives_equal_finite_contexts(sd1, sdxl, long_prompt, weighting):
    prompt = "(red:1.3) cat, " + " ".join(["dog"] * 90) + " BREAK [sky]"
    for enc in (sd1, sdxl):
        for negative in ("", "ugly, (bad:1.2)"):
            cond = enc.encode(prompt, negative, long_prompt=long_prompt, weighting=weighting)
            assert cond.context.shape == cond.negative_context.shape
            assert torch.isfinite(cond.context).all() and torch.isfinite(cond.negative_context).all()
            rows = {"truncate": 77, "chunk": 231, "window": 154, "stretch": 248}[long_prompt]  # chunk: BREAK
            assert cond.context.shape[1] == rows


def test_stretch_uses_a_native_248_table_as_is(tok, parse):
    torch.manual_seed(9)
    model = CLIPTextModel(CLIPTextConfig(width=32, layers=2, heads=2, max_positions=248)).eval()
    enc = TextEncoder("sd1", [EncoderSpec("clip_l", model, EOS_ID, True, 1)], tok, parse=parse)
    cond = enc.encode("a red cat", long_prompt="stretch", weighting="none")
    ref = direct(enc.encoders[0], window_ids(tok, "a red cat", positions=248), 1).hidden[0]
    torch.testing.assert_close(cond.context[0], ref, rtol=0, atol=1e-6)


def _hf_tokenizer_from_our_bpe(transformers, folder):
    """transformers' CLIPTokenizer built from the BPE merges we ship (no download): vocab = 256 byte characters,
    the same with ``</w>``, one entry per merge, then BOS/EOS, which is how CLIP's vocab.json is laid out."""
    import gzip
    import json
    from importlib.resources import files

    lines = gzip.decompress((files("clipdiffusion.text") / "data" / "bpe_simple_vocab_16e6.txt.gz").read_bytes())
    merges = [tuple(m.split()) for m in lines.decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]]
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    chars = [chr(c) for c in printable] + [chr(256 + i) for i in range(len(extra))]
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                      pad_token="<|endoftext|>", model_max_length=77)


@pytest.mark.slow  # imports diffusers
def test_parity_with_diffusers_encode_prompt(tok, parse, tmp_path):
    """diffusers' own ``StableDiffusionPipeline.encode_prompt`` (its tokenizer, padding and layer choice) on the same
    tiny weights: prompt and negative at diffusers ``clip_skip=None`` equal ours at 1; diffusers ``clip_skip=1``
    equals ours at 2. diffusers 0.42 + transformers >= 5.6 break ``clip_skip`` (``text_model`` is gone, diffusers
    #14124); the test gives the model that attribute back. Tolerance 1e-5."""
    import types

    transformers = pytest.importorskip("transformers")
    diffusers = pytest.importorskip("diffusers")
    ref, ours = _hf_pair(transformers, 11, 32, 3, "quick_gelu")
    hf_tok = _hf_tokenizer_from_our_bpe(transformers, tmp_path)
    if not hasattr(ref, "text_model"):
        object.__setattr__(ref, "text_model", types.SimpleNamespace(final_layer_norm=ref.final_layer_norm))
    pipe = diffusers.StableDiffusionPipeline.__new__(diffusers.StableDiffusionPipeline)  # only the text parts
    object.__setattr__(pipe, "text_encoder", ref)
    object.__setattr__(pipe, "tokenizer", hf_tok)
    enc = TextEncoder("sd1", [EncoderSpec("clip_l", ours, EOS_ID, True, 1)], tok, parse=parse)
    prompt, negative = "a photograph of an astronaut riding a horse, café", "blurry, low quality"
    with torch.no_grad():
        want, want_neg = pipe.encode_prompt(prompt, "cpu", 1, True, negative, clip_skip=None)
        want_skip = pipe.encode_prompt(prompt, "cpu", 1, False, clip_skip=1)[0]
        want_neg_skip = pipe.encode_prompt(negative, "cpu", 1, False, clip_skip=1)[0]
    cond = enc.encode(prompt, negative, clip_skip=1, long_prompt="truncate", weighting="none")
    torch.testing.assert_close(cond.context, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond.negative_context, want_neg, rtol=1e-5, atol=1e-5)
    cond = enc.encode(prompt, negative, clip_skip=2, long_prompt="truncate", weighting="none")
    torch.testing.assert_close(cond.context, want_skip, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond.negative_context, want_neg_skip, rtol=1e-5, atol=1e-5)  # skip on negative too


def test_repeated_windows_are_encoded_once_and_land_in_every_row(sd1, monkeypatch):
    """'a cat BREAK a dog BREAK a cat': three chunks, two distinct, plus the empty negative's window; the tower
    sees three windows, not four, and the context equals the single-chunk encodings side by side."""
    calls = []
    real = sd1._run
    monkeypatch.setattr(sd1, "_run", lambda spec, skip, windows, *a, **k: calls.append(len(windows))
                        or real(spec, skip, windows, *a, **k))
    both = sd1.encode("a cat BREAK a dog BREAK a cat").context
    assert calls == [3]
    monkeypatch.setattr(sd1, "_run", real)
    cat, dog = sd1.encode("a cat").context, sd1.encode("a dog").context
    torch.testing.assert_close(both, torch.cat([cat, dog, cat], dim=1), rtol=0, atol=1e-6)
