"""What every metric-learning loss here shares: the loss contract, the batch maths and triplet accuracy.

The contract (as pytorch-metric-learning's `ref_emb` / `ref_labels`): a loss scores query
embeddings (B, d) with integer labels (B,) against reference embeddings (M, d) with labels
(M,), and returns one scalar for the whole batch (the pair/triplet structure couples all
samples, so there is no per-sample loss to hand to Keras's reduction, which leaves a scalar
untouched).

* No reference: the reference is the batch itself and a sample is never its own positive
  (self-pairs are excluded). This is plain in-batch metric learning.
* A reference: every query x reference pair counts, (i, i) included: image queries against
  text references of the same items, a student's embeddings against a teacher's. Reference
  labels default to the query labels (two towers over the same items, row by row).

`BatchLoss.compute(embeddings, labels, ref_embeddings=None, ref_labels=None)` is the pure
form. Keras's `call(y_true, y_pred)` takes either today's tensors (labels, embeddings) or
dicts, y_true {"labels", "ref_labels"} and y_pred {"embeddings", "ref_embeddings"}, so a
two-tower model needs no special case where the loss is called. (Under `model.compile`,
Keras maps one loss over each output of a dict-output model; a two-tower objective
therefore calls the loss itself, e.g. from `Model.compute_loss`.)

Shared conventions:

* Work is done in float32 whatever the input dtype: the exponentials and distance
  differences lose too much in float16 (mixed precision).
* Everything is expressed with masks over the (B, M) pair matrix or the (B, M, M)
  triplet cube instead of Python control flow, so the losses run unchanged inside
  `tf.function` / `model.fit` with a dynamic batch size.
* A loss with nothing to average over (no positive pair, no negative, batch of one)
  returns 0 with a finite, zero gradient rather than 0/0.
* Losses defined on cosine similarity normalise the embeddings themselves, so they
  are correct even when the model does not end in `L2Normalize`.
* Under tf.distribute with several replicas, labels and embeddings (queries and
  references) are gathered first, so negatives come from the global batch and the loss
  (and its gradient) equals one device's on that batch (models/cross_replica.py).
"""
from __future__ import annotations

import keras
from keras import ops

from models.cross_replica import gather_global_batch
from models.layers import l2_normalize

# Stands in for ±infinity inside masked max/min: a true inf turns into NaN gradients
# (0 * inf) even where the entry is masked out.
BIG = 1e9
# Squared distances at or below this count as exactly zero: sqrt has an infinite
# slope at 0 (duplicate embeddings), so those entries bypass it.
SQ_EPS = 1e-12

DISTANCES = ("euclidean", "squared_euclidean", "cosine")

PRED_KEYS = ("embeddings", "ref_embeddings")
TRUE_KEYS = ("labels", "ref_labels")


# --------------------------------------------------------------------------- coercion

def as_labels(y_true):
    """Flat int32 labels; Keras hands them over as float32."""
    return ops.reshape(ops.cast(y_true, "int32"), (-1,))


def as_embeddings(y_pred):
    return ops.cast(y_pred, "float32")


def _unpack(value, keys: tuple[str, str], what: str):
    """(main, reference or None) from a tensor or a dict with `keys`."""
    if not isinstance(value, dict):
        return value, None
    unknown = sorted(set(value) - set(keys))
    if unknown or keys[0] not in value:
        raise ValueError(f"{what} dict needs {keys[0]!r} (and optionally {keys[1]!r}); got keys {sorted(value)}")
    return value[keys[0]], value.get(keys[1])


def unpack_batch(y_true, y_pred):
    """(labels, embeddings, ref_labels, ref_embeddings) from Keras's (y_true, y_pred); refs may be None."""
    labels, ref_labels = _unpack(y_true, TRUE_KEYS, "y_true")
    embeddings, ref_embeddings = _unpack(y_pred, PRED_KEYS, "y_pred")
    if ref_embeddings is None and ref_labels is not None:
        raise ValueError("ref_labels given without ref_embeddings")
    return labels, embeddings, ref_labels, ref_embeddings


def resolve_reference(embeddings, labels, ref_embeddings=None, ref_labels=None):
    """Checked float32 embeddings and int32 labels; the refs stay None when there is no reference."""
    embeddings, labels = as_embeddings(embeddings), as_labels(labels)
    if ref_embeddings is None:
        if ref_labels is not None:
            raise ValueError("ref_labels given without ref_embeddings")
        return embeddings, labels, None, None
    ref_labels = labels if ref_labels is None else as_labels(ref_labels)
    return embeddings, labels, as_embeddings(ref_embeddings), ref_labels


