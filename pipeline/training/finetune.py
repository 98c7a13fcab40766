"""Phase 3, "finetune" mode: train the backbone's last layers and the embedding head end to end, on images.

Per backbone and loss, in `runs/<run>/train/<tag>/<loss>/`, the same files as head
mode (training.json with "mode": "finetune", history.csv, curves.png, checkpoints/,
backup/) except that the model is image-level from the start:
    embedding_model.keras   RGB pixels 0..255 -> unit embedding (preprocessing inside)
    saved_model/            the same as a TensorFlow SavedModel (endpoint `serve`)
    export.json             inputs, outputs and the reload check both files passed

Which trunk layers train: the last `train.finetune_layers` of the units the backbone names
(models/backbones/registry.py `finetune_units`: a keras.applications trunk's layers; CLIP's
embedding, pre-norm, transformer blocks, post-norm and projection). `train.embedding_dim: 0`
fine-tunes without a head: the backbone's own L2-normalised output is the embedding.

Learning rates: the head trains at `train.learning_rate` and the trunk's layers at
the lower `train.finetune_learning_rate`, through one AdamW with per-variable
multipliers (models/optimizers.py), so backups (training/checkpoints.py), checkpoints and
ReduceLROnPlateau (which lowers both rates together) work as in head mode.

Data: the train (and validation) records' encoded bytes are held in memory (they are
far smaller than decoded pixels, pipeline/data/tfrecords.py `read_records`) and decoded
per batch, so augmentation (pipeline/data/augment.py) differs each time an image is
drawn. Augmentation is seeded per drawn item, so a resumed run sees the same crops it
would have seen uninterrupted.
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from collections.abc import Sequence

import keras
import numpy as np

from pipeline.config import BackboneConfig, TrainConfig
from pipeline.core import atomic
from pipeline.core.distribute import distribute_global_batches, training_strategy, worker_output_dir
from pipeline.core.errors import PhaseInputError
from pipeline.core.artifacts import fingerprint_of
from pipeline.core.run_dir import RunDir
from pipeline.data.tfrecords import plain_images, read_records
from pipeline.core.artifacts import load_dataset_meta, load_phase1_features
from pipeline.reporting.plots import plot_training_curves
from pipeline.training.callbacks import MONITOR, VAL_METRICS, RetrievalValidation, training_callbacks
from pipeline.training.loop import (begin_training, effective_jit, fingerprinted_settings, finish_training,
                                    fit_checked, fit_summary, runtime_summary, training_record, write_history)
from pipeline.training.objectives import objective_for
from pipeline.training.protocol import batch_plan, hard_negatives, training_data
from pipeline.training.refresh import group_codes, start_refresh

log = logging.getLogger("embedlab.finetune")

MODE = "finetune"


# --------------------------------------------------------------------------- data

def image_batches(encoded: np.ndarray, labels: np.ndarray, image_size: int, n_classes_per_batch: int,
                  n_samples_per_class: int, seed: int, augment: bool, skip_batches: int = 0,
                  hard_negatives: np.ndarray | None = None, hard_negative_share: float = 0.0,
                  first: int = 0, count: int | None = None, negative_tables=None, batches_per_table: int = 0,
                  targets: np.ndarray | None = None):
    """An endless dataset of (images float32 (n, S, S, 3) in 0..255, labels int32 (n,)), class-balanced.

    Each element is rows [first, first + count) of a global P x K batch (all of it by
    default); under tf.distribute each worker decodes only its replicas' rows. `negative_tables` /
    `batches_per_table`: a refreshed hard-negative table (sampler.refreshed_batch_indices). `targets` (n, d):
    per item a target vector (a teacher's embedding); each y row is then [label, target...] (float32).
    """
    import itertools

    import tensorflow as tf

    from pipeline.data.augment import augment_image
    from pipeline.data.tfrecords import decode_and_resize
    from pipeline.training.sampler import (balanced_batch_indices, hard_negative_batch_indices,
                                           refreshed_batch_indices)

    labels = np.asarray(labels)

    if hard_negative_share > 0 and hard_negatives is None:
        raise ValueError("hard_negative_share > 0 needs the hard_negatives ranking")

    def batch_indices():
        if hard_negative_share > 0:
            return hard_negative_batch_indices(labels, hard_negatives, hard_negative_share, n_classes_per_batch,
                                               n_samples_per_class, seed)
        return balanced_batch_indices(labels, n_classes_per_batch, n_samples_per_class, seed)

    batch_size = int(next(batch_indices()).size)
    count = batch_size - first if count is None else count
    # The bytes are small enough to live in the pipeline as one string tensor (the
    # graph's 2 GB constant limit bounds this at roughly a million small JPEGs).
    bytes_table = tf.constant(encoded.astype(object).tolist(), dtype=tf.string)
    labels32 = tf.constant(labels.astype(np.int32))
    target_table = None if targets is None else tf.constant(np.asarray(targets, dtype=np.float32))

    def stream():
        if negative_tables is not None:
            return refreshed_batch_indices(labels, negative_tables, batches_per_table, hard_negative_share,
                                           n_classes_per_batch, n_samples_per_class, seed, skip_batches)
        return itertools.islice(batch_indices(), skip_batches, None)

    def rows():
        for number, batch in enumerate(stream(), start=skip_batches):
            # Positions count drawn items from the run's start, so a resumed (or
            # distributed) stream keeps each item's augmentation seed.
            positions = number * batch_size + np.arange(first, first + count)
            yield positions, batch[first:first + count]

    def load(position, row):
        image_bytes = tf.gather(bytes_table, row)
        if augment:
            image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
            image.set_shape([None, None, 3])
            image = augment_image(image, image_size, tf.stack([tf.cast(seed, tf.int64), position]))
        else:
            image = decode_and_resize(image_bytes, image_size)
        if target_table is not None:
            # One tensor [label, target...]: Keras matches a dict y against the model's output names.
            label = tf.cast(tf.gather(labels32, row), tf.float32)
            return image, tf.concat([tf.expand_dims(label, 0), tf.gather(target_table, row)], axis=0)
        return image, tf.gather(labels32, row)

    spec = tf.TensorSpec((count,), tf.int64)
    ds = tf.data.Dataset.from_generator(rows, output_signature=(spec, spec)).unbatch()
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    # Batching the unbatched stream back into the same sizes keeps each batch's P x K grouping.
    return ds.batch(count, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------- model

def build_finetune_model(backbone: BackboneConfig, embedding_dim: int, finetune_layers: int,
                         synchronized_bn: bool = False):
    """(image-level embedding model, the trunk, image size) with only the trunk's last units trainable.

    The units are what the backbone's builder names (models/backbones/registry.py `finetune_units`):
    a keras.applications trunk's layers, a CLIP trunk's embedding, norms, transformer blocks and
    projection. The head's layers are applied at the model's top level (not as a nested model) so
    that phase 4 can reach the input of the final L2Normalize, the pre-normalisation feature.
    `embedding_dim` 0: no head, the backbone's own L2-normalised output is the embedding.
    """
    from models.backbones import build_feature_extractor
    from models.heads import build_embedding_head

    extractor = build_feature_extractor(**backbone.extractor_options())
    trunk = next(layer for layer in extractor.model.layers if isinstance(layer, keras.Model))
    freeze_all_but_last_units(trunk, trunk_units(backbone, trunk), finetune_layers)
    if embedding_dim == 0:
        return keras.Model(extractor.model.input, extractor.model.output["embedding"],
                           name="embedding_model"), trunk, extractor
    head = build_embedding_head(extractor.dim, embedding_dim, synchronized_bn=synchronized_bn)
    x = extractor.model.output["pooled"]
    for layer in head.layers[1:]:
        x = layer(x)
    model = keras.Model(extractor.model.input, x, name="embedding_model")
    return model, trunk, extractor


def trunk_units(backbone: BackboneConfig, trunk) -> list:
    """The trunk's trainable units, input to output, as its backbone counts them."""
    from models.backbones.registry import finetune_units

    return finetune_units(backbone.name, trunk)


def freeze_all_but_last_units(trunk, units: list, n_units: int) -> list:
    """Make only the last `n_units` of `units` trainable (all of them when n_units >= len(units)); returns those."""
    chosen = units[len(units) - min(n_units, len(units)):]
    chosen_ids = {id(unit) for unit in chosen}
    # Trainable from the top down first: Keras reports no trainable weights under a frozen parent,
    # so the nested layers that hold a transformer's blocks must stay trainable themselves.
    trunk.trainable = True
    for unit in units:
        # BatchNormalization stays frozen: P x K batches of a few classes have statistics
        # unlike the data's, and small batches give noisy ones; updating the moving
        # averages from them would shift every frozen layer after it. The trunk is called
        # with training=False, so BN also normalises with its stored statistics in training.
        unit.trainable = id(unit) in chosen_ids and not isinstance(unit, keras.layers.BatchNormalization)
    in_units = {id(v) for unit in chosen for v in unit.trainable_weights}
    stray = [v.path for v in trunk.trainable_weights if id(v) not in in_units]
    if stray:
        raise ValueError(f"trunk {trunk.name!r}: its finetune units leave variables out (e.g. {stray[0]}); the "
                         f"backbone's finetune_units must cover every layer that holds weights")
    return [unit for unit in chosen if unit.trainable]


def finetune_optimizer(trunk, settings: TrainConfig):
    """One AdamW: the head at train.learning_rate, the trunk at train.finetune_learning_rate."""
    from models.optimizers import ScaledAdamW

    multiplier = settings.finetune_learning_rate / settings.learning_rate
    # Keras variable paths name the layer, not the model that holds it, so the trunk's
    # variables are listed one by one.
    return ScaledAdamW(learning_rate=settings.learning_rate, weight_decay=settings.weight_decay,
                       lr_multipliers={v.path: multiplier for v in trunk.trainable_weights})


def baseline_features(run_dir: RunDir, tag: str, ids: np.ndarray) -> np.ndarray:
    """Phase-1 features of the items `ids`, in that order (the baseline that ranks hard negatives)."""
    phase1 = load_phase1_features(run_dir.embeddings_dir(tag), load_dataset_meta(run_dir))
    position = {item_id: row for row, item_id in enumerate(phase1["items"]["id"].astype(str))}
    missing = [item_id for item_id in ids if item_id not in position]
    if missing:
        raise PhaseInputError(f"hard negatives: {len(missing)} training items (e.g. {missing[0]}) have no phase-1 "
                              f"features in {phase1['dir']}: run phase1 again (`python run.py phase1 --force`)")
    return phase1["features"][[position[item_id] for item_id in ids]]


# --------------------------------------------------------------------------- training

def train_finetune(run_dir: RunDir, backbone_cfg: BackboneConfig, tag: str, loss_name: str, settings: TrainConfig,
                   strategy=None, force: bool = False, extra_callbacks: Sequence = ()) -> Path:
    """Fine-tune (or resume, or find up to date) backbone `backbone_cfg` with loss `loss_name`; returns its folder."""
    strategy = strategy or training_strategy(settings.devices)
    out = worker_output_dir(run_dir.train_dir(tag, loss_name), strategy)
    dataset_meta = load_dataset_meta(run_dir)
    objective = objective_for(loss_name, settings.loss_params.get(loss_name, {}) or {})
    inputs = {"dataset": dataset_meta.get("fingerprint"), "backbone": backbone_cfg.fingerprint_fields(),
              "train": fingerprinted_settings(settings, MODE), **objective.fingerprint(),
              # Since the trunk has had its own learning rate; earlier runs trained both at one rate.
              "optimizer": "ScaledAdamW"}
    if settings.hard_negative_share > 0:
        # The hard negatives come from the phase-1 features: a new phase 1 means new batches.
        phase1_meta = run_dir.embeddings_dir(tag) / "meta.json"
        inputs["phase1"] = atomic.read_json(phase1_meta).get("fingerprint") if phase1_meta.is_file() else None
    fingerprint = fingerprint_of(inputs)
    started = begin_training(out, fingerprint, force, strategy)
    if started is None:
        return out
    resume_epoch = started.epoch

    items, encoded = read_records(run_dir.dataset_dir)
    data = training_data(items, settings, tag)
    train_rows, val_rows = data.train_rows, data.val_rows
    negatives = None
    groups = group_codes(items, train_rows)
    if settings.hard_negative_share > 0:
        negatives = hard_negatives(baseline_features(run_dir, tag, items["id"].to_numpy()[train_rows]),
                                   data.train_keys, settings, groups)
    train_labels = objective.training_labels(data.train_keys)

    jit_compile = effective_jit(settings, strategy)
    keras.utils.set_random_seed(settings.seed)
    with strategy.scope():
        embedding_model, trunk, extractor = build_finetune_model(
            backbone_cfg, settings.embedding_dim, settings.finetune_layers,
            synchronized_bn=strategy.num_replicas_in_sync > 1)
        model = objective.compile(embedding_model, finetune_optimizer(trunk, settings), jit_compile)

    batches = batch_plan(settings, data)
    # With train.hard_negatives.source current, the table is re-mined from the network being fine-tuned.
    refresh = start_refresh(settings, out / "backup", resume_epoch, negatives, train_labels, groups,
                            embed=lambda: embedding_model.predict(
                                plain_images(encoded[train_rows], extractor.image_size), verbose=0))
    if refresh is not None:
        negatives = refresh.tables.latest()[1]

    def rows_of_each_batch(first: int, count: int):
        return image_batches(encoded[train_rows], train_labels, extractor.image_size, settings.n_classes_per_batch,
                             settings.n_samples_per_class, settings.seed, settings.augment,
                             skip_batches=resume_epoch * batches.steps, hard_negatives=negatives,
                             hard_negative_share=settings.hard_negative_share, first=first, count=count,
                             negative_tables=None if refresh is None else refresh.tables.table_for,
                             batches_per_table=settings.hard_negatives.refresh_every * batches.steps)

    dataset = distribute_global_batches(strategy, rows_of_each_batch, batches.size)
    val_images = plain_images(encoded[val_rows], extractor.image_size)
    validator = RetrievalValidation(embedding_model, None, data.keys[val_rows],
                                    embed=lambda: embedding_model.predict(val_images, verbose=0),
                                    k=settings.epoch_results_top_k)
    callbacks = training_callbacks(out, settings, validator, extra_callbacks, started,
                                   val_items=with_label_names(items.iloc[val_rows], dataset_meta), refresh=refresh)
    n_trainable = sum(int(np.prod(w.shape)) for w in trunk.trainable_weights)
    units = trunk_units(backbone_cfg, trunk)
    trainable_units = min(settings.finetune_layers, len(units))
    log.info("phase 3 (finetune): %s / %s: %d training images (%d classes), %d validation images (%s), batches of "
             "%d classes x %d, %d steps/epoch, last %d of %d trunk units trainable (%d backbone parameters)%s", tag,
             loss_name, len(train_rows), data.n_train_classes, len(val_rows), data.validation["protocol"],
             batches.n_classes, settings.n_samples_per_class, batches.steps, trainable_units, len(units), n_trainable,
             "" if settings.embedding_dim else ", no head")
    try:
        fit, history, seconds = fit_checked(
            model, dataset, batches.steps, settings.epochs, callbacks, out, resume_epoch,
            f"{loss_name} fine-tuning {tag}",
            f"Lower train.learning_rate and train.finetune_learning_rate, or change train.loss_params.{loss_name}")
    finally:
        if refresh is not None:
            refresh.tables.close()   # a batch generator waiting for a next table ends
    probe = next(iter(val_images if len(val_rows) else plain_images(encoded[train_rows[:8]], extractor.image_size)))
    save_image_model(embedding_model, out, probe.numpy()[:8], tag, loss_name, extractor.image_size,
                settings.mixed_precision)
    write_history(out / "history.csv", history)
    plot_training_curves(history, out / "curves.png", f"{tag} · {loss_name} · finetune", before=validator.initial,
                         metrics=VAL_METRICS, monitor=MONITOR)

    summary = training_record(
        tag=tag, mode=MODE, settings=settings, objective=objective, data=data, batches=batches,
        progress=fit_summary(history, fit, batches.steps, seconds, validator, settings.epochs, resume_epoch),
        runtime=runtime_summary(settings, strategy, jit_compile, negatives, refresh), feature_dim=extractor.dim,
        fingerprint=fingerprint, mode_fields={
            "backbone_config": asdict(backbone_cfg), "weights_loaded": extractor.weights_loaded,
            "image_size": extractor.image_size,
            "optimizer": {"name": "ScaledAdamW", "head_learning_rate": settings.learning_rate,
                          "backbone_learning_rate": settings.finetune_learning_rate,
                          "weight_decay": settings.weight_decay},
            # "layers" are the backbone's finetune units (models/backbones/registry.py `finetune_units`).
            "finetune_layers": settings.finetune_layers, "trunk_layers": len(units),
            "trainable_trunk_layers": trainable_units, "trainable_backbone_parameters": n_trainable,
            "trainable_units": [unit.name for unit in units[len(units) - trainable_units:]],
            "head": bool(settings.embedding_dim),
            "augment": settings.augment,
            "dataset": {"dir": run_dir.dataset_dir.as_posix(), "fingerprint": dataset_meta.get("fingerprint")}})
    return finish_training(out, summary)


def with_label_names(items, dataset_meta: dict):
    """`items` (read from the TFRecords: integer labels) with the class names phase 0 recorded."""
    classes = dataset_meta.get("classes")
    if not classes:
        return items
    return items.assign(label_name=np.asarray(classes, dtype=object)[items["label"].to_numpy()])


# How far the SavedModel's `serve` may be from the Keras model it exports. In float16 compute
# (mixed precision) the two graphs round differently (TensorFlow fuses and orders float16 ops its
# own way): about 1e-3 on unit vectors, where float32 agrees to 1e-6.
SERVED_TOLERANCE = {False: 1e-4, True: 1e-2}


def save_image_model(model, out: Path, probe: np.ndarray, tag: str, loss: str, image_size: int,
                mixed_precision: bool = False) -> None:
    """embedding_model.keras, saved_model/ and export.json, each checked to reproduce the trained model."""
    from pipeline.serving.model_export import write_export_manifest, write_saved_model

    # Direct calls, not predict: both sides then run on one device even when training was
    # mirrored over several, so the comparison is not blurred by different per-device batches.
    expected = np.asarray(model(probe, training=False))
    with atomic.atomic_path(out / "embedding_model.keras") as tmp:
        model.save(tmp)
        # Checked before the rename: a model that does not reload is never published.
        reloaded = keras.saving.load_model(tmp, compile=False)
        keras_error = float(np.max(np.abs(np.asarray(reloaded(probe, training=False)) - expected)))
        if keras_error > 1e-5:
            raise RuntimeError(f"{out}: the saved embedding model differs from the trained one by {keras_error:.2e}")
    served_error = write_saved_model(model, out / "saved_model", probe, expected,
                                     tolerance=SERVED_TOLERANCE[bool(mixed_precision)])
    write_export_manifest(out, tag, loss, image_size, int(expected.shape[-1]), int(len(probe)),
                          max(keras_error, served_error), "the fine-tuned model before saving")
