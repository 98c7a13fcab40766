"""Phase 3 head mode on a fake phase-1 output: sampler, training, resume, divergence, idempotence."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

import models.layers  # noqa: F401  (registers L2Normalize for load_model)
from models.heads import build_embedding_head
from pipeline.core import atomic
from pipeline.config import BackboneConfig, RunConfig, TrainConfig
from pipeline.core.errors import PhaseInputError
from pipeline.vectors.retrieval import retrieve
from pipeline.training.sampler import balanced_batch_indices, balanced_batches, split_usable_classes
from pipeline.phases.train import run_train
from pipeline.core.errors import TrainingDivergedError

TAG = "fake"
N_CLASSES, PER_CLASS, DIM = 10, 30, 64
# Per class: 18 train, 8 val, 4 test items.
SPLIT_OF_INDEX = ["train"] * 18 + ["val"] * 8 + ["test"] * 4


# --------------------------------------------------------------------------- fake phase-1 output

def clustered_features(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class means live in a 6-d subspace of the 64-d space, under isotropic noise and a common offset.

    Raw cosine similarity sees mostly noise (MAP@R ~0.2); a projection onto the
    subspace separates the classes (~0.55), so a trained head has room to show it learned.
    """
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(DIM, 6)))[0]
    means = rng.normal(scale=1.5, size=(N_CLASSES, 6)) @ basis.T
    labels = np.repeat(np.arange(N_CLASSES), PER_CLASS)
    features = means[labels] + rng.normal(size=(len(labels), DIM)) + 2.0
    splits = np.array(SPLIT_OF_INDEX * N_CLASSES)
    return features.astype(np.float32), labels, splits


def write_phase1(runs_dir: Path, features: np.ndarray, labels: np.ndarray, splits: np.ndarray,
                 groups=None) -> Path:
    out = runs_dir / "t" / "embeddings" / TAG
    n = len(labels)
    items = pd.DataFrame({"row": np.arange(n), "split": splits, "id": [f"item{i:04d}" for i in range(n)],
                          "label": labels, "label_name": [f"class_{c}" for c in labels],
                          "path": [f"img/{i}.png" for i in range(n)], "text": "",
                          "group": "" if groups is None else groups})
    out.mkdir(parents=True, exist_ok=True)
    items.to_csv(out / "items.csv", index=False)
    np.save(out / "features_raw.npy", features)
    np.save(out / "embeddings.npy", features / np.linalg.norm(features, axis=1, keepdims=True))
    atomic.write_json(out / "meta.json", {"tag": TAG, "fingerprint": "fake-phase1", "created": "now",
                                          "dim": features.shape[1], "n_items": n})
    return out


def make_config(runs_dir: Path, **train) -> RunConfig:
    settings = dict(losses=["triplet"], embedding_dim=32, epochs=8, n_classes_per_batch=5, n_samples_per_class=4,
                    steps_per_epoch=12, learning_rate=0.01, early_stopping_patience=8, reduce_lr_patience=3,
                    checkpoint_every=2, loss_params={"triplet": {"margin": 0.2, "mining": "batch_hard"}}, seed=0)
    settings.update(train)
    return RunConfig(name="t", runs_dir=str(runs_dir), reports_dir=str(runs_dir.parent / "reports"),
                     extract=_extract_config(), train=TrainConfig(**settings))


def _extract_config():
    from pipeline.config import ExtractConfig

    return ExtractConfig(backbones=[BackboneConfig(tag=TAG)])


def val_map_at_r(embeddings: np.ndarray, labels: np.ndarray) -> float:
    result = retrieve(embeddings, labels, embeddings, labels, metric="cosine", k=1, exclude=np.arange(len(labels)))
    return result.metrics["MAP@R"]


