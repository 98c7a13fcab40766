"""Every loss gives the same value under XLA (jit_compile=True, the training default) as eagerly."""
import numpy as np
import pytest
import tensorflow as tf

from models.classifier import CosineClassifier
from models.losses import get_loss

CASES = [
    ("triplet", {"mining": "semi_hard"}), ("triplet", {"mining": "batch_hard"}),
    ("triplet", {"mining": "batch_all", "distance": "cosine"}), ("contrastive", {}),
    ("contrastive_softmax", {}), ("multisimilarity", {}), ("supcon", {}), ("infonce", {}), ("arcface", {}),
]


@pytest.mark.parametrize("name,params", CASES, ids=[f"{n}-{'-'.join(map(str, p.values()))}" for n, p in CASES])
def test_xla_matches_eager(name, params):
    rng = np.random.default_rng(0)
    labels = tf.constant(np.repeat(np.arange(4), 4).astype("int32"))
    x = rng.standard_normal((16, 8)).astype("float32")
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    loss = get_loss(name, **params)
    if loss.requires_classifier:
        classifier = CosineClassifier(4)
        x = classifier(tf.constant(x))
    x = tf.constant(x)
    eager = float(loss(labels, x))
    compiled = float(tf.function(lambda y, p: loss(y, p), jit_compile=True)(labels, x))
    assert np.isfinite(eager)
    np.testing.assert_allclose(compiled, eager, rtol=1e-4, atol=1e-6)
