"""configs/clip-supcon.yaml (seed 002) with a tiny random CLIP: phases 0, 1, 3 (finetune, SupCon, mixed
precision, per-epoch results) and 4; the export reproduces phase 4 and the results are that epoch's model's."""
from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

import run as cli
from tests.conftest import make_class_folder

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "clip-supcon.yaml"
TINY = dict(vision_image_size=32, vision_patch_size=8, vision_hidden_dim=32, vision_num_layers=2, vision_num_heads=2,
            vision_intermediate_dim=64, projection_dim=16, text_hidden_dim=32, text_num_layers=1, text_num_heads=2,
            text_intermediate_dim=64, text_vocabulary_size=600)
# As `run.py all --weights none --image-size 32 --vision-num-layers 2 ...`, in a form every phase accepts.
TINY_CLIP = ["--set", "extract.backbones.0.weights=none", "--set", "extract.backbones.0.image_size=32"]
for _key, _value in TINY.items():
    TINY_CLIP += ["--set", f"extract.backbones.0.params.{_key}={_value}"]


def test_the_recipe_has_the_seed_parameters():
    from pipeline.config import load_config

    config = load_config(CONFIG)
    train, backbone = config.train, config.extract.backbones[0]
    assert (backbone.name, backbone.weights) == ("clip-vit-l14-336", "imagenet")
    assert train.losses == ["supcon"] and train.loss_params == {"supcon": {"temperature": 0.07}}
    assert (train.mode, train.epochs, train.n_classes_per_batch, train.n_samples_per_class) == ("finetune", 1, 4, 2)
    assert train.finetune_learning_rate == 1e-7 and train.finetune_layers == 24 + 4 and train.embedding_dim == 0
    assert train.mixed_precision and train.epoch_results_top_k == 10 and train.checkpoint_every == 1


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clip_supcon")
    images = make_class_folder(tmp / "images", n_classes=4, per_class=12, size=32)
    args = ["--config", str(CONFIG), "--run", "cs", *TINY_CLIP,
            "--set", f"runs_dir={tmp}/runs", "--set", f"reports_dir={tmp}/reports",
            "--set", f"data.tfrecords_dir={tmp}/tfrecords", "--set", "data.name=tiny",
            "--set", "evaluate.projections=pca", "--set", "evaluate.grid_queries=0",
            "--set", "extract.mixed_precision=false", "--set", "train.finetune_learning_rate=1e-3",
            "--set", "train.steps_per_epoch=3"]
    assert cli.main(["phase0", "--source", str(images), "--ratios", "0.5,0.25,0.25", *args]) == 0
    assert cli.main(["phase1", *args]) == 0
    assert cli.main(["phase3", *args]) == 0
    assert cli.main(["phase4", *args]) == 0
    (tag,) = [p.name for p in (tmp / "runs/cs/train").iterdir()]
    return tmp, tag


def test_the_whole_vision_tower_trained_without_a_head(recipe_run):
    tmp, tag = recipe_run
    summary = json.loads((tmp / f"runs/cs/train/{tag}/supcon/training.json").read_text())
    assert summary["mode"] == "finetune" and summary["mixed_precision"] and not summary["head"]
    assert summary["trainable_units"] == ["embedding", "pre_layer_norm", "encoder_block_0", "encoder_block_1",
                                          "layer_norm", "vision_projection"]
    assert summary["loss_config"]["temperature"] == 0.07 and summary["epochs_run"] == 1


def test_the_epoch_checkpoint_holds_the_optimizer_state(recipe_run):
    import h5py

    tmp, tag = recipe_run
    with h5py.File(tmp / f"runs/cs/train/{tag}/supcon/checkpoints/epoch_001.weights.h5") as f:
        assert "optimizer" in f and len(f["optimizer/vars"]) > 0


