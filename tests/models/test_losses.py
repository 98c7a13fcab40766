"""Metric-learning losses and the cosine classifier against brute-force numpy references.

The references below loop explicitly over every pair / triplet in float64 and are
written from the papers' definitions, not from the vectorised implementation, so a
masking or reduction slip in models/losses.py shows up as a value mismatch.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import keras
import tensorflow as tf

from models.classifier import CosineClassifier
from models.layers import L2Normalize
from models.losses import LOSSES, ArcFaceLoss, TripletLoss, get_loss, triplet_accuracy
from tests.models.test_losses_multimodal import cross_multimodal, ref_multimodal

RTOL = 1e-4
ATOL = 1e-6


# --------------------------------------------------------------------------- references

def ref_distance(x, i, j, kind):
    if kind == "cosine":
        return 1.0 - float(x[i] @ x[j]) / (np.linalg.norm(x[i]) * np.linalg.norm(x[j]))
    squared = float(np.sum((x[i] - x[j]) ** 2))
    return squared if kind == "squared_euclidean" else math.sqrt(squared)


def ref_cosine(x, i, j):
    return float(x[i] @ x[j]) / (np.linalg.norm(x[i]) * np.linalg.norm(x[j]))


def ref_triplet(x, y, margin=0.2, mining="semi_hard", distance="euclidean"):
    n = len(y)
    d = [[ref_distance(x, i, j, distance) for j in range(n)] for i in range(n)]
    values = []
    if mining == "batch_all":
        for a in range(n):
            for p in range(n):
                for q in range(n):
                    if a != p and y[a] == y[p] and y[q] != y[a]:
                        loss = max(d[a][p] - d[a][q] + margin, 0.0)
                        if loss > 0:
                            values.append(loss)
    elif mining == "batch_hard":
        for a in range(n):
            pos = [d[a][p] for p in range(n) if p != a and y[p] == y[a]]
            neg = [d[a][q] for q in range(n) if y[q] != y[a]]
            if pos and neg:
                values.append(max(max(pos) - min(neg) + margin, 0.0))
    else:
        for a in range(n):
            for p in range(n):
                if p == a or y[p] != y[a]:
                    continue
                neg = [d[a][q] for q in range(n) if y[q] != y[a]]
                if not neg:
                    continue
                farther = [v for v in neg if v > d[a][p]]
                chosen = min(farther) if farther else max(neg)
                values.append(max(d[a][p] - chosen + margin, 0.0))
    return float(np.mean(values)) if values else 0.0


def ref_contrastive(x, y, positive_margin=0.6, negative_margin=1.4, distance="euclidean"):
    n = len(y)
    values = []
    for i in range(n):
        for j in range(i + 1, n):
            dist = ref_distance(x, i, j, distance)
            if y[i] == y[j]:
                values.append(max(dist - positive_margin, 0.0) ** 2)
            else:
                values.append(max(negative_margin - dist, 0.0) ** 2)
    return float(np.mean(values)) if values else 0.0


def ref_contrastive_softmax(x, y, temperature=0.1):
    n = len(y)
    values = []
    for a in range(n):
        for p in range(n):
            for q in range(n):
                if a != p and y[a] == y[p] and y[q] != y[a]:
                    e_pos = math.exp(ref_cosine(x, a, p) / temperature)
                    e_neg = math.exp(ref_cosine(x, a, q) / temperature)
                    values.append(-math.log(e_pos / (e_pos + e_neg)))
    return float(np.mean(values)) if values else 0.0


def ref_multisimilarity(x, y, alpha=2.0, beta=50.0, base=0.5, epsilon=0.1):
    n = len(y)
    total = 0.0
    for i in range(n):
        pos = [ref_cosine(x, i, k) for k in range(n) if k != i and y[k] == y[i]]
        neg = [ref_cosine(x, i, k) for k in range(n) if y[k] != y[i]]
        if not pos or not neg:
            continue
        kept_neg = [s for s in neg if s + epsilon > min(pos)]
        kept_pos = [s for s in pos if s - epsilon < max(neg)]
        if not kept_neg or not kept_pos:
            continue
        total += math.log(1 + sum(math.exp(-alpha * (s - base)) for s in kept_pos)) / alpha
        total += math.log(1 + sum(math.exp(beta * (s - base)) for s in kept_neg)) / beta
    return total / n


def _log_prob(x, a, k, temperature):
    denominator = sum(math.exp(ref_cosine(x, a, j) / temperature) for j in range(len(x)) if j != a)
    return ref_cosine(x, a, k) / temperature - math.log(denominator)


def ref_supcon(x, y, temperature=0.07):
    n = len(y)
    per_anchor = []
    for a in range(n):
        positives = [p for p in range(n) if p != a and y[p] == y[a]]
        if positives:
            per_anchor.append(-sum(_log_prob(x, a, p, temperature) for p in positives) / len(positives))
    return float(np.mean(per_anchor)) if per_anchor else 0.0


def ref_infonce(x, y, temperature=0.1):
    n = len(y)
    values = [-_log_prob(x, a, p, temperature) for a in range(n) for p in range(n) if p != a and y[p] == y[a]]
    return float(np.mean(values)) if values else 0.0


def ref_arcface(cos, y, scale=30.0, margin=0.5, easy_margin=False):
    total = 0.0
    for i in range(len(y)):
        logits = []
        for c in range(cos.shape[1]):
            value = float(np.clip(cos[i, c], -1.0, 1.0))
            if c == y[i]:
                theta = math.acos(value)
                if easy_margin:
                    value = math.cos(theta + margin) if value > 0 else value
                elif theta + margin <= math.pi:
                    value = math.cos(theta + margin)
                else:
                    value = value - margin * math.sin(margin)
            logits.append(scale * value)
        top = max(logits)
        total += top + math.log(sum(math.exp(v - top) for v in logits)) - logits[y[i]]
    return total / len(y)


def ref_cosine_classifier(x, centers, n_classes, sub_centers):
    out = np.zeros((len(x), n_classes))
    for i in range(len(x)):
        for c in range(n_classes):
            best = -np.inf
            for k in range(sub_centers):
                w = centers[:, c * sub_centers + k]
                best = max(best, float(x[i] @ w) / (np.linalg.norm(x[i]) * np.linalg.norm(w)))
            out[i, c] = best
    return out


def ref_triplet_accuracy(x, y):
    n = len(y)
    correct = total = 0
    for a in range(n):
        for p in range(n):
            for q in range(n):
                if a != p and y[a] == y[p] and y[q] != y[a]:
                    total += 1
                    correct += ref_distance(x, a, p, "euclidean") < ref_distance(x, a, q, "euclidean")
    return correct / total if total else 0.0


# Query x reference: every (query i, reference j) pair counts, none is a sample with itself.

def cross_distance(q, r, i, j, kind):
    if kind == "cosine":
        return 1.0 - cross_cosine(q, r, i, j)
    squared = float(np.sum((q[i] - r[j]) ** 2))
    return squared if kind == "squared_euclidean" else math.sqrt(squared)


def cross_cosine(q, r, i, j):
    return float(q[i] @ r[j]) / (np.linalg.norm(q[i]) * np.linalg.norm(r[j]))


def cross_triplet(q, y, r, yr, margin=0.2, mining="semi_hard", distance="euclidean"):
    d = [[cross_distance(q, r, a, j, distance) for j in range(len(yr))] for a in range(len(y))]
    values = []
    for a in range(len(y)):
        pos = [d[a][p] for p in range(len(yr)) if yr[p] == y[a]]
        neg = [d[a][k] for k in range(len(yr)) if yr[k] != y[a]]
        if mining == "batch_all":
            values += [v for v in (max(dp - dn + margin, 0.0) for dp in pos for dn in neg) if v > 0]
        elif mining == "batch_hard":
            if pos and neg:
                values.append(max(max(pos) - min(neg) + margin, 0.0))
        elif neg:
            for dp in pos:
                farther = [dn for dn in neg if dn > dp]
                values.append(max(dp - (min(farther) if farther else max(neg)) + margin, 0.0))
    return float(np.mean(values)) if values else 0.0


def cross_contrastive(q, y, r, yr, positive_margin=0.6, negative_margin=1.4, distance="euclidean"):
    values = []
    for i in range(len(y)):
        for j in range(len(yr)):
            dist = cross_distance(q, r, i, j, distance)
            margin_gap = dist - positive_margin if y[i] == yr[j] else negative_margin - dist
            values.append(max(margin_gap, 0.0) ** 2)
    return float(np.mean(values)) if values else 0.0


def cross_contrastive_softmax(q, y, r, yr, temperature=0.1):
    values = []
    for a in range(len(y)):
        for p in range(len(yr)):
            for k in range(len(yr)):
                if yr[p] == y[a] and yr[k] != y[a]:
                    e_pos = math.exp(cross_cosine(q, r, a, p) / temperature)
                    e_neg = math.exp(cross_cosine(q, r, a, k) / temperature)
                    values.append(-math.log(e_pos / (e_pos + e_neg)))
    return float(np.mean(values)) if values else 0.0


def cross_multisimilarity(q, y, r, yr, alpha=2.0, beta=50.0, base=0.5, epsilon=0.1):
    total = 0.0
    for i in range(len(y)):
        pos = [cross_cosine(q, r, i, k) for k in range(len(yr)) if yr[k] == y[i]]
        neg = [cross_cosine(q, r, i, k) for k in range(len(yr)) if yr[k] != y[i]]
        if not pos or not neg:
            continue
        kept_neg = [s for s in neg if s + epsilon > min(pos)]
        kept_pos = [s for s in pos if s - epsilon < max(neg)]
        if not kept_neg or not kept_pos:
            continue
        total += math.log(1 + sum(math.exp(-alpha * (s - base)) for s in kept_pos)) / alpha
        total += math.log(1 + sum(math.exp(beta * (s - base)) for s in kept_neg)) / beta
    return total / len(y)


def _cross_log_prob(q, r, a, k, temperature):
    denominator = sum(math.exp(cross_cosine(q, r, a, j) / temperature) for j in range(len(r)))
    return cross_cosine(q, r, a, k) / temperature - math.log(denominator)


def cross_supcon(q, y, r, yr, temperature=0.07):
    per_anchor = []
    for a in range(len(y)):
        positives = [p for p in range(len(yr)) if yr[p] == y[a]]
        if positives:
            per_anchor.append(-sum(_cross_log_prob(q, r, a, p, temperature) for p in positives) / len(positives))
    return float(np.mean(per_anchor)) if per_anchor else 0.0


def cross_infonce(q, y, r, yr, temperature=0.1):
    values = [-_cross_log_prob(q, r, a, p, temperature) for a in range(len(y)) for p in range(len(yr))
              if yr[p] == y[a]]
    return float(np.mean(values)) if values else 0.0


def cross_triplet_accuracy(q, y, r, yr):
    correct = total = 0
    for a in range(len(y)):
        for p in range(len(yr)):
            for k in range(len(yr)):
                if yr[p] == y[a] and yr[k] != y[a]:
                    total += 1
                    correct += cross_distance(q, r, a, p, "euclidean") < cross_distance(q, r, a, k, "euclidean")
    return correct / total if total else 0.0


CROSS_REFERENCES = {
    "triplet": cross_triplet,
    "contrastive": cross_contrastive,
    "contrastive_softmax": cross_contrastive_softmax,
    "multisimilarity": cross_multisimilarity,
    "supcon": cross_supcon,
    "infonce": cross_infonce,
    "multimodal_contrastive": cross_multimodal,
}

REFERENCES = {
    "triplet": ref_triplet,
    "contrastive": ref_contrastive,
    "contrastive_softmax": ref_contrastive_softmax,
    "multisimilarity": ref_multisimilarity,
    "supcon": ref_supcon,
    "infonce": ref_infonce,
    "multimodal_contrastive": ref_multimodal,
}
# Every registered loss must have one (test_every_registered_loss_has_references).
ALL_REFERENCES = {**REFERENCES, "arcface": ref_arcface}

EMBEDDING_CONFIGS = (
    [("triplet", {"mining": m, "distance": d}) for m in ("batch_all", "batch_hard", "semi_hard")
     for d in ("euclidean", "squared_euclidean", "cosine")]
    + [("triplet", {"mining": "semi_hard", "margin": 0.5})]
    + [("contrastive", {"distance": d}) for d in ("euclidean", "squared_euclidean", "cosine")]
    + [("contrastive", {"positive_margin": 0.3, "negative_margin": 1.2})]
    + [("contrastive", {"positive_margin": 0.0, "negative_margin": 0.5})]
    + [("contrastive_softmax", {}), ("contrastive_softmax", {"temperature": 0.5})]
    + [("multisimilarity", {}), ("multisimilarity", {"alpha": 1.0, "beta": 20.0, "base": 0.3, "epsilon": 0.3})]
    + [("supcon", {}), ("supcon", {"temperature": 0.3})]
    + [("infonce", {}), ("infonce", {"temperature": 0.3})]
)
CONFIG_IDS = [name + "".join(f"-{k}={v}" for k, v in params.items()) for name, params in EMBEDDING_CONFIGS]

# Losses that have nothing to average without a positive pair / without a negative.
NEEDS_POSITIVE = {"triplet", "contrastive_softmax", "multisimilarity", "supcon", "infonce", "multimodal_contrastive"}
NEEDS_NEGATIVE = {"triplet", "contrastive_softmax", "multisimilarity", "multimodal_contrastive"}


def clustered_batch(seed, n=12, dim=8, n_classes=4, normalise=True):
    """Labelled embeddings with class structure, so mining meets both easy and hard cases."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    centres = rng.normal(size=(n_classes, dim))
    x = centres[y] + 0.9 * rng.normal(size=(n, dim))
    if normalise:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    else:
        x *= rng.uniform(0.3, 2.0, (n, 1))
    return x.astype("float32"), y


