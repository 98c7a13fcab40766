"""Softmax-style losses: each anchor's positives against all its candidates, on cosine similarity / τ.

The candidates of a query are its references (cross-modal: a CLIP-style loss with
labels; distillation: a student against its teacher's embeddings) or, without
references, every other sample of the batch.
"""
from __future__ import annotations

import keras
from keras import ops

from models.losses.base import (
    TemperatureLoss,
    cosine_similarity,
    count,
    eye,
    masked_logsumexp,
    masked_mean,
    pair_masks,
    resolve_reference,
)


def log_softmax_over_candidates(sim, temperature, in_batch: bool):
    """log(exp(s_ak/τ) / Σ_j exp(s_aj/τ)) for every (a, k); in-batch, j runs over j ≠ a."""
    logits = sim / temperature
    if not in_batch:
        return logits - ops.expand_dims(ops.logsumexp(logits, axis=1), 1)
    others = ops.logical_not(eye(ops.shape(sim)[0]))
    return logits - ops.expand_dims(masked_logsumexp(logits, others, axis=1), 1)


def _positives_and_log_prob(embeddings, labels, ref_embeddings, ref_labels, temperature):
    embeddings, labels, ref_embeddings, ref_labels = resolve_reference(embeddings, labels, ref_embeddings,
                                                                       ref_labels)
    positive, _ = pair_masks(labels, ref_labels)
    sim = cosine_similarity(embeddings, ref_embeddings)
    return positive, log_softmax_over_candidates(sim, temperature, in_batch=ref_embeddings is None)


@keras.saving.register_keras_serializable(package="embedlab")
class SupConLoss(TemperatureLoss):
    """Supervised contrastive loss (Khosla et al. 2020), the L^sup_out form, cosine similarity.

    Per anchor a with positives P(a) (same label; ≠ a in-batch) among its candidates K(a)
    (the references, or the batch without a):
        -1/|P(a)| Σ_{p∈P(a)} log(exp(s_ap/τ) / Σ_{k∈K(a)} exp(s_ak/τ))
    averaged over the anchors that have at least one positive (0 when none does).
    """

    registry_name = "supcon"

    default_temperature = 0.07

    def compute(self, embeddings, labels, ref_embeddings=None, ref_labels=None):
        positive, log_prob = _positives_and_log_prob(embeddings, labels, ref_embeddings, ref_labels,
                                                     self.temperature)
        n_pos = count(positive, axis=1)
        per_anchor = -ops.sum(ops.where(positive, log_prob, 0.0), axis=1) / ops.maximum(n_pos, 1.0)
        return masked_mean(per_anchor, n_pos > 0.0)


@keras.saving.register_keras_serializable(package="embedlab")
class InfoNCELoss(TemperatureLoss):
    """NT-Xent / InfoNCE over the positive pairs of a labelled batch, cosine similarity.

    For each anchor a and each of its positives p (same label; ≠ a in-batch) among its
    candidates K(a) (the references, or the batch without a):
        -log(exp(s_ap/τ) / Σ_{k∈K(a)} exp(s_ak/τ))
    averaged over all (anchor, positive) pairs (0 when there is none). Unlike SupCon,
    anchors with many positives weigh more. With paired references of distinct labels
    this is CLIP's image-to-text term.
    """

    registry_name = "infonce"

    default_temperature = 0.1

    def compute(self, embeddings, labels, ref_embeddings=None, ref_labels=None):
        positive, log_prob = _positives_and_log_prob(embeddings, labels, ref_embeddings, ref_labels,
                                                     self.temperature)
        return masked_mean(-log_prob, positive)
