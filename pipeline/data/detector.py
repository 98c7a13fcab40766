"""Boxes from an object detector: a keras-hub `ObjectDetector` preset (e.g. `retinanet_resnet50_fpn_coco`) finds the
objects of each whole image, and each detection becomes a box item (pipeline/data/boxes.py), as if a manifest had
listed it (`data.detector`).

Presets need their weights: online keras-hub downloads them; offline (or for a name that is no detector preset)
loading fails with one line naming the preset, never a silent fallback. Each image is squashed to the detector's
input size before it runs, so a detection in that frame maps back to the image as fractions of its width and
height (an axis-aligned scale), whatever the image's aspect ratio.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from pipeline.data.boxes import Box, box_item_id

log = logging.getLogger("embedlab.ingest")


class DetectorError(RuntimeError):
    """The detector cannot be loaded or run (one line)."""


def load_detector(preset: str):
    """A keras-hub ObjectDetector from a preset name or a local preset folder; DetectorError otherwise."""
    try:
        import keras_hub

        return keras_hub.models.ObjectDetector.from_preset(preset)
    except Exception as exc:  # noqa: BLE001 - downloads and preset lookups fail in many ways
        first = (str(exc).splitlines() or [""])[0][:160]
        raise DetectorError(f"object-detection preset {preset!r} could not be loaded ({type(exc).__name__}: "
                            f"{first}); its weights are downloaded by keras-hub (online) or read from a local "
                            "preset folder") from None


def input_size(detector) -> tuple[int, int]:
    """(height, width) the detector's image converter works at."""
    converter = getattr(getattr(detector, "preprocessor", None), "image_converter", None)
    size = getattr(converter, "image_size", None)
    if not size:
        raise DetectorError(f"detector {detector.name!r} has no image converter with a fixed image_size")
    return int(size[0]), int(size[1])


def detect_boxes(detector, images: Sequence[np.ndarray], score_threshold: float = 0.5,
                 max_boxes: int = 5) -> list[list[tuple[Box, float, int]]]:
    """For each RGB image (H × W × 3, 0..255): its detections with a confidence ≥ `score_threshold`, best first, at
    most `max_boxes`, as (Box in fractions, confidence, class index); boxes clipped to the image, empty ones
    dropped."""
    import keras
    import tensorflow as tf

    height, width = input_size(detector)
    found = []
    for image in images:
        pixels = tf.image.resize(tf.cast(np.asarray(image)[None], tf.float32), (height, width), antialias=True)
        out = detector.predict(pixels.numpy(), verbose=0)
        n = int(np.asarray(out["num_detections"])[0])
        boxes = keras.utils.bounding_boxes.convert_format(
            np.asarray(out["boxes"], np.float32)[:1, :n], source=detector.bounding_box_format, target="xyxy",
            height=height, width=width)
        boxes = np.asarray(boxes)[0]
        scores = np.asarray(out["confidence"], np.float32)[0, :n]
        classes = np.asarray(out["labels"])[0, :n]
        kept = []
        for (x0, y0, x1, y1), score, label in sorted(zip(boxes, scores, classes), key=lambda d: -d[1]):
            x0, x1 = np.clip([x0, x1], 0, width) / width
            y0, y1 = np.clip([y0, y1], 0, height) / height
            if score < score_threshold or x1 <= x0 or y1 <= y0:
                continue
            kept.append((Box(float(x0), float(y0), float(x1 - x0), float(y1 - y0), "fractions"), float(score),
                         int(label)))
            if len(kept) == max_boxes:
                break
        found.append(kept)
    return found


def detected_items(items: Sequence, detector, score_threshold: float = 0.5, max_boxes: int = 5) -> tuple[list, list]:
    """(box items, rejects): every whole-image file item (a SourceItem without a box) replaced by one item per
    detection, with the image's label; an image without a detection is a reject saying so. Items already boxed,
    refused or in memory pass through unchanged."""
    from PIL import Image, ImageOps

    out, rejects = [], []
    for item in items:
        if item.reject or item.box is not None or item.file is None:
            out.append(item)
            continue
        try:
            with Image.open(item.file) as img:
                image = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
        except Exception as exc:  # noqa: BLE001 - phase 0 reports unreadable files the same way
            rejects.append((item.path or item.id, f"cannot be read for detection ({type(exc).__name__})"))
            continue
        detections = detect_boxes(detector, [image], score_threshold, max_boxes)[0]
        if not detections:
            rejects.append((item.path or item.id, f"no detection with confidence >= {score_threshold}"))
        seen = set()
        for box, _, _ in detections:
            # Rounded to 4 decimals, so ids and fingerprints do not carry float noise; equal boxes count once.
            box = Box(*(round(v, 4) for v in (box.x, box.y, box.w, box.h)), units="fractions")
            if box not in seen:
                seen.add(box)
                out.append(dataclasses.replace(item, id=box_item_id(item.id, box), box=box))
    log.info("phase 0: the detector found %d box(es) in %d image(s)", sum(i.box is not None for i in out),
             sum(1 for i in items if i.box is None and not i.reject))
    return out, rejects
