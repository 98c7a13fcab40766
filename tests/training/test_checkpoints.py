"""Committed per-epoch backups (pipeline/checkpoints.py): a run killed at any point resumes consistently."""
from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from pipeline.core import atomic
from pipeline.training import checkpoints
from pipeline.training.checkpoints import BackupError, EpochBackup, read_state
from pipeline.phases.train import run_train
from pipeline.training.loop import fingerprinted_settings
from tests.training.test_train import TAG, _Interrupt, _RecordEpochs, clustered_features, make_config, write_phase1

MONITOR = "val_MAP@R"


@pytest.fixture(scope="module")
def data():
    return clustered_features()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data):
    runs = tmp_path_factory.mktemp("straight") / "runs"
    write_phase1(runs, *data)
    (out,) = run_train(make_config(runs, epochs=5, steps_per_epoch=4))
    return out


def _out(runs: Path) -> Path:
    return runs / "t" / "train" / TAG / "triplet"


def _best_weights_match_the_summary(out: Path, data) -> None:
    """best.weights.h5 holds the epoch training.json calls best: its validation MAP@R is the recorded one."""
    from pipeline.vectors.retrieval import retrieve

    summary = json.loads((out / "training.json").read_text())
    head = keras.saving.load_model(out / "head.keras", compile=False)
    features, labels, splits = data
    val = splits == "val"
    embeddings = head.predict(features[val], verbose=0)
    result = retrieve(embeddings, labels[val], embeddings, labels[val], metric="cosine", k=1,
                      exclude=np.arange(int(val.sum())))
    assert result.metrics["MAP@R"] == pytest.approx(summary["best_val"]["MAP@R"], abs=1e-5)


def test_kill_between_the_weights_and_the_commit_resumes_from_the_last_committed_epoch(
        tmp_path, data, uninterrupted, monkeypatch):
    runs = tmp_path / "runs"
    write_phase1(runs, *data)
    config = make_config(runs, epochs=5, steps_per_epoch=4)
    out = _out(runs)

    real_write_json = atomic.write_json

    def dies_at_the_third_commit(path, obj, **kwargs):
        if Path(path).name == checkpoints.STATE_FILE and obj["epoch"] == 3:
            raise KeyboardInterrupt("killed after epoch 3's weights were written, before its commit")
        return real_write_json(path, obj, **kwargs)

    monkeypatch.setattr(checkpoints.atomic, "write_json", dies_at_the_third_commit)
    with pytest.raises(KeyboardInterrupt):
        run_train(config)
    monkeypatch.setattr(checkpoints.atomic, "write_json", real_write_json)
    backup = out / "backup"
    assert (backup / "epoch_003.weights.h5").is_file(), "epoch 3's weights were written..."
    assert read_state(backup)["epoch"] == 2, "...but not committed"
    assert list(pd.read_csv(out / "history.csv")["epoch"]) == [0, 1, 2], "epoch 3 was logged"

    run_train(config)
    summary = json.loads((out / "training.json").read_text())
    assert summary["resumed_from_epoch"] == 2 and summary["epochs_run"] == 5
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == [0, 1, 2, 3, 4]
    reference = pd.read_csv(uninterrupted / "history.csv")
    np.testing.assert_allclose(history[["loss", MONITOR]], reference[["loss", MONITOR]], rtol=1e-4)
    assert not backup.exists()
    _best_weights_match_the_summary(out, data)


def test_an_unusable_backup_restarts_training_instead_of_failing(tmp_path, data, uninterrupted, caplog):
    runs = tmp_path / "runs"
    write_phase1(runs, *data)
    config = make_config(runs, epochs=5, steps_per_epoch=4)
    out = _out(runs)
    with pytest.raises(KeyboardInterrupt):
        run_train(config, extra_callbacks=[_Interrupt(after_epoch=2)])
    (out / "backup" / checkpoints.STATE_FILE).write_text('{"epoch": ')   # damaged by hand or by a disk fault

    with caplog.at_level("WARNING", logger="embedlab.train"):
        run_train(config)
    assert "no usable committed backup" in caplog.text
    summary = json.loads((out / "training.json").read_text())
    assert summary["resumed_from_epoch"] == 0 and summary["epochs_run"] == 5
    history = pd.read_csv(out / "history.csv")
    reference = pd.read_csv(uninterrupted / "history.csv")
    np.testing.assert_allclose(history[["loss", MONITOR]], reference[["loss", MONITOR]], rtol=1e-4)