# --------------------------------------------------------------------------- pairwise geometry

def unit_rows(x):
    """Rows scaled to unit L2 norm; zero rows stay zero (no NaN in value or gradient)."""
    return l2_normalize(x, SQ_EPS)


def cosine_similarity(x, ref=None):
    """(B, M) cosine similarities of the rows of `x` with the rows of `ref` (`x` itself when None)."""
    x = unit_rows(x)
    ref = x if ref is None else unit_rows(ref)
    return ops.matmul(x, ops.transpose(ref))


def pairwise_distance(x, kind: str, ref=None):
    """(B, M) distances of the rows of `x` to the rows of `ref` (`x` itself when None).

    Without a reference the diagonal is exactly 0 for the euclidean kinds.
    """
    if kind == "cosine":
        return 1.0 - cosine_similarity(x, ref)
    other = x if ref is None else ref
    sq_norm = ops.sum(ops.square(x), axis=1)
    other_sq_norm = sq_norm if ref is None else ops.sum(ops.square(other), axis=1)
    gram = ops.matmul(x, ops.transpose(other))
    squared = ops.expand_dims(sq_norm, 1) - 2.0 * gram + ops.expand_dims(other_sq_norm, 0)
    # The Gram expansion can dip below zero by rounding, and leaves rounding noise on
    # the diagonal; neither may reach sqrt.
    squared = ops.maximum(squared, 0.0)
    if ref is None:
        squared = ops.where(eye(ops.shape(x)[0]), 0.0, squared)
    if kind == "squared_euclidean":
        return squared
    is_zero = squared <= SQ_EPS
    # Double `where`: the inner one keeps sqrt away from 0 so that its (unused)
    # gradient there is finite instead of inf * 0 = NaN.
    return ops.where(is_zero, 0.0, ops.sqrt(ops.where(is_zero, 1.0, squared)))


def eye(n):
    idx = ops.arange(n)
    return ops.equal(ops.expand_dims(idx, 1), ops.expand_dims(idx, 0))


# --------------------------------------------------------------------------- masks

def same_label(labels, ref_labels):
    """(B, M) mask: query i and reference j share a label."""
    return ops.equal(ops.expand_dims(labels, 1), ops.expand_dims(ref_labels, 0))


def pair_masks(labels, ref_labels=None):
    """Boolean (B, M) masks: positives (same label; not the query itself without a reference) and negatives."""
    same = same_label(labels, labels if ref_labels is None else ref_labels)
    if ref_labels is None:
        same_not_self = ops.logical_and(same, ops.logical_not(eye(ops.shape(labels)[0])))
        return same_not_self, ops.logical_not(same)
    return same, ops.logical_not(same)


def triplet_mask(positive, negative):
    """(B, M, M) mask of valid (anchor, positive, negative) index triplets."""
    return ops.logical_and(ops.expand_dims(positive, 2), ops.expand_dims(negative, 1))


# --------------------------------------------------------------------------- reductions

def count(mask, axis=None):
    return ops.sum(ops.cast(mask, "float32"), axis=axis)


def masked_mean(values, mask):
    """Mean of `values` where `mask` holds; 0 (not NaN) when it holds nowhere."""
    total = ops.sum(ops.where(mask, values, 0.0))
    return total / ops.maximum(count(mask), 1.0)


def masked_logsumexp(x, mask, axis=-1):
    """log Σ_{mask} exp(x) along `axis`; 0 for rows where the mask is empty."""
    has_any = ops.any(mask, axis=axis)
    # The shift cancels analytically; stopping its gradient keeps the backward pass
    # from routing through the argmax.
    shift = ops.stop_gradient(ops.max(ops.where(mask, x, -BIG), axis=axis, keepdims=True))
    shifted = ops.where(mask, x - shift, 0.0)
    total = ops.sum(ops.where(mask, ops.exp(shifted), 0.0), axis=axis)
    return ops.where(has_any, ops.squeeze(shift, axis) + ops.log(ops.where(has_any, total, 1.0)), 0.0)


def log1p_sum_exp(x, mask, axis=-1):
    """log(1 + Σ_{mask} exp(x)) along `axis`, stable for large x (β = 50 in MS loss)."""
    x = ops.where(mask, x, 0.0)
    shift = ops.stop_gradient(ops.maximum(ops.max(x, axis=axis, keepdims=True), 0.0))
    total = ops.exp(-shift) + ops.sum(ops.where(mask, ops.exp(x - shift), 0.0), axis=axis, keepdims=True)
    return ops.squeeze(shift + ops.log(total), axis)


