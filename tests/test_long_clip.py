"""Long-CLIP and other CLIP-L replacements (issue 18 part 3): a text tower from a file replaces a one-tower model's.

Files are random towers written in the layouts real ones use: Long-CLIP's ``longclip-L.pt`` (a whole OpenAI-CLIP
state dict with ``positional_embedding`` + ``positional_embedding_res`` [248, D], a visual tower, scalars), a
transformers ``CLIPTextModel``/``CLIPModel`` ``save_pretrained`` folder (``max_position_embeddings: 248``), an SD1
checkpoint's ``cond_stage_model.transformer.`` prefix. The OpenAI layout is written here by hand (q/k/v fused in
rows, ``text_projection`` as x @ P), independently of the loader's own table.

Parity tolerance: 1e-4 max abs difference (fp32) against transformers' CLIPTextModel on the same weights.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from clipdiffusion.checkpoints.safetensors_io import save_file
from clipdiffusion.checkpoints.text_encoders import (
    MAX_TEXT_POSITIONS,
    load_replacement_text_encoder,
    load_text_encoder,
)
from clipdiffusion.errors import CheckpointError, ClipDiffusionError
from clipdiffusion.text.clip import CLIPTextConfig, CLIPTextModel

TOL = 1e-4
BOS, EOS = 49406, 49407
LONG = 248
# about 200 CLIP tokens: more than two 75-token chunks, one 246-token Long-CLIP window
PROMPT = ", ".join(f"a {c} {s} beside a {d} {t}" for c, s, d, t in [
    ("red", "circle", "blue", "square"), ("green", "triangle", "yellow", "star"), ("purple", "ring", "white", "cross"),
    ("orange", "heart", "black", "moon"), ("pink", "square", "grey", "circle"), ("brown", "star", "teal", "triangle"),
] * 4)  # fmt: skip


def _perturbed(model, seed, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


def _ours(width=32, layers=2, heads=1, positions=LONG, seed=0, projection=None):
    torch.manual_seed(seed)
    config = CLIPTextConfig(width=width, layers=layers, heads=heads, max_positions=positions,
                            projection_dim=projection)
    return _perturbed(CLIPTextModel(config), seed)


def openai_state_dict(model, *, long_clip=True, visual=True):
    """Our tower as a whole OpenAI-CLIP state dict (Long-CLIP's ``longclip-L.pt``): written by hand."""
    sd = model.state_dict()
    out = {"token_embedding.weight": sd["embeddings.token_embedding.weight"].clone(),
           "ln_final.weight": sd["final_layer_norm.weight"].clone(),
           "ln_final.bias": sd["final_layer_norm.bias"].clone()}  # fmt: skip
    table = sd["embeddings.position_embedding.weight"]
    if long_clip:  # rows 0..19 from positional_embedding, 20.. from positional_embedding_res (its mask1/mask2)
        junk = torch.full_like(table, 7.0)
        out["positional_embedding"] = torch.cat([table[:20], junk[20:]])
        out["positional_embedding_res"] = torch.cat([junk[:20], table[20:]])
    else:
        out["positional_embedding"] = table.clone()
    for n in range(model.config.layers):
        ours, theirs = f"encoder.layers.{n}.", f"transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            out[theirs + f"attn.in_proj_{kind}"] = torch.cat(
                [sd[ours + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):  # fmt: skip
                out[theirs + f"{b}.{kind}"] = sd[ours + f"{a}.{kind}"].clone()
    width = model.config.width
    if "text_projection.weight" in sd:
        out["text_projection"] = sd["text_projection.weight"].t().contiguous()  # OpenAI: x @ P
    else:
        out["text_projection"] = torch.eye(width)
    if visual:
        out.update({"visual.conv1.weight": torch.randn(8, 3, 4, 4), "visual.class_embedding": torch.randn(8),
                    "visual.transformer.resblocks.0.ln_1.weight": torch.ones(8), "visual.proj": torch.randn(8, width),
                    "logit_scale": torch.tensor(4.6052), "input_resolution": torch.tensor(224),
                    "context_length": torch.tensor(LONG), "vocab_size": torch.tensor(49408)})  # fmt: skip
    return out


def _ids(tokenizer, text, positions=LONG, pad=EOS):
    tokens = tokenizer.encode(text)[: positions - 2]
    row = [BOS, *tokens, EOS]
    return torch.tensor([row + [pad] * (positions - len(row))])


@pytest.fixture(scope="module")
def tokenizer():
    from clipdiffusion.text.tokenizer import CLIPTokenizer

    return CLIPTokenizer()


# -- parity with transformers at 248 positions -----------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_long(tmp_path_factory):
    """A transformers CLIPTextModel at max_position_embeddings=248, saved with save_pretrained (its real layout)."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=128, intermediate_size=512,
                                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=LONG,
                                         hidden_act="quick_gelu", bos_token_id=BOS, eos_token_id=EOS)  # fmt: skip
    torch.manual_seed(11)
    model = _perturbed(transformers.CLIPTextModel(config), 11, scale=0.02)
    folder = tmp_path_factory.mktemp("longclip-hf") / "text_encoder"
    model.save_pretrained(folder)
    return model, folder


def test_hf_long_clip_matches_transformers_in_one_window(hf_long, tokenizer):
    reference, folder = hf_long
    enc = load_replacement_text_encoder(folder, "sd1")
    assert enc.positions == LONG and enc.encoders[0].model.config.heads == 2  # heads from config.json
    cond = enc.encode(PROMPT)
    plan = cond.plan
    n_tokens = len(tokenizer.encode(PROMPT))
    assert 150 < n_tokens <= 246
    assert len(plan.windows) == 1 and plan.positions == LONG  # one window: no 75-token chunks
    assert cond.context.shape == (1, LONG, 128) and cond.report.prompt.summary() == f"{n_tokens}/246"
    ids = _ids(tokenizer, PROMPT)
    with torch.no_grad():
        want = reference(ids, output_hidden_states=True)
        got = enc.encoders[0].model(ids, pooled=True)
        skip2 = enc.encoders[0].model(ids, clip_skip=2)
        final_ln = getattr(reference, "text_model", reference).final_layer_norm  # transformers 5 is flat
        want2 = final_ln(want.hidden_states[-2])
    assert (cond.context[0] - want.last_hidden_state[0]).abs().max() < TOL
    assert (got.pooled - want.pooler_output).abs().max() < TOL  # the final-LN state at the first EOS
    assert (skip2.hidden - want2).abs().max() < TOL


def test_openai_layout_file_gives_the_hf_file_output(hf_long, tmp_path, tokenizer):
    reference, folder = hf_long
    from_hf = load_replacement_text_encoder(folder, "sd1")
    pt = tmp_path / "longclip-L.pt"
    torch.save(openai_state_dict(from_hf.encoders[0].model), pt)
    from_pt = load_replacement_text_encoder(pt, "sd1")
    model = from_pt.encoders[0].model
    assert model.config.max_positions == LONG and model.config.activation == "quick_gelu"
    ids = _ids(tokenizer, PROMPT)
    with torch.no_grad():
        want = reference(ids).last_hidden_state
        got = model(ids).hidden
    assert (got - want).abs().max() < TOL
    assert torch.equal(from_pt.encode(PROMPT).context, from_hf.encode(PROMPT).context)


def test_clip_model_folder_reads_text_config(tmp_path, tokenizer):
    # zer0int-style whole CLIPModel: text_model.* beside vision_model.*, config.json with a nested text_config
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    text = dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=LONG, hidden_act="quick_gelu", bos_token_id=BOS, eos_token_id=EOS)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=16)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    torch.manual_seed(5)
    model = _perturbed(transformers.CLIPModel(config), 5, scale=0.02)
    model.save_pretrained(tmp_path / "LongCLIP-L")
    enc = load_replacement_text_encoder(tmp_path / "LongCLIP-L", "sd1")
    assert enc.encoders[0].model.config.heads == 4 and enc.positions == LONG
    ids = _ids(tokenizer, PROMPT)
    with torch.no_grad():
        want = model.text_model(ids).last_hidden_state
    assert (enc.encode(PROMPT).context - want).abs().max() < TOL


# -- long prompts with a 248-position tower: every strategy uses the tower's own window ------------------------


@pytest.fixture(scope="module")
def long_encoder():
    from clipdiffusion.testing import tiny_pipeline

    pipe = tiny_pipeline()
    from clipdiffusion.text.conditioning import EncoderSpec, TextEncoder

    spec = pipe.text_encoder.encoders[0]
    long = EncoderSpec(spec.name, _ours(positions=LONG, seed=3), spec.pad_id, spec.final_norm, spec.default_clip_skip)
    return TextEncoder("sd1", [long])


def test_strategies_use_the_towers_window(long_encoder, tokenizer):
    enc = long_encoder
    text = PROMPT + ", " + PROMPT  # ~400 tokens
    n = len(tokenizer.encode(text))
    chunked = enc.plan(text, "chunk")
    assert [len(w.tokens) for w in chunked.windows][0] <= 246 and sum(len(w.tokens) for w in chunked.windows) == n
    assert len(chunked.windows) == 2 and all(w.positions == LONG for w in chunked.windows)
    assert {c.capacity for c in chunked.report.chunks} == {246}
    truncated = enc.plan(text, "truncate")
    assert len(truncated.windows[0].tokens) == 246 and truncated.report.dropped_tokens == n - 246
    windowed = enc.plan(text, "window")
    assert len(windowed.rows) % LONG == 0 and all(w.positions == LONG for w in windowed.windows)
    stretched = enc.plan(text, "stretch")
    assert stretched.positions == LONG and len(stretched.windows) == 1
    # a short prompt is the same single window under every strategy
    assert {len(enc.plan("a red circle", s).rows) for s in ("chunk", "truncate", "window", "stretch")} == {LONG}


def test_stretch_on_a_long_tower_uses_its_own_table(long_encoder, tokenizer):
    enc = long_encoder
    spec = enc.encoders[0]
    cond = enc.encode(PROMPT, long_prompt="stretch")
    with torch.no_grad():
        want = spec.model(_ids(tokenizer, PROMPT)).hidden  # its learned 248-row table, nothing stretched
    assert (cond.context - want).abs().max() < 1e-5
    chunked = enc.encode(PROMPT, long_prompt="chunk")
    assert torch.equal(chunked.context, cond.context)  # ~200 tokens: chunk is the same one window


def test_chunk_windows_and_padding_follow_the_tower(long_encoder, tokenizer):
    enc = long_encoder
    text = PROMPT + " BREAK a cat"
    cond = enc.encode(text, "a dog")
    assert cond.context_lengths == (2 * LONG, LONG)
    assert cond.context.shape == cond.negative_context.shape == (1, 2 * LONG, 32)  # padded by one empty window
    spec = enc.encoders[0]
    with torch.no_grad():
        second = spec.model(_ids(tokenizer, "a cat")).hidden[0]
        empty = spec.model(_ids(tokenizer, "")).hidden[0]
    assert (cond.context[0, LONG:] - second).abs().max() < 1e-5
    assert (cond.negative_context[0, LONG:] - empty).abs().max() < 1e-5


def test_stretch_on_a_77_tower_still_stretches():
    from clipdiffusion.testing import tiny_pipeline

    enc = tiny_pipeline().text_encoder
    assert enc.positions == 77
    assert enc.encode(PROMPT, long_prompt="stretch").context.shape == (1, LONG, 32)
    assert enc.plan(PROMPT).windows[0].positions == 77


# -- the pipeline -------------------------------------------------------------------------------------------------


def _hf_folder(model, folder, heads):
    """Our tower saved as a transformers CLIPTextModel folder (model.safetensors + config.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"text_model." + k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    c = model.config
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["CLIPTextModel"], "hidden_size": c.width, "num_hidden_layers": c.layers,
        "num_attention_heads": heads, "max_position_embeddings": c.max_positions, "hidden_act": c.activation,
        "vocab_size": c.vocab_size, "layer_norm_eps": c.layer_norm_eps}))  # fmt: skip
    return folder


