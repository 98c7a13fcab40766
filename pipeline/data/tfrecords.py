"""tf.data readers over phase 0's TFRecords: parallel decode and resize, batching, prefetch.

Order is deterministic (shards in name order, records in file order, parallel map
with `deterministic=True`) so that row i of an embedding matrix is always the same image.
"""
from __future__ import annotations

from pathlib import Path
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from pipeline.data import schema
from pipeline.data.record_reader import list_shards

AUTOTUNE = tf.data.AUTOTUNE
# Everything but the image bytes: what phase 1 stores next to each embedding.
METADATA_KEYS = ("id", "label", "label_name", "path", "text", "group", "role", "box")
# The splits training can use: "train" to learn from, "val" to validate on (when usable).
TRAINING_SPLITS = ("train", "val")


def decode_and_resize(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    """Encoded JPEG/PNG → float32 RGB in [0, 255], squashed to image_size × image_size."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    size = (image_size, image_size)
    # Antialiasing matters when shrinking large photos, but it halves resize throughput
    # and changes nothing when enlarging (small product shots, CIFAR, Fashion-MNIST).
    shrinks = tf.reduce_any(tf.shape(image)[:2] > image_size)
    image = tf.cond(shrinks,
                    lambda: tf.image.resize(image, size, method="bilinear", antialias=True),
                    lambda: tf.image.resize(image, size, method="bilinear", antialias=False))
    return tf.clip_by_value(image, 0.0, 255.0)


def image_dataset(shards: list[Path], image_size: int, batch_size: int) -> tf.data.Dataset:
    """Batches of decoded, resized images in record order (no metadata)."""
    files = [str(p) for p in shards]
    ds = tf.data.TFRecordDataset(files, num_parallel_reads=None)  # sequential: keeps file order
    ds = ds.map(lambda s: decode_and_resize(schema.parse(s)["image"], image_size),
                num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(AUTOTUNE)


def read_metadata(shards: list[Path]) -> dict[str, list]:
    """The metadata of every record, in record order, without decoding any image."""
    out: dict[str, list] = {k: [] for k in METADATA_KEYS}
    if not shards:
        return out
    ds = tf.data.TFRecordDataset([str(p) for p in shards]).batch(1024).map(schema.parse)
    for batch in ds.as_numpy_iterator():
        for key in METADATA_KEYS:
            values = batch[key]
            if values.dtype == object:
                out[key].extend(v.decode("utf-8") for v in values)
            else:
                out[key].extend(int(v) for v in values)
    return out


def count_records(shards: list[Path]) -> int:
    return sum(1 for _ in tf.data.TFRecordDataset([str(p) for p in shards])) if shards else 0


def read_records(dataset_dir: Path, splits: Sequence[str] = TRAINING_SPLITS):
    """(items DataFrame with split/id/label/group, encoded image bytes as an object array), in record order."""
    import pandas as pd

    from pipeline.core.errors import PhaseInputError

    columns: dict[str, list] = {"split": [], "id": [], "label": [], "group": []}
    encoded: list[bytes] = []
    for split in splits:
        shards = list_shards(dataset_dir, split)
        if not shards:
            continue
        ds = tf.data.TFRecordDataset([str(p) for p in shards]).batch(1024).map(schema.parse)
        for batch in ds.as_numpy_iterator():
            encoded.extend(batch["image"].tolist())
            columns["id"].extend(v.decode("utf-8") for v in batch["id"])
            columns["label"].extend(int(v) for v in batch["label"])
            columns["group"].extend(v.decode("utf-8") for v in batch["group"])
            columns["split"].extend([split] * len(batch["id"]))
    if not encoded:
        raise PhaseInputError(f"no TFRecords for splits {list(splits)} in {dataset_dir}: run phase0 first")
    return pd.DataFrame(columns), np.array(encoded, dtype=object)


def plain_images(encoded: np.ndarray, image_size: int, batch_size: int = 64):
    """Decoded, resized, unaugmented images in the given order (validation)."""
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(encoded.astype(object).tolist(), dtype=tf.string))
    ds = ds.map(lambda b: decode_and_resize(b, image_size), num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(AUTOTUNE)
