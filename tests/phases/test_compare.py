"""Phases 3-5 through the CLI on tiny generated images: train, re-evaluate, compare."""
from __future__ import annotations

import json

import pytest

import run as cli
from tests.conftest import make_class_folder, run_cli_without_tensorflow


@pytest.fixture(scope="module")
def compared_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("cmp")
    images = make_class_folder(tmp_path / "images", n_classes=4, per_class=15)
    args = ["--run", "c", "--source", str(images),
            "--set", f"runs_dir={tmp_path}/runs", "--set", f"reports_dir={tmp_path}/reports",
            "--set", f"data.tfrecords_dir={tmp_path}/tfrecords", "--set", "data.name=tiny",
            "--set", "extract.backbones.0.alpha=0.25", "--set", "extract.backbones.0.image_size=32",
            "--set", "extract.backbones.0.weights=none", "--set", "evaluate.projections=pca",
            "--set", "evaluate.grid_queries=2", "--loss", "triplet", "--loss", "arcface", "--epochs", "3",
            "--set", "train.embedding_dim=16", "--set", "train.n_classes_per_batch=4",
            "--set", "train.n_samples_per_class=4"]
    assert cli.main(["all", *args]) == 0
    return tmp_path


def test_trained_models_are_evaluated_like_phase_2(compared_run):
    runs = compared_run / "runs/c"
    base = "mobilenet-a0.25-32-none"
    for loss in ("triplet", "arcface"):
        assert (runs / f"train/{base}/{loss}/head.keras").is_file()
        emb = runs / f"embeddings/{base}+{loss}"
        meta = json.loads((emb / "meta.json").read_text())
        assert meta["trained"] and meta["loss"] == loss and meta["dim"] == 16
        metrics = json.loads((runs / f"eval/{base}+{loss}/metrics.json").read_text())
        assert set(metrics["retrieval"]) == {"unit/cosine", "unit/euclidean", "raw/euclidean"}


def test_comparison_report_answers_the_questions(compared_run):
    report = compared_run / "reports/c"
    data = json.loads((report / "comparison.json").read_text())
    questions = [a["question"] for a in data["answers"]]
    assert len(questions) == 5 and "Which loss gave the most discriminative embeddings?" in questions
    losses = {r["loss"] for r in data["rows"]}
    assert losses == {"pretrained", "triplet", "arcface"}
    assert len(data["rows"]) == 3 * 3  # 3 models x 3 distance variants
    html = (report / "comparison.html").read_text()
    assert "Did anisotropy go down?" in html and "http" not in html.replace("http-equiv", "")
    assert (report / "comparison.csv").read_text().count("\n") == 10


