"""Phase 3: train one embedding model per (backbone, loss), in the configured mode.

"head" (pipeline/training/head.py) trains a head on the cached phase-1 features and, when
`train.export` is on, exports the image-level model (backbone + head); "finetune"
(pipeline/training/finetune.py) trains the trunk's last layers and the head on images; "distill"
(pipeline/training/distill.py) trains each student backbone to reproduce `train.teacher`'s embeddings.
"""
from __future__ import annotations

import logging
from pathlib import Path
from collections.abc import Sequence

from pipeline.config import RunConfig, TrainConfig, validate, validate_losses
from pipeline.core.distribute import is_chief, training_strategy
from pipeline.core.run_dir import RunDir, backbone_tag
from pipeline.training.loop import dtype_policy

log = logging.getLogger("embedlab.train")


def run_train(config: RunConfig, force: bool = False, *, extra_callbacks: Sequence = ()) -> list[Path]:
    """Train one model per (backbone, loss); returns their output folders.

    `extra_callbacks` are appended after the built-in Keras callbacks of every fit.
    """
    settings = config.train
    validate(config)   # configurations built in code are checked too, not only those the CLI loads
    validate_losses(config)
    run_dir = RunDir(config)
    with dtype_policy("mixed_float16" if settings.mixed_precision else "float32"):
        # Before any other TensorFlow work: a multi-worker strategy must be created first.
        strategy = training_strategy(settings.devices)
        if settings.mode == "finetune":
            return _train_finetune(config, run_dir, settings, strategy, force, extra_callbacks)
        if settings.mode == "distill":
            from pipeline.training.distill import train_distilled
            from pipeline.training.distill_plan import students

            return [train_distilled(run_dir, student, backbone_tag(student), settings, strategy, force=force,
                                    extra_callbacks=extra_callbacks) for student in students(config)]
        return _train_heads(config, run_dir, settings, strategy, force, extra_callbacks)


def _train_finetune(config: RunConfig, run_dir: RunDir, settings: TrainConfig, strategy, force: bool,
                    extra_callbacks) -> list[Path]:
    from pipeline.training.finetune import train_finetune

    return [train_finetune(run_dir, backbone, backbone_tag(backbone), loss_name, settings, strategy, force=force,
                           extra_callbacks=extra_callbacks)
            for backbone in config.extract.backbones for loss_name in settings.losses]


def _train_heads(config: RunConfig, run_dir: RunDir, settings: TrainConfig, strategy, force: bool,
                 extra_callbacks) -> list[Path]:
    from pipeline.training.head import train_head
    from pipeline.core.artifacts import load_dataset_meta, load_phase1_features

    # Head mode reads only phase-1 features; where the run records its dataset build, those
    # features must come from that build.
    dataset_meta = load_dataset_meta(run_dir) if run_dir.dataset_ref.is_file() else None
    outputs = []
    for backbone in config.extract.backbones:
        tag = backbone_tag(backbone)
        phase1 = load_phase1_features(run_dir.embeddings_dir(tag), dataset_meta)
        for loss_name in settings.losses:
            out = train_head(run_dir, tag, phase1, loss_name, settings, strategy, force=force,
                             extra_callbacks=extra_callbacks)
            outputs.append(out)
            if not is_chief(strategy):
                continue   # the chief exports; other workers' copies stay in their scratch folder
            if settings.export and _export_outdated(out, force):
                _export_head_model(run_dir, backbone, tag, loss_name, phase1)
    return outputs


def _export_outdated(out: Path, force: bool) -> bool:
    export = out / "export.json"
    return force or not export.is_file() or export.stat().st_mtime < (out / "training.json").stat().st_mtime


def _export_head_model(run_dir: RunDir, backbone, tag: str, loss_name: str, phase1: dict) -> None:
    from pipeline.serving.model_export import export_embedding_model, not_exportable, probe_batch

    reason = not_exportable(phase1["meta"])
    if reason:
        log.warning("phase 3: no image-level export for %s/%s: %s", tag, loss_name, reason)
        return
    # The head's image-side input as it was trained: the cached tokens, or the pooled features.
    from pipeline.core import atomic

    kind = atomic.read_json(run_dir.train_dir(tag, loss_name) / "training.json").get("head_input") or {}
    source = phase1["tokens"] if kind.get("image") == "tokens" else phase1["features"]
    images, features = probe_batch(run_dir, phase1["items"], source, phase1["meta"]["image_size"])
    # The backbone is rebuilt in float32 (the head keeps the policy it was trained
    # with); model_export allows for float16 rounding when phase 1 ran in mixed precision.
    with dtype_policy("float32"):
        export_embedding_model(run_dir, backbone, loss_name, phase1["meta"], images, features)
