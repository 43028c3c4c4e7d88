"""Textual-inversion embeddings (issue 17): file formats, A1111 matching and placement, weights, prompt editing,
negative prompt, the token report, folder scans, and parity with diffusers' ``load_textual_inversion`` (SD1-style
and SDXL-style tiny models on the same weights, tolerance 1e-5)."""

import json

import pytest
import torch

from clipdiffusion.checkpoints.embeddings import embedding_for, load_folder, read_embedding, scan_folder
from clipdiffusion.checkpoints.safetensors_io import save_file
from clipdiffusion.errors import CheckpointError
from clipdiffusion.request import GenerationRequest
from clipdiffusion.testing import tiny_pipeline
from clipdiffusion.text import chunking
from clipdiffusion.text.chunking import BOS_ID, EOS_ID
from clipdiffusion.text.clip import CLIPTextConfig, CLIPTextModel
from clipdiffusion.text.conditioning import EncoderSpec, TextEncoder
from clipdiffusion.text.embeddings import VOCAB_SIZE, EmbeddingRegistry
from clipdiffusion.text.tokenizer import CLIPTokenizer

WIDTH = 32  # tiny_pipeline's SD1 tower


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=1)


def _vectors(n, width=WIDTH, seed=0):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def _kohya(folder, name, n, width=WIDTH, seed=0):
    path = folder / f"{name}.safetensors"
    save_file({"emb_params": _vectors(n, width, seed)}, path)
    return path


@pytest.fixture
def encoder(tmp_path):
    """A fresh tiny SD1 text encoder with a 3-vector `mystyle` and a 1-vector `badhands`."""
    te = tiny_pipeline(seed=1).text_encoder
    te.add_embedding(embedding_for(_kohya(tmp_path, "mystyle", 3, seed=1), te))
    te.add_embedding(embedding_for(_kohya(tmp_path, "badhands", 1, seed=2), te))
    return te


def _plan_ids(te, prompt, strategy="chunk"):
    return [list(w.tokens) for w in te.plan(prompt, strategy).windows]


# ---- formats --------------------------------------------------------------------------------------------------

def test_every_format_loads_with_its_vectors(tmp_path, pipe):
    v3, v1 = _vectors(3, seed=3), _vectors(1, seed=4)[0]
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(v3)},
                "name": "inside-name", "step": 1500, "sd_checkpoint": "a1b2c3d4", "sd_checkpoint_name": "base"},
               tmp_path / "a1111.pt")
    torch.save({"<cat-toy>": v1}, tmp_path / "learned_embeds.bin")
    save_file({"<cat-toy>": v1[None]}, tmp_path / "learned_embeds.safetensors")
    save_file({"emb_params": v3}, tmp_path / "kohya.safetensors")
    te = tiny_pipeline(seed=1).text_encoder
    a1111 = embedding_for(tmp_path / "a1111.pt", te)
    assert (a1111.name, a1111.vectors, a1111.step, a1111.sd_checkpoint, a1111.sd_checkpoint_name) == \
        ("a1111", 3, 1500, "a1b2c3d4", "base")  # the stem, not the stored name, is the trigger (A1111)
    assert a1111.info() == {"step": 1500, "sd_checkpoint": "a1b2c3d4", "sd_checkpoint_name": "base",
                            "shape": WIDTH, "vectors": 3}
    torch.testing.assert_close(a1111.tensors[0], v3, rtol=0, atol=0)
    for name in ("learned_embeds.bin", "learned_embeds.safetensors"):
        e = embedding_for(tmp_path / name, te, name="cattoy")
        assert (e.name, e.vectors, e.step) == ("cattoy", 1, None)
        torch.testing.assert_close(e.tensors[0], v1[None], rtol=0, atol=0)
    kohya = embedding_for(tmp_path / "kohya.safetensors", te)
    torch.testing.assert_close(kohya.tensors[0], v3, rtol=0, atol=0)
    assert len(kohya.hash) == 12


