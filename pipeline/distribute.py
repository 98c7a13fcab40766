"""tf.distribute for phases 1 and 3: which strategy, and how a P x K batch reaches the replicas.

Strategy, in order of precedence:
  * TF_CONFIG in the environment (several machines): MultiWorkerMirroredStrategy;
  * an explicit device list (`train.devices`, e.g. ["/gpu:0", "/gpu:2"]): MirroredStrategy over those;
  * several visible GPUs: MirroredStrategy over all of them;
  * otherwise the default strategy (one device, no overhead).

Batches: the samplers produce *global* P x K batches (every worker runs the same
seeded stream). Each worker keeps the rows of its own replicas, and each replica
gets a consecutive slice. The losses gather the slices back (models/cross_replica.py),
so what is learnt does not depend on how the batch was split.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Callable, Sequence

log = logging.getLogger("embedlab.distribute")


# One strategy per configuration and process: every MirroredStrategy numbers its
# collective operations from the same start, so a second one in the same process
# collides with the first ("Collective instance N expected type ...").
_STRATEGIES: dict = {}


def training_strategy(devices: Sequence[str] = ()):
    return _cached(os.environ.get("TF_CONFIG", ""), tuple(devices))


def inference_strategy():
    """Phase 1: the local GPUs mirrored when there are several (TF_CONFIG is for training)."""
    return _cached("", ())


def _cached(tf_config: str, devices: tuple):
    if (tf_config, devices) not in _STRATEGIES:
        _STRATEGIES[tf_config, devices] = _new_strategy(tf_config, devices)
    return _STRATEGIES[tf_config, devices]


def _new_strategy(tf_config: str, devices: Sequence[str]):
    import tensorflow as tf

    if tf_config:
        try:
            cluster = json.loads(tf_config).get("cluster", {})
        except ValueError as err:
            raise ValueError(f"TF_CONFIG is not valid JSON: {err}") from None
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        log.info("distribute: MultiWorkerMirroredStrategy over %d worker(s), %d replica(s) in sync",
                 len(cluster.get("worker", [])), strategy.num_replicas_in_sync)
        return strategy
    if devices:
        strategy = tf.distribute.MirroredStrategy(list(devices))
        log.info("distribute: MirroredStrategy over %s", ", ".join(devices))
        return strategy
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        strategy = tf.distribute.MirroredStrategy()
        log.info("distribute: MirroredStrategy over %d GPUs", len(gpus))
        return strategy
    return tf.distribute.get_strategy()


def replicas(strategy) -> int:
    return int(strategy.num_replicas_in_sync)


def check_divisible(global_batch_size: int, strategy) -> None:
    n = replicas(strategy)
    if global_batch_size % n:
        raise ValueError(f"a batch of {global_batch_size} (n_classes_per_batch x n_samples_per_class) does not split "
                         f"evenly over {n} replicas; choose P x K divisible by {n}")


def xla_supported(strategy) -> bool:
    """False for several replicas on CPU devices: XLA's CPU clusters cannot read a variable
    mirrored onto another logical CPU device (a TensorFlow limitation, not ours)."""
    if replicas(strategy) == 1:
        return True
    devices = getattr(strategy.extended, "worker_devices", ())
    return not any("CPU" in d.upper().rsplit("/", 1)[-1] for d in devices)


def distribute_global_batches(strategy, make_rows: Callable[[int, int], "object"], global_batch_size: int):
    """The dataset Keras should fit on.

    `make_rows(first, count)` returns a tf.data.Dataset whose elements are rows
    [first, first + count) of each global batch. One replica: that dataset with all rows.
    Several: a distributed dataset whose replica r receives the r-th consecutive slice.
    """
    n = replicas(strategy)
    if n == 1:
        return make_rows(0, global_batch_size)
    check_divisible(global_batch_size, strategy)
    per_replica = global_batch_size // n

    def dataset_fn(context):
        local = n // context.num_input_pipelines
        first = context.input_pipeline_id * local * per_replica
        ds = make_rows(first, local * per_replica)
        # Consecutive elements go to consecutive local replicas.
        return ds.unbatch().batch(per_replica, drop_remainder=True)

    return strategy.distribute_datasets_from_function(dataset_fn)
