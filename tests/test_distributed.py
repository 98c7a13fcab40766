"""tf.distribute: batch losses on two mirrored replicas equal one device on the same global batch.

The check runs in a subprocess (tests/two_replica_check.py) because the CPU can only be
split into two logical devices before TensorFlow initialises.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report() -> dict:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "two_replica_check.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"two-replica check failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_two_logical_cpu_replicas_are_used(report):
    assert report["losses"]["replicas"] == 2
    assert report["training"]["replicas_one"] == 1 and report["training"]["replicas_two"] == 2


@pytest.mark.parametrize("case", ["triplet", "triplet_batch_all", "triplet_batch_hard", "contrastive",
                                  "contrastive_softmax", "arcface", "multisimilarity", "supcon", "infonce"])
def test_loss_and_gradients_match_one_device_on_the_global_batch(report, case):
    r = report["losses"][case]
    assert r["loss_two"] == pytest.approx(r["loss_one"], rel=1e-5, abs=1e-6)
    assert r["max_grad_diff"] <= 1e-5 * max(1.0, r["max_grad"])
    assert r["accuracy_two"] == pytest.approx(r["accuracy_one"], abs=1e-6)


@pytest.mark.parametrize("case", ["triplet", "contrastive", "supcon", "infonce", "multisimilarity"])
def test_the_check_would_see_a_loss_computed_on_local_slices_only(report, case):
    # Each replica holds two of the four classes: without gathering, negatives from the
    # other replica's classes are missing and the loss differs. This keeps the test above honest.
    r = report["losses"][case]
    assert abs(r["loss_two_local_slices"] - r["loss_one"]) > 1e-3


def test_head_training_on_two_replicas_matches_one_device(report):
    t = report["training"]
    np.testing.assert_allclose(t["loss_two"], t["loss_one"], rtol=1e-4, atol=1e-5)
    assert t["max_weight_diff"] < 1e-4
