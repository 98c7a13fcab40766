"""Public API of models.heads."""
from models.heads.projection import (  # noqa: F401
    BATCHNORM_MOMENTUM,
    build_embedding_head,
)
