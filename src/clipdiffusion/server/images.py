"""Images in requests and responses: base64 uploads decoded with their declared size checked before any pixel is,
PNG text chunks read without decoding pixels (bounded inflation), PNGs written with the A1111 infotext. Torch-free.
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
import zlib
from typing import Any

from ..request import RequestError


# Formats accepted as uploads: what A1111 clients send. PIL's other plugins are not offered to strangers.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # a JPEG may open as MPO, its multi-picture form
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
# All text chunks of one image together, decompressed: an A1111 infotext is a few KB; a zTXt of a few KB can
# inflate to gigabytes.
MAX_PNG_TEXT_BYTES = 1 << 20


def _b64_payload(text: Any, field_name: str) -> bytes:
    """A base64 image (optionally a data: URL) -> its bytes, or RequestError naming the field. URLs are refused:
    the server never fetches on a client's behalf."""
    if not isinstance(text, str) or not text:
        raise RequestError(field_name, text, "expected a base64-encoded image")
    payload = text.strip()
    if payload.startswith("data:"):
        header, sep, payload = payload.partition(",")
        if not sep or ";base64" not in header:
            raise RequestError(field_name, text, "expected a data:image/...;base64, URL")
    elif payload.startswith(("http://", "https://")):
        raise RequestError(field_name, text, "URLs are not fetched; send the image as base64")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(field_name, text, "not valid base64") from None


def _png_chunks(raw: bytes):
    """(type, data start, data end) of each complete chunk of a PNG, up to IEND; no chunk is decompressed.
    Stops at a truncated chunk (what is there is read, as PIL reads a PNG's text chunks)."""
    pos, size = len(PNG_SIGNATURE), len(raw)
    while pos + 12 <= size:
        length, kind = struct.unpack_from(">I4s", raw, pos)
        start, end = pos + 8, pos + 8 + length
        if end + 4 > size:
            return
        yield kind, start, end
        if kind == b"IEND":
            return
        pos = end + 4


