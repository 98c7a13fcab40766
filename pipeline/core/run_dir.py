"""Where every artifact of a run lives, so later phases find what earlier ones wrote.

    tfrecords/<dataset>-<settings>/      phase 0, keyed by its settings (or tfrecords/<data.name>/)
    runs/<run>/dataset_ref.json          which dataset build the run is made on (phase 0 writes it)
    runs/<run>/config.yaml               each section as the last phase that uses it succeeded with it
    runs/<run>/embeddings/<backbone>/    phase 1 (and phase 4: <backbone>+<loss>)
    runs/<run>/train/<backbone>/<loss>/  phase 3
    runs/<run>/eval/<backbone>/          phase 2
    reports/<run>/index.html             the HTML report

Two runs on one source with other settings (another seed, split, limit...) get two dataset
folders, so neither overwrites the other's. A `data.name` set by hand names the folder
itself; then a rebuild with other settings is caught by the fingerprint in dataset_ref.json.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import BackboneConfig, DataConfig, RunConfig
from pipeline.core import atomic
from pipeline.core.artifacts import (  # noqa: F401  (fingerprint_of: re-exported for older imports)
    DATASET_JSON, DATASET_REF_JSON, dataset_settings_key, fingerprint_of, read_dataset_ref,
)

BUILTIN_DATASETS = ("fashion_mnist", "cifar10")
DEFAULT_SOURCE = next(f.default for f in dataclasses.fields(DataConfig) if f.name == "source")


def dataset_name(data: DataConfig) -> str:
    """The dataset's human name: data.name, or the source's folder / file stem / built-in name."""
    if data.name:
        return data.name
    source = data.source.rstrip("/\\")
    if source in BUILTIN_DATASETS:
        return source
    stem = Path(source).stem if Path(source).suffix.lower() in (".csv", ".parquet") else Path(source).name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) or "dataset"


def dataset_folder_name(data: DataConfig) -> str:
    """The folder phase 0 builds: data.name as given, else the name keyed by the data settings."""
    return data.name or f"{dataset_name(data)}-{dataset_settings_key(data)}"


def backbone_tag(backbone: BackboneConfig) -> str:
    """The folder name of a backbone's artifacts; the backbone's spec composes it (models/backbones)."""
    return backbone.artifact_tag()


@dataclass(frozen=True)
class RunDir:
    config: RunConfig

    @property
    def root(self) -> Path:
        return Path(self.config.runs_dir) / self.config.name

    @property
    def dataset_ref(self) -> Path:
        return self.root / DATASET_REF_JSON

    @property
    def new_dataset_dir(self) -> Path:
        """Where phase 0 builds the dataset the configuration describes."""
        return Path(self.config.data.tfrecords_dir) / dataset_folder_name(self.config.data)

    @property
    def names_its_dataset(self) -> bool:
        """The configuration says which dataset it means (not just the default built-in)."""
        return bool(self.config.data.name) or self.config.data.source != DEFAULT_SOURCE

    @property
    def dataset_dir(self) -> Path:
        """The run's dataset: the build its phase 0 recorded; without that record (runs made before
        datasets were keyed by settings, or a dataset named by data.name), the one the settings describe."""
        ref = read_dataset_ref(self.dataset_ref)
        if ref is not None:
            return Path(self.config.data.tfrecords_dir) / ref["folder"]
        built = self.new_dataset_dir
        if not (built / DATASET_JSON).is_file() and not self.config.data.name:
            # Before datasets were keyed by their settings they lived in tfrecords/<name>/;
            # such a folder is the run's dataset when it was built with the run's settings.
            legacy = Path(self.config.data.tfrecords_dir) / dataset_name(self.config.data)
            try:
                legacy_settings = atomic.read_json(legacy / DATASET_JSON)
            except (OSError, ValueError):
                legacy_settings = None
            if isinstance(legacy_settings, dict) and \
                    dataset_settings_key(legacy_settings) == dataset_settings_key(self.config.data):
                return legacy
        return built

    def embeddings_dir(self, tag: str) -> Path:
        return self.root / "embeddings" / tag

    def train_dir(self, tag: str, loss: str) -> Path:
        return self.root / "train" / tag / loss

    def eval_dir(self, tag: str) -> Path:
        return self.root / "eval" / tag

    @property
    def report_dir(self) -> Path:
        return Path(self.config.reports_dir) / self.config.name
