"""Head mode over cached tokens, end to end through the CLI: configs/siamese-clip.yaml with a tiny random CLIP
(TransformerProjection on class + patch tokens, texts fused, multimodal contrastive, group triplets led by
originals, validation triplet accuracy vs brute force) and MobileNet (weights none) feature-map tokens, whose
phase-4 embeddings the composed image-level model reproduces."""
from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

import models.heads  # noqa: F401  (registers the heads' layers for load_model)
import run as cli
from tests.phases.test_tokens import TINY_CLIP, assert_rows_match, make_group_manifest

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "siamese-clip.yaml"


def common_args(tmp: Path, run: str) -> list[str]:
    return ["--run", run, "--set", f"runs_dir={tmp}/runs", "--set", f"reports_dir={tmp}/reports",
            "--set", f"data.tfrecords_dir={tmp}/tfrecords", "--set", "data.workers=1",
            "--set", "evaluate.projections=pca", "--set", "evaluate.grid_queries=0", "--set", "evaluate.kmeans=false",
            "--set", "extract.write_json=false", "--set", "extract.mixed_precision=false",
            "--set", "train.mixed_precision=false", "--set", "train.steps_per_epoch=3", "--set", "train.epochs=3"]


def test_the_recipe_has_the_seed_settings():
    from pipeline.config import load_config

    config = load_config(CONFIG)
    train, backbone = config.train, config.extract.backbones[0]
    assert (backbone.name, backbone.weights, config.extract.tokens) == ("clip-vit-b32", "imagenet", True)
    assert (train.mode, train.head_type, train.head_layers, train.head_heads) == ("head", "transformer", 2, 8)
    assert train.use_text and train.losses == ["multimodal_contrastive"] and train.positives == "group"
    assert train.loss_params["multimodal_contrastive"]["alpha_text"] == 0.3 and train.mixed_precision
    assert train.anchor_originals and train.triplet_negatives


@pytest.fixture(scope="module")
def siamese_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("siamese")
    (tmp / "data").mkdir()
    manifest = make_group_manifest(tmp / "data", n_classes=6, groups_per_class=3, versions=3)
    args = ["--config", str(CONFIG), *common_args(tmp, "sc"),
            "--set", "extract.backbones.0.weights=none", "--set", "extract.backbones.0.image_size=32",
            *[arg for key, value in TINY_CLIP.items()
              for arg in ("--set", f"extract.backbones.0.params.{key}={value}")],
            "--set", "train.head_heads=2", "--set", "train.embedding_dim=16", "--set", "train.n_classes_per_batch=4",
            "--set", "train.learning_rate=1e-3", "--set", "train.triplet_negatives=hard",
            "--set", "data.ratios=0.5,0.25,0.25"]
    assert cli.main(["all", "--source", str(manifest), *args]) == 0
    (tag,) = [p.name for p in (tmp / "runs/sc/train").iterdir()]
    return tmp, tag


def test_phase1_cached_the_clip_class_and_patch_tokens_row_by_row(siamese_run):
    from models.backbones import build_feature_extractor
    from pipeline.config import load_config
    from pipeline.core.artifacts import load_tokens

    tmp, tag = siamese_run
    base = tmp / f"runs/sc/embeddings/{tag}"
    meta = json.loads((base / "meta.json").read_text())
    raw = np.load(base / "features_raw.npy")
    tokens = load_tokens(base, len(raw), meta)
    # 32 px, patches of 8: 16 patches + the class token, width 32; several shards streamed into one memory map.
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.float16 and tokens.shape == (len(raw), 17, 32)
    assert meta["tokens"] == {"file": "tokens.npy", "shape": [len(raw), 17, 32], "dtype": "float16"}
    assert sum(meta["shards_per_split"].values()) > 1 and not (base / "parts").exists()
    np.testing.assert_allclose(np.abs(tokens).max(axis=(1, 2)), 1.0)   # each item at a peak of 1 (TokenScale)
    # The class token, projected as CLIP projects it (linear, no bias), points where the pooled feature does.
    backbone = load_config(tmp / "runs/sc/config.yaml").extract.backbones[0]
    vision = build_feature_extractor(**backbone.extractor_options()).model.get_layer("clip_vit_b32_vision")
    assert_rows_match(np.asarray(vision.get_layer("vision_projection")(np.asarray(tokens[:, 0], np.float32))), raw)


