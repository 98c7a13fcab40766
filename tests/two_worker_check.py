"""Run twice by tests/test_distributed.py, as worker 0 and worker 1 of a localhost cluster
(TF_CONFIG is set by the test before TensorFlow starts).

Under MultiWorkerMirroredStrategy each worker process has one replica; each builds the
same global batch and feeds its own replica only its slice (pipeline/distribute.py).
Prints one JSON object comparing, per loss, one device on the global batch with the
two-worker result, and the outcome of a short head-mode training (`run_train`) run by both
workers on the phase-1 output the test wrote to the folder given as the first argument.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.distribute import training_strategy  # noqa: E402
from tests.replica_checks import compare_losses  # noqa: E402

if __name__ == "__main__":
    import tensorflow as tf

    # The multi-worker strategy first: it must be created before any other TensorFlow work.
    strategy = training_strategy()
    report = {"multi_worker": isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy),
              "losses": compare_losses(tf.distribute.get_strategy(), strategy)}

    import numpy as np

    from pipeline.train import run_train
    from tests.test_train import make_config

    out = run_train(make_config(Path(sys.argv[1]), epochs=2, steps_per_epoch=3, jit_compile=False, export=False,
                                n_classes_per_batch=4))[0]
    history = np.genfromtxt(out / "history.csv", delimiter=",", names=True)
    report["training"] = {"out": str(out), "loss": np.atleast_1d(history["loss"]).tolist(),
                          "replicas": json.loads((out / "training.json").read_text())["distribution"]["replicas"]}
    print("RESULT " + json.dumps(report))
