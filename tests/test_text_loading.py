"""Loading text encoders from every layout: HF, LDM SD1 (with and without text_model.), OpenCLIP SD2, SDXL pair;
strict key checking; the reverse tables. Files are tiny random towers written as safetensors.

Parity tolerance: 1e-4 max abs difference (fp32), TOL below.
"""

import pytest
import torch
from torch import nn

from clipdiffusion.checkpoints.safetensors_io import save_file
from clipdiffusion.errors import CheckpointError
from clipdiffusion.text.clip import CLIPTextConfig, CLIPTextModel
from clipdiffusion.text.conditioning import EncoderSpec, TextEncoder
from clipdiffusion.checkpoints.text_encoders import load_text_encoder, text_encoders_from_state_dict
from clipdiffusion.checkpoints.text_layouts import LAYOUTS, OPENCLIP, from_ours, text_encoder_to_ldm, to_ours
from clipdiffusion.families import EOS_ID

TOL = 1e-4


def to_open_clip_state_dict(tensors):
    """Our tower's tensors named as a bare OpenCLIP text tower (the layout table's save direction)."""
    return from_ours(LAYOUTS["openclip"], tensors)


def from_open_clip_state_dict(tensors):
    """A bare OpenCLIP text tower's tensors named as ours (the layout table's load direction), all of them."""
    ours, _, unexpected, bad = to_ours(OPENCLIP, tensors)
    assert not unexpected and not bad, (unexpected, bad)
    return ours
WIDTH, LAYERS = 128, 3  # width 128 -> two 64-wide heads, as from_weights infers (width // 64)
BOS = 49406


def _random_tower(seed, activation="quick_gelu", projection=None, vocab=49408):
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=vocab, width=WIDTH, layers=LAYERS, heads=WIDTH // 64,
                            activation=activation, projection_dim=projection)
    model = CLIPTextModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    return model


def _ids(pad):
    row = [BOS, 320, 1125, 539, EOS_ID]
    return torch.tensor([row + [pad] * (77 - len(row))])


def _hf_keys(model, prefix):
    return {prefix + k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b, pad=EOS_ID, **kw):
    with torch.no_grad():
        x, y = a(_ids(pad), pooled=True, **kw), b(_ids(pad), pooled=True, **kw)
    assert (x.hidden - y.hidden).abs().max() < TOL
    assert (x.pooled - y.pooled).abs().max() < TOL


@pytest.fixture(scope="module")
def clip_l():
    return _random_tower(0)


@pytest.fixture(scope="module")
def open_h():
    return _random_tower(1, activation="gelu", projection=WIDTH)


def test_hf_clip_text_model_file(tmp_path, clip_l):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = transformers.CLIPTextConfig(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS,
                                      num_attention_heads=2, vocab_size=49408, hidden_act="quick_gelu",
                                      eos_token_id=EOS_ID, bos_token_id=BOS, projection_dim=32)
    torch.manual_seed(3)
    for cls, name in ((transformers.CLIPTextModel, "plain"), (transformers.CLIPTextModelWithProjection, "proj")):
        ref = cls(cfg).eval()
        path = tmp_path / f"{name}.safetensors"
        save_file({**{k: v.contiguous() for k, v in ref.state_dict().items()},
                   "text_model.embeddings.position_ids": torch.arange(77)[None]}, path)
        enc = load_text_encoder(path)
        assert isinstance(enc, TextEncoder) and enc.family == "sd1"
        spec = enc.encoders[0]
        assert (spec.pad_id, spec.final_norm, spec.default_clip_skip) == (EOS_ID, True, 1)
        with torch.no_grad():
            out = ref(_ids(EOS_ID), output_hidden_states=True)
            ours = spec.model(_ids(EOS_ID), clip_skip=2, pooled=True)
        ln = ref.text_model.final_layer_norm if hasattr(ref, "text_model") else ref.final_layer_norm
        assert (ours.hidden - ln(out.hidden_states[-2])).abs().max() < TOL
        expected_pooled = out.text_embeds if name == "proj" else out.pooler_output
        assert (ours.pooled - expected_pooled).abs().max() < TOL