def edge_batches():
    rng = np.random.default_rng(7)
    unit = rng.normal(size=(6, 8))
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    duplicates = unit.copy()
    duplicates[1] = duplicates[0]     # same label: a positive at distance 0
    duplicates[3] = duplicates[2]     # different labels: a negative at distance 0
    return {
        "no_positive": (unit, np.arange(6)),
        "one_class": (unit, np.zeros(6, int)),
        "duplicates": (duplicates, np.array([0, 0, 1, 2, 1, 2])),
        "batch_of_one": (unit[:1], np.array([3])),
    }


def loss_and_grad(loss, y, x):
    x = tf.Variable(np.asarray(x, "float32"))
    with tf.GradientTape() as tape:
        value = loss(tf.constant(y, "float32"), x)
    return value, tape.gradient(value, x)


# --------------------------------------------------------------------------- values

@pytest.mark.parametrize("name,params", EMBEDDING_CONFIGS, ids=CONFIG_IDS)
def test_loss_matches_brute_force_reference(name, params):
    loss = get_loss(name, **params)
    for seed in range(3):
        for normalise in (True, False):
            x, y = clustered_batch(seed, n_classes=3 + seed % 2, normalise=normalise)
            expected = REFERENCES[name](x.astype("float64"), y, **params)
            got = float(loss(y, x))
            np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL, err_msg=f"seed {seed}")
    # (B, 1) labels, as Keras datasets often yield them, mean the same thing.
    np.testing.assert_allclose(float(loss(y[:, None], x)), float(loss(y, x)), rtol=1e-6)


