"""Class-balanced P x K batches for metric learning, over arrays held in memory.

Pair- and triplet-based losses only learn from positives inside the batch; a
uniformly drawn batch of 64 items over 1,000 classes holds almost none. Each batch
here holds P distinct classes with K items of each, so every item has K-1 positives.

Coverage: classes are drawn from a seeded permutation, walked P at a time and
reshuffled when exhausted, so every usable class appears about equally often; the
items of a class are walked the same way, so every item is seen before any repeats.
A class with fewer than K items contributes all of them plus draws with replacement
from them. Classes with a single item can form no positive pair and are left out.

Hard negatives: the negatives a loss learns most from are the items of other classes
that the embedding puts closest, but P random classes out of 1,000 rarely include the
few classes an item is confused with. `baseline_hard_negatives` (training/mining.py) ranks, for every
item, the other-class items closest to it under the phase-1 baseline; `hard_negative_batch_indices`
builds each batch around an anchor item and fills a share of its class slots with the
classes of the anchor's top-ranked negatives (those items included), the rest as usual.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator

import numpy as np

# The ranking lives in training/mining.py; imported here too, where it was first defined.
from pipeline.training.mining import baseline_hard_negatives  # noqa: F401

log = logging.getLogger("embedlab.sampler")

def split_usable_classes(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(classes with at least two items, classes with exactly one), both sorted."""
    classes, counts = np.unique(np.asarray(labels), return_counts=True)
    return classes[counts >= 2], classes[counts == 1]


# --------------------------------------------------------------------------- batch index streams

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

    def reserve(self, size: int) -> None:
        """Makes sure `size` values are left in the current permutation (starting a fresh one if not)."""
        if self.position + size > self.order.size:
            self.order = self.rng.permutation(self.values)
            self.position = 0

    def take(self, size: int) -> np.ndarray:
        self.reserve(size)
        chunk = self.order[self.position:self.position + size]
        self.position += size
        return chunk

    def take_skipping(self, size: int, skip: np.ndarray) -> np.ndarray:
        """The next `size` values not in `skip`; values of `skip` met on the way are used up too.

        Callers reserve(size + len(skip)) first (or reserved that many for a chunk they
        are still taking), so the values come from the current permutation, distinct.
        Walking past a skipped value uses it up: it is in the batch already, so it has
        had its turn.
        """
        window = self.order[self.position:self.position + size + len(skip)]
        kept = np.flatnonzero(~np.isin(window, skip))[:size]
        if kept.size < size:
            raise AssertionError("take_skipping beyond the reserved values")
        if size:
            self.position += int(kept[-1]) + 1
        return window[kept]


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
    labels, usable, n_classes = _batch_layout(labels, n_classes_per_batch, n_samples_per_class)
    return _generate(labels, usable, n_classes, n_samples_per_class, seed)


def hard_negative_batch_indices(
    labels: np.ndarray,
    hard_negatives: np.ndarray,
    share: float,
    n_classes_per_batch: int,
    n_samples_per_class: int,
    seed: int,
) -> Iterator[np.ndarray]:
    """balanced_batch_indices, with a share of each batch's classes taken from an anchor's hard negatives.

    Each batch starts with a class from the usual class cycle; the first item drawn
    from it is the anchor. Of the other P-1 class slots, round(share * (P-1)) (halves
    round up) go to the classes of the anchor's hard negatives (rows of
    `hard_negatives[anchor]`, in order; -1, single-item classes, the anchor's class and
    classes already taken are passed over), each slot holding the hard negative itself
    first and K-1 other items of its class. Slots left (all of them when the anchor's
    list runs out) take classes from the class cycle, passing over those in the batch.
    share=0 gives exactly the balanced_batch_indices stream of the same seed.

    `hard_negatives` is (len(labels), m) int, row indices into `labels` or -1, such as
    baseline_hard_negatives returns.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"hard-negative share must be in [0, 1], got {share}")
    hard_negatives = np.asarray(hard_negatives)
    n_rows = len(np.asarray(labels))
    if hard_negatives.ndim != 2 or hard_negatives.shape[0] != n_rows:
        raise ValueError(f"hard_negatives must be (n, m) with one row per label ({n_rows}); got {hard_negatives.shape}")
    if share > 0 and hard_negatives.shape[1] < 1:
        raise ValueError("hard_negatives has no columns; a positive share needs at least one negative per row")
    if hard_negatives.size and not np.issubdtype(hard_negatives.dtype, np.integer):
        raise ValueError(f"hard_negatives must hold integer row indices, got dtype {hard_negatives.dtype}")
    if hard_negatives.size and (hard_negatives.min() < -1 or hard_negatives.max() >= n_rows):
        raise ValueError(f"hard_negatives must hold row indices in [0, {n_rows}) or -1")
    labels, usable, n_classes = _batch_layout(labels, n_classes_per_batch, n_samples_per_class)
    n_hard = _hard_slot_count(share, n_classes)
    return _generate(labels, usable, n_classes, n_samples_per_class, seed,
                     hard_negatives=hard_negatives.astype(np.int64, copy=False), n_hard=n_hard)


def _hard_slot_count(share: float, n_classes: int) -> int:
    # Halves round up (Python's round would give 0 hard slots for share 0.5 with P=2).
    return int(np.floor(share * (n_classes - 1) + 0.5))


def _batch_layout(labels, n_classes_per_batch: int, n_samples_per_class: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Validated (labels, usable classes, P capped at their number), warning about what is left out."""
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
    return labels, usable, n_classes


