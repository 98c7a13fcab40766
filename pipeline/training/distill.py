"""Phase 3, "distill" mode: a student backbone learns to reproduce a teacher's embedding space.

`python run.py phase3 --mode distill --teacher TEACHER [--student STUDENT]` trains, for every student (the
backbones of `extract.backbones` named by `train.student`, default all but the teacher's own), a network built
as in finetune mode (the trunk's last `train.finetune_layers` units at `train.finetune_learning_rate`, a head of
`train.embedding_dim` at `train.learning_rate`, or none at 0) on the training images, with the loss of
models/losses/distill.py: matching the teacher's embedding of each image (through a learnable projection when
the widths differ), relational KD within the batch, optionally a metric-learning loss on the labels.

The teacher (`train.teacher`) is a model of this run by its embeddings tag (a phase-4 tag "BACKBONE+LOSS", or a
phase-1 backbone tag), another run's ("RUN/TAG"), or a folder with an embedding_model.keras. Its embeddings of
the training images do not change, so they are computed once: those phase 1/4 already wrote (embeddings.npy,
matched by item id), or, for a folder, the model run once over the images and cached beside the student
(teacher_embeddings.npy). The student's batches are class-balanced P x K, augmented as in finetune mode (the
teacher's target is its embedding of the plain image: augmentation makes the student robust, not the target).

Output in `runs/<run>/train/<student tag>/distill/`: the same files as finetune mode (embedding_model.keras,
saved_model/, export.json, training.json with "mode": "distill" and the teacher, history.csv, checkpoints,
resume), so phase 4 re-embeds every image with the student, phase 5 compares it with the teacher, and export
bundles it. training.json's "speed" holds images/s of student and teacher, timed on the same validation images,
one after the other, in this process (load average beside them).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from collections.abc import Sequence

import keras
import numpy as np

from pipeline.config import BackboneConfig, TrainConfig
from pipeline.core import atomic
from pipeline.core.artifacts import fingerprint_of, load_dataset_meta, load_embeddings
from pipeline.core.distribute import training_strategy, worker_output_dir
from pipeline.core.errors import PhaseInputError
from pipeline.core.run_dir import RunDir
from pipeline.data.tfrecords import plain_images, read_records
from pipeline.reporting.plots import plot_training_curves
from pipeline.training.distill_plan import MODE, SLOT
from pipeline.training.callbacks import MONITOR, VAL_METRICS, RetrievalValidation, training_callbacks
from pipeline.training.finetune import (build_finetune_model, finetune_optimizer, image_batches, save_image_model,
                                        trunk_units, with_label_names)
from pipeline.training.loop import (begin_training, effective_jit, fingerprinted_settings, finish_training,
                                    fit_checked, fit_summary, runtime_summary, training_record, write_history)
from pipeline.training.objectives import TeacherObjective
from pipeline.training.protocol import batch_plan, training_data

log = logging.getLogger("embedlab.distill")

TEACHER_CACHE = "teacher_embeddings.npy"


# --------------------------------------------------------------------------- who teaches whom

def resolve_teacher(run_dir: RunDir, spec: str) -> dict:
    """{"spec", "tag", "embeddings_dir" (or None), "model_file" (image-level .keras or None), "meta"}."""
    spec = spec.strip()
    folder = Path(spec)
    if (folder / "embedding_model.keras").is_file():
        return {"spec": spec, "tag": folder.name, "embeddings_dir": None,
                "model_file": folder / "embedding_model.keras", "meta": None}
    run_name, tag = spec.split("/", 1) if "/" in spec else (run_dir.config.name, spec)
    source = run_dir if run_name == run_dir.config.name else RunDir(dataclasses.replace(run_dir.config,
                                                                                       name=run_name))
    emb_dir = source.embeddings_dir(tag)
    if not (emb_dir / "meta.json").is_file():
        raise PhaseInputError(f"teacher {spec!r}: no embeddings in {emb_dir} (run phase1, or phase3 + phase4 for a "
                              "trained teacher), and no folder with embedding_model.keras of that name")
    meta = atomic.read_json(emb_dir / "meta.json")
    model_file = source.train_dir(meta["base_tag"], meta["loss"]) / "embedding_model.keras" if meta.get("trained") \
        else None
    return {"spec": spec, "tag": tag, "embeddings_dir": emb_dir, "meta": meta,
            "model_file": model_file if model_file is not None and model_file.is_file() else None}


# --------------------------------------------------------------------------- the teacher's targets

def teacher_targets(teacher: dict, ids: np.ndarray, dataset_meta: dict, out: Path, encoded=None) -> np.ndarray:
    """The teacher's unit embeddings of the items `ids`, in that order (computed once, see the module)."""
    if teacher["embeddings_dir"] is not None:
        items, unit, _, _ = load_embeddings(teacher["embeddings_dir"], dataset_meta)
        position = {item_id: row for row, item_id in enumerate(items["id"].astype(str))}
        missing = [i for i in ids if i not in position]
        if missing:
            raise PhaseInputError(f"teacher {teacher['spec']!r}: {len(missing)} training items (e.g. {missing[0]}) "
                                  f"have no embedding in {teacher['embeddings_dir']}")
        return unit[[position[i] for i in ids]]
    cache = out / TEACHER_CACHE
    stamp = {"model": str(teacher["model_file"]), "mtime": teacher["model_file"].stat().st_mtime,
             "ids": fingerprint_of(list(map(str, ids)))}
    if cache.is_file() and (out / "teacher.json").is_file() and atomic.read_json(out / "teacher.json") == stamp:
        return np.load(cache)
    model = keras.saving.load_model(teacher["model_file"], compile=False)
    unit = np.asarray(model.predict(plain_images(encoded, int(model.inputs[0].shape[1])), verbose=0), np.float32)
    atomic.save_npy(cache, unit)
    atomic.write_json(out / "teacher.json", stamp)
    return unit


