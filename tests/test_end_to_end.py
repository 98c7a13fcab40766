"""The whole CLI on tiny generated images: phase 0 → 1 → 2, resume, idempotence, errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import run as cli
from tests.conftest import make_class_folder, run_cli_without_tensorflow, shared_path


def _args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--run", "t", "--set", f"runs_dir={tmp_path}/runs", "--set", f"reports_dir={tmp_path}/reports",
            "--set", f"data.tfrecords_dir={tmp_path}/tfrecords", "--set", "data.name=tiny",
            "--set", "extract.backbones.0.alpha=0.25", "--set", "extract.backbones.0.image_size=32",
            "--set", "extract.backbones.0.weights=none", "--set", "evaluate.projections=pca,tsne",
            "--set", "evaluate.projection_sample=60", "--set", "evaluate.grid_queries=3", *extra]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("e2e")
    images = make_class_folder(tmp_path / "images", n_classes=4, per_class=15)
    code = cli.main(["all", "--source", str(images), "--set", "data.shard_size=8", *_args(tmp_path)])
    assert code == 0
    return tmp_path, images


def test_all_phases_write_their_artifacts(finished_run):
    tmp_path, _ = finished_run
    emb = tmp_path / "runs/t/embeddings/mobilenet-a0.25-32-none"
    for name in ("embeddings.npy", "features_raw.npy", "items.csv", "embeddings.json", "index.faiss", "meta.json"):
        assert (emb / name).is_file(), name
    assert not (emb / "parts").exists(), "checkpoint parts are removed once assembled"
    unit = np.load(emb / "embeddings.npy")
    items = pd.read_csv(emb / "items.csv", keep_default_na=False)
    assert unit.shape == (60, 256) and len(items) == 60
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    as_json = json.loads((emb / "embeddings.json").read_text())
    assert len(as_json) == 60 and {"id", "label", "path", "vector"} <= set(as_json[0])
    np.testing.assert_allclose(as_json[5]["vector"], unit[5], atol=1e-5)
    assert as_json[5]["id"] == items["id"][5]

    ev = tmp_path / "runs/t/eval/mobilenet-a0.25-32-none"
    metrics = json.loads((ev / "metrics.json").read_text())
    assert set(metrics["retrieval"]) == {"unit/cosine", "unit/euclidean", "raw/euclidean"}
    cos = metrics["retrieval"]["unit/cosine"]
    assert 0 <= cos["P@1"] <= 1 and cos["n_queries_evaluated"] == metrics["protocol"]["n_queries"]
    assert metrics["protocol"]["leave_one_out"] is True
    assert metrics["topk_agreement_unit"] > 0.9
    neighbours = pd.read_csv(ev / "neighbours.csv", keep_default_na=False)
    assert set(neighbours["variant"]) == set(metrics["retrieval"])
    # each query's own image is never its neighbour (leave-one-out)
    assert not (neighbours["query_id"] == neighbours["neighbour_id"]).any()
    report = tmp_path / "reports/t/index.html"
    html = report.read_text()
    assert "mobilenet-a0.25-32-none" in html and "MAP@R" in html
    for plot in metrics["plots"].values():
        assert (report.parent / "img/mobilenet-a0.25-32-none" / plot).is_file()


def test_rerun_does_nothing_and_force_redoes(finished_run):
    tmp_path, images = finished_run
    meta = tmp_path / "runs/t/embeddings/mobilenet-a0.25-32-none/meta.json"
    metrics = tmp_path / "runs/t/eval/mobilenet-a0.25-32-none/metrics.json"
    before = (meta.stat().st_mtime_ns, metrics.stat().st_mtime_ns)
    assert cli.main(["all", "--source", str(images), "--set", "data.shard_size=8", *_args(tmp_path)]) == 0
    assert (meta.stat().st_mtime_ns, metrics.stat().st_mtime_ns) == before
    assert cli.main(["phase2", "--force", *_args(tmp_path)]) == 0
    assert metrics.stat().st_mtime_ns != before[1]


def test_phase2_runs_without_tensorflow(finished_run):
    """Phases 2 and 5 read arrays and draw: run.py must not import TensorFlow for them (it cost a CIFAR-10 phase 2
    4 s and 420 MB, BENCHMARKS 18). Here TensorFlow and Keras cannot be imported at all, grids included."""
    tmp_path, _ = finished_run
    done = run_cli_without_tensorflow(["phase2", "--force", *_args(tmp_path)])
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "runs/t/eval/mobilenet-a0.25-32-none/metrics.json").read_text())
    assert metrics["grids"] and all((tmp_path / "reports/t/img/mobilenet-a0.25-32-none" / g["file"]).is_file()
                                    for g in metrics["grids"])


def test_random_weights_are_seeded_and_recorded(finished_run):
    tmp_path, _ = finished_run
    meta = json.loads((tmp_path / "runs/t/embeddings/mobilenet-a0.25-32-none/meta.json").read_text())
    assert meta["weights_loaded"] == "random" and meta["init_seed"] == 0


def test_a_garbage_weights_file_is_one_line_and_saves_nothing(finished_run, capsys):
    tmp_path, _ = finished_run
    bad = tmp_path / "bad.h5"
    bad.write_text("x\n")
    saved = tmp_path / "runs/t/config.yaml"
    before = saved.read_bytes()
    assert cli.main(["phase1", *_args(tmp_path), "--weights", str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: weights file") and "cannot be loaded" in err[-1]
    assert saved.read_bytes() == before, "the rejected weights are not saved as the run's setting"


def test_interrupted_extraction_resumes_from_finished_shards(tmp_path, monkeypatch):
    import pipeline.data.tfrecords as data

    images = make_class_folder(tmp_path / "images", n_classes=3, per_class=8)
    assert cli.main(["phase0", "--source", str(images), "--set", "data.shard_size=4", *_args(tmp_path)]) == 0
    real = data.image_dataset
    calls = []

    def failing(shards, *a, **k):
        calls.append(shards)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C during the third shard
        return real(shards, *a, **k)

    monkeypatch.setattr(data, "image_dataset", failing)
    assert cli.main(["phase1", *_args(tmp_path)]) == 130
    out = tmp_path / "runs/t/embeddings/mobilenet-a0.25-32-none"
    assert not (out / "meta.json").exists() and len(list((out / "parts").glob("*.npz"))) == 2
    calls.clear()
    monkeypatch.setattr(data, "image_dataset", lambda shards, *a, **k: (calls.append(shards), real(shards, *a, **k))[1])
    assert cli.main(["phase1", *_args(tmp_path)]) == 0
    total_shards = len(list((tmp_path / "tfrecords/tiny").glob("*.tfrecord")))
    assert len(calls) == total_shards - 2, "finished shards are not extracted again"
    assert np.load(out / "embeddings.npy").shape[0] == 24


def test_phase_without_its_input_fails_clearly(tmp_path, capsys):
    assert cli.main(["phase1", *_args(tmp_path)]) == 1
    assert "run `python run.py phase0` first" in capsys.readouterr().err


def test_empty_folder_is_a_clear_nonzero_exit(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["phase0", "--source", str(tmp_path / "empty"), *_args(tmp_path)]) == 1
    assert "error:" in capsys.readouterr().err


def test_bad_override_exits_2(tmp_path, capsys):
    assert cli.main(["phase2", "--set", "evaluate.k=zero", *_args(tmp_path)]) == 2


@pytest.mark.shared
def test_real_weights_on_a_flowers_subset(tmp_path, monkeypatch):
    """MobileNet 0.25 with real ImageNet weights beats random weights on unseen flower classes."""
    flowers = shared_path("data", "flowers102")
    home = shared_path("keras")
    import models.backbones.weights as bw
    monkeypatch.setattr(bw, "keras_cache_dirs", lambda: [home / "models"])
    # 8 classes (4 train, 4 unseen test) × 12 images keeps this under a minute on 2 cores.
    subset = tmp_path / "flowers"
    for folder in sorted(flowers.iterdir())[:8]:
        (subset / folder.name).mkdir(parents=True)
        for f in sorted(folder.iterdir())[:12]:
            (subset / folder.name / f.name).symlink_to(f)
    results = {}
    for weights in ("imagenet", "none"):
        args = _args(tmp_path, "--set", "data.split=classes", "--set", "data.class_order=sorted",
                     "--set", "data.ratios=0.5,0.0,0.5", "--set", "evaluate.projections=pca",
                     "--set", "extract.backbones.0.image_size=128")
        args[1] = f"flowers-{weights}"
        assert cli.main(["all", "--source", str(subset), "--weights", weights, *args]) == 0
        tag = f"mobilenet-a0.25-128-{weights}"
        results[weights] = json.loads((tmp_path / f"runs/flowers-{weights}/eval/{tag}/metrics.json").read_text())
    pretrained, random = (results[w]["retrieval"]["unit/cosine"] for w in ("imagenet", "none"))
    assert results["imagenet"]["backbone"]["weights_loaded"] == "imagenet"
    assert pretrained["n_queries"] == 48
    assert pretrained["MAP@R"] > random["MAP@R"] + 0.1
    assert pretrained["P@1"] > 0.6


def test_mixed_precision_extraction_matches_float32(finished_run):
    """--mixed-precision (mixed_float16) gives float32 unit vectors close to a float32 run of the same weights."""
    import keras

    tmp_path, _ = finished_run
    weights = tmp_path / "resnet_random.weights.h5"
    keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(weights)
    embeddings = {}
    for run_name, extra in (("fp32", []), ("mp", ["--mixed-precision"])):
        args = _args(tmp_path, "--backbone", "resnet50", "--weights", str(weights), "--image-size", "32", *extra)
        args[1] = run_name
        assert cli.main(["phase1", *args]) == 0
        out = tmp_path / f"runs/{run_name}/embeddings/resnet50-32-custom"
        assert json.loads((out / "meta.json").read_text())["mixed_precision"] is bool(extra)
        embeddings[run_name] = np.load(out / "embeddings.npy")
    half, full = embeddings["mp"], embeddings["fp32"]
    assert half.dtype == np.float32 and np.isfinite(half).all()
    cosine = np.sum(half * full, axis=1)
    assert cosine.min() > 0.99, cosine.min()
    assert keras.mixed_precision.global_policy().name == "float32", "the policy is restored after phase 1"


def test_random_fallback_is_redone_once_weights_arrive(tmp_path, monkeypatch):
    """A demo that ran from random weights must not be 'up to date' after the weights reach the cache."""
    import keras

    import models.backbones.weights as bw

    images = make_class_folder(tmp_path / "images", n_classes=3, per_class=6)
    cache = tmp_path / "keras_models"
    cache.mkdir()
    monkeypatch.setattr(bw, "keras_cache_dirs", lambda: [cache])
    monkeypatch.setattr(keras.utils, "get_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    args = _args(tmp_path, "--set", "extract.backbones.0.weights=imagenet",
                 "--set", "extract.backbones.0.weights_fallback=random")
    assert cli.main(["phase0", "--source", str(images), *args]) == 0
    assert cli.main(["phase1", *args]) == 0
    meta_path = tmp_path / "runs/t/embeddings/mobilenet-a0.25-32-imagenet/meta.json"
    assert json.loads(meta_path.read_text())["weights_loaded"].startswith("random")
    stamp = meta_path.stat().st_mtime_ns
    assert cli.main(["phase1", *args]) == 0
    assert meta_path.stat().st_mtime_ns == stamp, "still offline: nothing to redo"
    import keras
    keras.applications.MobileNet(alpha=0.25, include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(
        tmp_path / "w.weights.h5")
    (tmp_path / "w.weights.h5").rename(cache / "mobilenet_2_5_224_tf_no_top.h5")
    loaded = []  # the file's contents do not matter here, only that the cached file is now used
    monkeypatch.setattr(keras.Model, "load_weights", lambda self, p, *a, **k: loaded.append(p))
    assert cli.main(["phase1", *args]) == 0
    assert loaded and loaded[0].endswith("mobilenet_2_5_224_tf_no_top.h5")
    assert json.loads(meta_path.read_text())["weights_loaded"] == "imagenet"


def test_group_positives_from_a_csv_source_end_to_end(tmp_path):
    """Originals and their variants (a CSV 'group' column) through phases 0, 1 and 3 with --positives group."""
    from PIL import Image

    images = make_class_folder(tmp_path / "images", n_classes=3, per_class=6, size=32)
    rows = []
    for original in sorted(images.rglob("*.png")):
        group = f"{original.parent.name}/{original.stem}"
        rows.append((original, original.parent.name, group))
        # A variant of the original: mirrored, as a generated or edited copy would be.
        variant = original.with_name(original.stem + "_variant.png")
        Image.open(original).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(variant)
        rows.append((variant, original.parent.name, group))
    csv = tmp_path / "items.csv"
    csv.write_text("path,label,group\n" + "".join(f"{p},{label},{g}\n" for p, label, g in rows))
    args = ["--run", "g", "--set", f"runs_dir={tmp_path}/runs", "--set", f"reports_dir={tmp_path}/reports",
            "--set", f"data.tfrecords_dir={tmp_path}/tfrecords", "--set", "extract.backbones.0.alpha=0.25",
            "--set", "extract.backbones.0.image_size=32", "--set", "extract.backbones.0.weights=none",
            "--set", "train.embedding_dim=8", "--set", "train.n_classes_per_batch=4",
            "--set", "train.n_samples_per_class=2", "--set", "train.steps_per_epoch=2", "--set", "train.export=false"]
    assert cli.main(["phase0", "--source", str(csv), *args]) == 0
    manifest = pd.read_csv(next((tmp_path / "tfrecords").glob("*/manifest.csv")), keep_default_na=False)
    assert (manifest.groupby("group")["split"].nunique() == 1).all(), "a group never straddles splits"
    assert cli.main(["phase1", *args]) == 0
    assert cli.main(["phase3", "--positives", "group", "--loss", "triplet", "--epochs", "2", *args]) == 0
    summary = json.loads(next((tmp_path / "runs/g/train").glob("*/triplet/training.json")).read_text())
    assert summary["positives"] == "group"
    train_groups = manifest.loc[manifest["split"] == "train", "group"].nunique()
    assert summary["n_train_classes"] == train_groups
