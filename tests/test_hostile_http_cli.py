"""Hostile input (issue 14): booleans and non-finite numbers in request fields, images whose header declares a
huge size, PNG text chunks that inflate to gigabytes, and output files that cannot be written.

Every case must end in a 4xx naming the field (HTTP) or one error line (CLI), never a 500, a traceback, a large
allocation, or a lost file. The server runs on loopback with `server_fixtures.FakePipeline`.
"""

import base64
import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib

import httpx
import pytest
from PIL import Image, ImageFile, PngImagePlugin

from clipdiffusion.errors import ClipDiffusionError
from clipdiffusion.server import images
from clipdiffusion.server.app import create_app
from clipdiffusion.server.settings import ModelEntry, ServerSettings
from server_fixtures import FAKE_SAMPLERS, FAKE_SCHEDULES, FakePipeline, ServerThread, fake_factory

SETTINGS = ServerSettings(models=(ModelEntry("tiny-a"),), samplers=FAKE_SAMPLERS, schedules=FAKE_SCHEDULES,
                          max_width=256, max_height=256, max_steps=50, max_batch_size=4, max_n_iter=3,
                          max_prompt_chars=500, max_body_bytes=2_000_000, queue_size=4)
BASE = {"prompt": "p", "steps": 1, "width": 16, "height": 16}


@pytest.fixture(scope="module")
def served():
    pipe = FakePipeline()
    with ServerThread(create_app(fake_factory(pipe), SETTINGS)) as server:
        server.pipe = pipe
        yield server


@pytest.fixture()
def client(served):
    served.pipe.calls.clear()
    with httpx.Client(base_url=served.url, timeout=30) as c:
        yield c


def post_raw(client, path, text):
    """POST a JSON text as is: NaN and Infinity literals, which json= would not write."""
    return client.post(path, content=text.encode(), headers={"content-type": "application/json"})


def field_error(response, field):
    assert response.status_code == 422, (response.status_code, response.text)
    detail = response.json()["detail"]
    assert any(field == ".".join(map(str, d["loc"][1:])) for d in detail), detail
    return " ".join(d["msg"] for d in detail)


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width, height, *, before=b"", after=b"", idat=b"not zlib at all") -> bytes:
    """A PNG whose IHDR declares width x height, with garbage pixel data: only its header and chunks can be
    read; decoding it fails, or first allocates width x height."""
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + before + chunk(b"IDAT", idat) + after + chunk(b"IEND", b"")


def text_chunk(key: str, value: str) -> bytes:
    return chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))


def ztxt_bomb(key="parameters", size=50_000_000) -> bytes:
    """A zTXt of about 50 KB that inflates to `size` bytes."""
    return chunk(b"zTXt", key.encode() + b"\0\0" + zlib.compress(b"a" * size, 9))


def itxt_bomb(key="parameters", size=50_000_000) -> bytes:
    return chunk(b"iTXt", key.encode() + b"\0\1\0en\0\0" + zlib.compress(b"a" * size, 9))


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def real_png(size=(16, 16), colour=(10, 200, 30), insert=b"") -> bytes:
    """A decodable PNG; `insert` goes right after IHDR (before the pixels)."""
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    raw = buf.getvalue()
    return raw[:33] + insert + raw[33:]  # signature (8) + IHDR chunk (25)


@pytest.fixture()
def no_pixel_decoding(monkeypatch):
    def refuse(self, *a, **k):
        raise AssertionError("pixels were decoded")

    Image.init()  # some plugins draw an image when imported
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    monkeypatch.setattr(Image.Image, "load", refuse)


# -- booleans and non-finite numbers --------------------------------------------------------------------------

A1111_NUMERIC = ["steps", "seed", "width", "height", "batch_size", "n_iter", "cfg_scale"]
OWN_NUMERIC = ["steps", "seed", "width", "height", "batch_size", "clip_skip", "guidance"]


