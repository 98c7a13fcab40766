"""The small copies of item images a bundle keeps (the HTTP API and HTML results show these, never a client's
file): the image itself when it is small enough, else a JPEG of `THUMBNAIL_SIDE` px on its longer side.

Stored in segments, files of encoded images end to end (`write_thumbnails`), that never change once
written: a bundle version that adds items writes a new segment and hard-links the others, so versions
share them; an item's segment, offset and size are columns of the bundle's items table.
"""
from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

THUMBNAIL_SIDE = 256
JPEG_QUALITY = 85
THUMBNAILS = "thumbnails"                   # the folder of a bundle version that holds the segments
# Where an item's thumbnail is: items.parquet columns.
THUMBNAIL_COLUMNS = ("thumbnail_segment", "thumbnail_offset", "thumbnail_size")
SEGMENT_BYTES = 256 * 2 ** 20


def make_thumbnail(encoded: bytes, side: int = THUMBNAIL_SIDE) -> bytes:
    """`encoded` (RGB JPEG/PNG, as phase 0 stores images) when it fits in `side` px, else a smaller JPEG."""
    from PIL import Image

    with Image.open(io.BytesIO(encoded)) as image:
        if max(image.size) <= side:
            return bytes(encoded)
        image = image.convert("RGB")
        image.thumbnail((side, side), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=JPEG_QUALITY)
        return out.getvalue()


def thumbnails_of(encoded: Iterable[bytes], workers: int = 2) -> Iterator[bytes]:
    """`make_thumbnail` over a stream, in order (Pillow releases the GIL while it decodes and resizes)."""
    if workers <= 1:
        yield from map(make_thumbnail, encoded)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        # Bounded look-ahead: a 100k-item export never holds more than a chunk of images in memory.
        chunk: list[bytes] = []
        for data in encoded:
            chunk.append(data)
            if len(chunk) == 256:
                yield from pool.map(make_thumbnail, chunk)
                chunk = []
        yield from pool.map(make_thumbnail, chunk)


def media_type(data: bytes) -> str:
    return "image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"


def write_thumbnails(folder: Path, items, new: Iterable[bytes], version: str, previous: Path | None) -> None:
    """Link the previous version's segments that rows still name; append the new rows' thumbnails (rows with
    an empty thumbnail_segment, in order) to fresh segments named after `version`. Fills the columns."""
    folder.mkdir()
    for name in sorted(set(items["thumbnail_segment"]) - {""}):
        if previous is None or not (previous / name).is_file():
            raise ValueError(f"thumbnail segment {name} is not in the previous version {previous}")
        link_or_copy(previous / name, folder / name)
    rows = np.flatnonzero(items["thumbnail_segment"].to_numpy() == "")
    segment_col, offset_col, size_col = (items[c].to_numpy().copy() for c in THUMBNAIL_COLUMNS)
    stream, handle, name, offset, count = iter(new), None, "", 0, 0
    try:
        for row in rows:
            data = next(stream, None)
            if data is None:
                raise ValueError(f"{len(rows)} new items but only {count} thumbnails")
            if handle is None or offset + len(data) > SEGMENT_BYTES:
                if handle is not None:
                    _close_durably(handle)
                name = f"{version}-{len(list(folder.glob(f'{version}-*.bin'))):03d}.bin"
                handle, offset = open(folder / name, "wb"), 0
            handle.write(data)
            segment_col[row], offset_col[row], size_col[row] = name, offset, len(data)
            offset += len(data)
            count += 1
    finally:
        if handle is not None:
            _close_durably(handle)
    items["thumbnail_segment"] = segment_col.astype(str)
    items["thumbnail_offset"] = offset_col.astype(np.int64)
    items["thumbnail_size"] = size_col.astype(np.int64)


def _close_durably(handle) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()


def link_or_copy(source: str | Path, destination: str | Path) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)