def test_sdxl_pair_goes_to_its_towers(tmp_path):
    pipe = tiny_pipeline(seed=2, family="sdxl")
    l, g = _vectors(2, 16, 5), _vectors(2, 16, 6)
    save_file({"clip_l": l, "clip_g": g}, tmp_path / "xlstyle.safetensors")
    e = pipe.load_textual_inversion(tmp_path / "xlstyle.safetensors")
    assert e.widths == (16, 16) and e.info()["shape"] == 32 and e.vectors == 2
    torch.testing.assert_close(e.tensors[0], l, rtol=0, atol=0)
    torch.testing.assert_close(e.tensors[1], g, rtol=0, atol=0)
    # an SDXL pair cannot condition an SD1 model, nor a one-tower file an SDXL model: clear errors naming the file
    with pytest.raises(CheckpointError, match="xlstyle.safetensors.*SDXL embedding"):
        tiny_pipeline(seed=1).load_textual_inversion(tmp_path / "xlstyle.safetensors")
    with pytest.raises(CheckpointError, match="one.safetensors.*one-tower embedding"):
        pipe.load_textual_inversion(_kohya(tmp_path, "one", 1, 16))


def test_width_is_checked_against_the_model(tmp_path, pipe):
    with pytest.raises(CheckpointError, match=r"sd1style.safetensors: vector width is 768, but .* 32 wide"):
        pipe.load_textual_inversion(_kohya(tmp_path, "sd1style", 2, 768))


# ---- matching -------------------------------------------------------------------------------------------------

def test_name_becomes_its_vectors_in_place(encoder, tok):
    base = encoder.embeddings.get("mystyle")
    ids = _plan_ids(encoder, "a photo in mystyle style")[0]
    first = next(e.base for e in encoder.embeddings.entries if e.embedding is base)
    assert ids == tok.encode("a photo in") + [first, first + 1, first + 2] + tok.encode("style")


def test_matching_follows_the_tokenizer(encoder, tok):
    start = {e.embedding.name: e.base for e in encoder.embeddings.entries}
    # case-insensitive, because CLIP lowercases
    assert _plan_ids(encoder, "MyStyle")[0] == [start["mystyle"] + k for k in range(3)]
    # no match inside a longer word (BPE end-of-word mark), nor across an emphasis boundary: ordinary text
    for text in ("mystyles", "my(style)", "a cat badhandsome"):
        assert _plan_ids(encoder, text)[0] == [t for s, _ in encoder.parse(text) for t in tok.encode(s)]
    # punctuation ends a word, so "badhands," matches
    assert _plan_ids(encoder, "badhands, cat")[0] == [start["badhands"]] + tok.encode(", cat")


def test_longest_name_wins(tok):
    reg = EmbeddingRegistry()
    from clipdiffusion.text.embeddings import Embedding

    reg, _ = reg.with_embedding(Embedding("bad", 1, (4,)), tok)
    reg, _ = reg.with_embedding(Embedding("bad hands", 2, (4,)), tok)
    ids = reg.substitute(tok.encode("bad hands and bad feet"))
    assert ids == [VOCAB_SIZE + 1, VOCAB_SIZE + 2] + tok.encode("and") + [VOCAB_SIZE] + tok.encode("feet")
    # a name with the same token ids replaces the earlier one
    reg2, replaced = reg.with_embedding(Embedding("BAD", 4, (4,)), tok)
    assert replaced == "bad" and len(reg2) == 2 and reg2.get("bad") is None


def test_weights_reach_every_vector(encoder):
    window = encoder.plan("a (mystyle:1.2) cat, [badhands]").windows[0]
    spans = encoder.embeddings.spans
    weights = {t: w for t, w in zip(window.tokens, window.weights)}
    for base, n in spans.items():
        expected = 1.2 if n == 3 else pytest.approx(1 / 1.1)
        assert all(weights[base + k] == expected for k in range(n))


