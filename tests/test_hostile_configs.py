"""Hostile and broken configs, dtypes, shapes and output paths (issue 14): each is one ``CheckpointError`` naming the
file and the key or field with its value, never a traceback of another type, a black image or an overwritten file.

Configs come from two places: a diffusers folder's ``config.json`` files, and our own safetensors metadata
(``clipdiffusion.unet_config`` ...). Both are checked before any module is built, so a fuzzed value either loads
a working model or is refused cleanly (the two fuzz tests at the end edit one value at a time).
"""

import dataclasses
import errno
import json
import math
import os
import random
import re
import shutil
import struct

import pytest
import torch
from test_checkpoint_load import tiny_model

from clipdiffusion.checkpoints.load import load_checkpoint, load_diffusers
from clipdiffusion.checkpoints.safetensors_io import atomic_write, load_file, read_header, save_file
from clipdiffusion.checkpoints.save import save_checkpoint, save_diffusers
from clipdiffusion.errors import CheckpointError, ClipDiffusionError

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A tiny SD1-style model as one file and as a diffusers folder, written once for the module."""
    root = tmp_path_factory.mktemp("hostile")
    model = tiny_model("tiny")
    return save_checkpoint(model, root / "good.safetensors"), save_diffusers(model, root / "good", tokenizer=False)


def folder_copy(good, dst):
    """A copy whose weight files are hard links (cheap); configs are replaced, never written through, below."""
    shutil.copytree(good, dst, copy_function=os.link)
    return dst


def set_config(folder, rel, key, value):
    path = folder / rel
    data = json.loads(path.read_text())
    data[key] = value
    path.unlink()  # break the hard link before writing
    path.write_text(json.dumps(data))  # NaN and Infinity are written as the literals Python's json reads back
    return path


def refused(call, *words):
    with pytest.raises(CheckpointError) as info:
        call()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for word in words:
        assert str(word) in msg, msg
    return msg


# --- diffusers config.json values -----------------------------------------------------------------------------


@pytest.mark.parametrize("rel,key,value,shown", [
    ("model_index.json", "_class_name", ["x"], "['x']"),
    ("model_index.json", "_clipdiffusion_family", ["tiny"], "['tiny']"),
    ("text_encoder/config.json", "hidden_size", None, "None"),
    ("text_encoder/config.json", "num_hidden_layers", "2", "'2'"),
    ("text_encoder/config.json", "layer_norm_eps", NAN, "nan"),
    ("text_encoder/config.json", "hidden_act", ["gelu"], "['gelu']"),
    ("unet/config.json", "block_out_channels", [], "[]"),
    ("unet/config.json", "block_out_channels", "ab", "'ab'"),
    ("unet/config.json", "block_out_channels", [0, 0], "[0, 0]"),
    ("unet/config.json", "attention_head_dim", 0, "0"),
    ("unet/config.json", "in_channels", True, "True"),
    ("unet/config.json", "in_channels", "4", "'4'"),
    ("unet/config.json", "cross_attention_dim", [1, 2], "[1, 2]"),
    ("unet/config.json", "norm_num_groups", 7, "7"),
    ("unet/config.json", "layers_per_block", -1, "-1"),
    ("unet/config.json", "down_block_types", "CrossAttnDownBlock2D", "'CrossAttnDownBlock2D'"),
    ("unet/config.json", "addition_embed_type", "text_time", "projection_class_embeddings_input_dim"),
    ("vae/config.json", "block_out_channels", [0], "[0]"),
    ("vae/config.json", "norm_num_groups", 7, "7"),
    ("vae/config.json", "scaling_factor", NAN, "nan"),
    ("vae/config.json", "scaling_factor", 0, "0"),
    ("vae/config.json", "scaling_factor", INF, "inf"),
    ("vae/config.json", "latent_channels", 1.5, "1.5"),
    ("scheduler/scheduler_config.json", "prediction_type", ["v"], "['v']"),
])  # fmt: skip
def test_bad_diffusers_config_value_names_file_key_and_value(sources, tmp_path, rel, key, value, shown):
    folder = folder_copy(sources[1], tmp_path / "f")
    path = set_config(folder, rel, key, value)
    msg = refused(lambda: load_diffusers(folder), key, shown)
    assert msg.startswith(str(path)), msg  # the file, then key=value


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return save_diffusers(tiny_model("sdxl"), tmp_path_factory.mktemp("sdxl") / "xl", tokenizer=False)


@pytest.mark.parametrize("rel,key,value,words", [
    ("text_encoder_2/config.json", "projection_dim", "ab", ["projection_dim='ab'"]),
    ("text_encoder_2/config.json", "layer_norm_eps", 0, ["layer_norm_eps=0"]),
    ("unet/config.json", "addition_time_embed_dim", 7, ["addition_time_embed_dim", "size_embed_dim=7"]),
    ("unet/config.json", "projection_class_embeddings_input_dim", None, ["projection_class_embeddings_input_dim"]),
])  # fmt: skip
def test_bad_sdxl_config_values(sdxl_folder, tmp_path, rel, key, value, words):
    folder = folder_copy(sdxl_folder, tmp_path / "f")
    path = set_config(folder, rel, key, value)
    assert refused(lambda: load_diffusers(folder), *words).startswith(str(path))


def test_unet_block_out_channels_message(sources, tmp_path):
    folder = folder_copy(sources[1], tmp_path / "f")
    set_config(folder, "unet/config.json", "block_out_channels", [0, 0])
    msg = refused(lambda: load_diffusers(folder))
    assert msg == (f"{folder / 'unet' / 'config.json'}: block_out_channels=[0, 0]: must be a non-empty list of "
                   f"positive integers (at most 1048576)")


def test_huge_config_values_are_shown_short(sources, tmp_path):
    folder = folder_copy(sources[1], tmp_path / "f")
    set_config(folder, "unet/config.json", "block_out_channels", list(range(100_000)))
    assert len(refused(lambda: load_diffusers(folder), "block_out_channels")) < 400


def test_deeply_nested_config_json_is_refused(sources, tmp_path):
    folder = folder_copy(sources[1], tmp_path / "f")
    (folder / "vae" / "config.json").unlink()
    (folder / "vae" / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(lambda: load_diffusers(folder), "vae", "config.json")


def test_shard_index_with_unhashable_names(sources, tmp_path):
    folder = folder_copy(sources[1], tmp_path / "f")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": ["x"]}}))
    refused(lambda: load_diffusers(folder), "weight_map")


def test_equivalent_valid_values_still_load(sources, tmp_path):
    """Unread keys may hold anything; values diffusers itself accepts (null head count, a head list) still load."""
    folder = folder_copy(sources[1], tmp_path / "f")
    set_config(folder, "unet/config.json", "sample_size", "anything")
    set_config(folder, "unet/config.json", "num_attention_heads", None)
    set_config(folder, "vae/config.json", "force_upcast", {"a": 1})
    set_config(folder, "text_encoder/config.json", "architectures", None)
    loaded = load_diffusers(folder)
    assert loaded.unet_config.num_heads == 4 and math.isclose(loaded.vae_config.scale_factor, 0.18215)


# --- our metadata configs -------------------------------------------------------------------------------------


def with_metadata(src, dst, key, change):
    """A copy of ``src`` whose metadata JSON ``key`` was edited by ``change(value)``."""
    header = read_header(src)
    meta = dict(header.metadata)
    value = json.loads(meta[key])
    change(value)
    meta[key] = json.dumps(value)
    save_file(load_file(src), dst, meta)
    return dst


@pytest.mark.parametrize("key,field,value", [
    ("clipdiffusion.unet_config", "norm_groups", 7),
    ("clipdiffusion.unet_config", "model_channels", -48),
    ("clipdiffusion.unet_config", "channel_mult", "ab"),
    ("clipdiffusion.unet_config", "context_dim", [32]),
    ("clipdiffusion.unet_config", "use_linear_in_transformer", "yes"),
    ("clipdiffusion.unet_config", "transformer_depth", [1, -1]),
    ("clipdiffusion.vae_config", "norm_groups", 0),
    ("clipdiffusion.vae_config", "scale_factor", NAN),
    ("clipdiffusion.vae_config", "scale_factor", 0),
    ("clipdiffusion.vae_config", "ch_mult", [1, 2, {"a": 1}]),
    ("clipdiffusion.text_configs", "layer_norm_eps", NAN),
    ("clipdiffusion.text_configs", "activation", ["gelu"]),
    ("clipdiffusion.text_configs", "width", True),
])  # fmt: skip
def test_bad_metadata_config_names_key_and_field(sources, tmp_path, key, field, value):
    def change(c):
        (c[0] if isinstance(c, list) else c)[field] = value

    path = with_metadata(sources[0], tmp_path / "m.safetensors", key, change)
    refused(lambda: load_checkpoint(path), str(path), key, field)


def test_config_dataclasses_validate_every_field():
    from clipdiffusion.diffusion import unet as U
    from clipdiffusion.diffusion import vae as V
    from clipdiffusion.text.clip import CLIPTextConfig

    for preset in [*U.PRESETS.values(), *V.PRESETS.values()]:  # the presets pass (they are built at import too)
        assert type(preset)(**dataclasses.asdict(preset)) == preset
    UC, VC, TC = U.UNetConfig, V.VAEConfig, CLIPTextConfig
    cases = [
        (UC, dict(norm_groups=7), "norm_groups=7"), (UC, dict(model_channels=-48), "-48"),
        (UC, dict(in_channels=True), "in_channels=True"), (UC, dict(in_channels=4.0), "4.0"),
        (UC, dict(channel_mult=7), "channel_mult=7"), (UC, dict(num_heads=0), "num_heads=0"),
        (UC, dict(adm_in_channels="x"), "adm_in_channels"), (UC, dict(num_res_blocks=10**6), "num_res_blocks"),
        (VC, dict(scale_factor=NAN), "scale_factor=nan"), (VC, dict(scale_factor=0), "scale_factor=0"),
        (VC, dict(scale_factor=10**400), "scale_factor"), (VC, dict(norm_groups=0), "norm_groups=0"),
        (VC, dict(ch=48), "norm_groups=32"), (VC, dict(ch_mult=[]), "ch_mult=[]"),
        (TC, dict(layer_norm_eps=NAN), "layer_norm_eps"), (TC, dict(activation=["gelu"]), "activation"),
        (TC, dict(layer_norm_eps=-1e-5), "layer_norm_eps"), (TC, dict(projection_dim=True), "projection_dim"),
        (TC, dict(width=10**9, heads=1), "width"),
    ]  # fmt: skip
    for cls, kwargs, words in cases:
        with pytest.raises(ClipDiffusionError, match=re.escape(words)):
            cls(**kwargs)


# --- integer weights, absurd shapes ---------------------------------------------------------------------------


def retyped(src, dst, key, dtype, metadata=True):
    tensors = load_file(src)
    tensors[key] = tensors[key].to(dtype)
    save_file(tensors, dst, read_header(src).metadata if metadata else None)
    return dst


@pytest.mark.parametrize("key,dtype,shown", [
    ("model.diffusion_model.input_blocks.0.0.weight", torch.int8, "I8"),
    ("first_stage_model.decoder.conv_out.weight", torch.bool, "BOOL"),
    ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", torch.int32, "I32"),
])  # fmt: skip
def test_integer_weights_in_a_single_file_are_refused(sources, tmp_path, key, dtype, shown):
    path = retyped(sources[0], tmp_path / "m.safetensors", key, dtype)
    refused(lambda: load_checkpoint(path), str(path), key, shown)


def test_integer_position_ids_still_load(sources, tmp_path):
    path = tmp_path / "m.safetensors"
    tensors = load_file(sources[0])
    tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]  # I64
    save_file(tensors, path, read_header(sources[0]).metadata)
    assert "cond_stage_model.transformer.text_model.embeddings.position_ids" in load_checkpoint(path).ignored_keys


def test_integer_weights_in_a_diffusers_folder_are_refused(sources, tmp_path):
    folder = folder_copy(sources[1], tmp_path / "f")
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    unet_file.unlink()
    retyped(sources[1] / "unet" / unet_file.name, unet_file, "conv_in.weight", torch.int8, metadata=False)
    refused(lambda: load_diffusers(folder), str(unet_file), "conv_in.weight", "I8")
    shutil.copy(sources[1] / "unet" / unet_file.name, unet_file)
    text_file = folder / "text_encoder" / "model.safetensors"
    text_file.unlink()
    tensors = load_file(sources[1] / "text_encoder" / "model.safetensors")
    tensors["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # as older transformers saved it
    save_file(tensors, text_file)
    load_diffusers(folder)
    tensors["text_model.final_layer_norm.weight"] = tensors["text_model.final_layer_norm.weight"].to(torch.uint8)
    save_file(tensors, text_file)
    refused(lambda: load_diffusers(folder), str(text_file), "final_layer_norm.weight", "U8")


def test_zero_byte_tensor_with_an_absurd_shape(sources, tmp_path):
    header = read_header(sources[0])
    raw = sources[0].read_bytes()
    obj = json.loads(raw[8:header.data_start])
    name = "cond_stage_model.transformer.evil"
    obj[name] = {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [0, 0]}
    text = json.dumps(obj).encode()
    path = tmp_path / "evil.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[header.data_start:])
    refused(lambda: load_checkpoint(path), str(path), name, "too large")
    obj[name]["shape"] = [0] + [2**39] * 7  # every dimension allowed, the product is not
    text = json.dumps(obj).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[header.data_start:])
    refused(lambda: read_header(path), name, "too large")


# --- writing: private temporary files, links, full disks ------------------------------------------------------


def test_planted_symlink_at_the_old_temporary_name_is_not_followed(sources, tmp_path):
    from clipdiffusion.cli import main

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out.safetensors"
    (tmp_path / "out.safetensors.tmp").symlink_to(victim)
    assert main(["convert", str(sources[1]), str(out)]) == 0
    assert victim.read_text() == "precious"
    assert (tmp_path / "out.safetensors.tmp").is_symlink() and not out.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "out.safetensors.tmp", "victim.txt"]
    load_checkpoint(out)


def test_symlink_destination_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(b"precious")
    link = tmp_path / "link.safetensors"
    link.symlink_to(victim)
    save_file({"a": torch.ones(2)}, link)
    assert victim.read_bytes() == b"precious" and not link.is_symlink()
    assert load_file(link)["a"].tolist() == [1.0, 1.0]


def test_written_file_has_ordinary_permissions(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "a.safetensors")
    (tmp_path / "b.txt").write_text("x")
    assert (tmp_path / "a.safetensors").stat().st_mode == (tmp_path / "b.txt").stat().st_mode


def test_folder_as_destination(tmp_path, sources):
    (tmp_path / "d.safetensors").mkdir()
    refused(lambda: save_file({"a": torch.ones(2)}, tmp_path / "d.safetensors"), "d.safetensors", "folder")
    (tmp_path / "file").write_text("x")
    refused(lambda: save_diffusers(tiny_model("tiny"), tmp_path / "file"), "not a folder")
    refused(lambda: save_file({"a": torch.ones(2)}, tmp_path / "missing" / "a.safetensors"), "missing")


def test_full_disk_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(2)}, path)
    before = path.read_bytes()

    def full(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    refused(lambda: atomic_write(path, full), str(path), "No space left on device")
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.safetensors"]


def test_file_size_limit_is_a_clean_error(tmp_path):
    """A real write failure from the OS (``ulimit -f``: EFBIG; Python ignores SIGXFSZ) mid-file."""
    resource = pytest.importorskip("resource")
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(2)}, path)
    before = path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(CheckpointError) as info:
            save_file({"a": torch.ones(100_000)}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(path) in str(info.value)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.safetensors"]


# --- fuzz: one value at a time --------------------------------------------------------------------------------

VALUES = [None, "ab", [], [0], 0, -1, 7, INF, NAN, True, {"a": 1}, 1.5, [1, 2], 10**30]


def _outcome(call, case):
    try:
        call()
    except ClipDiffusionError as exc:  # CheckpointError, or a ClipDiffusionError naming an argument
        assert "\n" not in str(exc), (case, str(exc))
        return "refused"
    except Exception as exc:  # noqa: BLE001 - the point of the test: name the case that crashed
        pytest.fail(f"{case}: {type(exc).__name__}: {exc}")
    return "loaded"


def test_fuzz_every_diffusers_config_key(sources, tmp_path):
    """Every key of every config.json, each with a value drawn from VALUES (seeded): the folder loads or is
    refused with a ClipDiffusionError, nothing else (the named cases above check the messages)."""
    rng = random.Random(14)
    good = sources[1]
    cases = []
    for rel in ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                "scheduler/scheduler_config.json"):  # fmt: skip
        for key in json.loads((good / rel).read_text()):
            cases.append((rel, key, rng.choice(VALUES)))
    outcomes = {}
    for i, (rel, key, value) in enumerate(cases):
        folder = folder_copy(good, tmp_path / str(i))
        set_config(folder, rel, key, value)
        outcomes[rel, key] = _outcome(lambda: load_diffusers(folder), f"{rel} {key}={value!r}")
        shutil.rmtree(folder)
    assert outcomes["unet/config.json", "sample_size"] == "loaded"  # not read: anything goes
    assert outcomes["unet/config.json", "block_out_channels"] == "refused"  # no value in VALUES fits


def test_fuzz_every_metadata_config_field(sources, tmp_path):
    """Every field of our metadata configs, each with three seeded values from VALUES: loads or is refused
    cleanly."""
    rng = random.Random(14)
    src = sources[0]
    meta = read_header(src).metadata
    tensors = load_file(src)
    outcomes = {}
    for key in ("clipdiffusion.unet_config", "clipdiffusion.vae_config", "clipdiffusion.text_configs"):
        fields = json.loads(meta[key])
        fields = fields[0] if isinstance(fields, list) else fields
        for field in fields:
            for value in rng.sample(VALUES, 3):
                config = json.loads(meta[key])
                (config[0] if isinstance(config, list) else config)[field] = value
                path = tmp_path / f"{field}.safetensors"
                save_file(tensors, path, dict(meta, **{key: json.dumps(config)}))
                outcomes[key, field, repr(value)] = _outcome(lambda: load_checkpoint(path), f"{key} {field}={value!r}")
                path.unlink()
    assert "refused" in outcomes.values()


def test_standalone_text_encoder_folder_with_hostile_config_or_dtypes(sources, tmp_path):
    from clipdiffusion.checkpoints.text_encoders import load_text_encoder

    folder = folder_copy(sources[1], tmp_path / "f") / "text_encoder"
    (folder / "config.json").unlink()
    # the config beside the weights gives activation, heads, eps and positions: an unreadable one is refused, by name
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(lambda: load_text_encoder(folder), str(folder / "config.json"), "unreadable")
    (folder / "config.json").write_text(json.dumps({"num_attention_heads": "12", "hidden_act": "gelu"}))
    refused(lambda: load_text_encoder(folder), "num_attention_heads='12'")
    (folder / "config.json").write_text(json.dumps({"text_config": {"hidden_act": "gelu"}}))  # a CLIPModel's
    assert load_text_encoder(folder).encoders[0].model.config.activation == "gelu"
    weights = folder / "model.safetensors"
    weights.unlink()
    retyped(sources[1] / "text_encoder" / "model.safetensors", weights, "text_model.final_layer_norm.bias",
            torch.int16, metadata=False)
    refused(lambda: load_text_encoder(folder), str(weights), "final_layer_norm.bias", "int16")


def test_convert_to_odd_destinations_is_one_line(sources, tmp_path, capsys):
    from clipdiffusion.cli import main

    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop.name)
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    for dst in (loop, blocker / "out.safetensors", tmp_path / "missing" / "out.safetensors"):
        assert main(["convert", str(sources[0]), str(dst)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("clipdiffusion convert: error:") for line in err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "loop.safetensors"]
