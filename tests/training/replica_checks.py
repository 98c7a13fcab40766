"""Shared by tests/two_replica_check.py and tests/two_worker_check.py (each run in a fresh process).

Per loss case: the loss value, gradients and triplet accuracy of a tiny model on one global batch,
computed on one device and under a multi-replica strategy that splits the batch. The cases come
from the loss registry: every registered loss at its defaults, the other triplet minings, and,
for every loss that accepts references, a two-tower model scored query vs reference.
"""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from models import losses as losses_lib
from models.classifier import CosineClassifier
from pipeline.core.distribute import distribute_global_batches

BATCH, N_CLASSES, D_IN, D_OUT = 16, 4, 8, 6
REFERENCE_SUFFIX = "_reference"


def loss_cases() -> dict[str, tuple[str, dict, bool]]:
    """case -> (registry name, constructor params, scored against a second tower's references)."""
    cases = {name: (name, {}, False) for name in losses_lib.LOSSES}
    for mining in losses_lib.TRIPLET_MININGS:
        if mining != "semi_hard":       # the default, covered by "triplet"
            cases[f"triplet_{mining}"] = ("triplet", {"mining": mining}, False)
    for name, cls in losses_lib.LOSSES.items():
        if cls.accepts_reference:
            cases[name + REFERENCE_SUFFIX] = (name, {}, True)
    return cases


LOSS_CASES = sorted(loss_cases())


def tiny_model(with_classifier: bool, two_towers: bool = False):
    keras.utils.set_random_seed(3)
    inputs = keras.Input((D_IN,))
    x = keras.layers.Dense(D_OUT, name="embed")(inputs)
    if with_classifier:
        x = CosineClassifier(N_CLASSES, name="classifier")(x)
    if two_towers:
        # A second tower on the same inputs stands in for a text tower or a teacher.
        return keras.Model(inputs, {"embeddings": x, "ref_embeddings": keras.layers.Dense(D_OUT, name="ref")(inputs)})
    return keras.Model(inputs, x)


def loss_and_gradients(loss, strategy, x, y, with_classifier, two_towers=False):
    with strategy.scope():
        model = tiny_model(with_classifier, two_towers)

    def step(xb, yb):
        with tf.GradientTape() as tape:
            value = loss(yb, model(xb))
        accuracy = losses_lib.triplet_accuracy(yb, model(xb)) if not with_classifier else tf.constant(0.0)
        return value, tape.gradient(value, model.trainable_variables), accuracy

    def local_loss(xb, yb):
        out = model(xb)
        if two_towers:
            return loss.compute(out["embeddings"], yb, out["ref_embeddings"])
        return loss.compute(out, yb)

    def rows(first, count):
        return tf.data.Dataset.from_tensors((x[first:first + count], y[first:first + count]))

    batch = next(iter(distribute_global_batches(strategy, rows, BATCH)))
    value, grads, accuracy = strategy.run(tf.function(step), args=batch)
    total = strategy.reduce("SUM", value, axis=None)
    grads = [strategy.reduce("SUM", g, axis=None) for g in grads]
    # Every replica reports the global batch's accuracy; their mean is that value.
    accuracy = strategy.reduce("MEAN", accuracy, axis=None)
    # What each replica would compute without gathering: the loss of its own slice.
    local = strategy.reduce("MEAN", strategy.run(tf.function(local_loss), args=batch), axis=None)
    return float(total), [g.numpy() for g in grads], float(accuracy), float(local)


def compare_losses(one, two) -> dict:
    """`one`: a single-replica strategy; `two`: the multi-replica strategy under test."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, D_IN)).astype("float32")
    # Class-grouped like a P x K batch: the replicas' halves hold different classes.
    y = np.repeat(np.arange(N_CLASSES), BATCH // N_CLASSES).astype("int32")
    report = {"replicas": two.num_replicas_in_sync}
    for case, (name, params, two_towers) in loss_cases().items():
        loss = losses_lib.get_loss(name, **params)
        with_classifier = bool(loss.requires_classifier)
        v1, g1, a1, _ = loss_and_gradients(loss, one, x, y, with_classifier, two_towers)
        v2, g2, a2, local = loss_and_gradients(loss, two, x, y, with_classifier, two_towers)
        report[case] = {"loss_one": v1, "loss_two": v2, "loss_two_local_slices": local,
                        "max_grad_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(g1, g2)),
                        "max_grad": max(float(np.max(np.abs(a))) for a in g1),
                        "accuracy_one": a1, "accuracy_two": a2}
    return report
