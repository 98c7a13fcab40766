"""The one definition of embedlab's TFRecord schema; writers and readers import it.

Each `tf.train.Example` holds one validated image, already encoded as JPEG or PNG
(both decode with `tf.io.decode_image`), and everything needed to trace it back.
"""
from __future__ import annotations

from dataclasses import dataclass

SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ImageRecord:
    id: str            # stable, unique within the dataset
    image: bytes       # encoded JPEG or PNG, RGB
    format: str        # "jpeg" | "png"
    label: int         # index into dataset.json "classes"
    label_name: str
    path: str          # the source: a file path or "builtin:<dataset>/<index>"
    height: int
    width: int
    sha256: str        # content hash of the source bytes (exact-duplicate detection)
    text: str = ""     # caption / product metadata (used by text-aware backbones)
    group: str = ""    # items of one group always share a split
    # The item's part in its group: "original", "generated" or free text ("moderate", "radical"). Records written
    # before roles existed lack the feature and read as "" (feature_spec's default), so SCHEMA_VERSION stays.
    role: str = ""
    # A crop of `path` (a manifest's box): `left,top,width,height` in pixels of that image; "" = the whole image.
    # Records written before boxes existed read as "" too.
    box: str = ""


def shard_filename(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def shard_glob(split: str) -> str:
    return f"{split}-*-of-*.tfrecord"


def serialize(record: ImageRecord) -> bytes:
    import tensorflow as tf

    def b(value: str | bytes) -> tf.train.Feature:
        if isinstance(value, str):
            value = value.encode("utf-8")
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    def i(value: int) -> tf.train.Feature:
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))

    features = {
        "image": b(record.image),
        "format": b(record.format),
        "label": i(record.label),
        "label_name": b(record.label_name),
        "id": b(record.id),
        "path": b(record.path),
        "height": i(record.height),
        "width": i(record.width),
        "sha256": b(record.sha256),
        "text": b(record.text),
        "group": b(record.group),
        "role": b(record.role),
        "box": b(record.box),
    }
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def feature_spec() -> dict:
    import tensorflow as tf

    s = tf.io.FixedLenFeature([], tf.string, default_value="")
    n = tf.io.FixedLenFeature([], tf.int64, default_value=0)
    return {
        "image": s, "format": s, "label": n, "label_name": s, "id": s, "path": s,
        "height": n, "width": n, "sha256": s, "text": s, "group": s, "role": s, "box": s,
    }


def parse(serialized):
    """Parse a batch or a single serialized Example into a dict of tensors."""
    import tensorflow as tf

    if serialized.shape.rank == 0:
        return tf.io.parse_single_example(serialized, feature_spec())
    return tf.io.parse_example(serialized, feature_spec())
