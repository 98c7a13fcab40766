"""pipeline.vectors.segment_scan: large query blocks against gallery segments, candidates only.

test_retrieval runs every brute-force case through the scan as well; here: when `retrieve` chooses it, that it
keeps few candidates where classes are well separated, its fallback to whole rows, streamed galleries, and that
a bound that is not one cannot pass silently."""
from __future__ import annotations

import numpy as np
import pytest

import pipeline.vectors.retrieval as retrieval_module
import pipeline.vectors.segment_scan as segment_scan
from pipeline.vectors.gallery import ScoredGallery, open_gallery
from pipeline.vectors.normalize import l2_normalize
from pipeline.vectors.retrieval import METRICS, retrieve
from pipeline.vectors.segment_scan import CandidateRows, collect, key_error_margin, lower_bounds
from tests.vectors.test_retrieval import (
    NAMES, assert_matches_brute_force, clustered_labels, exact_unit_vectors, make_vectors,
)


def separated(n=400, n_classes=20, dim=16, seed=0):
    """Tight, well-separated classes (a query's candidates are about its own class), as exact unit vectors:
    every float32 score is exact, so any two ways of computing them rank alike."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), n // n_classes)
    centres = rng.standard_normal((n_classes, dim)) * 4
    return exact_unit_vectors(centres[labels] + 0.3 * rng.standard_normal((n, dim)), rng), labels


@pytest.fixture
def collected(monkeypatch):
    """Record what every segment scan returned (None: given up)."""
    seen = []

    def recording(*args, **kwargs):
        out = collect(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(retrieval_module, "collect", recording)
    return seen


def assert_same(a, b):
    np.testing.assert_array_equal(a.neighbours, b.neighbours)
    np.testing.assert_allclose(a.neighbour_scores, b.neighbour_scores, atol=1e-6)
    for name in NAMES:
        np.testing.assert_allclose(a.per_query[name], b.per_query[name], atol=1e-12, err_msg=name)


def test_auto_scans_segments_from_the_threshold_on(collected, monkeypatch):
    x, labels = separated()
    monkeypatch.setattr(retrieval_module, "SEGMENT_SCAN_MIN_GALLERY", len(x) + 1)
    rows = retrieve(x, labels, x, labels, k=5, exclude=np.arange(len(x)), chunk_size=64)
    assert collected == []
    monkeypatch.setattr(retrieval_module, "SEGMENT_SCAN_MIN_GALLERY", len(x))
    monkeypatch.setattr(segment_scan, "SEGMENT_SCAN_ROWS", 50)
    segments = retrieve(x, labels, x, labels, k=5, exclude=np.arange(len(x)), chunk_size=64)
    assert collected and all(c is not None for c in collected)
    assert_same(segments, rows)
    assert_matches_brute_force(segments, x, labels, x, labels, "cosine", 5, np.arange(len(x)))
    # Well-separated classes: a query keeps about its own class (20 of 400), not the gallery.
    assert max(c.scores.shape[1] for c in collected) < len(x) / 4


@pytest.mark.parametrize("metric", METRICS)
def test_too_many_candidates_fall_back_to_whole_rows(collected, metric, monkeypatch):
    rng = np.random.default_rng(3)
    labels = clustered_labels(rng, 160, n_classes=4, n_singletons=3)
    x = make_vectors(rng, labels, dim=10, metric=metric)
    monkeypatch.setattr(segment_scan, "CANDIDATE_BUDGET", 30)
    result = retrieve(x, labels, x, labels, metric=metric, k=5, exclude=np.arange(160), chunk_size=40,
                      scan="segments")
    assert collected[0] is None
    assert len(collected) <= 2  # given up by the first block of each worker, then whole rows
    assert_matches_brute_force(result, x, labels, x, labels, metric, 5, np.arange(160))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_streamed_galleries_through_the_scan(tmp_path, metric, dtype, monkeypatch):
    monkeypatch.setattr(segment_scan, "SEGMENT_SCAN_ROWS", 13)
    monkeypatch.setattr(segment_scan, "CANDIDATE_SHARE", 1.0)
    rng = np.random.default_rng(4)
    labels = clustered_labels(rng, 120, n_classes=5, n_singletons=4)
    x = make_vectors(rng, labels, dim=12, metric=metric)   # exact in float16 too
    np.save(tmp_path / "g.npy", x.astype(dtype))
    mapped = open_gallery(tmp_path / "g.npy")
    stored = np.asarray(mapped, dtype=np.float32)
    queries = rng.choice(120, 50, replace=False)
    result = retrieve(stored[queries], labels[queries], mapped, labels, metric=metric, k=6, exclude=queries,
                      chunk_size=16, scan="segments")
    assert_matches_brute_force(result, stored[queries], labels[queries], stored, labels, metric, 6, queries)


def test_a_bound_that_is_not_one_raises(monkeypatch):
    """Raise every bound well above the lowest relevant score: missed candidates must stop the run."""
    x, labels = separated()
    monkeypatch.setattr(retrieval_module, "key_error_margin", lambda gallery, sq: -1.5)
    with pytest.raises(RuntimeError, match="internal error"):
        retrieve(x, labels, x, labels, k=5, exclude=np.arange(len(x)), scan="segments")


@pytest.mark.parametrize("metric", METRICS)
def test_lower_bounds_are_at_or_below_every_score_a_metric_sees(metric):
    rng = np.random.default_rng(5)
    labels = clustered_labels(rng, 90, n_classes=5, n_singletons=6)
    x = make_vectors(rng, labels, dim=8, metric=metric)
    gallery = ScoredGallery(x, metric)
    query = l2_normalize(x) if metric == "cosine" else x
    codes = labels
    members_of = [np.flatnonzero(labels == c) for c in range(int(labels.max()) + 1)]
    exclude = np.arange(90)
    k_eff = np.full(90, 7)
    sq = None if metric == "cosine" else (x.astype(np.float64) ** 2).sum(1)
    margin = key_error_margin(gallery, sq)
    bound = lower_bounds(gallery, query, codes, members_of, exclude, k_eff, margin)
    keys = gallery.keys(query, 0, 90).astype(np.float64)
    keys[np.arange(90), exclude] = -np.inf
    kth = np.sort(keys, axis=1)[:, -7]
    for i in range(90):
        relevant = keys[i, (labels == labels[i]) & (np.arange(90) != i)]
        lowest = relevant.min(initial=np.inf)
        assert bound[i] <= min(lowest, kth[i])
        assert bound[i] >= min(lowest, kth[i]) - 1.0 - np.max(margin)  # a bound, but not a useless one
    # Singletons (no relevant item) are bounded by their k-th score alone.
    singles = [i for i in range(90) if np.sum(labels == labels[i]) == 1]
    assert singles and np.all(bound[singles] <= kth[singles])


def test_gathered_scores_are_the_candidates_and_minus_inf_elsewhere():
    scores = np.array([[0.5, 0.9, -np.inf], [0.1, 0.2, 0.3]], dtype=np.float32)
    columns = np.array([[1, 4, 6], [0, 2, 5]])
    rows = CandidateRows(scores=scores, columns=columns, gallery_size=6)
    got = rows.gather(np.array([0, 1]), np.array([0, 1, 2, 4, 5]))
    expected = np.array([[-np.inf, 0.5, -np.inf, 0.9, -np.inf], [0.1, -np.inf, 0.2, -np.inf, 0.3]], np.float32)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(rows.items_at(1, np.array([2, 0])), [5, 0])
    whole = CandidateRows.whole(np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(whole.gather(np.array([1]), np.array([0, 2])), [[3, 5]])
    np.testing.assert_array_equal(whole.items_at(0, np.array([2])), [2])
