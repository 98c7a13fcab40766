"""Public API of models.losses: the registry, every loss class, the loss contract and the triplet metric.

Modules: base (the contract `BatchLoss.compute(embeddings, labels, ref_embeddings, ref_labels)`
and the shared pair algebra), pair (triplet, contrastive, contrastive-softmax,
multi-similarity), softmax (SupCon, InfoNCE), proxy (ArcFace), multimodal (images and texts:
SiameseCLIP's multimodal contrastive loss), distill (a student's embeddings against a teacher's: matching,
relational KD, optional label loss; trained by `mode: distill`, not listed in the registry of metric-learning
losses), registry (LOSSES, get_loss).

Names are resolved on first use (PEP 562), so `models.losses.registry.LOSS_NAMES` can be read
without importing Keras.
"""
from importlib import import_module

_WHERE = {
    "DISTANCES": "base", "BatchLoss": "base", "TemperatureLoss": "base", "triplet_accuracy": "base",
    "TRIPLET_MININGS": "pair", "ContrastiveLoss": "pair", "ContrastiveSoftmaxLoss": "pair",
    "MultiSimilarityLoss": "pair", "TripletLoss": "pair",
    "ArcFaceLoss": "proxy",
    "InfoNCELoss": "softmax", "SupConLoss": "softmax",
    "MultimodalContrastiveLoss": "multimodal",
    "DistillationLoss": "distill",
    "LOSSES": "registry", "LOSS_NAMES": "registry", "get_loss": "registry",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'models.losses' has no attribute {name!r}")
    return getattr(import_module(f"models.losses.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return __all__
