"""Safe weight reading: hostile safetensors headers crafted byte by byte, hostile pickles, and round trips."""

import json
import pickle
import struct
import zipfile

import pytest
import torch

from clipdiffusion.checkpoints.safetensors_io import load_file, load_pickle, read_header, save_file
from clipdiffusion.errors import CheckpointError


def craft(path, header, data=b"", *, raw_header=None, length=None):
    """Write a safetensors-shaped file with full control over every byte."""
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    n = len(raw) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def f32(shape, start):
    n = 4
    for d in shape:
        n *= d
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [start, start + n]}


def refused(path, *words):
    with pytest.raises(CheckpointError) as info:
        load_file(path)
    msg = str(info.value)
    assert str(path) in msg
    for word in words:
        assert word in msg, msg
    return msg


def test_valid_hand_crafted_file_loads(tmp_path):
    p = craft(tmp_path / "ok.safetensors", {"a": f32([2], 0), "b": f32([], 8)}, struct.pack("<3f", 1, 2, 3))
    out = load_file(p)
    assert out["a"].tolist() == [1.0, 2.0] and out["b"].item() == 3.0 and out["b"].shape == ()


def test_legal_edge_cases_load(tmp_path):
    """Misaligned offsets (older writers), space-padded headers and empty tensors are valid files."""
    header = {"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}, "b": f32([2], 2),
              "e": {"dtype": "F16", "shape": [0, 3], "data_offsets": [10, 10]}}  # fmt: skip
    raw = json.dumps(header).encode() + b"   "
    p = craft(tmp_path / "edge.safetensors", None, bytes([7, 9]) + struct.pack("<2f", 1.5, -2.0), raw_header=raw)
    out = load_file(p)
    assert out["a"].tolist() == [7, 9] and out["b"].tolist() == [1.5, -2.0] and out["e"].shape == (0, 3)


@pytest.mark.parametrize("content", [b"", b"\x01\x02\x03"])
def test_truncated_file(tmp_path, content):
    p = tmp_path / "t.safetensors"
    p.write_bytes(content)
    refused(p, "too short")


def test_header_length_larger_than_file(tmp_path):
    p = craft(tmp_path / "h.safetensors", {}, raw_header=b"{}", length=10_000)
    refused(p, "larger than the file")


def test_header_length_2_pow_60_is_refused_without_allocating(tmp_path):
    p = craft(tmp_path / "h.safetensors", {}, raw_header=b"{}", length=2**60)
    refused(p, "exceeds")


def test_invalid_json_and_non_object(tmp_path):
    refused(craft(tmp_path / "a.safetensors", None, raw_header=b"{not json"), "not valid JSON")
    refused(craft(tmp_path / "b.safetensors", None, raw_header=b"[1, 2]"), "start with '{'")
    refused(craft(tmp_path / "c.safetensors", None, raw_header=b"{\"a\": 1}"), "not an object")
    refused(craft(tmp_path / "d.safetensors", None, raw_header=b"{\xff\xfe}"), "UTF-8")


def test_deeply_nested_json_is_refused_cleanly(tmp_path):
    raw = b"{\"a\":" + b"[" * 100_000 + b"]" * 100_000 + b"}"
    refused(craft(tmp_path / "n.safetensors", None, raw_header=raw))


