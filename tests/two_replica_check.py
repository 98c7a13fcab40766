"""Run by tests/test_distributed.py in a fresh process: TensorFlow must be told to split the
CPU into two logical devices before it initialises, which the pytest process has already done.

Prints one JSON object with, per loss, the largest difference between the loss value and the
gradients computed on one device and on two mirrored replicas sharing the same global batch,
and, for a short head-mode training run, the loss histories and final weights of both.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import losses as losses_lib  # noqa: E402
from models.classifier import CosineClassifier  # noqa: E402
from pipeline.distribute import distribute_global_batches, training_strategy  # noqa: E402

DEVICES = ["/cpu:0", "/cpu:1"]
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


def compare_losses() -> dict:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, D_IN)).astype("float32")
    # Class-grouped like a P x K batch: the replicas' halves hold different classes.
    y = np.repeat(np.arange(N_CLASSES), BATCH // N_CLASSES).astype("int32")
    one, two = training_strategy(), training_strategy(DEVICES)
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


def compare_training() -> dict:
    from pipeline.train import run_train
    from tests.test_train import clustered_features, make_config, write_phase1

    features, labels, splits = clustered_features()
    runs = {}
    for name, devices in (("one", []), ("two", DEVICES)):
        root = Path(tempfile.mkdtemp()) / "runs"
        write_phase1(root, features, labels, splits)
        config = make_config(root, epochs=2, steps_per_epoch=3, jit_compile=False, devices=devices, export=False,
                             n_classes_per_batch=4)
        out = run_train(config)[0]
        history = np.genfromtxt(out / "history.csv", delimiter=",", names=True)
        head = keras.saving.load_model(out / "head.keras")
        summary = json.loads((out / "training.json").read_text())
        runs[name] = {"loss": np.atleast_1d(history["loss"]).tolist(),
                      "weights": [w.tolist() for w in head.get_weights()],
                      "replicas": summary["distribution"]["replicas"]}
    weight_diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                      for a, b in zip(runs["one"]["weights"], runs["two"]["weights"]))
    return {"loss_one": runs["one"]["loss"], "loss_two": runs["two"]["loss"], "max_weight_diff": weight_diff,
            "replicas_one": runs["one"]["replicas"], "replicas_two": runs["two"]["replicas"]}


if __name__ == "__main__":
    print("RESULT " + json.dumps({"losses": compare_losses(), "training": compare_training()}))