def test_a1111_chunk_rule_never_splits_an_embedding(encoder, tok):
    filler = ("word " * 73).strip()
    assert len(tok.encode(filler)) == 73
    windows = _plan_ids(encoder, filler + " mystyle end")
    assert [len(w) for w in windows] == [73, 4]  # 73 + 3 > 75: the chunk is closed first, EOS-padded
    assert windows[1][0] >= VOCAB_SIZE
    windows = _plan_ids(encoder, ("word " * 72) + "mystyle end")
    assert [len(w) for w in windows] == [75, 1]  # 72 + 3 = 75 fits
    # truncate drops the whole embedding (and what follows), never part of it
    plan = encoder.plan(filler + " mystyle end", "truncate")
    assert len(plan.windows[0].tokens) == 73 and plan.report.dropped_tokens == 4
    assert plan.report.dropped_text == "mystyle end"


def test_comma_backtracking_moves_the_embedding_with_its_tail(encoder, tok):
    # 70 words, a comma, then the embedding: the 76th position arrives inside the tail -> the tail moves whole
    prompt = ("word " * 70).strip() + ", badhands mystyle x y"
    windows = _plan_ids(encoder, prompt)
    assert [len(w) for w in windows] == [71, 6]
    assert windows[1][:4] == [t for t in encoder.prompt_tokenizer.encode("badhands mystyle")]


def test_token_report_shows_one_unit_per_embedding(encoder):
    report = encoder.plan("a mystyle cat BREAK badhands").report
    assert report.summary() == "5/75 | 1/75"
    assert report.to_dict()["embeddings"] == [
        {"name": "mystyle", "vectors": 3, "chunk": 0, "position": 2},
        {"name": "badhands", "vectors": 1, "chunk": 1, "position": 1}]
    assert report.chunks[0].first_words == "a mystyle cat"


def test_unknown_words_and_no_embeddings_change_nothing(encoder, pipe, tok):
    plain = tiny_pipeline(seed=1).text_encoder
    a = encoder.encode("a red cat, blue sky", "ugly")
    b = plain.encode("a red cat, blue sky", "ugly")
    torch.testing.assert_close(a.context, b.context, rtol=0, atol=0)
    torch.testing.assert_close(a.negative_context, b.negative_context, rtol=0, atol=0)


def test_vectors_are_what_the_model_reads(encoder, tok):
    """Encoding "a mystyle" equals the plain model run on a copy whose token rows 100..102 hold the vectors."""
    model = encoder.encoders[0].model
    vectors = encoder.embeddings.get("mystyle").tensors[0]
    patched = CLIPTextModel(model.config).eval()
    patched.load_state_dict(model.state_dict())
    with torch.no_grad():
        patched.embeddings.token_embedding.weight[100:103] = vectors
        ids = [BOS_ID, *tok.encode("a"), 100, 101, 102, EOS_ID] + [EOS_ID] * 71
        want = patched(torch.tensor([ids])).hidden
        unpatched = model(torch.tensor([ids])).hidden
    cond = encoder.encode("a mystyle", weighting="none")
    torch.testing.assert_close(cond.context, want, rtol=0, atol=1e-6)
    assert not torch.allclose(cond.context[0, 2:5], unpatched[0, 2:5])


def test_prompt_editing_and_negative_prompt_use_the_embedding(encoder):
    from clipdiffusion.conditioning_schedule import encode_request

    request = GenerationRequest(prompt="[mystyle:cat:0.5]", negative_prompt="(mystyle:1.1)", steps=4)
    scheduled = encode_request(encoder, request, batch=1, device="cpu")
    direct = encoder.encode_texts(["mystyle", "cat"], ["(mystyle:1.1)"])
    torch.testing.assert_close(scheduled.conds["mystyle"].context, direct.prompts["mystyle"].context)
    torch.testing.assert_close(scheduled.negative_conds["(mystyle:1.1)"].context,
                               direct.negatives["(mystyle:1.1)"].context)
    plain = tiny_pipeline(seed=1).text_encoder.encode_texts(["mystyle"])
    assert not torch.allclose(direct.prompts["mystyle"].context, plain.prompts["mystyle"].context)


