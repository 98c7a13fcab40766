"""pipeline.vectors.diagnostics against brute force over all pairs, scikit-learn PCA and scipy."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import skew
from sklearn.decomposition import PCA

import pipeline.vectors.diagnostics as diagnostics
from pipeline.vectors.diagnostics import clustering_scores, embedding_diagnostics


def brute_force_pairs(x, labels):
    """Every ordered pair i != j, the slow and obvious way."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1)
    unit = np.divide(x, norms[:, None], out=np.zeros_like(x), where=norms[:, None] > 0)
    cosine = unit @ unit.T
    squared = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    labels = np.asarray(labels)
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~np.eye(len(x), dtype=bool)
    return {
        "mean_pairwise_cosine": cosine[off_diagonal].mean(),
        "intra_class_cosine": cosine[same & off_diagonal].mean(),
        "inter_class_cosine": cosine[~same].mean(),
        "intra_inter_distance_ratio": squared[same & off_diagonal].mean() / squared[~same].mean(),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("block", [7, 8192])
def test_pair_statistics_match_brute_force(seed, block, monkeypatch):
    monkeypatch.setattr(diagnostics, "_ROW_BLOCK", block)  # 7 exercises the streaming passes
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, 70)
    labels[5] = 9  # a singleton class: no same-class pair of its own
    centres = rng.standard_normal((10, 6)) * 3
    x = (centres[labels] + rng.standard_normal((70, 6)) + 20.0).astype(np.float32)  # offset: tests cancellation
    x[3] = 0.0  # a zero row: cosine 0 with everything
    result = embedding_diagnostics(x, labels)
    expected = brute_force_pairs(x, labels)
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_string_labels_and_norm_statistics():
    x = np.array([[3, 4], [0, 0], [6, 8], [1, 0]], dtype=np.float32)
    labels = np.array(["a", "b", "a", "b"])
    result = embedding_diagnostics(x, labels)
    assert result["n"] == 4 and result["dim"] == 2 and result["n_classes"] == 2
    norms = np.array([5.0, 0.0, 10.0, 1.0])
    assert result["norm"] == pytest.approx({"mean": norms.mean(), "std": norms.std(), "min": 0.0, "max": 10.0})
    # a-pair: same direction; b-pair: one zero vector -> cosine 0.
    assert result["intra_class_cosine"] == pytest.approx(0.5)
    expected = brute_force_pairs(x, labels)
    assert result["inter_class_cosine"] == pytest.approx(expected["inter_class_cosine"])


def test_pca_ratios_match_sklearn():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((500, 12)) * np.linspace(5, 0.1, 12) @ np.linalg.qr(rng.standard_normal((12, 12)))[0]
    x += 7.0
    result = embedding_diagnostics(x.astype(np.float32), np.zeros(500, dtype=int), max_components=8)
    reference = PCA().fit(x.astype(np.float32).astype(np.float64)).explained_variance_ratio_
    assert len(result["pca_explained_variance_ratio"]) == 8
    np.testing.assert_allclose(result["pca_explained_variance_ratio"], reference[:8], rtol=1e-6, atol=1e-9)
    cumulative = np.cumsum(reference)
    assert result["components_for_90"] == int(np.argmax(cumulative >= 0.90)) + 1
    assert result["components_for_99"] == int(np.argmax(cumulative >= 0.99)) + 1


def test_effective_rank_isotropic_vs_rank_one():
    rng = np.random.default_rng(4)
    isotropic = rng.standard_normal((20000, 8))
    result = embedding_diagnostics(isotropic, np.zeros(20000, dtype=int))
    assert result["effective_rank"] == pytest.approx(8.0, abs=0.02)
    assert result["components_for_90"] in (7, 8)

    direction = rng.standard_normal(8)
    rank_one = rng.standard_normal((500, 1)) * direction + 3.0
    result = embedding_diagnostics(rank_one, np.zeros(500, dtype=int))
    assert result["effective_rank"] == pytest.approx(1.0, abs=1e-6)
    assert result["components_for_90"] == 1 and result["components_for_99"] == 1
    assert result["pca_explained_variance_ratio"][0] == pytest.approx(1.0)


