"""Phase 3's settings: `TrainConfig`, each field with its fingerprint rule, and their validation.

Apart from pipeline/config.py (which re-exports `TrainConfig` and calls `validate_training`) because the
training settings alone are a long list, each field documented where it is declared.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config_io import ConfigError

__all__ = ["HardNegativesConfig", "TrainConfig", "validate_training"]

_CHOICES = {
    "distill_match": ("cosine", "mse"),
    "head_type": ("projection", "transformer"),
    "head_pooling": ("cls", "attention"),
    "fusion": ("average", "concat", "gate"),
    "triplet_negatives": ("", "random", "hard"),
}


@dataclass
class HardNegativesConfig:
    """Where the hard-negative table that seeds the batches comes from (`train.hard_negatives`; used while
    `train.hard_negative_share` > 0). Fingerprinted as a whole (TrainConfig.hard_negatives)."""

    # "baseline": ranked once, under the phase-1 features. "current": the first `refresh_every` epochs use that
    # ranking too; then every `refresh_every` epochs the training items are re-embedded with the model being
    # trained and ranked again (pipeline/training/refresh.py), and the new table builds the following batches.
    source: str = "baseline"
    refresh_every: int = 1
    # Share of each item's `hard_negatives_per_item` listed negatives replaced by random true negatives (seeded
    # per table): a mix that keeps some easy negatives in front of the loss. 0 = only the hardest.
    random_share: float = 0.0


_HARD_NEGATIVES_DEFAULT = {"source": "baseline", "refresh_every": 1, "random_share": 0.0}


@dataclass
class TrainConfig:
    """Phase 3: metric-learning heads (and, later, fine-tuned backbones).

    Every field says, in its metadata, whether it enters the fingerprint of a trained
    model (pipeline/training/loop.py `fingerprinted_settings` reads it; a field without
    the rule is refused there, so a new setting cannot silently retrain, or fail to
    retrain, every finished model):
        {"fingerprint": True}                       its value enters
        {"fingerprint": False}                      it never does (the comment says why)
        "modes": ("finetune",)                      it enters only in these modes (and is
                                                    only recorded in their training.json)
        "omitted_at": value                         added after models were first trained: at the
                                                    value that reproduces those models it stays out,
                                                    so finished runs stay up to date
        "fixed_at": value                           it enters at this value whatever it is set to
        "used_if": "other_field"                    it enters only while that setting is > 0
        "only_with": ("other_field", value)         it enters only while that setting has this value
        "per_loss": True                            each model fingerprints and records its own
                                                    loss (name and full configuration) instead
    """

    # One or several losses from models.losses.LOSSES; each trains its own model.
    # Not fingerprinted as a list: each model's fingerprint holds its own loss and configuration.
    losses: list[str] = field(default_factory=lambda: ["triplet"],
                              metadata={"fingerprint": False, "per_loss": True})
    # "head": frozen backbone, train the head on cached phase-1 features.
    # "finetune": train the trunk's last layers and the head end to end, on images.
    mode: str = field(default="head", metadata={"fingerprint": True})
    # Width of the trained embedding head. Finetune mode only: 0 = no head, the backbone's own
    # L2-normalised output is the embedding (CLIP fine-tuned as it is, e.g. configs/clip-supcon.yaml).
    embedding_dim: int = field(default=512, metadata={"fingerprint": True})
    epochs: int = field(default=30, metadata={"fingerprint": True})
    # Class-balanced batches: P classes × K samples.
    n_classes_per_batch: int = field(default=16, metadata={"fingerprint": True})
    n_samples_per_class: int = field(default=4, metadata={"fingerprint": True})
    # 0 = one pass over the training items
    steps_per_epoch: int = field(default=0, metadata={"fingerprint": True})
    learning_rate: float = field(default=1e-3, metadata={"fingerprint": True})
    weight_decay: float = field(default=1e-4, metadata={"fingerprint": True})
    early_stopping_patience: int = field(default=5, metadata={"fingerprint": True})
    reduce_lr_patience: int = field(default=2, metadata={"fingerprint": True})
    # Epochs between periodic checkpoints.
    checkpoint_every: int = field(default=5, metadata={"fingerprint": True})
    # Per-loss hyper-parameters, e.g. {"triplet": {"margin": 0.2, "mining": "semi_hard"}}.
    # Not fingerprinted as a whole: each model's fingerprint holds its own loss's full configuration.
    loss_params: dict = field(default_factory=dict, metadata={"fingerprint": False, "per_loss": True})
    # Used when the dataset has no usable validation split: the share of the training
    # classes held out, or, when the classes left could not fill a batch
    # (n_classes_per_batch), the share of each training class's items.
    holdout_fraction: float = field(default=0.1, metadata={"fingerprint": True})
    # XLA-compile the train step: batches are fixed-size P×K, so it compiles once; on
    # 2 CPU cores it roughly doubles head-mode steps/s (bench/bench_loss_overhead.py).
    jit_compile: bool = field(default=True, metadata={"fingerprint": True})
    # Also save the image-level model (backbone + head): .keras and a TF SavedModel.
    # Whether phase 3 exports changes nothing about training: always fingerprinted as
    # its default, so fingerprints from before the setting existed still match.
    export: bool = field(default=True, metadata={"fingerprint": True, "fixed_at": True})
    seed: int = field(default=0, metadata={"fingerprint": True})
    # mixed_float16 compute (GPUs); the losses and the final L2 normalisation stay float32.
    mixed_precision: bool = field(default=False, metadata={"fingerprint": True, "omitted_at": False})
    # MirroredStrategy over exactly these devices (e.g. ["/gpu:0", "/gpu:1"]); empty: all
    # visible GPUs when there are several, TF_CONFIG's workers when it is set (pipeline/distribute.py).
    # Not fingerprinted: the same global batches are learnt from on any number of devices.
    devices: list[str] = field(default_factory=list, metadata={"fingerprint": False})
    # What makes two items a positive pair: "label", or "group" (items derived from one
    # original: the original and its variants); other groups are the negatives.
    positives: str = field(default="label", metadata={"fingerprint": True, "omitted_at": "label"})
    # Hard-negative seeding: share of each batch's other P-1 classes taken from the
    # classes of the items the phase-1 baseline ranks highest for the batch's anchor
    # (0 = plain class-balanced batches), from each item's `hard_negatives_per_item` top negatives.
    hard_negative_share: float = field(default=0.0, metadata={"fingerprint": True, "omitted_at": 0.0})
    hard_negatives_per_item: int = field(default=10, metadata={"fingerprint": True,
                                                                "used_if": "hard_negative_share"})
    # The table's source and refresh (HardNegativesConfig above), e.g. {source: current, refresh_every: 2}.
    hard_negatives: HardNegativesConfig = field(default_factory=HardNegativesConfig, metadata={
        "fingerprint": True, "omitted_at": _HARD_NEGATIVES_DEFAULT, "used_if": "hard_negative_share"})
    # Distillation (`mode: distill`, pipeline/training/distill.py): the teacher whose embedding space the student
    # learns on the training images: a model of this run ("mobilenet-a0.25+arcface", as phase 4 names it, or a
    # phase-1 tag), another run's ("RUN/TAG"), or a folder holding an embedding_model.keras.
    teacher: str = field(default="", metadata={"fingerprint": True, "modes": ("distill",)})
    # Which of extract.backbones are students (their tag or backbone name); "" = every backbone except the
    # teacher's own. Not fingerprinted: each student's fingerprint holds its own backbone.
    student: str = field(default="", metadata={"fingerprint": False, "modes": ("distill",)})
    # The embedding-matching term: "cosine" (1 - cos) or "mse" between the (projected) student embedding and the
    # teacher's; a learnable projection is trained alongside when the dimensions differ (not part of the student).
    distill_match: str = field(default="cosine", metadata={"fingerprint": True, "modes": ("distill",)})
    distill_match_weight: float = field(default=1.0, metadata={"fingerprint": True, "modes": ("distill",)})
    # Relational KD (Park et al. 2019), distance-wise: pairwise distances within the batch, each set divided by
    # its mean, matched with a Huber loss.
    distill_relational_weight: float = field(default=1.0, metadata={"fingerprint": True, "modes": ("distill",)})
    # Optionally also a metric-learning loss on the labels (a models.losses name; its train.loss_params apply).
    distill_label_loss: str = field(default="", metadata={"fingerprint": True, "modes": ("distill",)})
    distill_label_weight: float = field(default=1.0, metadata={"fingerprint": True, "modes": ("distill",)})
    # Finetune mode only. How many of the trunk's last units train, counted from the output
    # (BatchNormalization layers among them stay frozen); 0 trains the head alone, on images; a count
    # at or above the number of units trains the whole trunk. The units are the backbone's
    # (models/backbones/registry.py `finetune_units`): for keras.applications backbones the trunk's
    # layers; for CLIP, input to output: patch+position embedding, pre layer norm, each transformer
    # block, post layer norm, projection. So for CLIP 1 = the projection, 2 = + post layer norm,
    # 2 + b = + the last b transformer blocks, blocks + 4 = the whole vision tower (28 for ViT-L/14).
    finetune_layers: int = field(default=20, metadata={"fingerprint": True, "modes": ("finetune", "distill")})
    # The trunk's learning rate; the head trains at `learning_rate` (one AdamW with a
    # per-variable multiplier, models/optimizers.py).
    finetune_learning_rate: float = field(default=1e-4, metadata={"fingerprint": True,
                                                                  "modes": ("finetune", "distill")})
    # Random resized crop, horizontal flip and mild colour jitter of training images.
    augment: bool = field(default=True, metadata={"fingerprint": True, "modes": ("finetune", "distill")})
    # After every epoch, the top-k neighbours (exact cosine search) of every validation item (the
    # items the epoch's val_P@1 / val_MAP@R score, leave-one-out), ranked by the model as it is at the
    # end of that epoch: results/retrieval_results_epoch_XX.json in the model's folder, a list of
    # {query_id, query_label, ranked_ids, scores, labels}. 0 = off. Fingerprinted (the files come
    # only from training) except at 0, so models trained before the setting existed stay current.
    epoch_results_top_k: int = field(default=0, metadata={"fingerprint": True, "omitted_at": 0})
    # The head that head mode trains: "projection" (Dense -> BatchNorm -> L2 on the pooled features,
    # models/heads/projection.py) or "transformer" (TransformerProjection, models/heads/transformer_projection.py:
    # on phase 1's cached tokens when extract.tokens was on, else on the pooled vector as a sequence of one).
    # The head_* settings below are the transformer's; they enter the fingerprint only with it.
    head_type: str = field(default="projection", metadata={"fingerprint": True, "omitted_at": "projection",
                                                           "modes": ("head",)})
    head_layers: int = field(default=2, metadata={"fingerprint": True, "only_with": ("head_type", "transformer"),
                                                  "modes": ("head",)})
    head_heads: int = field(default=8, metadata={"fingerprint": True, "only_with": ("head_type", "transformer"),
                                                 "modes": ("head",)})
    # "cls" (a learned class token prepended) or "attention" (attention pooling with a learned query).
    head_pooling: str = field(default="cls", metadata={"fingerprint": True, "only_with": ("head_type", "transformer"),
                                                       "modes": ("head",)})
    # Width of the transformer blocks: 0 = the tokens' own channels (768 for CLIP ViT-B/32); a smaller width
    # puts a Dense in front (cheaper on a CPU).
    head_width: int = field(default=0, metadata={"fingerprint": True, "only_with": ("head_type", "transformer"),
                                                 "modes": ("head",)})
    head_dropout: float = field(default=0.1, metadata={"fingerprint": True,
                                                       "only_with": ("head_type", "transformer"), "modes": ("head",)})
    # Start the transformer head from the frozen pooled embedding (an orthogonal skip from the tokens' mean; the
    # transformer branch learns a correction, starting at zero): see models/heads/transformer_projection.py.
    head_residual: bool = field(default=False, metadata={"fingerprint": True, "omitted_at": False,
                                                         "only_with": ("head_type", "transformer"),
                                                         "modes": ("head",)})
    # Fuse each item's phase-1 text embedding (a CLIP backbone's text tower) with its image embedding
    # (models/heads/fusion.py; items without text keep their image embedding). `fusion`: "average", "concat"
    # or "gate". A loss that compares images with texts (multimodal_contrastive) then also gets the texts.
    use_text: bool = field(default=False, metadata={"fingerprint": True, "omitted_at": False, "modes": ("head",)})
    fusion: str = field(default="average", metadata={"fingerprint": True, "only_with": ("use_text", True),
                                                      "modes": ("head",)})
    # With positives by group: each group's K items in a batch start with its original (items.csv `role`
    # "original", else the group's first item), so every batch holds the seed's triplets: anchor = an original,
    # positive = one of its versions, negative = another group's item (hard ones with hard_negative_share).
    anchor_originals: bool = field(default=False, metadata={"fingerprint": True, "omitted_at": False})
    # Validation triplet accuracy per epoch (history.csv `val_triplet_accuracy`): per validation group, its
    # anchor (as above) with each other member and a negative, "random" (seeded) or "hard" (the non-member
    # the phase-1 baseline puts closest to the anchor); "" = off. Fingerprinted except when off (the
    # column comes only from training), so models trained before the setting existed stay current.
    triplet_negatives: str = field(default="", metadata={"fingerprint": True, "omitted_at": ""})


def validate_training(train: TrainConfig) -> None:
    """Every rule on phase 3's settings that needs no TensorFlow (ConfigError names the setting)."""
    if not train.losses:
        raise ConfigError("train.losses is empty: name at least one loss")
    for key in ("n_classes_per_batch", "n_samples_per_class"):
        if getattr(train, key) < 2:
            raise ConfigError(f"train.{key} must be at least 2")
    if train.epochs < 1 or train.steps_per_epoch < 0 or train.embedding_dim < 0:
        raise ConfigError("train.epochs must be positive, train.embedding_dim and train.steps_per_epoch >= 0")
    if train.embedding_dim == 0 and train.mode == "head":
        raise ConfigError("train.embedding_dim 0 (no head) needs train.mode finetune or distill: in head mode the "
                          "head is all that trains")
    if train.epoch_results_top_k < 0:
        raise ConfigError(f"train.epoch_results_top_k must be >= 0 (0 = off), got {train.epoch_results_top_k}")
    if train.finetune_layers < 0 or train.finetune_learning_rate <= 0 or train.learning_rate <= 0:
        raise ConfigError("train.finetune_layers must be >= 0, train.learning_rate and "
                          "train.finetune_learning_rate positive")
    for key, allowed in _CHOICES.items():
        if getattr(train, key) not in allowed:
            raise ConfigError(f"train.{key} must be one of {allowed}, got {getattr(train, key)!r}")
    if train.head_layers < 1 or train.head_heads < 1 or train.head_width < 0 or not 0 <= train.head_dropout < 1:
        raise ConfigError("train.head_layers and train.head_heads must be >= 1, train.head_width >= 0 and "
                          "train.head_dropout in [0, 1)")
    if train.mode != "head" and (train.head_type != "projection" or train.use_text):
        raise ConfigError("train.head_type transformer and train.use_text are head-mode settings (they train on "
                          "phase 1's cached tokens and texts): use train.mode head")
    if train.anchor_originals and train.positives != "group":
        raise ConfigError("train.anchor_originals needs train.positives group (originals anchor their groups)")
    _validate_hard_negatives(train)
    _validate_distillation(train)