@pytest.mark.parametrize("mining,expected", [("batch_all", 0.5), ("batch_hard", 0.6), ("semi_hard", 0.275)])
def test_triplet_mining_on_a_hand_worked_line(mining, expected):
    # Points on a line. batch_all: 7 of 8 triplets are active, summing to 3.5 (0.4375
    # if the easy one were averaged in). semi_hard: anchors 0 and 1 have no negative
    # beyond their positive and fall back to the farthest negative.
    x = np.array([[0.0], [1.0], [0.5], [0.9]], "float32")
    y = np.array([0, 0, 1, 1])
    loss = TripletLoss(margin=0.2, mining=mining)
    np.testing.assert_allclose(float(loss(y, x)), expected, rtol=1e-5)
    np.testing.assert_allclose(ref_triplet(x.astype("float64"), y, 0.2, mining), expected, rtol=1e-6)


@pytest.mark.parametrize("easy_margin", [False, True])
@pytest.mark.parametrize("margin", [0.5, 0.2])
def test_arcface_matches_reference(margin, easy_margin):
    rng = np.random.default_rng(3)
    loss = ArcFaceLoss(scale=30.0, margin=margin, easy_margin=easy_margin)
    for _ in range(3):
        cos = rng.uniform(-1, 1, (12, 5)).astype("float32")
        y = rng.integers(0, 5, 12)
        np.testing.assert_allclose(float(loss(y, cos)), ref_arcface(cos.astype("float64"), y, 30.0, margin,
                                                                    easy_margin), rtol=RTOL)


