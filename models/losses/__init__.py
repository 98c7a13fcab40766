"""Public API of models.losses."""
from models.losses.registry import (  # noqa: F401
    DISTANCES,
    LOSSES,
    TRIPLET_MININGS,
    TripletLoss,
    ContrastiveLoss,
    ContrastiveSoftmaxLoss,
    ArcFaceLoss,
    MultiSimilarityLoss,
    SupConLoss,
    InfoNCELoss,
    get_loss,
    triplet_accuracy,
)
