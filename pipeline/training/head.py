"""Phase 3, "head" mode: train an embedding head on cached phase-1 features with a metric-learning loss.

Per backbone and loss, in `runs/<run>/train/<tag>/<loss>/`:
    head.keras         the embedding head alone (features -> unit vectors); the
                       classifier that ArcFace trains through is not part of it
    training.json      written last: loss, parameters, epochs, best epoch and its
                       validation P@1 / MAP@R, validation protocol, throughput, fingerprint;
                       its presence (with a matching fingerprint) marks the work done
    history.csv        one row per epoch: loss, metrics, learning rate, val_P@1, val_MAP@R
    curves.png         loss, val_P@1 and val_MAP@R per epoch
    checkpoints/       best.weights.h5 (by val_MAP@R), epoch_NNN.weights.h5 every checkpoint_every epochs
    backup/            the committed state of an unfinished fit (pipeline/checkpoints.py; a rerun resumes from it)
    tensorboard/       TensorBoard logs, when the tensorboard package is installed

Validation is retrieval, the thing the head is for: after every epoch the head
embeds the validation items and P@1 / MAP@R are computed leave-one-out by cosine.
The validation items are the "val" split when it has at least two classes with two
or more items; otherwise a seeded share of the training classes is held out
(class-disjoint, as in the unseen-class protocol) and trained on by no one.

Mixed precision (`train.mixed_precision`) computes the head in float16 on GPUs; the
losses and the final L2Normalize compute in float32, so embeddings and similarities
never round in float16. tf.distribute (pipeline/distribute.py): the model is built
and compiled under the strategy's scope, every replica gets a slice of each P x K
batch, and the losses gather the global batch back.

Positive pairs are items of one class (`train.positives: label`) or of one group
(`group`: an original and its variants); batches can be seeded with the negatives
the phase-1 baseline ranks highest (`train.hard_negative_share`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import keras
import numpy as np

from pipeline.core.errors import TrainingDivergedError
from pipeline.core import atomic
from pipeline.training.checkpoints import EpochBackup, read_state
from pipeline.config import ConfigError, RunConfig, TrainConfig
from pipeline.core.distribute import (agree_on_resume, distribute_global_batches, is_chief, training_strategy, worker_output_dir,
                         xla_supported)
from pipeline.core.errors import PhaseInputError
from pipeline.core.run_dir import RunDir, backbone_tag, fingerprint_of

log = logging.getLogger("embedlab.train")

MONITOR = "val_MAP@R"
VAL_METRICS = ("P@1", "MAP@R")
_RESUME_STAMP = "resume.json"
# Settings head mode ignores; kept out of its fingerprint so that adding them left finished heads up to date.
FINETUNE_ONLY = ("finetune_layers", "finetune_learning_rate", "augment")
# Settings that do not change what is learnt (the same global batches on any number of devices).
NOT_FINGERPRINTED = ("devices",)
# Settings the fingerprint always sees at one value: whether phase 3 exports the model
# changes nothing about training (fixed at its default, so older fingerprints still match).
FINGERPRINTED_AS = {"export": True}
# What an export (pipeline/export.py, finetune's _save_model) adds to a model's folder.
EXPORT_FILES = ("export.json", "embedding_model.keras", "saved_model")
# Settings added after models were first trained, with the value that reproduces those
# models: at that value they stay out of the fingerprint, so finished runs stay up to date.
ADDED_LATER = {"mixed_precision": False, "positives": "label", "hard_negative_share": 0.0}


def fingerprinted_settings(settings: TrainConfig, exclude: Sequence[str] = ()) -> dict:
    """The training settings a model's fingerprint covers."""
    values = {k: FINGERPRINTED_AS.get(k, v) for k, v in asdict(settings).items()
              if k not in ("losses", "loss_params", *NOT_FINGERPRINTED, *exclude)
              and not (k in ADDED_LATER and v == ADDED_LATER[k])}
    if settings.hard_negative_share <= 0:
        values.pop("hard_negatives_per_item", None)   # unused without hard negatives
    return values





# --------------------------------------------------------------------------- entry point

