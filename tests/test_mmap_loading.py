"""Memory-mapped loading (issue 19 part 4): ``Pipeline.from_*(mmap=True)`` and ``--mmap``, on tiny random models.

What stays mapped is checked against ``/proc/self/maps`` directly (a parameter's memory inside a mapping of the
file), not only through the helper the notes use.
"""

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from clipdiffusion.checkpoints.safetensors_io import mapped_tensors
from clipdiffusion.cli import main
from clipdiffusion.errors import ClipDiffusionError
from clipdiffusion.pipeline import Pipeline
from clipdiffusion.testing import tiny_pipeline

HAS_PROC_MAPS = os.path.exists("/proc/self/maps")
needs_maps = pytest.mark.skipif(not HAS_PROC_MAPS, reason="no /proc/self/maps to tell mapped memory from copies")
GEN = dict(steps=3, width=32, height=32, seed=5, guidance=5.0)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    from clipdiffusion.checkpoints.save import save_checkpoint

    path = tmp_path_factory.mktemp("model") / "tiny-random.safetensors"
    save_checkpoint(tiny_pipeline(0), path)
    return path


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from clipdiffusion.checkpoints.save import save_diffusers

    folder = tmp_path_factory.mktemp("diffusers") / "tiny-random"
    save_diffusers(tiny_pipeline(0), folder)
    return folder


def weights(pipe):
    modules = (pipe.unet, pipe.vae, *(e.model for e in pipe.text_encoder.encoders))
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


def file_ranges(root):
    """[start, end) address ranges of every mapping of ``root`` (or of files under it), read here independently."""
    root = os.path.realpath(root)
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and (parts[5] == root or parts[5].startswith(root + os.sep)):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi))
    return out


def count_in_file(pipe, root):
    ranges = file_ranges(root)
    return sum(any(lo <= t.data_ptr() < hi for lo, hi in ranges) for t in weights(pipe) if t.numel())


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_mapped_file_gives_bit_identical_images(model_file):
    copied = Pipeline.from_file(model_file)
    mapped = Pipeline.from_file(model_file, mmap=True)
    a = copied.generate("a red circle", "blurry", **GEN)
    b = mapped.generate("a red circle", "blurry", **GEN)
    np.testing.assert_array_equal(a.pixels, b.pixels)
    assert any(n.startswith("mmap:") for n in b.notes) and not any(n.startswith("mmap:") for n in a.notes)


@needs_maps
def test_mapped_weights_are_views_of_the_file(model_file):
    mapped = Pipeline.from_file(model_file, mmap=True)
    copied = Pipeline.from_file(model_file)
    n = len([t for t in weights(mapped) if t.numel()])
    assert count_in_file(mapped, model_file) == n  # every weight (fp32 stored, fp32 on the CPU) is in the mapping
    assert count_in_file(copied, model_file) == 0  # the default copies: nothing points into the file
    assert mapped_tensors(weights(mapped), model_file)[0] == n
    assert mapped_tensors(weights(copied), model_file) == (0, 0)
    note = next(x for x in mapped.generate("x", **GEN).notes if x.startswith("mmap:"))
    assert f"{n} of {len(weights(mapped))} weight tensors" in note and "SIGBUS" in note
    # the file's mapping is private: weights are not owned by their own allocation, and the pointer sits inside
    # a mapping whose path is the checkpoint
    p = next(mapped.unet.parameters())
    assert any(lo <= p.data_ptr() < hi for lo, hi in file_ranges(model_file))


@needs_maps
def test_a_cast_or_a_move_still_copies(model_file):
    pipe = Pipeline.from_file(model_file, mmap=True, dtype="bf16")  # stored fp32, asked bf16: cast, so copied
    assert count_in_file(pipe, model_file) == 0
    assert all(t.dtype == torch.bfloat16 for t in pipe.unet.parameters())
    note = next(x for x in pipe.generate("x", **GEN).notes if x.startswith("mmap:"))
    assert "no weight stayed mapped" in note
    mapped = Pipeline.from_file(model_file, mmap=True)
    mapped.place("cpu", "bf16")  # placing after loading copies too
    assert count_in_file(mapped, model_file) == 0


