"""Validate and normalise one image: whatever came in, an RGB 8-bit JPEG or PNG comes out.

Pure functions (Pillow and numpy only, no TensorFlow) so they run in worker processes.
A bad input never raises: it comes back as an `ImageResult` whose `reason` says why
it was rejected, so one broken file cannot stop an ingest of thousands.

Decompression bombs: Pillow's global `Image.MAX_IMAGE_PIXELS` (about 89 Mpx by
default) is left as the user set it; images above it, which Pillow only warns
about, are rejected here instead of being decoded.
"""
from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from pipeline.data.boxes import Box, BoxError, box_record, pixel_box

# What Pillow may try to decode. Restricting it keeps exotic plugins (PSD, ICO, EPS...)
# from being probed on arbitrary files; MPO (multi-picture JPEG) comes in through JPEG.
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
JPEG_QUALITY = 95

_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class ImageResult:
    """The outcome for one input; `reason` is empty when the image was accepted."""

    sha256: str = ""            # of the source bytes (or of the array's shape+data)
    data: bytes = b""           # encoded RGB JPEG/PNG, ready for the TFRecord
    format: str = ""            # "jpeg" | "png"
    width: int = 0
    height: int = 0
    reencoded: bool = False     # False: `data` is the untouched source file
    reason: str = ""
    box: str = ""               # a crop: its box in the source image, `left,top,width,height` pixels

    @property
    def ok(self) -> bool:
        return not self.reason


def normalize(source: str | os.PathLike | bytes | np.ndarray | tuple, max_side: int = 0) -> ImageResult:
    """Dispatch on the kind of input; the one entry point worker processes call. A (file, Box) pair is a crop."""
    if isinstance(source, tuple):
        return normalize_crop(*source, max_side=max_side)
    if isinstance(source, np.ndarray):
        return normalize_array(source, max_side)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return normalize_bytes(bytes(source), max_side)
    return normalize_file(source, max_side)


def normalize_file(path: str | os.PathLike, max_side: int = 0) -> ImageResult:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return ImageResult(reason="file not found")
    except OSError as exc:
        return ImageResult(reason=f"unreadable file ({exc.strerror or exc})")
    return normalize_bytes(data, max_side)


def normalize_bytes(data: bytes, max_side: int = 0) -> ImageResult:
    digest = hashlib.sha256(data).hexdigest()
    if not data:
        return ImageResult(sha256=digest, reason="empty file")
    try:
        return _normalize(data, digest, max_side)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a reject, never a crash
        return ImageResult(sha256=digest, reason=_describe_failure(exc))