def run_train(config: RunConfig, force: bool = False, *, extra_callbacks: Sequence = ()) -> list[Path]:
    """Train one head per (backbone, loss); returns their output folders.

    `extra_callbacks` are appended after the built-in Keras callbacks of every fit.
    """
    settings = config.train
    from models.losses import LOSSES

    unknown = [name for name in settings.losses if name not in LOSSES]
    if unknown or not settings.losses:
        raise ConfigError(f"train.losses: unknown or no loss {unknown}; known: {sorted(LOSSES)}")
    for key in ("n_classes_per_batch", "n_samples_per_class"):
        if getattr(settings, key) < 2:
            raise ConfigError(f"train.{key} must be at least 2")
    if settings.epochs < 1 or settings.steps_per_epoch < 0 or settings.embedding_dim < 1:
        raise ConfigError("train.epochs and train.embedding_dim must be positive, train.steps_per_epoch >= 0")

    if settings.finetune_layers < 0 or settings.finetune_learning_rate <= 0 or settings.learning_rate <= 0:
        raise ConfigError("train.finetune_layers must be >= 0, train.learning_rate and "
                          "train.finetune_learning_rate positive")

    run_dir = RunDir(config)
    with dtype_policy("mixed_float16" if settings.mixed_precision else "float32"):
        return _train_all(config, run_dir, settings, force, extra_callbacks)


def _train_all(config: RunConfig, run_dir: RunDir, settings: TrainConfig, force: bool, extra_callbacks) -> list[Path]:
    # Before any other TensorFlow work: a multi-worker strategy must be created first.
    strategy = training_strategy(settings.devices)
    outputs = []
    if settings.mode == "finetune":
        from pipeline.training.finetune import train_finetune

        for backbone in config.extract.backbones:
            for loss_name in settings.losses:
                outputs.append(train_finetune(run_dir, backbone, backbone_tag(backbone), loss_name, settings,
                                              strategy, force=force, extra_callbacks=extra_callbacks))
        return outputs
    for backbone in config.extract.backbones:
        tag = backbone_tag(backbone)
        phase1 = load_phase1_features(run_dir.embeddings_dir(tag))
        for loss_name in settings.losses:
            out = train_head(run_dir, tag, phase1, loss_name, settings, strategy, force=force,
                             extra_callbacks=extra_callbacks)
            outputs.append(out)
            if not is_chief(strategy):
                continue   # the chief exports; other workers' copies stay in their scratch folder
            if settings.export and (force or not (out / "export.json").is_file()
                                    or (out / "export.json").stat().st_mtime < (out / "training.json").stat().st_mtime):
                from pipeline.serving.model_export import export_embedding_model, not_exportable, probe_batch

                reason = not_exportable(phase1["meta"])
                if reason:
                    log.warning("phase 3: no image-level export for %s/%s: %s", tag, loss_name, reason)
                    continue
                images, features = probe_batch(run_dir, phase1["items"], phase1["features"],
                                               phase1["meta"]["image_size"])
                # The backbone is rebuilt in float32 (the head keeps the policy it was trained
                # with); export.py allows for float16 rounding when phase 1 ran in mixed precision.
                with dtype_policy("float32"):
                    export_embedding_model(run_dir, backbone, loss_name, phase1["meta"], images, features)
    return outputs


@contextlib.contextmanager
def dtype_policy(name: str):
    """Keras's global dtype policy set to `name` inside the block, restored after."""
    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def load_phase1_features(emb_dir: Path) -> dict:
    """items.csv, features_raw.npy and meta.json of a finished phase-1 run."""
    import pandas as pd

    for name in ("meta.json", "items.csv", "features_raw.npy"):
        if not (emb_dir / name).is_file():
            raise PhaseInputError(f"no finished phase-1 output in {emb_dir} ({name} missing): run phase1 first "
                                  "(`python run.py phase1`)")
    items = pd.read_csv(emb_dir / "items.csv", keep_default_na=False,
                        dtype={"id": str, "split": str, "label_name": str, "path": str, "text": str, "group": str})
    features = np.load(emb_dir / "features_raw.npy").astype(np.float32, copy=False)
    if len(items) != len(features) or features.ndim != 2:
        raise PhaseInputError(f"{emb_dir}: items.csv ({len(items)} rows) and features_raw.npy {features.shape} "
                              "disagree: run phase1 again")
    return {"items": items, "features": features, "meta": atomic.read_json(emb_dir / "meta.json"), "dir": emb_dir}


# --------------------------------------------------------------------------- data

def pair_keys(items, settings: TrainConfig) -> np.ndarray:
    """Per item, the integer key that makes two items positives: the class label, or the group.

    With `positives: group`, items without a group form a group of their own (and,
    having no positive, are left out of the batches by the sampler).
    """
    if settings.positives == "label":
        return items["label"].to_numpy()
    groups = items["group"].astype(str).to_numpy() if "group" in items else np.array([""] * len(items))
    if not (groups != "").any():
        raise PhaseInputError("train.positives is 'group' but no item has a group: give the source a 'group' "
                              "column (original and variants share one), or use train.positives=label")
    named = np.unique(groups[groups != ""], return_inverse=True)[1]
    keys = np.empty(len(groups), dtype=np.int64)
    keys[groups != ""] = named
    # Ungrouped items get keys after the named groups, one each.
    keys[groups == ""] = named.max(initial=-1) + 1 + np.arange(int((groups == "").sum()))
    return keys


