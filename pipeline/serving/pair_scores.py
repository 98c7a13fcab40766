"""How similar two images are under an image-level embedding model: the cosine of their embeddings.

The model takes raw RGB pixels (0..255) and returns unit embeddings: phase 3's `embedding_model.keras`, or a
phase-1 feature extractor (its {"pooled", "embedding"} outputs; "embedding" is used). Every file is read and
normalised as phase 0 normalises a collection (pipeline/data/images.py: EXIF orientation, 8-bit RGB, bad files
refused with a reason) and decoded and resized exactly as phase 1 does (`tfrecords.decode_and_resize`), so a
file scores as its copy in a dataset would. Each distinct file is embedded once, in batches through tf.data.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.serving.serving_model import embedding_output, model_image_size


def read_images(paths: Sequence[str]) -> tuple[dict[str, bytes], dict[str, str]]:
    """({path: normalised encoded bytes}, {path: why it cannot be used}) for the distinct paths."""
    from pipeline.data.images import normalize_file

    good, bad = {}, {}
    for path in dict.fromkeys(paths):
        result = normalize_file(path)
        if result.ok:
            good[path] = result.data
        else:
            bad[path] = result.reason
    return good, bad


def embed_encoded(model, encoded: Sequence[bytes], batch_size: int = 32, progress: bool = False) -> np.ndarray:
    """(n, dim) float32 unit embeddings of encoded images, in their order (tf.data: decode, resize, batch)."""
    import tensorflow as tf
    from tqdm import tqdm

    from pipeline.data.tfrecords import decode_and_resize
    from pipeline.vectors.normalize import l2_normalize

    model = embedding_output(model)
    size = model_image_size(model)
    if not encoded:
        return np.zeros((0, int(model.output.shape[-1])), np.float32)
    images = tf.data.Dataset.from_tensor_slices(tf.constant(list(encoded), dtype=tf.string))
    batches = images.map(lambda b: decode_and_resize(b, size), num_parallel_calls=tf.data.AUTOTUNE,
                         deterministic=True).batch(batch_size).prefetch(tf.data.AUTOTUNE)
    out = []
    with tqdm(total=len(encoded), desc="embedding", unit="img", disable=None if progress else True) as bar:
        for batch in batches:
            out.append(np.asarray(model(batch, training=False), np.float32))
            bar.update(len(out[-1]))
    # The models end in an L2 normalisation; normalising again costs nothing and guards a model that does not.
    return l2_normalize(np.concatenate(out))


def pair_similarities(model, pairs: Sequence[tuple[str, str]], batch_size: int = 32,
                      progress: bool = False) -> tuple[np.ndarray, list[str]]:
    """(cosine of each pair — NaN where a file could not be used —, the reason per pair, "" when scored)."""
    good, bad = read_images([path for pair in pairs for path in pair])
    order = list(good)
    vectors = embed_encoded(model, [good[p] for p in order], batch_size, progress)
    row = {path: i for i, path in enumerate(order)}
    scores = np.full(len(pairs), np.nan)
    reasons = []
    for i, (a, b) in enumerate(pairs):
        problems = [f"{path}: {bad[path]}" for path in dict.fromkeys((a, b)) if path in bad]
        reasons.append("; ".join(problems))
        if not problems:
            scores[i] = float(vectors[row[a]] @ vectors[row[b]])
    return scores, reasons


def resolve_pair_paths(table, base: Path) -> list[tuple[str, str]]:
    """The (a, b) file paths of a pairs table's rows, relative ones resolved against `base`."""
    def resolve(value: str) -> str:
        path = Path(str(value).strip())
        return str(path if path.is_absolute() else base / path)

    return [(resolve(a), resolve(b)) for a, b in zip(table["a"], table["b"])]
