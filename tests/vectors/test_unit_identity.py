"""pipeline.vectors.unit_identity: the euclidean result of unit vectors read off the cosine one equals a real
euclidean pass, and the sampled check catches vectors that are not unit length."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.vectors.retrieval import retrieve
from pipeline.vectors.unit_identity import IDENTITY_TOLERANCE, check_unit_identity, euclidean_from_cosine
from tests.vectors.test_retrieval import NAMES, unit_clusters


def test_euclidean_read_off_cosine_equals_a_real_euclidean_pass():
    x, labels = unit_clusters()
    exclude = np.arange(len(x))
    cosine = retrieve(x, labels, x, labels, metric="cosine", k=7, exclude=exclude)
    real = retrieve(x, labels, x, labels, metric="euclidean", k=7, exclude=exclude)
    derived = euclidean_from_cosine(cosine)
    np.testing.assert_array_equal(derived.neighbours, real.neighbours)
    np.testing.assert_allclose(derived.neighbour_scores, real.neighbour_scores, atol=1e-5)
    assert derived.metrics == real.metrics == cosine.metrics
    for name in NAMES:
        np.testing.assert_array_equal(derived.per_query[name], real.per_query[name])
    np.testing.assert_array_equal(derived.k_occurrence, real.k_occurrence)
    # A copy: changing the derived result leaves the cosine one alone.
    derived.neighbours[:] = -1
    assert (cosine.neighbours >= 0).all()


def test_euclidean_read_off_cosine_keeps_padding():
    x = np.eye(2, dtype=np.float32)
    derived = euclidean_from_cosine(retrieve(x, [0, 1], x, [0, 1], k=3))
    assert np.isnan(derived.neighbour_scores[:, 2]).all() and (derived.neighbours[:, 2] == -1).all()
    np.testing.assert_allclose(derived.neighbour_scores[:, :2], [[0, np.sqrt(2)], [0, np.sqrt(2)]], atol=1e-6)


def test_identity_check_holds_on_unit_vectors_on_a_seeded_sample():
    x, labels = unit_clusters()
    exclude = np.arange(len(x))
    cosine = retrieve(x, labels, x, labels, k=5, exclude=exclude)
    check = check_unit_identity(x, labels, x, labels, cosine, k=5, exclude=exclude, sample_size=40, seed=3)
    assert check.holds and check.n_sampled == 40 and check.n_identical == check.n_consistent == 40
    assert check.max_sq_distance_error <= IDENTITY_TOLERANCE
    again = check_unit_identity(x, labels, x, labels, cosine, k=5, exclude=exclude, sample_size=40, seed=3)
    other = check_unit_identity(x, labels, x, labels, cosine, k=5, exclude=exclude, sample_size=40, seed=4)
    np.testing.assert_array_equal(check.sample, again.sample)
    assert not np.array_equal(check.sample, other.sample)
    assert check.as_dict() == {"n_sampled": 40, "n_identical": 40, "n_consistent": 40,
                               "max_sq_distance_error": check.max_sq_distance_error,
                               "tolerance": IDENTITY_TOLERANCE, "holds": True}
    everyone = check_unit_identity(x, labels, x, labels, cosine, k=5, exclude=exclude, sample_size=10_000)
    assert everyone.n_sampled == len(x)


def test_identity_check_reports_vectors_that_are_not_unit_length():
    """Norms that vary break ||a-b||^2 = 2 - 2cos: the check must say so, not pass silently."""
    x, labels = unit_clusters()
    rng = np.random.default_rng(1)
    not_unit = x * rng.uniform(0.5, 2.0, size=(len(x), 1)).astype(np.float32)
    cosine = retrieve(not_unit, labels, not_unit, labels, k=5)   # cosine renormalises: same as on x
    check = check_unit_identity(not_unit, labels, not_unit, labels, cosine, k=5, sample_size=50)
    assert not check.holds
    assert check.n_consistent < check.n_sampled and check.n_identical < check.n_sampled
    assert check.max_sq_distance_error > 100 * IDENTITY_TOLERANCE
    assert check.as_dict()["holds"] is False


def test_identity_check_catches_vectors_a_thousandth_off_unit_length():
    x, labels = unit_clusters()
    rng = np.random.default_rng(2)
    nearly = x * rng.uniform(0.999, 1.001, size=(len(x), 1)).astype(np.float32)
    cosine = retrieve(nearly, labels, nearly, labels, k=5)
    check = check_unit_identity(nearly, labels, nearly, labels, cosine, k=5, sample_size=50)
    assert not check.holds and check.max_sq_distance_error > IDENTITY_TOLERANCE


def test_identity_check_rejects_a_bad_sample_size():
    x, labels = unit_clusters(n=10)
    cosine = retrieve(x, labels, x, labels)
    with pytest.raises(ValueError, match="sample_size"):
        check_unit_identity(x, labels, x, labels, cosine, sample_size=0)
