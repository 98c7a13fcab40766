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
from pathlib import Path
from collections.abc import Callable, Sequence

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
        strategy = _multi_worker_strategy_class()()
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


def _multi_worker_strategy_class():
    import tensorflow as tf

    class MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
        """`reduce` as Keras's fit needs it (Keras 3.15, TensorFlow 2.21).

        Keras reduces the first (x, y) batch to learn its shapes, which the collective
        strategy refuses for a tuple (it takes one value); and it averages each scalar
        metric over the workers with axis=0, which a scalar has not. Here nested values
        are reduced leaf by leaf, and scalars across replicas only (axis=None).
        """

        def reduce(self, reduce_op, value, axis):
            parent = super()

            def reduce_leaf(leaf):
                sample = leaf.values[0] if isinstance(leaf, tf.distribute.DistributedValues) else leaf
                rank = getattr(getattr(sample, "shape", None), "rank", None)
                return parent.reduce(reduce_op, leaf, None if rank == 0 else axis)

            return tf.nest.map_structure(reduce_leaf, value)

    return MultiWorkerMirroredStrategy


def replicas(strategy) -> int:
    return int(strategy.num_replicas_in_sync)


def check_divisible(global_batch_size: int, strategy) -> None:
    n = replicas(strategy)
    if global_batch_size % n:
        raise ValueError(f"a batch of {global_batch_size} items (P classes x K samples, P capped at the number of "
                         f"usable classes) does not split evenly over {n} replicas; choose P x K divisible by {n}")


def xla_supported(strategy) -> bool:
    """XLA-compiled train steps on one replica only.

    On several CPU devices TensorFlow cannot compile them (an XLA CPU cluster cannot
    read a variable mirrored onto another device); on several GPUs jit_compile with
    MirroredStrategy has open TensorFlow/Keras reports of failures and is untested
    here, so it is not risked.
    """
    return replicas(strategy) == 1


def is_chief(strategy) -> bool:
    """True except on the non-chief workers of a multi-worker cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    return resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0
                                              and "chief" not in resolver.cluster_spec().as_dict())


def worker_output_dir(out: Path, strategy) -> Path:
    """Where this process writes a model's training files.

    Every worker of a cluster runs the same training; only the chief writes the real
    folder, the others a scratch folder of their own inside it (checkpoints and backups
    included, so that each can resume), which the chief's publication leaves alone.
    """
    if is_chief(strategy):
        return out
    resolver = strategy.cluster_resolver
    return out / f".{resolver.task_type}-{resolver.task_id}"


def agree_on_resume(strategy, done: bool, latest: int, before_latest: int,
                    fit_finished: bool = False) -> tuple[bool, int, bool]:
    """One decision for every worker of a cluster: (training already done, epoch to resume
    after (0 = fresh), whether that fit had already ended).

    Each worker passes what its own folder holds: whether its training is published, the
    latest committed backup epoch and the one before it (0 = none; pipeline/checkpoints.py
    keeps two), and whether the backed-up fit had ended. Outside a multi-worker cluster the local
    view is the decision. Inside one,
    a worker that disagrees would skip a different number of batches, run a different
    number of steps and hang the collectives, so the views are all-gathered first.
    """
    if not _is_multi_worker(strategy):
        return done, latest, bool(fit_finished and latest)
    import numpy as np
    import tensorflow as tf

    mine = tf.constant([[int(done), int(latest), int(before_latest), int(fit_finished), int(is_chief(strategy))]],
                       tf.int64)
    per_replica = strategy.experimental_distribute_values_from_function(lambda context: mine)
    views = np.asarray(strategy.gather(per_replica, axis=0)).tolist()
    decision = agreed_resume(views)
    if decision[:2] != (done, latest):
        log.warning("phase 3: the workers' saved states differ (%s as [done, latest, before latest, fit "
                    "finished, chief]); all %s",
                    views, f"resume after epoch {decision[1]}" if decision[1] else "start from the beginning")
    return decision


def agreed_resume(views: Sequence[Sequence[int]]) -> tuple[bool, int, bool]:
    """The decision of `agree_on_resume` from every worker's [done, latest, before_latest, fit_finished, chief]."""
    if any(view[0] and view[4] for view in views):
        return True, 0, False   # the chief published: the other workers' folders are only scratch
    if any(view[0] for view in views):
        return False, 0, False   # a worker that published kept no backup: nobody can resume in step with it
    epoch = min(view[1] for view in views)
    if epoch and all(epoch in (view[1], view[2]) for view in views):
        # The fit counts as ended only if it ended at that epoch everywhere.
        finished = all(view[1] == epoch and view[3] for view in views)
        return False, epoch, finished
    return False, 0, False


def _is_multi_worker(strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return False
    cluster = resolver.cluster_spec().as_dict()
    return sum(len(tasks) for job, tasks in cluster.items() if job in ("chief", "worker")) > 1


def distribute_global_batches(strategy, make_rows: Callable[[int, int], object], global_batch_size: int):
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