def _generate(labels: np.ndarray, usable: np.ndarray, n_classes: int, k: int, seed: int,
              hard_negatives: np.ndarray | None = None, n_hard: int = 0,
              anchors: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """The batch stream. With n_hard=0 (or no hard_negatives) and no anchors the draws, and so the stream,
    are those of the plain sampler. `anchors`: rows that lead their class's K items in every batch (the
    seed's triplets: an original first, then its versions); a hard negative leads its slot instead."""
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], usable, side="left"), np.searchsorted(labels[order], usable, side="right")
    members = [order[start:stop] for start, stop in zip(*bounds)]
    # One cycle per class, created lazily: a dataset of 100,000 classes would
    # otherwise shuffle them all before the first batch.
    item_cycles: dict[int, _Cycle] = {}
    class_cycle = _Cycle(np.arange(usable.size), rng)
    if hard_negatives is None:
        n_hard = 0
    if n_hard or anchors is not None:
        # Index into `usable` of each row's class; -1 for single-item classes.
        class_of_row = np.full(labels.size, -1, dtype=np.int64)
        for c, rows in enumerate(members):
            class_of_row[rows] = c
    lead_of_class = {} if anchors is None else {int(class_of_row[row]): int(row) for row in np.asarray(anchors)
                                                if class_of_row[row] >= 0}

    def items_of(c: int, hard_negative: int | None = None) -> np.ndarray:
        """K items of class c; with a hard negative (else the class's anchor), that item first and K-1 others."""
        if hard_negative is None:
            hard_negative = lead_of_class.get(c)
        rows = members[c]
        if rows.size >= k:
            cycle = item_cycles.get(c)
            if cycle is None:
                cycle = item_cycles[c] = _Cycle(rows, rng)
            if hard_negative is None:
                return cycle.take(k)
            cycle.reserve(k)
            return np.concatenate([[hard_negative], cycle.take_skipping(k - 1, np.array([hard_negative]))])
        # Every item once, the rest drawn again: replacement only where the class is too small.
        if hard_negative is None:
            return np.concatenate([rng.permutation(rows), rng.choice(rows, k - rows.size, replace=True)])
        others = rows[rows != hard_negative]
        return np.concatenate([[hard_negative], rng.permutation(others), rng.choice(rows, k - rows.size, replace=True)])

    def hard_slots(anchor: int, anchor_class: int) -> list[tuple[int, int]]:
        """(class, hard-negative row) for up to n_hard slots, in the anchor's ranking order."""
        slots: list[tuple[int, int]] = []
        taken = {anchor_class}
        for row in hard_negatives[anchor]:
            c = int(class_of_row[row]) if row >= 0 else -1
            if c >= 0 and c not in taken:
                slots.append((c, int(row)))
                taken.add(c)
                if len(slots) == n_hard:
                    break
        return slots

    while True:
        batch = np.empty(n_classes * k, dtype=np.int64)
        # Reserving the whole batch's classes up front draws them (and uses the rng)
        # exactly as the plain sampler's take(P) does.
        class_cycle.reserve(n_classes)
        anchor_class = int(class_cycle.take(1)[0])
        batch[:k] = items_of(anchor_class)
        slot = 1
        hard = hard_slots(int(batch[0]), anchor_class) if n_hard else []
        for c, row in hard:
            batch[slot * k:(slot + 1) * k] = items_of(c, hard_negative=row)
            slot += 1
        hard_classes = np.array([c for c, _ in hard], dtype=np.int64)
        for c in class_cycle.take_skipping(n_classes - slot, hard_classes):
            batch[slot * k:(slot + 1) * k] = items_of(int(c))
            slot += 1
        yield batch


def table_seed(seed: int, table: int):
    """The seed of the batch stream built on hard-negative table number `table`: table 0 keeps `seed` itself,
    so a run whose table is never refreshed draws exactly the once-mined stream."""
    return seed if table == 0 else [int(seed), int(table)]


