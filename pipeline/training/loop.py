"""What every phase-3 training does around its model, whatever the mode: decide whether the work
is done or resumes (begin_training), fit with the guarantees a long run needs (fit_checked),
summarise it and publish training.json last (training_record, finish_training).

Which settings a trained model's fingerprint covers is declared next to each field of
pipeline.config.TrainConfig (field metadata); `fingerprinted_settings` is the one reader.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import keras
import numpy as np

from pipeline.config import TrainConfig
from pipeline.core import atomic
from pipeline.core.artifacts import is_current
from pipeline.core.distribute import agree_on_resume, xla_supported
from pipeline.core.errors import TrainingDivergedError
from pipeline.training.callbacks import MONITOR, RESULTS_DIR, VAL_METRICS
from pipeline.training.checkpoints import read_state

log = logging.getLogger("embedlab.train")

RESUME_STAMP = "resume.json"
# What an export (pipeline/serving/model_export.py, finetune.save_image_model) adds to a model's folder.
EXPORT_FILES = ("export.json", "embedding_model.keras", "saved_model")


# --------------------------------------------------------------------------- settings

def _fingerprint_rule(field: dataclasses.Field) -> dict:
    if "fingerprint" not in field.metadata:
        raise TypeError(f"TrainConfig.{field.name} does not say whether it enters a trained model's fingerprint: "
                        "give it metadata={'fingerprint': ...} (see TrainConfig's docstring)")
    return field.metadata


def fingerprinted_settings(settings: TrainConfig, mode: str | None = None) -> dict:
    """The training settings a model's fingerprint covers in `mode` (default: settings.mode)."""
    mode = mode or settings.mode
    every = dataclasses.asdict(settings)
    values = {}
    for field in dataclasses.fields(settings):
        rule = _fingerprint_rule(field)
        value = every[field.name]
        if not rule["fingerprint"] or mode not in rule.get("modes", (mode,)):
            continue
        if "omitted_at" in rule and value == rule["omitted_at"]:
            continue
        if "used_if" in rule and getattr(settings, rule["used_if"]) <= 0:
            continue
        if "only_with" in rule and getattr(settings, rule["only_with"][0]) != rule["only_with"][1]:
            continue
        values[field.name] = rule.get("fixed_at", value)
    return values


def recorded_settings(settings: TrainConfig, mode: str | None = None) -> dict:
    """training.json's "train": the settings `mode` uses (each model records its own loss apart)."""
    mode = mode or settings.mode
    every = dataclasses.asdict(settings)
    return {field.name: every[field.name] for field in dataclasses.fields(settings)
            if not _fingerprint_rule(field).get("per_loss") and mode in field.metadata.get("modes", (mode,))}


def jsonable(obj):
    """`obj` as JSON would give it back (tuples as lists, unknown types as strings)."""
    return json.loads(json.dumps(obj, default=str))


def effective_jit(settings: TrainConfig, strategy) -> bool:
    """train.jit_compile, unless the strategy's devices cannot run an XLA-compiled mirrored step."""
    if settings.jit_compile and not xla_supported(strategy):
        log.info("phase 3: XLA is off for a step mirrored over several replicas (not supported by TensorFlow "
                 "on CPU devices; unverified on several GPUs)")
        return False
    return settings.jit_compile


@contextlib.contextmanager
def dtype_policy(name: str):
    """Keras's global dtype policy set to `name` inside the block, restored after."""
    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


# --------------------------------------------------------------------------- begin / resume

class Resume(NamedTuple):
    """Where a training starts: after `epoch` committed epochs (0 = fresh), with their
    `history`; `fit_finished` when those epochs were the whole fit (only saving is left)."""
    epoch: int
    history: object
    fit_finished: bool = False


def begin_training(out: Path, fingerprint: str, force: bool, strategy=None) -> Resume | None:
    """None when `out` already holds this training (same fingerprint); else where it starts.

    On a multi-worker cluster every worker looks at its own folder, then all take one
    decision (pipeline/core/distribute.py `agree_on_resume`): a worker pre-empted one epoch
    behind the others makes all of them resume from that earlier epoch.
    """
    summary_path = out / "training.json"
    done = not force and is_current(summary_path, fingerprint)
    stamp, backup = out / RESUME_STAMP, out / "backup"
    state = None
    if not done and not force and is_current(stamp, fingerprint):
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
    previous = read_history(history_path, before_epoch=resume_epoch)
    if fit_finished:
        log.info("phase 3: %s finished training (%d epochs) but not saving; saving it now", out, resume_epoch)
    elif resume_epoch:
        log.info("phase 3: resuming %s after epoch %d", out, resume_epoch)
    if resume_epoch:
        # Rows beyond the backup (an epoch logged, then interrupted before its commit)
        # are redone, so they go; CSVLogger appends to what remains.
        write_history(history_path, previous)
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
    for name in ("backup", "checkpoints", "tensorboard", RESULTS_DIR):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("history.csv", "head.keras", "curves.png"):
        (out / name).unlink(missing_ok=True)
    atomic.write_json(out / RESUME_STAMP, {"fingerprint": fingerprint})