@pytest.mark.parametrize("value", [True, False])
def test_booleans_are_not_numbers(client, served, value):
    for name in A1111_NUMERIC:
        msg = field_error(client.post("/sdapi/v1/txt2img", json={**BASE, name: value}), name)
        assert "not " + str(value).lower() in msg
    img2img = {**BASE, "init_images": [b64(real_png())]}
    for name in A1111_NUMERIC + ["denoising_strength", "resize_mode"]:
        field_error(client.post("/sdapi/v1/img2img", json={**img2img, name: value}), name)
    for name in OWN_NUMERIC:
        field_error(client.post("/api/generate", json={"prompt": "p", name: value}), name)
    field_error(client.post("/api/encode", json={"prompt": "p", "clip_skip": value}), "clip_skip")
    field_error(client.post("/sdapi/v1/txt2img", json={
        **BASE, "override_settings": {"CLIP_stop_at_last_layers": value}}),
        "override_settings.CLIP_stop_at_last_layers")
    field_error(client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": value}),
                "CLIP_stop_at_last_layers")
    assert served.pipe.calls == []


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", '"NaN"', '"Infinity"',
                                     '"inf"'])
def test_non_finite_numbers_are_422_naming_the_field(client, served, literal):
    for name in A1111_NUMERIC:
        field_error(post_raw(client, "/sdapi/v1/txt2img", f'{{"prompt": "p", "steps": 1, "{name}": {literal}}}'),
                    name)
    init = json.dumps(b64(real_png()))
    for name in ("denoising_strength", "resize_mode"):
        field_error(post_raw(client, "/sdapi/v1/img2img",
                             f'{{"prompt": "p", "init_images": [{init}], "{name}": {literal}}}'), name)
    for name in OWN_NUMERIC:
        field_error(post_raw(client, "/api/generate", f'{{"prompt": "p", "{name}": {literal}}}'), name)
    field_error(post_raw(client, "/api/encode", f'{{"prompt": "p", "clip_skip": {literal}}}'), "clip_skip")
    field_error(post_raw(client, "/sdapi/v1/txt2img",
                         f'{{"prompt": "p", "override_settings": {{"CLIP_stop_at_last_layers": {literal}}}}}'),
                "override_settings.CLIP_stop_at_last_layers")
    # an unknown field of a strict schema is named, its value echoed as text, not a 500
    field_error(post_raw(client, "/api/generate", f'{{"prompt": "p", "bogus": [{{"x": {literal}}}]}}'), "bogus")
    assert served.pipe.calls == []
    if literal.startswith('"'):
        return  # a string: fine where text belongs
    # a number where text belongs is refused, not read as the text "NaN"
    for path, name in [("/sdapi/v1/txt2img", "prompt"), ("/sdapi/v1/txt2img", "sampler_name"),
                       ("/api/generate", "prompt"), ("/api/generate", "model"), ("/api/encode", "negative_prompt"),
                       ("/api/tokenize", "prompt"), ("/sdapi/v1/png-info", "image")]:
        assert "string" in field_error(post_raw(client, path, f'{{"{name}": {literal}}}'), name)
    field_error(post_raw(client, "/sdapi/v1/img2img", f'{{"prompt": "p", "init_images": [{literal}]}}'),
                "init_images.0")
    for path in ("/sdapi/v1/txt2img", "/api/generate", "/api/tokenize"):  # the whole body
        assert post_raw(client, path, literal).status_code == 422
    assert served.pipe.calls == []


def test_non_finite_values_in_ignored_fields_do_not_break_the_response(client, served):
    r = post_raw(client, "/sdapi/v1/txt2img", '{"prompt": "p", "steps": 1, "width": 16, "height": 16, '
                                               '"s_tmax": Infinity, "my_ext": {"a": [NaN, 1e999]}}')
    assert r.status_code == 200, r.text
    body = json.loads(r.text)  # strict JSON: no NaN literal in the response
    assert json.loads(body["info"])["ignored_fields"] == ["my_ext"]  # s_tmax=inf is A1111's neutral value
    assert body["parameters"]["my_ext"] == {"a": ["NaN", "Infinity"]}


def test_integral_numbers_and_numeric_types(client, served):
    r = client.post("/sdapi/v1/txt2img", json={**BASE, "steps": 2.0, "width": 16.0, "cfg_scale": 5,
                                               "override_settings": {"CLIP_stop_at_last_layers": 2.0}})
    assert r.status_code == 200, r.text
    call = served.pipe.calls[-1]
    assert (call["steps"], call["width"], call["guidance"], call["clip_skip"]) == (2, 16, 5.0, 2)
    assert type(call["steps"]) is int and type(call["clip_skip"]) is int
    field_error(client.post("/sdapi/v1/txt2img", json={**BASE, "steps": 2.5}), "steps")
    field_error(client.post("/sdapi/v1/txt2img", json={**BASE, "seed": 1e300}), "seed")
    field_error(client.post("/sdapi/v1/txt2img", json={**BASE, "cfg_scale": "x"}), "cfg_scale")