@pytest.mark.parametrize("text_model", [True, False])
def test_ldm_sd1_file_with_and_without_text_model(tmp_path, clip_l, text_model):
    prefix = "cond_stage_model.transformer." + ("text_model." if text_model else "")
    tensors = _hf_keys(clip_l, prefix)
    tensors[prefix + "embeddings.position_ids"] = torch.arange(77.0)[None] + 0.3  # drifted float copy: ignored
    tensors["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 4, 3, 3)
    tensors["first_stage_model.decoder.conv_in.weight"] = torch.zeros(2, 2)
    tensors["model_ema.decay"] = torch.tensor(0.999)
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}  # fp16 file
    path = tmp_path / "sd1.safetensors"
    save_file(tensors, path)
    enc = load_text_encoder(path)
    model = enc.encoders[0].model
    assert enc.family == "sd1" and model.config.activation == "quick_gelu"
    assert model.embeddings.token_embedding.weight.dtype == torch.float32  # default dtype
    with torch.no_grad():
        got = model(_ids(EOS_ID)).hidden
    # the file holds fp16 copies, so compare with the same rounding applied to the source tower
    ref = CLIPTextModel.from_state_dict({k: v.half().float() for k, v in clip_l.state_dict().items()},
                                        clip_l.config)
    with torch.no_grad():
        want = ref(_ids(EOS_ID)).hidden
    assert (got - want).abs().max() < TOL

    _, _, ignored = text_encoders_from_state_dict(tensors)
    assert prefix + "embeddings.position_ids" in ignored
    assert "model.diffusion_model.input_blocks.0.0.weight" in ignored and "model_ema.decay" in ignored


def _open_clip_tensors(model, prefix):
    out = {prefix + k: v.clone() for k, v in to_open_clip_state_dict(model.state_dict()).items()}
    out[prefix + "logit_scale"] = torch.tensor(4.6)
    return out