def test_arcface_target_angles_near_pi_use_the_fallback():
    y = np.array([0, 1, 2, 0, 1])
    cos = np.full((5, 3), 0.1, "float32")
    target = np.array([-0.999, -0.95, -0.9, -0.5, 0.9], "float32")
    cos[np.arange(5), y] = target
    # θ + m > π for the first three targets, < π for the last two: both branches run.
    assert [math.acos(t) + 0.5 > math.pi for t in target] == [True, True, True, False, False]
    loss = ArcFaceLoss(margin=0.5)
    np.testing.assert_allclose(float(loss(y, cos)), ref_arcface(cos.astype("float64"), y, 30.0, 0.5), rtol=RTOL)
    # Without the fallback, cos(θ + m) for θ + m just past π would rise back above -1.
    past_pi = np.full((1, 2), 0.0, "float32")
    past_pi[0, 0] = -0.999
    mm = math.sin(0.5) * 0.5
    expected = math.log(math.exp(30 * (-0.999 - mm)) + 1.0) - 30 * (-0.999 - mm)
    np.testing.assert_allclose(float(loss(np.array([0]), past_pi)), expected, rtol=RTOL)


def test_arcface_with_sub_center_cosine_classifier():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(12, 8)).astype("float32") * 3.0
    y = rng.integers(0, 4, 12)
    for sub_centers in (1, 3):
        layer = CosineClassifier(4, sub_centers=sub_centers)
        cos = np.asarray(layer(x))
        assert cos.shape == (12, 4) and cos.dtype == np.float32
        centers = np.asarray(layer.centers)
        assert centers.shape == (8, 4 * sub_centers)
        np.testing.assert_allclose(cos, ref_cosine_classifier(x.astype("float64"), centers.astype("float64"), 4,
                                                              sub_centers), rtol=1e-5, atol=1e-6)
        loss = ArcFaceLoss()
        np.testing.assert_allclose(float(loss(y, cos)), ref_arcface(cos.astype("float64"), y), rtol=RTOL)
        inputs = tf.Variable(x)
        with tf.GradientTape() as tape:
            value = loss(tf.constant(y, "float32"), layer(inputs))
        grads = tape.gradient(value, [inputs, layer.centers])
        assert all(g is not None and np.isfinite(np.asarray(g)).all() for g in grads)
        assert np.abs(np.asarray(grads[1])).sum() > 0


def test_cosine_classifier_config_round_trip_and_float32_under_mixed_precision():
    layer = CosineClassifier(7, sub_centers=3, name="head")
    restored = CosineClassifier.from_config(layer.get_config())
    assert (restored.n_classes, restored.sub_centers, restored.name) == (7, 3, "head")
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(again, CosineClassifier) and again.get_config() == layer.get_config()
    with pytest.raises(ValueError):
        CosineClassifier(0)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8), CosineClassifier(3)])
        out = model(np.ones((2, 8), "float32"))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert out.dtype == "float32" and out.shape == (2, 3)


def test_triplet_accuracy_matches_reference():
    for seed in range(3):
        x, y = clustered_batch(seed, normalise=seed % 2 == 0)
        np.testing.assert_allclose(float(triplet_accuracy(y, x)), ref_triplet_accuracy(x.astype("float64"), y),
                                   rtol=1e-6)
    assert float(triplet_accuracy(np.arange(4), np.eye(4, dtype="float32"))) == 0.0
    fn = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(triplet_accuracy))
    assert fn is triplet_accuracy


# --------------------------------------------------------------------------- query vs reference

def query_and_reference(seed, n=10, m=8, dim=8, n_classes=4, normalise=True):
    """Queries and references drawn around the same class centres (two towers that roughly agree)."""
    rng = np.random.default_rng(100 + seed)
    centres = rng.normal(size=(n_classes, dim))

    def draw(count):
        y = rng.integers(0, n_classes, count)
        x = centres[y] + 0.9 * rng.normal(size=(count, dim))
        if normalise:
            x /= np.linalg.norm(x, axis=1, keepdims=True)
        else:
            x *= rng.uniform(0.3, 2.0, (count, 1))
        return x.astype("float32"), y

    return (*draw(n), *draw(m))