@pytest.fixture(scope="module")
def data():
    return clustered_features()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """One triplet run shared by the tests that only read its outputs."""
    runs = tmp_path_factory.mktemp("trained") / "runs"
    write_phase1(runs, *data)
    config = make_config(runs)
    (out,) = run_train(config)
    return config, out


# --------------------------------------------------------------------------- sampler

def test_sampler_batches_hold_p_classes_times_k_items():
    labels = np.repeat(np.arange(6), [10, 10, 10, 3, 10, 10])
    batches = balanced_batch_indices(labels, n_classes_per_batch=4, n_samples_per_class=5, seed=1)
    seen = set()
    for rows in itertools.islice(batches, 50):
        assert rows.shape == (20,)
        batch_labels = labels[rows].reshape(4, 5)
        assert (batch_labels == batch_labels[:, :1]).all(), "K consecutive rows per class"
        assert len(set(batch_labels[:, 0])) == 4, "P distinct classes"
        for group_rows, group_labels in zip(rows.reshape(4, 5), batch_labels):
            if group_labels[0] != 3:
                assert len(set(group_rows)) == 5, "no repeats inside a class that has K items or more"
            else:
                assert set(group_rows) == set(np.flatnonzero(labels == 3)), "a small class gives all its items"
        seen.update(rows.tolist())
    assert seen == set(range(len(labels))), "every item gets drawn"


def test_sampler_is_deterministic_under_seed():
    labels = np.repeat(np.arange(8), 7)
    first = [b.tolist() for b in itertools.islice(balanced_batch_indices(labels, 3, 4, seed=5), 10)]
    again = [b.tolist() for b in itertools.islice(balanced_batch_indices(labels, 3, 4, seed=5), 10)]
    other = [b.tolist() for b in itertools.islice(balanced_batch_indices(labels, 3, 4, seed=6), 10)]
    assert first == again and first != other


def test_sampler_excludes_single_item_classes(caplog):
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 3, 4, 4])
    assert split_usable_classes(labels)[1].tolist() == [2, 3]
    with caplog.at_level("WARNING", logger="embedlab.sampler"):
        batches = balanced_batch_indices(labels, 2, 2, seed=0)
    assert "2 class(es) with a single item" in caplog.text
    drawn = set(labels[np.concatenate(list(itertools.islice(batches, 30)))].tolist())
    assert drawn == {0, 1, 4}


def test_sampler_needs_two_usable_classes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        balanced_batch_indices(np.array([0, 0, 0, 1, 2]), 2, 2, seed=0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        balanced_batches(np.zeros((4, 3)), np.array([0, 0, 0, 0]), 2, 2, seed=0)


def test_balanced_batches_dataset_matches_the_index_generator():
    features = np.arange(60, dtype=np.float64).reshape(30, 2)
    labels = np.repeat(np.arange(5), 6)
    dataset = balanced_batches(features, labels, 3, 2, seed=3)
    expected = list(itertools.islice(balanced_batch_indices(labels, 3, 2, seed=3), 4))
    for (x, y), rows in zip(dataset.take(4), expected):
        assert x.dtype == "float32" and y.dtype == "int32" and x.shape == (6, 2)
        np.testing.assert_array_equal(x.numpy(), features[rows])
        np.testing.assert_array_equal(y.numpy(), labels[rows])
    skipped = next(iter(balanced_batches(features, labels, 3, 2, seed=3, skip_batches=3)))
    np.testing.assert_array_equal(skipped[1].numpy(), labels[expected[3]])


# --------------------------------------------------------------------------- head

def test_head_outputs_float32_unit_vectors_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        head = build_embedding_head(16, 8)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    out = head(np.random.default_rng(0).normal(size=(5, 16)).astype("float32"), training=False)
    assert out.dtype == "float32" and tuple(out.shape) == (5, 8)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out), axis=1), 1.0, atol=1e-5)


# --------------------------------------------------------------------------- training