def declared_size(raw: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG or WebP header, None for other formats. Read before PIL opens the image:
    libwebp allocates the whole canvas when PIL opens a WebP, before any size check of ours could run."""
    if raw.startswith(PNG_SIGNATURE) and raw[12:16] == b"IHDR" and len(raw) >= 24:
        return struct.unpack_from(">II", raw, 16)
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP" and len(raw) >= 30:
        kind = raw[12:16]
        if kind == b"VP8X":
            return 1 + int.from_bytes(raw[24:27], "little"), 1 + int.from_bytes(raw[27:30], "little")
        if kind == b"VP8L" and raw[20] == 0x2F:
            bits = int.from_bytes(raw[21:25], "little")
            return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
        if kind == b"VP8 " and raw[23:26] == b"\x9d\x01\x2a":
            return (int.from_bytes(raw[26:28], "little") & 0x3FFF, int.from_bytes(raw[28:30], "little") & 0x3FFF)
    return None


def _without_png_text(raw: bytes) -> bytes:
    """The PNG minus its text chunks, so that opening it for the pixels inflates no zTXt/iTXt (PIL would hold up
    to 64 MB of decompressed text per image)."""
    if not raw.startswith(PNG_SIGNATURE):
        return raw
    spans = [(start - 8, end + 4) for kind, start, end in _png_chunks(raw) if kind in PNG_TEXT_CHUNKS]
    if not spans:
        return raw
    parts, pos = [], 0
    for a, b in spans:
        parts.append(raw[pos:a])
        pos = b
    parts.append(raw[pos:])
    return b"".join(parts)


def _open_image(raw: bytes, field_name: str, text: Any, max_pixels: int | None):
    """PIL image for `raw`, header read, no pixel decoded; its declared size checked against `max_pixels`
    (None: not checked, the pixels will not be decoded) before PIL allocates anything for it."""
    from PIL import Image

    def check(width, height):
        if max_pixels is not None and width * height > max_pixels:
            raise RequestError(field_name, f"{width}x{height} image", f"larger than {max_pixels} pixels")

    size = declared_size(raw)
    if size is not None:
        check(*size)
    Image.init()
    formats = [name for name in IMAGE_FORMATS if name in Image.OPEN]  # as this PIL was built
    try:
        image = Image.open(io.BytesIO(raw), formats=formats)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RequestError(field_name, text, f"larger than {max_pixels} pixels ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise RequestError(field_name, text, f"not a readable image ({type(exc).__name__})") from None
    check(*image.size)
    return image


def decode_image(text: Any, field_name: str, max_pixels: int, *, load: bool = True):
    """A base64 image (optionally a data: URL) -> RGB PIL image, or RequestError naming the field. The declared
    size is checked before any pixel is decoded. `load=False` validates the header only (returns None)."""
    return decode_image_bytes(_b64_payload(text, field_name), field_name, max_pixels, load=load, shown=text)


def decode_image_bytes(raw: bytes, field_name: str, max_pixels: int, *, load: bool = True, shown: Any = None):
    """An image file's bytes -> RGB PIL image with the upload checks of `decode_image` (the formats clients send,
    the declared size against `max_pixels` before any pixel is decoded, PNG text chunks never inflated), or
    RequestError naming `field_name` and `shown` (default: the field's bytes, cut short). `load=False` validates
    the header only (returns None). For image files on disk (``train-embedding --images``)."""
    from PIL import Image

    shown = raw[:40] if shown is None else shown
    image = _open_image(_without_png_text(raw), field_name, shown, max_pixels)
    if not load:
        return None
    try:
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, MemoryError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise RequestError(field_name, shown, f"not a readable image ({type(exc).__name__})") from None


def decode_mask(text: Any, field_name: str, max_pixels: int):
    """A base64 mask image -> PIL image with the upload checks of `decode_image`, kept as "RGBA" when it has an
    alpha channel (A1111 reads a transparent mask's alpha) and as "L" otherwise."""
    from PIL import Image

    raw = _b64_payload(text, field_name)
    image = _open_image(_without_png_text(raw), field_name, text, max_pixels)
    try:
        image.load()
        alpha = "A" in image.getbands() or "transparency" in image.info
        return image.convert("RGBA" if alpha else "L")
    except (OSError, ValueError, SyntaxError, MemoryError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise RequestError(field_name, text, f"not a readable image ({type(exc).__name__})") from None


def _inflate(data: bytes, budget: int, field_name: str, key: str) -> bytes:
    """zlib data -> at most `budget` bytes; more is a RequestError (a decompression bomb), never allocated."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, budget + 1)
    except zlib.error:
        raise RequestError(field_name, f"text chunk {key!r}", "is not valid zlib data") from None
    if len(out) > budget:
        raise RequestError(field_name, f"text chunk {key!r}",
                           f"the PNG's text chunks decompress to more than {MAX_PNG_TEXT_BYTES} bytes")
    return out


def png_text(raw: bytes, field_name: str = "image", limit: int = MAX_PNG_TEXT_BYTES) -> dict[str, str]:
    """The text chunks (tEXt, zTXt, iTXt) of a PNG, read as PIL's `info` reads them (a later chunk with the same
    keyword wins, chunks with a bad CRC or undecodable text are skipped) but without decoding pixel data, and with
    all text together inflated to at most `limit` bytes (more: RequestError naming `field_name`)."""
    items: dict[str, str] = {}
    budget = limit
    for kind, start, end in _png_chunks(raw):
        if kind not in PNG_TEXT_CHUNKS:
            continue  # IDAT and the rest are skipped over, never inflated
        data = raw[start:end]
        if zlib.crc32(kind + data) != struct.unpack_from(">I", raw, end)[0]:
            continue
        key, sep, rest = data.partition(b"\0")
        if not sep or not 1 <= len(key) <= 79:
            continue
        name = key.decode("latin-1")
        if kind == b"tEXt":
            value = rest
        elif kind == b"zTXt":
            if rest[:1] != b"\0":
                continue  # compression method 0 (zlib) is the only one defined
            value = _inflate(rest[1:], budget, field_name, name)
        else:  # iTXt: flag, method, language\0, translated keyword\0, text (UTF-8)
            if len(rest) < 2:
                continue
            compressed, method = rest[0], rest[1]
            lang, sep1, rest = rest[2:].partition(b"\0")
            translated, sep2, value = rest.partition(b"\0")
            if not (sep1 and sep2):
                continue
            if compressed:
                if method != 0:
                    continue
                value = _inflate(value, budget, field_name, name)
        if len(value) > budget:
            raise RequestError(field_name, f"text chunk {name!r}",
                               f"the PNG's text chunks hold more than {limit} bytes")
        budget -= len(value)
        try:
            items[name] = value.decode("utf-8" if kind == b"iTXt" else "latin-1")
        except UnicodeDecodeError:
            continue
    return items


def read_png_text(image_b64: str, max_pixels: int | None = None) -> tuple[str, dict]:
    """(parameters text, other text chunks) from an image, as A1111's png-info reads them, without decoding its
    pixels: a PNG's text chunks are read by `png_text` (bounded inflation); other formats are opened by PIL for
    their header only (WebP not at all). `max_pixels` is accepted for compatibility and not used: nothing is
    decoded."""
    raw = _b64_payload(image_b64, "image")
    if raw.startswith(PNG_SIGNATURE):
        if raw[12:16] != b"IHDR":
            raise RequestError("image", image_b64, "not a readable image (a PNG must start with IHDR)")
        items = png_text(raw, "image")
    elif raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        items = {}  # PIL reports no text for WebP, and opening one makes libwebp allocate the whole canvas
    else:
        image = _open_image(raw, "image", image_b64, None)
        items = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
    return items.pop("parameters", ""), items


def encode_png(image, parameters: str | None) -> str:
    """PIL image -> base64 PNG with the A1111 'parameters' text chunk (what png-info reads back)."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    text = parameters or image.info.get("parameters")
    if text:
        info.add_text("parameters", text)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode("ascii")