def test_the_siamese_recipe_trains_on_tokens_and_texts(siamese_run):
    tmp, tag = siamese_run
    out = tmp / f"runs/sc/train/{tag}/multimodal_contrastive"
    summary = json.loads((out / "training.json").read_text())
    assert summary["head_input"] == {"image": "tokens", "text": True, "shape": [17, 32]}
    assert summary["objective"] == "text_references" and summary["train"]["head_type"] == "transformer"
    head = keras.saving.load_model(out / "head.keras", compile=False)
    assert [t.name for t in head.inputs] == ["tokens", "text"]
    # Phase 4 = the head on the cached tokens and texts, every item, in items.csv's order.
    base = tmp / f"runs/sc/embeddings/{tag}"
    tokens = np.load(base / "tokens.npy", mmap_mode="r")
    texts = np.load(base / "text_embeddings.npy")
    trained = np.load(tmp / f"runs/sc/embeddings/{tag}+multimodal_contrastive/embeddings.npy")
    np.testing.assert_allclose(trained, np.asarray(head.predict([tokens.astype("float32"), texts], verbose=0)),
                               atol=1e-5)
    assert (tmp / "reports/sc/comparison.html").is_file()


def test_validation_triplet_accuracy_matches_brute_force(siamese_run):
    tmp, tag = siamese_run
    out = tmp / f"runs/sc/train/{tag}/multimodal_contrastive"
    summary = json.loads((out / "training.json").read_text())
    history = pd.read_csv(out / "history.csv")
    assert "val_triplet_accuracy" in history and len(history) == summary["epochs_run"]
    base = tmp / f"runs/sc/embeddings/{tag}"
    items = pd.read_csv(base / "items.csv", keep_default_na=False)
    val = np.flatnonzero(items["split"].to_numpy() == "val")
    head = keras.saving.load_model(out / "head.keras", compile=False)
    tokens = np.load(base / "tokens.npy", mmap_mode="r")
    texts = np.load(base / "text_embeddings.npy")
    embedded = np.asarray(head.predict([tokens[val].astype("float32"), texts[val]], verbose=0), np.float64)
    baseline = np.load(base / "embeddings.npy").astype(np.float64)[val]
    baseline /= np.linalg.norm(baseline, axis=1, keepdims=True)
    groups, roles = items["group"].to_numpy()[val], items["role"].to_numpy()[val]
    correct = total = 0
    for a in range(len(val)):
        if roles[a] != "original":
            continue
        # The hard negative: the item of another group the phase-1 baseline puts closest to the original.
        negative = max((j for j in range(len(val)) if groups[j] != groups[a]), key=lambda j: baseline[a] @ baseline[j])
        for p in range(len(val)):
            if p != a and groups[p] == groups[a]:
                total += 1
                correct += np.linalg.norm(embedded[a] - embedded[p]) < np.linalg.norm(embedded[a] - embedded[negative])
    assert total == summary["n_validation_triplets"] > 0
    best = history.iloc[summary["best_epoch"] - 1]
    assert best["val_triplet_accuracy"] == pytest.approx(correct / total)


@pytest.fixture(scope="module")
def mobilenet_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mobilenet_tokens")
    (tmp / "data").mkdir()
    manifest = make_group_manifest(tmp / "data", n_classes=4, groups_per_class=3, versions=3, size=64)
    args = [*common_args(tmp, "mt"), "--set", "extract.backbones.0.name=mobilenet",
            "--set", "extract.backbones.0.params.alpha=0.25", "--set", "extract.backbones.0.weights=none",
            "--set", "extract.backbones.0.image_size=64", "--set", "extract.tokens=true",
            "--set", "train.head_type=transformer",
            "--set", "train.head_heads=2", "--set", "train.head_width=32",
            "--set", "train.head_pooling=attention", "--set", "train.embedding_dim=16",
            "--set", "train.losses=triplet", "--set", "train.n_classes_per_batch=3", "--set", "data.split=stratified"]
    for phase in ("phase0", "phase1", "phase3", "phase4"):
        extra = ["--source", str(manifest)] if phase == "phase0" else []
        assert cli.main([phase, *extra, *args]) == 0
    (tag,) = [p.name for p in (tmp / "runs/mt/train").iterdir()]
    return tmp, tag


