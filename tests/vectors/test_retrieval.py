"""pipeline.vectors.retrieval against an independent brute force and hand-computed numbers.

The random cases use vectors whose float32 scores are exact (dyadic unit vectors
for cosine, small integers for euclidean): then the float32 chunked matmul and the
float64 brute force agree bit for bit, ties included, and every neighbour list and
metric can be compared exactly instead of up to rounding.
"""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

import pipeline.vectors.retrieval as retrieval_module
import pipeline.vectors.segment_scan as segment_scan
from pipeline.vectors.retrieval import METRICS, PROGRESS_MIN_CHUNKS, RetrievalResult, retrieve

NAMES = ("P@1", "P@k", "R@k", "AP", "MAP@R", "R-precision")


# ----------------------------------------------------------------------------- both scans


@pytest.fixture(autouse=True, params=["rows", "segments"])
def scan(request, monkeypatch):
    """Every case of this module twice: whole score rows, and the segment scan that large galleries get (here
    from any size, with 7-row segments so that every gallery spans several)."""
    if request.param == "segments":
        monkeypatch.setattr(retrieval_module, "SEGMENT_SCAN_MIN_GALLERY", 0)
        monkeypatch.setattr(segment_scan, "SEGMENT_SCAN_ROWS", 7)
        # Keep candidates even where they are most of the gallery (small random cases), so that the scan, not
        # its fallback to whole rows, is what these cases check.
        monkeypatch.setattr(segment_scan, "CANDIDATE_SHARE", 1.0)
    return request.param


# ----------------------------------------------------------------------------- reference


def brute_force(query, query_labels, gallery, gallery_labels, metric, k, exclude=None):
    """Full n_queries x N scores, a stable argsort per query, sklearn AP per query."""
    q = np.asarray(query, dtype=np.float64)
    g = np.asarray(gallery, dtype=np.float64)
    if metric == "cosine":
        qn = np.linalg.norm(q, axis=1, keepdims=True)
        gn = np.linalg.norm(g, axis=1, keepdims=True)
        q = np.where(qn > 0, q / np.where(qn > 0, qn, 1), 0)
        g = np.where(gn > 0, g / np.where(gn > 0, gn, 1), 0)
        scores = q @ g.T
    else:
        scores = -np.sqrt(((q[:, None, :] - g[None, :, :]) ** 2).sum(-1))
    n_queries, n_gallery = scores.shape
    per_query = {name: np.full(n_queries, np.nan) for name in NAMES}
    per_query["n_relevant"] = np.zeros(n_queries, dtype=np.int64)
    neighbours = np.full((n_queries, k), -1)
    neighbour_scores = np.full((n_queries, k), np.nan)
    for i in range(n_queries):
        keep = np.arange(n_gallery)
        if exclude is not None and exclude[i] >= 0:
            keep = keep[keep != exclude[i]]
        s = scores[i, keep]
        order = np.argsort(-s, kind="stable")
        ranked = keep[order]
        k_eff = min(k, keep.size)
        neighbours[i, :k_eff] = ranked[:k_eff]
        neighbour_scores[i, :k_eff] = np.abs(s[order][:k_eff]) if metric == "euclidean" else s[order][:k_eff]
        relevant = np.array([gallery_labels[j] == query_labels[i] for j in keep], dtype=bool)
        n_rel = int(relevant.sum())
        per_query["n_relevant"][i] = n_rel
        if n_rel == 0:
            continue
        rel_ranked = relevant[order]
        precision_at = np.cumsum(rel_ranked) / np.arange(1, keep.size + 1)
        per_query["P@1"][i] = float(rel_ranked[0])
        per_query["P@k"][i] = rel_ranked[:k_eff].sum() / k_eff
        per_query["R@k"][i] = float(rel_ranked[:k_eff].any())
        per_query["R-precision"][i] = rel_ranked[:n_rel].sum() / n_rel
        per_query["MAP@R"][i] = np.sum(precision_at[:n_rel] * rel_ranked[:n_rel]) / n_rel
        per_query["AP"][i] = average_precision_score(relevant, s)
    return neighbours, neighbour_scores, per_query