def test_phase5_runs_without_tensorflow(compared_run):
    """Phase 5 reads metrics and draws: it must run where TensorFlow cannot even be imported."""
    before = (compared_run / "reports/c/comparison.json").stat().st_mtime_ns
    done = run_cli_without_tensorflow(["phase5", "--run", "c", "--set", f"runs_dir={compared_run}/runs",
                                       "--set", f"reports_dir={compared_run}/reports"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert (compared_run / "reports/c/comparison.json").stat().st_mtime_ns != before


def test_phase4_without_training_fails_clearly(tmp_path, capsys):
    code = cli.main(["phase4", "--run", "x", "--set", f"runs_dir={tmp_path}/runs", "--set", "data.name=none"])
    assert code == 1
    assert "run `python run.py phase3` first" in capsys.readouterr().err


def test_export_reproduces_phase4_embeddings_from_raw_images(tmp_path):
    """The exported SavedModel (image in → unit embedding out) equals head(phase-1 features)."""
    import keras
    import numpy as np
    import pandas as pd
    import tensorflow as tf

    from pipeline.data.record_reader import list_shards
    from pipeline.data.tfrecords import image_dataset, read_metadata

    images = make_class_folder(tmp_path / "images", n_classes=4, per_class=14)
    weights = tmp_path / "mobilenet.weights.h5"
    keras.applications.MobileNet(alpha=0.25, include_top=False, weights=None,
                                 input_shape=(64, 64, 3)).save_weights(weights)
    args = ["--run", "e", "--set", f"runs_dir={tmp_path}/runs", "--set", f"reports_dir={tmp_path}/reports",
            "--set", f"data.tfrecords_dir={tmp_path}/tfrecords", "--set", "data.name=tiny",
            "--set", "extract.backbones.0.alpha=0.25", "--set", "extract.backbones.0.image_size=64",
            "--set", f"extract.backbones.0.weights={weights}", "--set", "train.losses=triplet",
            "--set", "train.epochs=2", "--set", "train.embedding_dim=8", "--set", "train.n_classes_per_batch=4",
            "--set", "evaluate.projections=pca", "--set", "evaluate.grid_queries=0"]
    assert cli.main(["phase0", "--source", str(images), *args]) == 0
    for phase in ("phase1", "phase3", "phase4"):
        assert cli.main([phase, *args]) == 0, phase
    out = tmp_path / "runs/e/train/mobilenet-a0.25-64-custom/triplet"
    export = json.loads((out / "export.json").read_text())
    assert export["checked_images"] > 0 and export["max_abs_error"] < 1e-3

    shards = list_shards(tmp_path / "tfrecords/tiny", "test")
    pixels = next(iter(image_dataset(shards, 64, 64)))
    ids = read_metadata(shards)["id"][: len(pixels)]
    saved = tf.saved_model.load(str(out / "saved_model"))  # keep a reference: its variables live in it
    served = saved.serve(tf.constant(pixels)).numpy()
    emb_dir = tmp_path / "runs/e/embeddings/mobilenet-a0.25-64-custom+triplet"
    items = pd.read_csv(emb_dir / "items.csv", keep_default_na=False)
    row = {i: r for r, i in enumerate(items["id"])}
    expected = np.load(emb_dir / "embeddings.npy")[[row[i] for i in ids]]
    np.testing.assert_allclose(served, expected, atol=1e-4)
    reloaded = keras.saving.load_model(out / "embedding_model.keras")
    np.testing.assert_allclose(reloaded.predict(pixels.numpy(), verbose=0), expected, atol=1e-4)


def test_comparison_says_how_each_model_was_trained(compared_run):
    data = json.loads((compared_run / "reports/c/comparison.json").read_text())
    training = {t["loss"]: t for t in data["training"]}
    assert set(training) == {"triplet", "arcface"}
    for t in training.values():
        summary = json.loads((compared_run / f"runs/c/train/mobilenet-a0.25-32-none/{t['loss']}/training.json")
                             .read_text())
        assert t["mode"] == "head" and t["positives"] == "label" and t["replicas"] == 1
        assert t["epochs_run"] == summary["epochs_run"] == 3 and t["batch"] == "4×4"
        assert t["val_MAP@R_best"] == summary["best_val"]["MAP@R"]
    assert "How each model was trained" in (compared_run / "reports/c/comparison.html").read_text()


def test_phase5_refuses_an_evaluation_of_an_older_model(tmp_path):
    """Retraining in phase 3 without re-running phase 4 leaves phase-4 scores of the old model: phase 5 says so."""
    images = make_class_folder(tmp_path / "images", n_classes=4, per_class=10)
    args = ["--run", "s",
            "--set", f"runs_dir={tmp_path}/runs", "--set", f"reports_dir={tmp_path}/reports",
            "--set", f"data.tfrecords_dir={tmp_path}/tfrecords", "--set", "data.name=tiny",
            "--set", "extract.backbones.0.alpha=0.25", "--set", "extract.backbones.0.image_size=32",
            "--set", "extract.backbones.0.weights=none", "--set", "evaluate.projections=pca",
            "--set", "evaluate.grid_queries=0", "--set", "train.losses=triplet",
            "--set", "train.embedding_dim=8", "--set", "train.n_classes_per_batch=4",
            "--set", "train.n_samples_per_class=2", "--set", "train.export=false"]
    assert cli.main(["all", "--source", str(images), *args, "--set", "train.epochs=1"]) == 0
    retrained = [*args, "--set", "train.epochs=2"]
    assert cli.main(["phase3", *retrained]) == 0
    assert cli.main(["phase5", *retrained]) == 1
    assert cli.main(["phase4", *retrained]) == 0
    assert cli.main(["phase5", *retrained]) == 0
    # Forced retraining under the same settings is a new model too.
    assert cli.main(["phase3", *retrained, "--force"]) == 0
    assert cli.main(["phase5", *retrained]) == 1


def test_a_saved_model_that_does_not_serve_the_expected_embeddings_is_not_published(tmp_path):
    import keras
    import numpy as np

    from pipeline.serving.model_export import write_saved_model
    from pipeline.core.errors import ExportError

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    probe = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    expected = np.asarray(model(probe))
    assert write_saved_model(model, tmp_path / "good", probe, expected) <= 1e-6
    assert (tmp_path / "good" / "saved_model.pb").is_file()
    with pytest.raises(ExportError, match="nothing was published"):
        write_saved_model(model, tmp_path / "bad", probe, expected + 0.1)
    assert not (tmp_path / "bad").exists() and not (tmp_path / ".bad.tmp").exists()
