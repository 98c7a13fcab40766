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
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from pipeline.core.distribute import training_strategy  # noqa: E402
from tests.training.replica_checks import compare_losses  # noqa: E402

def _resume_after_uneven_preemption(runs: Path) -> dict:
    """Both workers stop after committing epoch 3; worker 1 is then set back to its epoch-2
    backup, as if it had been pre-empted before that commit. The rerun must resume both
    after epoch 2, in step."""
    import keras

    from pipeline.core import atomic
    from pipeline.training.checkpoints import STATE_FILE, read_state
    from pipeline.phases.train import run_train
    from tests.training.test_train import make_config

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 2:
                raise KeyboardInterrupt

    config = make_config(runs, losses=["supcon"], epochs=4, steps_per_epoch=3, jit_compile=False, export=False,
                         n_classes_per_batch=4)
    try:
        run_train(config, extra_callbacks=[Interrupt()])
    except KeyboardInterrupt:
        pass
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    out = runs / "t" / "train" / "fake" / "supcon"
    mine = out if index == 0 else out / f".worker-{index}"
    backup = mine / "backup"
    state = read_state(backup)
    committed_before = state["epoch"]
    if index == 1:
        previous = state["previous"]
        atomic.write_json(backup / STATE_FILE, {"epoch": previous["epoch"], "weights": previous["weights"],
                                                "previous": None, "best": previous["best"]})
    run_train(config)
    summary = json.loads((mine / "training.json").read_text())
    history = np.genfromtxt(mine / "history.csv", delimiter=",", names=True)
    return {"committed_before": committed_before, "resumed_from_epoch": summary["resumed_from_epoch"],
            "epochs": np.atleast_1d(history["epoch"]).tolist(), "loss": np.atleast_1d(history["loss"]).tolist()}


if __name__ == "__main__":
    import tensorflow as tf

    # The multi-worker strategy first: it must be created before any other TensorFlow work.
    strategy = training_strategy()
    report = {"multi_worker": isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy),
              "losses": compare_losses(tf.distribute.get_strategy(), strategy)}

    from pipeline.phases.train import run_train
    from tests.training.test_train import make_config

    out = run_train(make_config(Path(sys.argv[1]), epochs=2, steps_per_epoch=3, jit_compile=False, export=False,
                                n_classes_per_batch=4))[0]
    history = np.genfromtxt(out / "history.csv", delimiter=",", names=True)
    report["training"] = {"out": str(out), "loss": np.atleast_1d(history["loss"]).tolist(),
                          "replicas": json.loads((out / "training.json").read_text())["distribution"]["replicas"]}
    report["resume"] = _resume_after_uneven_preemption(Path(sys.argv[1]))
    print("RESULT " + json.dumps(report))
