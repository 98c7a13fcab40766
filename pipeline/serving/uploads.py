"""What a client may send the HTTP API, checked before anything expensive runs.

Every check ends in a `RequestError` carrying a 4xx status and a one-line message, which the
app turns into `{"error": ...}`. The body is read with a byte cap while it streams in (a 2 GB
upload is cut off at the cap, not buffered), an image's type is sniffed from its first bytes
(never from its file name or the declared content type), and its pixel count is read from the
header before any decoder allocates a frame, so a decompression bomb costs a few hundred bytes
of parsing. Pillow only; no TensorFlow here.
"""
from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError
from starlette.requests import Request

from pipeline.data.images import SUPPORTED_FORMATS

# First bytes of every format the model side decodes (pipeline.data.images.SUPPORTED_FORMATS).
IMAGE_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
)


@dataclass(frozen=True)
class Limits:
    """What one request may carry. The defaults fit a phone photo and refuse everything a search never needs."""

    max_upload_bytes: int = 10 * 1024 * 1024   # a multipart body (one image, or the images of POST /items)
    max_json_bytes: int = 256 * 1024            # a 2048-d vector as JSON text is ~45 kB
    max_pixels: int = 40_000_000                # width x height, read from the header before decoding
    max_k: int = 100
    max_text_chars: int = 1000
    max_images_per_add: int = 64

    def __post_init__(self):
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive integer, got {value!r}")


class RequestError(Exception):
    """A client's mistake: answered with `status` and `{"error": message}`, never logged as a failure."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ImageUpload:
    data: bytes
    format: str
    width: int
    height: int


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, or 413 as soon as it (declared or streamed) passes `max_bytes`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise RequestError(413, f"request body of {int(declared)} bytes is over the {max_bytes}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise RequestError(413, f"request body is over the {max_bytes}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_form(request: Request, limits: Limits, max_files: int = 1):
    """The multipart form, parsed from a body already read under the size cap."""
    body = await read_body(request, limits.max_upload_bytes)
    replayed = False

    async def replay():
        # Hands the capped body to Starlette's own multipart parser exactly once.
        nonlocal replayed
        if replayed:
            return {"type": "http.disconnect"}
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    capped = Request(request.scope, receive=replay)
    # Starlette answers a malformed multipart body with HTTPException(400), handled by the app.
    return await capped.form(max_files=max_files, max_fields=16, max_part_size=64 * 1024)


async def read_json_object(request: Request, limits: Limits) -> dict:
    body = await read_body(request, limits.max_json_bytes)
    if not body.strip():
        raise RequestError(400, "the JSON body is empty")
    try:
        # NaN/Infinity are not JSON, but Python's parser accepts them: refuse them here.
        value = json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise RequestError(400, f"the body is not valid JSON ({_short(exc)})") from None
    if not isinstance(value, dict):
        raise RequestError(400, f"the JSON body must be an object, got {type(value).__name__}")
    return value


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def only_keys(body: dict, allowed: tuple[str, ...], hint: str = "") -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise RequestError(400, f"unknown field(s) {', '.join(map(repr, unknown))} in the JSON body; "
                                f"allowed: {', '.join(allowed)}{hint}")


async def form_image(form, field: str = "image") -> bytes:
    """The bytes of the one file in `field`, with a message naming what was sent instead."""
    value = form.get(field)
    if value is None:
        sent = ", ".join(sorted(map(repr, form.keys()))) or "none"
        raise RequestError(400, f"no {field!r} file in the form (fields sent: {sent})")
    if isinstance(value, str):
        raise RequestError(400, f"the {field!r} field must be a file upload, not a text field")
    if len(form.getlist(field)) > 1:
        raise RequestError(400, f"send one {field!r} file, not {len(form.getlist(field))}")
    return await value.read()


def sniff_image(data: bytes, limits: Limits) -> ImageUpload:
    """Type from the bytes, size from the header: 4xx for anything that is not a reasonable image."""
    if not data:
        raise RequestError(400, "the image is empty (0 bytes)")
    if len(data) > limits.max_upload_bytes:
        raise RequestError(413, f"the image is {len(data)} bytes, over the {limits.max_upload_bytes}-byte limit")
    fmt = image_format(data)
    if fmt is None:
        raise RequestError(415, "not an image of a supported type (JPEG, PNG, GIF, BMP, TIFF or WEBP), "
                                "judged from its bytes")
    try:
        with warnings.catch_warnings():
            # Pillow only warns below twice its own limit; the pixel check below decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=(fmt,)) as img:   # header only, nothing decoded
                width, height = img.size
    except Image.DecompressionBombError:
        raise RequestError(413, f"the {fmt} image has more pixels than this server decodes") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise RequestError(400, f"corrupt {fmt} image: unreadable header ({_short(exc)})") from None
    if width < 1 or height < 1:
        raise RequestError(400, f"the {fmt} image has no pixels ({width}x{height})")
    if width * height > limits.max_pixels:
        raise RequestError(413, f"the {fmt} image is {width}x{height} = {width * height} pixels, over the "
                                f"{limits.max_pixels}-pixel limit (decompression bombs are refused)")
    return ImageUpload(data, fmt, width, height)


def image_format(data: bytes) -> str | None:
    """Pillow's name for the format the first bytes announce, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for signature, fmt in IMAGE_SIGNATURES:
        if data.startswith(signature) and fmt in SUPPORTED_FORMATS:
            return fmt
    return None


def query_vector(values, dim: int) -> np.ndarray:
    """A JSON list of `dim` finite numbers with a non-zero norm -> a float32 unit vector [1, dim]."""
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                               for v in values):
        raise RequestError(400, "'vector' must be a list of numbers")
    if len(values) != dim:
        raise RequestError(400, f"'vector' has {len(values)} numbers; this bundle's embeddings have {dim}")
    try:
        vector = np.asarray(values, dtype=np.float64)
    except OverflowError:   # an integer beyond float64
        raise RequestError(400, "'vector' holds a number too large for a float") from None
    # Scale first: squares of values near float64's maximum would overflow the norm.
    peak = float(np.max(np.abs(vector))) if dim else 0.0
    if not math.isfinite(peak):
        raise RequestError(400, "'vector' holds a number too large for a float")
    if peak == 0.0:
        raise RequestError(400, "'vector' is all zeros: it has no direction to search along")
    scaled = vector / peak
    return (scaled / np.linalg.norm(scaled)).astype(np.float32)[None, :]


def query_text(value, limits: Limits) -> str:
    if not isinstance(value, str):
        raise RequestError(400, "'text' must be a string")
    text = value.strip()
    if not text:
        raise RequestError(400, "'text' is empty")
    if len(text) > limits.max_text_chars:
        raise RequestError(400, f"'text' has {len(text)} characters, over the {limits.max_text_chars} limit")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:   # lone surrogates ("\ud800") parse as JSON but are no text
        raise RequestError(400, "'text' is not valid Unicode (lone surrogate)") from None
    return text


def _short(exc: BaseException) -> str:
    return (str(exc).strip() or type(exc).__name__).splitlines()[0][:160]
