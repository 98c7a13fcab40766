"""Every registered loss gives the same value under XLA (jit_compile=True, the training default) as eagerly,
in-batch and, for the losses that accept references, query vs reference."""
import numpy as np
import pytest
import tensorflow as tf

from models.classifier import CosineClassifier
from models.losses import LOSSES, TRIPLET_MININGS, get_loss

# Every registered loss at its defaults, plus the triplet minings and a cosine distance.
CASES = ([(name, {}) for name in sorted(LOSSES)]
         + [("triplet", {"mining": mining}) for mining in TRIPLET_MININGS]
         + [("triplet", {"mining": "batch_all", "distance": "cosine"})])
IDS = [f"{n}-{'-'.join(map(str, p.values()))}" for n, p in CASES]
REFERENCE_CASES = [(name, params) for name, params in CASES if LOSSES[name].accepts_reference]


def unit_rows(rng, n):
    x = rng.standard_normal((n, 8)).astype("float32")
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def assert_xla_matches_eager(loss, y_true, y_pred):
    eager = float(loss(y_true, y_pred))
    compiled = float(tf.function(lambda y, p: loss(y, p), jit_compile=True)(y_true, y_pred))
    assert np.isfinite(eager)
    np.testing.assert_allclose(compiled, eager, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_xla_matches_eager(name, params):
    rng = np.random.default_rng(0)
    labels = tf.constant(np.repeat(np.arange(4), 4).astype("int32"))
    x = unit_rows(rng, 16)
    loss = get_loss(name, **params)
    if loss.requires_classifier:
        classifier = CosineClassifier(4)
        x = classifier(tf.constant(x))
    assert_xla_matches_eager(loss, labels, tf.constant(x))


@pytest.mark.parametrize("name,params", REFERENCE_CASES, ids=[f"{n}-{'-'.join(map(str, p.values()))}"
                                                              for n, p in REFERENCE_CASES])
def test_xla_matches_eager_query_vs_reference(name, params):
    rng = np.random.default_rng(1)
    y_true = {"labels": tf.constant(np.repeat(np.arange(4), 3).astype("float32")),
              "ref_labels": tf.constant(np.repeat(np.arange(5), 2).astype("float32"))}
    y_pred = {"embeddings": tf.constant(unit_rows(rng, 12)), "ref_embeddings": tf.constant(unit_rows(rng, 10))}
    assert_xla_matches_eager(get_loss(name, **params), y_true, y_pred)
