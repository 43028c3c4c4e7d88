"""LoRA: file layouts and key mapping, the delta maths against independent computations, strictness and hostile
files, the library (names, aliases, folders), application and exact restore through ``Pipeline.generate``, and the
CLI and HTTP surfaces. Parity with diffusers is in tests/test_lora_parity.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clipdiffusion.checkpoints.lora import read_lora
from clipdiffusion.checkpoints.safetensors_io import save_file
from clipdiffusion.errors import CheckpointError, ClipDiffusionError, PromptError
from clipdiffusion.lora import LoraLibrary, LoraNotFound
from clipdiffusion.testing import random_lora, tiny_pipeline

KW = dict(steps=1, seed=3, width=8, height=8)  # tiny on purpose: each call is a whole generation
ATTN2_K = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"  # diffusers down_blocks.0.attentions.0...
KOHYA_ATTN2_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


def _write(tmp_path, name, tensors, metadata=None):
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    return path


def _state(pipe):
    """Every weight of the pipeline, copied."""
    out = {f"unet.{k}": v.clone() for k, v in pipe.unet.state_dict().items()}
    for i, spec in enumerate(pipe.text_encoder.encoders):
        out.update({f"te{i}.{k}": v.clone() for k, v in spec.model.state_dict().items()})
    return out


def _same_bits(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def sd1():
    return tiny_pipeline(0)


# -- mapping and maths --------------------------------------------------------------------------------------------


def test_kohya_sd1_names_are_diffusers_paths_mapped_to_ldm_and_the_delta_is_up_at_down(tmp_path):
    pipe = tiny_pipeline(0)
    g = torch.Generator().manual_seed(0)
    w = pipe.unet.get_parameter(ATTN2_K)  # [out, context width]
    down, up = torch.randn(4, w.shape[1], generator=g), torch.randn(w.shape[0], 4, generator=g)
    q = pipe.text_encoder.encoders[0].model.get_parameter("encoder.layers.1.self_attn.q_proj.weight")
    qd, qu = torch.randn(2, q.shape[1], generator=g), torch.randn(q.shape[0], 2, generator=g)
    path = _write(tmp_path, "hand", {
        f"{KOHYA_ATTN2_K}.lora_down.weight": down, f"{KOHYA_ATTN2_K}.lora_up.weight": up,
        f"{KOHYA_ATTN2_K}.alpha": torch.tensor(2.0),  # rank 4: scale 0.5
        "lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_down.weight": qd,
        "lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_up.weight": qu,  # no alpha: scale 1
    })
    before = _state(pipe)
    assert pipe.load_lora(path) == "hand"
    assert _same_bits(before, _state(pipe))  # registering applies nothing
    pipe.apply_loras([("hand", 0.6, 0.8)])
    after = _state(pipe)
    torch.testing.assert_close(after[f"unet.{ATTN2_K}"], before[f"unet.{ATTN2_K}"] + 0.8 * 0.5 * up @ down,
                               rtol=0, atol=1e-6)
    key = "te0.encoder.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(after[key], before[key] + 0.6 * qu @ qd, rtol=0, atol=1e-6)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"unet.{ATTN2_K}", key}
    pipe.apply_loras(())
    assert _same_bits(before, _state(pipe))


def test_sdxl_kohya_ldm_names_and_peft_names_reach_both_towers(tmp_path):
    pipe = tiny_pipeline(0, "sdxl")
    before = _state(pipe)
    for layout in ("kohya_ldm", "kohya", "peft"):
        tensors = random_lora(pipe, layout=layout, rank=2, seed=1)
        prefixes = {k.split(".")[0].split("_text_model")[0] if k.startswith("lora_te") else k.split(".")[0]
                    for k in tensors}
        if layout == "peft":
            assert {"unet", "text_encoder", "text_encoder_2"} <= prefixes
        else:
            assert {"lora_te1", "lora_te2"} <= prefixes
        pipe.load_lora(_write(tmp_path, layout, tensors))
        pipe.apply_loras([(layout, 1.0, 1.0)])
        after = _state(pipe)
        changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
        assert changed == {"unet", "te0", "te1"}, layout
        targeted = {k for k in before if not torch.equal(before[k], after[k])}
        # every attention / MLP linear and nothing else
        assert all(any(p in k for p in ("attn1.", "attn2.", "ff.net.", "self_attn.", "mlp.")) for k in targeted)
        assert all(k.endswith(".weight") for k in targeted)
    pipe.apply_loras(())
    assert _same_bits(before, _state(pipe))


def test_sd2_openclip_tower_takes_kohya_text_names(tmp_path):
    """SD2's OpenCLIP-H tower is held in transformers names, which is what kohya writes for it (``lora_te_``)."""
    pipe = tiny_pipeline(0, "sd2")
    tensors = random_lora(pipe, rank=2, seed=2, unet=False)
    assert all(k.startswith("lora_te_text_model_encoder_layers_") for k in tensors)
    pipe.load_lora(_write(tmp_path, "sd2", tensors))
    before = _state(pipe)
    pipe.apply_loras([("sd2", 1.0, 1.0)])
    changed = {k for k, v in _state(pipe).items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("te0.encoder.layers.") for k in changed)
    assert len(changed) == len(tensors) // 2
    pipe.apply_loras(())


