"""Cosine classifier head that produces the logits ArcFace-style losses expect."""
from __future__ import annotations

import keras
from keras import ops

from models.layers import L2Normalize


@keras.saving.register_keras_serializable(package="embedlab")
class CosineClassifier(keras.layers.Layer):
    """Cosine similarity between each embedding and learnable class centres.

    Input (B, d) → output (B, n_classes) float32 in [-1, 1]. Both the inputs and the
    centres are L2-normalised, so the output depends on directions only and a margin
    loss (ArcFace) can act on angles.

    With `sub_centers` K > 1 (sub-center ArcFace, Deng et al. 2020) each class owns K
    centres and scores the best of them, so a noisy or multi-modal class need not be
    pulled onto a single direction. Column c·K + k of `centers` (shape (d, n_classes·K))
    is sub-centre k of class c.

    Always computed in float32 (like L2Normalize): the logits are later multiplied by
    a scale of ~30, which would expose float16 rounding of the cosines.
    """

    def __init__(self, n_classes: int, sub_centers: int = 1, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if int(n_classes) < 1 or int(sub_centers) < 1:
            raise ValueError(f"n_classes and sub_centers must be >= 1, got {n_classes!r}, {sub_centers!r}")
        self.n_classes = int(n_classes)
        self.sub_centers = int(sub_centers)
        self._normalize = L2Normalize()

    def build(self, input_shape):
        dim = input_shape[-1]
        if dim is None:
            raise ValueError("CosineClassifier needs a known embedding dimension")
        self.centers = self.add_weight(
            name="centers",
            shape=(int(dim), self.n_classes * self.sub_centers),
            initializer="glorot_uniform",
            dtype="float32",
        )

    def call(self, inputs):
        x = self._normalize(ops.cast(inputs, "float32"))
        centers = ops.transpose(self._normalize(ops.transpose(self.centers)))
        cosine = ops.matmul(x, centers)
        if self.sub_centers > 1:
            cosine = ops.reshape(cosine, (-1, self.n_classes, self.sub_centers))
            cosine = ops.max(cosine, axis=-1)
        return cosine

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.n_classes)

    def get_config(self):
        return {**super().get_config(), "n_classes": self.n_classes, "sub_centers": self.sub_centers}
