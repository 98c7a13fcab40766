"""Texts through phases 0–2 with a tiny random CLIP on a CSV with captions: text_embeddings.npy aligned with
the items (unit rows with text, zero rows without), class prompts, counts in meta.json, the text metrics
against brute force on the written arrays, and the report's "Text ↔ image" section."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.config import BackboneConfig, DataConfig, EvaluateConfig, ExtractConfig, RunConfig
from pipeline.runner import run_phases
from tests.conftest import make_class_folder

TINY = dict(vision_image_size=32, vision_patch_size=8, vision_hidden_dim=32, vision_num_layers=1,
            vision_num_heads=2, vision_intermediate_dim=64, projection_dim=16, text_hidden_dim=32,
            text_num_layers=1, text_num_heads=2, text_intermediate_dim=64, text_vocabulary_size=600)
COLOURS = ("red", "green", "blue", "yellow")


def _config(tmp_path: Path, source: Path) -> RunConfig:
    backbone = BackboneConfig(name="clip-vit-b32", weights="none", image_size=32, params=dict(TINY), init_seed=1)
    return RunConfig(
        name="t", runs_dir=str(tmp_path / "runs"), reports_dir=str(tmp_path / "reports"),
        data=DataConfig(source=str(source), tfrecords_dir=str(tmp_path / "tfr"), workers=1, shard_size=8,
                        ratios=[0.5, 0.0, 0.5]),
        extract=ExtractConfig(backbones=[backbone], batch_size=16, write_json=False),
        evaluate=EvaluateConfig(projections=["pca"], projection_sample=40, grid_queries=3, heatmap_sample=40,
                                kmeans=False))


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("text")
    make_class_folder(tmp_path / "images", n_classes=4, per_class=8)
    manifest = tmp_path / "captions.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "text"])
        for c in range(4):
            for i in range(8):
                text = f"a {COLOURS[c]} striped thing number {i}"
                if (c, i) == (0, 1):
                    text = ""
                elif (c, i) == (1, 2):
                    text = "nan"
                elif (c, i) == (2, 3):
                    text = "x" * 200      # more than CLIP's 75 text tokens
                writer.writerow([f"images/class_{c}/img_{i:03d}.png", f"class_{c}", text])
    config = _config(tmp_path, manifest)
    run_phases(config, ["phase0", "phase1", "phase2"])
    tag = config.extract.backbones[0].artifact_tag()
    return config, tmp_path, tag


def test_phase0_counts_the_texts(text_run):
    config, tmp_path, _ = text_run
    dataset = next((tmp_path / "tfr").iterdir())
    texts = json.loads((dataset / "dataset.json").read_text())["texts"]
    assert texts["with_text"] == 30 and texts["empty"] == 2 and texts["over_long"] == 0
    assert texts["missing_in_source"] == {"NaN-like": 1, "empty": 1}


def test_phase1_writes_text_embeddings_aligned_with_the_items(text_run):
    from models.backbones import build_feature_extractor

    config, tmp_path, tag = text_run
    emb = tmp_path / "runs/t/embeddings" / tag
    items = pd.read_csv(emb / "items.csv", keep_default_na=False, dtype={"text": str})
    text = np.load(emb / "text_embeddings.npy")
    prompts = np.load(emb / "class_prompt_embeddings.npy")
    assert text.dtype == np.float32 and text.shape == (len(items), 16) == np.load(emb / "embeddings.npy").shape
    has_text = items["has_text"].to_numpy(bool)
    assert has_text.sum() == 30 and set(items.loc[~has_text, "text"]) == {""}
    np.testing.assert_allclose(np.linalg.norm(text[has_text], axis=1), 1.0, atol=1e-5)
    assert not text[~has_text].any(), "rows of items without text are all-zero"
    meta = json.loads((emb / "meta.json").read_text())["text"]
    assert meta["n_items_with_text"] == 30 and meta["n_distinct_texts"] == 30 and meta["n_truncated"] == 1
    assert meta["class_prompts"] == [f"a photo of a class {c}" for c in range(4)], "underscores become spaces"

    # Row i is the embedding of item i's own text, and the prompts are in label order: embed them again.
    again = build_feature_extractor(**config.extract.backbones[0].extractor_options(with_text=True)).text
    rows = np.flatnonzero(has_text)[:5]
    np.testing.assert_allclose(again.embed(items["text"].iloc[rows].tolist()).embedding, text[rows], atol=1e-5)
    np.testing.assert_allclose(again.embed(meta["class_prompts"]).embedding, prompts, atol=1e-5)


def test_phase2_text_metrics_match_brute_force_on_the_written_arrays(text_run):
    config, tmp_path, tag = text_run
    emb = tmp_path / "runs/t/embeddings" / tag
    items = pd.read_csv(emb / "items.csv", keep_default_na=False, dtype={"text": str})
    unit, text = np.load(emb / "embeddings.npy"), np.load(emb / "text_embeddings.npy")
    prompts = np.load(emb / "class_prompt_embeddings.npy")
    metrics = json.loads((tmp_path / "runs/t/eval" / tag / "metrics.json").read_text())["text"]

    test = np.flatnonzero(items["split"] == "test")
    labels = items["label"].to_numpy()
    predicted = np.argmax(unit[test] @ prompts.T, axis=1)
    assert metrics["zero_shot"]["top-1"] == pytest.approx(np.mean(predicted == labels[test]))

    # Text → image, own image: R@1 is the share of test texts whose most similar test image is their own.
    queries = test[items["has_text"].to_numpy(bool)[test]]
    scores = text[queries] @ unit[test].T
    first = test[np.argmax(scores, axis=1)]
    row = metrics["text_to_image"]["item"]
    assert row["n_queries"] == len(queries) and row["gallery_size"] == len(test)
    assert row["R@1"] == pytest.approx(np.mean(first == queries))
    rank_of_own = [(s > s[np.flatnonzero(test == q)[0]]).sum() + 1 for s, q in zip(scores, queries)]
    assert row["mAP"] == pytest.approx(np.mean(1.0 / np.array(rank_of_own)))
    assert set(metrics["image_to_text"]) == {"item", "class"}
    assert metrics["image_to_text"]["item"]["n_queries_without_positive"] == int((~items["has_text"][test]).sum())
    listed = pd.read_csv(tmp_path / "runs/t/eval" / tag / "text_neighbours.csv", keep_default_na=False)
    assert set(listed["query_id"]) == set(items["id"].iloc[queries])


def test_the_report_has_the_text_section(text_run):
    config, tmp_path, tag = text_run
    html = (tmp_path / "reports/t/index.html").read_text()
    assert "Text ↔ image" in html and "Zero-shot classification" in html and "text → image, its own image" in html
    assert f"img/{tag}/grid_text_to_image.png" in html
    assert (tmp_path / "reports/t/img" / tag / "grid_text_to_image.png").is_file()
    assert "texts missing in the source" in html


def test_the_text_settings_are_in_the_extraction_fingerprint(text_run):
    from pipeline.core.artifacts import extraction_fingerprint
    from pipeline.phases.extract import text_settings

    config, _, _ = text_run
    backbone, extract = config.extract.backbones[0], config.extract
    off = ExtractConfig(**{**extract.__dict__, "text": False})
    other = ExtractConfig(**{**extract.__dict__, "zero_shot_prompt": "{label}"})
    prints = {extraction_fingerprint({}, backbone, s, text_settings(backbone, s)) for s in (extract, off, other)}
    assert len(prints) == 3
    assert text_settings(BackboneConfig(name="mobilenet", weights="none"), extract) is None