def read_history(path: Path, before_epoch: int | None = None):
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


def write_history(path: Path, history) -> None:
    with atomic.atomic_open(path, "w", encoding="utf-8", newline="") as f:
        history.to_csv(f, index=False)


# --------------------------------------------------------------------------- fit

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

    history = read_history(history_path)
    fit_losses = np.asarray(fit.history.get("loss", []), dtype=float)
    if not np.isfinite(fit_losses).all():
        # TerminateOnNaN stopped the fit, which then ended normally, so EpochBackup has
        # already dropped its backup (a diverged fit leaves none): a rerun starts afresh.
        (out / RESUME_STAMP).unlink(missing_ok=True)
        bad_epoch = resume_epoch + int(np.flatnonzero(~np.isfinite(fit_losses))[0]) + 1
        raise TrainingDivergedError(
            f"phase 3: {what} diverged: the loss became NaN/inf in epoch {bad_epoch}; no model was saved. "
            f"{advice} (history: {history_path})")

    best_path = out / "checkpoints" / "best.weights.h5"
    if best_path.is_file():
        # The best checkpoint spans resumed fits; EarlyStopping's restore only knows this one.
        model.load_weights(best_path)
    return fit, history, seconds


# --------------------------------------------------------------------------- summary

def fit_summary(history, fit, steps: int, seconds: float, validator, epochs: int, resume_epoch: int) -> dict:
    """The training.json fields on the fit: epochs, best epoch, speed."""
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


def runtime_summary(settings: TrainConfig, strategy, jit_compile: bool, hard_negatives, refresh=None) -> dict:
    """training.json fields on how the run was executed and batched (`refresh`: the hard-negative refresh
    callback, training/refresh.py, whose log of refreshes is recorded)."""
    negatives = None if hard_negatives is None else {
        "share": settings.hard_negative_share, "per_item": int(hard_negatives.shape[1])}
    if negatives is not None and dataclasses.asdict(settings.hard_negatives) != {
            "source": "baseline", "refresh_every": 1, "random_share": 0.0}:
        negatives.update(refresh.summary() if refresh is not None else {
            "source": settings.hard_negatives.source, "random_share": settings.hard_negatives.random_share})
    return {
        "distribution": {"strategy": type(strategy).__name__, "replicas": int(strategy.num_replicas_in_sync)},
        "mixed_precision": settings.mixed_precision, "jit_compile": bool(jit_compile),
        "positives": settings.positives,
        "hard_negatives": negatives,
    }


def training_record(*, tag: str, mode: str, settings: TrainConfig, objective, data, batches, progress: dict,
                    runtime: dict, feature_dim: int, fingerprint: str, mode_fields: dict) -> dict:
    """training.json of one model, whatever the mode: the objective's loss fields, the settings the
    mode uses, how it ran (`runtime`), the fit's `progress`, the data protocol (`data`: a
    protocol.TrainingData), the batches (protocol.BatchPlan), then the mode's own `mode_fields`."""
    return {
        "backbone": tag, **objective.loss_summary(), "mode": mode,
        "train": recorded_settings(settings, mode),
        **runtime,
        **objective.model_summary(),
        **progress,
        "validation": data.validation,
        "n_train": int(len(data.train_rows)), "n_train_classes": int(data.n_train_classes),
        # Single-item classes can form no positive pair; the sampler leaves them out.
        "n_single_item_classes_excluded": int(data.single.size),
        "n_val": int(len(data.val_rows)), "feature_dim": int(feature_dim), "embedding_dim": settings.embedding_dim,
        "batch": batches.summary(settings),
        **mode_fields,
        "fingerprint": fingerprint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def finish_training(out: Path, summary: dict) -> Path:
    """Publish training.json (the completion marker, written last), then drop the backup
    (kept until now so that a failure while saving resumes without retraining) and the stamp."""
    atomic.write_json(out / "training.json", summary)
    shutil.rmtree(out / "backup", ignore_errors=True)
    (out / RESUME_STAMP).unlink(missing_ok=True)
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
