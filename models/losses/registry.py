"""The loss registry: name -> class. A loss class says what it needs through class attributes
(`requires_classifier`, `accepts_reference`, `training_metrics()`; see models/losses/base.py), so
callers look a loss up here and never special-case one by name. Adding a loss: write its class in a
family module and add one line to `ENTRIES` below; the shared tests (reference, XLA, serialisation,
two replicas) then run over it and ask for its numpy reference.

The entries name their family module and class as text, so that the names can be listed and a
configuration checked without importing Keras (and so TensorFlow): a mistyped loss is reported in a
fraction of a second. A class is imported the first time it is looked up.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from importlib import import_module

# name -> (family module under models/losses/, class name)
ENTRIES: dict[str, tuple[str, str]] = {
    "triplet": ("pair", "TripletLoss"),
    "contrastive": ("pair", "ContrastiveLoss"),
    "contrastive_softmax": ("pair", "ContrastiveSoftmaxLoss"),
    "arcface": ("proxy", "ArcFaceLoss"),
    "multisimilarity": ("pair", "MultiSimilarityLoss"),
    "supcon": ("softmax", "SupConLoss"),
    "infonce": ("softmax", "InfoNCELoss"),
    "multimodal_contrastive": ("multimodal", "MultimodalContrastiveLoss"),
}
LOSS_NAMES: tuple[str, ...] = tuple(ENTRIES)


class LossRegistry(Mapping):
    """A read-only mapping name -> loss class that imports each family module when first asked."""

    def __getitem__(self, name: str) -> type:
        module, class_name = ENTRIES[name]
        return getattr(import_module(f"models.losses.{module}"), class_name)

    def __iter__(self) -> Iterator[str]:
        return iter(ENTRIES)

    def __len__(self) -> int:
        return len(ENTRIES)


LOSSES = LossRegistry()


def get_loss(name: str, **params):
    """A loss instance (a keras.losses.Loss) from its registry name; `params` go to its constructor."""
    if name not in ENTRIES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(ENTRIES))}")
    return LOSSES[name](**params)
