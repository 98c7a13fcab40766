"""Run configuration: dataclasses loaded from YAML, overridden from the CLI.

Configuration is data. Every phase reads only its own section plus the run's
identity (name and directories); nothing else is global.
"""
from __future__ import annotations

import dataclasses
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.backbones import DEFAULT_BACKBONE, get_spec
from pipeline.config_io import ConfigError, from_dict, parse_value, read_yaml_file, set_field, to_dict
from pipeline.train_config import TrainConfig, validate_training

__all__ = ["ConfigError", "DataConfig", "BackboneConfig", "ExtractConfig", "EnsembleConfig", "EvaluateConfig",
           "TrainConfig", "RunConfig", "load_config", "apply_override", "validate", "validate_losses", "to_dict",
           "from_dict"]


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
    # Texts (a manifest's `text` column) longer than this many characters are reported and kept whole;
    # CLIP's cut at 77 tokens is counted in phase 1, where the tokenizer is known.
    max_text_chars: int = 1000
    # A class-name prompt such as "a photo of a {label}" ("" = none): with text_prompt_mode "missing" it
    # becomes the text of items without one, with "all" the text of every item. `{label}` is the only
    # field; underscores in class names become spaces.
    text_prompt: str = ""
    text_prompt_mode: str = "missing"
    # The unit of a manifest's boxes (`x, y, w, h` columns, one item per box): "pixels" or "fractions" of the
    # image's width and height. Said, never guessed from the values (a 1-pixel box at 0,0 reads as a whole image).
    box_units: str = "pixels"
    # Boxes from an object detector (pipeline/data/detector.py): a keras-hub ObjectDetector preset name or folder
    # ("" = none). Each whole image becomes one item per detection (confidence >= detector_threshold, at most
    # detector_max_boxes, best first), labelled with the image's class; an image without one is a reject.
    detector: str = ""
    detector_threshold: float = 0.5
    detector_max_boxes: int = 5


@dataclass(init=False)
class BackboneConfig:
    """One pretrained feature extractor of phase 1."""

    name: str = DEFAULT_BACKBONE
    # "imagenet" (through Keras's cache), "none" (random init) or a path to a weights file.
    weights: str = "imagenet"
    # What to do when `imagenet` weights cannot be found or downloaded:
    # "error" (default: stop, naming the missing file) or "random" (say so, run random-init).
    weights_fallback: str = "error"
    # Input side in pixels; 0 = the backbone's native resolution.
    image_size: int = 0
    # The backbone's own options, which each backbone lists with their defaults (models/backbones);
    # from the command line `--backbone-param KEY=VALUE`.
    params: dict = field(default_factory=dict)
    # Seed of a random initialisation (weights: none, or the random fallback), so that two runs
    # of one configuration, or the two halves of a resumed extraction, use the same network.
    init_seed: int = 0
    # Folder name of this backbone's artifacts; derived when empty.
    tag: str = ""

    def __init__(self, name: str = DEFAULT_BACKBONE, weights: str = "imagenet", weights_fallback: str = "error",
                 image_size: int = 0, params: dict | None = None, init_seed: int = 0, tag: str = "",
                 **param_values: Any):
        """The backbone's options may also come as keywords, as configs wrote them before `params` existed."""
        self.name, self.weights, self.weights_fallback = name, weights, weights_fallback
        self.image_size, self.init_seed, self.tag = image_size, init_seed, tag
        self.params = {**param_values, **(params or {})}

    @classmethod
    def normalise_keys(cls, data: dict, where: str) -> dict:
        """Options written beside the fields (as configs did before `params` existed) move into `params`;
        explicit `params` win."""
        spec = _backbone_spec(data.get("name", DEFAULT_BACKBONE), where)
        names = {f.name for f in dataclasses.fields(cls)}
        lifted = {k: v for k, v in data.items() if k not in names and (k in spec.params or k in spec.legacy_keys)}
        if not lifted:
            return data
        params = data.get("params") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"{where}.params: expected a mapping, got {params!r}")
        return {**{k: v for k, v in data.items() if k not in lifted}, "params": {**lifted, **params}}

    def resolved_params(self) -> dict:
        """Every option of this backbone, defaults filled in (ValueError for one it does not take)."""
        return get_spec(self.name).resolve_params(self.params)

    def artifact_tag(self) -> str:
        """The folder name of this backbone's artifacts, e.g. `resnet50-224-imagenet`."""
        return self.tag or get_spec(self.name).tag(self.params, self.image_size, self.weights)

    def extractor_options(self, **overrides: Any) -> dict:
        """The keyword arguments of `models.backbones.build_feature_extractor` for this backbone."""
        return {"name": self.name, "weights": self.weights, "image_size": self.image_size,
                "params": self.resolved_params(), "weights_fallback": self.weights_fallback,
                "init_seed": self.init_seed, **overrides}

    def fingerprint_fields(self) -> dict:
        """What decides this backbone's features, as artifact fingerprints hold it.

        The options sit beside the other fields (as before `params` existed), and the seed of
        a random initialisation enters only where the network is random by choice.
        """
        fields = {"name": self.name, "weights": self.weights, "weights_fallback": self.weights_fallback,
                  "image_size": self.image_size, "tag": self.tag,
                  **get_spec(self.name).fingerprint_params(self.params)}
        if self.weights == "none":
            fields["init_seed"] = self.init_seed
        return fields


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
    # FAISS index over the unit embeddings: "flat" (exact inner product), "hnsw", "ivfpq" (IVF-PQ with 8-bit
    # re-scoring) or "auto" (flat up to 200,000 items, IVF-PQ beyond; pipeline/vectors/index.py).
    index: str = "flat"
    # Backbones with a text tower (CLIP): also embed the items' texts and one prompt per class.
    text: bool = True
    # The class prompt of zero-shot classification ("{label}" = the class name, underscores as spaces).
    # Embedded here in phase 1, where the text tower is, so it belongs to this section and its fingerprint.
    zero_shot_prompt: str = "a photo of a {label}"
    # Also cache each item's token sequence (tokens.npy, float16, memory-mapped): CLIP's class + patch tokens,
    # a CNN's last feature-map positions. What phase 3's transformer head trains on (train.head_type).
    tokens: bool = False


