"""pipeline.vectors.gallery: galleries read from memory-mapped / float16 `.npy` a segment at a time, score buffers
sized by a budget instead of the gallery, and sorting only the candidates a metric can see — each checked against
the brute force of test_retrieval (exact data, so float32 and float64 agree bit for bit, ties included)."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import pipeline.vectors.gallery as gallery_module
import pipeline.vectors.retrieval as retrieval
from pipeline.vectors.gallery import ScoredGallery, open_gallery, rows_in_flight, sorted_candidates
from pipeline.vectors.retrieval import METRICS, retrieve
from tests.vectors.test_retrieval import NAMES, assert_matches_brute_force, clustered_labels, make_vectors


def saved(tmp_path, name: str, array: np.ndarray) -> np.ndarray:
    np.save(tmp_path / name, array)
    return open_gallery(tmp_path / name)


def assert_same_result(a, b):
    np.testing.assert_array_equal(a.neighbours, b.neighbours)
    np.testing.assert_array_equal(a.neighbour_scores, b.neighbour_scores)
    np.testing.assert_array_equal(a.k_occurrence, b.k_occurrence)
    for name in NAMES:
        np.testing.assert_array_equal(a.per_query[name], b.per_query[name], err_msg=name)


@pytest.mark.parametrize("metric", METRICS)
def test_memory_mapped_gallery_in_segments_matches_brute_force(tmp_path, metric, monkeypatch):
    monkeypatch.setattr(gallery_module, "SEGMENT_ROWS", 7)   # many segments, the last one short
    rng = np.random.default_rng(0)
    labels = clustered_labels(rng, 120, n_classes=5, n_singletons=4)
    x = make_vectors(rng, labels, dim=12, metric=metric)
    mapped = saved(tmp_path, "g.npy", x)
    assert isinstance(mapped, np.memmap) and ScoredGallery(mapped, metric).streamed
    queries = rng.choice(120, 40, replace=False)
    result = retrieve(x[queries], labels[queries], mapped, labels, metric=metric, k=6, exclude=queries, chunk_size=9)
    assert_matches_brute_force(result, x[queries], labels[queries], x, labels, metric, 6, queries)
    # Same answers as the in-RAM gallery (cosine keys may differ in the last bit: compare the metrics exactly
    # here, where every score is exact).
    resident = retrieve(x[queries], labels[queries], x, labels, metric=metric, k=6, exclude=queries, chunk_size=9)
    assert_same_result(result, resident)


@pytest.mark.parametrize("metric", METRICS)
def test_float16_gallery_ranks_its_stored_values_with_float32_accumulation(tmp_path, metric):
    """The float16 path equals the brute-force ranking of the stored float16 values (upcast, float32 sums)."""
    rng = np.random.default_rng(1)
    labels = clustered_labels(rng, 100, n_classes=4, n_singletons=3)
    x = make_vectors(rng, labels, dim=10, metric=metric)   # n/1024 and small integers: exact in float16 too
    half = saved(tmp_path, "g16.npy", x.astype(np.float16))
    assert half.dtype == np.float16
    stored = np.asarray(half, dtype=np.float32)
    result = retrieve(stored[:30], labels[:30], half, labels, metric=metric, k=5, exclude=np.arange(30))
    assert_matches_brute_force(result, stored[:30], labels[:30], stored, labels, metric, 5, np.arange(30))


def test_float16_rounding_changes_rankings_only_where_float32_scores_are_that_close():
    """Generic float vectors stored as float16: top-k lists may change, but only between items whose float32
    scores differ by less than float16's rounding could move them."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((400, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = rng.integers(0, 4, 400)
    full = retrieve(x[:50], labels[:50], x, labels, k=5, exclude=np.arange(50))
    half = retrieve(x[:50], labels[:50], x.astype(np.float16), labels, k=5, exclude=np.arange(50))
    scores = x[:50] @ x.T
    # float16 has an 11-bit significand: each coordinate moves by at most 2^-11 of itself, a score by at most
    # about 2 * 2^-11 (Cauchy-Schwarz on unit vectors).
    bound = 2 * 2.0**-11 + 1e-6
    for row in np.flatnonzero(np.any(full.neighbours != half.neighbours, axis=1)):
        moved = np.setxor1d(full.neighbours[row], half.neighbours[row])
        kth = np.sort(scores[row][full.neighbours[row]])[0]
        assert np.all(np.abs(scores[row][moved] - kth) <= 2 * bound)


def test_score_buffers_follow_the_budget_not_the_gallery(monkeypatch):
    assert rows_in_flight(1024, 60_000, 2) == 1024                    # CIFAR-10 60k: chunk_size as before
    assert rows_in_flight(1024, 1_000_000, 2) == (768 << 20) // 8_000_000
    assert rows_in_flight(1024, 10**9, 2) == 2                        # at least one row per worker
    monkeypatch.setattr(gallery_module, "SCORE_BUDGET_BYTES", 8 * 50 * 7)   # 7 rows of a 50-item gallery
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 50)
    x = make_vectors(rng, labels, dim=6, metric="cosine")
    small = retrieve(x, labels, x, labels, k=4, exclude=np.arange(50), chunk_size=1000)
    assert_matches_brute_force(small, x, labels, x, labels, "cosine", 4, np.arange(50))


