"""Shared by tests/two_replica_check.py and tests/two_worker_check.py (each run in a fresh process).

Per loss: the loss value, gradients and triplet accuracy of a tiny model on one global batch,
computed on one device and under a multi-replica strategy that splits the batch.
"""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from models import losses as losses_lib
from models.classifier import CosineClassifier
from pipeline.core.distribute import distribute_global_batches

BATCH, N_CLASSES, D_IN, D_OUT = 16, 4, 8, 6


def tiny_model(with_classifier: bool):
    keras.utils.set_random_seed(3)
    inputs = keras.Input((D_IN,))
    x = keras.layers.Dense(D_OUT, name="embed")(inputs)
    if with_classifier:
        x = CosineClassifier(N_CLASSES, name="classifier")(x)
    return keras.Model(inputs, x)


def loss_and_gradients(loss, strategy, x, y, with_classifier):
    with strategy.scope():
        model = tiny_model(with_classifier)

    def step(xb, yb):
        with tf.GradientTape() as tape:
            value = loss(yb, model(xb))
        accuracy = losses_lib.triplet_accuracy(yb, model(xb)) if not with_classifier else tf.constant(0.0)
        return value, tape.gradient(value, model.trainable_variables), accuracy

    def rows(first, count):
        return tf.data.Dataset.from_tensors((x[first:first + count], y[first:first + count]))

    batch = next(iter(distribute_global_batches(strategy, rows, BATCH)))
    value, grads, accuracy = strategy.run(tf.function(step), args=batch)
    total = strategy.reduce("SUM", value, axis=None)
    grads = [strategy.reduce("SUM", g, axis=None) for g in grads]
    # Every replica reports the global batch's accuracy; their mean is that value.
    accuracy = strategy.reduce("MEAN", accuracy, axis=None)
    # What each replica would compute without gathering: the loss of its own slice.
    local = strategy.reduce("MEAN", strategy.run(tf.function(lambda xb, yb: loss.batch_loss(yb, model(xb))),
                                                 args=batch), axis=None)
    return float(total), [g.numpy() for g in grads], float(accuracy), float(local)


def compare_losses(one, two) -> dict:
    """`one`: a single-replica strategy; `two`: the multi-replica strategy under test."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, D_IN)).astype("float32")
    # Class-grouped like a P x K batch: the replicas' halves hold different classes.
    y = np.repeat(np.arange(N_CLASSES), BATCH // N_CLASSES).astype("int32")
    cases = {name: {} for name in losses_lib.LOSSES}
    cases.update({"triplet_batch_all": {"mining": "batch_all"}, "triplet_batch_hard": {"mining": "batch_hard"}})
    report = {"replicas": two.num_replicas_in_sync}
    for case, params in cases.items():
        name = "triplet" if case.startswith("triplet") else case
        loss = losses_lib.get_loss(name, **params)
        with_classifier = bool(getattr(loss, "requires_classifier", False))
        v1, g1, a1, _ = loss_and_gradients(loss, one, x, y, with_classifier)
        v2, g2, a2, local = loss_and_gradients(loss, two, x, y, with_classifier)
        report[case] = {"loss_one": v1, "loss_two": v2, "loss_two_local_slices": local,
                        "max_grad_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(g1, g2)),
                        "max_grad": max(float(np.max(np.abs(a))) for a in g1),
                        "accuracy_one": a1, "accuracy_two": a2}
    return report
