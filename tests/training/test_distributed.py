"""tf.distribute: batch losses on two replicas equal one device on the same global batch.

Two set-ups, each in fresh processes (TensorFlow's devices and cluster are fixed when it starts):
  * MirroredStrategy over two logical CPU devices of one process (tests/training/two_replica_check.py);
  * MultiWorkerMirroredStrategy over two worker processes on localhost, from TF_CONFIG
    (tests/training/two_worker_check.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.training.replica_checks import LOSS_CASES

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}


def _result(stdout: str, stderr: str, returncode: int, what: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert returncode == 0 and lines, f"{what} failed:\n{stdout[-3000:]}\n{stderr[-6000:]}"
    return json.loads(lines[-1].removeprefix("RESULT "))


def _free_ports(n: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope="module")
def worker_runs(tmp_path_factory) -> Path:
    from tests.training.test_train import clustered_features, write_phase1

    runs = tmp_path_factory.mktemp("workers") / "runs"
    write_phase1(runs, *clustered_features())
    return runs


@pytest.fixture(scope="module")
def launched(worker_runs) -> dict:
    """The three processes, started together: the two-replica check and the two workers (each ~40-60 s of
    TensorFlow start-up and tracing, mostly on one core) overlap instead of running one after the other."""
    env = {key: value for key, value in ENV.items() if key != "TF_CONFIG"}
    replica = subprocess.Popen([sys.executable, str(ROOT / "tests" / "training" / "two_replica_check.py")], cwd=ROOT,
                               env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    workers = [f"localhost:{port}" for port in _free_ports(2)]
    processes = [replica]
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        processes.append(subprocess.Popen([sys.executable, str(ROOT / "tests" / "training" / "two_worker_check.py"),
                                           str(worker_runs)], cwd=ROOT,
                                          env={**ENV, "TF_CONFIG": json.dumps(tf_config)}, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    def finished(process):
        stdout, stderr = process.communicate(timeout=600)   # drains both pipes, so no process blocks on a full one
        return stdout, stderr, process.returncode

    try:
        with ThreadPoolExecutor(max_workers=len(processes)) as pool:
            outputs = dict(zip(("two-replica check", "worker 0", "worker 1"), pool.map(finished, processes)))
    finally:
        for process in processes:
            process.kill()
    return outputs


@pytest.fixture(scope="module")
def report(launched) -> dict:
    return _result(*launched["two-replica check"], "two-replica check")


@pytest.fixture(scope="module")
def worker_reports(launched) -> list[dict]:
    return [_result(*launched[f"worker {index}"], f"worker {index}") for index in range(2)]


def test_two_logical_cpu_replicas_are_used(report):
    assert report["losses"]["replicas"] == 2
    assert report["training"]["replicas_one"] == 1 and report["training"]["replicas_two"] == 2


def _assert_matches_one_device(r: dict) -> None:
    assert r["loss_two"] == pytest.approx(r["loss_one"], rel=1e-5, abs=1e-6)
    assert r["max_grad_diff"] <= 1e-5 * max(1.0, r["max_grad"])
    assert r["accuracy_two"] == pytest.approx(r["accuracy_one"], abs=1e-6)


@pytest.mark.parametrize("case", LOSS_CASES)
def test_loss_and_gradients_match_one_device_on_the_global_batch(report, case):
    _assert_matches_one_device(report["losses"][case])


@pytest.mark.parametrize("case", LOSS_CASES)
def test_two_workers_from_tf_config_match_one_device(worker_reports, case):
    for worker in worker_reports:
        assert worker["multi_worker"]
        assert worker["losses"]["replicas"] == 2
        _assert_matches_one_device(worker["losses"][case])


@pytest.mark.parametrize("case", ["triplet", "contrastive", "supcon", "infonce", "multisimilarity",
                                  "triplet_reference", "contrastive_reference", "supcon_reference",
                                  "infonce_reference", "multisimilarity_reference"])
def test_the_check_would_see_a_loss_computed_on_local_slices_only(report, case):
    # Each replica holds two of the four classes: without gathering, negatives from the
    # other replica's classes are missing and the loss differs. This keeps the test above honest.
    r = report["losses"][case]
    assert abs(r["loss_two_local_slices"] - r["loss_one"]) > 1e-3


def test_head_training_on_two_replicas_matches_one_device(report):
    t = report["training"]
    np.testing.assert_allclose(t["loss_two"], t["loss_one"], rtol=1e-4, atol=1e-5)
    assert t["max_weight_diff"] < 1e-4


def test_two_workers_train_like_one_device_and_only_the_chief_publishes(worker_reports, report):
    chief, other = worker_reports
    out = Path(chief["training"]["out"])
    assert chief["training"]["replicas"] == 2 and (out / "head.keras").is_file()
    # The other worker trained the same model into a scratch folder inside the chief's.
    assert Path(other["training"]["out"]) == out / ".worker-1"
    np.testing.assert_allclose(chief["training"]["loss"], other["training"]["loss"], rtol=1e-6)
    # Same settings as the one-device run of the mirrored check: the same losses.
    np.testing.assert_allclose(chief["training"]["loss"], report["training"]["loss_one"], rtol=1e-4, atol=1e-5)


def test_workers_agree_to_resume_from_the_epoch_all_of_them_hold(worker_reports):
    chief, other = (worker["resume"] for worker in worker_reports)
    assert chief["committed_before"] == other["committed_before"] == 3
    # Worker 1 was set back to epoch 2, so both resume after epoch 2 (the chief rolls back one).
    assert chief["resumed_from_epoch"] == other["resumed_from_epoch"] == 2
    assert chief["epochs"] == other["epochs"] == [0, 1, 2, 3]
    np.testing.assert_allclose(chief["loss"], other["loss"], rtol=1e-6)


@pytest.mark.parametrize("views, decision", [
    # [done, latest, before latest, fit finished, chief]; the chief first.
    ([[1, 0, 0, 0, 1], [1, 0, 0, 0, 0]], (True, 0, False)),      # everyone published
    ([[1, 0, 0, 0, 1], [0, 5, 4, 1, 0]], (True, 0, False)),      # the chief published: the rest is scratch
    ([[0, 3, 2, 0, 1], [1, 0, 0, 0, 0]], (False, 0, False)),     # only a worker published: all start over
    ([[0, 3, 2, 0, 1], [0, 3, 2, 0, 0]], (False, 3, False)),     # in step
    ([[0, 3, 2, 0, 1], [0, 2, 1, 0, 0]], (False, 2, False)),     # one pre-empted before its epoch-3 commit
    ([[0, 4, 3, 0, 1], [0, 2, 1, 0, 0]], (False, 0, False)),     # two epochs apart: no common backup
    ([[0, 3, 2, 0, 1], [0, 0, 0, 0, 0]], (False, 0, False)),     # one has nothing
    ([[0, 5, 4, 1, 1], [0, 5, 4, 1, 0]], (False, 5, True)),      # the fit ended everywhere; only saving is left
    ([[0, 5, 4, 1, 1], [0, 5, 4, 0, 0]], (False, 5, False)),     # one did not record the end: finish in step
    ([[0, 5, 4, 1, 1], [0, 4, 3, 0, 0]], (False, 4, False)),     # one a commit behind: all go back to epoch 4
])
def test_agreed_resume(views, decision):
    from pipeline.core.distribute import agreed_resume

    assert agreed_resume(views) == decision