# --------------------------------------------------------------------------- parameter checks

def check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {allowed}")


def check_positive(**values: float) -> None:
    for key, value in values.items():
        if not value > 0:
            raise ValueError(f"{key} must be > 0, got {value!r}")


# --------------------------------------------------------------------------- base classes

class BatchLoss(keras.losses.Loss):
    """Base for losses that score a whole batch at once and return a scalar.

    Subclasses set `registry_name`, write `compute` and `params`, and say what they
    need from the model and the data, so a trainer never tests a loss by name:

    * `requires_classifier`: the model's output must be class cosines from
      `models.classifier.CosineClassifier` (labels 0..C-1), not embeddings;
    * `accepts_reference`: `compute` accepts reference embeddings and labels;
    * `training_metrics()`: the Keras metrics that make sense on the model's output;
    * `uses_text_references`: with texts at hand, the trainer hands the loss the items' text
      embeddings as references (all-zero rows for items without text), not only the embeddings.
    """

    registry_name = ""
    requires_classifier = False
    accepts_reference = True
    uses_text_references = False

    def __init__(self, name: str | None = None, reduction: str | None = "sum_over_batch_size", **kwargs):
        # float32 regardless of the global policy: Loss.__call__ then casts y_pred up
        # before `call` sees it.
        kwargs["dtype"] = "float32"
        super().__init__(name=name or self.registry_name, reduction=reduction, **kwargs)

    @classmethod
    def training_metrics(cls) -> list:
        return [triplet_accuracy]

    def params(self) -> dict:
        """The constructor arguments that define this loss (its config beyond name and reduction)."""
        raise NotImplementedError

    def get_config(self):
        return {**super().get_config(), **self.params()}

    def call(self, y_true, y_pred):
        labels, embeddings, ref_labels, ref_embeddings = unpack_batch(y_true, y_pred)
        if ref_embeddings is not None and ref_labels is None:
            ref_labels = labels
        # Several replicas: the loss of the global batch (see models/cross_replica.py).
        (labels, embeddings, ref_labels, ref_embeddings), scale = gather_global_batch(
            as_labels(labels), embeddings, None if ref_labels is None else as_labels(ref_labels), ref_embeddings)
        return self.compute(embeddings, labels, ref_embeddings, ref_labels) * scale

    def compute(self, embeddings, labels, ref_embeddings=None, ref_labels=None):
        """The scalar loss of query `embeddings` (B, d) with `labels` (B,) against the reference.

        Pure (no gathering, no Keras reduction). Without `ref_embeddings` the reference
        is the batch itself, self-pairs excluded; `ref_labels` default to `labels`.
        """
        raise NotImplementedError


class TemperatureLoss(BatchLoss):
    """A loss on cosine similarities scaled by 1/temperature; subclasses set the default."""

    default_temperature = 0.1

    def __init__(self, temperature: float | None = None, **kwargs):
        super().__init__(**kwargs)
        temperature = self.default_temperature if temperature is None else temperature
        check_positive(temperature=temperature)
        self.temperature = float(temperature)

    def params(self):
        return {"temperature": self.temperature}


# --------------------------------------------------------------------------- metric

@keras.saving.register_keras_serializable(package="embedlab")
def triplet_accuracy(y_true, y_pred):
    """Share of the (global) batch's valid (a, p, n) triplets with d(a,p) < d(a,n), euclidean.

    Takes the same inputs as the losses: with a reference, anchors are queries and
    positives / negatives are references. A batch without any valid triplet scores 0
    (Keras averages this scalar over batches, so a NaN would poison the epoch's value).
    """
    labels, embeddings, ref_labels, ref_embeddings = unpack_batch(y_true, y_pred)
    if ref_embeddings is not None and ref_labels is None:
        ref_labels = labels
    (labels, embeddings, ref_labels, ref_embeddings), _ = gather_global_batch(
        as_labels(labels), embeddings, None if ref_labels is None else as_labels(ref_labels), ref_embeddings)
    embeddings, labels, ref_embeddings, ref_labels = resolve_reference(embeddings, labels, ref_embeddings, ref_labels)
    positive, negative = pair_masks(labels, ref_labels)
    dist = pairwise_distance(embeddings, "euclidean", ref_embeddings)
    valid = triplet_mask(positive, negative)
    correct = ops.logical_and(valid, ops.expand_dims(dist, 2) < ops.expand_dims(dist, 1))
    return count(correct) / ops.maximum(count(valid), 1.0)