def teacher_model(teacher: dict):
    """The teacher's image-level model (pixels in, unit embedding out), for timing; None when it has none."""
    if teacher["model_file"] is not None:
        return keras.saving.load_model(teacher["model_file"], compile=False)
    meta = teacher["meta"] or {}
    # A trained teacher without its model file, or an ensemble (its members' models are joined by the export,
    # `pipeline/phases/export.py`; bench/bench_distill_speed.py times it): no single model to time here.
    if meta.get("trained") or not meta.get("backbone") or meta.get("ensemble"):
        return None
    from models.backbones import build_feature_extractor

    extractor = build_feature_extractor(**BackboneConfig(**meta["backbone"]).extractor_options())
    return keras.Model(extractor.model.input, extractor.model.output["embedding"])


def images_per_second(model, encoded: np.ndarray, repeats: int = 3, batch_size: int = 32) -> float:
    """Median images/s of `model` over the decoded `encoded` images (decoding done before the clock starts)."""
    size = int(model.inputs[0].shape[1])
    images = np.concatenate([b.numpy() for b in plain_images(encoded, size, batch_size)])
    model.predict(images[:batch_size], batch_size=batch_size, verbose=0)   # warm-up: tracing, allocation
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        model.predict(images, batch_size=batch_size, verbose=0)
        timings.append(time.perf_counter() - started)
    return float(len(images) / np.median(timings))


# --------------------------------------------------------------------------- training

