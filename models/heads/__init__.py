"""Public API of models.heads: the projection head, the TransformerProjection head, image-text fusion."""
from models.heads.projection import (  # noqa: F401
    BATCHNORM_MOMENTUM,
    build_embedding_head,
)
from models.heads.transformer_projection import (  # noqa: F401
    POOLINGS,
    TokenScale,
    TransformerEncoderBlock,
    TransformerProjection,
    build_transformer_head,
)
from models.heads.fusion import (  # noqa: F401
    FUSIONS,
    TEXT_INPUT,
    TEXT_UNITS,
    ImageTextFusion,
    build_fused_head,
    image_head_of,
    text_present,
)