def test_overlapping_offsets(tmp_path):
    header = {"a": f32([2], 0), "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    refused(craft(tmp_path / "o.safetensors", header, bytes(12)), "overlaps")


def test_aliased_offsets(tmp_path):
    header = {f"t{i}": f32([2], 0) for i in range(3)}
    refused(craft(tmp_path / "o.safetensors", header, bytes(8)), "overlaps")


def test_out_of_range_offsets(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}
    refused(craft(tmp_path / "r.safetensors", header, bytes(16)), "beyond")


def test_gap_between_tensors(tmp_path):
    header = {"a": f32([1], 0), "b": f32([1], 8)}
    refused(craft(tmp_path / "g.safetensors", header, bytes(12)), "gap")


def test_trailing_bytes_after_the_data(tmp_path):
    refused(craft(tmp_path / "x.safetensors", {"a": f32([1], 0)}, bytes(4) + b"payload"), "data region")


def test_wrong_byte_size_for_shape(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
    refused(craft(tmp_path / "w.safetensors", header, bytes(8)), "needs 12 bytes")


@pytest.mark.parametrize("shape", [[-1], [2**40, 2**40, 2**40], [1.5], ["3"], [True], [1] * 9, "12"])
def test_negative_huge_or_malformed_shapes(tmp_path, shape):
    header = {"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}}
    refused(craft(tmp_path / "s.safetensors", header, bytes(4)), "'a'")


@pytest.mark.parametrize("shape", [[0, 2**70], [2**41, 0], [0] + [2**39] * 7])
def test_zero_byte_tensor_with_an_absurd_shape(tmp_path, shape):
    """0 bytes match any shape with a zero in it, but torch.empty overflows on such dimensions: refused by name."""
    header = {"a": f32([1], 0), "zero": {"dtype": "F32", "shape": shape, "data_offsets": [4, 4]}}
    refused(craft(tmp_path / "z.safetensors", header, bytes(4)), "'zero'", "too large")


def test_unknown_dtype_and_fp8(tmp_path):
    bad = {"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}
    refused(craft(tmp_path / "u.safetensors", bad, bytes(1)), "unknown dtype")
    fp8 = {"a": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}
    refused(craft(tmp_path / "f.safetensors", fp8, bytes(1)), "(fp8) is not supported")


def test_duplicate_keys(tmp_path):
    raw = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    refused(craft(tmp_path / "d.safetensors", None, raw_header=raw, data=bytes(4)), "duplicate key")


def test_bad_metadata_and_entry_fields(tmp_path):
    refused(craft(tmp_path / "m.safetensors", {"__metadata__": {"k": 1}}), "__metadata__")
    refused(craft(tmp_path / "l.safetensors", {"__metadata__": []}), "__metadata__")
    refused(craft(tmp_path / "e.safetensors", {"a": {"dtype": "F32", "shape": [1]}}, bytes(4)), "data_offsets")
    refused(craft(tmp_path / "n.safetensors", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}))


def test_header_is_checked_before_data_is_touched(tmp_path):
    header = {"a": f32([2], 0), "__metadata__": {"format": "pt"}}
    h = read_header(craft(tmp_path / "ok.safetensors", header, bytes(8)))
    assert h.tensors["a"].shape == (2,) and h.tensors["a"].dtype == "F32" and h.metadata == {"format": "pt"}


def test_round_trip_mixed_dtypes_and_metadata(tmp_path):
    tensors = {
        "w16": torch.randn(3, 5).half(),
        "wbf": torch.randn(7).bfloat16(),
        "w32": torch.randn(2, 2, 2),
        "w64": torch.randn(1).double(),
        "ids": torch.arange(77).reshape(1, 77),
        "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "view": torch.arange(12.0).reshape(3, 4).t(),  # non-contiguous input
    }
    p = tmp_path / "rt.safetensors"
    save_file(tensors, p, metadata={"clipdiffusion.family": "tiny", "note": "ünïcode"})
    h = read_header(p)
    assert h.data_start % 8 == 0
    assert h.metadata == {"clipdiffusion.family": "tiny", "note": "ünïcode"}
    back = load_file(p)
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    # the reference library reads what we write
    from safetensors.torch import load_file as st_load

    ref = st_load(str(p))
    assert all(torch.equal(ref[k], v) for k, v in tensors.items())
    mapped = load_file(p, copy=False)  # the safetensors library's zero-copy mapping gives the same tensors
    assert all(torch.equal(mapped[k], v) and mapped[k].dtype == v.dtype for k, v in tensors.items())
    # casting applies to floating tensors only; integer buffers keep their dtype
    cast = load_file(p, dtype=torch.float16, keys=["w32", "ids"])
    assert set(cast) == {"w32", "ids"} and cast["w32"].dtype == torch.float16 and cast["ids"].dtype == torch.int64


def test_reference_writer_output_is_accepted(tmp_path):
    from safetensors.torch import save_file as st_save

    p = tmp_path / "ref.safetensors"
    st_save({"a": torch.ones(3, dtype=torch.float16), "b": torch.zeros(2, 2)}, str(p), metadata={"m": "v"})
    out = load_file(p)
    assert out["a"].dtype == torch.float16 and out["b"].shape == (2, 2)
    assert read_header(p).metadata == {"m": "v"}


def test_missing_requested_key(tmp_path):
    p = tmp_path / "k.safetensors"
    save_file({"a": torch.ones(1)}, p)
    with pytest.raises(CheckpointError, match="requested keys"):
        load_file(p, keys=["b"])


# --- pickles -------------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs code: it creates a marker file (the classic __reduce__ attack)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "x": _Payload(str(marker))}, p)
    assert not marker.exists()
    msg = refused(p, "weights-only unpickler")
    assert "\n" not in msg
    assert not marker.exists(), "the payload ran"
    # the payload is real: the unsafe unpickler (never used by us) does run it
    torch.load(p, weights_only=False)
    assert marker.exists()


def test_raw_pickle_and_garbage_are_refused(tmp_path):
    marker = tmp_path / "pwned2"
    p = tmp_path / "raw.pt"
    p.write_bytes(pickle.dumps(_Payload(str(marker))))
    refused(p, "refused")
    assert not marker.exists()
    g = tmp_path / "garbage.ckpt"
    g.write_bytes(b"\x00" * 100)
    refused(g, "refused")
    z = tmp_path / "empty_zip.ckpt"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("archive/data.pkl", b"not a pickle")
    refused(z, "refused")


def test_non_dict_pickles_are_refused(tmp_path):
    p = tmp_path / "list.pt"
    torch.save([torch.ones(1)], p)
    refused(p, "not a state dict")
    q = tmp_path / "t.pt"
    torch.save(torch.ones(3), q)
    refused(q, "not a state dict")
    r = tmp_path / "mixed.pt"
    torch.save({"w": torch.ones(1), "step": 3}, r)
    refused(r, "non-tensor")


def test_nested_state_dict_is_unwrapped(tmp_path):
    p = tmp_path / "nested.ckpt"
    torch.save({"state_dict": {"state_dict": {"w": torch.arange(3.0)}}, "global_step": 10}, p)
    out = load_pickle(p)
    assert list(out) == ["w"] and out["w"].tolist() == [0.0, 1.0, 2.0]
    assert load_file(p, dtype=torch.float16)["w"].dtype == torch.float16
