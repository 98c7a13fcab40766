"""Metric-learning losses as Keras 3 `Loss` classes, plus a triplet-accuracy metric.

Every loss takes integer class labels `y_true` of shape (B,) or (B, 1) and a batch
of embeddings `y_pred` of shape (B, d) (ArcFace: cosine logits (B, n_classes)), and
returns one scalar for the whole batch: the pair/triplet structure couples all
samples, so there is no meaningful per-sample loss to hand to Keras's reduction
(which leaves a scalar untouched).

Shared conventions:

* Work is done in float32 whatever the input dtype: the exponentials and distance
  differences below lose too much in float16 (mixed precision).
* Everything is expressed with masks over the (B, B) pair matrix or the (B, B, B)
  triplet cube instead of Python control flow, so the losses run unchanged inside
  `tf.function` / `model.fit` with a dynamic batch size.
* A loss with nothing to average over (no positive pair, no negative, batch of one)
  returns 0 with a finite, zero gradient rather than 0/0.
* Losses defined on cosine similarity normalise the embeddings themselves, so they
  are correct even when the model does not end in `L2Normalize`.
* Under tf.distribute with several replicas, labels and embeddings are gathered
  first, so negatives come from the global batch and the loss (and its gradient)
  equals one device's on that batch (models/cross_replica.py). Subclasses write
  `batch_loss`; the base class's `call` does the gathering.
"""
from __future__ import annotations

import math

import keras
from keras import ops

from models.cross_replica import gather_global_batch

# Stands in for ±infinity inside masked max/min: a true inf turns into NaN gradients
# (0 * inf) even where the entry is masked out.
_BIG = 1e9
# Squared distances at or below this count as exactly zero: sqrt has an infinite
# slope at 0 (duplicate embeddings), so those entries bypass it.
_SQ_EPS = 1e-12

DISTANCES = ("euclidean", "squared_euclidean", "cosine")
TRIPLET_MININGS = ("batch_all", "batch_hard", "semi_hard")


# --------------------------------------------------------------------------- helpers

def _labels(y_true):
    """Flat int32 labels; Keras hands them over as float32."""
    return ops.reshape(ops.cast(y_true, "int32"), (-1,))


def _embeddings(y_pred):
    return ops.cast(y_pred, "float32")


def _unit_rows(x):
    """Rows scaled to unit L2 norm; zero rows stay zero (no NaN in value or gradient)."""
    # Dividing out the largest component first keeps tiny-norm rows (randomly
    # initialised backbones) from being swamped by the epsilon, as in L2Normalize.
    scale = ops.max(ops.abs(x), axis=-1, keepdims=True)
    x = x / ops.maximum(scale, 1e-30)
    squared = ops.sum(ops.square(x), axis=-1, keepdims=True)
    return x * ops.rsqrt(ops.maximum(squared, _SQ_EPS))


def _cosine_similarity(x):
    x = _unit_rows(x)
    return ops.matmul(x, ops.transpose(x))


def _pairwise_distance(x, kind: str):
    """(B, B) distance matrix; the diagonal is exactly 0 for the euclidean kinds."""
    if kind == "cosine":
        return 1.0 - _cosine_similarity(x)
    sq_norm = ops.sum(ops.square(x), axis=1)
    gram = ops.matmul(x, ops.transpose(x))
    squared = ops.expand_dims(sq_norm, 1) - 2.0 * gram + ops.expand_dims(sq_norm, 0)
    # The Gram expansion can dip below zero by rounding, and leaves rounding noise on
    # the diagonal; neither may reach sqrt.
    squared = ops.maximum(squared, 0.0)
    squared = ops.where(_eye(ops.shape(x)[0]), 0.0, squared)
    if kind == "squared_euclidean":
        return squared
    is_zero = squared <= _SQ_EPS
    # Double `where`: the inner one keeps sqrt away from 0 so that its (unused)
    # gradient there is finite instead of inf * 0 = NaN.
    return ops.where(is_zero, 0.0, ops.sqrt(ops.where(is_zero, 1.0, squared)))


def _eye(n):
    idx = ops.arange(n)
    return ops.equal(ops.expand_dims(idx, 1), ops.expand_dims(idx, 0))


def _pair_masks(labels):
    """Boolean (B, B) masks: positives (same label, not the anchor itself) and negatives."""
    same = ops.equal(ops.expand_dims(labels, 1), ops.expand_dims(labels, 0))
    positive = ops.logical_and(same, ops.logical_not(_eye(ops.shape(labels)[0])))
    return positive, ops.logical_not(same)


