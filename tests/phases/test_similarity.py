"""The `similarity` command (pipeline/phases/similarity.py, pipeline/serving/pair_scores.py): two files, a pairs
CSV with a corrupt file, the model named as a run's trained model or phase-1 backbone, and one-line errors."""
from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.phases import similarity

TAG, LOSS = "tiny-32-none", "triplet"


def _parse(argv):
    parser = argparse.ArgumentParser()
    similarity.add_arguments(parser.add_subparsers(dest="phase"))
    return parser.parse_args(["similarity", *argv])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A run with a tiny trained embedding model, three images and a corrupt one."""
    import keras

    from models.layers import L2Normalize

    root = tmp_path_factory.mktemp("similarity")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, L2Normalize()(keras.layers.Dense(8)(x)))
    folder = root / "runs/r/train" / TAG / LOSS
    folder.mkdir(parents=True)
    model.save(folder / "embedding_model.keras")
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / f"{name}.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root, model


def _expected(model, *files):
    import tensorflow as tf

    from pipeline.data.tfrecords import decode_and_resize

    vectors = [model(decode_and_resize(tf.io.read_file(str(f)), 32)[None]).numpy()[0] for f in files]
    return float(vectors[0] @ vectors[1])


def test_two_files_print_their_cosine(workspace, capsys):
    root, model = workspace
    args = _parse(["--model", f"r/{TAG}+{LOSS}", "--runs-dir", str(root / "runs"), str(root / "a.png"),
                   str(root / "b.png")])
    assert similarity.main(args) == 0
    printed = float(capsys.readouterr().out.strip())
    assert printed == pytest.approx(_expected(model, root / "a.png", root / "b.png"), abs=1e-5)


def test_pairs_csv_scores_in_batches_and_reports_a_corrupt_file(workspace, tmp_path, capsys):
    root, model = workspace
    pairs = tmp_path / "pairs.csv"
    pd.DataFrame({"a": [str(root / "a.png"), str(root / "a.png"), str(root / "c.png")],
                  "b": [str(root / "b.png"), str(root / "broken.jpg"), str(root / "c.png")],
                  "note": ["x", "y", "z"]}).to_csv(pairs, index=False)
    out = tmp_path / "out/scores.csv"
    args = _parse(["--model", str(root / "runs/r/train" / TAG / LOSS), "--pairs", str(pairs), "--output", str(out),
                   "--batch-size", "2"])
    assert similarity.main(args) == 0
    assert "2 of 3 pairs scored" in capsys.readouterr().out
    scores = pd.read_csv(out, keep_default_na=False, dtype=str)
    assert list(scores.columns) == ["a", "b", "note", "score", "error"] and scores["note"].tolist() == ["x", "y", "z"]
    assert float(scores["score"][0]) == pytest.approx(_expected(model, root / "a.png", root / "b.png"), abs=1e-5)
    assert scores["score"][1] == "" and "broken.jpg" in scores["error"][1]
    assert float(scores["score"][2]) == pytest.approx(1.0, abs=1e-5) and scores["error"][2] == ""


def test_a_phase_1_backbone_is_rebuilt_from_its_meta(workspace, capsys):
    from pipeline.config import BackboneConfig

    root, _ = workspace
    backbone = BackboneConfig(name="mobilenet", weights="none", image_size=32, alpha=0.25)
    emb = root / "runs/r/embeddings/mobilenet-32-none"
    emb.mkdir(parents=True)
    (emb / "meta.json").write_text(json.dumps({"backbone": dataclasses.asdict(backbone)}))
    args = _parse(["--model", "r/mobilenet-32-none", "--runs-dir", str(root / "runs"), str(root / "a.png"),
                   str(root / "a.png")])
    assert similarity.main(args) == 0
    assert float(capsys.readouterr().out) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["--model", "r/../r/x", "a", "b"], "expected RUN/BACKBONE"),
    (["--model", "nope/x+y", "a", "b"], "no run 'nope'"),
    (["--model", "r/other+triplet", "a", "b"], f"trained models of the run: {TAG}+{LOSS}"),
    (["--model", "r/nothing", "a", "b"], "no phase-1 backbone 'nothing'"),
    (["--model", f"r/{TAG}+{LOSS}", "a"], "give two images"),
    (["--model", f"r/{TAG}+{LOSS}", "--pairs", "p.csv"], "--pairs needs --output"),
])
def test_bad_arguments_are_one_line_errors_before_tensorflow_work(workspace, capsys, argv, message):
    root, _ = workspace
    assert similarity.main(_parse([*argv, "--runs-dir", str(root / "runs")])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_a_missing_image_is_a_one_line_error(workspace, capsys):
    root, _ = workspace
    args = _parse(["--model", f"r/{TAG}+{LOSS}", "--runs-dir", str(root / "runs"), str(root / "a.png"),
                   str(root / "missing.png")])
    assert similarity.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert "missing.png: file not found" in err and "\n" not in err