def test_a_77_position_replacement_behaves_like_the_original(tmp_path):
    from clipdiffusion.testing import tiny_pipeline

    pipe, original = tiny_pipeline(), tiny_pipeline()
    tower = original.text_encoder.encoders[0].model
    pipe.replace_text_encoder(_hf_folder(tower, tmp_path / "clip-l-finetune", heads=tower.config.heads))
    kw = dict(steps=2, seed=3, width=32, height=32)
    a, b = pipe.generate(PROMPT, "blurry", **kw), original.generate(PROMPT, "blurry", **kw)
    assert abs(a.pixels - b.pixels).max() < 1e-5
    assert a.infotexts == b.infotexts  # A1111 has no key for it ...
    assert any("clip-l-finetune" in n and "77 positions" in n for n in a.notes)  # ... the notes name it
    assert not any("text encoder" in n for n in b.notes)


def test_long_clip_pt_in_a_pipeline_uses_one_window(tmp_path, tokenizer):
    from clipdiffusion.testing import tiny_pipeline

    pipe = tiny_pipeline()
    long = _ours(positions=LONG, seed=4)
    path = tmp_path / "longclip-L.pt"
    torch.save(openai_state_dict(long), path)
    pipe.replace_text_encoder(path)
    assert pipe.text_encoder.positions == LONG and pipe.text_encoder.family == "sd1"
    cond = pipe.text_encoder.encode(PROMPT)
    assert len(cond.plan.windows) == 1 and cond.context.shape == (1, LONG, 32)
    with torch.no_grad():
        want = long(_ids(tokenizer, PROMPT)).hidden
    assert (cond.context - want).abs().max() < TOL
    result = pipe.generate(PROMPT, steps=1, seed=1, width=32, height=32)
    assert result.image.size == (32, 32)
    assert any("longclip-L.pt (248 positions, 246 tokens per window)" in n for n in result.notes)