def test_training_raises_validation_map_at_r(trained, data):
    config, out = trained
    features, labels, splits = data
    val = splits == "val"
    keras.utils.set_random_seed(config.train.seed)
    untrained = build_embedding_head(DIM, config.train.embedding_dim)
    before = val_map_at_r(untrained.predict(features[val], verbose=0), labels[val])
    head = keras.saving.load_model(out / "head.keras")
    after = val_map_at_r(head.predict(features[val], verbose=0), labels[val])
    summary = json.loads((out / "training.json").read_text())
    print(f"val MAP@R untrained {before:.3f} -> trained {after:.3f}; summary {summary['best_val']}")
    assert after >= before + 0.05
    assert summary["best_val"]["MAP@R"] == pytest.approx(after, abs=1e-4), "head.keras is the best epoch"
    assert summary["initial_val"]["MAP@R"] == pytest.approx(before, abs=1e-4)
    # The test split took no part in training or model selection: it must improve too.
    test = splits == "test"
    test_before = val_map_at_r(untrained.predict(features[test], verbose=0), labels[test])
    test_after = val_map_at_r(head.predict(features[test], verbose=0), labels[test])
    print(f"test MAP@R untrained {test_before:.3f} -> trained {test_after:.3f}")
    assert test_after > test_before


def test_training_writes_its_artifacts(trained):
    config, out = trained
    assert out == Path(config.runs_dir) / "t" / "train" / TAG / "triplet"
    summary = json.loads((out / "training.json").read_text())
    assert summary["loss"] == "triplet" and summary["loss_params"] == {"margin": 0.2, "mining": "batch_hard"}
    assert summary["validation"]["protocol"] == "val_split"
    assert summary["n_train"] == 18 * N_CLASSES and summary["n_val"] == 8 * N_CLASSES
    assert summary["steps_per_epoch"] == 12 and summary["steps_per_second"] > 0
    assert 1 <= summary["best_epoch"] <= summary["epochs_run"] <= config.train.epochs
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == list(range(summary["epochs_run"]))
    assert {"loss", "val_P@1", "val_MAP@R", "triplet_accuracy"} <= set(history.columns)
    assert history["val_MAP@R"].max() == pytest.approx(summary["best_val"]["MAP@R"])
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "checkpoints" / "best.weights.h5").is_file()
    assert (out / "checkpoints" / "epoch_002.weights.h5").is_file()
    assert not (out / "backup").exists(), "the backup is cleared after a finished fit"


def test_head_keras_reloads_with_the_same_embeddings(trained, data):
    _, out = trained
    features = data[0][:20]
    head = keras.saving.load_model(out / "head.keras")
    again = keras.saving.load_model(out / "head.keras")
    embeddings = head.predict(features, verbose=0)
    assert embeddings.shape == (20, 32) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(embeddings, again.predict(features, verbose=0))
    assert [layer.__class__.__name__ for layer in head.layers][-1] == "L2Normalize"


def test_rerun_without_force_does_nothing(trained):
    config, out = trained
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    assert run_train(config) == [out]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == stamps


class _Interrupt(keras.callbacks.Callback):
    def __init__(self, after_epoch: int):
        super().__init__()
        self.after_epoch = after_epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.after_epoch:
            raise KeyboardInterrupt


class _RecordEpochs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)


