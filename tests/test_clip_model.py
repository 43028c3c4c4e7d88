"""CLIP text transformer: parity with transformers and open_clip on identical random weights, early exit,
validation, and Long-CLIP position stretching.

Parity tolerance: 1e-4 max abs difference (fp32, CPU), stated per assertion as TOL.
"""

import pytest
import torch
from torch import nn

from clipdiffusion.checkpoints.text_layouts import OPENCLIP, to_ours
from clipdiffusion.errors import ClipDiffusionError
from clipdiffusion.text.clip import (
    SD1_CLIP_L,
    SD2_OPENCLIP_H,
    SDXL_CLIP_L,
    SDXL_OPENCLIP_BIGG,
    CLIPTextConfig,
    CLIPTextModel,
    stretch_position_embedding,
)

TOL = 1e-4  # max abs difference accepted for parity in fp32
BOS, EOS = 49406, 49407
WIDTH, LAYERS, HEADS = 64, 4, 4


def _perturb(module, seed):
    # Default inits leave LayerNorms at 1/0 and biases at 0, which would hide mistakes in those paths.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _ids(batch_lengths, pad=EOS, length=77, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in batch_lengths:
        body = torch.randint(0, 49406, (n,), generator=g).tolist()
        row = [BOS] + body + [EOS]
        rows.append(row + [pad] * (length - len(row)))
    return torch.tensor(rows)


def _hf(act="quick_gelu", projection=None, positions=77, seed=0):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(
        hidden_size=WIDTH,
        intermediate_size=4 * WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        vocab_size=49408,
        max_position_embeddings=positions,
        hidden_act=act,
        projection_dim=projection or WIDTH,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=1,
    )
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    ref = cls(cfg).eval()
    _perturb(ref, seed + 1)
    return ref