def test_kohya_and_ldm_spellings_and_peft_give_the_same_weights(tmp_path, sd1):
    """One set of factors written three ways (diffusers-path kohya, LDM-path kohya, PEFT) merges identically."""
    results = []
    for layout in ("kohya", "kohya_ldm", "peft"):
        sd1.load_lora(_write(tmp_path, f"same-{layout}", random_lora(sd1, layout=layout, rank=3, seed=5)))
        sd1.apply_loras([(f"same-{layout}", 0.9, 1.1)])
        results.append(_state(sd1))
    sd1.apply_loras(())
    assert _same_bits(results[0], results[1]) and _same_bits(results[0], results[2])


def test_conv_3x3_locon_delta_is_up_at_down_reshaped(tmp_path):
    pipe = tiny_pipeline(0)
    g = torch.Generator().manual_seed(2)
    names = {"lora_unet_conv_in": "input_blocks.0.0.weight",  # 3x3, diffusers name
             "lora_unet_input_blocks_1_0_in_layers_2": "input_blocks.1.0.in_layers.2.weight",  # 3x3, LDM name
             "lora_unet_down_blocks_0_downsamplers_0_conv": "input_blocks.2.0.op.weight"}  # 3x3 stride 2
    tensors, factors = {}, {}
    for key, param in names.items():
        w = pipe.unet.get_parameter(param)
        out, cin, kh, kw = w.shape
        down = torch.randn(3, cin, kh, kw, generator=g) * 0.1
        up = torch.randn(out, 3, 1, 1, generator=g) * 0.1
        tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(6.0)})
        factors[param] = (down, up)
    pipe.load_lora(_write(tmp_path, "locon", tensors))
    before = _state(pipe)
    pipe.apply_loras([("locon", 1.0, 0.5)])
    for param, (down, up) in factors.items():
        w = before[f"unet.{param}"]
        expected = w + 0.5 * 2.0 * (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(w.shape)
        torch.testing.assert_close(pipe.unet.get_parameter(param).detach(), expected, rtol=0, atol=1e-6)
    pipe.apply_loras(())


def test_lora_mid_cp_decomposition_against_a_loop(tmp_path):
    pipe = tiny_pipeline(0)
    param = "input_blocks.0.0.weight"
    w = pipe.unet.get_parameter(param).detach().clone()
    out, cin, kh, kw = w.shape
    g = torch.Generator().manual_seed(4)
    down = torch.randn(2, cin, 1, 1, generator=g)
    mid = torch.randn(2, 2, kh, kw, generator=g)
    up = torch.randn(out, 2, 1, 1, generator=g)
    key = "lora_unet_conv_in"
    pipe.load_lora(_write(tmp_path, "cp", {f"{key}.lora_down.weight": down, f"{key}.lora_mid.weight": mid,
                                           f"{key}.lora_up.weight": up}))
    pipe.apply_loras([("cp", 1.0, 1.0)])
    expected = w.clone()
    for a in range(2):
        for b in range(2):
            expected += up[:, a, 0, 0][:, None, None, None] * mid[a, b][None, None] * down[b, :, 0, 0][None, :, None,
                                                                                                       None]
    torch.testing.assert_close(pipe.unet.get_parameter(param).detach(), expected, rtol=0, atol=1e-5)
    pipe.apply_loras(())


@pytest.mark.parametrize("alpha, scale", [(None, 1.0), (0.0, 1.0), (2.0, 0.5), (8.0, 2.0)])
def test_alpha_over_rank_with_missing_or_zero_alpha_as_rank(tmp_path, sd1, alpha, scale):
    tensors = random_lora(sd1, rank=4, seed=6, alpha=alpha, select=lambda p: p == ATTN2_K, text=False)
    name = f"alpha-{alpha}"
    sd1.load_lora(_write(tmp_path, name, tensors))
    before = sd1.unet.get_parameter(ATTN2_K).detach().clone()
    sd1.apply_loras([(name, 1.0, 1.0)])
    up, down = tensors[f"{KOHYA_ATTN2_K}.lora_up.weight"], tensors[f"{KOHYA_ATTN2_K}.lora_down.weight"]
    torch.testing.assert_close(sd1.unet.get_parameter(ATTN2_K).detach(), before + scale * up @ down, rtol=0,
                               atol=1e-6)
    sd1.apply_loras(())


def test_dyn_keeps_the_first_ranks(tmp_path, sd1):
    tensors = random_lora(sd1, rank=4, seed=7, alpha=4.0, select=lambda p: p == ATTN2_K, text=False)
    sd1.load_lora(_write(tmp_path, "dyn", tensors))
    before = sd1.unet.get_parameter(ATTN2_K).detach().clone()
    sd1.apply_loras([("dyn", 1.0, 1.0, 2)])
    up, down = tensors[f"{KOHYA_ATTN2_K}.lora_up.weight"], tensors[f"{KOHYA_ATTN2_K}.lora_down.weight"]
    torch.testing.assert_close(sd1.unet.get_parameter(ATTN2_K).detach(), before + up[:, :2] @ down[:2], rtol=0,
                               atol=1e-6)
    sd1.apply_loras(())


def test_half_precision_weights_merge_in_float32_and_restore_exactly(tmp_path):
    pipe = tiny_pipeline(0)
    pipe.unet.half()
    tensors = random_lora(pipe, rank=4, seed=8, text=False, dtype=torch.float16)
    pipe.load_lora(_write(tmp_path, "half", tensors))
    before = _state(pipe)
    pipe.apply_loras([("half", 1.0, 0.75)])
    up, down = (tensors[f"{KOHYA_ATTN2_K}.lora_{p}.weight"].float() for p in ("up", "down"))
    exact = before[f"unet.{ATTN2_K}"].float() + 0.75 * up @ down
    got = pipe.unet.get_parameter(ATTN2_K).detach()
    assert got.dtype == torch.float16
    # one rounding from float32: within half a float16 ulp of the exact sum (2**-11 relative)
    assert bool(((got.float() - exact).abs() <= exact.abs() * 2**-11 + 2**-25).all())
    pipe.apply_loras(())
    assert _same_bits(before, _state(pipe))


def test_channels_last_weights_merge_and_restore_exactly(tmp_path):
    pipe = tiny_pipeline(0)
    pipe.unet.to(memory_format=torch.channels_last)
    conv = "input_blocks.1.0.in_layers.2.weight"
    assert not pipe.unet.get_parameter(conv).is_contiguous()
    tensors = random_lora(pipe, rank=2, seed=9, select=lambda p: p == conv, text=False)
    pipe.load_lora(_write(tmp_path, "nhwc", tensors))
    before = _state(pipe)
    pipe.apply_loras([("nhwc", 1.0, 1.0)])
    key = "lora_unet_down_blocks_0_resnets_0_conv1"
    up, down = tensors[f"{key}.lora_up.weight"], tensors[f"{key}.lora_down.weight"]
    w = before[f"unet.{conv}"]
    expected = w + (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    torch.testing.assert_close(pipe.unet.get_parameter(conv).detach(), expected, rtol=0, atol=1e-6)
    pipe.apply_loras(())
    assert _same_bits(before, _state(pipe))


# -- application through generate: exact restore, order, tags, request field ---------------------------------------


@pytest.mark.slow
def test_any_sequence_of_lora_requests_then_none_is_bit_identical_to_a_fresh_pipeline(tmp_path):
    full = dict(steps=2, seed=3, width=16, height=16)
    fresh = tiny_pipeline(0).generate("a red circle", "blurry", **full).pixels
    pipe = tiny_pipeline(0)
    for i in range(3):
        pipe.load_lora(_write(tmp_path, f"l{i}", random_lora(pipe, rank=4, seed=10 + i, alpha=3.0, std=0.2)))
    original = _state(pipe)
    ab = pipe.generate("a red circle <lora:l0:0.8> <lora:l1:0.5:1.2>", "blurry", **KW)
    ab_state = _state(pipe)
    ba = pipe.generate("a red circle <lora:l1:0.5:1.2> <lora:l0:0.8>", "blurry", **KW)
    assert not ab.notes and not ba.notes
    for k, v in _state(pipe).items():  # order only changes float rounding in the sum
        torch.testing.assert_close(v, ab_state[k], rtol=0, atol=1e-6)
    assert sum(not torch.equal(v, original[k]) for k, v in ab_state.items()) > 20
    pipe.generate("a red circle", "blurry", **KW, loras=[("l2", 1.0, 0.3)])
    pipe.generate("a red circle <lora:l0:-1>", "blurry", **KW)
    again = pipe.generate("a red circle", "blurry", **full).pixels
    np.testing.assert_array_equal(again, fresh)
    assert _same_bits(_state(pipe), original)
    assert pipe._lora_engine().backups == {}  # nothing held once no LoRA is applied


@pytest.mark.slow
def test_deltas_add_and_the_request_field_equals_the_tag(tmp_path, sd1):
    for name, seed in (("p", 20), ("q", 21)):
        sd1.load_lora(_write(tmp_path, name, random_lora(sd1, rank=2, seed=seed, std=0.2)))
    base = _state(sd1)
    sd1.apply_loras([("p", 1.0, 1.0)])
    dp = {k: v - base[k] for k, v in _state(sd1).items()}
    sd1.apply_loras([("q", 1.0, 1.0)])
    dq = {k: v - base[k] for k, v in _state(sd1).items()}
    sd1.apply_loras([("p", 1.0, 1.0), ("q", 1.0, 1.0)])
    both = _state(sd1)
    for k in base:
        torch.testing.assert_close(both[k], base[k] + dp[k] + dq[k], rtol=0, atol=1e-6)
    tag = sd1.generate("x <lora:p:0.7:0.4>", **KW)
    field = sd1.generate("x", loras=[("p", 0.7, 0.4)], **KW)
    np.testing.assert_array_equal(tag.pixels, field.pixels)
    te_only = sd1.generate("x <lora:p:1:0>", **KW).pixels
    unet_only = sd1.generate("x <lora:p:0:1>", **KW).pixels
    plain = sd1.generate("x", **KW).pixels
    assert np.abs(te_only - plain).max() > 0 and np.abs(unet_only - plain).max() > 0
    assert np.abs(te_only - unet_only).max() > 0


def test_an_unchanged_set_does_no_work(tmp_path, sd1, monkeypatch):
    from clipdiffusion.checkpoints import lora as lora_module

    sd1.load_lora(_write(tmp_path, "same", random_lora(sd1, rank=2, seed=30)))
    sd1.apply_loras([("same", 1.0, 1.0)])
    calls = []
    real = lora_module.add_delta
    monkeypatch.setattr(lora_module, "add_delta", lambda *a, **k: calls.append(1) or real(*a, **k))
    sd1.apply_loras([("same", 1.0, 1.0)])
    assert calls == []
    sd1.apply_loras([("same", 1.0, 0.5)])
    assert calls
    sd1.apply_loras(())


def test_negative_prompt_tags_are_text_and_only_positive_tags_apply(tmp_path, sd1):
    sd1.load_lora(_write(tmp_path, "neg", random_lora(sd1, rank=2, seed=31, std=0.3)))
    plain = sd1.generate("x", "<lora:neg:1> y", **KW).pixels
    assert not sd1._lora_engine().backups  # the negative's tag applied nothing
    assert np.abs(sd1.generate("x <lora:neg:1>", "<lora:neg:1> y", **KW).pixels - plain).max() > 0


def test_infotext_records_a1111_lora_hashes(tmp_path, sd1):
    import hashlib

    path = _write(tmp_path, "hashed", random_lora(sd1, rank=2, seed=33))
    sd1.load_lora(path)
    data = path.read_bytes()
    addnet = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]  # after the header
    from clipdiffusion.request import GenerationRequest

    r = sd1.generate(GenerationRequest(prompt="x <lora:hashed:0.5>", n_iter=2, **KW))
    assert len(r.infotexts) == 2
    assert all(t.endswith(f', Lora hashes: "hashed: {addnet}"') for t in r.infotexts)
    assert "Lora hashes" not in sd1.generate("x", **KW).infotexts[0]


def test_request_field_loras_are_written_as_tags_and_the_infotext_reproduces_the_image(tmp_path, sd1):
    from clipdiffusion.infotext import from_infotext

    sd1.load_lora(_write(tmp_path, "field", random_lora(sd1, rank=2, seed=34, std=0.2)))
    first = sd1.generate("x", loras=[("field", 0.7, 0.4)], seed=5, **{k: v for k, v in KW.items() if k != "seed"})
    text = first.infotexts[0]
    assert text.startswith("x <lora:field:0.7:0.4>\n")
    again = sd1.generate(from_infotext(text))
    np.testing.assert_array_equal(again.pixels, first.pixels)


def test_unknown_names_error_or_note(tmp_path, sd1):
    sd1.load_lora(_write(tmp_path, "known", random_lora(sd1, rank=2, seed=32)))
    with pytest.raises(LoraNotFound, match=r"'nope' not found; available: .*known"):
        sd1.generate("x <lora:nope:1>", **KW)
    with pytest.raises(LoraNotFound, match="'gone'"):
        sd1.generate("x", loras=[("gone", 1.0, 1.0)], **KW)
    r = sd1.generate("x <lora:nope:1> <lora:known:1>", missing_loras="note", **KW)
    assert "Lora not found: nope" in r.notes
    with pytest.raises(PromptError, match="not a number"):
        sd1.generate("x <lora:known:abc>", **KW)
    r = sd1.generate("x <lora:known:abc>", missing_loras="note", **KW)  # A1111: no tag of the prompt loads
    assert any("no LoRA tag of the prompt applied" in n for n in r.notes)
    with pytest.raises(ClipDiffusionError, match="missing_loras"):
        sd1.generate("x", missing_loras="maybe", **KW)


# -- strictness and hostile files -----------------------------------------------------------------------------------


def _good(pipe):
    return random_lora(pipe, rank=2, seed=40, select=lambda p: p == ATTN2_K, text=False)


def _hostile_cases(pipe):
    good = _good(pipe)
    d, u = f"{KOHYA_ATTN2_K}.lora_down.weight", f"{KOHYA_ATTN2_K}.lora_up.weight"
    nan = good[d].clone()
    nan[0, 0] = float("nan")
    inf = good[u].clone()
    inf[0, 0] = float("inf")
    return {
        "wrong-shape": ({**good, d: torch.zeros(2, good[d].shape[1] + 1)}, "does not fit"),
        "wrong-out": ({**good, u: torch.zeros(good[u].shape[0] + 2, 2)}, "outputs"),
        "nan": ({**good, d: nan}, "non-finite"),
        "inf": ({**good, u: inf}, "non-finite"),
        "rank0": ({d: torch.zeros(0, good[d].shape[1]), u: torch.zeros(good[u].shape[0], 0)}, "rank 0"),
        "rank-mismatch": ({**good, u: torch.zeros(good[u].shape[0], 3)}, "ranks"),
        "no-up": ({d: good[d]}, "no up factor"),
        "no-down": ({u: good[u]}, "no down factor"),
        "int": ({**good, d: torch.zeros(good[d].shape, dtype=torch.int32)}, "floating point"),
        "unknown-key": ({**good, "lora_unet_nowhere_at_all.lora_down.weight": torch.zeros(2, 4),
                         "lora_unet_nowhere_at_all.lora_up.weight": torch.zeros(4, 2)}, "match nothing"),
        "loha": ({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, "LoHa"),
        "alpha-vector": ({**good, f"{KOHYA_ATTN2_K}.alpha": torch.ones(3)}, "one value"),
        "mixed-names": ({f"{KOHYA_ATTN2_K}.lora_A.weight": good[d], u: good[u]}, "mixes"),
        "up-3x3": ({**good, u: torch.zeros(good[u].shape[0], 2, 3, 3)}, "1x1"),
        "one-dim": ({**good, d: torch.zeros(5)}, "2-D"),
    }


def test_hostile_lora_files_are_checkpoint_errors_naming_the_file(tmp_path, sd1):
    for name, (tensors, reason) in _hostile_cases(sd1).items():
        path = _write(tmp_path, name, tensors)
        with pytest.raises(CheckpointError, match=reason) as info:
            sd1.load_lora(path)
        assert str(path) in str(info.value) and isinstance(info.value, ValueError), name
    assert not sd1._lora_engine().backups


def test_pickles_empty_files_and_broken_headers_are_refused(tmp_path, sd1):
    pt = tmp_path / "evil.pt"
    torch.save({"x": torch.zeros(1)}, pt)
    with pytest.raises(CheckpointError, match="pickled"):
        sd1.load_lora(pt)
    with pytest.raises(CheckpointError, match="pickled"):
        read_lora(pt)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        sd1.load_lora(junk)
    empty = _write(tmp_path, "empty", {})
    with pytest.raises(CheckpointError, match="no tensors"):
        sd1.load_lora(empty)
    with pytest.raises(CheckpointError, match="no such LoRA file"):
        sd1.load_lora(tmp_path / "missing.safetensors")


def test_a_broken_file_in_a_folder_fails_when_used_naming_it(tmp_path, sd1):
    folder = tmp_path / "loras"
    folder.mkdir()
    tensors, _ = _hostile_cases(sd1)["nan"]
    _write(folder, "bad", tensors)
    pipe = tiny_pipeline(0)
    assert pipe.load_loras(folder) == ["bad"]  # listed, not read yet
    with pytest.raises(CheckpointError, match=r"bad\.safetensors.*non-finite"):
        pipe.generate("x <lora:bad:1>", **KW)
    assert not pipe._lora_engine().backups


# -- library ---------------------------------------------------------------------------------------------------------


def test_library_names_aliases_metadata_refresh(tmp_path, sd1):
    folder = tmp_path / "loras"
    (folder / "sub").mkdir(parents=True)
    good = _good(sd1)
    _write(folder, "one", good, {"ss_output_name": "first", "ss_tag_frequency": json.dumps({"a": {"b": 2}}),
                                 "ss_network_dim": "2"})
    _write(folder / "sub", "two", good, {"ss_output_name": "shared"})
    _write(folder, "three", good, {"ss_output_name": "shared"})
    library = LoraLibrary([folder])
    assert library.names() == ["one", "three", "two"]
    one = library.get("first")  # a unique alias
    assert one.name == "one" and one.describe() == {
        "name": "one", "alias": "first", "path": "one.safetensors",
        "metadata": {"ss_output_name": "first", "ss_tag_frequency": {"a": {"b": 2}}, "ss_network_dim": "2"}}
    assert library.get("two").describe()["path"] == "sub/two.safetensors"  # relative: no server path leaves
    with pytest.raises(LoraNotFound, match="shared"):  # a colliding alias names nothing (A1111's rule)
        library.get("shared")
    assert len(one.shorthash) == 12 and one.shorthash == library.get("three").shorthash  # same tensors
    _write(folder, "four", good)
    assert "four" not in library.names()
    library.refresh()
    assert "four" in library.names()
    with pytest.raises(ClipDiffusionError, match="not a folder"):
        LoraLibrary([tmp_path / "nowhere"])


# -- CLI and HTTP ----------------------------------------------------------------------------------------------------


def test_cli_generate_loras_folder_and_lora_option(tmp_path, capsys, monkeypatch):
    from PIL import Image

    from clipdiffusion import cli
    from clipdiffusion.commands import generate as command

    folder = tmp_path / "loras"
    folder.mkdir()
    _write(folder, "style", random_lora(tiny_pipeline(0), rank=2, seed=50, std=0.3))
    monkeypatch.setattr(command, "load_pipeline", lambda *args, **kwargs: tiny_pipeline(0))
    args = ["--steps", "1", "--seed", "1", "--width", "16", "--height", "16"]

    def run(*extra, out="x.png"):
        code = cli.main(["generate", *args, *extra, "-o", str(tmp_path / out)])
        return code, capsys.readouterr().err

    assert run("a cat", out="plain.png")[0] == 0
    assert run("a cat <lora:style:0.8>", "--loras", str(folder), out="tag.png")[0] == 0
    assert run("a cat", "--loras", str(folder), "--lora", "style:0.8", out="option.png")[0] == 0
    pixels = {n: np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("plain", "tag", "option")}
    assert np.array_equal(pixels["tag"], pixels["option"]) and not np.array_equal(pixels["tag"], pixels["plain"])
    code, err = run("a cat <lora:other:1>", "--loras", str(folder))
    assert code == 2 and "LoRA 'other' not found; available: style" in err
    code, err = run("a cat", "--lora", "style:x")
    assert code == 2 and "--lora 'style:x'" in err
    code, err = run("a cat", "--loras", str(tmp_path / "nowhere"))
    assert code == 2 and "nowhere" in err


def _pixels(response: dict) -> bytes:
    import base64
    import io

    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(response["images"][0]))).tobytes()


