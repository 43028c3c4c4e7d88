"""Broken and malicious textual-inversion files: each is refused with ``CheckpointError`` (a ValueError) naming the
file and the reason, by ``Pipeline.load_textual_inversion`` and by a folder scan (which skips it and goes on); a
pickle with code never runs it."""

import builtins
import struct

import pytest
import torch

from clipdiffusion.checkpoints.embeddings import MAX_FILE_BYTES, load_folder
from clipdiffusion.checkpoints.safetensors_io import save_file
from clipdiffusion.errors import CheckpointError
from clipdiffusion.testing import tiny_pipeline

WIDTH = 32


class _Exec:
    """Pickles as a call to exec: a loader that ran it would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').write('ran')",)


def _v(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def _st(tensors):
    return lambda path: save_file(tensors, path)


def _pt(obj):
    return lambda path: torch.save(obj, path)


def _raw(data):
    return lambda path: path.write_bytes(data)


def _nan():
    v = _v(2, WIDTH)
    v[1, 3] = float("nan")
    return v


def _inf():
    v = _v(1, WIDTH)
    v[0, 0] = float("inf")
    return v


def _oversize(path):
    with open(path, "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: costs no disk


def _bad_header(path):
    header = b'{"emb_params": {"dtype": "F32", "shape": [2, 32], "data_offsets": [0, 999999]}}'
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)


CASES = {
    "nan.safetensors": (_st({"emb_params": _nan()}), "non-finite"),
    "inf.pt": (_pt({"string_to_param": {"*": _inf()}}), "non-finite"),
    "cube.safetensors": (_st({"emb_params": _v(2, 3, WIDTH)}), r"shape \[2, 3, 32\]"),
    "zero_rows.safetensors": (_st({"emb_params": torch.zeros(0, WIDTH)}), "zero vectors"),
    "too_many.safetensors": (_st({"emb_params": _v(76, WIDTH)}), "76 vectors"),
    "ints.safetensors": (_st({"emb_params": torch.ones(2, WIDTH, dtype=torch.int32)}), "dtype I32"),
    "ints.pt": (_pt({"string_to_param": {"*": torch.ones(2, WIDTH, dtype=torch.int64)}}), "dtype int64"),
    "two_params.pt": (_pt({"string_to_param": {"*": _v(1, WIDTH), "x": _v(1, WIDTH)}}), "exactly one entry, got 2"),
    "params_list.pt": (_pt({"string_to_param": [_v(1, WIDTH)]}), "exactly one entry, got list"),
    "param_not_tensor.pt": (_pt({"string_to_param": {"*": [1.0, 2.0]}}), "not a tensor"),
    "two_keys.safetensors": (_st({"a": _v(1, WIDTH), "b": _v(1, WIDTH)}), "not an embedding.*'a', 'b'"),
    "rows_differ.safetensors": (_st({"clip_l": _v(2, WIDTH), "clip_g": _v(3, WIDTH)}), "different numbers"),
    "sdxl_extra.safetensors": (_st({"clip_l": _v(1, WIDTH), "clip_g": _v(1, WIDTH), "x": _v(1)}), "unexpected"),
    "bare_tensor.pt": (_pt(_v(2, WIDTH)), "not a dict"),
    "garbage.pt": (_raw(b"PK\x03\x04 definitely not a zip"), "weights-only unpickler"),
    "garbage.safetensors": (_raw(b"\x05\0\0\0\0\0\0\0hello"), "header"),
    "bad_offsets.safetensors": (_bad_header, "data_offsets"),
    "huge.safetensors": (_oversize, "more than the"),
    "wide.safetensors": (_st({"emb_params": _v(2, 768)}), "width is 768"),
    "model.ckpt": (_raw(b"x"), "not an embedding file"),
}


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=1)


@pytest.mark.parametrize("name", sorted(CASES))
def test_refused_with_the_file_and_the_reason(tmp_path, pipe, name):
    write, reason = CASES[name]
    path = tmp_path / name
    write(path)
    with pytest.raises(CheckpointError, match=reason) as info:
        pipe.load_textual_inversion(path)
    assert isinstance(info.value, ValueError) and info.value.path == str(path)
    assert len(pipe.text_encoder.embeddings) == 0


def test_pickled_code_is_refused_and_never_runs(tmp_path, pipe):
    marker = tmp_path / "ran.txt"
    for name, obj in (("evil.pt", {"string_to_param": {"*": _Exec(marker)}}), ("evil.bin", {"tok": _Exec(marker)})):
        torch.save(obj, tmp_path / name)
        with pytest.raises(CheckpointError, match=f"{name}: refused by the weights-only unpickler"):
            pipe.load_textual_inversion(tmp_path / name)
    assert not marker.exists()


def test_a_folder_of_hostile_files_skips_each_with_its_reason(tmp_path, pipe):
    for name, (write, _) in CASES.items():
        if name != "model.ckpt":  # other suffixes are not scanned at all
            write(tmp_path / name)
    torch.save({"string_to_param": {"*": _Exec(tmp_path / "ran.txt")}}, tmp_path / "evil.pt")
    save_file({"emb_params": _v(2, WIDTH)}, tmp_path / "good.safetensors")
    report = load_folder(tmp_path, pipe.text_encoder)
    assert [e.name for e in report.loaded] == ["good"]
    expected = {n.rsplit(".", 1)[0] for n in CASES if n != "model.ckpt"} | {"evil"}
    names = {k.split(" (")[0] for k in report.skipped}
    assert names == expected and all(str(tmp_path) in e["reason"] for e in report.skipped.values())
    assert not (tmp_path / "ran.txt").exists()