def test_read_state_needs_every_named_file(tmp_path):
    atomic.write_json(tmp_path / checkpoints.STATE_FILE,
                      {"epoch": 2, "weights": "epoch_002.weights.h5", "previous": None,
                       "best": {"epoch": 1, "value": 0.5, "weights": "best_epoch_001.weights.h5"}})
    (tmp_path / "epoch_002.weights.h5").write_bytes(b"x")
    assert read_state(tmp_path) is None, "the best weights it names are missing"
    (tmp_path / "best_epoch_001.weights.h5").write_bytes(b"x")
    assert read_state(tmp_path)["epoch"] == 2
    assert read_state(tmp_path / "nowhere") is None
    (tmp_path / checkpoints.STATE_FILE).write_text('{"epoch": 0, "weights": "epoch_002.weights.h5"}')
    assert read_state(tmp_path) is None


def _tiny_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    return model


def test_roll_back_to_the_previous_committed_epoch(tmp_path):
    x = np.random.default_rng(0).normal(size=(16, 3)).astype("float32")
    y = np.zeros((16, 2), "float32")
    model = _tiny_model()
    scores = iter([0.2, 0.5, 0.4])

    class Score(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs[MONITOR] = next(scores)

    kernels = []

    class Keep(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            kernels.append(model.layers[0].kernel.numpy().copy())

    backup = tmp_path / "backup"
    # Interrupted after the third commit, so the backup survives.
    with pytest.raises(KeyboardInterrupt):
        model.fit(x, y, epochs=4, verbose=0,
                  callbacks=[Score(), EpochBackup(backup, tmp_path / "best.weights.h5", MONITOR), Keep(),
                             _Interrupt(after_epoch=3)])
    state = read_state(backup)
    assert state["epoch"] == 3 and state["previous"]["epoch"] == 2 and state["best"]["epoch"] == 2

    restored = _tiny_model()
    callback = EpochBackup(backup, tmp_path / "best.weights.h5", MONITOR, resume_from=2)
    callback.set_model(restored)
    callback.on_train_begin()
    np.testing.assert_array_equal(restored.layers[0].kernel.numpy(), kernels[1])
    assert restored._initial_epoch == 2 and callback.state["best"]["epoch"] == 2
    assert not (backup / "epoch_003.weights.h5").exists(), "the rolled-back epoch's files are swept"

    with pytest.raises(BackupError, match="epoch 1 is not among"):
        other = EpochBackup(backup, tmp_path / "best.weights.h5", MONITOR, resume_from=1)
        other.set_model(_tiny_model())
        other.on_train_begin()


def test_best_weights_are_published_when_the_fit_ends(tmp_path):
    x = np.random.default_rng(0).normal(size=(16, 3)).astype("float32")
    model = _tiny_model()
    scores = iter([0.3, 0.1, float("nan")])
    kernels = []

    class Score(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs[MONITOR] = next(scores)
            kernels.append(model.layers[0].kernel.numpy().copy())

    best = tmp_path / "best.weights.h5"
    model.fit(x, np.zeros((16, 2), "float32"), epochs=3, verbose=0,
              callbacks=[Score(), EpochBackup(tmp_path / "backup", best, MONITOR)])
    assert best.is_file()
    assert read_state(tmp_path / "backup")["finished"], "kept, marked finished, until the results are saved"
    check = _tiny_model()
    check.optimizer.build(check.trainable_variables)
    check.load_weights(best)
    np.testing.assert_array_equal(check.layers[0].kernel.numpy(), kernels[0])


def test_a_new_training_removes_the_previous_export(tmp_path, data):
    runs = tmp_path / "runs"
    write_phase1(runs, *data)
    out = _out(runs)
    out.mkdir(parents=True)
    for name in ("export.json", "embedding_model.keras"):
        (out / name).write_text("from an earlier training")
    (out / "saved_model").mkdir()
    run_train(make_config(runs, epochs=2, steps_per_epoch=2, export=False))
    assert (out / "training.json").is_file() and (out / "head.keras").is_file()
    assert not any((out / name).exists() for name in ("export.json", "embedding_model.keras", "saved_model"))


def test_the_export_switch_is_not_part_of_the_fingerprint():
    from pipeline.config import TrainConfig

    assert fingerprinted_settings(TrainConfig(export=False)) == fingerprinted_settings(TrainConfig(export=True))


# Training fingerprints as the code computed them before the rules moved next to TrainConfig's fields
# (field metadata): a finished model stays up to date only while these stay the same.
PINNED_SETTINGS_FINGERPRINTS = {
    "default": ({}, "54ddadf8cf94fe90", "4450084973e95e08"),
    "export_off": ({"export": False}, "54ddadf8cf94fe90", "4450084973e95e08"),
    "later_fields_set": ({"mixed_precision": True, "positives": "group", "hard_negative_share": 0.5,
                          "hard_negatives_per_item": 7}, "71857683031f2eba", "0bb637166fb31708"),
    "finetune_knobs": ({"mode": "finetune", "finetune_layers": 5, "finetune_learning_rate": 3e-5, "augment": False,
                        "devices": ["/cpu:0"], "losses": ["arcface", "triplet"],
                        "loss_params": {"triplet": {"margin": 0.3}}}, "c23d1a059735f615", "c84601a47b284085"),
    "hard_negatives_unused": ({"hard_negatives_per_item": 7, "mode": "finetune"}, "c23d1a059735f615",
                              "ef49006670cfb82f"),
    "misc": ({"embedding_dim": 64, "epochs": 3, "n_classes_per_batch": 4, "n_samples_per_class": 2,
              "steps_per_epoch": 5, "learning_rate": 0.01, "weight_decay": 0.0, "early_stopping_patience": 1,
              "reduce_lr_patience": 1, "checkpoint_every": 2, "holdout_fraction": 0.25, "jit_compile": False,
              "seed": 3}, "5960b0e011b08311", "35ca2c4dc4edbada"),
}
PINNED_OBJECTIVE_FINGERPRINTS = {
    ("triplet", ()): "01b9d2b8695480bc",
    ("triplet", (("margin", 0.2), ("mining", "batch_hard"))): "af897dbfea2aa974",
    ("arcface", ()): "d5cc8112cba0adca",
    ("arcface", (("margin", 0.2), ("scale", 16.0))): "0d4c962d257dd67c",
    ("contrastive", ()): "6e1a34650afb9a15",
    ("multisimilarity", ()): "66ec0f40af23add9",
    ("contrastive_softmax", ()): "0d44e2edffb2a834",
    ("supcon", ()): "b78b6166da095bd1",
    ("infonce", ()): "9cab1d7809b5be80",
}


@pytest.mark.parametrize("name", sorted(PINNED_SETTINGS_FINGERPRINTS))
def test_training_settings_fingerprints_of_finished_runs_are_unchanged(name):
    from pipeline.config import TrainConfig
    from pipeline.core.artifacts import fingerprint_of

    settings, head, finetune = PINNED_SETTINGS_FINGERPRINTS[name]
    config = TrainConfig(**settings)
    assert fingerprint_of(fingerprinted_settings(config, "head")) == head
    assert fingerprint_of(fingerprinted_settings(config, "finetune")) == finetune


@pytest.mark.parametrize("loss, params", sorted(PINNED_OBJECTIVE_FINGERPRINTS))
def test_loss_part_of_training_fingerprints_is_unchanged(loss, params):
    from pipeline.core.artifacts import fingerprint_of
    from pipeline.training.objectives import objective_for

    fingerprint = fingerprint_of(objective_for(loss, dict(params)).fingerprint())
    assert fingerprint == PINNED_OBJECTIVE_FINGERPRINTS[(loss, params)]


def test_every_training_setting_says_whether_it_enters_the_fingerprint():
    import dataclasses

    from pipeline.config import TrainConfig

    undeclared = [f.name for f in dataclasses.fields(TrainConfig) if "fingerprint" not in f.metadata]
    assert not undeclared, f"give these TrainConfig fields metadata={{'fingerprint': ...}}: {undeclared}"

    @dataclasses.dataclass
    class WithANewSetting(TrainConfig):
        new_setting: int = 0

    with pytest.raises(TypeError, match="new_setting does not say whether it enters"):
        fingerprinted_settings(WithANewSetting())


def test_a_failure_while_saving_resumes_without_training_again(tmp_path, data, uninterrupted, monkeypatch):
    import pipeline.training.head

    runs = tmp_path / "runs"
    write_phase1(runs, *data)
    config = make_config(runs, epochs=5, steps_per_epoch=4)
    out = _out(runs)

    def fails(*args, **kwargs):
        raise OSError("disk full")

    real_save_head = pipeline.training.head._save_head
    monkeypatch.setattr(pipeline.training.head, "_save_head", fails)
    with pytest.raises(OSError, match="disk full"):
        run_train(config)
    monkeypatch.setattr(pipeline.training.head, "_save_head", real_save_head)
    state = read_state(out / "backup")
    assert state["finished"] and state["epoch"] == 5 and (out / "checkpoints" / "best.weights.h5").is_file()
    assert not (out / "training.json").exists()

    recorder = _RecordEpochs()
    run_train(config, extra_callbacks=[recorder])
    assert recorder.epochs == [], "the finished fit is not run again"
    summary = json.loads((out / "training.json").read_text())
    assert summary["epochs_run"] == 5 and summary["resumed_from_epoch"] == 5 and summary["epochs_this_fit"] == 0
    reference = json.loads((uninterrupted / "training.json").read_text())
    assert summary["best_epoch"] == reference["best_epoch"]
    assert summary["best_val"]["MAP@R"] == pytest.approx(reference["best_val"]["MAP@R"], abs=1e-5)
    _best_weights_match_the_summary(out, data)
    assert not (out / "backup").exists()


def test_a_kill_after_early_stopping_commits_does_not_train_past_the_stop(tmp_path, data):
    settings = dict(epochs=15, steps_per_epoch=4, early_stopping_patience=1, reduce_lr_patience=10,
                    learning_rate=0.3)
    straight_runs = tmp_path / "straight"
    write_phase1(straight_runs, *data)
    (straight,) = run_train(make_config(straight_runs, **settings))
    reference = json.loads((straight / "training.json").read_text())
    assert reference["stopped_early"], "the set-up must stop early to test this"

    class KillOnceStopped(keras.callbacks.Callback):   # after EpochBackup's commit of the stopping epoch
        def on_epoch_end(self, epoch, logs=None):
            if self.model.stop_training:
                raise KeyboardInterrupt

    runs = tmp_path / "runs"
    write_phase1(runs, *data)
    with pytest.raises(KeyboardInterrupt):
        run_train(make_config(runs, **settings), extra_callbacks=[KillOnceStopped()])
    assert read_state(_out(runs) / "backup")["finished"]
    recorder = _RecordEpochs()
    run_train(make_config(runs, **settings), extra_callbacks=[recorder])
    assert recorder.epochs == []
    summary = json.loads((_out(runs) / "training.json").read_text())
    assert summary["epochs_run"] == reference["epochs_run"] and summary["best_epoch"] == reference["best_epoch"]
