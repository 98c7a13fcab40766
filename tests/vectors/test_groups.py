"""Originals and their versions (pipeline/vectors/groups.py) against brute force: full score matrices ranked
with the stable (score, gallery index) order, scikit-learn's roc_auc_score and average_precision_score, and
pair counting."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from pipeline.vectors import groups as G


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_retrieval(q, q_keys, g, g_keys, ks=(1, 5, 10)):
    """Every metric of one direction from the full cosine matrix (float32 as the library scores)."""
    qn, gn = _unit(q.astype(np.float64)).astype(np.float32), _unit(g.astype(np.float64)).astype(np.float32)
    scores = qn @ gn.T
    ranks, aps, map_r = [], [], []
    for i in range(len(q)):
        order = sorted(range(len(g)), key=lambda j: (-scores[i, j], j))
        rel = np.array([g_keys[j] == q_keys[i] for j in order])
        if not rel.any():
            continue
        ranks.append(1 + int(np.argmax(rel)))
        truth = np.array([g_keys[j] == q_keys[i] for j in range(len(g))])
        aps.append(average_precision_score(truth, scores[i]))
        r = int(rel.sum())
        precision = np.cumsum(rel[:r]) / np.arange(1, r + 1)
        map_r.append(float((precision * rel[:r]).sum() / r))
    ranks = np.array(ranks, float)
    out = {f"R@{k}": float((ranks <= min(k, len(g))).mean()) for k in ks}
    out.update({"MAP@R": float(np.mean(map_r)), "mAP": float(np.mean(aps)), "mean_rank": float(ranks.mean()),
                "median_rank": float(np.median(ranks))})
    return out


def _toy(seed=0, n_groups=30, per_group=4, dim=16, noise=0.6):
    rng = np.random.default_rng(seed)
    originals = rng.normal(size=(n_groups, dim))
    rows, groups, is_original, classes, roles = [], [], [], [], []
    for gi in range(n_groups):
        rows.append(originals[gi])
        groups.append(f"g{gi}"), is_original.append(True), classes.append(f"c{gi % 3}"), roles.append("original")
        for v in range(per_group):
            rows.append(originals[gi] + noise * rng.normal(size=dim))
            groups.append(f"g{gi}"), is_original.append(False), classes.append(f"c{gi % 3}")
            roles.append("moderate" if v % 2 else "radical")
    return (_unit(np.array(rows)).astype(np.float32), np.array(groups), np.array(is_original), np.array(classes),
            np.array(roles))


@pytest.mark.parametrize("seed", [0, 1])
def test_group_retrieval_matches_brute_force_in_both_directions(seed):
    x, groups, originals, _, _ = _toy(seed, noise=1.2)
    o, v = np.flatnonzero(originals), np.flatnonzero(~originals)
    for q, g in ((o, v), (v, o)):
        metrics, ranks = G.group_retrieval(x[q], groups[q], x[g], groups[g], chunk_size=7)
        expected = _brute_retrieval(x[q], groups[q], x[g], groups[g])
        for name, value in expected.items():
            assert metrics[name] == pytest.approx(value, abs=1e-9), name
        assert metrics["n_queries_evaluated"] == len(q) and metrics["gallery_size"] == len(g)
    # one relevant item: MAP@R is R@1
    metrics, _ = G.group_retrieval(x[v], groups[v], x[o], groups[o])
    assert metrics["MAP@R"] == pytest.approx(metrics["R@1"])


def test_first_relevant_rank_orders_ties_by_gallery_index_and_counts_queries_without_answer():
    gallery = np.array([[1.0, 0], [1.0, 0], [0, 1.0], [1.0, 0]], np.float32)   # three equal scores for query 0
    query = np.array([[1.0, 0], [0, 1.0]], np.float32)
    ranks = G.first_relevant_ranks(query, np.array(["a", "z"]), gallery, np.array(["b", "c", "d", "a"]))
    assert ranks[0] == 3.0 and np.isnan(ranks[1])      # two tied irrelevant items at lower indices come first
    metrics, _ = G.group_retrieval(query, np.array(["a", "z"]), gallery, np.array(["b", "c", "d", "a"]))
    assert metrics["n_queries_without_positive"] == 1 and metrics["R@1"] == 0.0 and metrics["R@5"] == 1.0


def test_auc_rank_formula_matches_sklearn_and_pair_counting_with_ties():
    rng = np.random.default_rng(3)
    pos = np.round(rng.normal(1, 1, 57), 1)            # rounding makes ties within and across the two sides
    neg = np.round(rng.normal(0, 1, 83), 1)
    counted = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    auc = G.roc_auc(pos, neg)
    assert auc == pytest.approx(counted, abs=1e-12)
    assert auc == pytest.approx(roc_auc_score(np.r_[np.ones(57), np.zeros(83)], np.r_[pos, neg]), abs=1e-12)
    wp, wn = rng.integers(0, 4, 57), rng.integers(0, 4, 83)
    weighted = roc_auc_score(np.r_[np.ones(57), np.zeros(83)], np.r_[pos, neg], sample_weight=np.r_[wp, wn])
    assert G.weighted_auc(pos, neg, wp, wn) == pytest.approx(weighted, abs=1e-12)
    assert np.isnan(G.roc_auc(pos, []))


def test_auc_interval_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, 200), rng.normal(0, 1, 600)
    pc, nc = np.repeat(np.arange(50), 4), np.repeat(np.arange(50), 12)
    a = G.auc_with_interval(pos, pc, neg, nc, seed=5)
    assert a == G.auc_with_interval(pos, pc, neg, nc, seed=5)
    low, high = a["ci95"]
    assert low < a["auc"] < high and 0 < a["se"] < 0.1 and a["bootstrap_samples"] == G.BOOTSTRAP_SAMPLES


def test_roc_points_run_from_origin_to_one_and_integrate_to_the_auc():
    rng = np.random.default_rng(1)
    pos, neg = rng.normal(1, 1, 40), rng.normal(0, 1, 70)
    fpr, tpr = G.roc_points(pos, neg)
    assert (fpr[0], tpr[0]) == (0, 0) and (fpr[-1], tpr[-1]) == (1, 1)
    assert np.trapezoid(tpr, fpr) == pytest.approx(G.roc_auc(pos, neg), abs=1e-12)


def test_original_of_leaves_out_groups_without_or_with_several_originals():
    groups = np.array(["a", "a", "a", "b", "b", "c", "c", "c", "", "d"])
    originals = np.array([False, True, False, False, False, True, True, False, True, True])
    owner, left_out = G.original_of(groups, originals)
    assert owner.tolist() == [1, -1, 1, -1, -1, -1, -1, -1, -1, -1]
    assert left_out == {"groups_without_original": 1, "groups_with_several_originals": 1,
                        "groups_without_versions": 1}


def test_non_matching_pairs_never_pair_a_version_with_its_own_original_and_are_seeded():
    versions = np.arange(100, 160)
    own = np.repeat(np.arange(0, 20, 2), 6)                # ten originals 0, 2, ..., 18, six versions each
    pools = [np.arange(0, 20, 2), np.array([4]), np.arange(0, 10, 2)]
    pool_of = np.array([0] * 30 + [1] * 12 + [2] * 18)
    a, b = G.non_matching_pairs(versions, own, pool_of, pools, 7, seed=3)
    again = G.non_matching_pairs(versions, own, pool_of, pools, 7, seed=3)
    assert np.array_equal(a, again[0]) and np.array_equal(b, again[1])
    owner = dict(zip(versions, own))
    assert all(owner[v] != o for v, o in zip(a, b))
    in_pool = {v: set(pools[p].tolist()) for v, p in zip(versions, pool_of)}
    assert all(o in in_pool[v] for v, o in zip(a, b))
    # pool 1 holds only original 4: versions of 4 get nothing, the other six get 7 draws each of it
    pool1 = versions[30:42]
    counts = {v: int((a == v).sum()) for v in pool1}
    assert [counts[v] for v in pool1] == [0 if owner[v] == 4 else 7 for v in pool1]
    # every other original of the big pool is drawn
    assert set(b[np.isin(a, versions[:30])]) == set(range(0, 20, 2))


def test_pair_closeness_and_neighbour_overlap_against_numpy():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(10, 6))
    a, b = np.array([0, 3, 5]), np.array([1, 3, 9])
    c = G.pair_closeness(x, a, b)
    for i, (p, q) in enumerate(zip(a, b)):
        assert c["cosine"][i] == pytest.approx(x[p] @ x[q] / np.linalg.norm(x[p]) / np.linalg.norm(x[q]))
        assert c["mse"][i] == pytest.approx(np.mean((x[p] - x[q]) ** 2))
        assert c["mae"][i] == pytest.approx(np.mean(np.abs(x[p] - x[q])))
    left = np.array([[1, 2, 3], [4, 5, -1], [-1, -1, -1]])
    right = np.array([[3, 2, 9], [6, 7, 8], [-1, -1, -1]])
    got = G.neighbour_overlap(left, right)
    assert got[0] == pytest.approx(2 / 3) and got[1] == 0 and np.isnan(got[2])


def test_evaluate_groups_scores_the_query_split_and_separates_versions_from_random_pairs():
    x, groups, originals, classes, roles = _toy(4, n_groups=40, noise=0.5)
    n = len(x)
    split = np.where(np.isin(groups, [f"g{i}" for i in range(20)]), "test", "train")
    query_rows = np.flatnonzero(split == "test")
    gallery_rows = query_rows
    result = G.evaluate_groups(x, groups, originals, roles, classes, query_rows, gallery_rows, k=5, seed=0)
    m = result.metrics
    assert m["protocol"]["n_groups"] == 20 and m["protocol"]["n_versions"] == 80
    v = np.flatnonzero((split == "test") & ~originals)
    o = np.flatnonzero((split == "test") & originals)
    expected = _brute_retrieval(x[o], groups[o], x[v], groups[v])
    assert m["retrieval"]["original_to_versions"]["MAP@R"] == pytest.approx(expected["MAP@R"])
    auc = m["closeness"]["auc"]["random"]["cosine"]
    assert auc["auc"] > 0.95 and auc["n_positive"] == 80 and auc["n_negative"] == 80 * 5
    # MSE orders unit vectors exactly as the cosine does
    assert m["closeness"]["auc"]["random"]["mse"]["auc"] == pytest.approx(auc["auc"])
    assert {r["role"] for r in m["closeness"]["per_role"]} == {"moderate", "radical"}
    assert result.block.matrix.shape == (12, 48) and np.all(result.own_original < n)
    diagonal = result.block.matrix[result.block.column_owner, np.arange(48)]
    assert diagonal.mean() > result.block.matrix.mean()
    assert G.evaluate_groups(x, groups, np.zeros(n, bool), roles, classes, query_rows, gallery_rows) is None


def test_versions_of_and_sample_groups_keep_groups_whole():
    own = np.array([7, 3, 7, 9, 3, 7])
    found = G.versions_of(own)
    assert {k: v.tolist() for k, v in found.items()} == {3: [1, 4], 7: [0, 2, 5], 9: [3]}
    versions = np.arange(100, 106)
    rows = G.sample_groups(versions, own, max_points=7, seed=0)
    assert len(rows) <= 7 and np.all(np.diff(rows) > 0)
    for original, members in found.items():          # a group is in the sample whole or not at all
        inside = np.isin(np.r_[original, versions[members]], rows)
        assert inside.all() or not inside.any()
    assert len(G.sample_groups(versions, own, max_points=1, seed=0)) >= 2   # at least one group
