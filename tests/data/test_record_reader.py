"""pipeline.data.record_reader against TensorFlow's own reader and parser, on records written by TensorFlow."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.data import schema
from pipeline.data.record_reader import bytes_features, iter_records, list_shards, load_thumbnails, thumbnail


def encoded(rng, height, width, fmt="PNG", mode="RGB") -> bytes:
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def record(i: int, image: bytes, text: str = "") -> schema.ImageRecord:
    return schema.ImageRecord(id=f"item-{i}", image=image, format="png", label=i % 3, label_name=f"c{i % 3}",
                              path=f"p/{i}.png", height=1, width=1, sha256="0" * 64, text=text, group=f"g{i}",
                              role="original" if i % 2 else "", box="")


@pytest.fixture
def shards(tmp_path):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    written = []
    for index in range(2):
        path = tmp_path / schema.shard_filename("test", index, 2)
        with tf.io.TFRecordWriter(str(path)) as writer:
            for i in range(index * 5, index * 5 + 5):
                size = (40 + 10 * i, 200 - 7 * i)
                rec = record(i, encoded(rng, *size, fmt="PNG" if i % 2 else "JPEG",
                                        mode="L" if i == 3 else "RGB"), text="ünïcode ✓" * i)
                writer.write(schema.serialize(rec))
                written.append(rec)
    return tmp_path, written


def test_records_and_features_match_tensorflow(shards):
    import tensorflow as tf

    folder, written = shards
    paths = list_shards(folder, "test")
    assert [p.name for p in paths] == ["test-00000-of-00002.tfrecord", "test-00001-of-00002.tfrecord"]
    ours = [r for p in paths for r in iter_records(p)]
    theirs = [r.numpy() for r in tf.data.TFRecordDataset([str(p) for p in paths])]
    assert ours == theirs
    for raw, rec in zip(ours, written):
        parsed = schema.parse(tf.constant(raw))
        fields = bytes_features(raw, {"id", "image", "text", "role"})
        assert fields["id"] == parsed["id"].numpy() == rec.id.encode()
        assert fields["image"] == parsed["image"].numpy() == rec.image
        assert fields["text"].decode() == rec.text and fields["role"].decode() == rec.role
        assert bytes_features(raw, {"absent"}) == {}


def test_thumbnails_match_tensorflow_decoding(shards):
    import tensorflow as tf

    folder, written = shards
    wanted = {"item-1", "item-3", "item-8"}
    found = load_thumbnails(list_shards(folder, "test"), wanted, size=64)
    assert set(found) == wanted
    for rec in written:
        if rec.id not in wanted:
            continue
        image = tf.io.decode_image(rec.image, channels=3, expand_animations=False).numpy()
        h, w = image.shape[:2]
        scale = 64 / max(h, w)
        shape = (max(1, round(h * scale)), max(1, round(w * scale)), 3)
        reference = tf.image.resize(image, shape[:2], antialias=True).numpy()
        got = found[rec.id]
        assert got.dtype == np.uint8 and got.shape == shape
        # Pillow's and TensorFlow's antialiased bilinear filters differ slightly at the edges.
        assert np.abs(got.astype(float) - reference).mean() < 12


def test_small_images_are_not_enlarged_and_grey_becomes_rgb():
    rng = np.random.default_rng(1)
    out = thumbnail(encoded(rng, 20, 30, mode="L"), 96)
    assert out.shape == (20, 30, 3) and np.array_equal(out[..., 0], out[..., 2])


def test_damage_is_reported_or_skipped(shards, tmp_path):
    folder, _ = shards
    path = list_shards(folder, "test")[0]
    truncated = tmp_path / "cut.tfrecord"
    truncated.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        list(iter_records(truncated))
    # A record whose image does not decode is left out; the others are still found.
    import tensorflow as tf

    bad = tmp_path / "bad" / schema.shard_filename("test", 0, 1)
    bad.parent.mkdir()
    rng = np.random.default_rng(2)
    with tf.io.TFRecordWriter(str(bad)) as writer:
        writer.write(schema.serialize(record(0, b"not an image")))
        writer.write(schema.serialize(record(1, encoded(rng, 8, 8))))
    assert set(load_thumbnails(list_shards(bad.parent, "test"), {"item-0", "item-1"})) == {"item-1"}
    assert load_thumbnails([], {"item-1"}) == {} and load_thumbnails([bad], set()) == {}