def train_distilled(run_dir: RunDir, backbone_cfg: BackboneConfig, tag: str, settings: TrainConfig, strategy=None,
                    force: bool = False, extra_callbacks: Sequence = ()) -> Path:
    """Distil the teacher into the student `backbone_cfg` (or resume, or find up to date); returns its folder."""
    from models.losses.distill import DistillationLoss

    strategy = strategy or training_strategy(settings.devices)
    if strategy.num_replicas_in_sync > 1:
        raise PhaseInputError("train.mode distill runs on one device (its relational term is per batch); "
                              "set train.devices to one device")
    out = worker_output_dir(run_dir.train_dir(tag, SLOT), strategy)
    dataset_meta = load_dataset_meta(run_dir)
    teacher = resolve_teacher(run_dir, settings.teacher)
    try:
        loss = DistillationLoss(match=settings.distill_match, match_weight=settings.distill_match_weight,
                                relational_weight=settings.distill_relational_weight,
                                label_loss=settings.distill_label_loss,
                                label_loss_params=settings.loss_params.get(settings.distill_label_loss, {}) or {},
                                label_weight=settings.distill_label_weight)
    except ValueError as exc:   # e.g. a label loss that needs a classifier (arcface): a setting, not a crash
        raise PhaseInputError(f"train.distill_*: {exc}") from None
    teacher_id = {"spec": teacher["spec"], "fingerprint": (teacher["meta"] or {}).get("fingerprint"),
                  "model": None if teacher["model_file"] is None else str(teacher["model_file"])}
    items, encoded = read_records(run_dir.dataset_dir)
    data = training_data(items, settings, tag)
    train_rows, val_rows = data.train_rows, data.val_rows
    out.mkdir(parents=True, exist_ok=True)
    targets = teacher_targets(teacher, items["id"].astype(str).to_numpy()[train_rows], dataset_meta, out,
                              encoded[train_rows])
    objective = TeacherObjective(loss, targets.shape[1], teacher_id)
    fingerprint = fingerprint_of({"dataset": dataset_meta.get("fingerprint"),
                                  "backbone": backbone_cfg.fingerprint_fields(),
                                  "train": fingerprinted_settings(settings, MODE), **objective.fingerprint(),
                                  "optimizer": "ScaledAdamW"})
    started = begin_training(out, fingerprint, force, strategy)
    if started is None:
        return out
    resume_epoch = started.epoch
    train_labels = objective.training_labels(data.train_keys)

    jit_compile = effective_jit(settings, strategy)
    keras.utils.set_random_seed(settings.seed)
    with strategy.scope():
        embedding_model, trunk, extractor = build_finetune_model(backbone_cfg, settings.embedding_dim,
                                                                 settings.finetune_layers)
        model = objective.compile(embedding_model, finetune_optimizer(trunk, settings), jit_compile)
    batches = batch_plan(settings, data)
    dataset = image_batches(encoded[train_rows], train_labels, extractor.image_size, settings.n_classes_per_batch,
                            settings.n_samples_per_class, settings.seed, settings.augment,
                            skip_batches=resume_epoch * batches.steps, targets=targets)
    val_images = plain_images(encoded[val_rows], extractor.image_size)
    validator = RetrievalValidation(embedding_model, None, data.keys[val_rows],
                                    embed=lambda: embedding_model.predict(val_images, verbose=0),
                                    k=settings.epoch_results_top_k)
    callbacks = training_callbacks(out, settings, validator, extra_callbacks, started,
                                   val_items=with_label_names(items.iloc[val_rows], dataset_meta))
    units = trunk_units(backbone_cfg, trunk)
    log.info("phase 3 (distill): %s learns %s: %d training images (%d classes), %d validation images, %d steps/epoch, "
             "last %d of %d trunk units trainable, teacher width %d%s", tag, teacher["spec"], len(train_rows),
             data.n_train_classes, len(val_rows), batches.steps, min(settings.finetune_layers, len(units)),
             len(units), targets.shape[1], " (through a learnt projection)" if objective.projected else "")
    fit, history, seconds = fit_checked(
        model, dataset, batches.steps, settings.epochs, callbacks, out, resume_epoch, f"distilling into {tag}",
        "Lower train.learning_rate and train.finetune_learning_rate, or the distill_* weights")
    probe = next(iter(val_images if len(val_rows) else plain_images(encoded[train_rows[:8]], extractor.image_size)))
    save_image_model(embedding_model, out, probe.numpy()[:8], tag, SLOT, extractor.image_size,
                     settings.mixed_precision)
    write_history(out / "history.csv", history)
    plot_training_curves(history, out / "curves.png", f"{tag} · distilled from {teacher['spec']}",
                         before=validator.initial, metrics=VAL_METRICS, monitor=MONITOR)
    speed = _speed(embedding_model, teacher, encoded[val_rows[:256] if len(val_rows) else train_rows[:256]])
    summary = training_record(
        tag=tag, mode=MODE, settings=settings, objective=objective, data=data, batches=batches,
        progress=fit_summary(history, fit, batches.steps, seconds, validator, settings.epochs, resume_epoch),
        runtime=runtime_summary(settings, strategy, jit_compile, None), feature_dim=extractor.dim,
        fingerprint=fingerprint, mode_fields={
            "backbone_config": asdict(backbone_cfg), "weights_loaded": extractor.weights_loaded,
            "image_size": extractor.image_size, "head": bool(settings.embedding_dim), "augment": settings.augment,
            "teacher": {**teacher_id, "dim": int(targets.shape[1]),
                        "targets": "cached embeddings" if teacher["embeddings_dir"] else TEACHER_CACHE},
            "speed": speed,
            "dataset": {"dir": run_dir.dataset_dir.as_posix(), "fingerprint": dataset_meta.get("fingerprint")}})
    return finish_training(out, summary)


def _speed(student, teacher: dict, encoded: np.ndarray) -> dict:
    """images/s of student and teacher on the same images, one after the other (a comparison, not a benchmark:
    bench/ and BENCHMARKS.md hold the controlled timings)."""
    load = os.getloadavg()[0]
    student_rate = images_per_second(student, encoded)
    try:
        model = teacher_model(teacher)
        teacher_rate = images_per_second(model, encoded) if model is not None else None
    except Exception as exc:  # timing is a side note: it must not cost the trained student
        log.warning("phase 3 (distill): the teacher could not be timed (%s: %s)", type(exc).__name__, exc)
        teacher_rate = None
    speed = {"student_images_per_second": student_rate, "teacher_images_per_second": teacher_rate,
             "speedup": None if not teacher_rate else student_rate / teacher_rate, "n_images": int(len(encoded)),
             "load_average": [load, os.getloadavg()[0]]}
    log.info("phase 3 (distill): student %.0f images/s, teacher %s images/s (load %.1f)", student_rate,
             "n/a" if teacher_rate is None else f"{teacher_rate:.0f}", load)
    return speed
