"""pipeline.data.images: one image in, an RGB 8-bit JPEG/PNG (or a reject reason) out."""
from __future__ import annotations

import hashlib
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.data.images import normalize, normalize_array, normalize_bytes, normalize_file

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def decode(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    assert img.mode == "RGB", img.mode
    return np.asarray(img)


def halves(width: int, height: int, left=RED, right=BLUE) -> Image.Image:
    """Left half one colour, right half another: shows any rotation or flip."""
    array = np.zeros((height, width, 3), np.uint8)
    array[:, : width // 2] = left
    array[:, width // 2:] = right
    return Image.fromarray(array)


def noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def close(pixel, colour, tol=12) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, colour))


# --------------------------------------------------------------------------- kept as is


@pytest.mark.parametrize("fmt, name", [("JPEG", "jpeg"), ("PNG", "png")])
def test_plain_rgb_jpeg_and_png_keep_their_original_bytes(fmt, name):
    data = encode(Image.fromarray(noise(30, 20)), fmt)
    res = normalize_bytes(data)
    assert res.ok and res.reason == ""
    assert res.data == data and not res.reencoded
    assert (res.format, res.width, res.height) == (name, 30, 20)
    assert res.sha256 == hashlib.sha256(data).hexdigest()


def test_png_pixels_survive_exactly():
    array = noise(17, 9)
    res = normalize_bytes(encode(Image.fromarray(array), "PNG"))
    np.testing.assert_array_equal(decode(res.data), array)


# --------------------------------------------------------------------------- conversions


def test_grayscale_becomes_rgb_with_equal_channels():
    gray = np.arange(60, dtype=np.uint8).reshape(6, 10) * 4
    res = normalize_bytes(encode(Image.fromarray(gray), "PNG"))
    assert res.ok and res.reencoded and res.format == "png"
    out = decode(res.data)
    assert out.shape == (6, 10, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], gray)


def test_palette_image_keeps_its_colours():
    img = halves(8, 4).convert("P")
    res = normalize_bytes(encode(img, "PNG"))
    out = decode(res.data)
    assert tuple(out[0, 0]) == RED and tuple(out[0, -1]) == BLUE


def test_rgba_is_composited_on_white():
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[:, :3] = (255, 0, 0, 255)    # opaque red
    rgba[:, 3:] = (0, 0, 255, 0)      # fully transparent blue
    res = normalize_bytes(encode(Image.fromarray(rgba), "PNG"))
    out = decode(res.data)
    assert res.reencoded and out.shape == (4, 6, 3)
    assert tuple(out[0, 0]) == RED and tuple(out[0, 5]) == WHITE


def test_la_half_transparent_blends_towards_white():
    la = Image.fromarray(np.dstack([np.zeros((2, 2), np.uint8), np.full((2, 2), 128, np.uint8)]))
    assert la.mode == "LA"
    out = decode(normalize_bytes(encode(la, "PNG")).data)
    assert close(out[0, 0], (127, 127, 127), tol=2)


def test_palette_with_transparency_gif_is_composited_on_white():
    img = halves(8, 4).convert("P")
    transparent_index = img.getpixel((7, 0))
    data = encode(img, "GIF", transparency=transparent_index)
    out = decode(normalize_bytes(data).data)
    assert tuple(out[0, 0]) == RED and tuple(out[0, 7]) == WHITE


def test_cmyk_jpeg_becomes_rgb_jpeg():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    res = normalize_bytes(encode(cmyk, "JPEG", quality=95))
    assert res.ok and res.reencoded and res.format == "jpeg"
    out = decode(res.data)
    assert out.shape == (16, 16, 3) and close(out[8, 8], RED, tol=16)


def test_16bit_grayscale_png_is_rescaled_not_clipped():
    values = np.array([[0, 257 * 128, 65535, 1000]], dtype=np.uint16)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    out = decode(normalize_bytes(encode(img, "PNG")).data)
    assert out.shape == (1, 4, 3)
    assert list(out[0, :, 0]) == [0, 128, 255, 4]


def test_32bit_integer_image_is_read_as_16bit_range():
    img = Image.fromarray(np.array([[0, 65535, 257 * 10, -5, 70000]], dtype=np.int32))
    assert img.mode == "I"
    out = decode(normalize_bytes(encode(img, "TIFF")).data)
    assert list(out[0, :, 1]) == [0, 255, 10, 0, 255]


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_16bit_rgb_png_is_reencoded_although_pillow_calls_it_rgb():
    # Pillow cannot write 48-bit PNGs, so build one: 1x2 pixels, white and black.
    raw = b"\x00" + b"\xff\xff" * 3 + b"\x00\x00" * 3
    data = (b"\x89PNG\r\n\x1a\n"
            + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 1, 16, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b""))
    res = normalize_bytes(data)
    assert res.ok and res.reencoded and res.data != data
    out = decode(res.data)
    assert tuple(out[0, 0]) == WHITE and tuple(out[0, 1]) == (0, 0, 0)


