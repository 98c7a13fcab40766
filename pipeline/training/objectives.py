"""Objectives: how a loss wraps the embedding model for training (the role keras-hub's `Task` plays).

A trainer (head.py, finetune.py) builds the embedding model it will save; the objective
decides what is trained around it and with which labels, so no trainer asks a loss
how it trains:

    EmbeddingObjective    the loss sees the embeddings themselves (triplet, contrastive,
                          multi-similarity, SupCon, InfoNCE); the training model is the
                          embedding model
    ClassifierObjective   the loss sees the logits of a cosine classifier over the
                          training classes (ArcFace); the classifier exists for training
                          only and is never part of the saved model
    TextReferenceObjective  two towers: the loss sees the (fused) item embeddings and, as its
                          references, the items' projected texts (multimodal_contrastive with
                          `train.use_text`; models/heads/fusion.py)

    TeacherObjective      distillation (`mode: distill`): the loss sees the student's embeddings
                          (and their projection to the teacher's width when the widths differ)
                          against the teacher's cached embeddings of the same images
                          (models/losses/distill.py); the projection is never part of the student

Another way of training is one more subclass, overriding `training_labels`, `training_model`
and the summaries.
`objective_for` chooses the class from what the loss declares (`requires_classifier`).
"""
from __future__ import annotations

import functools

import numpy as np

from pipeline.training.loop import jsonable


class EmbeddingObjective:
    """The loss is computed on the embedding model's own output, from the items' keys."""

    kind = "embeddings"

    def __init__(self, loss_name: str, loss, loss_params: dict):
        self.loss_name, self.loss, self.loss_params = loss_name, loss, dict(loss_params)

    def fingerprint(self) -> dict:
        """What a trained model's fingerprint holds of its objective: the loss's full
        configuration, defaults included (a changed default retrains)."""
        return {"loss": self.loss_name, "loss_config": jsonable(self.loss.get_config())}

    def training_labels(self, keys: np.ndarray) -> np.ndarray:
        """The labels the loss is fed for training items with these pair keys."""
        return keys

    def training_model(self, embedding_model, inputs=None):
        """The model that is compiled and fitted: here the embedding model itself."""
        return embedding_model

    def metrics(self) -> list:
        """The Keras metrics the loss says mean something on the training model's output (none for a
        plain Keras loss that does not say)."""
        declared = getattr(type(self.loss), "training_metrics", None)
        return declared() if declared is not None else []

    def compile(self, embedding_model, optimizer, jit_compile: bool, inputs=None):
        """The training model around `embedding_model`, compiled (call under the strategy's scope)."""
        model = self.training_model(embedding_model, inputs)
        model.compile(optimizer=optimizer, loss=self.loss, metrics=self.metrics(), jit_compile=jit_compile)
        return model

    def loss_summary(self) -> dict:
        return {"loss": self.loss_name, "loss_params": self.loss_params,
                "loss_config": jsonable(self.loss.get_config())}

    def model_summary(self) -> dict:
        return {"objective": self.kind, "requires_classifier": False, "n_classifier_classes": None}


class ClassifierObjective(EmbeddingObjective):
    """The loss is computed on a cosine classifier over the embeddings (ArcFace): one weight
    row per training class, trained alongside and dropped when the model is saved."""

    kind = "classifier"

    def __init__(self, loss_name: str, loss, loss_params: dict):
        super().__init__(loss_name, loss, loss_params)
        self.classes: np.ndarray | None = None

    def training_labels(self, keys: np.ndarray) -> np.ndarray:
        # The classifier's logits are indexed 0..C-1, whatever the dataset's labels are.
        self.classes = np.unique(keys)
        return np.searchsorted(self.classes, keys)

    def training_model(self, embedding_model, inputs=None):
        """Embedding model -> CosineClassifier. With `inputs`, the embedding model is applied
        to them as one nested layer (head mode); else the classifier extends its graph."""
        import keras

        from models.classifier import CosineClassifier

        if self.classes is None:
            raise RuntimeError("ClassifierObjective.training_labels must run before training_model")
        embeddings = embedding_model(inputs) if inputs is not None else embedding_model.output
        logits = CosineClassifier(len(self.classes), name="cosine_classifier")(embeddings)
        return keras.Model(embedding_model.input if inputs is None else inputs, logits,
                           name=f"{embedding_model.name}_with_classifier")

    def model_summary(self) -> dict:
        return {"objective": self.kind, "requires_classifier": True,
                "n_classifier_classes": None if self.classes is None else int(self.classes.size)}


