"""Pair and triplet losses on distances or similarities between a query and its references.

Every loss here reads the (B, R) query x reference matrix through the masks of
models/losses/base.py, so one code path serves the in-batch case (references = the
batch, self-pairs left out) and the query-vs-reference case (every pair counts).
"""
from __future__ import annotations

import keras
from keras import ops

from models.losses.base import (
    BIG,
    DISTANCES,
    BatchLoss,
    TemperatureLoss,
    check_choice,
    check_positive,
    cosine_similarity,
    log1p_sum_exp,
    masked_mean,
    pair_masks,
    pairwise_distance,
    resolve_reference,
    same_label,
    triplet_mask,
)

TRIPLET_MININGS = ("batch_all", "batch_hard", "semi_hard")


@keras.saving.register_keras_serializable(package="embedlab")
class TripletLoss(BatchLoss):
    """Triplet margin loss relu(d(a,p) - d(a,n) + margin) with in-batch mining.

    Anchors a are the queries; positives p and negatives n are references (the batch
    itself, p ≠ a, when there are none).

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
        check_choice("mining", mining, TRIPLET_MININGS)
        check_choice("distance", distance, DISTANCES)
        self.margin = float(margin)
        self.mining = mining
        self.distance = distance

    def params(self):
        return {"margin": self.margin, "mining": self.mining, "distance": self.distance}

    def compute(self, embeddings, labels, ref_embeddings=None, ref_labels=None):
        embeddings, labels, ref_embeddings, ref_labels = resolve_reference(embeddings, labels, ref_embeddings,
                                                                           ref_labels)
        dist = pairwise_distance(embeddings, self.distance, ref_embeddings)
        positive, negative = pair_masks(labels, ref_labels)

        if self.mining == "batch_all":
            # cube[a, p, n] = d(a, p) - d(a, n) + margin
            cube = ops.relu(ops.expand_dims(dist, 2) - ops.expand_dims(dist, 1) + self.margin)
            active = ops.logical_and(triplet_mask(positive, negative), cube > 0.0)
            return masked_mean(cube, active)

        has_negative = ops.any(negative, axis=1)
        if self.mining == "batch_hard":
            hardest_pos = ops.max(ops.where(positive, dist, -BIG), axis=1)
            hardest_neg = ops.min(ops.where(negative, dist, BIG), axis=1)
            per_anchor = ops.relu(hardest_pos - hardest_neg + self.margin)
            valid = ops.logical_and(ops.any(positive, axis=1), has_negative)
            return masked_mean(per_anchor, valid)

        # semi_hard: d_ap[a, p, 1] against d_an[a, 1, n]
        d_ap = ops.expand_dims(dist, 2)
        d_an = ops.expand_dims(dist, 1)
        farther = ops.logical_and(ops.expand_dims(negative, 1), d_an > d_ap)
        semi_hard = ops.min(ops.where(farther, d_an, BIG), axis=2)
        hardest = ops.max(ops.where(negative, dist, -BIG), axis=1, keepdims=True)
        chosen = ops.where(ops.any(farther, axis=2), semi_hard, hardest)
        per_pair = ops.relu(dist - chosen + self.margin)
        valid = ops.logical_and(positive, ops.expand_dims(has_negative, 1))
        return masked_mean(per_pair, valid)


@keras.saving.register_keras_serializable(package="embedlab")
class ContrastiveLoss(BatchLoss):
    """Contrastive loss (Hadsell et al. 2006) with a margin on each side.

    Mean over all unordered pairs i < j of the batch (with references: over all
    query x reference pairs) of
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
        check_choice("distance", distance, DISTANCES)
        self.positive_margin = float(positive_margin)
        self.negative_margin = float(negative_margin)
        self.distance = distance

    def params(self):
        return {"positive_margin": self.positive_margin, "negative_margin": self.negative_margin,
                "distance": self.distance}

    def compute(self, embeddings, labels, ref_embeddings=None, ref_labels=None):
        embeddings, labels, ref_embeddings, ref_labels = resolve_reference(embeddings, labels, ref_embeddings,
                                                                           ref_labels)
        dist = pairwise_distance(embeddings, self.distance, ref_embeddings)
        same = same_label(labels, labels if ref_labels is None else ref_labels)
        per_pair = ops.where(same,
                             ops.square(ops.relu(dist - self.positive_margin)),
                             ops.square(ops.relu(self.negative_margin - dist)))
        if ref_embeddings is None:
            # In-batch, (i, j) and (j, i) are one pair and (i, i) is none.
            idx = ops.arange(ops.shape(labels)[0])
            counted = ops.expand_dims(idx, 1) < ops.expand_dims(idx, 0)
        else:
            counted = ops.ones_like(same)
        return masked_mean(per_pair, counted)