def test_interrupted_training_resumes_where_it_stopped(tmp_path, data):
    runs = tmp_path / "runs"
    write_phase1(runs, *data)
    config = make_config(runs, epochs=5, steps_per_epoch=4)
    out = Path(runs) / "t" / "train" / TAG / "triplet"
    with pytest.raises(KeyboardInterrupt):
        run_train(config, extra_callbacks=[_Interrupt(after_epoch=2)])
    assert (out / "backup").is_dir() and not (out / "training.json").exists()
    assert list(pd.read_csv(out / "history.csv")["epoch"]) == [0, 1]

    recorder = _RecordEpochs()
    run_train(config, extra_callbacks=[recorder])
    assert recorder.epochs == [2, 3, 4], "continues with epoch 3 (index 2), not from scratch"
    summary = json.loads((out / "training.json").read_text())
    assert summary["resumed_from_epoch"] == 2 and summary["epochs_this_fit"] == 3 and summary["epochs_run"] == 5
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == [0, 1, 2, 3, 4]
    assert not (out / "backup").exists()

    # Weights, optimizer state and the position in the batch stream all come back:
    # the resumed run matches one that was never interrupted.
    runs = tmp_path / "uninterrupted"
    write_phase1(runs, *data)
    (straight,) = run_train(make_config(runs, epochs=5, steps_per_epoch=4))
    reference = pd.read_csv(straight / "history.csv")
    np.testing.assert_allclose(history[["loss", "val_MAP@R"]], reference[["loss", "val_MAP@R"]], rtol=1e-4)


def test_resume_gives_early_stopping_and_lr_schedule_their_state_back():
    from pipeline.training.callbacks import MONITOR, RestoreMonitorState

    early = keras.callbacks.EarlyStopping(monitor=MONITOR, mode="max", patience=5)
    reduce = keras.callbacks.ReduceLROnPlateau(monitor=MONITOR, mode="max", patience=2)
    history = pd.DataFrame({"epoch": [0, 1, 2, 3, 4], MONITOR: [0.1, 0.3, 0.2, 0.25, 0.28]})
    for callback in (early, reduce, RestoreMonitorState(history, early, reduce)):
        callback.on_train_begin()
    assert early.best == reduce.best == 0.3 and early.best_epoch == 1
    assert early.wait == 3, "three epochs without improvement since the best"
    assert reduce.wait == 1, "the learning rate was cut after two of them, which restarted the count"


@pytest.mark.parametrize("cooldown", [0, 1])
def test_resumed_monitor_state_equals_the_uninterrupted_one(cooldown):
    """Replaying the logged scores gives EarlyStopping and ReduceLROnPlateau exactly the state
    they reach epoch by epoch, min_delta (1e-4 for ReduceLROnPlateau) and cooldown included."""
    from pipeline.training.callbacks import MONITOR, RestoreMonitorState

    scores = [0.5, 0.50005, 0.3, 0.3, 0.6, 0.6, 0.60001, 0.2, 0.1]
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss="mse")

    def fresh():
        early = keras.callbacks.EarlyStopping(monitor=MONITOR, mode="max", patience=50)
        reduce = keras.callbacks.ReduceLROnPlateau(monitor=MONITOR, mode="max", patience=2, cooldown=cooldown)
        for callback in (early, reduce):
            callback.set_model(model)
            callback.on_train_begin()
        return early, reduce

    early, reduce = fresh()
    rows = []
    for epoch, score in enumerate(scores):
        logs = {MONITOR: score}
        early.on_epoch_end(epoch, logs)
        reduce.on_epoch_end(epoch, logs)   # adds the epoch's learning rate to the logs
        rows.append({"epoch": epoch, MONITOR: score, "learning_rate": logs["learning_rate"]})
        resumed_early, resumed_reduce = fresh()
        restore = RestoreMonitorState(pd.DataFrame(rows), resumed_early, resumed_reduce)
        restore.set_model(model)
        restore.on_train_begin()
        assert (resumed_early.wait, float(resumed_early.best), resumed_early.best_epoch) == \
            (early.wait, float(early.best), early.best_epoch), epoch
        assert (resumed_reduce.wait, float(resumed_reduce.best), resumed_reduce.cooldown_counter) == \
            (reduce.wait, float(reduce.best), reduce.cooldown_counter), epoch
    assert reduce.model.optimizer.learning_rate < 0.1, "the sequence did trigger reductions"


