"""evaluate.ensembles through the CLI on tiny images: phase 2 (phase-1 members), phase 4 (a trained member),
phase 5's table and answer, and the export of an ensemble bundle whose SavedModel runs every member."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

import run as cli
from tests.conftest import make_class_folder, tiny_mobilenet_weights

T32, T48 = "mobilenet-a0.25-32-custom", "mobilenet-a0.25-48-custom"


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ens")
    images = make_class_folder(tmp_path / "images", n_classes=4, per_class=12)
    # A weights file (not a random init) makes the members deployable; its conv weights fit any input size.
    weights = tiny_mobilenet_weights(tmp_path / "mobilenet.weights.h5")
    backbone = {"name": "mobilenet", "alpha": 0.25, "weights": str(weights)}
    config = {
        "runs_dir": f"{tmp_path}/runs", "reports_dir": f"{tmp_path}/reports",
        "data": {"tfrecords_dir": f"{tmp_path}/tfrecords", "name": "tiny"},
        "extract": {"backbones": [{**backbone, "image_size": 32}, {**backbone, "image_size": 48}]},
        "evaluate": {"projections": ["pca"], "grid_queries": 0, "ensembles": [
            {"members": [T32, T48], "combine": "concat", "name": "pair"},
            {"members": [T32, T48], "combine": "mean", "weights": [1, 3]},
            {"members": [T32, f"{T32}+triplet"], "combine": "concat", "name": "with-trained"}]},
        "train": {"losses": ["triplet"], "epochs": 2, "embedding_dim": 8, "n_classes_per_batch": 4,
                  "n_samples_per_class": 4},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ["--run", "e", "--config", str(path)]
    assert cli.main(["all", "--source", str(images), *args]) == 0
    return tmp_path, args


def _load(folder):
    return (np.load(folder / "embeddings.npy"), np.load(folder / "features_raw.npy"),
            json.loads((folder / "meta.json").read_text()))


def test_ensembles_are_embedding_sets_of_their_members(ensemble_run):
    from pipeline.vectors.ensemble import combine_embeddings

    emb = ensemble_run[0] / "runs/e/embeddings"
    a, b = np.load(emb / T32 / "embeddings.npy"), np.load(emb / T48 / "embeddings.npy")
    unit, raw, meta = _load(emb / "pair")
    np.testing.assert_allclose(unit, combine_embeddings([a, b], "concat")[1], atol=1e-6)
    assert unit.shape == (len(a), 512) and meta["ensemble"]["members"] == [T32, T48]
    assert meta["image_size"] == 48 and meta["ensemble"]["member_image_sizes"] == [32, 48]
    unit, raw, meta = _load(emb / f"ens-mean-{T32}__{T48}")
    want_raw, want = combine_embeddings([a, b], "mean", [1, 3])
    np.testing.assert_allclose(unit, want, atol=1e-6)
    np.testing.assert_allclose(raw, want_raw, atol=1e-6)
    trained = np.load(emb / f"{T32}+triplet" / "embeddings.npy")
    unit, _, meta = _load(emb / "with-trained")
    assert unit.shape[1] == 256 + 8 and meta["ensemble"]["member_losses"] == ["pretrained", "triplet"]
    np.testing.assert_allclose(unit, combine_embeddings([a, trained], "concat")[1], atol=1e-6)
    for tag in ("pair", "with-trained"):
        metrics = json.loads((ensemble_run[0] / f"runs/e/eval/{tag}/metrics.json").read_text())
        assert set(metrics["retrieval"]) == {"unit/cosine", "unit/euclidean", "raw/euclidean"}


def test_phase5_compares_and_answers_for_the_ensembles(ensemble_run):
    data = json.loads((ensemble_run[0] / "reports/e/comparison.json").read_text())
    rows = {(r["backbone"], r["loss"]) for r in data["rows"]}
    assert {("pair", "ensemble"), ("with-trained", "ensemble")} <= rows
    answer = {a["question"]: a["answer"] for a in data["answers"]}["Does an ensemble beat its members?"]
    assert "pair (concat of 2)" in answer and f"{T32}+triplet" in answer and "best member" in answer
    assert "Which loss gave the most discriminative embeddings?" in {a["question"] for a in data["answers"]}


def test_a_stale_ensemble_is_refused_by_phase5(ensemble_run, capsys):
    tmp_path, args = ensemble_run
    changed = (f"evaluate.ensembles=[{{members: [{T32}, {T48}], combine: concat, weights: [1, 2], name: pair}}]")
    assert cli.main(["phase5", *args, "--set", changed]) == 1
    assert "ensemble pair is not of its members' current embeddings" in capsys.readouterr().err


def test_mean_of_unequal_dimensions_is_one_clear_line(ensemble_run, capsys):
    tmp_path, args = ensemble_run
    bad = f"evaluate.ensembles=[{{members: [{T32}, {T32}+triplet], combine: mean}}]"
    assert cli.main(["phase4", *args, "--set", bad]) == 1
    err = capsys.readouterr().err
    assert f"{T32} is 256-d, {T32}+triplet is 8-d" in err and "use combine 'concat'" in err
    assert cli.main(["phase2", *args, "--set", "evaluate.ensembles=[{members: [x, y]}]"]) == 0   # phase 4's
    assert cli.main(["phase4", *args, "--set", "evaluate.ensembles=[{members: [x, y]}]"]) == 1
    assert "no embeddings of member x" in capsys.readouterr().err


def test_export_of_an_ensemble_runs_every_member(ensemble_run):
    import tensorflow as tf

    from pipeline.phases.export import collection_images
    from pipeline.core.artifacts import read_items

    tmp_path, args = ensemble_run
    out = tmp_path / "bundle"
    assert cli.main(["export", *args, "--model", "pair", "--out", str(out)]) == 0
    version = out / "versions" / (out / "CURRENT").read_text().strip()
    card = json.loads((version / "bundle.json").read_text())
    assert card["ensemble"]["members"] == [T32, T48] and card["source"]["tag"] == "pair"
    assert card["export_check"]["max_abs_diff"] <= 1e-4 and not card["export_check"]["onnx"]["written"]
    assert "several image sizes" in card["export_check"]["onnx"]["reason"]
    # Plain TensorFlow: bytes in, the ensemble's stored embedding out (decoded once per member size).
    emb = tmp_path / "runs/e/embeddings/pair"
    items = read_items(emb)
    encoded = [e for _, e in zip(range(5), collection_images(tmp_path / "tfrecords/tiny", items))]
    loaded = tf.saved_model.load(str(version / "image_model"))
    served = loaded.signatures["serving_default"](images=tf.constant(encoded))["embedding"].numpy()
    np.testing.assert_allclose(served, np.load(emb / "embeddings.npy")[:5], atol=1e-4)
    assert loaded.embed_pixels(tf.zeros([2, 48, 48, 3]))["embedding"].shape == (2, 512)
