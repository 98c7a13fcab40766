"""Public API of models.backbones."""
from models.backbones.registry import (  # noqa: F401
    WeightsUnavailableError,
    BACKBONES,
    WeightsFile,
    BackboneSpec,
    register,
    get_spec,
    keras_cache_dirs,
    resolve_imagenet_weights,
    FeatureExtractor,
    build_feature_extractor,
)