class TextReferenceObjective(EmbeddingObjective):
    """The loss scores the fused head's item embeddings against the items' projected texts (its
    references; all-zero rows for items without text): a model with both as outputs, whose loss is
    handed Keras's (labels, {"embeddings", "ref_embeddings"}) whole. The head is saved alone."""

    kind = "text_references"

    def training_model(self, embedding_model, inputs=None):
        from models.heads import TEXT_UNITS

        outputs = {"embeddings": embedding_model.outputs[0],
                   "ref_embeddings": embedding_model.get_layer(TEXT_UNITS).output}
        return _both_towers_class()(embedding_model.inputs, outputs, name=f"{embedding_model.name}_with_texts")

    def metrics(self) -> list:
        # Keras would map a metric over each output; the validation callback scores triplets instead.
        return []

    def model_summary(self) -> dict:
        return {**super().model_summary(), "objective": self.kind}


@functools.cache
def _both_towers_class():
    import keras

    class BothTowersLoss(keras.Model):
        """A model with {"embeddings", "ref_embeddings"} outputs whose loss sees both at once (Keras would
        otherwise map one loss over each output of a dict-output model)."""

        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
            return self.loss(y, y_pred)

    return BothTowersLoss


class TeacherObjective(EmbeddingObjective):
    """Distillation: Keras's y holds each batch image's label and the teacher's embedding of it, and the
    training model outputs {"embeddings"} plus {"projected"} (a bias-free Dense to the teacher's width) when
    the student's width differs; the loss (DistillationLoss) is handed both dicts whole."""

    kind = "teacher"

    def __init__(self, loss, teacher_dim: int, teacher: dict):
        super().__init__("distill", loss, loss.get_config())
        self.teacher_dim, self.teacher = int(teacher_dim), dict(teacher)
        self.projected = False

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "teacher": jsonable(self.teacher)}

    def training_model(self, embedding_model, inputs=None):
        import keras

        embeddings = embedding_model.outputs[0]
        outputs = {"embeddings": embeddings}
        self.projected = int(embeddings.shape[-1]) != self.teacher_dim
        if self.projected:
            outputs["projected"] = keras.layers.Dense(self.teacher_dim, use_bias=False,
                                                      name="teacher_projection")(embeddings)
        return _both_towers_class()(embedding_model.inputs, outputs, name=f"{embedding_model.name}_distilled")

    def metrics(self) -> list:
        return []

    def loss_summary(self) -> dict:
        return {**super().loss_summary(), "teacher": jsonable(self.teacher)}

    def model_summary(self) -> dict:
        return {**super().model_summary(), "objective": self.kind, "teacher_dim": self.teacher_dim,
                "projection": self.projected}


def objective_for(loss_name: str, loss_params: dict | None = None, use_text: bool = False) -> EmbeddingObjective:
    """The objective that trains with the loss `loss_name` (models.losses) and its parameters; `use_text`:
    the head fuses texts, and a loss that compares items with texts (`uses_text_references`) gets them."""
    from models.losses import get_loss

    params = dict(loss_params or {})
    loss = get_loss(loss_name, **params)
    if getattr(loss, "requires_classifier", False):
        kind = ClassifierObjective
    elif use_text and getattr(loss, "uses_text_references", False):
        kind = TextReferenceObjective
    else:
        kind = EmbeddingObjective
    return kind(loss_name, loss, params)
