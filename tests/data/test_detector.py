"""The detector hook with a tiny random keras-hub RetinaNet (shapes only: random weights detect noise): boxes come
back as fractions inside the image, best first, capped; phase 0 turns each detection into a crop item; a preset
that cannot be loaded is one line naming it."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.config import DataConfig, RunConfig
from pipeline.core.errors import IngestError
from pipeline.data.detector import DetectorError, detect_boxes, detected_items, load_detector
from pipeline.data.sources import list_folder
from pipeline.phases.ingest import run_ingest


@pytest.fixture(scope="module")
def tiny_detector():
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    encoder = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 8, 8, 8],
        stackwise_num_blocks=[1, 1, 1, 1], stackwise_num_strides=[1, 2, 2, 2], block_type="basic_block",
        use_pre_activation=False, image_shape=(None, None, 3))
    backbone = keras_hub.models.RetinaNetBackbone(image_encoder=encoder, min_level=3, max_level=5, use_p5=False,
                                                  image_shape=(None, None, 3))
    converter = keras_hub.layers.RetinaNetImageConverter(image_size=(64, 64), scale=1 / 255.0)
    return keras_hub.models.RetinaNetObjectDetector(
        backbone=backbone, num_classes=3, bounding_box_format="xyxy",
        preprocessor=keras_hub.models.RetinaNetObjectDetectorPreprocessor(image_converter=converter))


def _folder(tmp_path, n=2):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (50 + 10 * i, 70, 3), dtype=np.uint8)).save(
                tmp_path / "img" / c / f"{i}.png")
    return tmp_path / "img"


def test_detections_are_capped_sorted_fractions_inside_the_image(tiny_detector):
    images = [np.random.default_rng(i).uniform(0, 255, (40 + 30 * i, 90, 3)) for i in range(2)]
    found = detect_boxes(tiny_detector, images, score_threshold=0.0, max_boxes=4)
    assert len(found) == 2
    for detections in found:
        assert 1 <= len(detections) <= 4
        scores = [score for _, score, _ in detections]
        assert scores == sorted(scores, reverse=True)
        for box, _, label in detections:
            assert box.units == "fractions" and 0 <= box.x and 0 <= box.y and box.w > 0 and box.h > 0
            assert box.x + box.w <= 1 + 1e-6 and box.y + box.h <= 1 + 1e-6 and 0 <= label < 3
    assert detect_boxes(tiny_detector, images, score_threshold=1.01) == [[], []]


def test_each_detection_becomes_an_item_and_an_image_without_one_a_reject(tiny_detector, tmp_path):
    items = list_folder(_folder(tmp_path))
    boxed, rejects = detected_items(items, tiny_detector, score_threshold=0.0, max_boxes=2)
    assert rejects == [] and 4 <= len(boxed) <= 8
    assert all(item.box is not None and item.id.startswith(f"{item.label_name}/") and "#" in item.id
               for item in boxed)
    none, rejects = detected_items(items, tiny_detector, score_threshold=1.01)
    assert none == [] and len(rejects) == 4 and "no detection with confidence >= 1.01" in rejects[0][1]


def test_phase0_crops_the_detections_of_a_local_preset(tiny_detector, tmp_path):
    preset = tmp_path / "tiny-retinanet"
    tiny_detector.save_to_preset(str(preset))
    data = DataConfig(source=str(_folder(tmp_path, n=3)), tfrecords_dir=str(tmp_path / "tf"), name="det",
                      workers=1, detector=str(preset), detector_threshold=0.0, detector_max_boxes=2)
    out = run_ingest(RunConfig(name="d", runs_dir=str(tmp_path / "runs"), data=data))
    summary = json.loads((out / "dataset.json").read_text())
    # Random weights put many boxes outside the image: an image left without one is a reported reject.
    assert 1 <= summary["boxes"]["n_source_images"] <= 6 and summary["n_images"] == summary["boxes"]["n_crops"] <= 12
    assert summary["boxes"]["n_source_images"] + summary["n_rejects"] >= 6
    with open(out / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(row["box"] and "#" in row["id"] for row in rows)


def test_a_preset_that_cannot_be_loaded_is_one_line_naming_it(tmp_path):
    with pytest.raises(DetectorError, match=r"object-detection preset '.*no-such-preset' could not be loaded"):
        load_detector(str(tmp_path / "no-such-preset"))
    data = DataConfig(source=str(_folder(tmp_path)), tfrecords_dir=str(tmp_path / "tf"), name="x", workers=1,
                      detector=str(tmp_path / "no-such-preset"))
    with pytest.raises(IngestError, match="no-such-preset") as caught:
        run_ingest(RunConfig(name="x", runs_dir=str(tmp_path / "runs"), data=data))
    assert "\n" not in str(caught.value)