def test_from_file_and_default_take_a_text_encoder(tmp_path):
    from clipdiffusion.checkpoints.save import save_checkpoint
    from clipdiffusion.pipeline import Pipeline

    default = Pipeline.default()
    width = default.unet.config.context_dim
    path = tmp_path / "longclip.pt"
    torch.save(openai_state_dict(_ours(width=width, heads=width // 64 or 1, positions=LONG, seed=6)), path)
    pipe = Pipeline.default(text_encoder=path)
    assert pipe.text_encoder.positions == LONG and pipe.name == "clipdiffusion-tiny" and pipe.family == "tiny"
    assert pipe.text_encoder.encoders[0].pad_id == default.text_encoder.encoders[0].pad_id
    from clipdiffusion.checkpoints.load import load_checkpoint
    from clipdiffusion.testing import tiny_pipeline

    ckpt = save_checkpoint(tiny_pipeline(), tmp_path / "sd1.safetensors")
    assert load_checkpoint(ckpt).text_encoder.positions == 77
    te = tmp_path / "te.pt"
    torch.save(openai_state_dict(_ours(positions=LONG, seed=7)), te)
    assert Pipeline.from_file(ckpt, text_encoder=te).text_encoder.positions == LONG
    # an SD1 checkpoint's own tower (cond_stage_model.transformer.) is a replacement too; a TextEncoder object as well
    pipe = tiny_pipeline(seed=2)
    pipe.replace_text_encoder(ckpt)
    assert pipe.text_encoder.positions == 77 and pipe.text_encoder_name == "sd1.safetensors"
    wide = load_replacement_text_encoder(path, "sd1")  # the embedded model's width, not the tiny random one's
    with pytest.raises(ClipDiffusionError, match="width"):
        pipe.replace_text_encoder(wide)


def test_cli_generate_encode_and_serve_take_text_encoder(tmp_path, capsys):
    from clipdiffusion.cli import main
    from clipdiffusion.pipeline import Pipeline

    width = Pipeline.default().unet.config.context_dim
    path = tmp_path / "longclip.pt"
    torch.save(openai_state_dict(_ours(width=width, heads=width // 64 or 1, positions=LONG, seed=8)), path)
    out = tmp_path / "out.png"
    assert main(["generate", PROMPT, "--text-encoder", str(path), "--steps", "1", "--seed", "1", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert out.is_file() and "longclip.pt (248 positions" in err
    enc_out = tmp_path / "cond.safetensors"
    assert main(["encode", PROMPT, "--text-encoder", str(path), "-o", str(enc_out)]) == 0
    from clipdiffusion.checkpoints.safetensors_io import load_file

    assert load_file(enc_out)["context"].shape == (1, LONG, width)
    assert main(["generate", "x", "--text-encoder", str(tmp_path / "nope.pt"), "-o", str(out)]) == 2
    assert "nope.pt" in capsys.readouterr().err

    import argparse

    from clipdiffusion.commands import serve

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    settings = serve.build_settings(parser.parse_args(["--text-encoder", str(path)]))
    assert settings.text_encoder == str(path)
    pipe = serve.pipeline_factory(settings)(settings.models[0].name)
    assert pipe.text_encoder.positions == LONG


# -- hostile and wrong files ---------------------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _refused(path, family="sd1", match=None, width=32):
    with pytest.raises(CheckpointError) as info:
        load_replacement_text_encoder(path, family, context_width=width)
    message = str(info.value)
    assert path.name in message, message
    if match:
        assert match in message, message
    return message


def test_pickle_with_code_and_torchscript_are_refused(tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "longclip-evil.pt"
    sd = openai_state_dict(_ours())
    sd["token_embedding.weight"] = _Payload(marker)
    torch.save(sd, evil)
    _refused(evil, match="weights-only")
    assert not marker.exists()

    class Tiny(torch.nn.Module):
        def forward(self, x):
            return x + 1

    jit = tmp_path / "ViT-L-14.pt"  # OpenAI's own release is a TorchScript archive
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated; the archives it wrote are still out there
        torch.jit.save(torch.jit.script(Tiny()), jit)
    _refused(jit, match="TorchScript")


def test_wrong_width_positions_and_values_are_refused(tmp_path):
    wide = tmp_path / "wide.pt"
    torch.save(openai_state_dict(_ours(width=64)), wide)
    _refused(wide, match="width 64")

    for rows in (0, 20):
        sd = openai_state_dict(_ours(positions=LONG), long_clip=False)
        sd["positional_embedding"] = sd["positional_embedding"][:rows]
        path = tmp_path / f"positions-{rows}.safetensors"
        save_file(sd, path)
        _refused(path, match=f"{rows} positions")

    # 10^6 positions: refused from the header, before a byte of the (sparse) table is read
    from hostile_corpus import raw_safetensors

    rows = 10**6
    header = {"text_model.embeddings.position_embedding.weight":
              {"dtype": "F32", "shape": [rows, 32], "data_offsets": [0, rows * 32 * 4]},
              "text_model.embeddings.token_embedding.weight":
              {"dtype": "F32", "shape": [49408, 32], "data_offsets": [rows * 32 * 4, (rows + 49408) * 32 * 4]},
              "text_model.encoder.layers.0.layer_norm1.weight":
              {"dtype": "F32", "shape": [32], "data_offsets": [(rows + 49408) * 32 * 4, (rows + 49408) * 32 * 4 + 128]}}
    huge = tmp_path / "positions-1e6.safetensors"
    with open(huge, "wb") as f:
        f.write(raw_safetensors(header))
        f.truncate(f.tell() + (rows + 49408) * 32 * 4 + 128)
    assert rows > MAX_TEXT_POSITIONS
    _refused(huge, match="1000000 positions")

    nan = openai_state_dict(_ours())
    nan["transformer.resblocks.1.mlp.c_fc.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(nan, path)
    _refused(path, match="non-finite")

    unknown = openai_state_dict(_ours())
    unknown["ln_final.gamma"] = torch.ones(32)
    path = tmp_path / "unknown-key.pt"
    torch.save(unknown, path)
    _refused(path, match="ln_final.gamma")

    small_vocab = openai_state_dict(_ours())
    small_vocab["token_embedding.weight"] = small_vocab["token_embedding.weight"][:1000]
    path = tmp_path / "vocab.pt"
    torch.save(small_vocab, path)
    _refused(path, match="vocabulary")


def test_two_tower_files_and_families_are_refused(tmp_path):
    from clipdiffusion.testing import tiny_pipeline

    path = tmp_path / "ok.pt"
    torch.save(openai_state_dict(_ours()), path)
    with pytest.raises(ClipDiffusionError, match="one-tower"):
        load_replacement_text_encoder(path, "sdxl")
    with pytest.raises(ClipDiffusionError, match="one-tower"):
        tiny_pipeline(family="sdxl").replace_text_encoder(path)
    from clipdiffusion.checkpoints.text_layouts import text_encoder_to_ldm

    pair = tmp_path / "sdxl-te.safetensors"
    save_file(text_encoder_to_ldm("sdxl", tiny_pipeline(family="sdxl").text_encoder.encoders), pair)
    _refused(pair, match="2 text towers")


def test_sd2_takes_an_openclip_h_replacement(tmp_path):
    from clipdiffusion.checkpoints.text_layouts import text_encoder_to_ldm
    from clipdiffusion.testing import tiny_pipeline

    pipe, other = tiny_pipeline(family="sd2"), tiny_pipeline(seed=1, family="sd2")
    path = tmp_path / "sd2-te.safetensors"
    save_file(text_encoder_to_ldm("sd2", other.text_encoder.encoders), path)
    pipe.replace_text_encoder(path)
    spec = pipe.text_encoder.encoders[0]
    assert spec.model.config.activation == "gelu" and spec.pad_id == 0 and spec.default_clip_skip == 2


def test_server_counts_in_the_towers_window_and_generates_with_it(tmp_path):
    import argparse

    import httpx
    from server_fixtures import ServerThread

    from clipdiffusion.commands import serve
    from clipdiffusion.server.app import create_app
    from clipdiffusion.testing import tiny_pipeline

    path = tmp_path / "longclip-L.pt"
    torch.save(openai_state_dict(_ours(positions=LONG, seed=9)), path)
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    settings = serve.build_settings(parser.parse_args(["--text-encoder", str(path)]))
    assert settings.text_encoder == str(path) and settings.text_positions == LONG
    settings = settings.replace(preload=False, samplers=("euler",), schedules=("normal",))

    def factory(name):  # what serve.pipeline_factory does, on the tiny random model
        pipe = tiny_pipeline()
        pipe.replace_text_encoder(settings.text_encoder)
        return pipe

    with ServerThread(create_app(factory, settings)) as server, \
            httpx.Client(base_url=server.url, timeout=120) as client:  # fmt: skip
        report = client.post("/api/tokenize", json={"prompt": PROMPT}).json()
        assert len(report["chunks"]) == 1 and report["chunks"][0]["capacity"] == 246
        body = client.post("/api/generate", json={"prompt": PROMPT, "steps": 1, "width": 32, "height": 32,
                                                  "seed": 1}).json()  # fmt: skip
        assert any("longclip-L.pt (248 positions" in n for n in body["notes"]), body.get("notes")
    no_table = openai_state_dict(_ours(positions=LONG))
    del no_table["positional_embedding"], no_table["positional_embedding_res"]
    torch.save(no_table, tmp_path / "no-table.pt")
    with pytest.raises(CheckpointError, match="no usable position table"):  # at startup, not in the first request
        serve.build_settings(parser.parse_args(["--text-encoder", str(tmp_path / "no-table.pt")]))
