"""Ensembles in the graph: several image embedding models run on one image, their embeddings combined.

`EnsembleCombine` is the Keras form of pipeline/vectors/ensemble.py (each member L2-normalised, weighted,
concatenated or averaged, re-normalised; float32 throughout), so an exported ensemble gives the vectors phase 2
evaluated. `build_ensemble_model` joins single-output member models (raw RGB pixels 0..255 in, embedding out)
into one model with one pixel input per distinct member image size, ordered by size: members that read the
same size share one input, so an image is decoded once per size, as phase 1 decoded it for each member.
"""
from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import ops

from models.layers import l2_normalize

COMBINES = ("concat", "mean")


@keras.saving.register_keras_serializable(package="embedlab")
class EnsembleCombine(keras.layers.Layer):
    """A list of member embeddings (batch, d_i) → the ensemble's unit embedding; `return_raw` also returns the
    combination before its final normalisation."""

    def __init__(self, combine: str = "concat", weights: Sequence[float] | None = None, return_raw: bool = False,
                 **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
        self.combine = combine
        self.member_weights = [float(w) for w in weights] if weights else None
        self.return_raw = return_raw

    def call(self, members):
        weights = self.member_weights or [1.0] * len(members)
        if len(weights) != len(members):
            raise ValueError(f"{len(weights)} weights for {len(members)} members")
        parts = [w * l2_normalize(ops.cast(m, "float32")) for m, w in zip(members, weights)]
        if self.combine == "concat":
            raw = ops.concatenate(parts, axis=-1)
        else:
            raw = parts[0]
            for part in parts[1:]:
                raw = raw + part
            raw = raw / float(sum(weights))
        unit = l2_normalize(raw)
        return (raw, unit) if self.return_raw else unit

    def compute_output_shape(self, input_shapes):
        dims = [shape[-1] for shape in input_shapes]
        dim = (None if None in dims else sum(dims)) if self.combine == "concat" else dims[0]
        shape = (input_shapes[0][0], dim)
        return (shape, shape) if self.return_raw else shape

    def get_config(self):
        return {**super().get_config(), "combine": self.combine, "weights": self.member_weights,
                "return_raw": self.return_raw}


def member_sizes(members: Sequence[keras.Model]) -> list[int]:
    """The square input size of every member (raw RGB pixels)."""
    sizes = []
    for model in members:
        shape = model.inputs[0].shape
        if len(shape) != 4 or shape[1] is None or shape[1] != shape[2] or shape[3] != 3:
            raise ValueError(f"member {model.name!r} takes {tuple(shape)}, not square RGB images")
        sizes.append(int(shape[1]))
    return sizes


def build_ensemble_model(members: Sequence[keras.Model], combine: str = "concat",
                         weights: Sequence[float] | None = None, name: str = "ensemble") -> keras.Model:
    """One model over single-output members: inputs = one pixel tensor per distinct member size (ascending),
    output = the ensemble's unit embedding. Each member is wrapped under its own name (`member_<i>`), so
    members that were saved under one name (two `embedding_model`s) can sit side by side."""
    sizes = member_sizes(members)
    inputs = {size: keras.Input((size, size, 3), name=f"pixels_{size}") for size in sorted(set(sizes))}
    outputs = []
    for i, (model, size) in enumerate(zip(members, sizes)):
        wrapped = keras.Model(model.inputs[0], model.outputs[0], name=f"member_{i}")
        outputs.append(wrapped(inputs[size]))
    unit = EnsembleCombine(combine, weights, name="combine")(outputs)
    ordered = [inputs[size] for size in sorted(inputs)]
    return keras.Model(ordered if len(ordered) > 1 else ordered[0], unit, name=name)
