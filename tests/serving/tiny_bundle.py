"""A real bundle, small enough for tests: a two-layer Keras model exported as the image SavedModel, a few
dozen coloured images embedded with it, written by pipeline.serving.bundle's own writer."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("red", "green", "blue", "yellow")
COLOURS = ((220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 30))


def class_image(c: int, i: int, size: int = 32) -> bytes:
    """A class colour with stripes and noise (seeded by class and index), as PNG."""
    rng = np.random.default_rng(100 * c + i)
    img = np.tile(np.array(COLOURS[c], np.int16), (size, size, 1))
    img[(np.arange(size) // 4) % 2 == 0, :] += 25
    img += rng.integers(-25, 26, img.shape).astype(np.int16)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def tiny_image_model(size: int = 32, dim: int = 16):
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Concatenate()([x, keras.layers.GlobalAveragePooling2D()(inputs) / 255.0])
    x = keras.layers.Dense(dim)(x)
    outputs = keras.layers.UnitNormalization()(x)
    return keras.Model(inputs, outputs, name="tiny_embedding")


def build_tiny_bundle(root: Path, per_class: int = 6) -> dict:
    """Write the bundle at `root`; returns {"images": {id: bytes}, "embeddings": {id: vector}}."""
    import pandas as pd

    from pipeline.serving.bundle import write_bundle
    from pipeline.serving.serving_model import ImageEmbedder, write_image_saved_model
    from pipeline.serving.thumbnails import thumbnails_of

    model_dir = root.parent / f"{root.name}-image-model"
    write_image_saved_model(tiny_image_model(), model_dir)
    rows, images = [], []
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            rows.append({"id": f"{name}-{i}", "label": c, "label_name": name, "path": f"{name}/{i}.png",
                         "text": f"a {name} square number {i}", "group": f"g{i % 2}",
                         "split": "test" if i % 3 == 0 else "train"})
            images.append(class_image(c, i))
    vectors, errors, _ = ImageEmbedder(model_dir).embed(images)
    assert not errors, errors
    write_bundle(root, pd.DataFrame(rows), vectors, thumbnails_of(images, workers=1), model_dir,
                 {"backbone": "tiny-test-model", "loss": "none"}, index_kind="flat")
    return {"images": {row["id"]: data for row, data in zip(rows, images)},
            "embeddings": {row["id"]: vector for row, vector in zip(rows, vectors)}}


_master: dict[str, Path] = {}


def shared_tiny_bundle(tmp_path_factory) -> tuple[Path, dict]:
    """One tiny bundle per test session (building it takes seconds); copy it before changing it."""
    if "root" not in _master:
        root = tmp_path_factory.mktemp("tiny-bundle") / "bundle"
        _master["info"] = build_tiny_bundle(root)
        _master["root"] = root
    return _master["root"], _master["info"]


def copy_bundle(root: Path, destination: Path) -> Path:
    """A private copy of a bundle, to add to and remove from."""
    import shutil

    shutil.copytree(root, destination, symlinks=True)
    return destination