def _ours_from_hf(ref, act):
    sd = {k.removeprefix("text_model."): v for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
    config = CLIPTextConfig.from_weights(sd, activation=act)
    assert config.width == WIDTH and config.layers == LAYERS and config.heads == WIDTH // 64
    # Tiny test towers use 16-wide heads; the real ones are 64-wide, which is what from_weights assumes.
    config = CLIPTextConfig(**{**config.__dict__, "heads": HEADS})
    return CLIPTextModel.from_state_dict(sd, config).eval()


@pytest.fixture(scope="module")
def hf_pair():
    ref = _hf(projection=32)
    return ref, _ours_from_hf(ref, "quick_gelu")


@torch.no_grad()
@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_every_layer_matches_transformers(act):
    ref = _hf(act=act, seed=3)
    ours = _ours_from_hf(ref, act)
    ids = _ids([5, 40, 75])
    out = ref(ids, output_hidden_states=True)
    final_ln = ref.text_model.final_layer_norm if hasattr(ref, "text_model") else ref.final_layer_norm
    for k in range(1, LAYERS + 1):
        raw = ours(ids, clip_skip=k, final_norm=False).hidden
        normed = ours(ids, clip_skip=k).hidden
        assert (raw - out.hidden_states[-k]).abs().max() < TOL, k
        assert (normed - final_ln(out.hidden_states[-k])).abs().max() < TOL, k
    assert (ours(ids).hidden - out.last_hidden_state).abs().max() < TOL


@torch.no_grad()
def test_pooled_projection_matches_transformers(hf_pair):
    ref, ours = hf_pair
    ids = _ids([3, 20, 75], seed=1)
    out = ref(ids, output_hidden_states=True)
    for clip_skip, final_norm in [(1, True), (2, False), (3, True)]:
        res = ours(ids, clip_skip=clip_skip, final_norm=final_norm, pooled=True)
        assert res.pooled.shape == (3, 32)
        assert (res.pooled - out.text_embeds).abs().max() < TOL
        # pooled=True runs every layer but still returns the chosen hidden state
        expected = out.hidden_states[-clip_skip]
        if final_norm:
            expected = ref.text_model.final_layer_norm(expected)
        assert (res.hidden - expected).abs().max() < TOL
    assert ours(ids).pooled is None


@torch.no_grad()
def test_pooled_without_projection_is_final_ln_at_first_eos():
    ref = _hf(seed=5)
    ours = _ours_from_hf(ref, "quick_gelu")
    ids = _ids([4, 9], pad=EOS)  # EOS padding: argmax must pick the first EOS
    out = ref(ids)
    res = ours(ids, pooled=True)
    assert res.pooled.shape == (2, WIDTH)
    assert (res.pooled - out.pooler_output).abs().max() < TOL
    assert (res.pooled[0] - res.hidden[0, 5]).abs().max() == 0


@torch.no_grad()
def test_openclip_layout_matches_open_clip_text_transformer():
    from refs import open_clip_module

    transformer = open_clip_module("transformer")
    torch.manual_seed(7)
    ref = transformer.TextTransformer(
        context_length=77, vocab_size=49408, width=WIDTH, heads=HEADS, layers=LAYERS, output_dim=48,
        act_layer=nn.GELU, output_tokens=True,
    ).eval()
    _perturb(ref, 8)
    sd, _, unexpected, bad = to_ours(OPENCLIP, ref.state_dict())  # the layout table's OpenCLIP -> ours
    assert not unexpected and not bad, (unexpected, bad)
    config = CLIPTextConfig(width=WIDTH, layers=LAYERS, heads=HEADS, activation="gelu", projection_dim=48)
    assert CLIPTextConfig.from_weights(sd, activation="gelu").projection_dim == 48
    ours = CLIPTextModel.from_state_dict(sd, config).eval()
    ids = _ids([6, 30, 75], pad=0, seed=2)  # OpenCLIP pads with 0

    pooled, tokens = ref(ids)
    last = ours(ids, pooled=True)
    assert (last.hidden - tokens).abs().max() < TOL  # last layer + ln_final
    assert (last.pooled - pooled).abs().max() < TOL  # ln_final at argmax, @ text_projection

    out = ref.forward_intermediates(ids, indices=[LAYERS - 2], intermediates_only=True, output_fmt="NLC")
    inter = out["text_intermediates"][0]  # output of block LAYERS-2 (0-based), i.e. the penultimate
    penultimate = ours(ids, clip_skip=2, final_norm=False).hidden  # SDXL bigG style
    assert (penultimate - inter).abs().max() < TOL
    penultimate_ln = ours(ids, clip_skip=2).hidden  # SD2 style: penultimate + ln_final
    assert (penultimate_ln - ref.ln_final(inter)).abs().max() < TOL


def _count_layer_calls(model, **kwargs):
    calls = []
    handles = [layer.register_forward_hook(lambda *_: calls.append(1)) for layer in model.encoder.layers]
    try:
        with torch.no_grad():
            model(_ids([5]), **kwargs)
    finally:
        for h in handles:
            h.remove()
    return len(calls)


def test_clip_skip_exits_early(hf_pair):
    _, ours = hf_pair
    assert _count_layer_calls(ours, clip_skip=1) == LAYERS
    assert _count_layer_calls(ours, clip_skip=2) == LAYERS - 1
    assert _count_layer_calls(ours, clip_skip=LAYERS) == 1
    # the pooled vector needs the last layer, so nothing is skipped then
    assert _count_layer_calls(ours, clip_skip=2, pooled=True) == LAYERS


@pytest.mark.parametrize("bad", [0, LAYERS + 1, -1, 1.5, True, "2"])
def test_clip_skip_out_of_range_names_field_and_range(hf_pair, bad):
    _, ours = hf_pair
    with pytest.raises(ClipDiffusionError) as err:
        ours(_ids([3]), clip_skip=bad)
    assert "clip_skip" in str(err.value) and f"1 (last layer) to {LAYERS}" in str(err.value)
    assert repr(bad) in str(err.value)


def test_bad_ids_are_rejected_with_their_value(hf_pair):
    _, ours = hf_pair
    with pytest.raises(ClipDiffusionError, match="length 78"):
        ours(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ClipDiffusionError, match="49408"):
        ours(torch.full((1, 4), 49408))
    with pytest.raises(ClipDiffusionError, match="-3"):
        ours(torch.tensor([[BOS, -3, EOS]]))
    with pytest.raises(ClipDiffusionError, match=r"shape \[batch, tokens\]"):
        ours(torch.zeros(77, dtype=torch.long))
    with pytest.raises(ClipDiffusionError, match="integer"):
        ours(torch.zeros(1, 77))


def _long_clip_reference(pre, keep=20, k=4):
    # Long-CLIP's load_from_clip loop, transcribed row by row (model/longclip.py, beichenzbc/Long-CLIP).
    length, dim = pre.shape
    new = torch.zeros(k * length - (k - 1) * keep, dim)
    for i in range(keep):
        new[i] = pre[i]
    for i in range(length - 1 - keep):
        for j in range(k):
            new[k * i + j + keep] = (k - j) * pre[i + keep] / k + j * pre[i + 1 + keep] / k
    for j in range(k):
        new[k * length - (k - 1) * keep - (k - j)] = pre[length - 1] + j * (pre[length - 1] - pre[length - 2]) / k
    return new


def test_stretch_position_embedding_follows_long_clip():
    table = torch.randn(77, 16, generator=torch.Generator().manual_seed(0))
    out = stretch_position_embedding(table)
    assert out.shape == (20 + 57 * 4, 16) == (248, 16)
    assert torch.equal(out[:20], table[:20])
    assert torch.equal(out[20::4], table[20:])  # every original row kept at its stretched position
    assert (out - _long_clip_reference(table)).abs().max() < 1e-6
    assert (out[-1] - (table[-1] + 0.75 * (table[-1] - table[-2]))).abs().max() < 1e-6
    assert stretch_position_embedding(table, keep=10, factor=2).shape == (10 + 67 * 2, 16)
    for kwargs in ({"keep": 76}, {"factor": 0}, {"keep": -1}):
        with pytest.raises(ClipDiffusionError):
            stretch_position_embedding(table, **kwargs)


@torch.no_grad()
def test_position_embedding_override_allows_248_tokens():
    ref = _hf(positions=248, seed=11)
    ours = _ours_from_hf(ref, "quick_gelu")
    table = ours.embeddings.position_embedding.weight.clone()
    short = CLIPTextModel.from_state_dict(
        {**ours.state_dict(), "embeddings.position_embedding.weight": table[:77]},
        CLIPTextConfig(**{**ours.config.__dict__, "max_positions": 77}),
    )
    ids = _ids([200], length=248)
    with pytest.raises(ClipDiffusionError, match="length 248"):
        short(ids)
    got = short(ids, position_embedding=table).hidden
    assert got.shape == (1, 248, WIDTH)
    assert (got - ref(ids).last_hidden_state).abs().max() < TOL
    with pytest.raises(ClipDiffusionError, match="position_embedding"):
        short(ids, position_embedding=table[:, :8])


def test_presets_and_parameter_counts():
    assert (SD1_CLIP_L.width, SD1_CLIP_L.layers, SD1_CLIP_L.heads, SD1_CLIP_L.activation) == (768, 12, 12, "quick_gelu")
    assert SDXL_CLIP_L == SD1_CLIP_L
    assert (SD2_OPENCLIP_H.width, SD2_OPENCLIP_H.layers, SD2_OPENCLIP_H.heads) == (1024, 24, 16)
    assert (SDXL_OPENCLIP_BIGG.width, SDXL_OPENCLIP_BIGG.layers, SDXL_OPENCLIP_BIGG.heads) == (1280, 32, 20)
    assert SDXL_OPENCLIP_BIGG.projection_dim == 1280 and SDXL_OPENCLIP_BIGG.activation == "gelu"
    # meta device: shapes only, nothing allocated
    clip_l = CLIPTextModel(SD1_CLIP_L, device="meta")
    assert clip_l.n_params() == 123_060_480  # the well-known CLIP ViT-L/14 text tower total
    assert len(clip_l.state_dict()) == 196  # reference key count without position_ids
    inferred = CLIPTextConfig.from_weights(CLIPTextModel(SDXL_OPENCLIP_BIGG, device="meta").state_dict(),
                                           activation="gelu")
    assert inferred == SDXL_OPENCLIP_BIGG


def test_config_validation_names_the_field():
    with pytest.raises(ClipDiffusionError, match="activation"):
        CLIPTextConfig(activation="relu")
    with pytest.raises(ClipDiffusionError, match="heads"):
        CLIPTextConfig(width=100, heads=12)
    with pytest.raises(ClipDiffusionError, match="layers"):
        CLIPTextConfig(layers=0)


@torch.no_grad()
def test_runs_in_bfloat16(hf_pair):
    _, ours = hf_pair
    half = CLIPTextModel.from_state_dict(ours.state_dict(), ours.config, dtype=torch.bfloat16)
    ids = _ids([10])
    got = half(ids, pooled=True)
    assert got.hidden.dtype == torch.bfloat16
    assert (got.hidden.float() - ours(ids).hidden).abs().max() < 0.1
