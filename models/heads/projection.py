"""Embedding heads trained on top of frozen backbone features (phase 3, "head" mode)."""
from __future__ import annotations

import keras

from models.layers import L2Normalize

# Keras's default of 0.99 needs a few hundred steps before the moving statistics
# describe the data; head training on a small dataset has only a handful of steps
# per epoch, and validation (which uses the moving statistics) would score a stale
# normalisation for many epochs.
BATCHNORM_MOMENTUM = 0.9


def build_embedding_head(input_dim: int, embedding_dim: int = 512, name: str = "embedding_head",
                         synchronized_bn: bool = False) -> keras.Model:
    """Features (batch, input_dim) -> unit vectors (batch, embedding_dim), float32 under any policy.

    `synchronized_bn`: under tf.distribute with several replicas, batch statistics of the
    global batch, as on one device (the losses see the global batch too).
    """
    if input_dim < 1 or embedding_dim < 1:
        raise ValueError(f"input_dim and embedding_dim must be positive, got {input_dim} and {embedding_dim}")
    inputs = keras.Input(shape=(input_dim,), name="features")
    # No bias: the batch normalisation right after subtracts the mean and adds its own offset.
    x = keras.layers.Dense(embedding_dim, use_bias=False, name="projection")(inputs)
    x = keras.layers.BatchNormalization(momentum=BATCHNORM_MOMENTUM, synchronized=synchronized_bn,
                                        name="batch_norm")(x)
    # L2Normalize computes in float32 whatever the global policy, so the unit
    # vectors (and the cosine similarities of every loss) never round in float16.
    outputs = L2Normalize(name="l2_normalize")(x)
    return keras.Model(inputs, outputs, name=name)
