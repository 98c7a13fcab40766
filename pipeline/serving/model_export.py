"""The deployable embedding model: raw RGB image in → unit embedding out.

A head trained on cached features (phase 3, head mode) is glued back onto the
backbone that produced those features (its pooled output, or its "tokens" output for a
transformer head trained on cached tokens; the image side alone of a head that fuses texts,
as an image arrives without one), with the backbone's preprocessing inside, and
saved twice in `runs/<run>/train/<backbone>/<loss>/`:
    embedding_model.keras   the Keras model (custom layers are registered by `models`)
    saved_model/            a TensorFlow SavedModel with a `serve` endpoint
                            (float32 [batch, S, S, 3] pixels in 0..255 → float32 [batch, dim])
    export.json             what goes in and comes out, and the check that was run
The export is checked before it is published: on sample images it must reproduce the
phase-4 embeddings (head applied to phase-1 features).
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np

from pipeline.core.errors import ExportError
from pipeline.core import atomic
from pipeline.config import BackboneConfig
from pipeline.core.run_dir import RunDir, backbone_tag

log = logging.getLogger("embedlab.export")




def not_exportable(phase1_meta: dict) -> str | None:
    """Why the backbone of a phase-1 run cannot be rebuilt identically, or None when it can."""
    weights = str(phase1_meta.get("weights_loaded", ""))
    if not weights or not phase1_meta.get("image_size"):
        return "phase 1's meta.json does not say which weights and image size it used"
    if weights.startswith("random"):
        return ("phase 1 ran from a random initialisation, which is for tests and timing, not deployment "
                "(use imagenet weights or a weights file)")
    return None


def build_embedding_model(backbone: BackboneConfig, head):
    """(backbone + head: images in, unit embeddings out; the extractor's image size). A head whose input is a
    token sequence (batch, T, C) reads the extractor's "tokens", any other its "pooled" features."""
    import keras

    from models.backbones import build_feature_extractor
    from models.heads import image_head_of

    image_head = image_head_of(head)
    tokens = len(image_head.inputs[0].shape) == 3
    extractor = build_feature_extractor(**backbone.extractor_options(weights_fallback="error", with_tokens=tokens))
    embedding = image_head(extractor.model.output["tokens" if tokens else "pooled"])
    return keras.Model(extractor.model.input, embedding, name="embedding_model"), extractor.image_size


def export_embedding_model(run_dir: RunDir, backbone: BackboneConfig, loss: str, phase1_meta: dict,
                           probe_images: np.ndarray | None = None,
                           probe_features: np.ndarray | None = None) -> Path | None:
    """Compose, check and save; None (with a warning) when the backbone cannot be rebuilt identically.

    `probe_features`: the head's image-side input for `probe_images` as phase 3 read it (pooled features,
    or cached tokens)."""
    import keras

    import models.heads  # noqa: F401  (registers the heads' layers for load_model)
    from models.heads import image_head_of

    tag = backbone_tag(backbone)
    out = run_dir.train_dir(tag, loss)
    reason = not_exportable(phase1_meta)
    if reason:
        log.warning("phase 3: no image-level export for %s/%s: %s", tag, loss, reason)
        return None
    head = keras.saving.load_model(out / "head.keras", compile=False)
    model, image_size = build_embedding_model(backbone, head)

    max_error = None
    if probe_images is not None and probe_features is not None and len(probe_images):
        expected = image_head_of(head).predict(np.asarray(probe_features, np.float32), verbose=0)
        got = model.predict(probe_images, verbose=0)
        max_error = float(np.max(np.abs(expected - got)))
        # Features extracted under mixed_float16 carry float16 rounding; the export runs in float32.
        tolerance = 3e-2 if phase1_meta.get("mixed_precision") else 1e-3
        if max_error > tolerance:
            raise ExportError(f"{tag}/{loss}: the composed model differs from the trained head by {max_error:.2e}")

    # The SavedModel must serve what the Keras model it was exported from computes;
    # checked first, so a failing export publishes neither file.
    composed = None if max_error is None else model.predict(probe_images, verbose=0)
    served_error = write_saved_model(model, out / "saved_model", probe_images, composed)
    if served_error is not None:
        max_error = max(max_error, served_error)
    with atomic.atomic_path(out / "embedding_model.keras") as tmp:
        model.save(tmp)
    write_export_manifest(out, tag, loss, image_size, int(head.outputs[0].shape[-1]),
                          0 if probe_images is None else int(len(probe_images)), max_error,
                          "head applied to the phase-1 features of the same images")
    log.info("phase 3: exported %s (Keras + SavedModel)", out / "embedding_model.keras")
    return out


def write_export_manifest(out: Path, tag: str, loss: str, image_size: int, dim: int, checked_images: int,
                          max_error: float | None, checked_against: str) -> Path:
    """export.json: what the exported model takes and gives, and the check it passed before publication."""
    atomic.write_json(out / "export.json", {
        "input": f"float32 [batch, {image_size}, {image_size}, 3], RGB pixels in 0..255 (preprocessing inside)",
        "output": f"float32 [batch, {dim}], L2-normalised",
        "keras": "embedding_model.keras", "saved_model": "saved_model (endpoint: serve)",
        "backbone": tag, "loss": loss, "image_size": image_size,
        "checked_images": checked_images, "max_abs_error": max_error, "checked_against": checked_against,
    })
    return out / "export.json"


def write_saved_model(model, final: Path, probe: np.ndarray | None = None, expected: np.ndarray | None = None,
                      tolerance: float = 1e-4) -> float | None:
    """`model.export` to a staging folder renamed into place: a half-written SavedModel is never published.

    With `probe` images and the `expected` embeddings, the staged SavedModel's `serve`
    must reproduce them within `tolerance` before the rename; returns that largest error.
    """
    staging = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.export(str(staging), format="tf_saved_model", verbose=False)
    served_error = None
    if probe is not None and expected is not None and len(probe):
        served_error = _served_error(staging, probe, expected)
        if not served_error <= tolerance:
            shutil.rmtree(staging, ignore_errors=True)
            raise ExportError(f"{final}: the SavedModel's serve differs from the model it exports by "
                              f"{served_error:.2e} (tolerance {tolerance:.0e}); nothing was published")
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
    return served_error


def _served_error(saved_model_dir: Path, probe: np.ndarray, expected: np.ndarray) -> float:
    import tensorflow as tf

    # Held in a name while serving: the loaded object owns the variables `serve` reads.
    loaded = tf.saved_model.load(str(saved_model_dir))
    served = loaded.serve(tf.constant(probe, tf.float32)).numpy()
    return float(np.max(np.abs(served - np.asarray(expected))))


def probe_batch(run_dir: RunDir, items, features: np.ndarray, image_size: int, n: int = 4):
    """A few images from the TFRecords with their phase-1 features, to check an export."""
    from pipeline.data.record_reader import list_shards
    from pipeline.data.tfrecords import image_dataset

    shards = list_shards(run_dir.dataset_dir, str(items["split"].iat[0]))[:1]
    if not shards:
        return None, None
    images = next(iter(image_dataset(shards, image_size, n))).numpy()
    from pipeline.data.tfrecords import read_metadata

    row_of = {item_id: row for row, item_id in enumerate(items["id"])}
    rows = [row_of[i] for i in read_metadata(shards)["id"][: len(images)]]
    return images, features[rows]
