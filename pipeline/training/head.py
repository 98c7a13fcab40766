"""Phase 3, "head" mode: train an embedding head on cached phase-1 features with a metric-learning loss.

The head (`train.head_type`): "projection" (Dense -> BatchNorm -> L2) on the pooled features, or
"transformer" (TransformerProjection) on the cached token sequences (phase 1 with `extract.tokens`; read
memory-mapped, a batch of rows at a time, never loaded whole) or, without them, on the pooled features as
sequences of one. With `train.use_text` the head fuses each item's phase-1 text embedding (models/heads/fusion.py).

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
from pipeline.core.artifacts import fingerprint_of, load_text_embeddings
from pipeline.core.errors import PhaseInputError
from pipeline.core.run_dir import RunDir
from pipeline.reporting.plots import plot_training_curves
from pipeline.training.callbacks import MONITOR, VAL_METRICS, RetrievalValidation, training_callbacks
from pipeline.training.loop import (begin_training, effective_jit, fingerprinted_settings, finish_training,
                                    fit_checked, fit_summary, runtime_summary, training_record, write_history)
from pipeline.training.objectives import objective_for
from pipeline.training.protocol import (batch_plan, group_anchors, hard_negatives, training_data,
                                       validation_triplets)
from pipeline.training.refresh import group_codes, start_refresh

log = logging.getLogger("embedlab.train")

MODE = "head"


def head_input_kind(phase1: dict, settings: TrainConfig) -> dict:
    """What the head reads: {"image": "tokens" | "pooled", "text": bool} (recorded in training.json, so phase 4
    feeds the trained head the same)."""
    tokens = settings.head_type == "transformer" and phase1.get("tokens") is not None
    if settings.head_type == "transformer" and not tokens:
        log.warning("phase 3: %s holds no cached tokens (extract.tokens was off): the transformer head reads the "
                    "pooled features as sequences of one", phase1["dir"])
    return {"image": "tokens" if tokens else "pooled", "text": bool(settings.use_text)}


def head_inputs(phase1: dict, kind: dict) -> list:
    """The head's input arrays for every phase-1 item, in the head's input order: the image side (tokens,
    memory-mapped, or the pooled features), then the text embeddings (all-zero rows without text) if fused."""
    arrays = [phase1["tokens"] if kind.get("image") == "tokens" else phase1["features"]]
    if kind.get("text"):
        texts = load_text_embeddings(phase1["dir"], phase1["items"], phase1["meta"])
        if texts is None or texts["text"] is None:
            raise PhaseInputError(f"train.use_text needs the items' text embeddings from phase 1, and {phase1['dir']} "
                                  "has none: a CLIP backbone with extract.text on and items with texts (a manifest "
                                  "`text` column, or data.text_prompt)")
        arrays.append(texts["text"])
    return arrays


def gather_rows(arrays: list, rows: np.ndarray):
    """float32 copies of `rows` of each input array (one array, or a list when the head has several inputs)."""
    batch = [np.asarray(a[np.asarray(rows)], dtype=np.float32) for a in arrays]
    return batch if len(batch) > 1 else batch[0]


def predict_rows(model, arrays: list, rows: np.ndarray, chunk_bytes: int = 64 << 20) -> list[np.ndarray]:
    """`model`'s outputs on `rows`, a chunk of rows at a time (memory-mapped tokens are read per chunk);
    a list with one array per output."""
    row_bytes = sum(int(np.prod(a.shape[1:])) * 4 for a in arrays)
    step = max(1, min(4096, chunk_bytes // max(row_bytes, 1)))
    outputs = None
    for start in range(0, len(rows), step):
        # predict, not predict_on_batch: under a mirrored strategy it splits the chunk over the replicas.
        out = model.predict(gather_rows(arrays, rows[start:start + step]), batch_size=step, verbose=0)
        out = [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]
        outputs = [[o] for o in out] if outputs is None else [acc + [o] for acc, o in zip(outputs, out)]
    return [np.concatenate(parts) for parts in outputs]


def build_head(arrays: list, settings: TrainConfig, synchronized_bn: bool = False):
    """The head `settings` ask for, over inputs shaped like `arrays` (see head_inputs)."""
    from models.heads import build_embedding_head, build_fused_head, build_transformer_head

    shape = tuple(int(d) for d in arrays[0].shape[1:])
    if settings.head_type == "transformer":
        head = build_transformer_head(shape, settings.embedding_dim, num_layers=settings.head_layers,
                                      num_heads=settings.head_heads, pooling=settings.head_pooling,
                                      dropout=settings.head_dropout, width=settings.head_width,
                                      residual=settings.head_residual)
    else:
        head = build_embedding_head(shape[0], settings.embedding_dim, synchronized_bn=synchronized_bn)
    return build_fused_head(head, int(arrays[1].shape[1]), settings.fusion) if len(arrays) > 1 else head


def train_head(run_dir: RunDir, tag: str, phase1: dict, loss_name: str, settings: TrainConfig, strategy=None,
               force: bool = False, extra_callbacks: Sequence = ()) -> Path:
    """Train (or resume, or find up to date) the head of backbone `tag` with loss `loss_name`; returns its folder."""
    from pipeline.training.sampler import balanced_batches

    strategy = strategy or training_strategy(settings.devices)
    out = worker_output_dir(run_dir.train_dir(tag, loss_name), strategy)
    objective = objective_for(loss_name, settings.loss_params.get(loss_name, {}) or {}, settings.use_text)
    meta = phase1["meta"]
    kind = head_input_kind(phase1, settings)
    # Other losses and their parameters do not change this model, so they are not part of its fingerprint.
    fingerprint = fingerprint_of({"features": meta.get("fingerprint"), "created": meta.get("created"),
                                  "train": fingerprinted_settings(settings, MODE), **objective.fingerprint()})
    started = begin_training(out, fingerprint, force, strategy)
    if started is None:
        return out
    resume_epoch = started.epoch

    items, features = phase1["items"], phase1["features"]
    arrays = head_inputs(phase1, kind)
    data = training_data(items, settings, tag)
    train_rows, val_rows = data.train_rows, data.val_rows
    train_labels = objective.training_labels(data.train_keys)

    jit_compile = effective_jit(settings, strategy)
    keras.utils.set_random_seed(settings.seed)
    with strategy.scope():
        head = build_head(arrays, settings, synchronized_bn=strategy.num_replicas_in_sync > 1)
        inputs = [keras.Input(shape=a.shape[1:], name=t.name) for a, t in zip(arrays, head.inputs)]
        # The head stays one nested layer of the training model: it is saved alone.
        model = objective.compile(head, keras.optimizers.AdamW(learning_rate=settings.learning_rate,
                                                               weight_decay=settings.weight_decay),
                                  jit_compile, inputs=inputs if len(inputs) > 1 else inputs[0])

    batches = batch_plan(settings, data)
    groups = group_codes(items, train_rows)
    negatives = hard_negatives(features[train_rows], train_labels, settings, groups)
    # With train.hard_negatives.source current, the table is re-mined from the head being trained.
    refresh = start_refresh(settings, out / "backup", resume_epoch, negatives, train_labels, groups,
                            embed=lambda: predict_rows(head, arrays, train_rows)[0])
    if refresh is not None:
        negatives = refresh.tables.latest()[1]
    anchors = None
    if settings.anchor_originals:
        anchors = np.searchsorted(train_rows, group_anchors(items, data.keys, train_rows))

    def rows_of_each_batch(first: int, count: int):
        import tensorflow as tf

        ds = balanced_batches(tuple(arrays), train_labels, settings.n_classes_per_batch,
                              settings.n_samples_per_class, settings.seed, skip_batches=resume_epoch * batches.steps,
                              hard_negatives=negatives, hard_negative_share=settings.hard_negative_share,
                              rows=train_rows, anchors=anchors,
                              negative_tables=None if refresh is None else refresh.tables.table_for,
                              batches_per_table=settings.hard_negatives.refresh_every * batches.steps)
        if count == batches.size:
            return ds
        return ds.map(lambda x, y: (tf.nest.map_structure(lambda a: a[first:first + count], x),
                                    y[first:first + count]))

    dataset = distribute_global_batches(strategy, rows_of_each_batch, batches.size)

    triplets = None
    if settings.triplet_negatives:
        val_keys = data.keys[val_rows]
        val_anchors = np.searchsorted(val_rows, group_anchors(items, data.keys, val_rows))
        triplets = validation_triplets(val_keys, val_anchors, features[val_rows], settings.triplet_negatives,
                                       settings.seed)
    validator = RetrievalValidation(head, None, data.keys[val_rows], k=settings.epoch_results_top_k,
                                    embed=lambda: predict_rows(head, arrays, val_rows)[0], triplets=triplets)
    callbacks = training_callbacks(out, settings, validator, extra_callbacks, started, val_items=items.iloc[val_rows],
                                   refresh=refresh)
    log.info("phase 3: %s / %s: %s head on %s%s: %d training items (%d classes), %d validation items (%s)%s, "
             "batches of %d classes x %d, %d steps/epoch", tag, loss_name, settings.head_type, kind["image"],
             " + texts" if kind["text"] else "", len(train_rows), data.n_train_classes, len(val_rows),
             data.validation["protocol"], "" if triplets is None else f", {len(triplets)} validation triplets",
             batches.n_classes, settings.n_samples_per_class, batches.steps)
    try:
        fit, history, seconds = fit_checked(
            model, dataset, batches.steps, settings.epochs, callbacks, out, resume_epoch,
            f"{loss_name} on {tag}", f"Lower train.learning_rate or change train.loss_params.{loss_name}")
    finally:
        if refresh is not None:
            refresh.tables.close()   # a batch generator waiting for a next table ends
    _save_head(head, out / "head.keras", gather_rows(arrays, val_rows[:8] if val_rows.size else np.arange(8)))
    write_history(out / "history.csv", history)
    plot_training_curves(history, out / "curves.png", f"{tag} · {loss_name}", before=validator.initial,
                         metrics=VAL_METRICS, monitor=MONITOR)

    summary = training_record(
        tag=tag, mode=MODE, settings=settings, objective=objective, data=data, batches=batches,
        progress=fit_summary(history, fit, batches.steps, seconds, validator, settings.epochs, resume_epoch),
        runtime=runtime_summary(settings, strategy, jit_compile, negatives, refresh), feature_dim=features.shape[1],
        fingerprint=fingerprint,
        mode_fields={"phase1": {"dir": phase1["dir"].as_posix(), "fingerprint": meta.get("fingerprint")},
                     "head_input": {**kind, "shape": [int(d) for d in arrays[0].shape[1:]]},
                     "n_validation_triplets": None if triplets is None else int(len(triplets))})
    return finish_training(out, summary)


def _save_head(head, path: Path, probe) -> None:
    with atomic.atomic_path(path) as tmp:
        head.save(tmp)
        # Checked before the rename: a head.keras that does not reload is never published.
        reloaded = keras.saving.load_model(tmp)
        # Direct calls run on one device even after mirrored training (see finetune.save_image_model).
        if not np.allclose(np.asarray(reloaded(probe, training=False)), np.asarray(head(probe, training=False)),
                           atol=1e-5):
            raise RuntimeError(f"{path}: the saved head does not reproduce the trained head's embeddings")