# -- png-info reads text chunks without decoding pixels --------------------------------------------------------


def test_png_info_does_not_decode_pixels(client, no_pixel_decoding):
    text = "a cat\nSteps: 3, Sampler: Euler, CFG scale: 5, Seed: 7, Size: 4096x4096"
    raw = png_declaring(4096, 4096, before=text_chunk("parameters", text), after=text_chunk("Comment", "late"))
    r = client.post("/sdapi/v1/png-info", json={"image": b64(raw)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["info"] == text and body["items"] == {"Comment": "late"}  # chunks after IDAT too
    assert body["parameters"]["Steps"] == 3 and body["parameters"]["Size-1"] == 4096
    r = client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + b64(png_declaring(1, 1))})
    assert r.status_code == 200 and r.json()["info"] == ""


def test_png_text_memory_is_bounded():
    import tracemalloc

    raw = png_declaring(65535, 65535, before=text_chunk("parameters", "x"), idat=os.urandom(100_000))
    tracemalloc.start()
    try:
        assert images.read_png_text(b64(raw), 10) == ("x", {})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak  # the base64 and the bytes of the file, nothing the size of the image


@pytest.mark.parametrize("bomb", [ztxt_bomb, itxt_bomb])
def test_decompression_bomb_text_is_422(client, bomb, no_pixel_decoding):
    raw = png_declaring(16, 16, before=bomb())
    msg = field_error(client.post("/sdapi/v1/png-info", json={"image": b64(raw)}), "image")
    assert "parameters" in msg and str(images.MAX_PNG_TEXT_BYTES) in msg
    # many small chunks add up to the same budget
    many = b"".join(bomb(f"k{i}", 200_000) for i in range(8))
    field_error(client.post("/sdapi/v1/png-info", json={"image": b64(png_declaring(16, 16, before=many))}),
                "image")


def test_png_text_matches_what_pil_reads():
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "caf\xe9 prompt\nSteps: 2")
    info.add_text("zipped", "z" * 5000, zip=True)
    info.add_itxt("intl", "\u732b\u3068\u72ac", lang="ja", tkey="neko")
    info.add_itxt("intl-zipped", "\u732b" * 3000, zip=True)
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG", pnginfo=info)
    expected = {k: v for k, v in Image.open(io.BytesIO(buf.getvalue())).info.items() if isinstance(v, str)}
    assert images.png_text(buf.getvalue()) == expected
    assert images.read_png_text(b64(buf.getvalue()))[0] == "caf\xe9 prompt\nSteps: 2"
    bad_crc = bytearray(png_declaring(4, 4, before=text_chunk("parameters", "x")))
    bad_crc[33 + 8 + 12] ^= 1  # the last byte of the tEXt chunk's data
    assert images.png_text(bytes(bad_crc)) == {}


def test_png_info_other_formats_and_junk(client, request):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    request.getfixturevalue("no_pixel_decoding")
    assert client.post("/sdapi/v1/png-info", json={"image": b64(buf.getvalue())}).json()["info"] == ""
    webp = webp_declaring(16384, 16384)
    assert client.post("/sdapi/v1/png-info", json={"image": b64(webp)}).status_code == 200
    field_error(client.post("/sdapi/v1/png-info", json={"image": b64(b"\x89PNG\r\n\x1a\nJUNK")}), "image")
    field_error(client.post("/sdapi/v1/png-info", json={"image": b64(b"GIF89a")}), "image")


# -- img2img: declared size checked before decoding -----------------------------------------------------------


def webp_declaring(width, height) -> bytes:
    """An extended-format WebP header (VP8X) declaring a width x height canvas; libwebp allocates the canvas
    when PIL opens the file."""
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\0\0\0\0" + (width - 1).to_bytes(3, "little") + (
        height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x


