"""The Keras callbacks every phase-3 fit runs with, and the list they form.

RetrievalValidation scores each epoch the way the model will be used (retrieval,
leave-one-out, by cosine); the callbacks after it in the list (early stopping, the
learning-rate schedule, checkpoints, the CSV log, the epoch backup) read its scores.
RestoreMonitorState gives a resumed fit the early-stopping and learning-rate state of
the epochs it already ran. EpochRetrievalResults writes, after every epoch, the top-k
neighbours of every validation item that RetrievalValidation ranked (`train.epoch_results_top_k`).
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from collections.abc import Callable

import keras
import numpy as np

from pipeline.config import TrainConfig
from pipeline.core import atomic
from pipeline.training.checkpoints import EpochBackup

log = logging.getLogger("embedlab.train")

MONITOR = "val_MAP@R"
VAL_METRICS = ("P@1", "MAP@R")
# Where EpochRetrievalResults writes, inside a model's folder, and its file names (epoch from 1).
RESULTS_DIR = "results"
RESULTS_FILE = "retrieval_results_epoch_{epoch:02d}.json"


class RetrievalValidation(keras.callbacks.Callback):
    """Adds val_P@1 and val_MAP@R (cosine, leave-one-out) of the head's embeddings to each epoch's logs,
    and val_triplet_accuracy when given validation `triplets` (protocol.validation_triplets: rows of
    anchor, positive, negative positions among the validation items).

    Must come first in the callback list: Keras hands one logs dict to the callbacks
    in order, so EarlyStopping, checkpoints and loggers placed after it see the keys.
    """

    def __init__(self, head, features: np.ndarray | None, labels: np.ndarray, batch_size: int = 1024,
                 embed: Callable[[], np.ndarray] | None = None, k: int = 1, triplets: np.ndarray | None = None):
        super().__init__()
        self.head = head
        self.features = None if features is None else np.asarray(features, dtype=np.float32)
        self.labels = np.asarray(labels)
        self.batch_size = batch_size
        # Neighbours kept per item (the scores do not depend on it): EpochRetrievalResults reads them.
        self.k = max(1, int(k))
        self.latest = None   # the RetrievalResult of the latest evaluation; None when it could not rank
        # Finetune mode has no cached features: `embed` runs the model over the validation images.
        self.embed = embed or (lambda: self.head.predict(self.features, batch_size=self.batch_size, verbose=0))
        self.initial: dict | None = None   # scores of the head before any training step
        self.triplets = triplets
        self.metric_names = VAL_METRICS + (("triplet_accuracy",) if triplets is not None else ())
        self.seconds = 0.0

    def evaluate(self) -> dict:
        from pipeline.vectors.retrieval import retrieve

        started = time.perf_counter()
        self.latest = None
        try:
            embeddings = np.asarray(self.embed())
            if not np.isfinite(embeddings).all():
                return {name: float("nan") for name in self.metric_names}
            # Same object as query and gallery: retrieve normalises it once, and
            # exclude drops each item from its own ranking.
            result = retrieve(embeddings, self.labels, embeddings, self.labels, metric="cosine", k=self.k,
                              exclude=np.arange(len(embeddings)))
            self.latest = result
            scores = {name: float(result.metrics[name]) for name in VAL_METRICS}
            if self.triplets is not None:
                from pipeline.training.protocol import triplet_accuracy

                scores["triplet_accuracy"] = triplet_accuracy(embeddings, self.triplets)
            return scores
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
            scores = {name: float("nan") for name in self.metric_names}   # diverged: nothing to score
            self.latest = None
        else:
            scores = self.evaluate()
        for name, value in scores.items():
            logs[f"val_{name}"] = value


def retrieval_records(ids, labels, neighbours: np.ndarray, scores: np.ndarray) -> list[dict]:
    """One record per query: {query_id, query_label, ranked_ids, scores, labels}, best neighbour first.

    `neighbours` / `scores` are `retrieve`'s (query i is item i; -1 pads rankings shorter than k).
    """
    ids, labels = np.asarray(ids).astype(str), np.asarray(labels)
    records = []
    for query, (row, row_scores) in enumerate(zip(neighbours, scores)):
        found = row >= 0
        ranked = row[found]
        records.append({"query_id": str(ids[query]), "query_label": _plain(labels[query]),
                        "ranked_ids": ids[ranked].tolist(), "scores": row_scores[found].astype(float).tolist(),
                        "labels": [_plain(label) for label in labels[ranked]]})
    return records


def _plain(value):
    """A numpy scalar as the Python value JSON writes (object arrays already hold Python values)."""
    return value.item() if isinstance(value, np.generic) else value


class EpochRetrievalResults(keras.callbacks.Callback):
    """After every epoch, `folder/retrieval_results_epoch_XX.json` (XX = the epoch, from 01): the top-k
    neighbours of every validation item, ranked by the validator of that epoch (exact cosine search,
    leave-one-out: the validation items are queries and gallery, each left out of its own ranking).

    Must follow `validator` in the callback list and come before EpochBackup, so that a committed
    epoch always has its file; a redone epoch (after a resume) rewrites it.
    """

    def __init__(self, validator: RetrievalValidation, folder: Path, ids, labels):
        super().__init__()
        self.validator, self.folder = validator, Path(folder)
        self.ids, self.labels = np.asarray(ids), np.asarray(labels)

    def on_epoch_end(self, epoch, logs=None):
        result = self.validator.latest
        if result is None:
            return   # diverged or non-finite embeddings: nothing was ranked
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic.write_json(self.folder / RESULTS_FILE.format(epoch=epoch + 1),
                          retrieval_records(self.ids, self.labels, result.neighbours, result.neighbour_scores))


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


class RestoreMonitorState(keras.callbacks.Callback):
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


def training_callbacks(out: Path, settings: TrainConfig, validator: RetrievalValidation, extra, resume,
                       val_items=None, refresh=None) -> list:
    """The callbacks of one fit, in the order they must run; `resume` is loop.begin_training's Resume.

    `val_items` (the validation items' rows, with `id` and `label_name`, in the validator's order)
    are needed when `train.epoch_results_top_k` writes per-epoch retrieval results. `refresh`: the
    hard-negative refresh (training/refresh.py), placed after early stopping and committed with each epoch.
    """
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
        *_epoch_results(out, settings, validator, val_items),
        early_stopping,
        reduce_lr,
        *([] if refresh is None else [refresh]),
        PeriodicCheckpoint(str(checkpoints / "epoch_{epoch:03d}.weights.h5"), settings.checkpoint_every,
                           save_weights_only=True),
        # Before the backup's commit: if a run dies between the two, the epoch is logged
        # and then redone (begin_training trims the log to the committed epochs).
        keras.callbacks.CSVLogger(str(out / "history.csv"), append=True),
        # Last: it commits what the callbacks above produced (scores, learning rate).
        EpochBackup(out / "backup", checkpoints / "best.weights.h5", MONITOR, resume_from=resume.epoch or None,
                    finished=resume.fit_finished, extras=None if refresh is None else {"hard_negatives": refresh}),
    ]
    if len(previous):
        callbacks.append(RestoreMonitorState(previous, early_stopping, reduce_lr))
    if _tensorboard_available():
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(out / "tensorboard"), write_graph=False))
    else:
        log.info("phase 3: the tensorboard package is not installed; no TensorBoard logs (pip install tensorboard)")
    return callbacks + list(extra)


def _epoch_results(out: Path, settings: TrainConfig, validator: RetrievalValidation, val_items) -> list:
    if settings.epoch_results_top_k <= 0:
        return []
    if val_items is None:
        raise ValueError("train.epoch_results_top_k needs the validation items (training_callbacks' val_items)")
    if validator.k < settings.epoch_results_top_k:
        raise ValueError(f"the validator keeps {validator.k} neighbours, train.epoch_results_top_k asks for "
                         f"{settings.epoch_results_top_k}")
    labels = val_items["label_name"] if "label_name" in val_items else val_items["label"]
    return [EpochRetrievalResults(validator, out / RESULTS_DIR, val_items["id"].to_numpy(), labels.to_numpy())]


def _tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None
