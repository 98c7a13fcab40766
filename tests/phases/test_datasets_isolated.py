"""A run reads the dataset it was built on (issue 9, items 1, 4, 14, 15), through the CLI on tiny images."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest

import run as cli
from tests.conftest import make_class_folder

TAG = "mobilenet-a0.25-32-none"


def _args(tmp_path: Path, run: str, *extra: str) -> list[str]:
    return ["--run", run, "--set", f"runs_dir={tmp_path}/runs", "--set", f"reports_dir={tmp_path}/reports",
            "--set", f"data.tfrecords_dir={tmp_path}/tfrecords",
            "--set", "extract.backbones.0.alpha=0.25", "--set", "extract.backbones.0.image_size=32",
            "--set", "extract.backbones.0.weights=none", "--set", "evaluate.projections=pca",
            "--set", "evaluate.projection_sample=40", "--set", "evaluate.grid_queries=2",
            "--set", "evaluate.kmeans=false",
            *extra]


def _splits(path: Path) -> dict[str, str]:
    items = pd.read_csv(path, keep_default_na=False, dtype=str)
    return dict(zip(items["id"], items["split"]))


def test_two_runs_on_one_source_keep_their_own_datasets(tmp_path, caplog):
    """The issue's A/B scenario: B's phase 0 with another seed no longer rebuilds A's dataset."""
    source = make_class_folder(tmp_path / "x", n_classes=3, per_class=10)
    a, b = _args(tmp_path, "A"), _args(tmp_path, "B")
    assert cli.main(["phase0", "--source", str(source), "--seed", "42", *a]) == 0
    assert cli.main(["phase1", *a]) == 0
    meta = tmp_path / f"runs/A/embeddings/{TAG}/meta.json"
    a_items, a_stamp = _splits(meta.parent / "items.csv"), meta.stat().st_mtime_ns

    assert cli.main(["phase0", "--source", str(source), "--seed", "7", *b]) == 0
    folders = sorted(p.name for p in (tmp_path / "tfrecords").iterdir())
    assert len(folders) == 2 and all(name.startswith("x-") for name in folders), folders

    with caplog.at_level(logging.INFO, logger="embedlab"):
        assert cli.main(["phase1", *a]) == 0
    assert meta.stat().st_mtime_ns == a_stamp, "A's embeddings are still of A's dataset: nothing to redo"
    assert _splits(meta.parent / "items.csv") == a_items
    phase1_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("phase 1:")]
    assert phase1_lines and all("dataset x (" in line for line in phase1_lines), phase1_lines

    assert cli.main(["phase2", *a]) == 0
    dataset_dir = Path(json.loads((tmp_path / "runs/A/dataset_ref.json").read_text())["folder"])
    assert json.loads((tmp_path / "tfrecords" / dataset_dir / "dataset.json").read_text())["seed"] == 42


def test_a_dataset_named_by_hand_and_rebuilt_by_another_run_is_refused(tmp_path, capsys):
    source = make_class_folder(tmp_path / "x", n_classes=3, per_class=8)
    a = _args(tmp_path, "A", "--set", "data.name=shared")
    b = _args(tmp_path, "B", "--set", "data.name=shared")
    assert cli.main(["phase0", "--source", str(source), "--seed", "42", *a]) == 0
    assert cli.main(["phase0", "--source", str(source), "--seed", "7", *b]) == 0
    capsys.readouterr()
    assert cli.main(["phase1", *a]) == 1
    err = capsys.readouterr().err
    assert "was rebuilt" in err and "run `python run.py phase0 --run A`" in err


def test_phase2_refuses_embeddings_of_another_build_of_the_dataset(tmp_path, capsys):
    source = make_class_folder(tmp_path / "x", n_classes=3, per_class=8)
    a = _args(tmp_path, "A", "--set", "data.name=shared")
    assert cli.main(["phase0", "--source", str(source), "--seed", "42", *a]) == 0
    assert cli.main(["phase1", *a]) == 0
    assert cli.main(["phase0", "--source", str(source), "--seed", "7", *a]) == 0  # the run's dataset changes
    capsys.readouterr()
    assert cli.main(["phase2", *a]) == 1
    assert "run `python run.py phase1 --run A` again" in capsys.readouterr().err


def test_phase1_on_a_run_without_a_dataset_says_so(tmp_path, capsys):
    """A built-in's dataset that happens to exist is not taken for a run that never ran phase 0."""
    stray = tmp_path / "tfrecords/fashion_mnist"
    stray.mkdir(parents=True)
    (stray / "dataset.json").write_text(json.dumps({"fingerprint": "x", "totals": {}, "shards": {}}))
    args = ["--run", "new", "--set", f"runs_dir={tmp_path}/runs", "--set", f"data.tfrecords_dir={tmp_path}/tfrecords"]
    assert cli.main(["phase1", *args]) == 1
    assert "run 'new' has no dataset" in capsys.readouterr().err