def test_the_epoch_results_rank_as_the_trained_model_does(recipe_run):
    tmp, tag = recipe_run
    records = json.loads((tmp / f"runs/cs/train/{tag}/supcon/results/retrieval_results_epoch_01.json").read_text())
    # One epoch: the exported model is the model at the end of epoch 1, and phase 4 embeds with it.
    emb = tmp / f"runs/cs/embeddings/{tag}+supcon"
    items = pd.read_csv(emb / "items.csv", keep_default_na=False)
    val = (items["split"] == "val").to_numpy()
    assert [r["query_id"] for r in records] == items["id"][val].tolist()
    ids, names = items["id"][val].to_numpy(), items["path"][val].map(lambda p: Path(p).parent.name).to_numpy()
    unit = np.load(emb / "embeddings.npy")[val]
    cosine = unit @ unit.T
    position = {item_id: row for row, item_id in enumerate(ids)}
    # The exact order is checked in float32 (test_epoch_results.py); here the model computed in float16,
    # where near-equal neighbours may swap, so: the same scores, and no better neighbour left out.
    tolerance = 2e-3
    for query, record in enumerate(records):
        ranked = [position[item_id] for item_id in record["ranked_ids"]]
        assert len(ranked) == 10 and query not in ranked
        assert record["query_label"] == names[query] and record["labels"] == names[ranked].tolist()
        np.testing.assert_allclose(record["scores"], cosine[query, ranked], atol=tolerance)
        assert all(a >= b for a, b in zip(record["scores"], record["scores"][1:]))
        left_out = np.setdiff1d(np.arange(len(ids)), [query, *ranked])
        assert cosine[query, left_out].max() <= min(record["scores"]) + tolerance


def test_the_export_reproduces_phase4(recipe_run):
    from pipeline.data.record_reader import list_shards
    from pipeline.data.tfrecords import image_dataset, read_metadata

    tmp, tag = recipe_run
    out = tmp / f"runs/cs/train/{tag}/supcon"
    # Trained under mixed precision: the SavedModel rounds its float16 ops its own way (finetune.SERVED_TOLERANCE).
    assert json.loads((out / "export.json").read_text())["max_abs_error"] < 1e-2
    emb = tmp / f"runs/cs/embeddings/{tag}+supcon"
    items = pd.read_csv(emb / "items.csv", keep_default_na=False)
    unit = np.load(emb / "embeddings.npy")
    assert unit.shape[1] == 16   # CLIP's projection, no head
    shards = list_shards(tmp / "tfrecords/tiny", "test")
    pixels = next(iter(image_dataset(shards, 32, 6))).numpy()
    rows = [items["id"].tolist().index(i) for i in read_metadata(shards)["id"][: len(pixels)]]
    model = keras.saving.load_model(out / "embedding_model.keras")
    # float16 compute: other batch sizes than phase 4's (32) round differently, by about 5e-4.
    np.testing.assert_allclose(model.predict(pixels, verbose=0), unit[rows], atol=2e-3)


def test_the_trained_space_keeps_the_untrained_text_side(recipe_run):
    # No head and a frozen text tower: phase 1's text vectors are still the texts of the fine-tuned image space,
    # so phase 4's evaluation has the text <-> image section too.
    tmp, tag = recipe_run
    base, trained = tmp / f"runs/cs/embeddings/{tag}", tmp / f"runs/cs/embeddings/{tag}+supcon"
    np.testing.assert_array_equal(np.load(trained / "class_prompt_embeddings.npy"),
                                  np.load(base / "class_prompt_embeddings.npy"))
    np.testing.assert_array_equal(np.load(trained / "text_embeddings.npy"), np.load(base / "text_embeddings.npy"))
    meta = json.loads((trained / "meta.json").read_text())
    assert meta["text"]["from"].startswith("phase 1")
    metrics = json.loads((tmp / f"runs/cs/eval/{tag}+supcon/metrics.json").read_text())
    assert metrics["text"]["zero_shot"]["n_queries"] > 0


def test_a_head_leaves_the_text_side_behind(tmp_path):
    from pipeline.phases.reevaluate import carry_text_side

    base, out = tmp_path / "base", tmp_path / "out"
    base.mkdir()
    out.mkdir()
    np.save(base / "text_embeddings.npy", np.eye(3, 4, dtype=np.float32))
    np.save(base / "class_prompt_embeddings.npy", np.eye(2, 4, dtype=np.float32))
    (out / "text_embeddings.npy").write_bytes(b"stale")  # an earlier result's file goes either way
    meta = {"text": {"dim": 4}}
    assert carry_text_side(base, out, meta, {"mode": "finetune", "head": True}, 4) is None
    assert carry_text_side(base, out, meta, {"mode": "head", "head": True}, 4) is None
    assert not (out / "text_embeddings.npy").exists()
    assert carry_text_side(base, out, meta, {"mode": "finetune", "head": False}, 8) is None  # another space
    assert carry_text_side(base, out, meta, {"mode": "finetune", "head": False}, 4)["dim"] == 4
    np.testing.assert_array_equal(np.load(out / "text_embeddings.npy"), np.eye(3, 4))
