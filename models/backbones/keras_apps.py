"""The keras.applications backbones: ResNet50, EfficientNet-B0 … B7 and MobileNet (v1).

Each is a `KerasApplication` trunk (the constructor with `include_top=False, weights=None`)
plus the `_notop` weights file Keras publishes for it. Adding another keras.applications
network is one `register(...)` call here.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from models.backbones.registry import BackboneSpec, Param, TrunkRequest, register
from models.backbones.weights import (WeightsFile, WeightsUnavailableError, cached_weights, load_weights_file,
                                      resolve_imagenet_weights)

# The backbone a configuration gets when it names none: small enough for a CPU.
DEFAULT_BACKBONE = "mobilenet"


@dataclass(frozen=True)
class KerasApplication:
    """A trunk from a keras.applications constructor; its options are the constructor's keyword arguments."""

    constructor: str                                  # e.g. "ResNet50": keras.applications.ResNet50
    weights_file: Callable[[Mapping[str, Any]], WeightsFile]  # resolved params -> the published weights

    def random(self, request: TrunkRequest):
        import keras

        build = getattr(keras.applications, self.constructor)
        return build(include_top=False, weights=None, input_shape=request.input_shape, **request.params)

    def pretrained(self, request: TrunkRequest):
        path = resolve_imagenet_weights(self.weights_file(request.params), request.backbone)
        trunk = self.random(request)
        load_weights_file(trunk, path, request.backbone)
        return trunk

    def finetune_units(self, trunk) -> list:
        """A keras.applications model is one flat graph: its layers, input to output, are the units."""
        return list(trunk.layers)

    def pretrained_cached(self, params: Mapping[str, Any]) -> bool:
        try:
            return cached_weights(self.weights_file(params)) is not None
        except WeightsUnavailableError:
            return False

    def check(self, params: Mapping[str, Any], pretrained: bool) -> None:
        if pretrained:
            try:
                self.weights_file(params)
            except WeightsUnavailableError as exc:
                raise ValueError(str(exc)) from None


# Before backbones had their own params, every backbone's config carried MobileNet's `alpha`
# (at 1.0, without effect); the other backbones accept it and keep it in their fingerprints.
_LEGACY_ALPHA = {"alpha": 1.0}

_RESNET_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
_EFFICIENTNET_URL = "https://storage.googleapis.com/keras-applications/"
_MOBILENET_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet/"

_RESNET50_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
register(BackboneSpec(
    name="resnet50", native_size=224, preprocess="caffe",
    trunk=KerasApplication("ResNet50", lambda params: WeightsFile(
        _RESNET50_FILE, _RESNET_URL + _RESNET50_FILE, "4d473c1dd8becc155b73f8504c6f6626")),
    legacy_keys=_LEGACY_ALPHA,
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
    weights = WeightsFile(f"efficientnetb{variant}_notop.h5", f"{_EFFICIENTNET_URL}efficientnetb{variant}_notop.h5",
                          md5)
    # EfficientNet rescales and normalises inside the Keras model: it takes raw [0, 255].
    return BackboneSpec(
        name=f"efficientnetb{variant}", native_size=size, preprocess="none",
        trunk=KerasApplication(f"EfficientNetB{variant}", lambda params: weights),
        legacy_keys=_LEGACY_ALPHA,
        description=f"EfficientNet-B{variant} (Tan & Le 2019) at {size} px",
    )


for _variant, (_size, _md5) in _EFFICIENTNET.items():
    register(_efficientnet_spec(_variant, _size, _md5))


def _mobilenet_weights(params: Mapping[str, Any]) -> WeightsFile:
    alpha = params["alpha"]
    alpha_text = {0.25: "2_5", 0.5: "5_0", 0.75: "7_5", 1.0: "1_0"}.get(float(alpha))
    if alpha_text is None:
        raise WeightsUnavailableError(f"MobileNet ImageNet weights exist only for alpha 0.25/0.5/0.75/1.0, not {alpha} "
                                      f"(other widths run with --weights none)")
    # Without the top, MobileNet's weights do not depend on the input size, so the
    # 224-px file serves every resolution (Keras would look for a per-size file).
    fname = f"mobilenet_{alpha_text}_224_tf_no_top.h5"
    return WeightsFile(fname, _MOBILENET_URL + fname)


register(BackboneSpec(
    name="mobilenet", native_size=224, preprocess="tf",
    trunk=KerasApplication("MobileNet", _mobilenet_weights),
    params={"alpha": Param(1.0, help="MobileNet width multiplier (ImageNet weights: 0.25, 0.5, 0.75, 1.0)",
                           tag_label="a")},
    description="MobileNet v1 (Howard et al. 2017), width multiplier alpha",
))