def split_train_val(items, settings: TrainConfig, keys: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Row indices to train on, to validate on, and a description of the protocol.

    `keys` (default: the labels) decide which validation items are positives of each other.
    """
    from pipeline.training.sampler import split_usable_classes

    splits = items["split"].to_numpy()
    labels = items["label"].to_numpy() if keys is None else np.asarray(keys)
    train_rows = np.flatnonzero(splits == "train")
    if train_rows.size == 0:
        raise PhaseInputError(f"no items in split 'train' (splits present: {sorted(set(splits))}): "
                              "run phase0/phase1 with a training split")
    val_rows = np.flatnonzero(splits == "val")
    val_usable, _ = split_usable_classes(labels[val_rows])
    if val_usable.size >= 2:
        return train_rows, val_rows, {
            "protocol": "val_split", "n_items": int(val_rows.size), "n_classes": int(np.unique(labels[val_rows]).size),
            "n_classes_with_positives": int(val_usable.size)}

    # No usable validation split: hold out whole training classes, so validation
    # measures what the unseen-class protocol measures and never overlaps training.
    # Counted among the classes (groups) that can be scored: an item alone in its class has no positive.
    candidates, _ = split_usable_classes(labels[train_rows])
    n_hold = max(2, int(round(settings.holdout_fraction * candidates.size)))
    kind = "groups" if settings.positives == "group" else "classes"
    if settings.holdout_fraction <= 0 or candidates.size - n_hold < 2:
        raise PhaseInputError(
            f"no usable 'val' split (it needs 2 {kind} with 2+ items; it has {val_usable.size}) and the "
            f"{candidates.size} training {kind} with 2+ items cannot spare {n_hold} for validation "
            f"(train.holdout_fraction={settings.holdout_fraction}) while keeping 2 to train on")
    rng = np.random.default_rng(settings.seed)
    held_out = np.sort(rng.choice(candidates, size=n_hold, replace=False))
    in_holdout = np.isin(labels[train_rows], held_out)
    log.warning("phase 3: no usable 'val' split; validating on %d held-out training %s (%.0f %%, seed %d), "
                "disjoint from training", n_hold, kind, 100 * settings.holdout_fraction, settings.seed)
    return train_rows[~in_holdout], train_rows[in_holdout], {
        "protocol": "holdout_classes", "holdout_fraction": settings.holdout_fraction, "seed": settings.seed,
        "n_items": int(in_holdout.sum()), "n_classes": int(n_hold), "n_classes_with_positives": int(n_hold),
        # Class labels, or group keys with train.positives=group.
        "held_out_labels": held_out.tolist()}


# --------------------------------------------------------------------------- callbacks

class RetrievalValidation(keras.callbacks.Callback):
    """Adds val_P@1 and val_MAP@R (cosine, leave-one-out) of the head's embeddings to each epoch's logs.

    Must come first in the callback list: Keras hands one logs dict to the callbacks
    in order, so EarlyStopping, checkpoints and loggers placed after it see the keys.
    """

    def __init__(self, head, features: np.ndarray | None, labels: np.ndarray, batch_size: int = 1024,
                 embed: Callable[[], np.ndarray] | None = None):
        super().__init__()
        self.head = head
        self.features = None if features is None else np.asarray(features, dtype=np.float32)
        self.labels = np.asarray(labels)
        self.batch_size = batch_size
        # Finetune mode has no cached features: `embed` runs the model over the validation images.
        self.embed = embed or (lambda: self.head.predict(self.features, batch_size=self.batch_size, verbose=0))
        self.initial: dict | None = None   # scores of the head before any training step
        self.seconds = 0.0

    def evaluate(self) -> dict:
        from pipeline.vectors.retrieval import retrieve

        started = time.perf_counter()
        try:
            embeddings = np.asarray(self.embed())
            if not np.isfinite(embeddings).all():
                return {name: float("nan") for name in VAL_METRICS}
            # Same object as query and gallery: retrieve normalises it once, and
            # exclude drops each item from its own ranking.
            result = retrieve(embeddings, self.labels, embeddings, self.labels, metric="cosine", k=1,
                              exclude=np.arange(len(embeddings)))
            return {name: float(result.metrics[name]) for name in VAL_METRICS}
        finally:
            self.seconds += time.perf_counter() - started

    def on_train_begin(self, logs=None):
        # Runs before EpochBackup (later in the list) loads a backup, so on a
        # resumed run too this scores the freshly initialised head.
        self.initial = self.evaluate()

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        loss = logs.get("loss")
        if loss is not None and not math.isfinite(loss):
            scores = {name: float("nan") for name in VAL_METRICS}   # diverged: nothing to score
        else:
            scores = self.evaluate()
        for name, value in scores.items():
            logs[f"val_{name}"] = value


class PeriodicCheckpoint(keras.callbacks.ModelCheckpoint):
    """ModelCheckpoint at every `every`-th epoch, counted from the run's start.

    Counting epochs (not batches, as save_freq=int does) keeps the schedule aligned
    when a fit is resumed part-way.
    """

    def __init__(self, filepath: str, every: int, **kwargs):
        super().__init__(filepath, **kwargs)
        self.every = max(1, int(every))

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every == 0:
            super().on_epoch_end(epoch, logs)


class _RestoreMonitorState(keras.callbacks.Callback):
    """After a resume, gives EarlyStopping and ReduceLROnPlateau the state of the epochs already run.

    Both reset themselves in on_train_begin; without this, patience would restart
    and the pre-interruption best score would be forgotten. The logged scores are
    replayed through each callback's own rule (its min_delta, ReduceLROnPlateau's
    cooldown), so the resumed run stops and lowers the rate where an uninterrupted
    one would. Must follow them in the list.
    """

    def __init__(self, history, early_stopping, reduce_lr):
        super().__init__()
        self.history = history
        self.monitors = (early_stopping, reduce_lr)

    def on_train_begin(self, logs=None):
        early_stopping, reduce_lr = self.monitors
        for callback in self.monitors:
            if callback.monitor_op is None:
                callback._set_monitor_op()
        rates = self.history["learning_rate"].to_numpy(dtype=float) if "learning_rate" in self.history else None
        for row, (epoch, score) in enumerate(zip(self.history["epoch"].to_numpy(dtype=int),
                                                 self.history[MONITOR].to_numpy(dtype=float))):
            _replay_early_stopping(early_stopping, int(epoch), float(score))
            _replay_reduce_lr(reduce_lr, float(score), None if rates is None else float(rates[row]))


def _replay_early_stopping(callback, epoch: int, score: float) -> None:
    """EarlyStopping.on_epoch_end's bookkeeping for one logged epoch (weights and stopping aside)."""
    callback.wait += 1
    if callback._is_improvement(score, callback.best):
        callback.best, callback.best_epoch, callback.wait = score, epoch, 0