def _triplet_mask(positive, negative):
    """(B, B, B) mask of valid (anchor, positive, negative) index triplets."""
    return ops.logical_and(ops.expand_dims(positive, 2), ops.expand_dims(negative, 1))


def _count(mask, axis=None):
    return ops.sum(ops.cast(mask, "float32"), axis=axis)


def _masked_mean(values, mask):
    """Mean of `values` where `mask` holds; 0 (not NaN) when it holds nowhere."""
    total = ops.sum(ops.where(mask, values, 0.0))
    return total / ops.maximum(_count(mask), 1.0)


def _masked_logsumexp(x, mask, axis=-1):
    """log Σ_{mask} exp(x) along `axis`; 0 for rows where the mask is empty."""
    has_any = ops.any(mask, axis=axis)
    # The shift cancels analytically; stopping its gradient keeps the backward pass
    # from routing through the argmax.
    shift = ops.stop_gradient(ops.max(ops.where(mask, x, -_BIG), axis=axis, keepdims=True))
    shifted = ops.where(mask, x - shift, 0.0)
    total = ops.sum(ops.where(mask, ops.exp(shifted), 0.0), axis=axis)
    return ops.where(has_any, ops.squeeze(shift, axis) + ops.log(ops.where(has_any, total, 1.0)), 0.0)


def _log1p_sum_exp(x, mask, axis=-1):
    """log(1 + Σ_{mask} exp(x)) along `axis`, stable for large x (β = 50 in MS loss)."""
    x = ops.where(mask, x, 0.0)
    shift = ops.stop_gradient(ops.maximum(ops.max(x, axis=axis, keepdims=True), 0.0))
    total = ops.exp(-shift) + ops.sum(ops.where(mask, ops.exp(x - shift), 0.0), axis=axis, keepdims=True)
    return ops.squeeze(shift + ops.log(total), axis)


def _check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {allowed}")


def _check_positive(**values: float) -> None:
    for key, value in values.items():
        if not value > 0:
            raise ValueError(f"{key} must be > 0, got {value!r}")


# --------------------------------------------------------------------------- base

class _BatchLoss(keras.losses.Loss):
    """Base for losses that score a whole batch at once and return a scalar."""

    registry_name = ""
    requires_classifier = False

    def __init__(self, name: str | None = None, reduction: str | None = "sum_over_batch_size", **kwargs):
        # float32 regardless of the global policy: Loss.__call__ then casts y_pred up
        # before `call` sees it.
        kwargs["dtype"] = "float32"
        super().__init__(name=name or self.registry_name, reduction=reduction, **kwargs)

    def _params(self) -> dict:
        raise NotImplementedError

    def get_config(self):
        return {**super().get_config(), **self._params()}

    def call(self, y_true, y_pred):
        # Several replicas: the loss of the global batch (see models/cross_replica.py).
        (y_true, y_pred), scale = gather_global_batch(_labels(y_true), y_pred)
        return self.batch_loss(y_true, y_pred) * scale

    def batch_loss(self, y_true, y_pred):
        """The scalar loss of one whole batch."""
        raise NotImplementedError


# --------------------------------------------------------------------------- losses

class _TemperatureLoss(_BatchLoss):
    """A loss on cosine similarities scaled by 1/temperature; subclasses set the default."""

    default_temperature = 0.1

    def __init__(self, temperature: float | None = None, **kwargs):
        super().__init__(**kwargs)
        temperature = self.default_temperature if temperature is None else temperature
        _check_positive(temperature=temperature)
        self.temperature = float(temperature)

    def _params(self):
        return {"temperature": self.temperature}