def test_nan_loss_stops_with_a_clear_error_and_saves_no_head(tmp_path, data, monkeypatch):
    import models.losses

    class NaNLoss(keras.losses.Loss):
        requires_classifier = False

        def call(self, y_true, y_pred):
            return keras.ops.mean(y_pred) * float("nan")

    monkeypatch.setattr(models.losses, "get_loss", lambda name, **params: NaNLoss(name="nan"))
    runs = tmp_path / "runs"
    write_phase1(runs, *data)
    config = make_config(runs, epochs=3, steps_per_epoch=4)
    with pytest.raises(TrainingDivergedError, match="NaN/inf in epoch 1"):
        run_train(config)
    out = Path(runs) / "t" / "train" / TAG / "triplet"
    assert not (out / "head.keras").exists() and not (out / "training.json").exists()
    assert not (out / "backup").exists(), "a diverged state is not left behind for a resume"


def test_arcface_trains_through_the_classifier_and_saves_the_head_alone(tmp_path, data):
    features, labels, splits = data
    # No val split: validation falls back to held-out training classes.
    runs = tmp_path / "runs"
    write_phase1(runs, features, labels + 100, np.where(splits == "val", "train", splits))
    config = make_config(runs, losses=["arcface"], epochs=3, steps_per_epoch=4, holdout_fraction=0.2,
                         loss_params={"arcface": {"scale": 16.0, "margin": 0.2}})
    (out,) = run_train(config)
    summary = json.loads((out / "training.json").read_text())
    assert summary["requires_classifier"] and summary["validation"]["protocol"] == "holdout_classes"
    held_out = summary["validation"]["held_out_labels"]
    assert len(held_out) == 2 and summary["n_classifier_classes"] == N_CLASSES - 2
    assert summary["n_train"] == 26 * (N_CLASSES - 2) and summary["n_val"] == 26 * 2
    head = keras.saving.load_model(out / "head.keras")
    assert "CosineClassifier" not in {layer.__class__.__name__ for layer in head.layers}
    assert head.output_shape == (None, 32)
    assert np.isfinite(summary["best_val"]["MAP@R"])


def test_few_training_classes_validate_on_held_out_items_not_classes(tmp_path, data, caplog):
    """Five training classes and no val split: holding out 10 % of the classes would take two
    of them (40 %) and leave batches of 3 classes; a share of every class's items validates instead."""
    features, labels, splits = data
    few = labels < 5
    runs = tmp_path / "runs"
    write_phase1(runs, features[few], labels[few], np.where(splits == "val", "train", splits)[few])
    with caplog.at_level("WARNING", logger="embedlab.train"):
        (out,) = run_train(make_config(runs, epochs=2, steps_per_epoch=3))
    summary = json.loads((out / "training.json").read_text())
    validation = summary["validation"]
    assert validation["protocol"] == "holdout_items" and "fewer than one batch's 5" in validation["reason"]
    assert summary["n_train_classes"] == 5 and validation["n_classes"] == 5
    # 26 training items per class: round(0.1 * 26) = 3 of each validate, 23 train.
    assert summary["n_val"] == 5 * 3 and summary["n_train"] == 5 * 23
    assert "validating on 15 held-out items" in caplog.text and "seen classes" in caplog.text


def test_held_out_items_are_stratified_seeded_and_disjoint_from_training():
    from pipeline.training.protocol import split_train_val

    labels = np.repeat(np.arange(4), [20, 20, 10, 3])   # the 3-item class is too small to give any
    items = pd.DataFrame({"label": labels, "split": "train"})
    settings = TrainConfig(holdout_fraction=0.2, n_classes_per_batch=4, seed=1)
    train_rows, val_rows, validation = split_train_val(items, settings)
    assert validation["protocol"] == "holdout_items"
    assert not set(train_rows) & set(val_rows) and len(train_rows) + len(val_rows) == len(labels)
    np.testing.assert_array_equal(np.bincount(labels[val_rows], minlength=4), [4, 4, 2, 0])
    again = split_train_val(items, settings)[1]
    other_seed = split_train_val(items, TrainConfig(holdout_fraction=0.2, n_classes_per_batch=4, seed=2))[1]
    np.testing.assert_array_equal(val_rows, again)
    assert not np.array_equal(val_rows, other_seed)
    # Enough classes to fill a batch after the hold-out: whole classes validate, as before.
    many = pd.DataFrame({"label": np.repeat(np.arange(12), 5), "split": "train"})
    assert split_train_val(many, settings)[2]["protocol"] == "holdout_classes"
    with pytest.raises(PhaseInputError, match="give the dataset a 'val' split"):
        split_train_val(pd.DataFrame({"label": np.repeat([0, 1, 2], [30, 3, 3]), "split": "train"}), settings)