def _replay_reduce_lr(callback, score: float, learning_rate: float | None) -> None:
    """ReduceLROnPlateau.on_epoch_end's bookkeeping for one logged epoch; the rate itself
    comes back with the optimizer state."""
    if callback.in_cooldown():
        callback.cooldown_counter -= 1
        callback.wait = 0
    if callback._is_improvement(score, callback.best):
        callback.best, callback.wait = score, 0
    elif not callback.in_cooldown():
        callback.wait += 1
        if callback.wait >= callback.patience and (learning_rate is None or learning_rate > callback.min_lr):
            callback.cooldown_counter, callback.wait = callback.cooldown, 0


# --------------------------------------------------------------------------- training

def train_head(run_dir: RunDir, tag: str, phase1: dict, loss_name: str, settings: TrainConfig, strategy=None,
               force: bool = False, extra_callbacks: Sequence = ()) -> Path:
    from models import losses as losses_lib
    from models.heads import build_embedding_head

    from pipeline.training.sampler import balanced_batches

    strategy = strategy or training_strategy(settings.devices)
    out = worker_output_dir(run_dir.train_dir(tag, loss_name), strategy)
    loss_params = dict(settings.loss_params.get(loss_name, {}) or {})
    # Other losses and their parameters do not change this model, so they are not part of its fingerprint.
    shared = fingerprinted_settings(settings, exclude=FINETUNE_ONLY)
    meta = phase1["meta"]
    loss = losses_lib.get_loss(loss_name, **loss_params)
    # The loss's full configuration, defaults included: a changed default retrains.
    fingerprint = fingerprint_of({"features": meta.get("fingerprint"), "created": meta.get("created"),
                                  "train": shared, "loss": loss_name, "loss_config": _jsonable(loss.get_config())})
    started = begin_training(out, fingerprint, force, strategy)
    if started is None:
        return out
    resume_epoch = started.epoch
    history_path = out / "history.csv"

    items, features = phase1["items"], phase1["features"]
    labels = pair_keys(items, settings)
    train_rows, val_rows, validation = split_train_val(items, settings, labels)
    train_rows, single = usable_training_rows(train_rows, labels, settings, tag)
    train_labels = labels[train_rows]

    with_classifier = bool(getattr(loss, "requires_classifier", False))
    train_classes = np.unique(train_labels)
    if with_classifier:
        # The classifier's logits are indexed 0..C-1, whatever the dataset's labels are.
        train_labels = np.searchsorted(train_classes, train_labels)

    jit_compile = _effective_jit(settings, strategy)
    keras.utils.set_random_seed(settings.seed)
    with strategy.scope():
        head = build_embedding_head(features.shape[1], settings.embedding_dim,
                                    synchronized_bn=strategy.num_replicas_in_sync > 1)
        if with_classifier:
            from models.classifier import CosineClassifier

            inputs = keras.Input(shape=(features.shape[1],), name="features")
            logits = CosineClassifier(len(train_classes), name="cosine_classifier")(head(inputs))
            model = keras.Model(inputs, logits, name=f"{head.name}_with_classifier")
            metrics = []
        else:
            model = head
            metrics = [losses_lib.triplet_accuracy]
        model.compile(optimizer=keras.optimizers.AdamW(learning_rate=settings.learning_rate,
                                                       weight_decay=settings.weight_decay),
                      loss=loss, metrics=metrics, jit_compile=jit_compile)

    n_classes = min(settings.n_classes_per_batch, train_classes.size)
    batch_size = n_classes * settings.n_samples_per_class
    steps = settings.steps_per_epoch or math.ceil(len(train_rows) / batch_size)
    hard_negatives = _hard_negatives(features[train_rows], train_labels, settings)

    def rows_of_each_batch(first: int, count: int):
        ds = balanced_batches(features[train_rows], train_labels, settings.n_classes_per_batch,
                              settings.n_samples_per_class, settings.seed, skip_batches=resume_epoch * steps,
                              hard_negatives=hard_negatives, hard_negative_share=settings.hard_negative_share)
        if count == batch_size:
            return ds
        return ds.map(lambda x, y: (x[first:first + count], y[first:first + count]))

    dataset = distribute_global_batches(strategy, rows_of_each_batch, batch_size)

    validator = RetrievalValidation(head, features[val_rows], labels[val_rows])
    callbacks = _callbacks(out, settings, validator, extra_callbacks, started)
    log.info("phase 3: %s / %s: %d training items (%d classes), %d validation items (%s), "
             "batches of %d classes x %d, %d steps/epoch", tag, loss_name, len(train_rows), train_classes.size,
             len(val_rows), validation["protocol"], n_classes, settings.n_samples_per_class, steps)
    fit, history, seconds = fit_checked(
        model, dataset, steps, settings.epochs, callbacks, out, resume_epoch,
        f"{loss_name} on {tag}", f"Lower train.learning_rate or change train.loss_params.{loss_name}")
    _save_head(head, out / "head.keras", features[val_rows[:8]] if val_rows.size else features[:8])
    _write_history(history_path, history)
    _plot_curves(history, out / "curves.png", f"{tag} · {loss_name}", before=validator.initial)

    progress = fit_summary(history, fit, steps, seconds, validator, settings.epochs, resume_epoch)
    summary = {
        "backbone": tag, "loss": loss_name, "loss_params": loss_params,
        "loss_config": _jsonable(loss.get_config()), "mode": settings.mode,
        "train": {k: v for k, v in asdict(settings).items() if k not in ("losses", "loss_params", *FINETUNE_ONLY)},
        **runtime_summary(settings, strategy, jit_compile, hard_negatives),
        "requires_classifier": with_classifier, "n_classifier_classes": int(train_classes.size) if with_classifier
        else None,
        **progress,
        "validation": validation,
        "n_train": int(len(train_rows)), "n_train_classes": int(train_classes.size),
        # Single-item classes can form no positive pair; the sampler leaves them out.
        "n_single_item_classes_excluded": int(single.size),
        "n_val": int(len(val_rows)), "feature_dim": int(features.shape[1]), "embedding_dim": settings.embedding_dim,
        "batch": {"n_classes": int(n_classes), "n_samples_per_class": settings.n_samples_per_class,
                  "size": int(batch_size)},
        "phase1": {"dir": phase1["dir"].as_posix(), "fingerprint": meta.get("fingerprint")},
        "fingerprint": fingerprint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return finish_training(out, summary)


def finish_training(out: Path, summary: dict) -> Path:
    """Publish training.json (the completion marker, written last), then drop the backup
    (kept until now so that a failure while saving resumes without retraining) and the stamp."""
    atomic.write_json(out / "training.json", summary)
    shutil.rmtree(out / "backup", ignore_errors=True)
    (out / _RESUME_STAMP).unlink(missing_ok=True)
    log.info("phase 3: wrote %s (best epoch %d of %d: val P@1 %.4f, MAP@R %.4f; before training %.4f / %.4f)",
             out, summary["best_epoch"], summary["epochs_run"], summary["best_val"]["P@1"],
             summary["best_val"]["MAP@R"], summary["initial_val"]["P@1"], summary["initial_val"]["MAP@R"])
    if summary["best_val"]["MAP@R"] < summary["initial_val"]["MAP@R"]:
        # Every epoch made validation retrieval worse than the untrained model (often a collapse:
        # all embeddings pulled together). The model is saved, but the user should know.
        log.warning("phase 3: %s: no epoch beat the untrained model on validation MAP@R (%.4f < %.4f); check the "
                    "learning rate, the loss parameters and the batch composition", out,
                    summary["best_val"]["MAP@R"], summary["initial_val"]["MAP@R"])
    return out


def usable_training_rows(train_rows: np.ndarray, keys: np.ndarray, settings: TrainConfig, tag: str):
    """(the training rows whose class/group has 2+ training items, the keys left out).

    An item alone in its class (or group) has no positive: the sampler could never use
    it, and ArcFace would give it a class centre of its own, so it is left out here.
    """
    from pipeline.training.sampler import split_usable_classes

    usable, single = split_usable_classes(keys[train_rows])
    if usable.size < 2:
        raise PhaseInputError(f"{tag}: training needs at least 2 {settings.positives}s with 2 or more training "
                              f"items; found {usable.size}")
    return train_rows[np.isin(keys[train_rows], usable)], single


def _effective_jit(settings: TrainConfig, strategy) -> bool:
    if settings.jit_compile and not xla_supported(strategy):
        log.info("phase 3: XLA is off for a step mirrored over several replicas (not supported by TensorFlow "
                 "on CPU devices; unverified on several GPUs)")
        return False
    return settings.jit_compile


def _hard_negatives(embeddings: np.ndarray, keys: np.ndarray, settings: TrainConfig) -> np.ndarray | None:
    """Each training item's top-ranked negatives under the phase-1 baseline (None when not seeding)."""
    if settings.hard_negative_share <= 0:
        return None
    from pipeline.training.sampler import baseline_hard_negatives

    started = time.perf_counter()
    ranked = baseline_hard_negatives(embeddings, keys, n_negatives=settings.hard_negatives_per_item)
    log.info("phase 3: ranked the baseline's %d hardest negatives of %d training items in %.1f s",
             settings.hard_negatives_per_item, len(keys), time.perf_counter() - started)
    return ranked


def runtime_summary(settings: TrainConfig, strategy, jit_compile: bool, hard_negatives) -> dict:
    """training.json fields on how the run was executed and batched."""
    return {
        "distribution": {"strategy": type(strategy).__name__, "replicas": int(strategy.num_replicas_in_sync)},
        "mixed_precision": settings.mixed_precision, "jit_compile": bool(jit_compile),
        "positives": settings.positives,
        "hard_negatives": None if hard_negatives is None else {
            "share": settings.hard_negative_share, "per_item": int(hard_negatives.shape[1])},
    }


def fit_checked(model, dataset, steps: int, epochs: int, callbacks: list, out: Path, resume_epoch: int,
                what: str, advice: str):
    """model.fit with the guarantees both training modes need: the CSV log closed even when
    interrupted, a diverged run turned into an error (nothing saved), and the best
    checkpoint of all (possibly resumed) fits loaded. Returns (fit, history, seconds)."""
    history_path = out / "history.csv"
    started = time.perf_counter()
    try:
        fit = model.fit(dataset, epochs=epochs, steps_per_epoch=steps, callbacks=callbacks, shuffle=False,
                        verbose=1 if sys.stdout.isatty() else 2)
    finally:
        # An interrupted fit skips on_train_end, where CSVLogger closes its file;
        # EpochBackup's committed state is left in place on purpose.
        for callback in callbacks:
            if isinstance(callback, keras.callbacks.CSVLogger) and callback.csv_file is not None:
                callback.csv_file.close()
    seconds = time.perf_counter() - started

    history = _read_history(history_path)
    fit_losses = np.asarray(fit.history.get("loss", []), dtype=float)
    if not np.isfinite(fit_losses).all():
        # TerminateOnNaN stopped the fit, which then ended normally, so EpochBackup has
        # already dropped its backup (a diverged fit leaves none): a rerun starts afresh.
        (out / _RESUME_STAMP).unlink(missing_ok=True)
        bad_epoch = resume_epoch + int(np.flatnonzero(~np.isfinite(fit_losses))[0]) + 1
        raise TrainingDivergedError(
            f"phase 3: {what} diverged: the loss became NaN/inf in epoch {bad_epoch}; no model was saved. "
            f"{advice} (history: {history_path})")

    best_path = out / "checkpoints" / "best.weights.h5"
    if best_path.is_file():
        # The best checkpoint spans resumed fits; EarlyStopping's restore only knows this one.
        model.load_weights(best_path)
    return fit, history, seconds


def fit_summary(history, fit, steps: int, seconds: float, validator, epochs: int, resume_epoch: int) -> dict:
    """The training.json fields shared by both modes: epochs, best epoch, speed."""
    scores = history[MONITOR].to_numpy(dtype=float)
    best_index = int(np.nanargmax(scores)) if np.isfinite(scores).any() else len(history) - 1
    epochs_this_fit = len(fit.history.get("loss", []))
    train_seconds = max(seconds - validator.seconds, 1e-9)
    return {
        "epochs_requested": epochs, "epochs_run": int(len(history)), "stopped_early": bool(len(history) < epochs),
        "resumed_from_epoch": resume_epoch, "epochs_this_fit": epochs_this_fit,
        "best_epoch": int(history["epoch"].iloc[best_index]) + 1,
        "best_val": {name: float(history[f"val_{name}"].iloc[best_index]) for name in VAL_METRICS},
        "initial_val": validator.initial,
        "steps_per_epoch": int(steps), "steps_this_fit": int(epochs_this_fit * steps),
        "seconds": seconds, "validation_seconds": validator.seconds,
        "steps_per_second": epochs_this_fit * steps / train_seconds,
    }


def _callbacks(out: Path, settings: TrainConfig, validator: RetrievalValidation, extra, resume: "Resume") -> list:
    previous = resume.history
    checkpoints = out / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    early_stopping = keras.callbacks.EarlyStopping(monitor=MONITOR, mode="max",
                                                   patience=settings.early_stopping_patience,
                                                   restore_best_weights=True)
    reduce_lr = keras.callbacks.ReduceLROnPlateau(monitor=MONITOR, mode="max", patience=settings.reduce_lr_patience)
    callbacks = [
        validator,  # first: the callbacks below read what it adds to the logs
        keras.callbacks.TerminateOnNaN(),
        early_stopping,
        reduce_lr,
        PeriodicCheckpoint(str(checkpoints / "epoch_{epoch:03d}.weights.h5"), settings.checkpoint_every,
                           save_weights_only=True),
        # Before the backup's commit: if a run dies between the two, the epoch is logged
        # and then redone (begin_training trims the log to the committed epochs).
        keras.callbacks.CSVLogger(str(out / "history.csv"), append=True),
        # Last: it commits what the callbacks above produced (scores, learning rate).
        EpochBackup(out / "backup", checkpoints / "best.weights.h5", MONITOR, resume_from=resume.epoch or None,
                    finished=resume.fit_finished),
    ]
    if len(previous):
        callbacks.append(_RestoreMonitorState(previous, early_stopping, reduce_lr))
    if _tensorboard_available():
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(out / "tensorboard"), write_graph=False))
    else:
        log.info("phase 3: the tensorboard package is not installed; no TensorBoard logs (pip install tensorboard)")
    return callbacks + list(extra)


