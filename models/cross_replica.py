"""Batch losses over the global batch when training runs on several replicas.

Under tf.distribute each replica sees only its slice of the batch. A pair or
triplet loss computed on that slice would take its negatives from 1/N of the batch,
and its value would depend on the number of devices. `gather_global_batch` hands a
loss the whole batch instead: labels and embeddings (and, for a query-vs-reference
loss, the references and their labels) are all-gathered, so every replica computes
the same global-batch loss.

Gradients: `all_gather`'s gradient all-reduces (sums) the upstream gradient and
slices out the replica's own rows, so each replica's local embeddings receive N
times dL/d(own rows). Keras sums the replicas' parameter gradients and, for scalar
losses, does not divide by N itself (its 1/N scaling lives in the reduction of
per-sample losses, which a scalar skips). The loss is therefore returned multiplied
by 1/N: the summed gradient is then exactly that of one device on the global batch,
and the logged loss (which Keras multiplies back by N) is the global-batch loss.
"""
from __future__ import annotations

import keras


def replica_context_size() -> int:
    """Replicas in sync when called inside a replica context of a multi-replica strategy, else 1."""
    if keras.backend.backend() != "tensorflow":
        return 1
    import tensorflow as tf

    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return 1
    context = tf.distribute.get_replica_context()
    return 1 if context is None else int(context.num_replicas_in_sync)


def gather_global_batch(*tensors):
    """(tensors concatenated over replicas along axis 0, loss scale 1/N); (tensors, 1.0) on one replica.

    A None (no reference embeddings, say) passes through as None.
    """
    n_replicas = replica_context_size()
    if n_replicas == 1:
        return tensors, 1.0
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    return tuple(None if t is None else context.all_gather(t, axis=0) for t in tensors), 1.0 / n_replicas
