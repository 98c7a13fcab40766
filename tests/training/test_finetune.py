"""Phase 3 in finetune mode (backbone's last layers + head, on images) and its phase 4, on tiny images."""
from __future__ import annotations

import json

import keras
import numpy as np
import pandas as pd
import pytest

import run as cli
from tests.conftest import make_class_folder

BASE = "mobilenet-a0.25-32-none"


@pytest.fixture(scope="module")
def finetuned_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ft")
    images = make_class_folder(tmp_path / "images", n_classes=4, per_class=12, size=32)
    args = ["--run", "f",
            "--set", f"runs_dir={tmp_path}/runs", "--set", f"reports_dir={tmp_path}/reports",
            "--set", f"data.tfrecords_dir={tmp_path}/tfrecords", "--set", "data.name=tiny",
            "--set", "extract.backbones.0.alpha=0.25", "--set", "extract.backbones.0.image_size=32",
            "--set", "extract.backbones.0.weights=none", "--set", "evaluate.projections=pca",
            "--set", "evaluate.grid_queries=0", "--set", "train.mode=finetune",
            "--set", "train.finetune_layers=5", "--set", "train.embedding_dim=16",
            "--set", "train.n_classes_per_batch=4", "--set", "train.n_samples_per_class=4"]
    assert cli.main(["phase0", "--source", str(images), *args]) == 0
    assert cli.main(["phase1", *args]) == 0
    assert cli.main(["phase3", "--mode", "finetune", "--loss", "triplet", "--epochs", "2", *args]) == 0
    assert cli.main(["phase4", "--loss", "triplet", *args]) == 0
    return tmp_path


def _initial_trunk():
    """The trunk exactly as training started from it: same seed (train.seed=0), same build order."""
    from models.backbones import build_feature_extractor

    keras.utils.set_random_seed(0)
    extractor = build_feature_extractor("mobilenet", weights="none", image_size=32, alpha=0.25)
    return next(layer for layer in extractor.model.layers if isinstance(layer, keras.Model))


def test_finetune_writes_training_artifacts(finetuned_run):
    out = finetuned_run / f"runs/f/train/{BASE}/triplet"
    for name in ("training.json", "history.csv", "curves.png", "embedding_model.keras", "saved_model"):
        assert (out / name).exists(), name
    summary = json.loads((out / "training.json").read_text())
    assert summary["mode"] == "finetune" and summary["finetune_layers"] == 5
    assert summary["trainable_trunk_layers"] == 5 and summary["trunk_layers"] > 5
    assert summary["epochs_run"] == 2 and summary["trainable_backbone_parameters"] > 0
    assert summary["validation"]["protocol"] == "val_split"
    history = pd.read_csv(out / "history.csv")
    assert len(history) == 2 and np.isfinite(history["val_MAP@R"]).all()
    assert not (out / "head.keras").exists()


def test_phase4_embeddings_come_from_the_saved_model(finetuned_run):
    from pipeline.data.record_reader import list_shards
    from pipeline.data.tfrecords import image_dataset, read_metadata

    out = finetuned_run / f"runs/f/train/{BASE}/triplet"
    emb = finetuned_run / f"runs/f/embeddings/{BASE}+triplet"
    meta = json.loads((emb / "meta.json").read_text())
    assert meta["trained"] and meta["mode"] == "finetune" and meta["dim"] == 16
    items = pd.read_csv(emb / "items.csv", keep_default_na=False)
    base_items = pd.read_csv(finetuned_run / f"runs/f/embeddings/{BASE}/items.csv", keep_default_na=False)
    assert items["id"].tolist() == base_items["id"].tolist()
    raw = np.load(emb / "features_raw.npy")
    unit = np.load(emb / "embeddings.npy")
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)
    assert (finetuned_run / f"runs/f/eval/{BASE}+triplet/metrics.json").is_file()

    shards = list_shards(finetuned_run / "tfrecords/tiny", "test")
    pixels = next(iter(image_dataset(shards, 32, 5))).numpy()
    ids = read_metadata(shards)["id"][: len(pixels)]
    row = {i: r for r, i in enumerate(items["id"])}
    model = keras.saving.load_model(out / "embedding_model.keras")
    np.testing.assert_allclose(model.predict(pixels, verbose=0), unit[[row[i] for i in ids]], atol=1e-4)