def _tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


class Resume(NamedTuple):
    """Where a training starts: after `epoch` committed epochs (0 = fresh), with their
    `history`; `fit_finished` when those epochs were the whole fit (only saving is left)."""
    epoch: int
    history: "object"
    fit_finished: bool = False


def begin_training(out: Path, fingerprint: str, force: bool, strategy=None) -> Resume | None:
    """None when `out` already holds this training (same fingerprint); else where it starts.

    On a multi-worker cluster every worker looks at its own folder, then all take one
    decision (pipeline/distribute.py `agree_on_resume`): a worker pre-empted one epoch
    behind the others makes all of them resume from that earlier epoch.
    """
    summary_path = out / "training.json"
    done = not force and summary_path.is_file() and _recorded_fingerprint(summary_path) == fingerprint
    stamp, backup = out / _RESUME_STAMP, out / "backup"
    state = None
    if not done and not force and stamp.is_file() and _recorded_fingerprint(stamp) == fingerprint:
        state = read_state(backup)
    latest = state["epoch"] if state else 0
    before_latest = state["previous"]["epoch"] if state and state.get("previous") else 0
    done, resume_epoch, fit_finished = agree_on_resume(strategy, done, latest, before_latest,
                                                       bool(state and state.get("finished")))
    if done:
        log.info("phase 3: %s is up to date (use --force to redo)", out)
        return None
    _prepare_output_dir(out, fingerprint, fresh=resume_epoch == 0,
                        unusable_backup=backup.is_dir() and state is None and not force)
    history_path = out / "history.csv"
    previous = _read_history(history_path, before_epoch=resume_epoch)
    if fit_finished:
        log.info("phase 3: %s finished training (%d epochs) but not saving; saving it now", out, resume_epoch)
    elif resume_epoch:
        log.info("phase 3: resuming %s after epoch %d", out, resume_epoch)
    if resume_epoch:
        # Rows beyond the backup (an epoch logged, then interrupted before its commit)
        # are redone, so they go; CSVLogger appends to what remains.
        _write_history(history_path, previous)
    return Resume(resume_epoch, previous, fit_finished)