def assert_matches_brute_force(
    result: RetrievalResult, query, query_labels, gallery, gallery_labels, metric, k, exclude=None
):
    expected = brute_force(query, query_labels, gallery, gallery_labels, metric, k, exclude)
    neighbours, neighbour_scores, per_query = expected
    np.testing.assert_array_equal(result.neighbours, neighbours)
    assert result.neighbours.dtype == np.int64 and result.neighbour_scores.dtype == np.float32
    np.testing.assert_allclose(result.neighbour_scores, neighbour_scores, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(result.per_query["n_relevant"], per_query["n_relevant"])
    for name in NAMES:
        np.testing.assert_allclose(result.per_query[name], per_query[name], rtol=1e-12, atol=1e-12, err_msg=name)
    evaluated = per_query["n_relevant"] > 0
    means = {"P@1": "P@1", "P@k": "P@k", "R@k": "R@k", "AP": "mAP", "MAP@R": "MAP@R", "R-precision": "R-precision"}
    for name, mean_name in means.items():
        assert result.metrics[mean_name] == pytest.approx(per_query[name][evaluated].mean(), abs=1e-12), mean_name
    assert result.metrics["n_queries"] == len(query)
    assert result.metrics["n_queries_evaluated"] == int(evaluated.sum())
    assert result.metrics["n_queries_without_positive"] == int((~evaluated).sum())
    assert result.metrics["gallery_size"] == len(gallery)
    expected_occurrence = np.bincount(neighbours[neighbours >= 0], minlength=len(gallery))
    np.testing.assert_array_equal(result.k_occurrence, expected_occurrence)


# ----------------------------------------------------------------------------- exact data


def _two_squares(m: int):
    c = np.arange(int(np.sqrt(m)) + 1)
    d2 = m - c * c
    d = np.round(np.sqrt(d2)).astype(np.int64)
    hit = np.flatnonzero(d * d == d2)
    return (int(c[hit[0]]), int(d[hit[0]])) if hit.size else None


def exact_unit_vectors(directions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors with entries n/1024 and sum(n^2) == 2**20, close to `directions`.

    All their dot products are multiples of 2**-20 in [-1, 1], so float32 computes
    them exactly in any summation order. The last four coordinates absorb the
    rounding (Lagrange: every integer is a sum of four squares).
    """
    target = 1 << 20
    out = np.zeros(directions.shape, dtype=np.int64)
    for row, v in enumerate(directions):
        head = v[:-4] / np.linalg.norm(v[:-4])
        head = np.round(head * 0.95 * 1024).astype(np.int64)
        rest = target - int((head**2).sum())
        while True:
            a, b = rng.integers(0, int(np.sqrt(rest / 2)) + 1, 2)
            pair = _two_squares(rest - int(a * a + b * b)) if a * a + b * b <= rest else None
            if pair is not None:
                break
        tail = np.array([a, b, *pair]) * rng.choice([-1, 1], 4)
        out[row] = np.concatenate([head, tail])
    assert np.all((out**2).sum(1) == target)
    return (out / 1024.0).astype(np.float32)


def clustered_labels(rng, n, n_classes, n_singletons):
    """Labels for n items: a few classes plus some single-member classes."""
    labels = rng.integers(0, n_classes, n)
    labels[rng.choice(n, n_singletons, replace=False)] = n_classes + np.arange(n_singletons)
    return labels


def make_vectors(rng, labels, dim, metric):
    n_codes = int(labels.max()) + 1
    if metric == "cosine":
        centres = rng.standard_normal((n_codes, dim))
        directions = centres[labels] + 0.9 * rng.standard_normal((len(labels), dim))
        return exact_unit_vectors(directions, rng)
    # Integers in [-300, 300]: squared distances stay below 2**24, exact in float32.
    centres = rng.integers(-200, 201, (n_codes, dim))
    points = centres[labels] + rng.integers(-120, 121, (len(labels), dim))
    return np.clip(points, -300, 300).astype(np.float32)


def as_strings(labels):
    return np.array([f"class-{v}" for v in labels])


# ----------------------------------------------------------------------------- random cases


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("string_labels", [False, True])
def test_leave_one_out_matches_brute_force(seed, metric, string_labels):
    rng = np.random.default_rng(seed)
    labels = clustered_labels(rng, 150, n_classes=6, n_singletons=5)
    x = make_vectors(rng, labels, dim=12, metric=metric)
    if string_labels:
        labels = as_strings(labels)
    exclude = np.arange(len(x))
    result = retrieve(x, labels, x, labels, metric=metric, k=5, exclude=exclude, chunk_size=17)
    assert_matches_brute_force(result, x, labels, x, labels, metric, 5, exclude)
    assert result.metrics["n_queries_without_positive"] >= 5  # the singletons
    assert result.metrics["k"] == 5


@pytest.mark.parametrize("seed", [3, 4])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("string_labels", [False, True])
def test_separate_queries_match_brute_force(seed, metric, string_labels):
    """Queries outside the gallery, one query class absent from the gallery, no exclusion."""
    rng = np.random.default_rng(seed)
    labels = clustered_labels(rng, 190, n_classes=7, n_singletons=3)
    x = make_vectors(rng, labels, dim=10, metric=metric)
    is_query = np.zeros(len(x), dtype=bool)
    is_query[rng.choice(len(x), 60, replace=False)] = True
    is_query[labels == 6] = True  # class 6 exists only among the queries
    query_labels, gallery_labels = labels[is_query], labels[~is_query]
    assert 6 in query_labels and 6 not in gallery_labels
    if string_labels:
        query_labels, gallery_labels = as_strings(query_labels), as_strings(gallery_labels)
    result = retrieve(x[is_query], query_labels, x[~is_query], gallery_labels, metric=metric, k=4, chunk_size=9)
    assert_matches_brute_force(result, x[is_query], query_labels, x[~is_query], gallery_labels, metric, 4)
    assert result.metrics["n_queries_without_positive"] >= int(np.sum(labels == 6))


@pytest.mark.parametrize("metric", METRICS)
def test_partial_exclusion_matches_brute_force(metric):
    """Some queries are gallery items (excluded), others are not (-1)."""
    rng = np.random.default_rng(5)
    labels = clustered_labels(rng, 120, n_classes=4, n_singletons=2)
    x = make_vectors(rng, labels, dim=8, metric=metric)
    gallery, gallery_labels = x[:100], labels[:100]
    query = np.concatenate([x[:40], x[100:]])
    query_labels = np.concatenate([labels[:40], labels[100:]])
    exclude = np.concatenate([np.arange(40), np.full(20, -1)])
    result = retrieve(query, query_labels, gallery, gallery_labels, metric=metric, k=6, exclude=exclude, chunk_size=11)
    assert_matches_brute_force(result, query, query_labels, gallery, gallery_labels, metric, 6, exclude)


@pytest.mark.parametrize("metric", METRICS)
def test_heavy_ties_match_brute_force(metric):
    """Few distinct vectors, many duplicates: ties across relevant and irrelevant items everywhere."""
    rng = np.random.default_rng(6)
    if metric == "cosine":
        prototypes = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0.5, 0.5, 0.5, 0.5], [0.5, -0.5, 0.5, -0.5], [0, 0, 0, 0]])
    else:
        prototypes = np.array([[0, 0], [1, 0], [0, 1], [3, 4], [1, 1]])
    pick = rng.integers(0, len(prototypes), 80)
    x = prototypes[pick].astype(np.float32)
    labels = rng.integers(0, 3, 80)  # labels independent of the vector: relevant and irrelevant tie
    exclude = np.arange(80)
    result = retrieve(x, labels, x, labels, metric=metric, k=7, exclude=exclude, chunk_size=13)
    assert_matches_brute_force(result, x, labels, x, labels, metric, 7, exclude)
    result = retrieve(x[:30], labels[:30], x, labels, metric=metric, k=7, chunk_size=8)
    assert_matches_brute_force(result, x[:30], labels[:30], x, labels, metric, 7)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("use_exclude", [False, True])
def test_k_larger_than_gallery(metric, use_exclude):
    rng = np.random.default_rng(7)
    x = rng.integers(-3, 4, (4, 3)).astype(np.float32)
    labels = np.array([0, 1, 0, 1])
    exclude = np.arange(4) if use_exclude else None
    result = retrieve(x, labels, x, labels, metric=metric, k=7, exclude=exclude, chunk_size=3)
    assert_matches_brute_force(result, x, labels, x, labels, metric, 7, exclude)
    visible = 3 if use_exclude else 4
    assert result.metrics["k"] == visible
    assert np.all(result.neighbours[:, visible:] == -1)
    assert np.all(np.isnan(result.neighbour_scores[:, visible:]))
    assert np.all(result.neighbours[:, :visible] >= 0)


# ----------------------------------------------------------------------------- hand-computed


def test_hand_computed_example():
    """Points on a line, euclidean, k=3; expected numbers worked out by hand.

    gallery x = 0(a) 1(b) 3(a) 6(a) 10(b)
    q0 = 2 (a): ranking 1b 2a 0a 3a 4b (1 and 2 tie at distance 1 -> index 1 first)
        R=3, P@1=0, P@3=2/3, R@3=1, R-prec=2/3, MAP@R=(1/2+2/3)/3=7/18,
        AP (ties together) = (1/2 + 2/3 + 3/4)/3 = 23/36
    q1 = 8 (b): ranking 3a 4b 2a 1b 0a (3 and 4 tie at distance 2)
        R=2, P@1=0, P@3=1/3, R@3=1, R-prec=1/2, MAP@R=(1/2)/2=1/4, AP=(1/2+2/4)/2=1/2
    q2 = 0 (c): no gallery item of class c -> without positive; ranking 0 1 2
    """
    gallery = np.array([[0, 0], [1, 0], [3, 0], [6, 0], [10, 0]], dtype=np.float32)
    gallery_labels = np.array(["a", "b", "a", "a", "b"])
    query = np.array([[2, 0], [8, 0], [0, 0]], dtype=np.float32)
    query_labels = np.array(["a", "b", "c"])
    result = retrieve(query, query_labels, gallery, gallery_labels, metric="euclidean", k=3, chunk_size=2)

    np.testing.assert_array_equal(result.neighbours, [[1, 2, 0], [3, 4, 2], [0, 1, 2]])
    np.testing.assert_array_equal(result.neighbour_scores, [[1, 1, 2], [2, 2, 5], [0, 1, 3]])
    np.testing.assert_array_equal(result.k_occurrence, [2, 2, 3, 1, 1])
    pq = result.per_query
    np.testing.assert_array_equal(pq["n_relevant"], [3, 2, 0])
    np.testing.assert_allclose(pq["P@1"], [0, 0, np.nan])
    np.testing.assert_allclose(pq["P@k"], [2 / 3, 1 / 3, np.nan])
    np.testing.assert_allclose(pq["R@k"], [1, 1, np.nan])
    np.testing.assert_allclose(pq["R-precision"], [2 / 3, 1 / 2, np.nan])
    np.testing.assert_allclose(pq["MAP@R"], [7 / 18, 1 / 4, np.nan])
    np.testing.assert_allclose(pq["AP"], [23 / 36, 1 / 2, np.nan])
    m = result.metrics
    assert m["P@1"] == 0.0
    assert m["P@k"] == pytest.approx(1 / 2)
    assert m["R@k"] == 1.0
    assert m["R-precision"] == pytest.approx(7 / 12)
    assert m["MAP@R"] == pytest.approx(23 / 72)
    assert m["mAP"] == pytest.approx(41 / 72)
    counts = ("k", "n_queries", "n_queries_evaluated", "n_queries_without_positive", "gallery_size")
    assert [m[name] for name in counts] == [3, 3, 2, 1, 5]
    assert all(isinstance(m[name], float) for name in ("P@1", "P@k", "R@k", "mAP", "MAP@R", "R-precision"))


def test_tie_between_relevant_and_irrelevant_uses_sklearn_ap_and_stable_ranks():
    """Query (1,0) label y; gallery 0:(1,0)x 1:(1,0)y 2:(0,1)y 3:(1,0)y.

    Stable ranking 0x 1y 3y 2y. AP with the three tied items entering together:
    (2/3 + 2/3 + 3/4)/3 = 25/36 (a stable-order AP would give 23/36).
    MAP@R = (1/2 + 2/3)/3 = 7/18, R-precision = 2/3, P@1 = 0.
    """
    gallery = np.array([[1, 0], [1, 0], [0, 1], [1, 0]], dtype=np.float32)
    query = np.array([[1, 0]], dtype=np.float32)
    result = retrieve(query, np.array(["y"]), gallery, np.array(["x", "y", "y", "y"]), k=3)
    np.testing.assert_array_equal(result.neighbours, [[0, 1, 3]])
    assert result.per_query["AP"][0] == pytest.approx(25 / 36)
    assert result.per_query["MAP@R"][0] == pytest.approx(7 / 18)
    assert result.per_query["R-precision"][0] == pytest.approx(2 / 3)
    assert result.per_query["P@1"][0] == 0.0
    assert result.per_query["P@k"][0] == pytest.approx(2 / 3)


def test_tie_at_the_bottom_of_the_ranking():
    """Query (1,0) y; gallery 0:(1,0)y 1:(-1,0)x 2:(-1,0)y: the two last items tie.

    Stable ranking 0y 1x 2y: ranks of the relevant items are 1 and 3,
    AP = (1/1 + 2/3)/2 = 5/6, MAP@R = (1/1)/2 = 1/2, R-precision = 1/2.
    """
    gallery = np.array([[1, 0], [-1, 0], [-1, 0]], dtype=np.float32)
    result = retrieve(np.array([[1, 0]], dtype=np.float32), ["y"], gallery, ["y", "x", "y"], k=3)
    np.testing.assert_array_equal(result.neighbours, [[0, 1, 2]])
    assert result.per_query["AP"][0] == pytest.approx(5 / 6)
    assert result.per_query["MAP@R"][0] == pytest.approx(1 / 2)
    assert result.per_query["R-precision"][0] == pytest.approx(1 / 2)


def test_tie_group_starting_exactly_at_rank_r_or_k():
    """Index order inside a tie group decides metrics when the group starts at rank R (or k).

    Cosine, query (1,0) label y, R=2: 0:(1,0)y rank 1, then 1:(0,1)x and 2:(0,1)y tie at
    score 0 -> ranks 2 (x) and 3 (y): R-precision = 1/2, MAP@R = 1/2, P@2 = 1/2.
    Euclidean, query 0 label y, k=3, R=1: 1x 2x then 3x and -3y tie at distance 3 ->
    the relevant item has rank 4: P@3 = 0, R@3 = 0.
    """
    gallery = np.array([[1, 0], [0, 1], [0, 1]], dtype=np.float32)
    result = retrieve(np.array([[1, 0]], dtype=np.float32), ["y"], gallery, ["y", "x", "y"], k=2)
    assert result.per_query["R-precision"][0] == 0.5
    assert result.per_query["MAP@R"][0] == 0.5
    assert result.per_query["P@k"][0] == 0.5

    gallery = np.array([[1], [2], [3], [-3]], dtype=np.float32)
    result = retrieve(np.zeros((1, 1), dtype=np.float32), ["y"], gallery, ["x", "x", "x", "y"], metric="euclidean", k=3)
    np.testing.assert_array_equal(result.neighbours, [[0, 1, 2]])
    assert result.per_query["P@k"][0] == 0.0
    assert result.per_query["R@k"][0] == 0.0
    assert result.per_query["AP"][0] == pytest.approx(1 / 4)  # tied at 3: 1 relevant among the 4 items >= its score


def test_cosine_zero_vectors_give_zero_scores_not_nan():
    x = np.array([[0, 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 0]], dtype=np.float32)
    labels = np.array([1, 1, 2, 2])
    result = retrieve(x, labels, x, labels, k=3, exclude=np.arange(4))
    assert np.isfinite(result.neighbour_scores).all()
    # Row 0 is zero: every score is 0, so the neighbours come in index order.
    np.testing.assert_array_equal(result.neighbours[0], [1, 2, 3])
    np.testing.assert_array_equal(result.neighbour_scores[0], [0, 0, 0])
    assert_matches_brute_force(result, x, labels, x, labels, "cosine", 3, np.arange(4))


def test_euclidean_uses_raw_vectors_and_cosine_is_scale_invariant():
    gallery = np.array([[1, 0], [10, 0], [0, 3]], dtype=np.float32)
    labels = np.array([0, 1, 2])
    query = np.array([[9, 0]], dtype=np.float32)
    euclid = retrieve(query, [1], gallery, labels, metric="euclidean", k=3)
    np.testing.assert_array_equal(euclid.neighbours, [[1, 0, 2]])
    np.testing.assert_allclose(euclid.neighbour_scores, [[1, 8, np.sqrt(90)]], rtol=1e-6)
    cosine = retrieve(query, [1], gallery, labels, metric="cosine", k=3)
    np.testing.assert_array_equal(cosine.neighbours, [[0, 1, 2]])  # 0 and 1 tie at cosine 1
    np.testing.assert_allclose(cosine.neighbour_scores, [[1, 1, 0]])


# ----------------------------------------------------------------------------- engineering


def test_chunk_size_does_not_change_anything():
    rng = np.random.default_rng(8)
    labels = rng.integers(0, 5, 90)
    x = make_vectors(rng, labels, dim=8, metric="cosine")
    results = [retrieve(x, labels, x, labels, k=5, exclude=np.arange(90), chunk_size=c) for c in (1, 7, 90, 1000)]
    for other in results[1:]:
        np.testing.assert_array_equal(other.neighbours, results[0].neighbours)
        for name in NAMES:
            np.testing.assert_array_equal(other.per_query[name], results[0].per_query[name])


@pytest.mark.parametrize("metric", METRICS)
def test_small_internal_budgets_change_nothing(metric, monkeypatch):
    """Split class groups into many row slices and binary-search every tie group."""
    import pipeline.vectors.ranks as ranks

    monkeypatch.setattr(ranks, "GROUP_ELEMENTS", 100)  # 3 rows per slice
    monkeypatch.setattr(ranks, "WALK_LIMIT", 1)
    rng = np.random.default_rng(11)
    prototypes = rng.integers(-2, 3, (6, 3)).astype(np.float32)
    x = prototypes[rng.integers(0, 6, 90)]
    labels = rng.integers(0, 3, 90)
    result = retrieve(x, labels, x, labels, metric=metric, k=4, exclude=np.arange(90), chunk_size=16)
    assert_matches_brute_force(result, x, labels, x, labels, metric, 4, np.arange(90))


def test_no_queries():
    gallery = np.eye(3, dtype=np.float32)
    result = retrieve(np.zeros((0, 3), dtype=np.float32), np.array([], dtype=int), gallery, [0, 1, 2], k=2)
    assert result.neighbours.shape == (0, 2) and result.neighbour_scores.shape == (0, 2)
    assert result.metrics["n_queries"] == 0 and np.isnan(result.metrics["mAP"])
    np.testing.assert_array_equal(result.k_occurrence, [0, 0, 0])
    assert set(result.per_query) == {"AP", "MAP@R", "P@1", "P@k", "R@k", "R-precision", "n_relevant"}


def test_memory_stays_per_chunk(scan, monkeypatch):
    """numpy reports its buffers to tracemalloc: the peak must be far below one n x N matrix (the segment scan
    with its real share: random classes make candidates most of the gallery, so it turns to whole rows)."""
    import pipeline.vectors.gallery as gallery_module

    monkeypatch.setattr(segment_scan, "CANDIDATE_SHARE", gallery_module.CANDIDATE_SHARE)
    rng = np.random.default_rng(9)
    n = 3000
    x = rng.standard_normal((n, 16)).astype(np.float32)
    labels = rng.integers(0, 10, n)
    full_matrix = n * n * 4
    tracemalloc.start()
    try:
        retrieve(x, labels, x, labels, k=5, exclude=np.arange(n), chunk_size=64)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < full_matrix / 3, f"peak {peak / 1e6:.1f} MB vs full matrix {full_matrix / 1e6:.1f} MB"


def test_progress_bar(capsys):
    rng = np.random.default_rng(10)
    x = rng.standard_normal((20, 4)).astype(np.float32)
    labels = rng.integers(0, 2, 20)
    quiet = retrieve(x, labels, x, labels, chunk_size=6)
    loud = retrieve(x, labels, x, labels, chunk_size=6, progress=True)
    np.testing.assert_array_equal(quiet.neighbours, loud.neighbours)
    assert "retrieval" in capsys.readouterr().err


def test_gallery_of_one_with_exclusion_has_no_neighbours():
    x = np.ones((1, 3), dtype=np.float32)
    result = retrieve(x, [0], x, [0], k=2, exclude=np.array([0]))
    np.testing.assert_array_equal(result.neighbours, [[-1, -1]])
    assert result.metrics["n_queries_without_positive"] == 1
    assert np.isnan(result.metrics["mAP"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"metric": "dot"}, "metric"),
        ({"k": 0}, "k must"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"exclude": np.array([0, 5, 1])}, "exclude"),
        ({"exclude": np.array([0, 1])}, "exclude"),
        ({"scan": "columns"}, "scan must"),
    ],
)
def test_invalid_arguments(kwargs, message):
    x = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match=message):
        retrieve(x, [0, 1, 2], x, [0, 1, 2], **kwargs)


def test_invalid_inputs():
    x = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="dim"):
        retrieve(x, [0, 1, 2], np.eye(4, dtype=np.float32), [0, 1, 2, 3])
    with pytest.raises(ValueError, match="NaN"):
        retrieve(np.full((1, 3), np.nan), [0], x, [0, 1, 2])
    with pytest.raises(ValueError, match="query_labels"):
        retrieve(x, [0, 1], x, [0, 1, 2])


def test_mixed_label_types_compare_with_equality():
    """1 and "1" are different labels; 1 and 1.0 are the same."""
    x = np.eye(3, dtype=np.float32)
    result = retrieve(x, np.array([1, 2, 3], dtype=object), x, np.array(["1", 2.0, 3], dtype=object), k=1)
    np.testing.assert_array_equal(result.per_query["n_relevant"], [0, 1, 1])


# ----------------------------------------------------------------------------- unit identity (issue 13)


def unit_clusters(n=300, dim=16, n_classes=5, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    centres = rng.standard_normal((n_classes, dim))
    x = centres[labels] + 0.8 * rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


def test_progress_bar_counts_queries_only_on_long_passes(capsys):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((40, 4)).astype(np.float32)
    labels = rng.integers(0, 2, 40)
    retrieve(x, labels, x, labels, chunk_size=40, progress=True)        # one chunk: no bar
    assert capsys.readouterr().err == ""
    retrieve(x, labels, x, labels, chunk_size=40 // (PROGRESS_MIN_CHUNKS + 1), progress=True)
    err = capsys.readouterr().err
    assert "queries/s" in err and "40/40" in err
