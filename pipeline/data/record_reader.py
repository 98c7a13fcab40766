"""Phase 0's TFRecords read without TensorFlow: the neighbour-grid thumbnails of phases 2, 4 and 5.

Why: the reports need a few dozen thumbnails, and importing TensorFlow only to find them cost a phase-2 process
about 7 s of its 77 CPU seconds on CIFAR-10 (BENCHMARKS 18). The TFRecord framing (length, CRC of the length,
data, CRC of the data) and the `tf.train.Example` protobuf are simple enough to walk here; images are decoded with
Pillow. The CRCs are not verified (thumbnails only: a damaged record gives a damaged or missing picture, and
phase 1 reads the same files through tf.data, which does verify them).

Example layout walked (protobuf wire format): Example{1: Features{1: map entry{1: key, 2: Feature{1: BytesList{
1: bytes...}, 2: FloatList, 3: Int64List}}}}.
"""
from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.data import schema

_LENGTH = struct.Struct("<Q")
_HEADER_BYTES = 12   # uint64 length + uint32 masked CRC of it
_FOOTER_BYTES = 4    # uint32 masked CRC of the data


def list_shards(dataset_dir: str | Path, split: str) -> list[Path]:
    """The TFRecord shards of one split, in name order (the order every reader keeps)."""
    return sorted(Path(dataset_dir).glob(schema.shard_glob(split)))


def iter_records(path: str | Path) -> Iterator[bytes]:
    """The serialized records of one TFRecord file, in order, read one at a time (a shard of large photos can hold
    hundreds of MB); raises ValueError on a truncated file."""
    with open(path, "rb") as f:
        at = 0
        while True:
            header = f.read(_HEADER_BYTES)
            if not header:
                return
            if len(header) < _HEADER_BYTES:
                raise ValueError(f"{path}: truncated record header at byte {at}")
            (length,) = _LENGTH.unpack_from(header)
            data = f.read(length)
            if len(data) < length or len(f.read(_FOOTER_BYTES)) < _FOOTER_BYTES:
                raise ValueError(f"{path}: truncated record at byte {at}")
            yield data
            at += _HEADER_BYTES + length + _FOOTER_BYTES


def _varint(buf: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def _fields(buf: bytes, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, start, stop) of each field of a message; for varints start is the value."""
    at, stop = start, len(buf) if stop is None else stop
    while at < stop:
        key, at = _varint(buf, at)
        number, wire = key >> 3, key & 7
        if wire == 2:        # length-delimited
            length, at = _varint(buf, at)
            yield number, wire, at, at + length
            at += length
        elif wire == 0:      # varint
            value, at = _varint(buf, at)
            yield number, wire, value, at
        elif wire == 1:      # 64-bit
            yield number, wire, at, at + 8
            at += 8
        elif wire == 5:      # 32-bit
            yield number, wire, at, at + 4
            at += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def bytes_features(record: bytes, keys: set[str]) -> dict[str, bytes]:
    """The first value of each BytesList feature named in `keys` that the serialized Example holds."""
    found: dict[str, bytes] = {}
    for number, wire, start, stop in _fields(record):
        if number != 1 or wire != 2:
            continue
        for entry_number, entry_wire, entry_start, entry_stop in _fields(record, start, stop):
            if entry_number != 1 or entry_wire != 2:
                continue
            key, value = None, None
            for part, part_wire, part_start, part_stop in _fields(record, entry_start, entry_stop):
                if part == 1 and part_wire == 2:
                    key = record[part_start:part_stop].decode("utf-8")
                elif part == 2 and part_wire == 2:
                    value = (part_start, part_stop)
            if key not in keys or value is None:
                continue
            for kind, kind_wire, kind_start, kind_stop in _fields(record, *value):
                if kind == 1 and kind_wire == 2:   # BytesList
                    for item, item_wire, item_start, item_stop in _fields(record, kind_start, kind_stop):
                        if item == 1 and item_wire == 2:
                            found[key] = record[item_start:item_stop]
                            break
            if len(found) == len(keys):
                return found
    return found


def thumbnail(encoded: bytes, size: int) -> np.ndarray:
    """Encoded JPEG/PNG -> uint8 RGB array whose longer side is at most `size` (never enlarged)."""
    from PIL import Image

    with Image.open(io.BytesIO(encoded)) as image:
        image = image.convert("RGB")
        scale = size / max(image.size)
        if scale < 1:
            width, height = image.size
            image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                                 Image.Resampling.BILINEAR, reducing_gap=None)
        return np.asarray(image, dtype=np.uint8)


def load_thumbnails(shards: list[Path], wanted_ids: set[str], size: int = 96) -> dict[str, np.ndarray]:
    """id -> thumbnail of each wanted record (the first record of an id wins); stops once all are found.
    An image that does not decode is left out (the grid shows its cell empty)."""
    found: dict[str, np.ndarray] = {}
    if not wanted_ids or not shards:
        return found
    keys = {"id", "image"}
    for shard in shards:
        for record in iter_records(shard):
            fields = bytes_features(record, keys)
            rid = fields.get("id", b"").decode("utf-8")
            if rid not in wanted_ids or rid in found or "image" not in fields:
                continue
            try:
                found[rid] = thumbnail(fields["image"], size)
            except (OSError, ValueError):
                continue
            if len(found) == len(wanted_ids):
                return found
    return found