def test_mobilenet_tokens_train_a_transformer_head_that_composes_with_the_backbone(mobilenet_run):
    from pipeline.config import load_config
    from pipeline.core.run_dir import RunDir
    from pipeline.serving.model_export import build_embedding_model, probe_batch

    tmp, tag = mobilenet_run
    out = tmp / f"runs/mt/train/{tag}/triplet"
    summary = json.loads((out / "training.json").read_text())
    assert summary["head_input"] == {"image": "tokens", "text": False, "shape": [4, 256]}
    head = keras.saving.load_model(out / "head.keras", compile=False)
    layer = head.get_layer("transformer_projection")
    assert (layer.pooling, layer.width, layer.num_heads) == ("attention", 32, 2)
    base = tmp / f"runs/mt/embeddings/{tag}"
    items = pd.read_csv(base / "items.csv", keep_default_na=False)
    trained = np.load(tmp / f"runs/mt/embeddings/{tag}+triplet/embeddings.npy")
    tokens = np.load(base / "tokens.npy", mmap_mode="r")
    # 64 px: a 2 x 2 map of 256 channels. A random MobileNet's features are ~1e-17, far below float16's range:
    # the per-item scale keeps them, and the pooled feature is the mean of the positions, row by row.
    raw = np.load(base / "features_raw.npy")
    assert tokens.shape == (len(items), 4, 256) and np.abs(raw).max() < 1e-10
    assert_rows_match(tokens.astype(np.float32).mean(axis=1), raw)
    np.testing.assert_allclose(trained, np.asarray(head.predict(tokens.astype("float32"), verbose=0)), atol=1e-5)
    # Backbone (tokens output) + head: images in, the phase-4 embedding out.
    config = load_config(tmp / "runs/mt/config.yaml")
    model, image_size = build_embedding_model(config.extract.backbones[0], head)
    images, _ = probe_batch(RunDir(config), items, tokens, image_size)
    ids = list(items["id"])
    from pipeline.data.record_reader import list_shards
    from pipeline.data.tfrecords import read_metadata

    shard = list_shards(RunDir(config).dataset_dir, str(items["split"].iat[0]))[:1]
    rows = [ids.index(i) for i in read_metadata(shard)["id"][: len(images)]]
    np.testing.assert_allclose(np.asarray(model.predict(images, verbose=0)), trained[rows], atol=1e-3)


def test_groups_are_anchored_at_their_originals_in_every_batch():
    from pipeline.training.protocol import group_anchors, validation_triplets
    from pipeline.training.sampler import balanced_batches

    items = pd.DataFrame({"role": ["generated", "original", "generated", "generated", "generated", "", "x", "y"]})
    keys = np.array([0, 0, 0, 1, 1, 2, 2, 3])
    # Group 0's original is row 1; group 1 has no original (its first item leads); 2 has no role either; 3 is
    # alone (no positive, no anchor).
    assert group_anchors(items, keys, np.arange(8)).tolist() == [1, 3, 5]
    assert group_anchors(items.drop(columns="role"), keys, np.arange(8)).tolist() == [0, 3, 5]
    anchors = np.array([1, 3, 5])
    features = np.arange(8, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    ds = balanced_batches(features[:7], keys[:7], 2, 3, seed=0, anchors=anchors)
    for x, _ in ds.take(12):
        rows = np.asarray(x)[:, 0].astype(int).reshape(2, 3)
        for slot in rows:
            assert slot[0] == anchors[keys[slot[0]]], rows        # each group's slot starts with its anchor
            assert len(set(keys[slot])) == 1
    triplets = validation_triplets(keys, anchors, np.eye(8), "random", seed=0)
    # One triplet per (anchor, other member): (1, 0), (1, 2), (3, 4), (5, 6); negatives from other groups.
    assert [tuple(t[:2]) for t in triplets] == [(1, 0), (1, 2), (3, 4), (5, 6)]
    assert all(keys[n] != keys[a] for a, _, n in triplets)
