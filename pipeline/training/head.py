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
    backup/            the committed state of an unfinished fit (training/checkpoints.py; a rerun resumes from it)
    results/           retrieval_results_epoch_XX.json: each epoch's top-k neighbours of every validation
                       item, when train.epoch_results_top_k > 0 (training/callbacks.py EpochRetrievalResults)
    tensorboard/       TensorBoard logs, when the tensorboard package is installed

The validation protocol, pair keys and hard negatives are training/protocol.py's; what
the loss trains through (the embeddings, or a classifier for ArcFace) is
training/objectives.py's; resume, the checked fit and training.json are training/loop.py's.

Mixed precision (`train.mixed_precision`) computes the head in float16 on GPUs; the
losses and the final L2Normalize compute in float32, so embeddings and similarities
never round in float16. tf.distribute (pipeline/core/distribute.py): the model is built
and compiled under the strategy's scope, every replica gets a slice of each P x K
batch, and the losses gather the global batch back.
"""
from __future__ import annotations

import logging
from pathlib import Path
from collections.abc import Sequence

import keras
import numpy as np

from pipeline.config import TrainConfig
from pipeline.core import atomic
from pipeline.core.distribute import distribute_global_batches, training_strategy, worker_output_dir
from pipeline.core.artifacts import fingerprint_of
from pipeline.core.run_dir import RunDir
from pipeline.reporting.plots import plot_training_curves
from pipeline.training.callbacks import MONITOR, VAL_METRICS, RetrievalValidation, training_callbacks
from pipeline.training.loop import (begin_training, effective_jit, fingerprinted_settings, finish_training,
                                    fit_checked, fit_summary, runtime_summary, training_record, write_history)
from pipeline.training.objectives import objective_for
from pipeline.training.protocol import batch_plan, hard_negatives, training_data

log = logging.getLogger("embedlab.train")

MODE = "head"


def train_head(run_dir: RunDir, tag: str, phase1: dict, loss_name: str, settings: TrainConfig, strategy=None,
               force: bool = False, extra_callbacks: Sequence = ()) -> Path:
    """Train (or resume, or find up to date) the head of backbone `tag` with loss `loss_name`; returns its folder."""
    from models.heads import build_embedding_head

    from pipeline.training.sampler import balanced_batches

    strategy = strategy or training_strategy(settings.devices)
    out = worker_output_dir(run_dir.train_dir(tag, loss_name), strategy)
    objective = objective_for(loss_name, settings.loss_params.get(loss_name, {}) or {})
    meta = phase1["meta"]
    # Other losses and their parameters do not change this model, so they are not part of its fingerprint.
    fingerprint = fingerprint_of({"features": meta.get("fingerprint"), "created": meta.get("created"),
                                  "train": fingerprinted_settings(settings, MODE), **objective.fingerprint()})
    started = begin_training(out, fingerprint, force, strategy)
    if started is None:
        return out
    resume_epoch = started.epoch

    items, features = phase1["items"], phase1["features"]
    data = training_data(items, settings, tag)
    train_rows, val_rows = data.train_rows, data.val_rows
    train_labels = objective.training_labels(data.train_keys)

    jit_compile = effective_jit(settings, strategy)
    keras.utils.set_random_seed(settings.seed)
    with strategy.scope():
        head = build_embedding_head(features.shape[1], settings.embedding_dim,
                                    synchronized_bn=strategy.num_replicas_in_sync > 1)
        # The head stays one nested layer of the training model: it is saved alone.
        model = objective.compile(head, keras.optimizers.AdamW(learning_rate=settings.learning_rate,
                                                               weight_decay=settings.weight_decay),
                                  jit_compile, inputs=keras.Input(shape=(features.shape[1],), name="features"))

    batches = batch_plan(settings, data)
    negatives = hard_negatives(features[train_rows], train_labels, settings)

    def rows_of_each_batch(first: int, count: int):
        ds = balanced_batches(features[train_rows], train_labels, settings.n_classes_per_batch,
                              settings.n_samples_per_class, settings.seed, skip_batches=resume_epoch * batches.steps,
                              hard_negatives=negatives, hard_negative_share=settings.hard_negative_share)
        if count == batches.size:
            return ds
        return ds.map(lambda x, y: (x[first:first + count], y[first:first + count]))

    dataset = distribute_global_batches(strategy, rows_of_each_batch, batches.size)

    validator = RetrievalValidation(head, features[val_rows], data.keys[val_rows], k=settings.epoch_results_top_k)
    callbacks = training_callbacks(out, settings, validator, extra_callbacks, started, val_items=items.iloc[val_rows])
    log.info("phase 3: %s / %s: %d training items (%d classes), %d validation items (%s), "
             "batches of %d classes x %d, %d steps/epoch", tag, loss_name, len(train_rows), data.n_train_classes,
             len(val_rows), data.validation["protocol"], batches.n_classes, settings.n_samples_per_class,
             batches.steps)
    fit, history, seconds = fit_checked(
        model, dataset, batches.steps, settings.epochs, callbacks, out, resume_epoch,
        f"{loss_name} on {tag}", f"Lower train.learning_rate or change train.loss_params.{loss_name}")
    _save_head(head, out / "head.keras", features[val_rows[:8]] if val_rows.size else features[:8])
    write_history(out / "history.csv", history)
    plot_training_curves(history, out / "curves.png", f"{tag} · {loss_name}", before=validator.initial,
                         metrics=VAL_METRICS, monitor=MONITOR)

    summary = training_record(
        tag=tag, mode=MODE, settings=settings, objective=objective, data=data, batches=batches,
        progress=fit_summary(history, fit, batches.steps, seconds, validator, settings.epochs, resume_epoch),
        runtime=runtime_summary(settings, strategy, jit_compile, negatives), feature_dim=features.shape[1],
        fingerprint=fingerprint,
        mode_fields={"phase1": {"dir": phase1["dir"].as_posix(), "fingerprint": meta.get("fingerprint")}})
    return finish_training(out, summary)


def _save_head(head, path: Path, probe: np.ndarray) -> None:
    with atomic.atomic_path(path) as tmp:
        head.save(tmp)
        # Checked before the rename: a head.keras that does not reload is never published.
        reloaded = keras.saving.load_model(tmp)
        # Direct calls run on one device even after mirrored training (see finetune._save_model).
        if not np.allclose(np.asarray(reloaded(probe, training=False)), np.asarray(head(probe, training=False)),
                           atol=1e-5):
            raise RuntimeError(f"{path}: the saved head does not reproduce the trained head's embeddings")
