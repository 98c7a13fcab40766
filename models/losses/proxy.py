"""Proxy losses: embeddings scored against learned class centres (a `CosineClassifier`), not each other."""
from __future__ import annotations

import math

import keras
from keras import ops

from models.losses.base import SQ_EPS, BatchLoss, as_embeddings, as_labels, check_positive


@keras.saving.register_keras_serializable(package="embedlab")
class ArcFaceLoss(BatchLoss):
    """Additive angular margin loss (ArcFace, Deng et al. 2019) on cosine logits.

    `y_pred` is the (B, n_classes) output of `CosineClassifier`, not embeddings, and
    labels must lie in [0, n_classes). The target-class cosine cos θ becomes
    cos(θ + margin), computed as cos θ·cos m - sin θ·sin m; where θ + m would pass π
    (cos θ <= cos(π - m)) the target would stop being monotone in θ, so it falls back
    to cos θ - m·sin m (the usual "th/mm" treatment). With `easy_margin`, the margin applies only where
    cos θ > 0. The loss is the mean over the batch of the cross-entropy of
    scale · logits.

    Its reference set is the classifier's class-centre matrix, already folded into the
    logits, so it takes no `ref_embeddings` (`accepts_reference = False`); a second
    tower or a teacher would be another classifier input, not a reference here.
    """

    registry_name = "arcface"
    requires_classifier = True
    accepts_reference = False

    @classmethod
    def training_metrics(cls) -> list:
        # The model's output is class cosines, not embeddings: triplet accuracy means nothing on it.
        return []

    def __init__(self, scale: float = 30.0, margin: float = 0.5, easy_margin: bool = False, **kwargs):
        super().__init__(**kwargs)
        check_positive(scale=scale)
        self.scale = float(scale)
        self.margin = float(margin)
        self.easy_margin = bool(easy_margin)

    def params(self):
        return {"scale": self.scale, "margin": self.margin, "easy_margin": self.easy_margin}

    def compute(self, embeddings, labels, ref_embeddings=None, ref_labels=None):
        """`embeddings` are the cosine logits (B, n_classes)."""
        if ref_embeddings is not None or ref_labels is not None:
            raise ValueError("arcface scores against its classifier's class centres and takes no reference "
                             "embeddings")
        labels = as_labels(labels)
        cos = ops.clip(as_embeddings(embeddings), -1.0, 1.0)
        is_target = ops.equal(ops.expand_dims(labels, 1), ops.expand_dims(ops.arange(ops.shape(cos)[1]), 0))
        # sqrt is clamped away from 0 so that cos = ±1 does not give an infinite slope.
        sin = ops.sqrt(ops.maximum(1.0 - ops.square(cos), SQ_EPS))
        shifted = cos * math.cos(self.margin) - sin * math.sin(self.margin)
        if self.easy_margin:
            shifted = ops.where(cos > 0.0, shifted, cos)
        else:
            threshold = math.cos(math.pi - self.margin)
            shifted = ops.where(cos > threshold, shifted, cos - math.sin(math.pi - self.margin) * self.margin)
        logits = self.scale * ops.where(is_target, shifted, cos)
        target_logit = ops.sum(ops.where(is_target, logits, 0.0), axis=1)
        return ops.mean(ops.logsumexp(logits, axis=1) - target_logit)