def jpeg_declaring(width, height) -> bytes:
    """A small JPEG whose frame header (SOF0) is rewritten to declare width x height."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    raw = bytearray(buf.getvalue())
    sof = raw.index(b"\xff\xc0")
    raw[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(raw)


@pytest.mark.parametrize("make, size", [(png_declaring, (20000, 20000)), (png_declaring, (257, 256)),
                                         (webp_declaring, (16384, 16384)), (jpeg_declaring, (5000, 5000)),
                                         (jpeg_declaring, (65000, 65000))])
def test_oversized_init_images_are_422_before_decoding(client, served, monkeypatch, make, size):
    def no_open(*a, **k):
        raise AssertionError("PIL opened an image larger than the limit")

    def no_load(*a, **k):
        raise AssertionError("pixels were decoded")

    if make is jpeg_declaring:  # no header reader of ours: PIL reads the header, nothing more
        monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    else:  # PNG and WebP sizes are read before PIL sees the file (libwebp allocates the canvas on open)
        monkeypatch.setattr(Image, "open", no_open)
    body = {**BASE, "init_images": [b64(make(*size))]}
    msg = field_error(client.post("/sdapi/v1/img2img", json=body), "init_images[0]")
    assert f"{size[0]}x{size[1]}" in msg or f"{size[0] * size[1]} pixels" in msg, msg
    monkeypatch.undo()
    body = {**BASE, "init_images": [b64(real_png()), b64(make(*size))]}
    msg = field_error(client.post("/sdapi/v1/img2img", json=body), "init_images[1]")
    assert f"{size[0]}x{size[1]}" in msg or f"{size[0] * size[1]} pixels" in msg, msg
    assert served.pipe.calls == []


def test_init_image_text_chunks_are_not_inflated(client, served):
    # PIL would inflate a zTXt while opening a PNG (up to 64 MB per image); the pixels are all img2img needs
    raw = real_png(insert=ztxt_bomb() + itxt_bomb("other"))
    r = client.post("/sdapi/v1/img2img", json={**BASE, "init_images": [b64(raw)]})
    assert r.status_code == 200, r.text
    assert served.pipe.calls[-1]["init_image"].getpixel((3, 3)) == (10, 200, 30)


def test_declared_size_reader():
    assert images.declared_size(png_declaring(123, 45)) == (123, 45)
    assert images.declared_size(webp_declaring(300, 200)) == (300, 200)
    for mode in ("RGB", "RGBA"):
        for lossless in (False, True):
            buf = io.BytesIO()
            Image.new(mode, (37, 21)).save(buf, format="WEBP", lossless=lossless)
            assert images.declared_size(buf.getvalue()) == (37, 21), (mode, lossless)
    assert images.declared_size(b"GIF89a") is None


# -- output files ---------------------------------------------------------------------------------------------


def test_atomic_write_under_a_file_size_limit_keeps_the_old_file(tmp_path):
    """`ulimit -f`: Python ignores SIGXFSZ, so the write fails with EFBIG rather than killing the process; the
    temporary file goes, the old file stays."""
    out = tmp_path / "old_good.png"
    out.write_bytes(b"good old image")
    code = textwrap.dedent(f"""
        import resource, signal, sys
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN
        from clipdiffusion.errors import ClipDiffusionError
        from clipdiffusion.fileio import atomic_write
        try:
            atomic_write({str(out)!r}, lambda f: f.write(b"x" * 100_000))
        except ClipDiffusionError as exc:
            print(exc)
            sys.exit(2)
        """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert f"output={str(out)!r}" in proc.stdout and "File too large" in proc.stdout and "unchanged" in proc.stdout
    assert out.read_bytes() == b"good old image"
    assert [p.name for p in tmp_path.iterdir()] == ["old_good.png"]


def test_atomic_write_cleans_up_after_any_failure(tmp_path):
    from clipdiffusion.fileio import atomic_write, check_output

    out = tmp_path / "a.bin"
    out.write_bytes(b"old")

    def boom(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(out, boom)
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]
    assert atomic_write(out, lambda f: f.write(b"new")) == out and out.read_bytes() == b"new"
    with pytest.raises(ClipDiffusionError, match="is a folder"):
        check_output(tmp_path)
    with pytest.raises(ClipDiffusionError, match="not a folder"):
        check_output(out / "x.bin")
    with pytest.raises(ClipDiffusionError, match="does not exist"):
        check_output(tmp_path / "no" / "x.bin")


@pytest.mark.parametrize("body", ["NaN", "[NaN]", "1e999", "[1, 2]", '"text"'])
def test_options_body_that_is_not_an_object_is_422(client, body):
    response = post_raw(client, "/sdapi/v1/options", body)
    assert response.status_code == 422, (response.status_code, response.text)
    assert response.json()["detail"]