def test_failed_extraction_leaves_no_empty_parts_folder(tmp_path, monkeypatch):
    import models.backbones as backbones

    source = make_class_folder(tmp_path / "x", n_classes=2, per_class=5)
    args = _args(tmp_path, "A")
    assert cli.main(["phase0", "--source", str(source), *args]) == 0

    def offline(*a, **k):
        raise backbones.WeightsUnavailableError("download failed: [Errno -2] Name or service not known")

    monkeypatch.setattr(backbones, "build_feature_extractor", offline)
    assert cli.main(["phase1", *args]) == 1
    assert not (tmp_path / f"runs/A/embeddings/{TAG}/parts").exists()
    assert not (tmp_path / f"runs/A/embeddings/{TAG}").exists()


def test_resumed_extraction_says_how_far_it_got(tmp_path, monkeypatch, caplog):
    import pipeline.data.tfrecords as data

    source = make_class_folder(tmp_path / "x", n_classes=3, per_class=8)
    args = _args(tmp_path, "A", "--set", "data.shard_size=4")
    assert cli.main(["phase0", "--source", str(source), *args]) == 0
    real, calls = data.image_dataset, []

    def failing(shards, *a, **k):
        calls.append(shards)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(shards, *a, **k)

    monkeypatch.setattr(data, "image_dataset", failing)
    assert cli.main(["phase1", *args]) == 130
    monkeypatch.setattr(data, "image_dataset", real)
    with caplog.at_level(logging.INFO, logger="embedlab"):
        assert cli.main(["phase1", *args]) == 0
    n_shards = len(list((tmp_path / "tfrecords").glob("*/*.tfrecord")))
    assert f"phase 1: resuming {TAG}: 2 of {n_shards} shards done" in caplog.text


@pytest.mark.parametrize("named", [False, True])
def test_runs_made_before_datasets_were_keyed_still_read_their_dataset(tmp_path, named):
    """An old layout: tfrecords/<source name>/ and no dataset_ref.json in the run."""
    from pipeline.config import DataConfig, RunConfig
    from pipeline.core.artifacts import load_dataset_meta
    from pipeline.core.run_dir import RunDir
    from pipeline.phases.ingest import run_ingest

    source = make_class_folder(tmp_path / "x", n_classes=2, per_class=5)
    data = DataConfig(source=str(source), tfrecords_dir=str(tmp_path / "tfrecords"), workers=1,
                      name="x" if named else "")
    config = RunConfig(name="old", runs_dir=str(tmp_path / "runs"), data=data)
    built = run_ingest(config)
    if not named:  # move the build to where the old layout put it
        built = built.rename(tmp_path / "tfrecords" / "x")
    (tmp_path / "runs/old/dataset_ref.json").unlink()
    run_dir = RunDir(config)
    assert run_dir.dataset_dir == built
    assert load_dataset_meta(run_dir)["seed"] == 42
    assert run_ingest(config) == built, "phase 0 adopts the old folder instead of rebuilding it"


def test_a_run_made_before_dataset_records_on_the_default_source_still_reads_its_dataset(tmp_path):
    """A demo run from before this layout (saved config.yaml, tfrecords/fashion_mnist/, no dataset_ref.json) keeps
    working; a brand-new run without phase 0 is told it has no dataset."""
    import dataclasses

    import yaml

    from pipeline.config import DataConfig, RunConfig
    from pipeline.core.artifacts import load_dataset_meta
    from pipeline.core.errors import PhaseInputError
    from pipeline.core.run_dir import RunDir

    data = DataConfig(tfrecords_dir=str(tmp_path / "tfrecords"))
    legacy = tmp_path / "tfrecords" / "fashion_mnist"
    legacy.mkdir(parents=True)
    (legacy / "dataset.json").write_text(json.dumps({**dataclasses.asdict(data), "fingerprint": "old-build"}))
    old = RunConfig(name="demo", runs_dir=str(tmp_path / "runs"), data=data)
    (tmp_path / "runs/demo").mkdir(parents=True)
    (tmp_path / "runs/demo/config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(old)))
    assert RunDir(old).dataset_dir == legacy
    assert load_dataset_meta(RunDir(old))["fingerprint"] == "old-build"
    with pytest.raises(PhaseInputError, match="run 'new' has no dataset"):
        load_dataset_meta(RunDir(dataclasses.replace(old, name="new")))