def _prepare_output_dir(out: Path, fingerprint: str, fresh: bool, unusable_backup: bool) -> None:
    """Clear what a new (`fresh`) or resumed training must not find in `out`."""
    # The completion marker goes first: until training.json is rewritten, nothing in
    # this folder claims to describe the current configuration. The exported model of an
    # earlier training goes too, so it is never found beside a new one's files.
    (out / "training.json").unlink(missing_ok=True)
    for name in EXPORT_FILES:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    if not fresh:
        return
    if unusable_backup:
        log.warning("phase 3: %s holds no usable committed backup; training %s from the start", out / "backup", out)
    for name in ("backup", "checkpoints", "tensorboard"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("history.csv", "head.keras", "curves.png"):
        (out / name).unlink(missing_ok=True)
    atomic.write_json(out / _RESUME_STAMP, {"fingerprint": fingerprint})


def _recorded_fingerprint(path: Path) -> str | None:
    """The "fingerprint" a JSON file (training.json, resume.json) records; None if unreadable."""
    try:
        return atomic.read_json(path).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def _read_history(path: Path, before_epoch: int | None = None):
    """history.csv as a DataFrame, one row per epoch (the last of duplicates), sorted."""
    import pandas as pd

    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame({"epoch": pd.Series(dtype=int), "loss": pd.Series(dtype=float),
                             MONITOR: pd.Series(dtype=float), "val_P@1": pd.Series(dtype=float)})
    history = pd.read_csv(path)
    history = history.drop_duplicates("epoch", keep="last").sort_values("epoch").reset_index(drop=True)
    if before_epoch is not None:
        history = history[history["epoch"] < before_epoch].reset_index(drop=True)
    return history


def _write_history(path: Path, history) -> None:
    with atomic.atomic_open(path, "w", encoding="utf-8", newline="") as f:
        history.to_csv(f, index=False)


def _save_head(head, path: Path, probe: np.ndarray) -> None:
    with atomic.atomic_path(path) as tmp:
        head.save(tmp)
        # Checked before the rename: a head.keras that does not reload is never published.
        reloaded = keras.saving.load_model(tmp)
        # Direct calls run on one device even after mirrored training (see finetune._save_model).
        if not np.allclose(np.asarray(reloaded(probe, training=False)), np.asarray(head(probe, training=False)),
                           atol=1e-5):
            raise RuntimeError(f"{path}: the saved head does not reproduce the trained head's embeddings")


def _plot_curves(history, path: Path, title: str, before: dict | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # headless servers and CI have no display
    from matplotlib.figure import Figure

    epochs = history["epoch"].to_numpy() + 1
    fig = Figure(figsize=(10, 3.4), layout="constrained", facecolor="white")
    panels = [("loss", "training loss")] + [(f"val_{name}", f"validation {name}") for name in VAL_METRICS]
    for ax, (column, label) in zip(fig.subplots(1, len(panels)), panels):
        if column in history:
            values = history[column].to_numpy(dtype=float)
            ax.plot(epochs, values, marker="o", markersize=3)
            metric = column.removeprefix("val_")
            if before and column != "loss" and math.isfinite(before.get(metric, float("nan"))):
                ax.axhline(before[metric], color="#d73027", linestyle=":", linewidth=1, label="untrained head")
            if column == MONITOR and np.isfinite(values).any():
                best = int(np.nanargmax(values))
                ax.axvline(epochs[best], color="#6b7280", linestyle="--", linewidth=1,
                           label=f"best: epoch {epochs[best]}")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="lower right", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, facecolor="white")
    return path


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))
