"""Image-text fusion: an item's image embedding combined with its text embedding (SiameseCLIP's `use_text`).

The text side is a phase-1 text embedding (CLIP's text tower, unit rows; an all-zero row = the item has no
text), projected into the head's space by `text_projection` (Dense without bias -> L2 normalisation, so a
missing text stays an all-zero row). `ImageTextFusion` then combines the two unit vectors per row:

    "average"   image + text (the mean of two unit vectors, up to scale; renormalised after)
    "concat"    Dense(E)([image, text])
    "gate"      g · image + (1 - g) · text with g = sigmoid(Dense(E)([image, text])), per dimension

and a row without text falls back to its image embedding, unchanged. The result is L2-normalised after
the layer (`L2Normalize`), so phase 4 reads the fused vector before normalisation as its "raw" features.
"""
from __future__ import annotations

import keras
from keras import ops

from models.layers import L2Normalize

FUSIONS = ("average", "concat", "gate")
# Names of the fused model's extra input and of the layer that holds the projected texts (the references a
# multimodal loss compares the items with: pipeline/training/objectives.py).
TEXT_INPUT = "text"
TEXT_UNITS = "text_units"


def text_present(text):
    """(batch,) bool: rows that hold a text (not all zeros)."""
    return ops.any(ops.not_equal(text, 0.0), axis=-1)


@keras.saving.register_keras_serializable(package="embedlab")
class ImageTextFusion(keras.layers.Layer):
    """(image (batch, E), text (batch, E)) -> fused (batch, E), not normalised; rows without text = image."""

    def __init__(self, mode: str = "average", **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if mode not in FUSIONS:
            raise ValueError(f"unknown fusion {mode!r}; expected one of {FUSIONS}")
        self.mode = mode

    def build(self, image_shape, text_shape=None):
        width = int(image_shape[-1])
        if text_shape is not None and int(text_shape[-1]) != width:
            raise ValueError(f"image ({width}-d) and text ({int(text_shape[-1])}-d) embeddings must have one width")
        self.mix = None
        if self.mode in ("concat", "gate"):
            self.mix = keras.layers.Dense(width, dtype=self.dtype_policy, name=self.mode)
            self.mix.build((None, 2 * width))
        super().build(image_shape)

    def call(self, image, text):
        image, text = ops.cast(image, self.compute_dtype), ops.cast(text, self.compute_dtype)
        if self.mode == "average":
            fused = image + text
        elif self.mode == "concat":
            fused = self.mix(ops.concatenate([image, text], axis=-1))
        else:
            gate = ops.sigmoid(self.mix(ops.concatenate([image, text], axis=-1)))
            fused = gate * image + (1.0 - gate) * text
        return ops.where(ops.expand_dims(text_present(text), -1), fused, image)

    def compute_output_shape(self, image_shape, text_shape=None):
        return image_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def build_fused_head(image_head: keras.Model, text_dim: int, fusion: str = "average",
                     name: str = "fused_head") -> keras.Model:
    """`image_head`'s inputs plus a text (batch, text_dim) -> fused unit vectors (batch, E).

    The image head (any model ending in unit vectors) is one nested layer; texts go through a
    `text_projection` (Dense, no bias) and an L2 normalisation to the layer `TEXT_UNITS` (all-zero rows
    for missing texts). Input names: the image head's, then `TEXT_INPUT`.
    """
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; expected one of {FUSIONS}")
    image_inputs = [keras.Input(shape=t.shape[1:], dtype=t.dtype, name=t.name.split(":")[0])
                    for t in image_head.inputs]
    text = keras.Input(shape=(text_dim,), name=TEXT_INPUT)
    image = image_head(image_inputs if len(image_inputs) > 1 else image_inputs[0])
    width = int(image.shape[-1])
    projected = keras.layers.Dense(width, use_bias=False, name="text_projection")(text)
    # L2Normalize keeps an all-zero row at zero: a missing text stays missing.
    text_units = L2Normalize(name=TEXT_UNITS)(projected)
    fused = ImageTextFusion(fusion, name="fusion")(image, text_units)
    outputs = L2Normalize(name="l2_normalize")(fused)
    return keras.Model([*image_inputs, text], outputs, name=name)


def image_head_of(model: keras.Model) -> keras.Model:
    """The image side of a fused head (the nested image head: what a text-less item is embedded with), or
    `model` itself when it fuses nothing."""
    if not any(isinstance(layer, ImageTextFusion) for layer in model.layers):
        return model
    return next(layer for layer in model.layers if isinstance(layer, keras.Model))
