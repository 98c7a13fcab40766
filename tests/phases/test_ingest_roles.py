"""Roles at ingest: a manifest's `role` column reaches the TFRecords, manifest.csv and dataset.json; groups with no
original or several, and roles without a group, are reported (not fatal); data without roles keeps its
fingerprint, and TFRecords written before roles existed read as having none."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config import DataConfig, RunConfig
from pipeline.data import sources
from pipeline.data.validate import role_summary, role_warnings
from pipeline.phases.ingest import compute_fingerprint, run_ingest

# compute_fingerprint of the listing below under the code before roles existed (commit cbf8b7e).
FINGERPRINT_BEFORE_ROLES = "0a78cf2fc45491189625f1425c619d6ea1914b6a4e9dfe56e284812b46edbdb2"


def _listing(role: str = "") -> list[sources.SourceItem]:
    return [sources.SourceItem(id=f"c{i % 2}/{i}.png", path=f"/data/c{i % 2}/{i}.png", label_name=f"c{i % 2}",
                               file=f"/data/c{i % 2}/{i}.png", text="a caption" if i == 0 else "",
                               group="g1" if i < 2 else "", role=role if i == 0 else "", size=100 + i,
                               mtime_ns=10 ** 18 + i) for i in range(4)]


def test_data_without_roles_keeps_its_fingerprint_and_a_role_changes_it():
    data = DataConfig(source="/data/x.csv", split="classes", ratios=[0.5, 0.0, 0.5])
    assert compute_fingerprint(data, _listing()) == FINGERPRINT_BEFORE_ROLES
    assert compute_fingerprint(data, _listing("original")) != FINGERPRINT_BEFORE_ROLES


def test_role_summary_reports_groups_without_or_with_several_originals_and_roles_without_group():
    def item(i, group, role):
        return sources.SourceItem(id=str(i), path="", label_name="x", group=group, role=role)

    items = [item(0, "a", "original"), item(1, "a", "moderate"), item(2, "b", "radical"), item(3, "b", "radical"),
             item(4, "c", "Original"), item(5, "c", "original"), item(6, "", "radical"), item(7, "d", "")]
    summary = role_summary(items)
    assert summary["roles"] == {"Original": 1, "moderate": 1, "original": 2, "radical": 3}
    assert (summary["n_groups_with_one_original"], summary["groups_without_original"],
            summary["groups_with_several_originals"], summary["roles_without_group"]) == (1, ["b", "d"], ["c"], ["6"])
    warnings = role_warnings(summary)
    assert len(warnings) == 3 and "2 groups have no item with role 'original'" in warnings[0]
    assert role_warnings(role_summary([item(0, "a", ""), item(1, "a", "")])) == []


def test_roles_reach_the_records_the_manifest_and_dataset_json(tmp_path: Path):
    import tensorflow as tf

    from pipeline.data.schema import parse
    from pipeline.data.record_reader import list_shards
    from pipeline.data.tfrecords import read_metadata

    rows = []
    rng = np.random.default_rng(0)
    for g in range(4):
        for v, role in enumerate(["original", "moderate", "radical"]):
            name = f"img/{g}_{v}.png"
            (tmp_path / "img").mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / name)
            group, label = f"g{g}", f"c{g % 2}"
            if g == 3:                    # a group without original, and one item with a role but no group
                role = "radical" if v < 2 else role
                group = "" if v == 2 else group
            rows.append([name, label, group, role])
    with open(tmp_path / "m.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "label", "group", "role"], *rows])
    config = RunConfig(data=DataConfig(source=str(tmp_path / "m.csv"), tfrecords_dir=str(tmp_path / "tfr"),
                                       workers=1), runs_dir=str(tmp_path / "runs"))
    out = run_ingest(config)
    summary = json.loads((out / "dataset.json").read_text())
    assert summary["roles"]["with_role"] == 12 and summary["roles"]["groups_without_original"] == ["g3"]
    assert any("no item with role 'original'" in w for w in summary["warnings"])
    assert any("a role but no group" in w for w in summary["warnings"])
    with open(out / "manifest.csv", newline="") as f:
        manifest = {r["id"]: r["role"] for r in csv.DictReader(f)}
    assert manifest["img/0_0.png"] == "original" and manifest["img/1_2.png"] == "radical"
    metadata = {}
    for split in ("train", "val", "test"):
        found = read_metadata(list_shards(out, split))
        metadata.update(zip(found["id"], found["role"]))
    assert metadata == manifest
    # A record written before roles existed has no "role" feature: it reads as "".
    old = tf.train.Example(features=tf.train.Features(feature={
        "id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"x"]))})).SerializeToString()
    assert parse(tf.constant(old))["role"].numpy() == b""
