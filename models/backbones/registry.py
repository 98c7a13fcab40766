"""Backbone registry: a name → how to build it, its native input size, its preprocessing
and where its pretrained weights come from.

Adding a backbone is one `register(...)` call. Every feature extractor has the same
shape: raw RGB pixels in [0, 255] → `ImagePreprocess` → trunk → global average
pooling ("pooled", the raw features) → `L2Normalize` ("embedding", unit vectors).
A non-convolutional trunk (e.g. a CLIP vision encoder from keras-hub) registers a
builder that returns pooled vectors directly; pooling is then skipped.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras

from models.layers import ImagePreprocess, L2Normalize

log = logging.getLogger("embedlab.backbones")


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but neither the Keras cache nor a download has them."""


@dataclass(frozen=True)
class WeightsFile:
    fname: str
    url: str
    file_hash: str | None = None


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    native_size: int
    preprocess: str                                  # an ImagePreprocess mode
    build: Callable[..., keras.Model]                # (input_shape, alpha) -> trunk without weights
    imagenet_weights: Callable[[float], WeightsFile]  # alpha -> the Keras weights file
    description: str = ""


BACKBONES: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    BACKBONES[spec.name] = spec
    return spec


def get_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}") from None


# --------------------------------------------------------------------------- registry

_RESNET_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
_EFFICIENTNET_URL = "https://storage.googleapis.com/keras-applications/"
_MOBILENET_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet/"