@pytest.mark.slow  # two tiny generations: ~5 s on 2 shared cores
def test_generation_with_an_embedding_in_both_prompts(tmp_path):
    pipe = tiny_pipeline(seed=1)
    kwargs = dict(negative_prompt="badhands", steps=2, seed=3, width=16, height=16, attention_maps=True)
    before = pipe.generate("[mystyle:cat:0.5]", **kwargs)
    pipe.load_textual_inversion(_kohya(tmp_path, "mystyle", 3, seed=1))
    pipe.load_textual_inversion(_kohya(tmp_path, "badhands", 1, seed=2))
    after = pipe.generate("[mystyle:cat:0.5]", **kwargs)
    assert abs(before.pixels - after.pixels).max() > 1e-4
    assert after.attention.tokens[:3] == ["mystyle", "", ""]  # the first text's rows: the embedding's 3 vectors


def test_reloading_replaces_and_the_report_lists_them(tmp_path):
    pipe = tiny_pipeline(seed=1)
    pipe.load_textual_inversion(_kohya(tmp_path, "mystyle", 3, seed=1))
    pipe.load_textual_inversion(_kohya(tmp_path, "other", 2, seed=9), name="mystyle")
    info = pipe.embeddings_info()
    assert info == {"loaded": {"mystyle": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                           "shape": WIDTH, "vectors": 2}}, "skipped": {}}


# ---- folders --------------------------------------------------------------------------------------------------

def test_folder_scan_skips_previews_empty_files_and_collisions(tmp_path):
    folder = tmp_path / "emb"
    (folder / "sub").mkdir(parents=True)
    _kohya(folder, "Alpha", 2, seed=1)
    torch.save({"string_to_param": {"*": _vectors(1, seed=2)}}, folder / "sub" / "alpha.pt")  # same ids: collides
    _kohya(folder, "wide", 1, 768)  # wrong width for this model
    (folder / "empty.safetensors").write_bytes(b"")
    (folder / "pic.preview.safetensors").write_bytes(b"x")
    (folder / "notes.txt").write_text("hi")
    found = [str(p)[len(str(folder)) + 1:] for p in scan_folder(folder)]
    assert found == ["Alpha.safetensors", "sub/alpha.pt", "wide.safetensors"]  # sorted relative paths
    pipe = tiny_pipeline(seed=1)
    report = pipe.load_embeddings(folder)
    assert [e.name for e in report.loaded] == ["Alpha"]
    info = pipe.embeddings_info()
    assert list(info["loaded"]) == ["Alpha"] and set(info["skipped"]) == {"alpha", "wide"}
    assert "collides with Alpha.safetensors" in info["skipped"]["alpha"]["reason"]
    assert info["skipped"]["wide"]["shape"] == 768 and "32 wide" in info["skipped"]["wide"]["reason"]
    # a refresh drops what the folder no longer has
    (folder / "Alpha.safetensors").unlink()
    pipe.load_embeddings(folder)
    assert list(pipe.embeddings_info()["loaded"]) == ["alpha"]


def test_counting_without_a_model_reads_headers(tmp_path, tok):
    from clipdiffusion.checkpoints.embeddings import counting_tokenizer

    _kohya(tmp_path, "mystyle", 3)
    counting, report = counting_tokenizer(tok, tmp_path)
    assert [(e.name, e.vectors, e.tensors) for e in report.loaded] == [("mystyle", 3, ())]
    plan = chunking.plan_prompt([("a mystyle", 1.0)], counting)
    assert plan.report.summary() == "4/75"


def test_missing_folder_is_an_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match="nope.*no such folder"):
        load_folder(tmp_path / "nope")


# ---- CLI ------------------------------------------------------------------------------------------------------