def test_missing_phase1_and_missing_phase0_for_finetune_are_clear_errors(tmp_path):
    config = make_config(tmp_path / "runs")
    with pytest.raises(PhaseInputError, match="run phase1 first"):
        run_train(config)
    # Finetune mode trains on the images themselves: it needs phase 0, not phase 1.
    finetune = make_config(tmp_path / "runs", mode="finetune")
    finetune.data.tfrecords_dir = str(tmp_path / "tfrecords")
    with pytest.raises(PhaseInputError, match="phase0"):
        run_train(finetune)


# --------------------------------------------------------------------------- positives and hard negatives

def test_pair_keys_by_label_or_by_group():
    from pipeline.training.protocol import pair_keys

    items = pd.DataFrame({"label": [5, 5, 7, 7, 7], "group": ["a", "b", "a", "", ""]})
    np.testing.assert_array_equal(pair_keys(items, TrainConfig(positives="label")), [5, 5, 7, 7, 7])
    keys = pair_keys(items, TrainConfig(positives="group"))
    assert keys[0] == keys[2] and len(set(keys[[0, 1, 3, 4]])) == 4, "ungrouped items are groups of their own"
    with pytest.raises(PhaseInputError, match="no item has a group"):
        pair_keys(items.assign(group=""), TrainConfig(positives="group"))


def test_group_positives_train_on_groups(tmp_path, data):
    features, labels, splits = data
    # Three consecutive items of a class form a group (an "original and its variants").
    groups = np.array([f"g{i // 3}" for i in range(len(labels))])
    runs = tmp_path / "runs"
    write_phase1(runs, features, labels, splits, groups=groups)
    (out,) = run_train(make_config(runs, epochs=2, steps_per_epoch=3, positives="group"))
    summary = json.loads((out / "training.json").read_text())
    assert summary["positives"] == "group"
    assert summary["n_train_classes"] == len(set(groups[splits == "train"])) == N_CLASSES * 6
    assert summary["validation"]["n_classes"] == len(set(groups[splits == "val"]))


def test_hard_negative_batches_train_and_are_recorded(tmp_path, data):
    runs = tmp_path / "runs"
    write_phase1(runs, *data)
    (out,) = run_train(make_config(runs, epochs=2, steps_per_epoch=3, hard_negative_share=0.5,
                                   hard_negatives_per_item=5))
    summary = json.loads((out / "training.json").read_text())
    assert summary["hard_negatives"] == {"share": 0.5, "per_item": 5}
    assert np.isfinite(summary["best_val"]["MAP@R"])


def test_a_training_that_never_beat_the_untrained_model_is_flagged(tmp_path, caplog):
    from pipeline.training.loop import finish_training

    summary = {"best_epoch": 1, "epochs_run": 6, "best_val": {"P@1": 0.22, "MAP@R": 0.14},
               "initial_val": {"P@1": 0.78, "MAP@R": 0.78}}
    with caplog.at_level("WARNING", logger="embedlab.train"):
        finish_training(tmp_path, summary)
    assert "no epoch beat the untrained model" in caplog.text
    assert json.loads((tmp_path / "training.json").read_text())["best_epoch"] == 1
