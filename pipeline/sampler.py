"""Class-balanced P x K batches for metric learning, over arrays held in memory.

Pair- and triplet-based losses only learn from positives inside the batch; a
uniformly drawn batch of 64 items over 1,000 classes holds almost none. Each batch
here holds P distinct classes with K items of each, so every item has K-1 positives.

Coverage: classes are drawn from a seeded permutation, walked P at a time and
reshuffled when exhausted, so every usable class appears about equally often; the
items of a class are walked the same way, so every item is seen before any repeats.
A class with fewer than K items contributes all of them plus draws with replacement
from them. Classes with a single item can form no positive pair and are left out.
"""
from __future__ import annotations

import logging
from typing import Iterator

import numpy as np

log = logging.getLogger("embedlab.sampler")


def split_usable_classes(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(classes with at least two items, classes with exactly one), both sorted."""
    classes, counts = np.unique(np.asarray(labels), return_counts=True)
    return classes[counts >= 2], classes[counts == 1]


class _Cycle:
    """Walks seeded permutations of `values` chunk by chunk, reshuffling when exhausted.

    A chunk never holds the same value twice: when fewer than `size` values are left
    in the current permutation the remainder is dropped and a fresh permutation of
    all values starts. The dropped values are drawn in the next walk, so over a run
    every value is drawn about equally often.
    """

    def __init__(self, values: np.ndarray, rng: np.random.Generator):
        self.values = values
        self.rng = rng
        self.order = values[:0]
        self.position = 0

    def take(self, size: int) -> np.ndarray:
        if self.position + size > self.order.size:
            self.order = self.rng.permutation(self.values)
            self.position = 0
        chunk = self.order[self.position:self.position + size]
        self.position += size
        return chunk


def balanced_batch_indices(
    labels: np.ndarray,
    n_classes_per_batch: int,
    n_samples_per_class: int,
    seed: int,
) -> Iterator[np.ndarray]:
    """Endless int64 row-index arrays of length P*K, grouped by class (K rows of one class, then the next).

    P is capped at the number of usable classes (with a warning). Raises ValueError
    when fewer than two classes have at least two items.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if n_classes_per_batch < 2:
        raise ValueError(f"n_classes_per_batch must be at least 2 (negatives need another class), "
                         f"got {n_classes_per_batch}")
    if n_samples_per_class < 2:
        raise ValueError(f"n_samples_per_class must be at least 2 (positives need a pair), got {n_samples_per_class}")
    usable, single = split_usable_classes(labels)
    if single.size:
        shown = ", ".join(map(str, single[:10].tolist())) + (" …" if single.size > 10 else "")
        log.warning("sampler: %d class(es) with a single item left out of the batches (no positive pair): %s",
                    single.size, shown)
    if usable.size < 2:
        raise ValueError(f"class-balanced batches need at least 2 classes with 2 or more items; "
                         f"found {usable.size} (of {usable.size + single.size} classes)")
    n_classes = n_classes_per_batch
    if n_classes > usable.size:
        log.warning("sampler: only %d usable classes; batches hold %d classes instead of %d",
                    usable.size, usable.size, n_classes)
        n_classes = int(usable.size)
    return _generate(labels, usable, n_classes, n_samples_per_class, seed)


def _generate(labels: np.ndarray, usable: np.ndarray, n_classes: int, k: int, seed: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], usable, side="left"), np.searchsorted(labels[order], usable, side="right")
    members = [order[start:stop] for start, stop in zip(*bounds)]
    # One cycle per class, created lazily: a dataset of 100,000 classes would
    # otherwise shuffle them all before the first batch.
    item_cycles: dict[int, _Cycle] = {}
    class_cycle = _Cycle(np.arange(usable.size), rng)
    while True:
        batch = np.empty(n_classes * k, dtype=np.int64)
        for slot, c in enumerate(class_cycle.take(n_classes)):
            rows = members[c]
            if rows.size >= k:
                cycle = item_cycles.get(c)
                if cycle is None:
                    cycle = item_cycles[c] = _Cycle(rows, rng)
                chosen = cycle.take(k)
            else:
                # Every item once, the rest drawn again: replacement only where the class is too small.
                chosen = np.concatenate([rng.permutation(rows), rng.choice(rows, k - rows.size, replace=True)])
            batch[slot * k:(slot + 1) * k] = chosen
        yield batch


def balanced_batches(
    features: np.ndarray,
    labels: np.ndarray,
    n_classes_per_batch: int,
    n_samples_per_class: int,
    seed: int,
    skip_batches: int = 0,
):
    """An endless `tf.data.Dataset` of (features float32 (P*K, d), labels int32 (P*K,)).

    Every iteration of the dataset restarts the same seeded stream. `skip_batches`
    starts the stream that many batches in (a resumed training run sees the batches
    it would have seen had it not been interrupted).
    """
    import tensorflow as tf

    features = np.asarray(features)
    labels = np.asarray(labels)
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"features must be (n, d) with one label per row; got {features.shape} and {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    # Validate (and warn) now, not when Keras first pulls a batch.
    probe = balanced_batch_indices(labels, n_classes_per_batch, n_samples_per_class, seed)
    batch_size = next(probe).size
    features32 = features.astype(np.float32, copy=False)
    labels32 = labels.astype(np.int32)

    def generate():
        import itertools

        batches = _generate(labels, split_usable_classes(labels)[0], batch_size // n_samples_per_class,
                            n_samples_per_class, seed)
        for rows in itertools.islice(batches, skip_batches, None):
            # Gathering in numpy keeps the arrays out of the TensorFlow graph, whose
            # constants are limited to 2 GB.
            yield features32[rows], labels32[rows]

    signature = (tf.TensorSpec((batch_size, features.shape[1]), tf.float32), tf.TensorSpec((batch_size,), tf.int32))
    return tf.data.Dataset.from_generator(generate, output_signature=signature).prefetch(tf.data.AUTOTUNE)