def test_server_lists_refreshes_and_applies_loras(tmp_path):
    from fastapi.testclient import TestClient

    from clipdiffusion.server.app import create_app
    from clipdiffusion.server.settings import ModelEntry, ServerSettings

    folder = tmp_path / "loras"
    folder.mkdir()
    pipe = tiny_pipeline(0)
    _write(folder, "style", random_lora(pipe, rank=2, seed=51, std=0.3), {"ss_output_name": "Style v1",
                                                                           "ss_dataset_dirs": '{"a": {"n": 3}}'})
    settings = ServerSettings(models=(ModelEntry("tiny"),), lora_dirs=(str(folder),))
    body = {"steps": 1, "seed": 4, "width": 16, "height": 16}
    with TestClient(create_app(lambda name: pipe, settings)) as client:
        listed = client.get("/sdapi/v1/loras").json()
        assert listed == [{"name": "style", "alias": "Style v1", "path": "style.safetensors",
                           "metadata": {"ss_output_name": "Style v1", "ss_dataset_dirs": {"a": {"n": 3}}}}]
        plain = client.post("/sdapi/v1/txt2img", json={**body, "prompt": "a cat"}).json()
        tagged = client.post("/sdapi/v1/txt2img", json={**body, "prompt": "a cat <lora:style:1>"}).json()
        assert _pixels(tagged) != _pixels(plain)
        missing = client.post("/sdapi/v1/txt2img", json={**body, "prompt": "a cat <lora:nope:1>"})
        assert missing.status_code == 200  # A1111: generation goes on, the comments say why
        info = json.loads(missing.json()["info"])
        assert info["comments"] == "Lora not found: nope\n"
        assert _pixels(missing.json()) == _pixels(plain)  # and the model is back as it was
        ours = client.post("/api/generate", json={"prompt": "a cat <lora:nope:1>", "steps": 1})
        assert ours.status_code == 422 and "'nope' not found" in ours.text
        own = {"prompt": "a cat", "steps": 1, "seed": 4, "width": 16, "height": 16}
        field = client.post("/api/generate", json={**own, "loras": [["style", 1, 1]]})
        tag = client.post("/api/generate", json={**own, "prompt": "a cat <lora:style:1>"})
        assert field.status_code == 200 and _pixels(field.json()) == _pixels(tag.json()) == _pixels(tagged)
        bad = client.post("/api/generate", json={**own, "loras": [["style", "x", 1]]})
        assert bad.status_code == 422 and "loras" in bad.text
        unknown = client.post("/api/generate", json={**own, "loras": [["nope", 1, 1]]})
        assert unknown.status_code == 422 and "'nope' not found; available: style" in unknown.text
        _write(folder, "later", random_lora(pipe, rank=2, seed=52))
        assert [e["name"] for e in client.get("/sdapi/v1/loras").json()] == ["style"]
        assert client.post("/sdapi/v1/refresh-loras").status_code == 200
        assert [e["name"] for e in client.get("/sdapi/v1/loras").json()] == ["later", "style"]
        again = client.post("/sdapi/v1/txt2img", json={**body, "prompt": "a cat <lora:later:1>"})
        assert again.status_code == 200 and json.loads(again.json()["info"])["comments"] == ""
