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

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.core.distribute import training_strategy  # noqa: E402
from tests.training.replica_checks import compare_losses  # noqa: E402

DEVICES = ["/cpu:0", "/cpu:1"]


def compare_training() -> dict:
    from pipeline.phases.train import run_train
    from tests.training.test_train import clustered_features, make_config, write_phase1

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
    report = {"losses": compare_losses(training_strategy(), training_strategy(DEVICES)),
              "training": compare_training()}
    print("RESULT " + json.dumps(report))