@dataclass
class EnsembleConfig:
    """One ensemble of embedding spaces, evaluated (phases 2/4), compared (phase 5) and exported as one more model:
    its members' unit vectors, weighted, combined and re-normalised (pipeline/vectors/ensemble.py)."""

    # Embedding tags of this run: phase-1 backbones (`mobilenet-a0.25-224-imagenet`) and trained models of
    # phase 3 (`<backbone tag>+<loss>`). An ensemble of phase-1 members is evaluated in phase 2, one with a trained
    # member in phase 4.
    members: list[str] = field(default_factory=list)
    # "concat" (Σ d_i dimensions) or "mean" (members of one dimension, averaged).
    combine: str = "concat"
    # One positive weight per member; [] = equal weights.
    weights: list[float] = field(default_factory=list)
    # Its embedding tag (folder name); derived from the members when empty.
    name: str = ""

    def tag(self) -> str:
        return self.name or f"ens-{self.combine}-" + "__".join(self.members)


@dataclass
class EvaluateConfig:
    """Phase 2: retrieval metrics, diagnostics, plots and the HTML report."""

    query_split: str = "test"
    # When the query split is among the gallery splits, each query is left out of
    # its own ranking (leave-one-out).
    gallery_splits: list[str] = field(default_factory=lambda: ["test"])
    k: int = 5
    chunk_size: int = 1024
    # Queries scored: 0 = every item of the query split; otherwise at most this many, drawn
    # stratified by class with `seed` (the gallery is never sampled).
    max_queries: int = 0
    # Points drawn (stratified, seeded) for the 2-D projections and heatmap.
    projection_sample: int = 2000
    projections: list[str] = field(default_factory=lambda: ["pca", "tsne", "umap"])
    heatmap_sample: int = 400
    grid_queries: int = 8
    kmeans: bool = True
    seed: int = 0
    # Category re-ranking measured beside the plain ranking (seed 003's hard category mask): any of
    # "filter" (the predicted category first) and "boost" (+rerank_boost to its scores); [] = not measured.
    # Each mode is one more retrieval pass over the unit vectors.
    rerank: list[str] = field(default_factory=list)
    rerank_boost: float = 0.1
    # Neighbours whose majority label is a query's predicted category.
    rerank_vote_k: int = 10
    # Ensembles of this run's embedding spaces, each evaluated as one more entry (EnsembleConfig). Not part of any
    # evaluation's fingerprint: which ensembles exist changes no other set's numbers.
    ensembles: list[EnsembleConfig] = field(default_factory=list)


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


