"""Ensembles on arrays (pipeline/vectors/ensemble.py) against a plain numpy computation, and its Keras twin
(models/ensemble.py) against the arrays."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.vectors.ensemble import EnsembleError, check_members, combine_embeddings


def _members(seed: int = 0, dims=(5, 7), n: int = 13):
    rng = np.random.default_rng(seed)
    # Members of very different scales: normalising each first keeps either from dominating.
    return [rng.normal(size=(n, d)).astype(np.float32) * scale for d, scale in zip(dims, (1e-3, 50.0))]


def _reference(members, combine, weights):
    units = [m.astype(np.float64) / np.linalg.norm(m.astype(np.float64), axis=1, keepdims=True) for m in members]
    parts = [w * u for w, u in zip(weights, units)]
    raw = np.hstack(parts) if combine == "concat" else sum(parts) / sum(weights)
    return raw, raw / np.linalg.norm(raw, axis=1, keepdims=True)


@pytest.mark.parametrize("combine,dims,weights", [("concat", (5, 7), None), ("concat", (5, 7), [1.0, 3.0]),
                                                   ("mean", (6, 6), None), ("mean", (6, 6), [0.5, 2.0])])
def test_combination_matches_numpy(combine, dims, weights):
    members = _members(dims=dims)
    raw, unit = combine_embeddings(members, combine, weights, chunk=4)   # several chunks
    want_raw, want_unit = _reference(members, combine, weights or [1.0, 1.0])
    np.testing.assert_allclose(raw, want_raw, atol=1e-6)
    np.testing.assert_allclose(unit, want_unit, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-6)


def test_concat_cosine_is_the_squared_weight_mean_of_member_cosines():
    members = _members(seed=1)
    weights = [1.0, 2.0]
    _, unit = combine_embeddings(members, "concat", weights)
    units = [m / np.linalg.norm(m, axis=1, keepdims=True) for m in members]
    want = sum(w * w * (u @ u.T) for w, u in zip(weights, units)) / sum(w * w for w in weights)
    np.testing.assert_allclose(unit @ unit.T, want, atol=1e-5)


def test_impossible_combinations_say_why():
    with pytest.raises(EnsembleError, match=r"needs members of one dimension \(a is 5-d, b is 7-d\): use combine"):
        check_members([5, 7], "mean", names=["a", "b"])
    with pytest.raises(EnsembleError, match="at least two members"):
        check_members([5], "concat")
    with pytest.raises(EnsembleError, match="2 weights for 3 members"):
        check_members([5, 5, 5], "concat", [1, 2])
    with pytest.raises(EnsembleError, match="positive finite"):
        check_members([5, 5], "concat", [1, 0])
    with pytest.raises(EnsembleError, match="one length"):
        combine_embeddings([np.ones((3, 2)), np.ones((4, 2))])
    assert check_members([4, 4], "mean") == [1.0, 1.0]


@pytest.mark.parametrize("combine,weights", [("concat", [1.0, 2.5]), ("mean", None)])
def test_keras_ensemble_model_equals_the_arrays(combine, weights):
    """Two tiny image models at two sizes joined in one graph give combine_embeddings of their outputs."""
    import keras

    from models.ensemble import EnsembleCombine, build_ensemble_model

    def member(size: int, seed: int):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((size, size, 3))
        x = keras.layers.Conv2D(4, 3, strides=2)(inputs / 255.0)
        x = keras.layers.GlobalAveragePooling2D()(x)
        return keras.Model(inputs, keras.layers.Dense(6)(x), name="embedding_model")   # one name for both

    small, large = member(16, 1), member(24, 2)
    model = build_ensemble_model([large, small], combine, weights)
    assert [int(t.shape[1]) for t in model.inputs] == [16, 24]
    rng = np.random.default_rng(0)
    pix16, pix24 = (rng.uniform(0, 255, (5, s, s, 3)).astype(np.float32) for s in (16, 24))
    got = np.asarray(model([pix16, pix24]))
    _, want = combine_embeddings([np.asarray(large(pix24)), np.asarray(small(pix16))], combine, weights)
    np.testing.assert_allclose(got, want, atol=1e-5)
    layer = EnsembleCombine.from_config(model.get_layer("combine").get_config())
    assert layer.combine == combine and layer.member_weights == weights
