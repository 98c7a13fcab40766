"""Run configuration: dataclasses loaded from YAML, overridden from the CLI.

Configuration is data. Every phase reads only its own section plus the run's
identity (name and directories); nothing else is global.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


@dataclass
class DataConfig:
    """Phase 0: where images come from and how they are split."""

    # A folder (one sub-folder per class), a .csv/.parquet manifest with
    # `path,label[,text][,group]`, or a built-in name: fashion_mnist, cifar10.
    source: str = "fashion_mnist"
    # Name of the dataset folder under `tfrecords_dir`; derived from source when empty.
    name: str = ""
    # "stratified": every class in every split. "classes": class-disjoint splits.
    split: str = "stratified"
    ratios: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])
    # Class-disjoint only: "shuffled" (seeded) or "sorted" (by class name, so that
    # e.g. Flowers-102 classes 001-051 train and 052-102 test with ratios [0.5, 0, 0.5]).
    class_order: str = "shuffled"
    seed: int = 42
    # Folder sources: "first" = the first-level sub-folder names the class;
    # "parent" = the image's own parent folder does (e.g. cifar10/train/cat/x.jpg).
    label_from: str = "first"
    # Longest image side kept in the TFRecords; larger images are downscaled. 0 = keep.
    max_side: int = 0
    # Keep at most this many images per class (0 = all); deterministic under seed.
    limit_per_class: int = 0
    shard_size: int = 2048
    tfrecords_dir: str = "tfrecords"
    # Worker processes for decoding/validation; 0 = one per CPU core.
    workers: int = 0


@dataclass
class BackboneConfig:
    """One pretrained feature extractor of phase 1."""

    name: str = "mobilenet"
    # "imagenet" (through Keras's cache), "none" (random init) or a path to a weights file.
    weights: str = "imagenet"
    # What to do when `imagenet` weights cannot be found or downloaded:
    # "error" (default: stop, naming the missing file) or "random" (say so, run random-init).
    weights_fallback: str = "error"
    # Input side in pixels; 0 = the backbone's native resolution.
    image_size: int = 0
    # MobileNet width multiplier.
    alpha: float = 1.0
    # Folder name of this backbone's artifacts; derived when empty.
    tag: str = ""


@dataclass
class ExtractConfig:
    """Phase 1: run each backbone over the splits and store embeddings."""

    backbones: list[BackboneConfig] = field(default_factory=lambda: [BackboneConfig()])
    splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])
    batch_size: int = 64
    # Storage dtype of the compact binary: "float32" or "float16".
    dtype: str = "float32"
    mixed_precision: bool = False
    # The JSON interchange file (id, label, path, vector) next to the .npy files.
    write_json: bool = True
    # FAISS index over the unit embeddings: "flat" (exact inner product) or "hnsw".
    index: str = "flat"


@dataclass
class EvaluateConfig:
    """Phase 2: retrieval metrics, diagnostics, plots and the HTML report."""

    query_split: str = "test"
    # When the query split is among the gallery splits, each query is left out of
    # its own ranking (leave-one-out).
    gallery_splits: list[str] = field(default_factory=lambda: ["test"])
    k: int = 5
    chunk_size: int = 1024
    # Points drawn (stratified, seeded) for the 2-D projections and heatmap.
    projection_sample: int = 2000
    projections: list[str] = field(default_factory=lambda: ["pca", "tsne", "umap"])
    heatmap_sample: int = 400
    grid_queries: int = 8
    kmeans: bool = True
    seed: int = 0


@dataclass
class TrainConfig:
    """Phase 3: metric-learning heads (and, later, fine-tuned backbones)."""

    # One or several losses from models.losses.LOSSES; each trains its own model.
    losses: list[str] = field(default_factory=lambda: ["triplet"])
    # "head": frozen backbone, train the head on cached phase-1 features.
    # "finetune": train the trunk's last layers and the head end to end, on images.
    mode: str = "head"
    embedding_dim: int = 512
    epochs: int = 30
    # Class-balanced batches: P classes × K samples.
    n_classes_per_batch: int = 16
    n_samples_per_class: int = 4
    steps_per_epoch: int = 0          # 0 = one pass over the training items
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    early_stopping_patience: int = 5
    reduce_lr_patience: int = 2
    checkpoint_every: int = 5         # epochs between periodic checkpoints
    # Per-loss hyper-parameters, e.g. {"triplet": {"margin": 0.2, "mining": "semi_hard"}}.
    loss_params: dict = field(default_factory=dict)
    # Used when the dataset has no validation split: share of training classes held out.
    holdout_fraction: float = 0.1
    # XLA-compile the train step: batches are fixed-size P×K, so it compiles once; on
    # 2 CPU cores it roughly doubles head-mode steps/s (bench/bench_loss_overhead.py).
    jit_compile: bool = True
    # Also save the image-level model (backbone + head): .keras and a TF SavedModel.
    export: bool = True
    seed: int = 0
    # mixed_float16 compute (GPUs); the losses and the final L2 normalisation stay float32.
    mixed_precision: bool = False
    # MirroredStrategy over exactly these devices (e.g. ["/gpu:0", "/gpu:1"]); empty: all
    # visible GPUs when there are several, TF_CONFIG's workers when it is set (pipeline/distribute.py).
    devices: list[str] = field(default_factory=list)
    # What makes two items a positive pair: "label", or "group" (items derived from one
    # original: the original and its variants); other groups are the negatives.
    positives: str = "label"
    # Hard-negative seeding: share of each batch's other P-1 classes taken from the
    # classes of the items the phase-1 baseline ranks highest for the batch's anchor
    # (0 = plain class-balanced batches), from each item's `hard_negatives_per_item` top negatives.
    hard_negative_share: float = 0.0
    hard_negatives_per_item: int = 10
    # Finetune mode only. How many of the trunk's last layers train (BatchNormalization
    # layers among them stay frozen); 0 trains the head alone, on images.
    finetune_layers: int = 20
    # The trunk's learning rate; the head trains at `learning_rate` (one AdamW with a
    # per-variable multiplier, models/optimizers.py).
    finetune_learning_rate: float = 1e-4
    # Random resized crop, horizontal flip and mild colour jitter of training images.
    augment: bool = True


@dataclass
class RunConfig:
    name: str = "demo"
    runs_dir: str = "runs"
    reports_dir: str = "reports"
    data: DataConfig = field(default_factory=DataConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# --------------------------------------------------------------------------- loading


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(hint, value, where)
    if origin is list:
        (item_hint,) = get_args(hint)
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, item_hint, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}") from None
        if hint is int and isinstance(value, float) and number != value:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return number
    if hint is str:
        if value is None:
            return ""
        return str(value)
    return value


def from_dict(cls: type, data: dict, where: str = "config") -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


_BACKBONE_ITEM = re.compile(r"^extract\.backbones\.(\d+)\.(\w+)$")


def apply_override(config: RunConfig, dotted: str, value: Any) -> None:
    """Set `section.key=value` (e.g. `evaluate.k=10`, `extract.backbones.0.alpha=0.25`)."""
    m = _BACKBONE_ITEM.match(dotted)
    if m:
        index, key = int(m.group(1)), m.group(2)
        backbones = config.extract.backbones
        if index >= len(backbones):
            raise ConfigError(f"{dotted}: there are only {len(backbones)} backbone(s)")
        _set_field(backbones[index], key, value, dotted)
        return
    parts = dotted.split(".")
    target: Any = config
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(target) or part not in {f.name for f in dataclasses.fields(target)}:
            raise ConfigError(f"unknown setting {dotted!r}")
        target = getattr(target, part)
    _set_field(target, parts[-1], value, dotted)


def _set_field(target: Any, key: str, value: Any, dotted: str) -> None:
    if not dataclasses.is_dataclass(target) or key not in {f.name for f in dataclasses.fields(target)}:
        raise ConfigError(f"unknown setting {dotted!r}")
    hint = get_type_hints(type(target))[key]
    if isinstance(value, str) and get_origin(hint) is not list and hint is not str:
        value = yaml.safe_load(value)
    setattr(target, key, _coerce(value, hint, dotted))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML file (or defaults) and apply `key=value` overrides in order."""
    data: dict = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = loaded
    config = from_dict(RunConfig, data, where=str(path or "config"))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        apply_override(config, key.strip(), value)
    validate(config)
    return config