@keras.saving.register_keras_serializable(package="embedlab")
class TripletLoss(_BatchLoss):
    """Triplet margin loss relu(d(a,p) - d(a,n) + margin) with in-batch mining.

    mining:
      * "batch_all" (Hermans et al. 2017, "batch all"): every valid (a, p, n) triplet
        of the batch; the mean is taken over the triplets whose loss is > 0 only
        (the paper's "averaging over non-zero triplets"), so easy triplets do not
        dilute the gradient as training progresses. 0 when none is active.
      * "batch_hard" (Hermans et al. 2017): per anchor, its farthest positive and its
        closest negative; mean over anchors that have at least one of each.
      * "semi_hard" (Schroff et al. 2015, FaceNet): for each (a, p) pair the closest
        negative that is still farther than p (d(a,n) > d(a,p)); if there is none,
        the farthest negative of a. Mean over all (a, p) pairs whose anchor has a
        negative (pairs with loss 0 included).

    distance: "euclidean", "squared_euclidean" or "cosine" (1 - cosine similarity;
    the embeddings are normalised first). The euclidean kinds use the raw embeddings.
    """

    registry_name = "triplet"

    def __init__(self, margin: float = 0.2, mining: str = "semi_hard", distance: str = "euclidean", **kwargs):
        super().__init__(**kwargs)
        _check_choice("mining", mining, TRIPLET_MININGS)
        _check_choice("distance", distance, DISTANCES)
        self.margin = float(margin)
        self.mining = mining
        self.distance = distance

    def _params(self):
        return {"margin": self.margin, "mining": self.mining, "distance": self.distance}

    def batch_loss(self, y_true, y_pred):
        labels = _labels(y_true)
        dist = _pairwise_distance(_embeddings(y_pred), self.distance)
        positive, negative = _pair_masks(labels)

        if self.mining == "batch_all":
            # cube[a, p, n] = d(a, p) - d(a, n) + margin
            cube = ops.relu(ops.expand_dims(dist, 2) - ops.expand_dims(dist, 1) + self.margin)
            active = ops.logical_and(_triplet_mask(positive, negative), cube > 0.0)
            return _masked_mean(cube, active)

        has_negative = ops.any(negative, axis=1)
        if self.mining == "batch_hard":
            hardest_pos = ops.max(ops.where(positive, dist, -_BIG), axis=1)
            hardest_neg = ops.min(ops.where(negative, dist, _BIG), axis=1)
            per_anchor = ops.relu(hardest_pos - hardest_neg + self.margin)
            valid = ops.logical_and(ops.any(positive, axis=1), has_negative)
            return _masked_mean(per_anchor, valid)

        # semi_hard: d_ap[a, p, 1] against d_an[a, 1, n]
        d_ap = ops.expand_dims(dist, 2)
        d_an = ops.expand_dims(dist, 1)
        farther = ops.logical_and(ops.expand_dims(negative, 1), d_an > d_ap)
        semi_hard = ops.min(ops.where(farther, d_an, _BIG), axis=2)
        hardest = ops.max(ops.where(negative, dist, -_BIG), axis=1, keepdims=True)
        chosen = ops.where(ops.any(farther, axis=2), semi_hard, hardest)
        per_pair = ops.relu(dist - chosen + self.margin)
        valid = ops.logical_and(positive, ops.expand_dims(has_negative, 1))
        return _masked_mean(per_pair, valid)


@keras.saving.register_keras_serializable(package="embedlab")
class ContrastiveLoss(_BatchLoss):
    """Contrastive loss (Hadsell et al. 2006) with a margin on each side.

    Mean over all unordered pairs i < j of the batch of
        [same label] · relu(d - positive_margin)² + [different] · relu(negative_margin - d)².
    Negative pairs contribute even when the batch has no positive pair (that term is
    well defined on its own); a batch of one sample gives 0.

    Defaults are for unit embeddings (every model here ends in L2Normalize), where the
    euclidean distance runs from 0 to 2: negatives are pushed out to √2 ≈ 1.4, i.e. to
    orthogonality, and positives closer than 0.6 (cosine > 0.82) are left alone. Pulling
    positives all the way to d = 0 with a short negative margin (0 / 0.5) collapsed the
    space on Flowers-102 (effective rank 18, MAP@R 0.218 against 0.334 with these
    defaults, chosen on the validation classes; BENCHMARKS.md).
    """

    registry_name = "contrastive"

    def __init__(self, positive_margin: float = 0.6, negative_margin: float = 1.4, distance: str = "euclidean",
                 **kwargs):
        super().__init__(**kwargs)
        _check_choice("distance", distance, DISTANCES)
        self.positive_margin = float(positive_margin)
        self.negative_margin = float(negative_margin)
        self.distance = distance

    def _params(self):
        return {"positive_margin": self.positive_margin, "negative_margin": self.negative_margin,
                "distance": self.distance}

    def batch_loss(self, y_true, y_pred):
        labels = _labels(y_true)
        dist = _pairwise_distance(_embeddings(y_pred), self.distance)
        same = ops.equal(ops.expand_dims(labels, 1), ops.expand_dims(labels, 0))
        idx = ops.arange(ops.shape(labels)[0])
        upper = ops.expand_dims(idx, 1) < ops.expand_dims(idx, 0)
        per_pair = ops.where(same,
                             ops.square(ops.relu(dist - self.positive_margin)),
                             ops.square(ops.relu(self.negative_margin - dist)))
        return _masked_mean(per_pair, upper)