def refreshed_batch_indices(
    labels: np.ndarray,
    table_for,
    batches_per_table: int,
    share: float,
    n_classes_per_batch: int,
    n_samples_per_class: int,
    seed: int,
    skip_batches: int = 0,
    anchors: np.ndarray | None = None,
) -> Iterator[np.ndarray]:
    """hard_negative_batch_indices over a table that is replaced every `batches_per_table` batches.

    Batches [t * B, (t + 1) * B) come from table t (`table_for(t)`, which may wait until that table exists,
    and returns None to end the stream), in a stream seeded by table_seed(seed, t). Each table's stream
    depends only on the seed and that table, so a run resumed at any batch needs only the table in force
    there, not the history of earlier tables.
    """
    if batches_per_table < 1:
        raise ValueError(f"batches_per_table must be at least 1, got {batches_per_table}")
    labels, usable, n_classes = _batch_layout(labels, n_classes_per_batch, n_samples_per_class)
    n_hard = _hard_slot_count(share, n_classes)
    table_number, offset = divmod(int(skip_batches), batches_per_table)
    while True:
        table = table_for(table_number)
        if table is None:
            return
        stream = _generate(labels, usable, n_classes, n_samples_per_class, table_seed(seed, table_number),
                           hard_negatives=np.asarray(table, dtype=np.int64), n_hard=n_hard, anchors=anchors)
        yield from itertools.islice(stream, offset, batches_per_table)
        # The stream of table t is consumed from its start, so the skipped batches draw what they drew.
        table_number, offset = table_number + 1, 0


def balanced_batches(
    features: np.ndarray,
    labels: np.ndarray,
    n_classes_per_batch: int,
    n_samples_per_class: int,
    seed: int,
    skip_batches: int = 0,
    hard_negatives: np.ndarray | None = None,
    hard_negative_share: float = 0.0,
    *,
    rows: np.ndarray | None = None,
    anchors: np.ndarray | None = None,
    negative_tables=None,
    batches_per_table: int = 0,
):
    """An endless `tf.data.Dataset` of (features float32 (P*K, ...), labels int32 (P*K,)).

    `features`: an (n, ...) array, or a tuple of them (several model inputs: the batch's x is then the
    tuple), memory-mapped ones included: only each batch's rows are read, per batch. `rows`: for each
    label, its row in `features` (default: row i is label i), so a cache of every item serves any subset.
    `anchors`: indices into `labels` of items that lead their class's K items in every batch.

    Every iteration of the dataset restarts the same seeded stream. `skip_batches`
    starts the stream that many batches in (a resumed training run sees the batches
    it would have seen had it not been interrupted). With `hard_negatives` (rows
    index `labels`, as baseline_hard_negatives returns) and a positive
    `hard_negative_share`, batches come from hard_negative_batch_indices. With `negative_tables` (a function
    table number -> table, e.g. refresh.NegativeTables.table_for) the table is replaced every
    `batches_per_table` batches (refreshed_batch_indices; `hard_negatives` is then the table in force at
    `skip_batches`, used to check the layout).
    """
    import tensorflow as tf

    arrays = features if isinstance(features, tuple) else (features,)
    labels = np.asarray(labels)
    rows = np.arange(len(labels)) if rows is None else np.asarray(rows, dtype=np.int64)
    if len(rows) != len(labels) or any(a.ndim < 2 or (rows.size and rows.max() >= len(a)) for a in arrays):
        raise ValueError(f"features must be (n, d...) arrays holding a row for each of the {len(labels)} labels; "
                         f"got {[a.shape for a in arrays]}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if hard_negatives is None and hard_negative_share != 0:
        raise ValueError(f"hard_negative_share={hard_negative_share} needs hard_negatives")
    # Validate (and warn) now, not when Keras first pulls a batch.
    if hard_negatives is None:
        probe = balanced_batch_indices(labels, n_classes_per_batch, n_samples_per_class, seed)
    else:
        probe = hard_negative_batch_indices(labels, hard_negatives, hard_negative_share, n_classes_per_batch,
                                            n_samples_per_class, seed)
        hard_negatives = np.asarray(hard_negatives, dtype=np.int64)
    batch_size = next(probe).size
    n_classes = batch_size // n_samples_per_class
    n_hard = _hard_slot_count(hard_negative_share, n_classes)
    labels32 = labels.astype(np.int32)

    def generate():
        if negative_tables is not None:
            batches = refreshed_batch_indices(labels, negative_tables, batches_per_table, hard_negative_share,
                                              n_classes, n_samples_per_class, seed, skip_batches, anchors)
        else:
            batches = itertools.islice(
                _generate(labels, split_usable_classes(labels)[0], n_classes, n_samples_per_class, seed,
                          hard_negatives=hard_negatives, n_hard=n_hard, anchors=anchors), skip_batches, None)
        for batch in batches:
            # Gathering in numpy keeps the arrays out of the TensorFlow graph, whose
            # constants are limited to 2 GB; a memory map reads only these rows.
            x = tuple(np.asarray(a[rows[batch]], dtype=np.float32) for a in arrays)
            yield (x if len(arrays) > 1 else x[0]), labels32[batch]

    specs = tuple(tf.TensorSpec((batch_size, *a.shape[1:]), tf.float32) for a in arrays)
    signature = (specs if len(arrays) > 1 else specs[0], tf.TensorSpec((batch_size,), tf.int32))
    return tf.data.Dataset.from_generator(generate, output_signature=signature).prefetch(tf.data.AUTOTUNE)
