import numpy as np
import pytest

from pipeline.vectors.rerank import apply_mask, filter_mask, predict_category, rerank


def brute_category(labels, weights) -> object:
    """One query: highest total weight; among equal totals the label seen first."""
    totals, first = {}, {}
    for rank, (label, weight) in enumerate(zip(labels, weights)):
        totals[label] = totals.get(label, 0.0) + weight
        first.setdefault(label, rank)
    best = max(totals.values())
    return min((first[label], label) for label, total in totals.items() if total == best)[1]


@pytest.mark.parametrize("method", ["vote", "weighted"])
def test_predict_category_matches_brute_force(method):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (500, 6))  # 6 neighbours of 3 labels: many vote ties
    scores = np.round(rng.uniform(-0.2, 1.0, (500, 6)), 1)  # coarse scores: weighted ties too
    got = predict_category(labels, scores, method=method)
    weights = np.ones_like(scores) if method == "vote" else np.maximum(scores, 0)
    expected = [brute_category(row, w) for row, w in zip(labels.tolist(), weights.tolist())]
    np.testing.assert_array_equal(got, expected)


def test_predict_category_ties_strings_and_padding():
    labels = np.array([["shoes", "hat", "hat", "shoes"], ["hat", "shoes", "bag", "bag"]])
    # Row 0: 2-2 tie, the nearest neighbour (shoes) decides; row 1: bag wins 2-1-1.
    np.testing.assert_array_equal(predict_category(labels), ["shoes", "bag"])
    valid = np.array([[False, True, True, True], [True, True, False, False]])
    # Row 0 without its first: hat 2, shoes 1; row 1 without the bags: hat-shoes tie, hat ranks first.
    np.testing.assert_array_equal(predict_category(labels, valid=valid), ["hat", "hat"])
    with pytest.raises(ValueError, match="needs neighbour_scores"):
        predict_category(labels, method="weighted")
    with pytest.raises(ValueError, match="unknown vote method"):
        predict_category(labels, method="majority")


def brute_rerank(rows, scores, labels, category, mode, boost, k):
    items = [(r, s, lab) for r, s, lab in zip(rows, scores, labels)]
    real = [(i, it) for i, it in enumerate(items) if it[0] >= 0]
    padding = [it for it in items if it[0] < 0]
    if mode == "filter":
        ordered = [it for _, it in real if it[2] == category] + [it for _, it in real if it[2] != category]
        ordered = [(r, s) for r, s, _ in ordered] + [(r, s) for r, s, _ in padding]
    else:
        boosted = [(np.float32(s) + np.float32(boost) if lab == category else np.float32(s), i, r)
                   for i, (r, s, lab) in real]
        ordered = [(r, s) for s, i, r in sorted(boosted, key=lambda t: (-t[0], t[1]))]
        ordered += [(r, -np.inf) for r, _, _ in padding]
    return [r for r, _ in ordered[:k]], [s for _, s in ordered[:k]]


@pytest.mark.parametrize("mode", ["filter", "boost"])
def test_rerank_matches_brute_force(mode):
    rng = np.random.default_rng(1)
    n, m, k = 300, 20, 8
    scores = -np.sort(-rng.uniform(0, 1, (n, m)).astype(np.float32), axis=1)
    rows = rng.permutation(1000)[:m][None, :].repeat(n, 0)
    rows[:50, -3:] = -1  # padding at the end of some queries
    labels = rng.integers(0, 4, (n, m))
    category = rng.integers(0, 4, n)
    got_rows, got_scores = rerank(rows, scores, labels, category, mode=mode, boost=0.15, k=k)
    assert got_rows.shape == (n, k)
    for q in range(n):
        want_rows, want_scores = brute_rerank(rows[q], scores[q], labels[q], category[q], mode, 0.15, k)
        np.testing.assert_array_equal(got_rows[q], want_rows)
        np.testing.assert_allclose(got_scores[q], want_scores, rtol=0, atol=0)


def test_filter_falls_back_to_the_rest():
    rows = np.array([[7, 3, 9, 4, 1]])
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]], dtype=np.float32)
    labels = np.array([["a", "b", "a", "c", "b"]])
    got_rows, got_scores = rerank(rows, scores, labels, "b", mode="filter", k=4)
    np.testing.assert_array_equal(got_rows, [[3, 1, 7, 9]])  # the two b's, then the rest in order
    np.testing.assert_allclose(got_scores, [[0.8, 0.5, 0.9, 0.7]])
    boosted_rows, boosted = rerank(rows, scores, labels, "c", mode="boost", boost=0.25, k=3)
    np.testing.assert_array_equal(boosted_rows, [[7, 4, 3]])  # 0.6 + 0.25 = 0.85 passes 0.8, not 0.9
    np.testing.assert_allclose(boosted, [[0.9, 0.85, 0.8]], atol=1e-6)
    with pytest.raises(ValueError, match="unknown re-rank mode"):
        rerank(rows, scores, labels, "b", mode="mask")


def test_filter_mask_matches_brute_force_and_names_columns():
    rng = np.random.default_rng(2)
    table = {"label": rng.integers(0, 5, 200), "group": rng.choice(["x", "y", "z"], 200),
             "text": np.array([None if i % 7 == 0 else f"t{i % 3}" for i in range(200)], dtype=object)}
    got = filter_mask(table, {"label": "3", "group": ["x", "z"], "text": "t1"})
    expected = [table["label"][i] == 3 and table["group"][i] in ("x", "z") and table["text"][i] == "t1"
                for i in range(200)]
    np.testing.assert_array_equal(got, expected)
    assert filter_mask(table, {}).all()
    with pytest.raises(ValueError, match=r"unknown filter column\(s\) 'colour'.*label, group, text"):
        filter_mask(table, {"colour": "red"})
    with pytest.raises(ValueError, match="holds numbers"):
        filter_mask(table, {"label": "shoes"})


def test_apply_mask_keeps_allowed_rows_in_order():
    rng = np.random.default_rng(3)
    keep = rng.uniform(size=100) < 0.4
    rows = np.stack([rng.permutation(100)[:15] for _ in range(40)])
    rows[:5, -2:] = -1
    scores = rng.uniform(size=rows.shape).astype(np.float32)
    got_rows, got_scores = apply_mask(rows, scores, keep, k=10)
    for q in range(40):
        allowed = [(r, s) for r, s in zip(rows[q], scores[q]) if r >= 0 and keep[r]][:10]
        allowed += [(-1, -np.inf)] * (10 - len(allowed))
        np.testing.assert_array_equal(got_rows[q], [r for r, _ in allowed])
        np.testing.assert_array_equal(got_scores[q], np.array([s for _, s in allowed], dtype=np.float32))