@keras.saving.register_keras_serializable(package="embedlab")
class ContrastiveSoftmaxLoss(_TemperatureLoss):
    """Two-way softmax over one positive and one negative, on cosine similarity s.

    For every valid (anchor a, positive p, negative n) triplet of the batch:
        -log(exp(s_ap/τ) / (exp(s_ap/τ) + exp(s_an/τ))) = softplus((s_an - s_ap)/τ)
    and the loss is the mean over all valid triplets (0 when there is none).
    """

    registry_name = "contrastive_softmax"

    default_temperature = 0.1

    def batch_loss(self, y_true, y_pred):
        positive, negative = _pair_masks(_labels(y_true))
        sim = _cosine_similarity(_embeddings(y_pred))
        cube = ops.softplus((ops.expand_dims(sim, 1) - ops.expand_dims(sim, 2)) / self.temperature)
        return _masked_mean(cube, _triplet_mask(positive, negative))


@keras.saving.register_keras_serializable(package="embedlab")
class ArcFaceLoss(_BatchLoss):
    """Additive angular margin loss (ArcFace, Deng et al. 2019) on cosine logits.

    `y_pred` is the (B, n_classes) output of `CosineClassifier`, not embeddings, and
    labels must lie in [0, n_classes). The target-class cosine cos θ becomes
    cos(θ + margin), computed as cos θ·cos m - sin θ·sin m; where θ + m would pass π
    (cos θ <= cos(π - m)) the target would stop being monotone in θ, so it falls back
    to cos θ - m·sin m (the usual "th/mm" treatment). With `easy_margin`, the margin applies only where
    cos θ > 0. The loss is the mean over the batch of the cross-entropy of
    scale · logits.
    """

    registry_name = "arcface"
    requires_classifier = True

    def __init__(self, scale: float = 30.0, margin: float = 0.5, easy_margin: bool = False, **kwargs):
        super().__init__(**kwargs)
        _check_positive(scale=scale)
        self.scale = float(scale)
        self.margin = float(margin)
        self.easy_margin = bool(easy_margin)

    def _params(self):
        return {"scale": self.scale, "margin": self.margin, "easy_margin": self.easy_margin}

    def batch_loss(self, y_true, y_pred):
        labels = _labels(y_true)
        cos = ops.clip(_embeddings(y_pred), -1.0, 1.0)
        is_target = ops.equal(ops.expand_dims(labels, 1), ops.expand_dims(ops.arange(ops.shape(cos)[1]), 0))
        # sqrt is clamped away from 0 so that cos = ±1 does not give an infinite slope.
        sin = ops.sqrt(ops.maximum(1.0 - ops.square(cos), _SQ_EPS))
        shifted = cos * math.cos(self.margin) - sin * math.sin(self.margin)
        if self.easy_margin:
            shifted = ops.where(cos > 0.0, shifted, cos)
        else:
            threshold = math.cos(math.pi - self.margin)
            shifted = ops.where(cos > threshold, shifted, cos - math.sin(math.pi - self.margin) * self.margin)
        logits = self.scale * ops.where(is_target, shifted, cos)
        target_logit = ops.sum(ops.where(is_target, logits, 0.0), axis=1)
        return ops.mean(ops.logsumexp(logits, axis=1) - target_logit)


@keras.saving.register_keras_serializable(package="embedlab")
class MultiSimilarityLoss(_BatchLoss):
    """Multi-similarity loss (Wang et al. 2019) with its pair mining, on cosine similarity S.

    Mining, per anchor i: a negative k is kept if S_ik + ε > min over i's positives;
    a positive k is kept if S_ik - ε < max over i's negatives. Per anchor:
        1/α · log(1 + Σ_kept pos exp(-α(S_ik - λ))) + 1/β · log(1 + Σ_kept neg exp(β(S_ik - λ)))
    with λ = `base`. As in the authors' implementation, an anchor left with no kept
    positive or no kept negative contributes 0, and the sum is divided by the batch
    size B (all anchors).
    """

    registry_name = "multisimilarity"

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, epsilon: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        _check_positive(alpha=alpha, beta=beta)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.base = float(base)
        self.epsilon = float(epsilon)

    def _params(self):
        return {"alpha": self.alpha, "beta": self.beta, "base": self.base, "epsilon": self.epsilon}

    def batch_loss(self, y_true, y_pred):
        positive, negative = _pair_masks(_labels(y_true))
        sim = _cosine_similarity(_embeddings(y_pred))
        # With no positive (negative) the ±_BIG sentinel keeps no negative (positive).
        min_pos = ops.min(ops.where(positive, sim, _BIG), axis=1, keepdims=True)
        max_neg = ops.max(ops.where(negative, sim, -_BIG), axis=1, keepdims=True)
        kept_neg = ops.logical_and(negative, sim + self.epsilon > min_pos)
        kept_pos = ops.logical_and(positive, sim - self.epsilon < max_neg)
        pos_term = _log1p_sum_exp(-self.alpha * (sim - self.base), kept_pos) / self.alpha
        neg_term = _log1p_sum_exp(self.beta * (sim - self.base), kept_neg) / self.beta
        keep = ops.logical_and(ops.any(kept_pos, axis=1), ops.any(kept_neg, axis=1))
        per_anchor = ops.where(keep, pos_term + neg_term, 0.0)
        return ops.sum(per_anchor) / ops.maximum(ops.cast(ops.shape(per_anchor)[0], "float32"), 1.0)


