"""Small serialisable layers shared by feature extractors, heads and exported models."""
from __future__ import annotations

import keras
from keras import ops

# Per-channel means of the Caffe-trained ImageNet models (BGR order), as used by
# keras.applications' "caffe" preprocessing (ResNet50).
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
# OpenAI CLIP's per-channel (RGB) mean and std of pixels scaled to [0, 1].
CLIP_RGB_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_RGB_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESS_MODES = ("caffe", "tf", "none", "clip")


@keras.saving.register_keras_serializable(package="embedlab")
class ImagePreprocess(keras.layers.Layer):
    """Map raw RGB pixels in [0, 255] to what a backbone was trained on.

    Lives inside the model so that an exported model takes raw images and callers
    can never pair a backbone with the wrong preprocessing.
    """

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESS_MODES:
            raise ValueError(f"unknown preprocessing mode {mode!r}; expected one of {PREPROCESS_MODES}")
        self.mode = mode

    def call(self, images):
        images = ops.cast(images, self.compute_dtype)
        if self.mode == "tf":
            return images / 127.5 - 1.0
        if self.mode == "caffe":
            bgr = ops.flip(images, axis=-1)
            return bgr - ops.convert_to_tensor(_CAFFE_BGR_MEAN, dtype=self.compute_dtype)
        if self.mode == "clip":
            mean = ops.convert_to_tensor(CLIP_RGB_MEAN, dtype=self.compute_dtype)
            std = ops.convert_to_tensor(CLIP_RGB_STD, dtype=self.compute_dtype)
            return (images / 255.0 - mean) / std
        return images

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def l2_normalize(x, epsilon: float = 1e-12):
    """Rows scaled to unit L2 norm, zero rows staying zero (no NaN in value or gradient): the one
    tensor normaliser of the models (the L2Normalize layer and the losses use it)."""
    # Divide out the overall scale first: randomly initialised backbones emit
    # features of norm ~1e-16, whose squares an epsilon would swamp.
    scale = ops.max(ops.abs(x), axis=-1, keepdims=True)
    x = x / ops.maximum(scale, 1e-30)
    squared = ops.sum(ops.square(x), axis=-1, keepdims=True)
    return x * ops.rsqrt(ops.maximum(squared, epsilon))


@keras.saving.register_keras_serializable(package="embedlab")
class L2Normalize(keras.layers.Layer):
    """Scale each row to unit L2 norm (zero rows stay zero); always computed in float32."""

    def __init__(self, epsilon: float = 1e-12, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def call(self, x):
        return l2_normalize(ops.cast(x, "float32"), self.epsilon)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}
