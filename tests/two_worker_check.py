"""Run twice by tests/test_distributed.py, as worker 0 and worker 1 of a localhost cluster
(TF_CONFIG is set by the test before TensorFlow starts).

Under MultiWorkerMirroredStrategy each worker process has one replica; each builds the
same global batch and feeds its own replica only its slice (pipeline/distribute.py).
Prints one JSON object comparing, per loss, one device on the global batch with the
two-worker result.
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
    report = {"strategy": type(strategy).__name__,
              "losses": compare_losses(tf.distribute.get_strategy(), strategy)}
    print("RESULT " + json.dumps(report))
