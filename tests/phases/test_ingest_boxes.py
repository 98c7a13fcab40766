"""Boxes at ingest: a manifest's `x, y, w, h` rows become one item per box (the crop), bad boxes are reported
rejects with their reasons, the box and source image reach the TFRecords, manifest.csv and dataset.json, the
stored crop equals the numpy slice, and data without boxes keeps its fingerprint."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import DataConfig, RunConfig, load_config
from pipeline.core.errors import IngestError
from pipeline.data import sources
from pipeline.phases.ingest import compute_fingerprint, run_ingest
from tests.phases.test_ingest_roles import FINGERPRINT_BEFORE_ROLES, _listing


def _scene(tmp_path: Path, n_images: int = 6):
    """Images (90 × 60) and a manifest with two boxes per image (one per class), plus bad rows."""
    rng = np.random.default_rng(0)
    rows, arrays = [], {}
    (tmp_path / "img").mkdir()
    for i in range(n_images):
        array = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
        name = f"img/{i}.png"
        Image.fromarray(array).save(tmp_path / name)
        arrays[name] = array
        rows.append([name, "shirt", 5, 6, 30, 40, ""])
        rows.append([name, "shoe", 50, 10, 35, 45, ""])
    rows += [["img/0.png", "shirt", 80, 10, 20, 20, ""],      # past the right edge
             ["img/1.png", "shirt", 10, 10, 0, 20, ""],       # empty
             ["img/2.png", "shoe", 10, 10, "", 20, ""],       # incomplete
             ["img/3.png", "shoe", "", "", "", "", "whole"]]  # no box: the whole image, under its own id
    with open(tmp_path / "boxes.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "label", "x", "y", "w", "h", "id"], *rows])
    return tmp_path / "boxes.csv", arrays


def test_boxes_become_items_and_bad_boxes_are_rejects(tmp_path: Path):
    import io

    import tensorflow as tf

    from pipeline.data.schema import parse
    from pipeline.data.record_reader import list_shards

    manifest, arrays = _scene(tmp_path)
    config = RunConfig(name="b", runs_dir=str(tmp_path / "runs"),
                       data=DataConfig(source=str(manifest), tfrecords_dir=str(tmp_path / "tf"), name="boxes",
                                       workers=1))
    out = run_ingest(config)
    summary = json.loads((out / "dataset.json").read_text())
    assert summary["n_images"] == 6 * 2 + 1
    assert summary["boxes"] == {"n_crops": 12, "n_source_images": 6, "units": "pixels", "n_rejected_box_rows": 3}
    with open(out / "rejects.csv") as f:
        rejects = {r["path"]: r["reason"] for r in csv.DictReader(f)}
    assert "not inside the 90×60 image" in rejects["img/0.png#80,10,20,20"]
    assert "empty box" in rejects["img/1.png#10,10,0,20"]
    assert any("incomplete box (no w)" in reason for reason in rejects.values())
    with open(out / "manifest.csv") as f:
        manifest_rows = {r["id"]: r for r in csv.DictReader(f)}
    assert manifest_rows["img/4.png#50,10,35,45"]["box"] == "50,10,35,45"
    assert manifest_rows["img/4.png#50,10,35,45"]["path"].endswith("img/4.png")
    assert manifest_rows["whole"]["box"] == "" and manifest_rows["whole"]["width"] == "90"
    records = 0
    for split in ("train", "val", "test"):
        for record in tf.data.TFRecordDataset([str(p) for p in list_shards(out, split)]).map(parse):
            item_id = record["id"].numpy().decode()
            box = record["box"].numpy().decode()
            name = "img/" + Path(record["path"].numpy().decode()).name
            pixels = np.asarray(Image.open(io.BytesIO(record["image"].numpy())))
            if box:
                left, top, width, height = map(int, box.split(","))
                np.testing.assert_array_equal(pixels, arrays[name][top:top + height, left:left + width])
                assert item_id == f"{name}#{box}"
            else:
                np.testing.assert_array_equal(pixels, arrays[name])
            records += 1
    assert records == 13


def test_fractions_are_a_setting_and_enter_the_fingerprint_only_with_boxes(tmp_path: Path):
    manifest, _ = _scene(tmp_path, n_images=2)
    pixels = sources.list_manifest(manifest, "pixels")
    fractions = sources.list_manifest(manifest, "fractions")
    assert pixels[0].box.units == "pixels" and fractions[0].box.units == "fractions"
    data = DataConfig(source="/data/x.csv", split="classes", ratios=[0.5, 0.0, 0.5])
    # No box anywhere: the fingerprint of before boxes existed, whatever box_units says.
    assert compute_fingerprint(data, _listing()) == FINGERPRINT_BEFORE_ROLES
    data.box_units = "fractions"
    assert compute_fingerprint(data, _listing()) == FINGERPRINT_BEFORE_ROLES
    assert compute_fingerprint(data, pixels) != compute_fingerprint(DataConfig(source="/data/x.csv", split="classes",
                                                                               ratios=[0.5, 0.0, 0.5]), pixels)
    # In fractions, a box of 5 × 30 "image widths" lies outside every image: rejects with reasons, not a crash.
    config = RunConfig(name="f", runs_dir=str(tmp_path / "runs"),
                       data=DataConfig(source=str(manifest), tfrecords_dir=str(tmp_path / "tf"), name="frac",
                                       workers=1, box_units="fractions"))
    with pytest.raises(IngestError, match=r"img/0.png#5,6,30,40: box 5,6,30,40 \(fractions\) is not inside the "
                                          r"90×60 image"):
        run_ingest(config)
    assert load_config(None, ["data.box_units=fractions"]).data.box_units == "fractions"
