"""multimodal_contrastive (SiameseCLIP) against brute-force numpy: each term on its own, absent terms exactly 0.

The references loop over every (anchor, positive, negative) triplet in float64, from the seed's formula
-log(e^{s⁺/τ} / (e^{s⁺/τ} + e^{s⁻/τ})); a text is absent when its row is all zeros.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from models.losses import MultimodalContrastiveLoss, get_loss

RTOL, ATOL = 1e-4, 1e-6


def _cos(u, v):
    return float(u @ v) / (np.linalg.norm(u) * np.linalg.norm(v))


def _two_way(s_pos, s_neg, temperature):
    e_pos, e_neg = math.exp(s_pos / temperature), math.exp(s_neg / temperature)
    return -math.log(e_pos / (e_pos + e_neg))


def ref_triplet_term(anchors, anchor_labels, candidates, candidate_labels, temperature, same_set):
    """Mean over (a, p, n): p a candidate of a's label (≠ a when anchors and candidates are one set), n of another."""
    values = []
    for a, (x, y) in enumerate(zip(anchors, anchor_labels)):
        for p, (xp, yp) in enumerate(zip(candidates, candidate_labels)):
            if yp != y or (same_set and p == a):
                continue
            for xn, yn in zip(candidates, candidate_labels):
                if yn != y:
                    values.append(_two_way(_cos(x, xp), _cos(x, xn), temperature))
    return float(np.mean(values)) if values else 0.0


def ref_terms(x, y, r=None, ry=None, temperature=0.1):
    terms = {"image": ref_triplet_term(x, y, x, y, temperature, same_set=True),
             "text": 0.0, "image_to_text": 0.0, "text_to_image": 0.0}
    if r is None:
        return terms
    present = [i for i in range(len(r)) if np.any(r[i] != 0)]
    texts, text_labels = r[present], np.asarray(ry)[present]
    terms["text"] = ref_triplet_term(texts, text_labels, texts, text_labels, temperature, same_set=True)
    terms["image_to_text"] = ref_triplet_term(x, y, texts, text_labels, temperature, same_set=False)
    terms["text_to_image"] = ref_triplet_term(texts, text_labels, x, y, temperature, same_set=False)
    return terms


def ref_multimodal(x, y, temperature=0.1, alpha_text=0.3, alpha_cross=0.3):
    """In-batch (no texts): the image term alone."""
    return ref_terms(x, y, temperature=temperature)["image"]


def cross_multimodal(x, y, r, ry, temperature=0.1, alpha_text=0.3, alpha_cross=0.3):
    t = ref_terms(x, y, r, ry, temperature)
    return t["image"] + alpha_text * t["text"] + alpha_cross * (t["image_to_text"] + t["text_to_image"])


def batch(seed, n=12, dim=8, n_classes=4, missing=(2, 5, 9)):
    """Items with class structure, their texts near them (some missing: zero rows)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes), n // n_classes)
    centres = rng.normal(size=(n_classes, dim))
    x = centres[y] + 0.8 * rng.normal(size=(n, dim))
    r = centres[y] + 0.8 * rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    r /= np.linalg.norm(r, axis=1, keepdims=True)
    r[list(missing)] = 0.0
    return x.astype("float32"), y, r.astype("float32")


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_each_term_matches_its_reference(temperature):
    loss = MultimodalContrastiveLoss(temperature=temperature)
    for seed in range(3):
        x, y, r = batch(seed)
        got = {k: float(v) for k, v in loss.terms(tf.constant(x), tf.constant(y), tf.constant(r),
                                                   tf.constant(y)).items()}
        expected = ref_terms(x.astype("float64"), y, r.astype("float64"), y, temperature)
        for name in expected:
            np.testing.assert_allclose(got[name], expected[name], rtol=RTOL, atol=ATOL, err_msg=name)
        assert all(v > 0 for v in got.values())


def test_weights_combine_the_terms():
    x, y, r = batch(4)
    loss = MultimodalContrastiveLoss(temperature=0.2, alpha_text=0.7, alpha_cross=0.1)
    expected = cross_multimodal(x.astype("float64"), y, r.astype("float64"), y, 0.2, 0.7, 0.1)
    np.testing.assert_allclose(float(loss({"labels": y, "ref_labels": y}, {"embeddings": x, "ref_embeddings": r})),
                               expected, rtol=RTOL)
    # alpha 0: the image term alone, as without texts (= contrastive_softmax).
    only_image = MultimodalContrastiveLoss(alpha_text=0.0, alpha_cross=0.0)
    np.testing.assert_allclose(float(only_image.compute(x, y, r, y)), float(get_loss("contrastive_softmax")(y, x)),
                               rtol=1e-6)
    np.testing.assert_allclose(float(get_loss("multimodal_contrastive")(y, x)),
                               float(get_loss("contrastive_softmax")(y, x)), rtol=1e-6)


def test_absent_texts_contribute_exactly_zero_with_finite_gradients():
    loss = MultimodalContrastiveLoss()
    x, y, r = batch(1, missing=range(12))          # no text in the batch
    xv, rv = tf.Variable(x), tf.Variable(r)
    with tf.GradientTape() as tape:
        terms = loss.terms(xv, tf.constant(y), rv, tf.constant(y))
        total = loss.compute(xv, tf.constant(y), rv, tf.constant(y))
    grads = tape.gradient(total, [xv, rv])
    assert float(terms["text"]) == 0.0 and float(terms["image_to_text"]) == 0.0
    assert float(terms["text_to_image"]) == 0.0
    assert float(total) == float(terms["image"]) > 0
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    assert np.all(np.asarray(grads[1]) == 0.0)
    # Two texts of two classes: no text triplet (neither has a positive text), but cross terms exist.
    x, y, r = batch(2, missing=[i for i in range(12) if i not in (3, 6)])
    terms = {k: float(v) for k, v in loss.terms(x, y, r, y).items()}
    assert terms["text"] == 0.0 and terms["image_to_text"] > 0 and terms["text_to_image"] > 0
    expected = ref_terms(x.astype("float64"), y, r.astype("float64"), y)
    for name in expected:
        np.testing.assert_allclose(terms[name], expected[name], rtol=RTOL, atol=ATOL)


def test_a_missing_text_changes_nothing_but_its_own_triplets():
    # An absent row must not act as a negative at cosine 0 (it would lower the loss of everything).
    x, y, r = batch(3, missing=())
    loss = MultimodalContrastiveLoss()
    dropped = r.copy()
    dropped[7] = 0.0
    keep = np.arange(12) != 7
    np.testing.assert_allclose(float(loss.compute(x, y, dropped, y)), float(loss.compute(x, y, r[keep], y[keep])),
                               rtol=1e-6)


def test_config_round_trip_and_bad_parameters():
    import keras

    loss = get_loss("multimodal_contrastive", temperature=0.07, alpha_text=0.5, alpha_cross=0.2)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert type(restored) is MultimodalContrastiveLoss and restored.get_config() == loss.get_config()
    assert loss.uses_text_references and not get_loss("supcon").uses_text_references
    with pytest.raises(ValueError, match="alpha_text"):
        MultimodalContrastiveLoss(alpha_text=-1)
    with pytest.raises(ValueError, match="temperature"):
        MultimodalContrastiveLoss(temperature=0)