@needs_maps
def test_in_place_changes_never_reach_the_file(model_file, tmp_path):
    from clipdiffusion.checkpoints.safetensors_io import save_file
    from clipdiffusion.testing import random_lora

    before = digest(model_file)
    pipe = Pipeline.from_file(model_file, mmap=True)
    lora = tmp_path / "l.safetensors"
    save_file(random_lora(pipe, std=0.5), lora)
    pipe.load_lora(lora, "l")
    plain = pipe.generate("x", **GEN).pixels
    merged = pipe.generate("x <lora:l:1>", **GEN).pixels  # merged in place into the mapped weights
    assert not np.array_equal(plain, merged)
    assert digest(model_file) == before  # a private (copy-on-write) mapping: the file is untouched
    np.testing.assert_array_equal(Pipeline.from_file(model_file).generate("x", **GEN).pixels, plain)


@needs_maps
def test_diffusers_folder_maps_every_component(model_folder):
    copied = Pipeline.from_pretrained(model_folder)
    mapped = Pipeline.from_pretrained(model_folder, mmap=True)
    assert count_in_file(mapped, model_folder) > 0 and count_in_file(copied, model_folder) == 0
    for module in (mapped.unet, mapped.vae, mapped.text_encoder.encoders[0].model):
        assert count_in_file_module(module, model_folder) > 0
    np.testing.assert_array_equal(copied.generate("a blue square", **GEN).pixels,
                                  mapped.generate("a blue square", **GEN).pixels)


def count_in_file_module(module, root):
    ranges = file_ranges(root)
    return sum(any(lo <= p.data_ptr() < hi for lo, hi in ranges) for p in module.parameters())


def test_a_pickle_is_copied_with_a_note(model_folder, tmp_path):
    """Only .safetensors files are mapped: a pickled .bin goes through torch.load(weights_only=True) and is copied,
    and the notes say so (an explicit fallback, not an error)."""
    import shutil

    from clipdiffusion.checkpoints.safetensors_io import load_file

    folder = tmp_path / "legacy"
    shutil.copytree(model_folder, folder)
    tower = folder / "text_encoder" / "model.safetensors"
    torch.save(load_file(tower), folder / "text_encoder" / "pytorch_model.bin")
    tower.unlink()
    pipe = Pipeline.from_pretrained(folder, mmap=True)
    if HAS_PROC_MAPS:
        assert count_in_file_module(pipe.text_encoder.encoders[0].model, folder) == 0
        assert count_in_file_module(pipe.unet, folder) > 0
    notes = pipe.generate("x", **GEN).notes
    assert any("pytorch_model.bin is a pickle" in n and "copied" in n for n in notes), notes
    np.testing.assert_array_equal(pipe.generate("x", **GEN).pixels,
                                  Pipeline.from_pretrained(model_folder).generate("x", **GEN).pixels)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_mmap_must_be_a_bool(model_file, value):
    with pytest.raises(ClipDiffusionError, match=f"mmap must be True or False, got {value!r}"):
        Pipeline.from_file(model_file, mmap=value)


def test_cli_generate_mmap(model_file, tmp_path, capsys):
    out = tmp_path / "m.png"
    plain = tmp_path / "p.png"
    args = ["generate", "--model", str(model_file), "--width", "32", "--height", "32", "--steps", "2", "--seed", "3",
            "a green triangle"]
    assert main([*args, "--mmap", "-o", str(out)]) == 0
    assert "mmap:" in capsys.readouterr().err
    assert main([*args, "-o", str(plain)]) == 0
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(plain)))


@pytest.mark.parametrize("command", ["generate", "serve", "eval", "batch"])
def test_every_loading_command_has_mmap(command):
    import argparse
    import importlib

    parser = argparse.ArgumentParser()
    importlib.import_module(f"clipdiffusion.commands.{command}").add_arguments(parser)
    help_text = parser.format_help()
    assert "--mmap" in help_text and "SIGBUS" in help_text


def test_serve_passes_mmap_to_the_loader(model_file, monkeypatch):
    from clipdiffusion.commands import serve
    from clipdiffusion.server.settings import ModelEntry, ServerSettings

    seen = {}

    def fake(path, **kw):
        seen.update(kw)
        return "pipe"

    monkeypatch.setattr(Pipeline, "from_file", staticmethod(fake))
    settings = ServerSettings(models=(ModelEntry("m", str(model_file)),), mmap=True)
    assert serve.pipeline_factory(settings)("m") == "pipe" and seen["mmap"] is True
