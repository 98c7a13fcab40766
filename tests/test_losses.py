"""Metric-learning losses and the cosine classifier against brute-force numpy references.

The references below loop explicitly over every pair / triplet in float64 and are
written from the papers' definitions, not from the vectorised implementation, so a
masking or reduction slip in models/losses.py shows up as a value mismatch.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import keras
import tensorflow as tf

from models.classifier import CosineClassifier
from models.layers import L2Normalize
from models.losses import LOSSES, ArcFaceLoss, TripletLoss, get_loss, triplet_accuracy

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


REFERENCES = {
    "triplet": ref_triplet,
    "contrastive": ref_contrastive,
    "contrastive_softmax": ref_contrastive_softmax,
    "multisimilarity": ref_multisimilarity,
    "supcon": ref_supcon,
    "infonce": ref_infonce,
}

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
NEEDS_POSITIVE = {"triplet", "contrastive_softmax", "multisimilarity", "supcon", "infonce"}
NEEDS_NEGATIVE = {"triplet", "contrastive_softmax", "multisimilarity"}


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


# --------------------------------------------------------------------------- edge cases

ALL_CONFIGS = EMBEDDING_CONFIGS + [("arcface", {})]


@pytest.mark.parametrize("name,params", ALL_CONFIGS, ids=CONFIG_IDS + ["arcface"])
def test_edge_batches_give_finite_loss_and_gradients(name, params):
    loss = get_loss(name, **params)
    for case, (x, y) in edge_batches().items():
        if name == "arcface":
            x = x[:, :6]      # cosine logits over 6 classes: every label is in range
        value, grad = loss_and_grad(loss, y, x)
        assert np.isfinite(float(value)), case
        assert grad is not None and np.isfinite(np.asarray(grad)).all(), case
        if name == "arcface":
            expected = ref_arcface(np.clip(x, -1, 1).astype("float64"), y)
        else:
            expected = REFERENCES[name](x.astype("float64"), y, **params)
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


@pytest.mark.parametrize("name,params", ALL_CONFIGS, ids=CONFIG_IDS + ["arcface"])
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
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_config_and_serialisation_round_trip(name):
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
                           "infonce"}
    for name, cls in LOSSES.items():
        loss = get_loss(name)
        assert isinstance(loss, cls) and isinstance(loss, keras.losses.Loss)
        assert loss.name == name
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
