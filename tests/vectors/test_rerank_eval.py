"""Phase 2's category re-ranking metrics (pipeline/vectors/rerank_eval.py) against a brute-force re-ranking."""
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.vectors.rerank import predict_category, rerank
from pipeline.vectors.rerank_eval import evaluate_reranking, neighbours_without_self


def clustered(n, dim, n_classes, noise, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    labels = rng.integers(0, n_classes, n)
    x = centres[labels] + noise * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def brute(x, labels, vote_k, mode, boost):
    """Leave-one-out on one set: vote, re-rank the whole gallery by a sort key, P@1 and MAP@R by definition."""
    n = len(x)
    sims = x.astype(np.float64) @ x.T.astype(np.float64)
    p1, map_r, correct = [], [], []
    for q in range(n):
        others = np.array([g for g in range(n) if g != q])
        order = others[np.argsort(-sims[q, others], kind="stable")]
        votes = labels[order[:vote_k]]
        counts = {c: int((votes == c).sum()) for c in set(votes.tolist())}
        best = max(counts.values())
        category = next(c for c in votes if counts[c] == best)     # ties: the nearest tied label
        correct.append(category == labels[q])
        if mode == "filter":
            ranked = np.concatenate([order[labels[order] == category], order[labels[order] != category]])
        elif mode == "boost":
            score = sims[q, order] + boost * (labels[order] == category)
            ranked = order[np.argsort(-score, kind="stable")]
        else:
            ranked = order
        relevant = labels[ranked] == labels[q]
        r = int(relevant.sum())
        if r == 0:
            continue
        p1.append(float(relevant[0]))
        hits = np.cumsum(relevant[:r])
        map_r.append(float(np.sum(relevant[:r] * hits / np.arange(1, r + 1)) / r))
    return float(np.mean(p1)), float(np.mean(map_r)), float(np.mean(correct))


def settings(**kw):
    base = dict(k=5, chunk_size=64, rerank=["filter", "boost"], rerank_boost=0.1, rerank_vote_k=7)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize("seed", [0, 1])
def test_rerank_metrics_equal_a_brute_force_reranking(seed):
    x, labels = clustered(150, 12, 6, noise=1.4, seed=seed)
    found = evaluate_reranking(x, labels, x, labels, exclude=np.arange(len(x)), settings=settings())
    rows = {r["mode"]: r for r in found["rows"]}
    assert list(rows) == ["none", "filter", "boost"]
    for mode in ("none", "filter", "boost"):
        p1, map_r, accuracy = brute(x, labels, 7, mode, 0.1)
        assert rows[mode]["P@1"] == pytest.approx(p1, abs=1e-9)
        assert rows[mode]["MAP@R"] == pytest.approx(map_r, abs=1e-6)
    assert found["vote_accuracy"] == pytest.approx(accuracy)
    # The noise makes the vote imperfect, so the three rows differ (the test could not pass by accident).
    assert 0.3 < found["vote_accuracy"] < 1.0
    assert rows["filter"]["MAP@R"] != pytest.approx(rows["none"]["MAP@R"], abs=1e-3)


def test_filter_over_the_whole_gallery_is_the_search_time_rerank_with_every_candidate():
    x, labels = clustered(80, 8, 4, noise=1.2, seed=3)
    exclude = np.arange(len(x))
    candidates, scores = neighbours_without_self(x, x, exclude, len(x) - 1)
    votes, vote_scores = neighbours_without_self(x, x, exclude, 7)
    category = predict_category(labels[votes], vote_scores)
    top, _ = rerank(candidates, scores, labels[candidates], category, mode="filter", k=1)
    found = evaluate_reranking(x, labels, x, labels, exclude=exclude, settings=settings(rerank=["filter"], k=1))
    assert found["rows"][1]["P@1"] == pytest.approx(np.mean(labels[top[:, 0]] == labels))


def test_neighbours_leave_the_query_out_and_pad_small_galleries():
    x, _ = clustered(4, 6, 2, noise=0.5, seed=0)
    rows, scores = neighbours_without_self(x, x, np.arange(4), 5)
    assert rows.shape == (4, 5)
    assert all(q not in rows[q] for q in range(4))
    assert (rows[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    assert (rows[:, :3] >= 0).all()


def test_a_query_label_missing_from_the_gallery_is_never_voted_right():
    x, labels = clustered(40, 6, 3, noise=0.2, seed=1)
    query_labels = labels.copy()
    query_labels[:5] = 99
    found = evaluate_reranking(x, query_labels, x, labels, exclude=np.arange(40),
                               settings=settings(rerank=["filter"]), baseline={"P@1": 0.5, "P@k": 0.5,
                                                                               "MAP@R": 0.5, "mAP": 0.5})
    assert found["vote_accuracy"] <= 35 / 40
    assert found["rows"][0]["P@1"] == 0.5      # the given baseline is used, not recomputed


def test_unknown_mode_is_refused():
    x, labels = clustered(10, 4, 2, noise=0.1, seed=0)
    with pytest.raises(ValueError, match="unknown re-rank mode"):
        evaluate_reranking(x, labels, x, labels, exclude=np.arange(10), settings=settings(rerank=["sort"]))
