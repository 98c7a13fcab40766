"""A tiny finished run (phases 0-2: 4 classes x 5 images of 32 px, MobileNet-0.25 from a weights file of random
values, real-but-tiny weights that export accepts) and its exported bundle, shared by the serving tests."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import run as cli
from tests.conftest import make_class_folder, tiny_mobilenet_weights

TAG = "mobilenet-a0.25-32-custom"


def run_args(tmp_path: Path, weights: Path) -> list[str]:
    return ["--run", "s", "--set", f"runs_dir={tmp_path}/runs", "--set", f"reports_dir={tmp_path}/reports",
            "--set", f"data.tfrecords_dir={tmp_path}/tfrecords", "--set", "data.name=tiny",
            "--set", "extract.backbones.0.alpha=0.25", "--set", "extract.backbones.0.image_size=32",
            "--set", f"extract.backbones.0.weights={weights}", "--set", "evaluate.projections=pca",
            "--set", "evaluate.grid_queries=0", "--set", "evaluate.gallery_splits=train,val,test"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(folder holding runs/ tfrecords/ images/, the CLI arguments naming the run)."""
    tmp_path = tmp_path_factory.mktemp("serving")
    images = make_class_folder(tmp_path / "images", n_classes=4, per_class=5, size=32)
    weights = tiny_mobilenet_weights(tmp_path / "mobilenet.weights.h5")
    args = run_args(tmp_path, weights)
    assert cli.main(["phase0", "--source", str(images), *args]) == 0
    assert cli.main(["phase1", *args]) == 0
    assert cli.main(["phase2", *args]) == 0
    return tmp_path, args


@pytest.fixture(scope="session")
def exported(tiny_run):
    """A pristine bundle exported from the tiny run (tests that change a bundle work on `bundle_copy`)."""
    tmp_path, args = tiny_run
    assert cli.main(["export", *args]) == 0
    return tmp_path / "runs/s/bundle"


@pytest.fixture
def bundle_copy(exported, tmp_path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(exported, copy, symlinks=True)
    return copy