def _validate_hard_negatives(train: TrainConfig) -> None:
    if not 0.0 <= train.hard_negative_share <= 1.0:
        raise ConfigError(f"train.hard_negative_share must lie in [0, 1], got {train.hard_negative_share}")
    if train.hard_negatives_per_item < 1:
        raise ConfigError("train.hard_negatives_per_item must be at least 1")
    table = train.hard_negatives
    if table.source not in ("baseline", "current"):
        raise ConfigError(f"train.hard_negatives.source must be 'baseline' or 'current', got {table.source!r}")
    if table.refresh_every < 1:
        raise ConfigError(f"train.hard_negatives.refresh_every must be at least 1 (epochs), got {table.refresh_every}")
    if not 0.0 <= table.random_share <= 1.0:
        raise ConfigError(f"train.hard_negatives.random_share must lie in [0, 1], got {table.random_share}")
    if (table.source != "baseline" or table.random_share > 0) and train.hard_negative_share <= 0:
        raise ConfigError("train.hard_negatives needs train.hard_negative_share > 0 (--hard-negatives 0.5): without "
                          "it no batch is seeded with hard negatives")
    if table.source == "current" and train.mode == "distill":
        raise ConfigError("train.hard_negatives.source current is for head and finetune modes; distillation "
                          "follows its teacher")


def _validate_distillation(train: TrainConfig) -> None:
    if train.mode != "distill":
        return
    if not train.teacher.strip():
        raise ConfigError("train.mode distill needs a teacher: --teacher TAG (a model of the run, e.g. "
                          "mobilenet-a0.25+arcface), RUN/TAG or a folder with embedding_model.keras")
    for key in ("distill_match_weight", "distill_relational_weight", "distill_label_weight"):
        if not getattr(train, key) >= 0:
            raise ConfigError(f"train.{key} must be >= 0, got {getattr(train, key)!r}")
    if train.distill_match_weight == 0 and train.distill_relational_weight == 0:
        raise ConfigError("train.distill_match_weight and train.distill_relational_weight are both 0: the student "
                          "would learn nothing from its teacher")