def test_tokens_command_counts_embeddings(tmp_path, capsys):
    from clipdiffusion.cli import main

    _kohya(tmp_path, "mystyle", 3)
    assert main(["tokens", "--embeddings", str(tmp_path), "a (mystyle:1.2) cat"]) == 0
    out = capsys.readouterr().out
    assert "5 tokens" in out and "embedding 'mystyle': 3 vectors, chunk 1 positions 2-4" in out
    assert main(["tokens", "--embeddings", str(tmp_path), "--json", "a mystyle cat"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["embeddings"] == [{"name": "mystyle", "vectors": 3, "chunk": 0, "position": 2}]
    assert [t.get("embedding") for t in report["tokens"]] == [None, "mystyle", "mystyle", "mystyle", None]
    assert report["words"][1] == {"text": "mystyle", "tokens": [1, 4]}


def test_encode_command_applies_embeddings(tmp_path, capsys):
    from clipdiffusion.checkpoints.safetensors_io import load_file
    from clipdiffusion.checkpoints.text_layouts import text_encoder_to_ldm
    from clipdiffusion.cli import main

    te = tiny_pipeline(seed=1).text_encoder
    save_file(text_encoder_to_ldm("sd1", te.encoders), tmp_path / "te.safetensors")
    emb = tmp_path / "emb"
    emb.mkdir()
    _kohya(emb, "mystyle", 3, seed=1)
    for extra, out in (([], "plain"), (["--embeddings", str(emb)], "with")):
        assert main(["encode", "a mystyle cat", "--text-encoder", str(tmp_path / "te.safetensors"),
                     "-o", str(tmp_path / f"{out}.safetensors"), *extra]) == 0
    err = capsys.readouterr().err
    assert "embeddings: 1 loaded" in err
    plain = load_file(tmp_path / "plain.safetensors")["context"]
    with_emb = load_file(tmp_path / "with.safetensors")["context"]
    assert not torch.allclose(plain, with_emb)
    from clipdiffusion.checkpoints.text_encoders import load_text_encoder

    loaded = load_text_encoder(tmp_path / "te.safetensors")
    loaded.add_embedding(embedding_for(emb / "mystyle.safetensors", loaded))
    torch.testing.assert_close(with_emb, loaded.encode("a mystyle cat").context, rtol=0, atol=1e-6)


# ---- parity with diffusers ------------------------------------------------------------------------------------

def _hf_tower(transformers, seed, width, layers, act, projection_dim=None):
    config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=2, max_position_embeddings=77, hidden_act=act, bos_token_id=BOS_ID,
        eos_token_id=EOS_ID, projection_dim=projection_dim or 512)
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


def _loader(diffusers):
    class Loader(diffusers.loaders.TextualInversionLoaderMixin):  # only what load_textual_inversion reads
        hf_device_map = None
        components = {}

    return Loader()


def _hf_tokenizer(transformers, folder, pad):
    from test_conditioning import _hf_tokenizer_from_our_bpe

    hf = _hf_tokenizer_from_our_bpe(transformers, folder)
    if pad != "<|endoftext|>":
        hf.pad_token = pad
    return hf


def _hf_ids(loader, hf_tok, prompt):
    text = loader.maybe_convert_prompt(prompt, hf_tok)
    return hf_tok(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


PROMPT = "a photo of mystyle on a table, badhands"


@pytest.mark.slow  # imports diffusers and transformers
def test_sd1_parity_with_diffusers_load_textual_inversion(tmp_path, tok):
    transformers = pytest.importorskip("transformers")
    diffusers = pytest.importorskip("diffusers")
    ref, ours = _hf_tower(transformers, 21, 32, 2, "quick_gelu")
    hf_tok = _hf_tokenizer(transformers, tmp_path, "<|endoftext|>")
    multi, single = _vectors(3, seed=7), _vectors(1, seed=8)
    save_file({"mystyle": multi}, tmp_path / "learned_embeds.safetensors")  # diffusers: the key is the token
    torch.save({"string_to_param": {"*": single}, "name": "badhands"}, tmp_path / "badhands.pt")
    loader = _loader(diffusers)
    loader.load_textual_inversion(str(tmp_path / "learned_embeds.safetensors"), tokenizer=hf_tok, text_encoder=ref)
    loader.load_textual_inversion(str(tmp_path / "badhands.pt"), tokenizer=hf_tok, text_encoder=ref)
    ids = _hf_ids(loader, hf_tok, PROMPT)
    with torch.no_grad():
        want = ref(ids).last_hidden_state
    te = TextEncoder("sd1", [EncoderSpec("clip_l", ours, EOS_ID, True, 1)], tok)
    te.add_embedding(embedding_for(tmp_path / "learned_embeds.safetensors", te, name="mystyle"))
    te.add_embedding(embedding_for(tmp_path / "badhands.pt", te))
    cond = te.encode(PROMPT, long_prompt="truncate", weighting="none")
    assert len(te.plan(PROMPT).windows[0].tokens) == int((ids[0] != EOS_ID).sum()) - 1  # same layout
    torch.testing.assert_close(cond.context, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # imports diffusers and transformers
def test_sdxl_parity_with_diffusers_load_textual_inversion(tmp_path, tok):
    """SDXL: diffusers takes clip_l into text_encoder/tokenizer and clip_g into text_encoder_2/tokenizer_2; the
    context is both penultimate layers concatenated and the pooled vector bigG's projected first EOS."""
    transformers = pytest.importorskip("transformers")
    diffusers = pytest.importorskip("diffusers")
    ref_l, ours_l = _hf_tower(transformers, 31, 16, 2, "quick_gelu")
    ref_g, ours_g = _hf_tower(transformers, 32, 16, 3, "gelu", projection_dim=16)
    (tmp_path / "l").mkdir()
    (tmp_path / "g").mkdir()
    tok_l, tok_g = _hf_tokenizer(transformers, tmp_path / "l", "<|endoftext|>"), _hf_tokenizer(transformers,
                                                                                              tmp_path / "g", "!")
    l, g = _vectors(2, 16, 11), _vectors(2, 16, 12)
    save_file({"clip_l": l, "clip_g": g}, tmp_path / "mystyle.safetensors")
    loader = _loader(diffusers)
    loader.load_textual_inversion({"mystyle": l}, tokenizer=tok_l, text_encoder=ref_l)
    loader.load_textual_inversion({"mystyle": g}, tokenizer=tok_g, text_encoder=ref_g)
    prompt = "a photo of mystyle on a table"
    with torch.no_grad():
        out_l = ref_l(_hf_ids(loader, tok_l, prompt), output_hidden_states=True)
        out_g = ref_g(_hf_ids(loader, tok_g, prompt), output_hidden_states=True)
    want = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
    te = TextEncoder("sdxl", [EncoderSpec("clip_l", ours_l, EOS_ID, False, 2),
                              EncoderSpec("clip_g", ours_g, 0, False, 2)], tok)
    te.add_embedding(embedding_for(tmp_path / "mystyle.safetensors", te))
    cond = te.encode(prompt, "blurry", long_prompt="truncate", weighting="none")
    torch.testing.assert_close(cond.context, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond.pooled, out_g.text_embeds, rtol=1e-5, atol=1e-5)


def test_read_embedding_reports_the_file(tmp_path):
    path = _kohya(tmp_path, "x", 2)
    file = read_embedding(path)
    assert (file.vectors, file.widths, file.path) == (2, {"": WIDTH}, str(path))


def test_a_missing_embeddings_folder_fails_before_any_model_loads(tmp_path, capsys):
    from clipdiffusion.cli import main

    missing = str(tmp_path / "nope")
    assert main(["generate", "a cat", "--embeddings", missing, "-o", str(tmp_path / "x.png")]) == 2
    assert main(["tokens", "a cat", "--embeddings", missing]) == 2
    err = capsys.readouterr().err
    assert err.count(f"embeddings folder '{missing}': no such folder") == 2
    assert not (tmp_path / "x.png").exists()