_CHOICES = {
    ("data", "split"): ("stratified", "classes"),
    ("data", "class_order"): ("shuffled", "sorted"),
    ("data", "label_from"): ("first", "parent"),
    ("extract", "dtype"): ("float32", "float16"),
    ("extract", "index"): ("flat", "hnsw"),
    ("train", "mode"): ("head", "finetune"),
    ("train", "positives"): ("label", "group"),
}


def validate(config: RunConfig) -> None:
    for (section, key), allowed in _CHOICES.items():
        value = getattr(getattr(config, section), key)
        if value not in allowed:
            raise ConfigError(f"{section}.{key} must be one of {allowed}, got {value!r}")
    ratios = config.data.ratios
    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
        raise ConfigError(f"data.ratios must be three non-negative numbers summing to 1, got {ratios}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", config.name):
        raise ConfigError(f"run name {config.name!r} may hold only letters, digits, '.', '_' and '-'")
    for key in ("max_side", "limit_per_class", "workers"):
        if getattr(config.data, key) < 0:
            raise ConfigError(f"data.{key} must not be negative")
    if config.data.shard_size < 1:
        raise ConfigError("data.shard_size must be at least 1")
    if config.extract.batch_size < 1:
        raise ConfigError("extract.batch_size must be at least 1")
    if config.evaluate.k < 1:
        raise ConfigError("evaluate.k must be at least 1")
    if not config.extract.backbones:
        raise ConfigError("extract.backbones is empty")
    for b in config.extract.backbones:
        if b.weights_fallback not in ("error", "random"):
            raise ConfigError(f"weights_fallback must be 'error' or 'random', got {b.weights_fallback!r}")
    if not 0.0 <= config.train.hard_negative_share <= 1.0:
        raise ConfigError(f"train.hard_negative_share must lie in [0, 1], got {config.train.hard_negative_share}")
    if config.train.hard_negatives_per_item < 1:
        raise ConfigError("train.hard_negatives_per_item must be at least 1")
    for p in config.evaluate.projections:
        if p not in ("pca", "tsne", "umap"):
            raise ConfigError(f"evaluate.projections: unknown method {p!r}")
