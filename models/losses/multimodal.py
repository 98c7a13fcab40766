"""The multimodal contrastive loss of SiameseCLIP (../shared/seeds/000_*.txt): images and their texts.

The item embeddings are the queries (`embeddings`); the items' text embeddings, projected into the same
space, are the references (`ref_embeddings`, with `ref_labels`), so the loss keeps the contract of
models/losses/base.py. A reference row of zeros is a text that is absent (an item without text: the
convention of phase 1's text_embeddings.npy), and takes part in no term.

Every term is the seed's two-way softmax over (anchor, positive, negative) triplets on cosine similarity,
-log(exp(s_ap/τ) / (exp(s_ap/τ) + exp(s_an/τ))), averaged over all valid triplets of the batch:

    image   anchors, positives, negatives: item embeddings (in-batch, p ≠ a): contrastive_softmax
    text    the same among the present texts (p ≠ a)
    i → t   anchor an item, positive and negative present texts ((i, i) counts: an item and its own text)
    t → i   anchor a present text, positive and negative items

    loss = image + alpha_text · text + alpha_cross · (i → t + t → i)

Why the seed's triplet form and not InfoNCE over the batch: it is the objective the seed's numbers
(triplet accuracy 0.975 → 0.990) were reached with, and on class-balanced P × K batches its mean over
all valid triplets uses every triplet the batch holds (the seed's original → version → other, and the
symmetric ones), each bounded by log 2 at s_ap = s_an, so a term cannot be dominated by one hard negative.
A term with no valid triplet (no text in the batch, a single present text) contributes exactly 0,
with a finite, zero gradient. Without references the loss is its image term: contrastive_softmax.
"""
from __future__ import annotations

import keras
from keras import ops

from models.losses.base import TemperatureLoss, cosine_similarity, pair_masks, resolve_reference
from models.losses.pair import two_way_softmax_mean


def present_rows(x):
    """(n,) bool: the rows that are not all zeros (a text that exists)."""
    return ops.any(ops.not_equal(x, 0.0), axis=-1)


def _only_between(mask, row_present, column_present):
    """`mask` (B, M) restricted to rows and columns that are present."""
    return ops.logical_and(mask, ops.logical_and(ops.expand_dims(row_present, 1), ops.expand_dims(column_present, 0)))


@keras.saving.register_keras_serializable(package="embedlab")
class MultimodalContrastiveLoss(TemperatureLoss):
    """image + alpha_text · text + alpha_cross · (image→text + text→image), each the seed's two-way softmax.

    `compute(embeddings, labels, ref_embeddings=None, ref_labels=None)`: item embeddings (B, d) and the
    texts (M, d) with their labels (all-zero rows = no text). Temperature τ (default 0.1), alpha_text and
    alpha_cross (default 0.3 each, the seed's).
    """

    registry_name = "multimodal_contrastive"
    default_temperature = 0.1
    # Trainers hand it the items' texts as references (pipeline/training/objectives.py).
    uses_text_references = True

    def __init__(self, temperature: float | None = None, alpha_text: float = 0.3, alpha_cross: float = 0.3,
                 **kwargs):
        super().__init__(temperature=temperature, **kwargs)
        for key, value in (("alpha_text", alpha_text), ("alpha_cross", alpha_cross)):
            if not value >= 0:
                raise ValueError(f"{key} must be >= 0, got {value!r}")
        self.alpha_text = float(alpha_text)
        self.alpha_cross = float(alpha_cross)

    def params(self):
        return {"temperature": self.temperature, "alpha_text": self.alpha_text, "alpha_cross": self.alpha_cross}

    def terms(self, embeddings, labels, ref_embeddings=None, ref_labels=None) -> dict:
        """Each term's value (scalars): "image", "text", "image_to_text", "text_to_image" (0 where absent)."""
        embeddings, labels, ref_embeddings, ref_labels = resolve_reference(embeddings, labels, ref_embeddings,
                                                                           ref_labels)
        positive, negative = pair_masks(labels)
        values = {"image": two_way_softmax_mean(cosine_similarity(embeddings), positive, negative, self.temperature)}
        if ref_embeddings is None:
            zero = ops.zeros((), "float32")
            return {**values, "text": zero, "image_to_text": zero, "text_to_image": zero}
        text = present_rows(ref_embeddings)
        items = ops.ones_like(labels, dtype="bool")
        positive, negative = pair_masks(ref_labels)
        values["text"] = two_way_softmax_mean(cosine_similarity(ref_embeddings), _only_between(positive, text, text),
                                              _only_between(negative, text, text), self.temperature)
        cross = cosine_similarity(embeddings, ref_embeddings)
        positive, negative = pair_masks(labels, ref_labels)
        values["image_to_text"] = two_way_softmax_mean(cross, _only_between(positive, items, text),
                                                       _only_between(negative, items, text), self.temperature)
        positive, negative = pair_masks(ref_labels, labels)
        values["text_to_image"] = two_way_softmax_mean(ops.transpose(cross), _only_between(positive, text, items),
                                                       _only_between(negative, text, items), self.temperature)
        return values

    def compute(self, embeddings, labels, ref_embeddings=None, ref_labels=None):
        values = self.terms(embeddings, labels, ref_embeddings, ref_labels)
        return (values["image"] + self.alpha_text * values["text"]
                + self.alpha_cross * (values["image_to_text"] + values["text_to_image"]))