def test_effective_rank_of_a_known_spectrum():
    """Variances (4, 1) on two axes: p = (0.8, 0.2), effective rank = exp(H(p))."""
    rng = np.random.default_rng(5)
    z = rng.standard_normal((4000, 2))
    z = (z - z.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(z.T))).T  # exactly white
    x = z * np.array([2.0, 1.0])
    p = np.array([0.8, 0.2])
    result = embedding_diagnostics(x, np.zeros(4000, dtype=int))
    assert result["effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-9)


def test_hubness_fields():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((30, 4))
    counts = rng.poisson(3, 30)
    counts[0] = 40
    result = embedding_diagnostics(x, np.arange(30) % 3, k_occurrence=counts)
    assert result["hubness_skew"] == pytest.approx(float(skew(counts)))
    assert result["hubness_skew"] > 1
    assert result["max_k_occurrence"] == 40
    flat = embedding_diagnostics(x, np.arange(30) % 3, k_occurrence=np.full(30, 5))
    assert flat["hubness_skew"] == 0.0 and flat["max_k_occurrence"] == 5
    missing = embedding_diagnostics(x, np.arange(30) % 3)
    assert missing["hubness_skew"] is None and missing["max_k_occurrence"] is None


def test_result_is_json_ready_and_degenerate_cases_are_nan():
    x = np.eye(3)
    result = embedding_diagnostics(x, np.array([0, 1, 2]), k_occurrence=np.array([1, 2, 3]))
    text = json.dumps(result)  # must not need a custom encoder
    assert json.loads(text)["n"] == 3
    assert np.isnan(result["intra_class_cosine"])  # no two items share a label
    assert np.isnan(result["intra_inter_distance_ratio"])
    assert result["inter_class_cosine"] == 0.0
    one_class = embedding_diagnostics(x, np.zeros(3, dtype=int))
    assert np.isnan(one_class["inter_class_cosine"])
    for value in result.values():
        assert isinstance(value, (int, float, list, dict, type(None)))


def test_invalid_inputs():
    with pytest.raises(ValueError, match="2-D"):
        embedding_diagnostics(np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="labels"):
        embedding_diagnostics(np.zeros((3, 2)), np.zeros(2))
    with pytest.raises(ValueError, match="NaN"):
        embedding_diagnostics(np.full((3, 2), np.nan), np.zeros(3))


# ----------------------------------------------------------------------------- clustering


def blobs(seed, n_classes=5, per_class=200, dim=16, spread=0.05):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, dim)) * 3
    labels = np.repeat(np.arange(n_classes), per_class)
    return (centres[labels] + spread * rng.standard_normal((len(labels), dim))).astype(np.float32), labels


def test_well_separated_blobs_give_perfect_scores():
    x, labels = blobs(7)
    result = clustering_scores(x, np.array([f"c{v}" for v in labels]), seed=0)
    assert result["NMI"] == pytest.approx(1.0, abs=1e-9)
    assert result["ARI"] == pytest.approx(1.0, abs=1e-9)
    assert result["n_points"] == len(x) and result["n_clusters"] == 5


def test_random_labels_give_scores_near_zero():
    x, _ = blobs(8)
    labels = np.random.default_rng(0).integers(0, 5, len(x))
    result = clustering_scores(x, labels)
    assert result["NMI"] < 0.05 and abs(result["ARI"]) < 0.05


def test_subsample_is_stratified_and_seeded():
    x, labels = blobs(9, n_classes=4, per_class=250)
    labels[:1] = 99  # a one-row class must still be represented (its share rounds to 0)
    result = clustering_scores(x, labels, max_points=101, seed=3)
    assert result["n_points"] == 101
    rows = diagnostics._stratified_sample(*diagnostics._encode(labels, len(labels)), 101, 3)
    assert rows.size == 101 and np.unique(rows).size == 101
    kept = np.bincount(diagnostics._encode(labels, len(labels))[0][rows])
    np.testing.assert_array_equal(kept, [25, 25, 25, 25, 1])
    assert result == clustering_scores(x, labels, max_points=101, seed=3)


def test_fewer_than_two_classes_is_skipped():
    x, _ = blobs(10, n_classes=1)
    result = clustering_scores(x, np.zeros(len(x), dtype=int))
    assert np.isnan(result["NMI"]) and np.isnan(result["ARI"])
    assert "skipped" in result
