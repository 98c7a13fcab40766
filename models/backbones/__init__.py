"""Public API of models.backbones: the registry, its keras.applications and CLIP backbones, and weights handling.

Importing it loads no Keras or TensorFlow; building an extractor does.
"""
from models.backbones.registry import (  # noqa: F401
    BACKBONES,
    BackboneSpec,
    FeatureExtractor,
    Param,
    TrunkBuilder,
    TextTowerBuilder,
    TokenTrunkBuilder,
    TrunkRequest,
    WeightsUnavailableError,
    build_feature_extractor,
    get_spec,
    parameter_help,
    register,
    seeded_initialisation,
)
from models.backbones.weights import (  # noqa: F401
    WeightsFile,
    cached_weights,
    keras_cache_dirs,
    load_weights_file,
    resolve_imagenet_weights,
)
from models.backbones.keras_apps import DEFAULT_BACKBONE, KerasApplication  # noqa: F401  (registers its specs)

from models.backbones.clip import KerasHubCLIP  # noqa: F401  (registers its specs)
from models.backbones.clip_text import CLIPTextEmbedder, TextEmbeddings  # noqa: F401