def _log_softmax_without_self(sim, temperature):
    """log(exp(s_ak/τ) / Σ_{j≠a} exp(s_aj/τ)) for every (a, k)."""
    logits = sim / temperature
    others = ops.logical_not(_eye(ops.shape(sim)[0]))
    return logits - ops.expand_dims(_masked_logsumexp(logits, others, axis=1), 1)


@keras.saving.register_keras_serializable(package="embedlab")
class SupConLoss(_TemperatureLoss):
    """Supervised contrastive loss (Khosla et al. 2020), the L^sup_out form, cosine similarity.

    Per anchor a with positives P(a) (same label, ≠ a):
        -1/|P(a)| Σ_{p∈P(a)} log(exp(s_ap/τ) / Σ_{k≠a} exp(s_ak/τ))
    averaged over the anchors that have at least one positive (0 when none does).
    """

    registry_name = "supcon"

    default_temperature = 0.07

    def batch_loss(self, y_true, y_pred):
        positive, _ = _pair_masks(_labels(y_true))
        log_prob = _log_softmax_without_self(_cosine_similarity(_embeddings(y_pred)), self.temperature)
        n_pos = _count(positive, axis=1)
        per_anchor = -ops.sum(ops.where(positive, log_prob, 0.0), axis=1) / ops.maximum(n_pos, 1.0)
        return _masked_mean(per_anchor, n_pos > 0.0)


@keras.saving.register_keras_serializable(package="embedlab")
class InfoNCELoss(_TemperatureLoss):
    """NT-Xent / InfoNCE over the positive pairs of a labelled batch, cosine similarity.

    For each anchor a and each of its positives p (same label, ≠ a):
        -log(exp(s_ap/τ) / Σ_{k≠a} exp(s_ak/τ))
    averaged over all (anchor, positive) pairs (0 when there is none). Unlike SupCon,
    anchors with many positives weigh more.
    """

    registry_name = "infonce"

    default_temperature = 0.1

    def batch_loss(self, y_true, y_pred):
        positive, _ = _pair_masks(_labels(y_true))
        log_prob = _log_softmax_without_self(_cosine_similarity(_embeddings(y_pred)), self.temperature)
        return _masked_mean(-log_prob, positive)


# --------------------------------------------------------------------------- registry

LOSSES: dict[str, type] = {
    cls.registry_name: cls
    for cls in (TripletLoss, ContrastiveLoss, ContrastiveSoftmaxLoss, ArcFaceLoss, MultiSimilarityLoss, SupConLoss,
                InfoNCELoss)
}


def get_loss(name: str, **params) -> keras.losses.Loss:
    """A loss instance from its registry name; `params` go to its constructor."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}")
    return LOSSES[name](**params)


@keras.saving.register_keras_serializable(package="embedlab")
def triplet_accuracy(y_true, y_pred):
    """Share of the (global) batch's valid (a, p, n) triplets with d(a,p) < d(a,n), euclidean.

    A batch without any valid triplet scores 0 (Keras averages this scalar over
    batches, so a NaN would poison the epoch's value).
    """
    (y_true, y_pred), _ = gather_global_batch(_labels(y_true), y_pred)
    positive, negative = _pair_masks(_labels(y_true))
    dist = _pairwise_distance(_embeddings(y_pred), "euclidean")
    valid = _triplet_mask(positive, negative)
    correct = ops.logical_and(valid, ops.expand_dims(dist, 2) < ops.expand_dims(dist, 1))
    return _count(correct) / ops.maximum(_count(valid), 1.0)