def _backbone_spec(name: Any, where: str):
    try:
        return get_spec(str(name))
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


_BACKBONE_ITEM = re.compile(r"^extract\.backbones\.(\d+)\.(\w+)(?:\.(\w+))?$")


def apply_override(config: RunConfig, dotted: str, value: Any) -> None:
    """Set `section.key=value` (e.g. `evaluate.k=10`, `extract.backbones.0.params.OPTION=VALUE`).

    A backbone's option may also be set beside its fields (`extract.backbones.0.OPTION=VALUE`).
    """
    m = _BACKBONE_ITEM.match(dotted)
    if m:
        index, key, option = int(m.group(1)), m.group(2), m.group(3)
        backbones = config.extract.backbones
        if index >= len(backbones):
            raise ConfigError(f"{dotted}: there are only {len(backbones)} backbone(s)")
        backbone = backbones[index]
        if option is None and key not in {f.name for f in dataclasses.fields(backbone)}:
            spec = _backbone_spec(backbone.name, dotted)
            if key in spec.params or key in spec.legacy_keys:
                key, option = "params", key
        if key == "params" and option is not None:
            backbone.params = {**backbone.params, option: parse_value(value, dotted)}
            return
        if option is not None:
            raise ConfigError(f"unknown setting {dotted!r}")
        set_field(backbone, key, value, dotted)
        return
    if dotted == "evaluate.ensembles" and isinstance(value, str):
        value = parse_value(value, dotted)   # a YAML list of mappings, not a comma-separated list
    parts = dotted.split(".")
    target: Any = config
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(target) or part not in {f.name for f in dataclasses.fields(target)}:
            raise ConfigError(f"unknown setting {dotted!r}")
        target = getattr(target, part)
    set_field(target, parts[-1], value, dotted)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML file (or defaults) and apply `key=value` overrides in order."""
    data: dict = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = read_yaml_file(path) or {}
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
    ("data", "text_prompt_mode"): ("missing", "all"),
    ("data", "box_units"): ("pixels", "fractions"),
    ("extract", "dtype"): ("float32", "float16"),
    ("extract", "index"): ("flat", "hnsw", "ivfpq", "auto"),
    ("train", "mode"): ("head", "finetune", "distill"),
    ("train", "positives"): ("label", "group"),
}


def validate(config: RunConfig) -> None:
    """Every rule that needs no TensorFlow, so a command stops on a bad setting before any work
    (the loss names are checked by `validate_losses`, for the phases that train). Backbone options are
    normalised on the way: defaults filled in, values of the declared type."""
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
    if not 0.0 <= config.data.detector_threshold <= 1.0 or config.data.detector_max_boxes < 1:
        raise ConfigError("data.detector_threshold must lie in [0, 1] and data.detector_max_boxes be at least 1")
    if config.data.max_text_chars < 1:
        raise ConfigError("data.max_text_chars must be at least 1")
    _validate_prompt(config.data.text_prompt, "data.text_prompt", required=False)
    _validate_prompt(config.extract.zero_shot_prompt, "extract.zero_shot_prompt", required=True)
    if config.extract.batch_size < 1:
        raise ConfigError("extract.batch_size must be at least 1")
    if config.evaluate.k < 1:
        raise ConfigError("evaluate.k must be at least 1")
    if config.evaluate.max_queries < 0:
        raise ConfigError("evaluate.max_queries must be >= 0 (0 = every query)")
    bad_modes = [m for m in config.evaluate.rerank if m not in ("filter", "boost")]
    if bad_modes:
        raise ConfigError(f"evaluate.rerank: unknown mode(s) {bad_modes}; expected some of filter, boost")
    if not config.evaluate.rerank_boost > 0:
        raise ConfigError("evaluate.rerank_boost must be > 0")
    if config.evaluate.rerank_vote_k < 1:
        raise ConfigError("evaluate.rerank_vote_k must be at least 1")
    _validate_ensembles(config)
    if not config.extract.backbones:
        raise ConfigError("extract.backbones is empty")
    for index, backbone in enumerate(config.extract.backbones):
        _validate_backbone(backbone, f"extract.backbones[{index}]")
    validate_training(config.train)
    for p in config.evaluate.projections:
        if p not in ("pca", "tsne", "umap"):
            raise ConfigError(f"evaluate.projections: unknown method {p!r}")


def _validate_prompt(template: str, where: str, required: bool) -> None:
    """A class-name prompt: text with `{label}` (at least once) and no other field."""
    if not template and not required:
        return
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as exc:
        raise ConfigError(f"{where}: {template!r} is not a valid template ({exc}); write braces as {{{{ }}}}") \
            from None
    others = sorted({f"{{{name}}}" for name, spec, conversion in fields if name != "label" or spec or conversion})
    if others or not fields:
        raise ConfigError(f"{where}: {template!r} must name the class as {{label}} and hold no other field"
                          + (f" (found {', '.join(others)})" if others else ""))


def _validate_ensembles(config: RunConfig) -> None:
    """Each ensemble: two or more distinct members, a known combine, one positive weight per member (or none), a tag
    that names no member and no other ensemble. Whether the members exist (and mean's equal dimensions) is
    checked by the phase that combines them, before it evaluates anything."""
    tags: set[str] = set()
    for index, ensemble in enumerate(config.evaluate.ensembles):
        where = f"evaluate.ensembles[{index}]"
        members = ensemble.members
        if len(members) < 2 or len(set(members)) != len(members) or not all(members):
            raise ConfigError(f"{where}.members: two or more distinct embedding tags, got {members}")
        if ensemble.combine not in ("concat", "mean"):
            raise ConfigError(f"{where}.combine must be 'concat' or 'mean', got {ensemble.combine!r}")
        if ensemble.weights and (len(ensemble.weights) != len(members)
                                 or not all(0 < w < float("inf") for w in ensemble.weights)):
            raise ConfigError(f"{where}.weights: one positive number per member ({len(members)}), "
                              f"got {ensemble.weights}")
        tag = ensemble.tag()
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", tag) or tag in tags or tag in members:
            raise ConfigError(f"{where}: tag {tag!r} must be unique, name no member, and hold only letters, "
                              "digits, '.', '_', '+' and '-' (set `name`)")
        tags.add(tag)


def _validate_backbone(backbone: BackboneConfig, where: str) -> None:
    if backbone.weights_fallback not in ("error", "random"):
        raise ConfigError(f"weights_fallback must be 'error' or 'random', got {backbone.weights_fallback!r}")
    if not isinstance(backbone.params, dict):
        raise ConfigError(f"{where}.params: expected a mapping, got {backbone.params!r}")
    spec = _backbone_spec(backbone.name, where)
    try:
        spec.check(backbone.params, backbone.image_size, backbone.weights, backbone.weights_fallback)
        backbone.params = spec.resolve_params(backbone.params)
    except ValueError as exc:
        raise ConfigError(f"{where} ({backbone.name}): {exc}") from None


def validate_losses(config: RunConfig) -> None:
    """The loss names against the registry (read without importing Keras)."""
    from models.losses.registry import LOSS_NAMES

    unknown = [name for name in config.train.losses if name not in LOSS_NAMES]
    if unknown:
        raise ConfigError(f"train.losses: unknown loss {unknown}; known: {sorted(LOSS_NAMES)}")
    label_loss = config.train.distill_label_loss
    if label_loss and label_loss not in LOSS_NAMES:
        raise ConfigError(f"train.distill_label_loss: unknown loss {label_loss!r}; known: {sorted(LOSS_NAMES)}")