register(BackboneSpec(
    name="resnet50", native_size=224, preprocess="caffe",
    build=lambda input_shape, alpha: keras.applications.ResNet50(
        include_top=False, weights=None, input_shape=input_shape),
    imagenet_weights=lambda alpha: WeightsFile(
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _RESNET_URL + "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "4d473c1dd8becc155b73f8504c6f6626"),
    description="ResNet50 (He et al. 2016), 2048-d",
))

# Native resolutions and the md5 of each `_notop` file, as keras.applications uses them.
_EFFICIENTNET = {
    0: (224, "50bc09e76180e00e4465e1a485ddc09d"), 1: (240, "74c4e6b3e1f6a1eea24c589628592432"),
    2: (260, "111f8e2ac8aa800a7a99e3239f7bfb39"), 3: (300, "af6d107764bb5b1abb91932881670226"),
    4: (380, "ebc24e6d6c33eaebbd558eafbeedf1ba"), 5: (456, "38879255a25d3c92d5e44e04ae6cec6f"),
    6: (528, "9ecce42647a20130c1f39a5d4cb75743"), 7: (600, "cbcfe4450ddf6f3ad90b1b398090fe4a"),
}


def _efficientnet_spec(variant: int, size: int, md5: str) -> BackboneSpec:
    constructor = getattr(keras.applications, f"EfficientNetB{variant}")
    fname = f"efficientnetb{variant}_notop.h5"
    # EfficientNet rescales and normalises inside the Keras model: it takes raw [0, 255].
    return BackboneSpec(
        name=f"efficientnetb{variant}", native_size=size, preprocess="none",
        build=lambda input_shape, alpha: constructor(include_top=False, weights=None, input_shape=input_shape),
        imagenet_weights=lambda alpha: WeightsFile(fname, _EFFICIENTNET_URL + fname, md5),
        description=f"EfficientNet-B{variant} (Tan & Le 2019) at {size} px",
    )


for _variant, (_size, _md5) in _EFFICIENTNET.items():
    register(_efficientnet_spec(_variant, _size, _md5))


def _mobilenet_weights(alpha: float) -> WeightsFile:
    alpha_text = {0.25: "2_5", 0.5: "5_0", 0.75: "7_5", 1.0: "1_0"}.get(float(alpha))
    if alpha_text is None:
        raise WeightsUnavailableError(f"MobileNet ImageNet weights exist only for alpha 0.25/0.5/0.75/1.0, not {alpha}")
    # Without the top, MobileNet's weights do not depend on the input size, so the
    # 224-px file serves every resolution (Keras would look for a per-size file).
    fname = f"mobilenet_{alpha_text}_224_tf_no_top.h5"
    return WeightsFile(fname, _MOBILENET_URL + fname)


register(BackboneSpec(
    name="mobilenet", native_size=224, preprocess="tf",
    build=lambda input_shape, alpha: keras.applications.MobileNet(
        include_top=False, weights=None, input_shape=input_shape, alpha=alpha),
    imagenet_weights=_mobilenet_weights,
    description="MobileNet v1 (Howard et al. 2017), width multiplier alpha",
))


# --------------------------------------------------------------------------- weights


def keras_cache_dirs() -> list[Path]:
    """Where Keras's own `get_file` looks for cached weights, in its order."""
    home = Path(os.path.expanduser(keras.config.keras_home() if hasattr(keras.config, "keras_home")
                                   else os.environ.get("KERAS_HOME", "~/.keras")))
    return [home / "models", Path("/tmp/.keras/models")]


def resolve_imagenet_weights(spec: BackboneSpec, alpha: float) -> Path:
    """The local path of a backbone's ImageNet weights: the Keras cache, else a download."""
    wf = spec.imagenet_weights(alpha)
    for folder in keras_cache_dirs():
        if (folder / wf.fname).is_file():
            return folder / wf.fname
    try:
        return Path(keras.utils.get_file(wf.fname, wf.url, cache_subdir="models", file_hash=wf.file_hash))
    except Exception as exc:  # network down, 404, hash mismatch: all mean "not available"
        expected = keras_cache_dirs()[0] / wf.fname
        raise WeightsUnavailableError(
            f"ImageNet weights for backbone {spec.name!r} are not available: {wf.fname} is not in the Keras "
            f"cache ({expected}) and downloading {wf.url} failed ({type(exc).__name__}: {str(exc)[:160]}). "
            f"Put the file at {expected} (or set KERAS_HOME to a folder whose models/ holds it), "
            f"or run with --weights none."
        ) from exc


# --------------------------------------------------------------------------- extractor


@dataclass
class FeatureExtractor:
    model: keras.Model        # images [0, 255] -> {"pooled": raw features, "embedding": unit vectors}
    name: str
    image_size: int
    dim: int
    weights_loaded: str       # what the weights really are: "imagenet", "random", "random (…)", a path


def build_feature_extractor(name: str, *, weights: str = "imagenet", image_size: int = 0,
                            alpha: float = 1.0, weights_fallback: str = "error") -> FeatureExtractor:
    spec = get_spec(name)
    size = image_size or spec.native_size
    input_shape = (size, size, 3)
    trunk = spec.build(input_shape, alpha)

    weights_loaded = "random"
    if weights == "imagenet":
        try:
            path = resolve_imagenet_weights(spec, alpha)
            trunk.load_weights(str(path))
            weights_loaded = "imagenet"
        except WeightsUnavailableError as exc:
            if weights_fallback != "random":
                raise
            log.warning("ImageNet weights unavailable for %s, running from a RANDOM initialisation: %s", name, exc)
            weights_loaded = "random (imagenet weights unavailable)"
    elif weights not in ("none", "", None):
        path = Path(weights)
        if not path.is_file():
            raise WeightsUnavailableError(f"weights file not found: {path}")
        trunk.load_weights(str(path))
        weights_loaded = str(path)

    images = keras.Input(shape=input_shape, name="images")
    x = ImagePreprocess(spec.preprocess, name="preprocess")(images)
    x = trunk(x, training=False)
    if len(x.shape) == 4:
        x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    pooled = keras.layers.Activation("linear", dtype="float32", name="pooled")(x)
    embedding = L2Normalize(name="embedding")(pooled)
    model = keras.Model(images, {"pooled": pooled, "embedding": embedding}, name=f"{name}_extractor")
    return FeatureExtractor(model=model, name=name, image_size=size, dim=int(pooled.shape[-1]),
                            weights_loaded=weights_loaded)