def normalize_array(array: np.ndarray, max_side: int = 0) -> ImageResult:
    """An in-memory uint8 HxW / HxWx1 / HxWx3 array (built-in datasets) -> RGB PNG."""
    array = np.asarray(array)
    # Hash shape and dtype too: the same bytes in a different shape are a different image.
    digest = hashlib.sha256(f"{array.shape}|{array.dtype}|".encode() + array.tobytes()).hexdigest()
    if array.dtype != np.uint8:
        return ImageResult(sha256=digest, reason=f"unsupported array dtype {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)) or 0 in array.shape:
        return ImageResult(sha256=digest, reason=f"unsupported array shape {array.shape}")
    img = Image.fromarray(np.ascontiguousarray(array)).convert("RGB")
    img = _downscale(img, max_side)
    return ImageResult(
        sha256=digest, data=_encode(img, "png"), format="png",
        width=img.width, height=img.height, reencoded=True,
    )


def normalize_crop(path: str | os.PathLike, box: Box, max_side: int = 0) -> ImageResult:
    """The crop `box` (pipeline/data/boxes.py) of the image file `path`, normalised as a whole image would be
    (EXIF orientation applied first, so boxes are in the image as displayed; RGB 8-bit), then stored re-encoded:
    PNG (lossless) unless the source is a JPEG, whose crop stays a JPEG (quality JPEG_QUALITY). `max_side` applies
    to the crop. Its sha256 is of the source bytes and the box, so two boxes of one image are two images."""
    whole = normalize_file(path, 0)
    if not whole.ok:
        return whole
    digest = hashlib.sha256(f"{whole.sha256}|{box.text()}|{box.units}".encode()).hexdigest()
    try:
        edges = pixel_box(box, whole.width, whole.height)
    except BoxError as exc:
        return ImageResult(sha256=digest, reason=str(exc))
    with Image.open(io.BytesIO(whole.data)) as img:
        crop = _downscale(img.convert("RGB").crop(edges), max_side)
    return ImageResult(sha256=digest, data=_encode(crop, whole.format), format=whole.format, width=crop.width,
                       height=crop.height, reencoded=True, box=box_record(edges))


# --------------------------------------------------------------------------- internals


def _normalize(data: bytes, digest: str, max_side: int) -> ImageResult:
    with warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; we refuse both.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
        except UnidentifiedImageError:
            return ImageResult(sha256=digest, reason=_identify_unsupported(data))
        source_format = img.format or ""
        needs_resize = bool(max_side) and max(img.size) > max_side
        if needs_resize and source_format in ("JPEG", "MPO"):
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale (never below max_side):
            # far cheaper for big photos, and LANCZOS does the rest.
            img.draft(None, (max_side, max_side))
        # Force the full decode now: a truncated file fails here, not in phase 1.
        img.load()

    orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    rotated = orientation in range(2, 9)
    if rotated:
        img = ImageOps.exif_transpose(img)

    keep = (
        not rotated
        and not needs_resize
        and img.mode == "RGB"
        and (
            source_format == "JPEG"
            or (source_format == "PNG" and _is_plain_rgb8_png(data, img))
        )
    )
    if keep:
        return ImageResult(
            sha256=digest, data=data, format="jpeg" if source_format == "JPEG" else "png",
            width=img.width, height=img.height, reencoded=False,
        )

    rgb = _downscale(_to_rgb(img), max_side)
    fmt = "jpeg" if source_format in ("JPEG", "MPO") else "png"
    return ImageResult(
        sha256=digest, data=_encode(rgb, fmt), format=fmt,
        width=rgb.width, height=rgb.height, reencoded=True,
    )


def _is_plain_rgb8_png(data: bytes, img: Image.Image) -> bool:
    """Only an 8-bit truecolour PNG without transparency or animation decodes in
    TensorFlow to exactly what Pillow shows; Pillow reports 16-bit RGB and tRNS
    colour-key PNGs as "RGB" too, so look at the IHDR header itself."""
    if len(data) < 26 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return False
    bit_depth, colour_type = data[24], data[25]
    return (
        bit_depth == 8 and colour_type == 2
        and "transparency" not in img.info
        and not getattr(img, "is_animated", False)
    )


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode == "I" or mode.startswith("I;16"):
        # Pillow's own convert clips 16-bit values at 255 (a white image); rescale
        # the 16-bit range instead. Mode "I" (32-bit) is read as 16-bit data, which
        # is what 16-bit PNG/TIFF decoders produce; values outside are clipped.
        values = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        return Image.fromarray(((values + 128) // 257).astype(np.uint8)).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise ValueError(f"unsupported colour mode {mode}") from exc


def _downscale(img: Image.Image, max_side: int) -> Image.Image:
    if not max_side or max(img.size) <= max_side:
        return img
    scale = max_side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.LANCZOS)


def _encode(img: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "jpeg":
        img.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        img.save(buffer, format="PNG")
    return buffer.getvalue()


_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"), (_PNG_SIGNATURE, "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
)


def _identify_unsupported(data: bytes) -> str:
    """Tell "a real image of a format we do not take" and "a damaged file of one we do"
    from "not an image at all"; this runs for rejects only."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            other = Image.open(io.BytesIO(data))
        return f"unsupported image format ({other.format})"
    except Exception:  # noqa: BLE001
        pass
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "corrupt image (unreadable WEBP header)"
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return f"corrupt image (unreadable {fmt} header)"
    return "not an image"


def _describe_failure(exc: Exception) -> str:
    if isinstance(exc, (Image.DecompressionBombWarning, Image.DecompressionBombError)):
        return f"decompression bomb (over {Image.MAX_IMAGE_PIXELS} pixels)"
    message = str(exc).strip() or type(exc).__name__
    if "truncat" in message.lower():
        return "truncated image"
    if message.startswith("unsupported colour mode"):
        return message
    return f"corrupt image ({message[:120]})"
