"""Where every artifact of a run lives, so later phases find what earlier ones wrote.

    tfrecords/<dataset>/                 phase 0 (shared by every run on that dataset)
    runs/<run>/config.yaml               the resolved configuration of the last command
    runs/<run>/embeddings/<backbone>/    phase 1 (and phase 4: <backbone>+<loss>)
    runs/<run>/train/<backbone>/<loss>/  phase 3
    runs/<run>/eval/<backbone>/          phase 2
    reports/<run>/index.html             the HTML report
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import BackboneConfig, DataConfig, RunConfig

BUILTIN_DATASETS = ("fashion_mnist", "cifar10")


def fingerprint_of(obj) -> str:
    """A short stable hash of JSON-able settings: an artifact is up to date when its stored
    fingerprint equals the one of the settings and inputs that would produce it now."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dataset_name(data: DataConfig) -> str:
    if data.name:
        return data.name
    source = data.source.rstrip("/\\")
    if source in BUILTIN_DATASETS:
        return source
    stem = Path(source).stem if Path(source).suffix.lower() in (".csv", ".parquet") else Path(source).name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) or "dataset"


def backbone_tag(backbone: BackboneConfig) -> str:
    if backbone.tag:
        return backbone.tag
    parts = [backbone.name]
    if backbone.name == "mobilenet":
        parts.append(f"a{backbone.alpha:g}")
    if backbone.image_size:
        parts.append(str(backbone.image_size))
    weights = backbone.weights if backbone.weights in ("imagenet", "none") else "custom"
    parts.append(weights)
    return "-".join(parts)


@dataclass(frozen=True)
class RunDir:
    config: RunConfig

    @property
    def root(self) -> Path:
        return Path(self.config.runs_dir) / self.config.name

    @property
    def dataset_dir(self) -> Path:
        return Path(self.config.data.tfrecords_dir) / dataset_name(self.config.data)

    def embeddings_dir(self, tag: str) -> Path:
        return self.root / "embeddings" / tag

    def train_dir(self, tag: str, loss: str) -> Path:
        return self.root / "train" / tag / loss

    def eval_dir(self, tag: str) -> Path:
        return self.root / "eval" / tag

    @property
    def report_dir(self) -> Path:
        return Path(self.config.reports_dir) / self.config.name