@pytest.mark.parametrize("orientation, top, bottom, left, right", [
    (6, RED, BLUE, None, None),    # stored sideways: rotate 90 degrees clockwise to view
    (8, BLUE, RED, None, None),    # rotate 90 degrees counter-clockwise
    (3, None, None, BLUE, RED),    # upside down
    (2, None, None, BLUE, RED),    # mirrored
])
def test_exif_orientation_is_applied(orientation, top, bottom, left, right):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(halves(40, 20), "JPEG", quality=95, exif=exif.tobytes())
    res = normalize_bytes(data)
    assert res.ok and res.reencoded and res.format == "jpeg"
    out = decode(res.data)
    if top:
        assert (res.width, res.height) == (20, 40) and out.shape == (40, 20, 3)
        assert close(out[5, 10], top) and close(out[35, 10], bottom)
    else:
        assert (res.width, res.height) == (40, 20)
        assert close(out[10, 5], left) and close(out[10, 35], right)


def test_orientation_1_keeps_the_original_jpeg():
    exif = Image.Exif()
    exif[0x0112] = 1
    data = encode(halves(40, 20), "JPEG", exif=exif.tobytes())
    res = normalize_bytes(data)
    assert res.data == data and not res.reencoded


def test_animated_gif_yields_its_first_frame():
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    res = normalize_bytes(data)
    out = decode(res.data)
    assert res.format == "png" and out.shape == (8, 8, 3) and tuple(out[4, 4]) == RED


@pytest.mark.parametrize("fmt, kwargs", [("WEBP", {"lossless": True}), ("BMP", {}), ("TIFF", {})])
def test_other_formats_become_png_with_exact_pixels(fmt, kwargs):
    array = noise(12, 7, seed=3)
    res = normalize_bytes(encode(Image.fromarray(array), fmt, **kwargs))
    assert res.ok and res.reencoded and res.format == "png"
    np.testing.assert_array_equal(decode(res.data), array)


# --------------------------------------------------------------------------- resizing


def test_max_side_downscales_keeping_aspect():
    res = normalize_bytes(encode(halves(100, 50), "PNG"), max_side=20)
    out = decode(res.data)
    assert (res.width, res.height) == (20, 10) and out.shape == (10, 20, 3)
    assert res.reencoded and res.format == "png"
    assert tuple(out[5, 2]) == RED and tuple(out[5, 17]) == BLUE


def test_max_side_on_a_big_jpeg_uses_jpeg_and_keeps_content():
    res = normalize_bytes(encode(halves(800, 600), "JPEG", quality=90), max_side=100)
    out = decode(res.data)
    assert (res.width, res.height) == (100, 75) and res.format == "jpeg"
    assert close(out[37, 10], RED, 20) and close(out[37, 90], BLUE, 20)


def test_max_side_leaves_small_images_alone():
    data = encode(halves(30, 20), "PNG")
    assert normalize_bytes(data, max_side=30).data == data


# --------------------------------------------------------------------------- rejects


def test_rejects_carry_short_reasons(tmp_path):
    jpeg = encode(Image.fromarray(noise(64, 64)), "JPEG")
    png = encode(Image.fromarray(noise(64, 64)), "PNG")
    assert normalize_bytes(b"").reason == "empty file"
    assert normalize_bytes(jpeg[: len(jpeg) // 2]).reason == "truncated image"
    assert normalize_bytes(png[: len(png) // 2]).reason == "truncated image"
    assert normalize_bytes(b"just some text, not pixels\n").reason == "not an image"
    assert normalize_bytes(encode(Image.new("RGB", (16, 16)), "ICO")).reason == "unsupported image format (ICO)"
    assert normalize_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40).reason.startswith(("corrupt image", "truncated"))
    assert normalize_file(tmp_path / "missing.jpg").reason == "file not found"
    bad = normalize_bytes(b"")
    assert not bad.ok and bad.data == b""


def test_decompression_bombs_are_rejected_not_decoded(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    warned = normalize_bytes(encode(Image.new("RGB", (40, 40)), "PNG"))   # 1600 px: Pillow only warns
    refused = normalize_bytes(encode(Image.new("RGB", (50, 50)), "PNG"))  # 2500 px: Pillow raises
    assert warned.reason.startswith("decompression bomb")
    assert refused.reason.startswith("decompression bomb")
    monkeypatch.undo()
    assert normalize_bytes(encode(Image.new("RGB", (50, 50)), "PNG")).ok


# --------------------------------------------------------------------------- arrays and files


def test_grayscale_array_becomes_rgb_png():
    array = (np.arange(28 * 28) % 256).astype(np.uint8).reshape(28, 28)
    res = normalize_array(array)
    out = decode(res.data)
    assert res.format == "png" and res.reencoded and out.shape == (28, 28, 3)
    np.testing.assert_array_equal(out[:, :, 2], array)


def test_colour_array_round_trips_and_hash_depends_on_shape():
    array = noise(32, 32)
    res = normalize(array)
    np.testing.assert_array_equal(decode(res.data), array)
    flat = normalize_array(array.reshape(32 * 32, 3)[None].reshape(1, 1024, 3))
    assert flat.ok and flat.sha256 != res.sha256
    assert normalize_array(array[:, :, :1]).ok


def test_bad_arrays_are_rejected():
    assert "dtype" in normalize_array(np.zeros((4, 4), np.float32)).reason
    assert "shape" in normalize_array(np.zeros((4, 4, 4), np.uint8)).reason


def test_file_input_hashes_the_file_bytes(tmp_path):
    data = encode(Image.fromarray(noise(10, 10)), "PNG")
    path = tmp_path / "a.png"
    path.write_bytes(data)
    res = normalize(str(path))
    assert res.ok and res.data == data and res.sha256 == hashlib.sha256(data).hexdigest()
