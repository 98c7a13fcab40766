"""Phase 3, "finetune" mode: train the backbone's last layers and the embedding head end to end, on images.

Per backbone and loss, in `runs/<run>/train/<tag>/<loss>/`, the same files as head
mode (training.json with "mode": "finetune", history.csv, curves.png, checkpoints/,
backup/) except that the model is image-level from the start:
    embedding_model.keras   RGB pixels 0..255 -> unit embedding (preprocessing inside)
    saved_model/            the same as a TensorFlow SavedModel (endpoint `serve`)
    export.json             inputs, outputs and the reload check both files passed

Learning rates: the head trains at `train.learning_rate` and the trunk's layers at
the lower `train.finetune_learning_rate`, through one AdamW with per-variable
multipliers (models/optimizers.py), so backups (pipeline/checkpoints.py), checkpoints and
ReduceLROnPlateau (which lowers both rates together) work as in head mode.

Data: the train (and validation) records' encoded bytes are held in memory (they are
far smaller than decoded pixels) and decoded per batch, so augmentation differs
each time an image is drawn. Augmentation is seeded per drawn item, so a resumed
run sees the same crops it would have seen uninterrupted.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import keras
import numpy as np

from pipeline.core import atomic
from pipeline.config import BackboneConfig, TrainConfig
from pipeline.phases.extract import load_dataset_meta
from pipeline.core.errors import PhaseInputError
from pipeline.core.run_dir import RunDir, fingerprint_of
from pipeline.core.distribute import distribute_global_batches, training_strategy, worker_output_dir
from pipeline.training.head import (RetrievalValidation, _callbacks, _effective_jit, _hard_negatives, _jsonable,
                    _plot_curves, _write_history, begin_training, finish_training, fit_checked, fit_summary,
                    fingerprinted_settings, load_phase1_features, pair_keys, runtime_summary, split_train_val,
                    usable_training_rows)

log = logging.getLogger("embedlab.finetune")

# The splits training can use: "train" to learn from, "val" to validate on (when usable).
_SPLITS = ("train", "val")


# --------------------------------------------------------------------------- data

def read_records(dataset_dir: Path, splits: Sequence[str] = _SPLITS):
    """(items DataFrame with split/id/label/group, encoded image bytes as an object array), in record order."""
    import pandas as pd
    import tensorflow as tf

    from pipeline.data import schema
    from pipeline.data.tfrecords import list_shards

    columns: dict[str, list] = {"split": [], "id": [], "label": [], "group": []}
    encoded: list[bytes] = []
    for split in splits:
        shards = list_shards(dataset_dir, split)
        if not shards:
            continue
        ds = tf.data.TFRecordDataset([str(p) for p in shards]).batch(1024).map(schema.parse)
        for batch in ds.as_numpy_iterator():
            encoded.extend(batch["image"].tolist())
            columns["id"].extend(v.decode("utf-8") for v in batch["id"])
            columns["label"].extend(int(v) for v in batch["label"])
            columns["group"].extend(v.decode("utf-8") for v in batch["group"])
            columns["split"].extend([split] * len(batch["id"]))
    if not encoded:
        raise PhaseInputError(f"no TFRecords for splits {list(splits)} in {dataset_dir}: run phase0 first")
    return pd.DataFrame(columns), np.array(encoded, dtype=object)


def augment_image(image, image_size: int, seed):
    """Random resized crop, horizontal flip, mild brightness/contrast/saturation jitter; float32 0..255 out.

    Stateless ops with an explicit per-item seed: the same item index always gets the same augmentation.
    """
    import tensorflow as tf

    seeds = tf.random.experimental.stateless_split(seed, num=5)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seeds[0],
        min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.5, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    image = tf.slice(image, begin, size)
    image = tf.image.resize(tf.cast(image, tf.float32), (image_size, image_size), method="bilinear", antialias=True)
    image = tf.image.stateless_random_flip_left_right(image, seeds[1])
    # Colour ops expect 0..1; the jitter is mild because colour is often what tells classes apart.
    image = image / 255.0
    image = tf.image.stateless_random_brightness(image, 0.1, seeds[2])
    image = tf.image.stateless_random_contrast(image, 0.9, 1.1, seeds[3])
    image = tf.image.stateless_random_saturation(image, 0.9, 1.1, seeds[4])
    return tf.clip_by_value(image, 0.0, 1.0) * 255.0


def image_batches(encoded: np.ndarray, labels: np.ndarray, image_size: int, n_classes_per_batch: int,
                  n_samples_per_class: int, seed: int, augment: bool, skip_batches: int = 0,
                  hard_negatives: np.ndarray | None = None, hard_negative_share: float = 0.0,
                  first: int = 0, count: int | None = None):
    """An endless dataset of (images float32 (n, S, S, 3) in 0..255, labels int32 (n,)), class-balanced.

    Each element is rows [first, first + count) of a global P x K batch (all of it by
    default); under tf.distribute each worker decodes only its replicas' rows.
    """
    import itertools

    import tensorflow as tf

    from pipeline.data.tfrecords import decode_and_resize
    from pipeline.training.sampler import balanced_batch_indices, hard_negative_batch_indices

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

    def rows():
        for number, batch in enumerate(itertools.islice(batch_indices(), skip_batches, None), start=skip_batches):
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
        return image, tf.gather(labels32, row)

    spec = tf.TensorSpec((count,), tf.int64)
    ds = tf.data.Dataset.from_generator(rows, output_signature=(spec, spec)).unbatch()
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    # Batching the unbatched stream back into the same sizes keeps each batch's P x K grouping.
    return ds.batch(count, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def plain_images(encoded: np.ndarray, image_size: int, batch_size: int = 64):
    """Decoded, resized, unaugmented images in the given order (validation)."""
    import tensorflow as tf

    from pipeline.data.tfrecords import decode_and_resize

    ds = tf.data.Dataset.from_tensor_slices(tf.constant(encoded.astype(object).tolist(), dtype=tf.string))
    ds = ds.map(lambda b: decode_and_resize(b, image_size), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------- model

def build_finetune_model(backbone: BackboneConfig, embedding_dim: int, finetune_layers: int,
                         synchronized_bn: bool = False):
    """(image-level embedding model, the trunk, image size) with only the trunk's last layers trainable.

    The head's layers are applied at the model's top level (not as a nested model) so
    that phase 4 can reach the input of the final L2Normalize, the pre-normalisation feature.
    """
    from models.backbones import build_feature_extractor
    from models.heads import build_embedding_head

    extractor = build_feature_extractor(backbone.name, weights=backbone.weights, image_size=backbone.image_size,
                                        alpha=backbone.alpha, weights_fallback=backbone.weights_fallback)
    trunk = next(layer for layer in extractor.model.layers if isinstance(layer, keras.Model))
    # A count at or above the trunk's depth trains the whole trunk.
    n_layers = min(finetune_layers, len(trunk.layers))
    trainable = set(id(layer) for layer in trunk.layers[len(trunk.layers) - n_layers:])
    for layer in trunk.layers:
        # BatchNormalization stays frozen: P x K batches of a few classes have statistics
        # unlike the data's, and small batches give noisy ones; updating the moving
        # averages from them would shift every frozen layer after it. The trunk is called
        # with training=False, so BN also normalises with its stored statistics in training.
        layer.trainable = id(layer) in trainable and not isinstance(layer, keras.layers.BatchNormalization)

    head = build_embedding_head(extractor.dim, embedding_dim, synchronized_bn=synchronized_bn)
    x = extractor.model.output["pooled"]
    for layer in head.layers[1:]:
        x = layer(x)
    model = keras.Model(extractor.model.input, x, name="embedding_model")
    return model, trunk, extractor


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
    phase1 = load_phase1_features(run_dir.embeddings_dir(tag))
    position = {item_id: row for row, item_id in enumerate(phase1["items"]["id"].astype(str))}
    missing = [item_id for item_id in ids if item_id not in position]
    if missing:
        raise PhaseInputError(f"hard negatives: {len(missing)} training items (e.g. {missing[0]}) have no phase-1 "
                              f"features in {phase1['dir']}: run phase1 again (`python run.py phase1 --force`)")
    return phase1["features"][[position[item_id] for item_id in ids]]


# --------------------------------------------------------------------------- training

def train_finetune(run_dir: RunDir, backbone_cfg: BackboneConfig, tag: str, loss_name: str, settings: TrainConfig,
                   strategy=None, force: bool = False, extra_callbacks: Sequence = ()) -> Path:
    from models import losses as losses_lib

    strategy = strategy or training_strategy(settings.devices)
    out = worker_output_dir(run_dir.train_dir(tag, loss_name), strategy)
    loss_params = dict(settings.loss_params.get(loss_name, {}) or {})
    dataset_meta = load_dataset_meta(run_dir)
    loss = losses_lib.get_loss(loss_name, **loss_params)
    inputs = {"dataset": dataset_meta.get("fingerprint"), "backbone": asdict(backbone_cfg),
              "train": fingerprinted_settings(settings), "loss": loss_name,
              "loss_config": _jsonable(loss.get_config()),
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
    history_path = out / "history.csv"

    items, encoded = read_records(run_dir.dataset_dir)
    labels = pair_keys(items, settings)
    train_rows, val_rows, validation = split_train_val(items, settings, labels)
    train_rows, single = usable_training_rows(train_rows, labels, settings, tag)
    train_labels = labels[train_rows]
    hard_negatives = None
    if settings.hard_negative_share > 0:
        hard_negatives = _hard_negatives(baseline_features(run_dir, tag, items["id"].to_numpy()[train_rows]),
                                         train_labels, settings)

    with_classifier = bool(getattr(loss, "requires_classifier", False))
    train_classes = np.unique(train_labels)
    if with_classifier:
        train_labels = np.searchsorted(train_classes, train_labels)

    jit_compile = _effective_jit(settings, strategy)
    keras.utils.set_random_seed(settings.seed)
    with strategy.scope():
        embedding_model, trunk, extractor = build_finetune_model(
            backbone_cfg, settings.embedding_dim, settings.finetune_layers,
            synchronized_bn=strategy.num_replicas_in_sync > 1)
        if with_classifier:
            from models.classifier import CosineClassifier

            logits = CosineClassifier(len(train_classes), name="cosine_classifier")(embedding_model.output)
            model = keras.Model(embedding_model.input, logits, name="embedding_model_with_classifier")
            metrics = []
        else:
            model = embedding_model
            metrics = [losses_lib.triplet_accuracy]
        model.compile(optimizer=finetune_optimizer(trunk, settings), loss=loss, metrics=metrics,
                      jit_compile=jit_compile)

    n_classes = min(settings.n_classes_per_batch, train_classes.size)
    batch_size = n_classes * settings.n_samples_per_class
    steps = settings.steps_per_epoch or math.ceil(len(train_rows) / batch_size)

    def rows_of_each_batch(first: int, count: int):
        return image_batches(encoded[train_rows], train_labels, extractor.image_size, settings.n_classes_per_batch,
                             settings.n_samples_per_class, settings.seed, settings.augment,
                             skip_batches=resume_epoch * steps, hard_negatives=hard_negatives,
                             hard_negative_share=settings.hard_negative_share, first=first, count=count)

    dataset = distribute_global_batches(strategy, rows_of_each_batch, batch_size)
    val_images = plain_images(encoded[val_rows], extractor.image_size)
    validator = RetrievalValidation(embedding_model, None, labels[val_rows],
                                    embed=lambda: embedding_model.predict(val_images, verbose=0))
    callbacks = _callbacks(out, settings, validator, extra_callbacks, started)
    n_trainable = sum(int(np.prod(w.shape)) for w in trunk.trainable_weights)
    trainable_layers = min(settings.finetune_layers, len(trunk.layers))
    log.info("phase 3 (finetune): %s / %s: %d training images (%d classes), %d validation images (%s), batches of "
             "%d classes x %d, %d steps/epoch, last %d trunk layers trainable (%d backbone parameters)", tag,
             loss_name, len(train_rows), train_classes.size, len(val_rows), validation["protocol"], n_classes,
             settings.n_samples_per_class, steps, trainable_layers, n_trainable)
    fit, history, seconds = fit_checked(
        model, dataset, steps, settings.epochs, callbacks, out, resume_epoch, f"{loss_name} fine-tuning {tag}",
        f"Lower train.learning_rate and train.finetune_learning_rate, or change train.loss_params.{loss_name}")
    probe = next(iter(val_images if len(val_rows) else plain_images(encoded[train_rows[:8]], extractor.image_size)))
    _save_model(embedding_model, out, probe.numpy()[:8], tag, loss_name, extractor.image_size)
    _write_history(history_path, history)
    _plot_curves(history, out / "curves.png", f"{tag} · {loss_name} · finetune", before=validator.initial)

    progress = fit_summary(history, fit, steps, seconds, validator, settings.epochs, resume_epoch)
    summary = {
        "backbone": tag, "backbone_config": asdict(backbone_cfg), "weights_loaded": extractor.weights_loaded,
        "image_size": extractor.image_size, "loss": loss_name, "loss_params": loss_params,
        "loss_config": _jsonable(loss.get_config()), "mode": "finetune",
        "train": {k: v for k, v in asdict(settings).items() if k not in ("losses", "loss_params")},
        "optimizer": {"name": "ScaledAdamW", "head_learning_rate": settings.learning_rate,
                      "backbone_learning_rate": settings.finetune_learning_rate,
                      "weight_decay": settings.weight_decay},
        **runtime_summary(settings, strategy, jit_compile, hard_negatives),
        "finetune_layers": settings.finetune_layers, "trunk_layers": len(trunk.layers),
        "trainable_trunk_layers": trainable_layers, "trainable_backbone_parameters": n_trainable,
        "augment": settings.augment,
        "requires_classifier": with_classifier, "n_classifier_classes": int(train_classes.size) if with_classifier
        else None,
        **progress,
        "validation": validation,
        "n_train": int(len(train_rows)), "n_train_classes": int(train_classes.size),
        "n_single_item_classes_excluded": int(single.size),
        "n_val": int(len(val_rows)), "feature_dim": extractor.dim, "embedding_dim": settings.embedding_dim,
        "batch": {"n_classes": int(n_classes), "n_samples_per_class": settings.n_samples_per_class,
                  "size": int(batch_size)},
        "dataset": {"dir": run_dir.dataset_dir.as_posix(), "fingerprint": dataset_meta.get("fingerprint")},
        "fingerprint": fingerprint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return finish_training(out, summary)


def _save_model(model, out: Path, probe: np.ndarray, tag: str, loss: str, image_size: int) -> None:
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
    served_error = write_saved_model(model, out / "saved_model", probe, expected)
    write_export_manifest(out, tag, loss, image_size, int(expected.shape[-1]), int(len(probe)),
                          max(keras_error, served_error), "the fine-tuned model before saving")
