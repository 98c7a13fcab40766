"""Knowledge distillation of an embedding space: a student learns to reproduce a teacher's embeddings.

    loss = match_weight · match(projected student, teacher)
         + relational_weight · RKD-distance(student, teacher)
         + label_weight · metric-learning loss(student, labels)        (optional)

* match: "cosine", the mean of 1 − cos(s_i, t_i), or "mse", the mean over elements of (s_i − t_i)². The
  student's embedding goes through a learnable projection first when its width differs from the teacher's
  (the trainer's `projected` output; the projection is not part of the saved student).
* RKD-distance (Park et al., "Relational Knowledge Distillation", CVPR 2019, distance-wise term): within the
  batch, the pairwise euclidean distances of the student's own embeddings and of the teacher's, each divided by
  its mean over the batch's pairs (so the two spaces' scales need not agree), compared with the Huber loss
  (δ = 1, Park's smooth-L1) and averaged over the ordered pairs i ≠ j. On unit vectors a distance is
  √(2 − 2 cos), so this matches the batch's pairwise cosine structure.
* the label term is any registered metric-learning loss (`label_loss`, with `label_loss_params`).

Keras's (y_true, y_pred): y_true {"labels" (B,), "teacher" (B, Dt)} or one (B, 1 + Dt) tensor of rows
[label, teacher embedding], y_pred {"embeddings" (B, Ds) and, when
the widths differ, "projected" (B, Dt)}. `terms` gives each term (for tests and logs); the numpy references
are in tests/models/test_losses.py. Float32 inside. One replica: the batch is the replica's batch.
"""
from __future__ import annotations

import keras
from keras import ops

from models.losses.base import SQ_EPS, as_labels

MATCHES = ("cosine", "mse")
HUBER_DELTA = 1.0


def match_term(student, teacher, kind: str = "cosine"):
    """Mean embedding-matching loss between rows of `student` and `teacher` (same width)."""
    student, teacher = ops.cast(student, "float32"), ops.cast(teacher, "float32")
    if kind == "cosine":
        s = student / ops.sqrt(ops.maximum(ops.sum(ops.square(student), axis=-1, keepdims=True), SQ_EPS))
        t = teacher / ops.sqrt(ops.maximum(ops.sum(ops.square(teacher), axis=-1, keepdims=True), SQ_EPS))
        return ops.mean(1.0 - ops.sum(s * t, axis=-1))
    if kind == "mse":
        return ops.mean(ops.square(student - teacher))
    raise ValueError(f"unknown match {kind!r}; expected one of {MATCHES}")


def _normalised_distances(x):
    """(B, B) euclidean distances of the rows of `x` divided by their mean over pairs i ≠ j, and the pair mask."""
    x = ops.cast(x, "float32")
    squared = ops.sum(ops.square(x), axis=-1)
    d2 = ops.maximum(ops.expand_dims(squared, 1) + ops.expand_dims(squared, 0) - 2.0 * ops.matmul(x, ops.transpose(x)),
                     0.0)
    n = ops.shape(x)[0]
    off_diagonal = 1.0 - ops.eye(n, dtype="float32")
    # sqrt has an infinite slope at 0: the diagonal and duplicate rows bypass it.
    distance = ops.where(d2 > SQ_EPS, ops.sqrt(ops.maximum(d2, SQ_EPS)), 0.0) * off_diagonal
    n_pairs = ops.maximum(ops.sum(off_diagonal), 1.0)
    mean = ops.sum(distance) / n_pairs
    return distance / ops.maximum(mean, 1e-12), off_diagonal, n_pairs


def relational_term(student, teacher):
    """RKD distance-wise loss: Huber between the mean-normalised pairwise distances of student and teacher."""
    ds, mask, n_pairs = _normalised_distances(student)
    dt, _, _ = _normalised_distances(teacher)
    diff = ops.abs(ds - dt)
    huber = ops.where(diff < HUBER_DELTA, 0.5 * ops.square(diff) / HUBER_DELTA, diff - 0.5 * HUBER_DELTA)
    return ops.sum(huber * mask) / n_pairs


@keras.saving.register_keras_serializable(package="embedlab")
class DistillationLoss(keras.losses.Loss):
    """match_weight · match + relational_weight · RKD-distance + label_weight · label loss (see the module)."""

    def __init__(self, match: str = "cosine", match_weight: float = 1.0, relational_weight: float = 1.0,
                 label_loss: str = "", label_loss_params: dict | None = None, label_weight: float = 1.0,
                 name: str = "distillation", reduction="sum_over_batch_size", **kwargs):
        super().__init__(name=name, reduction=reduction, **kwargs)
        if match not in MATCHES:
            raise ValueError(f"unknown match {match!r}; expected one of {MATCHES}")
        for key, value in (("match_weight", match_weight), ("relational_weight", relational_weight),
                           ("label_weight", label_weight)):
            if not value >= 0:
                raise ValueError(f"{key} must be >= 0, got {value!r}")
        self.match, self.match_weight, self.relational_weight = match, float(match_weight), float(relational_weight)
        self.label_loss, self.label_loss_params = label_loss or "", dict(label_loss_params or {})
        self.label_weight = float(label_weight)
        self._label = None
        if self.label_loss:
            from models.losses.registry import get_loss

            self._label = get_loss(self.label_loss, **self.label_loss_params)
            if getattr(self._label, "requires_classifier", False):
                raise ValueError(f"label_loss {self.label_loss!r} trains through a classifier; use a loss on the "
                                 "embeddings (triplet, supcon, multisimilarity, ...)")

    def terms(self, embeddings, teacher, labels=None, projected=None) -> dict:
        """{"match", "relational", "label"}: each term's (unweighted) value; "label" is 0 without a label loss."""
        matched = embeddings if projected is None else projected
        values = {"match": match_term(matched, teacher, self.match),
                  "relational": relational_term(embeddings, teacher),
                  "label": ops.zeros((), "float32")}
        if self._label is not None:
            values["label"] = ops.cast(self._label.compute(ops.cast(embeddings, "float32"), as_labels(labels)),
                                       "float32")
        return values

    def compute(self, embeddings, teacher, labels=None, projected=None):
        values = self.terms(embeddings, teacher, labels, projected)
        return (self.match_weight * values["match"] + self.relational_weight * values["relational"]
                + self.label_weight * values["label"])

    def call(self, y_true, y_pred):
        if not isinstance(y_pred, dict):
            raise ValueError("DistillationLoss takes y_pred {'embeddings', 'projected'?}")
        if isinstance(y_true, dict):
            labels, teacher = y_true.get("labels"), y_true["teacher"]
        else:   # one tensor per row [label, teacher embedding...] (what the trainer's batches hold)
            labels, teacher = y_true[:, 0], y_true[:, 1:]
        return self.compute(y_pred["embeddings"], teacher, labels, y_pred.get("projected"))

    def get_config(self):
        return {**super().get_config(), "match": self.match, "match_weight": self.match_weight,
                "relational_weight": self.relational_weight, "label_loss": self.label_loss,
                "label_loss_params": self.label_loss_params, "label_weight": self.label_weight}

