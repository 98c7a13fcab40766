"""Hard-negative seeding of P x K batches: baseline ranking and the batch streams built on it."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.training.sampler import (baseline_hard_negatives, balanced_batch_indices, balanced_batches,
                              hard_negative_batch_indices)


# --------------------------------------------------------------------------- baseline_hard_negatives

def brute_force_hard_negatives(embeddings: np.ndarray, labels: np.ndarray, n_negatives: int) -> np.ndarray:
    """The documented ranking, pair by pair, in exact integer arithmetic.

    Similarity is the dot product of the unit vectors rounded to multiples of 2**-11,
    i.e. of the integer vectors round(unit * 2048); ties go to the lower row index.
    """
    n = len(embeddings)
    grid = np.zeros(embeddings.shape, dtype=np.int64)
    for i in range(n):
        norm = np.sqrt(np.sum(embeddings[i].astype(np.float64) ** 2))
        if norm > 0:
            grid[i] = np.rint(embeddings[i] / norm * 2048).astype(np.int64)
    expected = np.full((n, n_negatives), -1, dtype=np.int64)
    for i in range(n):
        scored = [(-int(grid[i] @ grid[j]), j) for j in range(n) if labels[j] != labels[i]]
        ranked = [j for _, j in sorted(scored)][:n_negatives]
        expected[i, :len(ranked)] = ranked
    return expected


def tricky_embeddings(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """200 rows, 12 dims: duplicates and a scaled copy across labels, a zero row, one dominant class."""
    rng = np.random.default_rng(seed)
    n = 200
    embeddings = rng.normal(size=(n, 12)).astype(np.float32)
    labels = rng.integers(1, 8, size=n)
    labels[100:192] = 0                                 # a dominant class: its rows have ~100 negatives
    embeddings[[5, 77, 150, 199]] = embeddings[3]      # exact duplicates of row 3, other labels
    embeddings[120] = 2.5 * embeddings[3]               # same direction, other scale
    labels[[3, 5, 77, 150, 199, 120]] = [1, 2, 3, 4, 5, 0]
    embeddings[10] = 0.0                                # a zero row: similarity 0 to everything
    labels[10] = 6
    return embeddings, labels


@pytest.mark.parametrize("n_negatives", [1, 3, 10, 25])
def test_baseline_hard_negatives_matches_brute_force_for_any_chunk_size(n_negatives):
    embeddings, labels = tricky_embeddings()
    expected = brute_force_hard_negatives(embeddings, labels, n_negatives)
    for chunk_size in (1, 7, 64, 199, 200, 1024):
        got = baseline_hard_negatives(embeddings, labels, n_negatives=n_negatives, chunk_size=chunk_size)
        assert got.dtype == np.int64 and got.shape == (200, n_negatives)
        np.testing.assert_array_equal(got, expected, err_msg=f"chunk_size={chunk_size}")


def test_baseline_hard_negatives_ties_go_to_the_lowest_row_index():
    embeddings, labels = tricky_embeddings()
    hard = baseline_hard_negatives(embeddings, labels, n_negatives=5, chunk_size=16)
    # Row 3's duplicates and its scaled copy are all exactly as similar to it as it can get.
    assert hard[3].tolist() == [5, 77, 120, 150, 199]
    # Every duplicate ranks the others of its group first, in index order, skipping its own label.
    assert hard[77].tolist() == [3, 5, 120, 150, 199]
    # The zero row is equally similar (0) to every row: its negatives are the first other-label rows.
    other_label_rows = np.flatnonzero(labels != labels[10])
    assert hard[10].tolist() == other_label_rows[:5].tolist()


# Small and large n_negatives take the two selection paths (row by row, and all rows at once).
@pytest.mark.parametrize("n_negatives", [5, 8])
def test_baseline_hard_negatives_pads_when_a_row_has_few_negatives(n_negatives):
    rng = np.random.default_rng(1)
    embeddings = rng.normal(size=(60, 8))
    labels = np.zeros(60, dtype=int)
    labels[[7, 30, 41]] = [1, 1, 2]              # class 0 rows have 3 negatives only
    hard = baseline_hard_negatives(embeddings, labels, n_negatives=n_negatives, chunk_size=13)
    for row in np.flatnonzero(labels == 0):
        assert sorted(hard[row, :3].tolist()) == [7, 30, 41]
        assert hard[row, 3:].tolist() == [-1] * (n_negatives - 3)
    assert (hard[labels != 0] >= 0).all()        # classes 1 and 2 have plenty
    np.testing.assert_array_equal(hard, brute_force_hard_negatives(embeddings, labels, n_negatives))


def test_baseline_hard_negatives_with_many_equal_similarities():
    """Hundreds of exact ties (a repeated embedding, a zero row) still go to the lowest row indices."""
    rng = np.random.default_rng(3)
    embeddings = rng.normal(size=(400, 6))
    labels = rng.integers(0, 10, size=400)
    repeated = np.sort(rng.choice(400, 220, replace=False))
    embeddings[repeated] = embeddings[repeated[0]]
    zero_row = int(np.setdiff1d(np.arange(400), repeated)[0])
    embeddings[zero_row] = 0.0
    hard = baseline_hard_negatives(embeddings, labels, n_negatives=4, chunk_size=32)
    np.testing.assert_array_equal(hard, brute_force_hard_negatives(embeddings, labels, 4))
    for row in repeated[:20]:
        assert hard[row].tolist() == repeated[labels[repeated] != labels[row]][:4].tolist()
    assert hard[zero_row].tolist() == np.flatnonzero(labels != labels[zero_row])[:4].tolist()


def test_baseline_hard_negatives_rank_by_true_cosine_up_to_the_rounding():
    """The 2**-11 grid only breaks near-ties: the chosen negatives are the true top ones to ~1e-3."""
    rng = np.random.default_rng(2)
    embeddings = rng.normal(size=(300, 64)) * rng.uniform(0.1, 10, size=(300, 1))
    labels = rng.integers(0, 10, size=300)
    given = embeddings.copy()
    hard = baseline_hard_negatives(embeddings, labels, n_negatives=8, chunk_size=50)
    np.testing.assert_array_equal(embeddings, given)
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    cosine = unit @ unit.T
    for i in range(300):
        negatives = np.flatnonzero(labels != labels[i])
        best = np.sort(cosine[i, negatives])[::-1][:8]
        assert np.all(labels[hard[i]] != labels[i])
        np.testing.assert_allclose(cosine[i, hard[i]], best, atol=1e-3)


def test_baseline_hard_negatives_rejects_bad_input():
    with pytest.raises(ValueError, match="one label per row"):
        baseline_hard_negatives(np.zeros((4, 3)), np.zeros(5, dtype=int))
    with pytest.raises(ValueError, match="at least 1"):
        baseline_hard_negatives(np.zeros((4, 3)), np.zeros(4, dtype=int), n_negatives=0)
    with pytest.raises(ValueError, match="NaN"):
        baseline_hard_negatives(np.full((4, 3), np.nan), np.zeros(4, dtype=int))


# --------------------------------------------------------------------------- hard_negative_batch_indices

# Class sizes: 0..7 plenty, 8 has 3 items (fewer than K=4), 9 and 10 a single item each.
SIZES = [9, 7, 12, 6, 8, 10, 5, 11, 3, 1, 1]
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(len(SIZES)), SIZES))
USABLE = {c for c, size in enumerate(SIZES) if size >= 2}
P, K = 5, 4


def random_hard_negatives(labels: np.ndarray, m: int, seed: int, holes: float = 0.1) -> np.ndarray:
    """Per row, m random rows of other labels (single-item classes included), some replaced by -1."""
    rng = np.random.default_rng(seed)
    hard = np.empty((len(labels), m), dtype=np.int64)
    for i in range(len(labels)):
        hard[i] = rng.choice(np.flatnonzero(labels != labels[i]), m, replace=False)
    hard[rng.random(hard.shape) < holes] = -1
    return hard


def expected_hard_slots(anchor: int, labels, hard_negatives, usable, n_hard) -> list[tuple[int, int]]:
    """(class, row) of the seeded slots, by the documented rule."""
    slots, taken = [], {labels[anchor]}
    for row in hard_negatives[anchor]:
        if row >= 0 and labels[row] in usable and labels[row] not in taken:
            slots.append((labels[row], row))
            taken.add(labels[row])
    return slots[:n_hard]


def check_layout(batch, labels, n_classes, k, usable):
    assert batch.dtype == np.int64 and batch.shape == (n_classes * k,)
    groups = batch.reshape(n_classes, k)
    group_labels = labels[groups]
    assert (group_labels == group_labels[:, :1]).all(), "K consecutive rows per class"
    classes = group_labels[:, 0].tolist()
    assert len(set(classes)) == n_classes, "P distinct classes"
    assert set(classes) <= usable, "only classes with two items or more"
    for rows, c in zip(groups, classes):
        class_size = int(np.sum(labels == c))
        if class_size >= k:
            assert len(set(rows.tolist())) == k, "no repeats inside a class that has K items or more"
        else:
            assert set(rows.tolist()) == set(np.flatnonzero(labels == c).tolist()), "a small class gives all its items"


@pytest.mark.parametrize("share, n_hard", [(0.125, 1), (0.5, 2), (0.75, 3), (1.0, 4)])
def test_batches_are_seeded_with_the_anchors_hard_negatives(share, n_hard):
    hard = random_hard_negatives(LABELS, m=8, seed=1)
    batches = hard_negative_batch_indices(LABELS, hard, share, P, K, seed=3)
    seeded_counts = []
    for batch in itertools.islice(batches, 200):
        check_layout(batch, LABELS, P, K, USABLE)
        anchor = int(batch[0])
        slots = expected_hard_slots(anchor, LABELS, hard, USABLE, n_hard)
        groups = batch.reshape(P, K)
        for slot, (c, row) in enumerate(slots, start=1):
            assert LABELS[groups[slot, 0]] == c and groups[slot, 0] == row, "hard negative first in its slot"
        # Stated without the slot layout: the top usable hard negative and its class are in the batch.
        if slots:
            assert slots[0][1] in batch and slots[0][0] in set(LABELS[batch].tolist())
        seeded_counts.append(len(slots))
    # Halves round up (0.125 * 4 = 0.5 gives one slot); lists with holes sometimes give fewer.
    assert max(seeded_counts) == n_hard and np.mean(seeded_counts) > n_hard - 1


def test_share_one_fills_every_other_slot_with_hard_negative_classes():
    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(12), 6)
    # Each row ranks items of all 11 other classes (twice over): enough for P-1 = 4 slots.
    hard = np.stack([rng.permutation(np.flatnonzero(labels != labels[i]))[:40] for i in range(len(labels))])
    for batch in itertools.islice(hard_negative_batch_indices(labels, hard, 1.0, P, K, seed=0), 100):
        check_layout(batch, labels, P, K, set(range(12)))
        anchor = int(batch[0])
        wanted = expected_hard_slots(anchor, labels, hard, set(range(12)), P - 1)
        assert len(wanted) == P - 1
        assert labels[batch.reshape(P, K)[1:, 0]].tolist() == [c for c, _ in wanted]
        assert batch.reshape(P, K)[1:, 0].tolist() == [row for _, row in wanted]


def test_share_zero_is_the_balanced_stream():
    hard = random_hard_negatives(LABELS, m=6, seed=2)
    seeded = hard_negative_batch_indices(LABELS, hard, 0.0, P, K, seed=11)
    plain = balanced_batch_indices(LABELS, P, K, seed=11)
    for a, b in zip(itertools.islice(seeded, 50), itertools.islice(plain, 50)):
        np.testing.assert_array_equal(a, b)


def test_lists_without_usable_negatives_fall_back_to_the_balanced_stream():
    # Only padding, and single-item classes: no slot can be seeded.
    hard = np.full((len(LABELS), 3), -1, dtype=np.int64)
    hard[:, 0] = np.flatnonzero(LABELS == 9)[0]
    seeded = hard_negative_batch_indices(LABELS, hard, 1.0, P, K, seed=5)
    plain = balanced_batch_indices(LABELS, P, K, seed=5)
    for a, b in zip(itertools.islice(seeded, 50), itertools.islice(plain, 50)):
        np.testing.assert_array_equal(a, b)


def test_hard_negative_stream_is_deterministic_under_seed():
    hard = random_hard_negatives(LABELS, m=6, seed=3)

    def stream(seed):
        return [b.tolist() for b in itertools.islice(hard_negative_batch_indices(LABELS, hard, 0.5, P, K, seed), 30)]

    assert stream(7) == stream(7) and stream(7) != stream(8)
    assert stream(7) != [b.tolist() for b in itertools.islice(balanced_batch_indices(LABELS, P, K, 7), 30)]


def test_fewer_usable_classes_than_p(caplog):
    labels = np.repeat(np.arange(4), [5, 6, 2, 7])
    hard = random_hard_negatives(labels, m=5, seed=4, holes=0.0)
    with caplog.at_level("WARNING", logger="embedlab.sampler"):
        batches = hard_negative_batch_indices(labels, hard, 1.0, n_classes_per_batch=10, n_samples_per_class=3, seed=0)
    assert "only 4 usable classes" in caplog.text
    for batch in itertools.islice(batches, 50):
        check_layout(batch, labels, 4, 3, {0, 1, 2, 3})
        wanted = expected_hard_slots(int(batch[0]), labels, hard, {0, 1, 2, 3}, 3)
        assert batch.reshape(4, 3)[1:len(wanted) + 1, 0].tolist() == [row for _, row in wanted]


def test_single_item_classes_never_appear_even_when_ranked_first(caplog):
    singles = np.flatnonzero(np.isin(LABELS, [9, 10]))
    hard = random_hard_negatives(LABELS, m=6, seed=5)
    hard[:, 0] = np.where(LABELS == 9, singles[1], singles[0])    # top-ranked negative: a single-item class
    with caplog.at_level("WARNING", logger="embedlab.sampler"):
        batches = hard_negative_batch_indices(LABELS, hard, 1.0, P, K, seed=1)
    assert "2 class(es) with a single item" in caplog.text
    drawn = np.concatenate(list(itertools.islice(batches, 200)))
    assert not np.isin(drawn, singles).any()


def test_every_usable_class_and_item_is_drawn():
    hard = random_hard_negatives(LABELS, m=6, seed=6)
    drawn = np.concatenate(list(itertools.islice(hard_negative_batch_indices(LABELS, hard, 0.5, P, K, seed=2), 200)))
    assert set(LABELS[drawn].tolist()) == USABLE
    assert set(drawn.tolist()) == set(np.flatnonzero(np.isin(LABELS, list(USABLE))).tolist())


def test_hard_negative_arguments_are_validated():
    hard = random_hard_negatives(LABELS, m=3, seed=7)
    for share in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="share"):
            hard_negative_batch_indices(LABELS, hard, share, P, K, seed=0)
    with pytest.raises(ValueError, match="one row per label"):
        hard_negative_batch_indices(LABELS, hard[:-1], 0.5, P, K, seed=0)
    with pytest.raises(ValueError, match="one row per label"):
        hard_negative_batch_indices(LABELS, hard[:, 0], 0.5, P, K, seed=0)
    with pytest.raises(ValueError, match="no columns"):
        hard_negative_batch_indices(LABELS, hard[:, :0], 0.5, P, K, seed=0)
    with pytest.raises(ValueError, match="row indices"):
        hard_negative_batch_indices(LABELS, hard + len(LABELS), 0.5, P, K, seed=0)
    with pytest.raises(ValueError, match="at least 2"):
        hard_negative_batch_indices(LABELS, hard, 0.5, P, 1, seed=0)


# --------------------------------------------------------------------------- balanced_batches

def test_balanced_batches_with_hard_negatives_follows_the_index_stream_and_resumes():
    rng = np.random.default_rng(8)
    features = rng.normal(size=(len(LABELS), 6))
    hard = baseline_hard_negatives(features, LABELS, n_negatives=5)
    expected = list(itertools.islice(hard_negative_batch_indices(LABELS, hard, 0.5, P, K, seed=4), 6))
    dataset = balanced_batches(features, LABELS, P, K, seed=4, hard_negatives=hard, hard_negative_share=0.5)
    for (x, y), rows in zip(dataset.take(6), expected):
        assert x.dtype == "float32" and y.dtype == "int32" and x.shape == (P * K, 6) and y.shape == (P * K,)
        np.testing.assert_allclose(x.numpy(), features[rows].astype(np.float32))
        np.testing.assert_array_equal(y.numpy(), LABELS[rows])
    resumed = balanced_batches(features, LABELS, P, K, seed=4, skip_batches=4, hard_negatives=hard,
                               hard_negative_share=0.5)
    for (_, y), rows in zip(resumed.take(2), expected[4:]):
        np.testing.assert_array_equal(y.numpy(), LABELS[rows])
    with pytest.raises(ValueError, match="needs hard_negatives"):
        balanced_batches(features, LABELS, P, K, seed=4, hard_negative_share=0.5)