def test_only_the_last_trunk_layers_changed(finetuned_run):
    out = finetuned_run / f"runs/f/train/{BASE}/triplet"
    model = keras.saving.load_model(out / "embedding_model.keras")
    trained = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    initial = _initial_trunk()
    # finetune_layers=5: conv_dw_13_bn, conv_dw_13_relu, conv_pw_13, conv_pw_13_bn, conv_pw_13_relu.
    for name in ("conv1", "conv_dw_13", "conv_pw_12"):
        np.testing.assert_array_equal(trained.get_layer(name).kernel.numpy(), initial.get_layer(name).kernel.numpy())
    for name in ("conv_dw_13_bn", "conv_pw_13_bn"):   # BatchNormalization stays frozen, statistics included
        for before, after in zip(initial.get_layer(name).get_weights(), trained.get_layer(name).get_weights()):
            np.testing.assert_array_equal(before, after)
    assert not np.array_equal(trained.get_layer("conv_pw_13").kernel.numpy(),
                              initial.get_layer("conv_pw_13").kernel.numpy())


@pytest.mark.parametrize("finetune_layers, expected", [(0, "none"), (10_000, "all")])
def test_finetune_layer_count_bounds(finetune_layers, expected):
    from pipeline.config import BackboneConfig
    from pipeline.training.finetune import build_finetune_model

    backbone = BackboneConfig(name="mobilenet", weights="none", image_size=32, alpha=0.25)
    _, trunk, _ = build_finetune_model(backbone, 8, finetune_layers)
    with_weights = [layer for layer in trunk.layers
                    if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)]
    trainable = [layer for layer in with_weights if layer.trainable]
    assert trainable == (with_weights if expected == "all" else [])
    assert not any(layer.trainable for layer in trunk.layers if isinstance(layer, keras.layers.BatchNormalization))


def test_augmented_batches_are_class_balanced():
    import io

    from PIL import Image

    from pipeline.training.finetune import image_batches

    rng = np.random.default_rng(0)
    encoded, labels = [], []
    for label in range(5):
        for _ in range(6):
            buffer = io.BytesIO()
            side = int(rng.integers(20, 60))
            Image.fromarray(rng.integers(0, 256, (side, side + 7, 3), dtype=np.uint8)).save(buffer, format="PNG")
            encoded.append(buffer.getvalue())
            labels.append(label)
    ds = image_batches(np.array(encoded, dtype=object), np.array(labels), 24, 3, 4, seed=1, augment=True)
    batches = list(ds.take(3).as_numpy_iterator())
    for images, batch_labels in batches:
        assert images.shape == (12, 24, 24, 3) and images.dtype == np.float32
        assert images.min() >= 0 and images.max() <= 255
        assert batch_labels.shape == (12,)
        groups = batch_labels.reshape(3, 4)
        assert (groups == groups[:, :1]).all() and len(set(groups[:, 0])) == 3
    again = list(image_batches(np.array(encoded, dtype=object), np.array(labels), 24, 3, 4, seed=1,
                               augment=True).take(1).as_numpy_iterator())
    np.testing.assert_array_equal(again[0][0], batches[0][0])   # seeded: reproducible across runs


def _tiny_encoded(n_classes: int = 5, per_class: int = 6, seed: int = 0):
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    encoded, labels = [], []
    for label in range(n_classes):
        for _ in range(per_class):
            buffer = io.BytesIO()
            side = int(rng.integers(20, 60))
            Image.fromarray(rng.integers(0, 256, (side, side + 7, 3), dtype=np.uint8)).save(buffer, format="PNG")
            encoded.append(buffer.getvalue())
            labels.append(label)
    return np.array(encoded, dtype=object), np.array(labels)