@keras.saving.register_keras_serializable(package="embedlab")
class ContrastiveSoftmaxLoss(TemperatureLoss):
    """Two-way softmax over one positive and one negative, on cosine similarity s.

    For every valid (anchor a, positive p, negative n) triplet (a a query, p and n
    references or, without references, other samples of the batch):
        -log(exp(s_ap/τ) / (exp(s_ap/τ) + exp(s_an/τ))) = softplus((s_an - s_ap)/τ)
    and the loss is the mean over all valid triplets (0 when there is none).
    """

    registry_name = "contrastive_softmax"

    default_temperature = 0.1

    def compute(self, embeddings, labels, ref_embeddings=None, ref_labels=None):
        embeddings, labels, ref_embeddings, ref_labels = resolve_reference(embeddings, labels, ref_embeddings,
                                                                           ref_labels)
        positive, negative = pair_masks(labels, ref_labels)
        return two_way_softmax_mean(cosine_similarity(embeddings, ref_embeddings), positive, negative,
                                    self.temperature)


def two_way_softmax_mean(sim, positive, negative, temperature: float):
    """Mean over the valid (a, p, n) triplets of the (B, M) similarities `sim` of
    -log(exp(s_ap/τ) / (exp(s_ap/τ) + exp(s_an/τ))) = softplus((s_an - s_ap)/τ); 0 when there is none.

    `positive` / `negative` are (B, M) masks of each anchor's positives and negatives.
    """
    cube = ops.softplus((ops.expand_dims(sim, 1) - ops.expand_dims(sim, 2)) / temperature)
    return masked_mean(cube, triplet_mask(positive, negative))


@keras.saving.register_keras_serializable(package="embedlab")
class MultiSimilarityLoss(BatchLoss):
    """Multi-similarity loss (Wang et al. 2019) with its pair mining, on cosine similarity S.

    Mining, per anchor (query) i: a negative k is kept if S_ik + ε > min over i's
    positives; a positive k is kept if S_ik - ε < max over i's negatives. Per anchor:
        1/α · log(1 + Σ_kept pos exp(-α(S_ik - λ))) + 1/β · log(1 + Σ_kept neg exp(β(S_ik - λ)))
    with λ = `base`. As in the authors' implementation, an anchor left with no kept
    positive or no kept negative contributes 0, and the sum is divided by the number
    of anchors B (all queries).
    """

    registry_name = "multisimilarity"

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, epsilon: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        check_positive(alpha=alpha, beta=beta)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.base = float(base)
        self.epsilon = float(epsilon)

    def params(self):
        return {"alpha": self.alpha, "beta": self.beta, "base": self.base, "epsilon": self.epsilon}

    def compute(self, embeddings, labels, ref_embeddings=None, ref_labels=None):
        embeddings, labels, ref_embeddings, ref_labels = resolve_reference(embeddings, labels, ref_embeddings,
                                                                           ref_labels)
        positive, negative = pair_masks(labels, ref_labels)
        sim = cosine_similarity(embeddings, ref_embeddings)
        # With no positive (negative) the ±BIG sentinel keeps no negative (positive).
        min_pos = ops.min(ops.where(positive, sim, BIG), axis=1, keepdims=True)
        max_neg = ops.max(ops.where(negative, sim, -BIG), axis=1, keepdims=True)
        kept_neg = ops.logical_and(negative, sim + self.epsilon > min_pos)
        kept_pos = ops.logical_and(positive, sim - self.epsilon < max_neg)
        pos_term = log1p_sum_exp(-self.alpha * (sim - self.base), kept_pos) / self.alpha
        neg_term = log1p_sum_exp(self.beta * (sim - self.base), kept_neg) / self.beta
        keep = ops.logical_and(ops.any(kept_pos, axis=1), ops.any(kept_neg, axis=1))
        per_anchor = ops.where(keep, pos_term + neg_term, 0.0)
        return ops.sum(per_anchor) / ops.maximum(ops.cast(ops.shape(per_anchor)[0], "float32"), 1.0)