def as_dicts(y, x, ref_y=None, ref_x=None):
    """Keras's (y_true, y_pred) for a two-tower model."""
    y_true = {"labels": y} if ref_y is None else {"labels": y, "ref_labels": ref_y}
    y_pred = {"embeddings": x} if ref_x is None else {"embeddings": x, "ref_embeddings": ref_x}
    return y_true, y_pred


@pytest.mark.parametrize("name,params", EMBEDDING_CONFIGS, ids=CONFIG_IDS)
def test_query_vs_reference_matches_brute_force_reference(name, params):
    loss = get_loss(name, **params)
    for seed in range(3):
        for normalise in (True, False):
            q, y, r, ry = query_and_reference(seed, n_classes=3 + seed % 2, normalise=normalise)
            expected = CROSS_REFERENCES[name](q.astype("float64"), y, r.astype("float64"), ry, **params)
            got = float(loss.compute(tf.constant(q), tf.constant(y), tf.constant(r), tf.constant(ry)))
            np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL, err_msg=f"seed {seed}")
            via_keras = float(loss(*as_dicts(y, q, ry, r)))
            np.testing.assert_allclose(via_keras, expected, rtol=RTOL, atol=ATOL, err_msg=f"seed {seed}")
    # Without ref_labels the references are paired row by row with the queries.
    q, y, r, _ = query_and_reference(5, m=10)
    expected = CROSS_REFERENCES[name](q.astype("float64"), y, r.astype("float64"), y, **params)
    np.testing.assert_allclose(float(loss(y, {"embeddings": q, "ref_embeddings": r})), expected, rtol=RTOL,
                               atol=ATOL)


def scored_input(loss, x, n_classes=4):
    """What `loss` scores for embeddings x: x itself, or cosine logits when it requires a classifier."""
    if loss.requires_classifier:
        keras.utils.set_random_seed(0)
        return np.asarray(CosineClassifier(n_classes)(x))
    return x


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_registered_loss_has_references_and_matches_them(name):
    # A loss joins the registry only with a brute-force reference, and one for the
    # query-vs-reference path when it accepts references.
    assert name in ALL_REFERENCES, f"write a numpy reference for {name!r}"
    loss = get_loss(name)
    x, y = clustered_batch(4, n_classes=4)
    scored = scored_input(loss, x)
    np.testing.assert_allclose(float(loss(y, scored)), ALL_REFERENCES[name](scored.astype("float64"), y),
                               rtol=RTOL, atol=ATOL)
    # The dict form without references is the tensor form.
    assert float(loss(*as_dicts(y, scored))) == float(loss(y, scored))
    with pytest.raises(ValueError, match="ref_labels given without ref_embeddings"):
        loss({"labels": y, "ref_labels": y}, {"embeddings": scored})
    q, qy, r, ry = query_and_reference(4)
    if not LOSSES[name].accepts_reference:
        with pytest.raises(ValueError, match="reference"):
            loss(*as_dicts(qy, scored_input(loss, q), ry, scored_input(loss, r)))
        return
    assert name in CROSS_REFERENCES, f"write a query-vs-reference numpy reference for {name!r}"
    np.testing.assert_allclose(float(loss(*as_dicts(qy, q, ry, r))),
                               CROSS_REFERENCES[name](q.astype("float64"), qy, r.astype("float64"), ry),
                               rtol=RTOL, atol=ATOL)


def reference_edge_batches():
    rng = np.random.default_rng(8)
    q = rng.normal(size=(5, 8))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    r = rng.normal(size=(4, 8))
    r /= np.linalg.norm(r, axis=1, keepdims=True)
    duplicates = r.copy()
    duplicates[0], duplicates[1] = q[0], q[1]     # a positive and a negative at distance 0
    return {
        "no_positive": (q, np.arange(5), r, np.arange(5, 9)),
        "one_class": (q, np.zeros(5, int), r, np.zeros(4, int)),
        "duplicates": (q, np.array([0, 1, 2, 0, 1]), duplicates, np.array([0, 2, 1, 1])),
        "one_query_one_reference": (q[:1], np.array([3]), r[:1], np.array([3])),
    }


@pytest.mark.parametrize("name", sorted(n for n, cls in LOSSES.items() if cls.accepts_reference))
def test_reference_edge_batches_give_finite_loss_and_gradients(name):
    loss = get_loss(name)
    for case, (q, y, r, ry) in reference_edge_batches().items():
        q_var, r_var = tf.Variable(q.astype("float32")), tf.Variable(r.astype("float32"))
        with tf.GradientTape() as tape:
            value = loss(*as_dicts(tf.constant(y, "float32"), q_var, tf.constant(ry, "float32"), r_var))
        grads = tape.gradient(value, [q_var, r_var])
        assert np.isfinite(float(value)), case
        assert all(g is not None and np.isfinite(np.asarray(g)).all() for g in grads), case
        tol = {"atol": 1e-3} if case == "duplicates" else {"rtol": RTOL, "atol": ATOL}
        np.testing.assert_allclose(float(value), CROSS_REFERENCES[name](q, y, r, ry), err_msg=case, **tol)


def test_triplet_accuracy_against_references_matches_reference():
    for seed in range(3):
        q, y, r, ry = query_and_reference(seed, normalise=seed % 2 == 0)
        np.testing.assert_allclose(float(triplet_accuracy(*as_dicts(y, q, ry, r))),
                                   cross_triplet_accuracy(q.astype("float64"), y, r.astype("float64"), ry),
                                   rtol=1e-6)