def test_openclip_rename_round_trip_and_fused_qkv(open_h):
    oc = to_open_clip_state_dict(open_h.state_dict())
    assert oc["transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * WIDTH, WIDTH)
    assert oc["positional_embedding"].shape == (77, WIDTH)
    q = open_h.state_dict()["encoder.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(oc["transformer.resblocks.0.attn.in_proj_weight"][:WIDTH], q)  # rows 0..D-1 are q
    assert torch.equal(oc["text_projection"], open_h.text_projection.weight.t())  # stored [in, out]
    back = from_open_clip_state_dict(oc)
    assert set(back) == set(open_h.state_dict())
    assert all(torch.equal(back[k], v) for k, v in open_h.state_dict().items())


def test_ldm_sd2_openclip_file_matches_open_clip(tmp_path):
    from refs import open_clip_module

    transformer = open_clip_module("transformer")
    torch.manual_seed(5)
    ref = transformer.TextTransformer(context_length=77, vocab_size=49408, width=WIDTH, heads=2, layers=LAYERS,
                                      output_dim=WIDTH, act_layer=nn.GELU, output_tokens=True).eval()
    tensors = {"cond_stage_model.model." + k: v.clone() for k, v in ref.state_dict().items()}
    tensors["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    path = tmp_path / "sd2.safetensors"
    save_file(tensors, path)
    enc = load_text_encoder(path)
    spec = enc.encoders[0]
    assert enc.family == "sd2" and spec.model.config.activation == "gelu"
    assert (spec.pad_id, spec.final_norm, spec.default_clip_skip) == (0, True, 2)
    ids = _ids(0)
    with torch.no_grad():
        pooled, tokens = ref(ids)
        ours = spec.model(ids, pooled=True)
        inter = ref.forward_intermediates(ids, indices=[LAYERS - 2], intermediates_only=True,
                                          output_fmt="NLC")["text_intermediates"][0]
        penultimate = spec.model(ids, clip_skip=2).hidden
    assert (ours.hidden - tokens).abs().max() < TOL and (ours.pooled - pooled).abs().max() < TOL
    assert (penultimate - ref.ln_final(inter)).abs().max() < TOL  # SD2's default: penultimate + ln_final


def test_sdxl_pair(tmp_path, clip_l):
    big_g = _random_tower(2, activation="gelu", projection=64)
    tensors = {**_hf_keys(clip_l, "conditioner.embedders.0.transformer.text_model."),
               **_open_clip_tensors(big_g, "conditioner.embedders.1.model."),
               "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
               "model.diffusion_model.label_emb.0.0.weight": torch.zeros(8, 8)}
    path = tmp_path / "sdxl.safetensors"
    save_file(tensors, path)
    enc = load_text_encoder(path)
    assert enc.family == "sdxl"
    l_spec, g_spec = enc.encoders
    assert (l_spec.name, l_spec.pad_id, l_spec.final_norm, l_spec.default_clip_skip) == ("clip_l", EOS_ID, False, 2)
    assert (g_spec.name, g_spec.pad_id, g_spec.final_norm, g_spec.default_clip_skip) == ("clip_g", 0, False, 2)
    assert l_spec.model.config.activation == "quick_gelu" and g_spec.model.config.activation == "gelu"
    assert l_spec.model.text_projection is None and g_spec.model.config.projection_dim == 64
    _same(l_spec.model, clip_l, clip_skip=2, final_norm=False)
    _same(g_spec.model, big_g, pad=0, clip_skip=2, final_norm=False)


def test_reverse_tables_round_trip(clip_l, open_h):
    big_g = _random_tower(4, activation="gelu", projection=WIDTH)
    cases = [("sd1", [clip_l]), ("sd2", [open_h]), ("sdxl", [clip_l, big_g])]
    for family, models in cases:
        specs = [EncoderSpec("x", m, 0, True, 2) for m in models]  # penultimate defaults: a pure rename
        tensors = text_encoder_to_ldm(family, specs)
        assert all(not k.startswith("text_model.") for k in tensors)
        got_family, got, ignored = text_encoders_from_state_dict(tensors)
        assert got_family == family and ignored == []
        for spec, model in zip(got, models):
            assert spec.model.config == model.config
            _same(spec.model, model, pad=0)
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in text_encoder_to_ldm(
        "sd2", [open_h])


def test_missing_unexpected_and_bad_shapes_listed_in_one_error(clip_l):
    prefix = "cond_stage_model.transformer.text_model."
    tensors = _hf_keys(clip_l, prefix)
    del tensors[prefix + "final_layer_norm.bias"]
    del tensors[prefix + "encoder.layers.1.mlp.fc2.weight"]
    tensors[prefix + "encoder.layers.0.self_attn.bogus.weight"] = torch.zeros(3)
    tensors[prefix + "encoder.layers.2.layer_norm1.weight"] = torch.zeros(WIDTH + 1)
    with pytest.raises(CheckpointError) as err:
        text_encoders_from_state_dict(tensors, source="model.safetensors")
    message = str(err.value)
    assert message.startswith("model.safetensors:")
    for key in ("final_layer_norm.bias", "encoder.layers.1.mlp.fc2.weight",
                "encoder.layers.0.self_attn.bogus.weight", "encoder.layers.2.layer_norm1.weight"):
        assert prefix + key in message, key
    assert "missing (2)" in message and "unexpected (1)" in message and "wrong shape (1)" in message
    assert f"[{WIDTH + 1}] (expected [{WIDTH}])" in message


def test_openclip_errors_use_file_names(open_h):
    prefix = "cond_stage_model.model."
    tensors = _open_clip_tensors(open_h, prefix)
    del tensors[prefix + "transformer.resblocks.1.attn.in_proj_bias"]
    tensors[prefix + "transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(3 * WIDTH + 1, WIDTH)
    tensors[prefix + "transformer.resblocks.0.mystery.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        text_encoders_from_state_dict(tensors)
    message = str(err.value)
    assert prefix + "transformer.resblocks.1.attn.in_proj_bias" in message
    assert prefix + "transformer.resblocks.0.attn.in_proj_weight" in message
    assert prefix + "transformer.resblocks.0.mystery.weight" in message


def test_no_text_encoder_and_mixed_layouts_are_errors(clip_l, open_h):
    with pytest.raises(CheckpointError, match="no text encoder"):
        text_encoders_from_state_dict({"model.diffusion_model.out.2.weight": torch.zeros(1)})
    mixed = {**_hf_keys(clip_l, "cond_stage_model.transformer.text_model."),
             **_open_clip_tensors(open_h, "cond_stage_model.model.")}
    with pytest.raises(CheckpointError, match="several layouts"):
        text_encoders_from_state_dict(mixed)
    refiner = _open_clip_tensors(open_h, "conditioner.embedders.0.model.")
    with pytest.raises(CheckpointError, match="unsupported SDXL"):
        text_encoders_from_state_dict(refiner)


def test_missing_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_text_encoder(tmp_path / "nope.safetensors")


def test_diffusers_text_encoder_folder_reads_activation_from_config(tmp_path, open_h):
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    save_file({"text_model." + k: v.clone() for k, v in open_h.state_dict().items()
               if not k.startswith("text_projection")}, folder / "model.safetensors")
    (folder / "config.json").write_text('{"hidden_act": "gelu", "hidden_size": %d}' % WIDTH)
    enc = load_text_encoder(folder)
    model = enc.encoders[0].model
    assert model.config.activation == "gelu"
    with torch.no_grad():
        assert (model(_ids(0)).hidden - open_h(_ids(0)).hidden).abs().max() < TOL


def test_loaded_encoder_encodes_a_prompt(tmp_path, clip_l):
    path = tmp_path / "sd1.safetensors"
    save_file(_hf_keys(clip_l, "cond_stage_model.transformer.text_model."), path)
    enc = load_text_encoder(path)
    cond = enc.encode("a red circle", clip_skip=2)
    assert cond.context.shape == (1, 77, WIDTH) and cond.pooled is None
    row = [BOS] + enc.tokenizer.encode("a red circle") + [EOS_ID]
    ids = torch.tensor([row + [EOS_ID] * (77 - len(row))])  # SD1: padded with EOS
    with torch.no_grad():
        want = clip_l(ids, clip_skip=2).hidden
    assert (cond.context - want).abs().max() < TOL


def test_long_clip_openclip_file_merges_its_two_position_tables(tmp_path):
    # A Long-CLIP-L style checkpoint: OpenAI CLIP-L in OpenCLIP naming at the top level, beside a visual tower,
    # with 248 positions split over positional_embedding (first 20 rows) and positional_embedding_res (rest).
    torch.manual_seed(6)
    config = CLIPTextConfig(vocab_size=49408, width=WIDTH, layers=LAYERS, heads=2, max_positions=248,
                            projection_dim=32)
    model = CLIPTextModel(config).eval()
    tensors = to_open_clip_state_dict(model.state_dict())
    table = tensors["positional_embedding"]
    res = torch.randn(248, WIDTH)
    tensors["positional_embedding_res"] = res
    tensors["visual.conv1.weight"] = torch.zeros(4, 3, 2, 2)
    tensors["visual.transformer.resblocks.0.ln_1.weight"] = torch.zeros(4)
    tensors["logit_scale"] = torch.tensor(4.6)
    path = tmp_path / "longclip.safetensors"
    save_file(tensors, path)
    family, (spec,), ignored = text_encoders_from_state_dict(dict(tensors))
    assert family == "sd1" and spec.model.config.activation == "quick_gelu"  # OpenAI CLIP-L lineage
    got = spec.model.embeddings.position_embedding.weight
    assert torch.equal(got[:20], table[:20]) and torch.equal(got[20:], res[20:])
    assert "visual.conv1.weight" in ignored and "positional_embedding_res" not in ignored
    ids = torch.tensor([[BOS] + [320] * 200 + [EOS_ID] * 47])
    with torch.no_grad():
        assert load_text_encoder(path).encoders[0].model(ids).hidden.shape == (1, 248, WIDTH)


def test_diffusers_style_sd2_tower_keeps_its_layer_when_written_as_ldm(open_h):
    # diffusers' SD2 text_encoder has 23 layers and uses the last; LDM readers take the penultimate of the file.
    spec = EncoderSpec("clip_h", open_h, 0, True, 2, removed_layers=1)
    tensors = text_encoder_to_ldm("sd2", [spec])
    assert f"cond_stage_model.model.transformer.resblocks.{LAYERS}.ln_1.weight" in tensors
    _, (loaded,), _ = text_encoders_from_state_dict(tensors)
    assert loaded.model.config.layers == LAYERS + 1 and loaded.default_clip_skip == 2
    assert loaded.removed_layers == 0
    with torch.no_grad():
        got = loaded.model(_ids(0), clip_skip=2, pooled=True)
        want = open_h(_ids(0), clip_skip=1, pooled=True)
    assert (got.hidden - want.hidden).abs().max() < TOL and (got.pooled - want.pooled).abs().max() < TOL


# -- the layout table, the family table, and the loaders that read them (issue 15) --------------------------------


def test_layout_table_agrees_with_the_family_table():
    from clipdiffusion.checkpoints.text_layouts import HF, TOWER_ACTIVATION, tower_layouts
    from clipdiffusion.families import FAMILIES

    for family in FAMILIES.values():
        towers = tower_layouts(family)
        assert len(towers) == len(family.towers)
        assert [p for layouts in towers for p in (layout.prefix for layout in layouts)] == list(family.text_prefixes)
        for recipe, layouts in zip(family.towers, towers):
            for layout in layouts:  # OpenAI CLIP-L in transformers naming (hidden states only), OpenCLIP H/bigG fused
                assert (layout.naming == HF) == (recipe.name == "clip_l") == (not layout.projection)
            assert TOWER_ACTIVATION[recipe.name] == ("quick_gelu" if recipe.name == "clip_l" else "gelu")
    assert [len(t) for t in tower_layouts(FAMILIES["sd2"])] == [2]  # LDM or SGM form


def test_a_known_family_reads_its_towers_where_the_table_says(clip_l, open_h):
    sgm = _open_clip_tensors(open_h, "conditioner.embedders.0.model.")
    with pytest.raises(CheckpointError, match="unsupported SDXL"):
        text_encoders_from_state_dict(sgm)  # alone, bigG-first is the refiner's layout
    family, (spec,), ignored = text_encoders_from_state_dict(sgm, family="sd2")  # detect.py decided: SD2
    assert family == "sd2"
    assert (spec.name, spec.pad_id, spec.final_norm, spec.default_clip_skip) == ("clip_h", 0, True, 2)
    assert ignored == ["conditioner.embedders.0.model.logit_scale"]  # by its name in the file
    _same(spec.model, open_h, pad=0)
    tiny = text_encoders_from_state_dict(_hf_keys(clip_l, "cond_stage_model.transformer.text_model."), family="tiny")
    assert tiny.family == "tiny" and tiny.encoders[0].pad_id == EOS_ID
    mixed = {**_hf_keys(clip_l, "cond_stage_model.transformer.text_model."), **sgm}
    with pytest.raises(CheckpointError, match="several layouts"):
        text_encoders_from_state_dict(mixed, family="sd1")
    with pytest.raises(CheckpointError, match="no text encoder under conditioner.embedders.0.transformer."):
        text_encoders_from_state_dict(_hf_keys(clip_l, "cond_stage_model.transformer."), family="sdxl")


def test_diffusers_text_folders_load_in_their_own_layout(tmp_path):
    from test_checkpoint_load import tiny_model

    from clipdiffusion.checkpoints.load import load_diffusers
    from clipdiffusion.checkpoints.safetensors_io import load_file
    from clipdiffusion.checkpoints.save import save_diffusers

    model = tiny_model("sdxl")
    folder = save_diffusers(model, tmp_path / "xl", tokenizer=False)
    weights = folder / "text_encoder_2" / "model.safetensors"
    tensors = load_file(weights)
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in tensors  # transformers' names, q/k/v apart
    tensors["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(tensors, weights)
    loaded = load_diffusers(folder)
    assert "text_encoder_2/text_model.embeddings.position_ids" in loaded.ignored_keys
    for spec, back in zip(model.text_encoder.encoders, loaded.text_encoder.encoders, strict=True):
        assert (back.name, back.pad_id, back.final_norm, back.removed_layers) == (spec.name, spec.pad_id, False, 0)
        assert all(torch.equal(v, back.model.state_dict()[k]) for k, v in spec.model.state_dict().items())
    del tensors["text_model.encoder.layers.1.self_attn.k_proj.weight"]  # no fused tensor to fail on: a named key
    tensors["text_model.encoder.layers.0.self_attn.bogus.weight"] = torch.zeros(2)
    save_file(tensors, weights)
    with pytest.raises(CheckpointError) as err:
        load_diffusers(folder)
    message = str(err.value)
    assert "text_encoder_2/text_model.encoder.layers.1.self_attn.k_proj.weight" in message and "missing (1)" in message
    assert "text_encoder_2/text_model.encoder.layers.0.self_attn.bogus.weight" in message
