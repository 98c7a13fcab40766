"""Images, bodies and app builders shared by the HTTP API's tests."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from pipeline.serving.api import Batching, ServeOptions, create_app
from tests.serving.searcher_double import BundleDouble, SearcherDouble


def encoded(colour=(200, 20, 20), size=(32, 32), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def noisy_jpeg(size=(48, 48), seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def truncated_jpeg() -> bytes:
    """A JPEG whose header is whole and whose image data stops at two thirds."""
    data = noisy_jpeg((64, 64))
    return data[: len(data) * 2 // 3]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming `width` x `height`, with one tiny IDAT: a bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def compressed_bomb(side: int = 7000) -> bytes:
    """A real, valid grey PNG of side^2 pixels that compresses to a few tens of kB."""
    buffer = io.BytesIO()
    Image.new("L", (side, side), 0).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def image_files(data: bytes, name="query.png", content_type="image/png", field="image"):
    return {field: (name, data, content_type)}


def double_app(*, token=None, has_text=False, batching=None, limits=None, searcher=None, **options):
    searcher = searcher or SearcherDouble(BundleDouble(has_text=has_text))
    opts = ServeOptions(batching=batching or Batching(), **options)
    app = create_app("/nonexistent-bundle", token=token, limits=limits, options=opts, loader=lambda root: searcher)
    return app, searcher


def assert_json_error(response, status=None):
    """A 4xx with a JSON body holding a one-line `error` message."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    if status is not None:
        assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    assert "\n" not in body["error"]
    return body["error"]