def test_a_replica_slice_of_the_batches_is_that_slice_of_the_full_batches():
    """Under tf.distribute each worker decodes only its rows; they must be exactly those rows,
    augmentation included (it is seeded by the item's position in the global stream)."""
    from pipeline.training.finetune import image_batches

    encoded, labels = _tiny_encoded()
    full = list(image_batches(encoded, labels, 24, 3, 4, seed=2, augment=True, skip_batches=1)
                .take(3).as_numpy_iterator())
    part = list(image_batches(encoded, labels, 24, 3, 4, seed=2, augment=True, skip_batches=1, first=4, count=6)
                .take(3).as_numpy_iterator())
    for (images, batch_labels), (part_images, part_labels) in zip(full, part):
        np.testing.assert_array_equal(part_images, images[4:10])
        np.testing.assert_array_equal(part_labels, batch_labels[4:10])


def test_finetune_export_is_described_and_the_saved_model_serves_the_same_embeddings(finetuned_run):
    import tensorflow as tf

    out = finetuned_run / f"runs/f/train/{BASE}/triplet"
    export = json.loads((out / "export.json").read_text())
    assert export["image_size"] == 32 and export["checked_images"] > 0 and export["max_abs_error"] < 1e-4
    assert export["output"].startswith("float32 [batch, 16]")
    pixels = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    loaded = tf.saved_model.load(str(out / "saved_model"))
    served = loaded.serve(tf.constant(pixels)).numpy()
    model = keras.saving.load_model(out / "embedding_model.keras")
    np.testing.assert_allclose(served, model.predict(pixels, verbose=0), atol=1e-5)


def test_trunk_and_head_train_at_their_own_learning_rates(finetuned_run):
    summary = json.loads((finetuned_run / f"runs/f/train/{BASE}/triplet/training.json").read_text())
    assert summary["optimizer"]["head_learning_rate"] == 1e-3
    assert summary["optimizer"]["backbone_learning_rate"] == 1e-4
    assert summary["distribution"] == {"strategy": "_DefaultDistributionStrategy", "replicas": 1}


def _finetune_config(finetuned_run, runs_dir, **train):
    from pipeline.config import load_config

    overrides = [f"runs_dir={runs_dir}", "train.losses=arcface", "train.epochs=3", "train.steps_per_epoch=2"]
    overrides += [f"train.{key}={value}" for key, value in train.items()]
    return load_config(str(finetuned_run / "runs/f/config.yaml"), overrides)


def test_arcface_finetuning_resumes_where_it_stopped(finetuned_run):
    from pipeline.phases.train import run_train
    from tests.training.test_train import _Interrupt, _RecordEpochs

    config = _finetune_config(finetuned_run, finetuned_run / "runs_resume")
    out = finetuned_run / f"runs_resume/f/train/{BASE}/arcface"
    with pytest.raises(KeyboardInterrupt):
        run_train(config, extra_callbacks=[_Interrupt(after_epoch=1)])
    assert (out / "backup").is_dir() and not (out / "training.json").exists()

    recorder = _RecordEpochs()
    run_train(config, extra_callbacks=[recorder])
    assert recorder.epochs == [1, 2]
    summary = json.loads((out / "training.json").read_text())
    assert summary["resumed_from_epoch"] == 1 and summary["requires_classifier"]
    model = keras.saving.load_model(out / "embedding_model.keras")
    assert "cosine_classifier" not in [layer.name for layer in model.layers]
    assert model.output.shape[-1] == 16

    (straight,) = run_train(_finetune_config(finetuned_run, finetuned_run / "runs_straight"))
    np.testing.assert_allclose(pd.read_csv(out / "history.csv")[["loss", "val_MAP@R"]],
                               pd.read_csv(straight / "history.csv")[["loss", "val_MAP@R"]], rtol=1e-4, atol=1e-6)