def test_peak_memory_does_not_grow_with_a_memory_mapped_gallery(tmp_path, monkeypatch):
    """tracemalloc sees numpy's buffers, not the file's mapped pages: a 4x larger gallery adds only its O(N)
    bookkeeping (labels, norms, k-occurrence), far less than its own float32 size."""
    monkeypatch.setattr(gallery_module, "SCORE_BUDGET_BYTES", 1 << 20)
    monkeypatch.setattr(gallery_module, "SEGMENT_ROWS", 1024)
    rng = np.random.default_rng(4)
    peaks = {}
    for n in (5_000, 20_000):
        x = rng.standard_normal((n, 64)).astype(np.float32)
        labels = rng.integers(0, 10, n)
        mapped = saved(tmp_path, f"g{n}.npy", x)
        del x
        tracemalloc.start()
        try:
            retrieve(np.asarray(mapped[:64]), labels[:64], mapped, labels, k=5, exclude=np.arange(64))
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    grown = peaks[20_000] - peaks[5_000]
    # A float32 copy of the 15,000 added rows alone would be 3.84 MB (an in-RAM normalised gallery makes one).
    assert grown < 15_000 * 64 * 4 / 2, f"peak grew by {grown / 1e6:.2f} MB for 15,000 more items"


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("share", [0.0, 10.0])   # always sort whole rows / always only the candidates
def test_sorting_only_candidates_changes_nothing(metric, share, monkeypatch):
    monkeypatch.setattr(gallery_module, "CANDIDATE_SHARE", share)
    rng = np.random.default_rng(5)
    labels = clustered_labels(rng, 150, n_classes=6, n_singletons=5)
    x = make_vectors(rng, labels, dim=12, metric=metric)
    result = retrieve(x, labels, x, labels, metric=metric, k=5, exclude=np.arange(150), chunk_size=16)
    assert_matches_brute_force(result, x, labels, x, labels, metric, 5, np.arange(150))
    # Heavy ties between relevant and irrelevant items, k above some class sizes, queries outside the gallery.
    # (Prototypes whose float32 scores are exact, as in test_heavy_ties_match_brute_force.)
    if metric == "cosine":
        prototypes = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0.5, 0.5, 0.5, 0.5], [0.5, -0.5, 0.5, -0.5], [0, 0, 0, 0]])
    else:
        prototypes = np.array([[0, 0], [1, 0], [0, 1], [3, 4], [1, 1]])
    y = prototypes[rng.integers(0, 5, 70)].astype(np.float32)
    y_labels = rng.integers(0, 4, 70)
    result = retrieve(y[:25], y_labels[:25], y[25:], y_labels[25:], metric=metric, k=9, chunk_size=6)
    assert_matches_brute_force(result, y[:25], y_labels[:25], y[25:], y_labels[25:], metric, 9)


def test_candidates_are_the_items_at_or_above_the_bound_left_padded():
    scores = np.array([[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, 0.8, 0.1]], dtype=np.float32)
    buffer = np.empty(scores.size, dtype=np.float32)
    out = sorted_candidates(scores, np.array([0.5, 0.8], dtype=np.float32), buffer)
    np.testing.assert_array_equal(out, np.array([[0.5, 0.7, 0.9], [-np.inf, -np.inf, 0.8]], dtype=np.float32))
    whole = sorted_candidates(scores, None, buffer)
    np.testing.assert_array_equal(whole, np.sort(scores, axis=1))


def test_well_separated_classes_sort_candidates_only(monkeypatch):
    """Clusters far apart: every relevant item outscores every other one, so only the class is sorted."""
    seen = []
    original = retrieval.sorted_candidates

    def spy(scores, bound, buffer):
        out = original(scores, bound, buffer)
        seen.append((out.shape[1], scores.shape[1]))
        return out

    monkeypatch.setattr(retrieval, "sorted_candidates", spy)
    rng = np.random.default_rng(6)
    labels = np.repeat(np.arange(10), 30)
    x = (np.eye(16)[labels] * 10 + rng.standard_normal((300, 16))).astype(np.float32)
    result = retrieve(x, labels, x, labels, k=5, exclude=np.arange(300), chunk_size=64)
    assert result.metrics["P@1"] == 1.0 and result.metrics["mAP"] == 1.0
    assert seen and all(width <= 29 for width, _ in seen)


def test_invalid_galleries(tmp_path):
    with pytest.raises(ValueError, match="2-D"):
        open_gallery(saved_path(tmp_path, np.zeros(3, dtype=np.float32)))
    bad = np.ones((4, 3), dtype=np.float16)
    bad[2, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        retrieve(np.ones((1, 3), dtype=np.float32), [0], bad, [0, 0, 1, 1])
    with pytest.raises(ValueError, match="numeric"):
        ScoredGallery(np.array([["a"]]), "cosine")


def saved_path(tmp_path, array):
    np.save(tmp_path / "x.npy", array)
    return tmp_path / "x.npy"