class TwoTowerModel(keras.Model):
    """A model with {"embeddings", "ref_embeddings"} outputs whose loss sees both towers at once.

    `model.compile` maps a single loss over each output of a dict-output model, so a two-tower
    objective hands Keras's (y, y_pred) dicts to the loss itself; the loss needs nothing else.
    """

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return self.loss(y, y_pred)


def test_two_tower_model_trains_with_model_fit():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16,))
    towers = {"embeddings": L2Normalize()(keras.layers.Dense(8)(inputs)),
              "ref_embeddings": L2Normalize()(keras.layers.Dense(8)(inputs))}
    model = TwoTowerModel(inputs, towers)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=get_loss("infonce"), jit_compile=False)
    x, y = gaussian_classes(np.random.default_rng(1), 8)
    history = model.fit(x, {"labels": y}, batch_size=16, epochs=3, verbose=0).history
    assert len(history["loss"]) == 3 and np.isfinite(history["loss"]).all()
    assert history["loss"][-1] < history["loss"][0]
    # The logged loss is the loss of the whole batch, query tower against reference tower.
    out = model(x[:16])
    np.testing.assert_allclose(float(model.loss({"labels": y[:16]}, out)),
                               cross_infonce(np.asarray(out["embeddings"], "float64"), y[:16],
                                             np.asarray(out["ref_embeddings"], "float64"), y[:16]),
                               rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------- edge cases

# The hand-picked configurations above plus every registered loss at its defaults.
ALL_CONFIGS = EMBEDDING_CONFIGS + [(name, {}) for name in sorted(LOSSES)
                                   if name not in {n for n, _ in EMBEDDING_CONFIGS}]
ALL_IDS = CONFIG_IDS + [name for name, _ in ALL_CONFIGS[len(EMBEDDING_CONFIGS):]]


@pytest.mark.parametrize("name,params", ALL_CONFIGS, ids=ALL_IDS)
def test_edge_batches_give_finite_loss_and_gradients(name, params):
    loss = get_loss(name, **params)
    for case, (x, y) in edge_batches().items():
        if loss.requires_classifier:
            x = x[:, :6]      # cosine logits over 6 classes: every label is in range
        value, grad = loss_and_grad(loss, y, x)
        assert np.isfinite(float(value)), case
        assert grad is not None and np.isfinite(np.asarray(grad)).all(), case
        if loss.requires_classifier:
            expected = ALL_REFERENCES[name](np.clip(x, -1, 1).astype("float64"), y, **params)
        else:
            expected = ALL_REFERENCES[name](x.astype("float64"), y, **params)
        # Rounding noise in the Gram-matrix distance of identical rows is ~1e-4.
        tol = {"atol": 1e-3} if case == "duplicates" else {"rtol": RTOL, "atol": ATOL}
        np.testing.assert_allclose(float(value), expected, err_msg=case, **tol)
        if name in NEEDS_POSITIVE and case in ("no_positive", "batch_of_one"):
            assert float(value) == 0.0, case
        if name in NEEDS_NEGATIVE and case == "one_class":
            assert float(value) == 0.0, case
        if name == "contrastive" and case == "batch_of_one":
            assert float(value) == 0.0


def test_arcface_gradient_is_finite_at_cosine_plus_minus_one():
    cos = np.array([[1.0, -1.0, 0.0], [-1.0, 1.0, 1.0]], "float32")
    for easy_margin in (False, True):
        value, grad = loss_and_grad(ArcFaceLoss(easy_margin=easy_margin), np.array([0, 0]), cos)
        assert np.isfinite(float(value)) and np.isfinite(np.asarray(grad)).all()


# --------------------------------------------------------------------------- dtype, graph, serialisation

@pytest.mark.parametrize("name", sorted(LOSSES))
def test_float16_embeddings_are_scored_in_float32(name):
    x, y = clustered_batch(11, n=12, dim=5)
    x16 = x.astype("float16")
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        loss = get_loss(name)
        out = loss(y, tf.constant(x16))
        direct = loss.call(tf.constant(y, "float32"), tf.constant(x16))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert out.dtype == "float32" and direct.dtype == "float32"
    # Same inputs in float32: a float16 computation would be off by ~1e-3 relative.
    expected = float(get_loss(name)(y, x16.astype("float32")))
    np.testing.assert_allclose(float(out), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(direct), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(out), float(get_loss(name)(y, x)), rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("name,params", ALL_CONFIGS, ids=ALL_IDS)
def test_inside_tf_function_with_dynamic_batch(name, params):
    loss = get_loss(name, **params)
    graph_loss = tf.function(lambda y, x: loss(y, x), input_signature=[
        tf.TensorSpec([None], tf.float32), tf.TensorSpec([None, None], tf.float32)])
    for n in (12, 7, 1):
        x, y = clustered_batch(n, n=n, dim=5)
        np.testing.assert_allclose(float(graph_loss(y.astype("float32"), x)), float(loss(y, x)), rtol=1e-5,
                                   atol=1e-7)


PARAMS = {
    "triplet": {"margin": 0.3, "mining": "batch_hard", "distance": "cosine"},
    "contrastive": {"positive_margin": 0.1, "negative_margin": 0.8, "distance": "squared_euclidean"},
    "contrastive_softmax": {"temperature": 0.2},
    "arcface": {"scale": 16.0, "margin": 0.3, "easy_margin": True},
    "multisimilarity": {"alpha": 1.0, "beta": 40.0, "base": 0.4, "epsilon": 0.05},
    "supcon": {"temperature": 0.1},
    "infonce": {"temperature": 0.2},
    "multimodal_contrastive": {"temperature": 0.2, "alpha_text": 0.5, "alpha_cross": 0.1},
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_config_and_serialisation_round_trip(name):
    assert name in PARAMS, f"give PARAMS non-default constructor arguments for {name!r}"
    loss = get_loss(name, **PARAMS[name])
    config = loss.get_config()
    assert {k: config[k] for k in PARAMS[name]} == PARAMS[name]
    assert config["name"] == name
    clone = type(loss).from_config(config)
    assert clone.get_config() == config
    serialised = keras.saving.serialize_keras_object(loss)
    assert serialised["registered_name"] == f"embedlab>{type(loss).__name__}"
    restored = keras.saving.deserialize_keras_object(serialised)
    assert type(restored) is type(loss) and restored.get_config() == config
    x, y = clustered_batch(2, dim=5)
    assert float(restored(y, x)) == float(loss(y, x))


def test_registry_and_get_loss():
    assert set(LOSSES) == {"triplet", "contrastive", "contrastive_softmax", "arcface", "multisimilarity", "supcon",
                           "infonce", "multimodal_contrastive"}
    for name, cls in LOSSES.items():
        loss = get_loss(name)
        assert isinstance(loss, cls) and isinstance(loss, keras.losses.Loss)
        assert loss.name == name and cls.registry_name == name
        assert cls.requires_classifier is (name == "arcface")
    assert get_loss("triplet", margin=0.7, mining="batch_all").margin == 0.7
    with pytest.raises(ValueError, match="known losses: arcface, contrastive"):
        get_loss("npair")
    with pytest.raises(ValueError, match="mining"):
        TripletLoss(mining="hardest")
    with pytest.raises(ValueError, match="distance"):
        get_loss("contrastive", distance="manhattan")
    with pytest.raises(ValueError, match="temperature"):
        get_loss("supcon", temperature=0.0)


def test_loss_names_are_listed_without_importing_keras():
    """A configuration's loss names are checked before TensorFlow loads (the CLI answers in a fraction of a second)."""
    import subprocess
    import sys

    code = ("import sys; from models.losses.registry import LOSS_NAMES; "
            "assert 'keras' not in sys.modules and 'tensorflow' not in sys.modules, sorted(sys.modules); "
            "print(','.join(LOSS_NAMES))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip().split(",") == list(LOSSES)


@pytest.mark.parametrize("module", ["models.losses", "models.losses.registry"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_configs_saved_before_the_split_still_load(name, module):
    # Saved models name the module that defined the class when they were written: models/losses.py before
    # the package, models/losses/registry.py before the split into families. The registered name decides.
    loss = get_loss(name, **PARAMS[name])
    saved = {**keras.saving.serialize_keras_object(loss), "module": module}
    restored = keras.saving.deserialize_keras_object(saved)
    assert type(restored) is type(loss) and restored.get_config() == loss.get_config()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_each_loss_says_what_it_needs(name):
    # Trainers read these instead of testing a loss by name.
    cls = LOSSES[name]
    assert isinstance(cls.requires_classifier, bool) and isinstance(cls.accepts_reference, bool)
    assert cls.training_metrics() == ([] if cls.requires_classifier else [triplet_accuracy])
    assert not (cls.requires_classifier and cls.accepts_reference)


def test_unknown_dict_keys_are_refused():
    x, y = clustered_batch(0)
    loss = get_loss("supcon")
    with pytest.raises(ValueError, match="'embeddings'"):
        loss({"labels": y}, {"embedding": x})
    with pytest.raises(ValueError, match="'labels'"):
        loss({"label": y}, {"embeddings": x})
    with pytest.raises(ValueError, match="ref_labels given without ref_embeddings"):
        loss.compute(x, y, ref_labels=y)


# --------------------------------------------------------------------------- training

def gaussian_classes(rng, per_class):
    """Four classes, well separated in two input dimensions and hidden by noise in 14 others."""
    angles = np.arange(4) * np.pi / 2
    means = np.zeros((4, 16))
    means[:, 0], means[:, 1] = 3 * np.cos(angles), 3 * np.sin(angles)
    y = np.repeat(np.arange(4), per_class)
    noise = rng.normal(size=(len(y), 16)) * np.r_[np.full(2, 0.7), np.full(14, 2.5)]
    return (means[y] + noise).astype("float32"), y


def nearest_neighbour_accuracy(embeddings, y):
    e = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return float(np.mean(y[sim.argmax(1)] == y))


def build_model(name, n_classes=4):
    inputs = keras.Input((16,))
    embeddings = L2Normalize()(keras.layers.Dense(8)(inputs))
    outputs = CosineClassifier(n_classes)(embeddings) if LOSSES[name].requires_classifier else embeddings
    return keras.Model(inputs, outputs), keras.Model(inputs, embeddings)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_model_fit_two_epochs(name):
    keras.utils.set_random_seed(0)
    x, y = gaussian_classes(np.random.default_rng(1), 15)     # 60 items: the last batch of 16 is short
    model, _ = build_model(name)
    metrics = [] if LOSSES[name].requires_classifier else [triplet_accuracy]
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=get_loss(name), metrics=metrics, jit_compile=False)
    history = model.fit(x, y, batch_size=16, epochs=2, shuffle=True, verbose=0).history
    assert len(history["loss"]) == 2 and np.isfinite(history["loss"]).all()
    if metrics:
        assert all(0.0 <= v <= 1.0 for v in history["triplet_accuracy"])


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_training_improves_nearest_neighbours(name):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x_eval, y_eval = gaussian_classes(rng, 50)
    model, embed = build_model(name)
    loss = get_loss(name)
    optimizer = keras.optimizers.Adam(0.05)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            value = loss(y, model(x, training=True))
        grads = tape.gradient(value, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return value

    before = nearest_neighbour_accuracy(np.asarray(embed(x_eval)), y_eval)
    values = []
    for _ in range(30):
        x, y = gaussian_classes(rng, 8)       # class-balanced batches of 4 × 8
        values.append(float(step(x, y.astype("float32"))))
    after = nearest_neighbour_accuracy(np.asarray(embed(x_eval)), y_eval)
    assert np.isfinite(values).all()
    assert before < 0.5 and after > 0.85, (before, after)
    assert np.mean(values[-5:]) < np.mean(values[:5])


def test_compiled_model_with_arcface_saves_and_loads(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16,))
    outputs = CosineClassifier(4, sub_centers=3)(L2Normalize()(keras.layers.Dense(8)(inputs)))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss=get_loss("arcface", margin=0.3))
    x, y = gaussian_classes(np.random.default_rng(2), 4)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    model.save(tmp_path / "arcface.keras")
    restored = keras.models.load_model(tmp_path / "arcface.keras")
    np.testing.assert_allclose(np.asarray(restored(x)), np.asarray(model(x)), rtol=1e-6)
    assert isinstance(restored.loss, ArcFaceLoss) and restored.loss.margin == 0.3


# --------------------------------------------------------------------------- distillation (models/losses/distill.py)

def ref_match(s, t, kind):
    if kind == "cosine":
        return float(np.mean([1 - s[i] @ t[i] / np.linalg.norm(s[i]) / np.linalg.norm(t[i]) for i in range(len(s))]))
    return float(np.mean((s - t) ** 2))


def ref_rkd_distance(s, t):
    """Park et al.'s distance-wise RKD, pair by pair: distances over their mean (i != j), Huber (delta 1)."""
    n = len(s)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    ds = np.array([np.linalg.norm(s[i] - s[j]) for i, j in pairs])
    dt = np.array([np.linalg.norm(t[i] - t[j]) for i, j in pairs])
    diff = np.abs(ds / ds.mean() - dt / dt.mean())
    return float(np.mean(np.where(diff < 1, 0.5 * diff ** 2, diff - 0.5)))


@pytest.mark.parametrize("match", ["cosine", "mse"])
@pytest.mark.parametrize("project", [False, True])
def test_distillation_loss_matches_numpy_references(match, project):
    from models.losses.distill import DistillationLoss

    rng = np.random.default_rng(5)
    x, y = clustered_batch(3, n=12, dim=8)
    teacher = rng.normal(size=(12, 6 if project else 8)).astype("float32")
    teacher /= np.linalg.norm(teacher, axis=1, keepdims=True)
    projected = rng.normal(size=(12, 6)).astype("float32") if project else None
    loss = DistillationLoss(match=match, match_weight=0.7, relational_weight=1.3, label_loss="supcon",
                            label_weight=0.5)
    y_pred = {"embeddings": x, **({"projected": projected} if project else {})}
    got = float(loss({"labels": y, "teacher": teacher}, y_pred))
    matched = projected if project else x
    expected = (0.7 * ref_match(matched.astype("float64"), teacher.astype("float64"), match)
                + 1.3 * ref_rkd_distance(x.astype("float64"), teacher.astype("float64"))
                + 0.5 * ref_supcon(x.astype("float64"), y))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    terms = loss.terms(x, teacher, y, projected)
    np.testing.assert_allclose(float(terms["relational"]), ref_rkd_distance(x.astype("float64"),
                                                                            teacher.astype("float64")), rtol=1e-4)


def test_relational_term_ignores_scale_and_is_zero_for_the_teacher_itself():
    from models.losses.distill import relational_term

    x, _ = clustered_batch(1, n=10, dim=8)
    assert float(relational_term(x, x)) < 1e-6
    assert float(relational_term(3.0 * x, x)) < 1e-6, "distances are compared after dividing by their mean"
    # Duplicate rows (zero distances) keep value and gradient finite.
    dup = np.concatenate([x[:4], x[:4]])
    value, grad = loss_and_grad(lambda yy, e: relational_term(e, dup[::-1].copy()), np.zeros(8), dup)
    assert np.isfinite(value) and np.isfinite(grad).all()


def test_distillation_loss_config_round_trip_and_bad_settings():
    import keras

    from models.losses.distill import DistillationLoss

    loss = DistillationLoss(match="mse", relational_weight=0.0, label_loss="triplet",
                            label_loss_params={"margin": 0.3})
    again = keras.losses.deserialize(keras.losses.serialize(loss))
    assert again.get_config() == loss.get_config()
    with pytest.raises(ValueError, match="unknown match"):
        DistillationLoss(match="kl")
    with pytest.raises(ValueError, match="classifier"):
        DistillationLoss(label_loss="arcface")
