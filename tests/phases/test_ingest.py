"""Phase 0 end to end: folders/manifests/built-ins -> shards, manifest, rejects, dataset.json."""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import shards as shards_module
from pipeline.data import validate as validate_module
from pipeline.data import sources
from pipeline.config import DataConfig, RunConfig
from pipeline.phases.ingest import run_ingest
from pipeline.core.artifacts import dataset_settings_key
from pipeline.core.errors import IngestError
from pipeline.data.schema import SPLITS

REPO = Path(__file__).resolve().parents[2]
SHARED_CLOTHING = Path(os.environ.get("EMBEDLAB_SHARED", REPO.parent / "shared")) / "data" / "clothing10"


# --------------------------------------------------------------------------- helpers


def pattern(seed: int, size=(12, 10)) -> np.ndarray:
    """A distinct, noisy image per seed, so pixel comparisons identify it."""
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def save(path: Path, array: np.ndarray, fmt: str = "PNG", **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt, **kwargs)
    return path


def make_folder(root: Path, classes=("cat", "dog", "eel"), per_class=6) -> dict[str, np.ndarray]:
    """PNG images under root/<class>/; returns {relative id: pixels}."""
    arrays = {}
    for c, name in enumerate(classes):
        for i in range(per_class):
            rel = f"{name}/{i:02d}.png"
            arrays[rel] = pattern(100 * c + i)
            save(root / rel, arrays[rel])
    return arrays


def config(source, tmp_path: Path, **data) -> RunConfig:
    data.setdefault("workers", 1)
    return RunConfig(data=DataConfig(source=str(source), tfrecords_dir=str(tmp_path / "tfr"), **data),
                     runs_dir=str(tmp_path / "runs"))


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_records(out: Path, split: str | None = None) -> list[dict]:
    import tensorflow as tf

    from pipeline.data.schema import parse

    names = sorted(p.name for p in out.glob("*.tfrecord") if split is None or p.name.startswith(split + "-"))
    records = []
    dataset = tf.data.TFRecordDataset([str(out / n) for n in names]).map(parse)
    for ex in dataset:
        rec = {k: (v.numpy().decode() if v.dtype == tf.string and k != "image" else v.numpy())
               for k, v in ex.items()}
        rec["pixels"] = tf.io.decode_image(ex["image"], channels=0, expand_animations=False).numpy()
        records.append(rec)
    return records


def shard_stats(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tfrecord")}


# --------------------------------------------------------------------------- folders, rejects


def test_bad_files_are_rejected_with_reasons_and_good_ones_ingested(tmp_path):
    root = tmp_path / "photos"
    arrays = make_folder(root, per_class=4)
    jpeg = io.BytesIO()
    Image.fromarray(pattern(7, (64, 64))).save(jpeg, format="JPEG")
    (root / "cat" / "empty.jpg").write_bytes(b"")
    (root / "cat" / "cut.jpg").write_bytes(jpeg.getvalue()[:300])
    (root / "dog" / "notes.jpg").write_text("this is text, not a picture\n")
    (root / "dog" / "readme.txt").write_text("hello\n")
    save(root / "loose.png", pattern(9))
    (root / "eel" / ".hidden.png").write_bytes(b"")           # hidden: not even listed
    save(root / "eel" / ".cache" / "thumb.png", pattern(10))  # hidden folder: skipped
    save(root / "EEL_UPPER" / "X.JPG", pattern(11), "JPEG")   # extension case does not matter

    out = run_ingest(config(root, tmp_path))
    rejects = {Path(r["path"]).relative_to(root.resolve()).as_posix(): r["reason"]
               for r in read_csv(out / "rejects.csv")}
    assert rejects == {
        "cat/empty.jpg": "empty file",
        "cat/cut.jpg": "truncated image",
        "dog/notes.jpg": "not an image",
        "dog/readme.txt": "unsupported file type (.txt)",
        "loose.png": "not in a class folder",
    }
    manifest = read_csv(out / "manifest.csv")
    assert sorted(r["id"] for r in manifest) == sorted([*arrays, "EEL_UPPER/X.JPG"])
    summary = json.loads((out / "dataset.json").read_text())
    assert summary["n_images"] == 13 and summary["n_rejects"] == 5
    assert summary["classes"] == ["EEL_UPPER", "cat", "dog", "eel"]
    assert summary["single_image_classes"] == ["EEL_UPPER"]


def test_label_from_parent_uses_the_image_folder(tmp_path):
    root = tmp_path / "cifar"
    for split_dir in ("train", "test"):
        for name in ("cat", "dog"):
            for i in range(3):
                save(root / split_dir / name / f"{i}.png", pattern(hash((split_dir, name, i)) % 1000))
    out = run_ingest(config(root, tmp_path, label_from="parent"))
    manifest = read_csv(out / "manifest.csv")
    assert {r["label_name"] for r in manifest} == {"cat", "dog"}
    assert all(r["label_name"] == r["id"].split("/")[1] for r in manifest)
    assert len(manifest) == 12


def test_round_trip_through_the_tfrecords(tmp_path):
    root = tmp_path / "data"
    arrays = make_folder(root, per_class=5)
    rows = [{"path": f"data/{rel}", "label": rel.split("/")[0], "text": f"caption {rel} ✓",
             "group": f"g{i // 2}", "id": f"item-{i:03d}"} for i, rel in enumerate(sorted(arrays))]
    manifest_path = tmp_path / "items.csv"
    with open(manifest_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "text", "group", "id"])
        writer.writeheader()
        writer.writerows(rows)

    cfg = config(manifest_path, tmp_path, shard_size=4)
    out = run_ingest(cfg)
    # Named after the manifest, keyed by the data settings (another seed or split: another folder).
    assert out == tmp_path / "tfr" / f"items-{dataset_settings_key(cfg.data)}"
    summary = json.loads((out / "dataset.json").read_text())
    classes = summary["classes"]
    records = read_records(out)
    assert len(records) == len(rows) == summary["n_images"]
    by_id = {r["id"]: r for r in rows}
    split_of = {r["id"]: r["split"] for r in read_csv(out / "manifest.csv")}
    for rec in records:
        row = by_id[rec["id"]]
        rel = row["path"].removeprefix("data/")
        np.testing.assert_array_equal(rec["pixels"], arrays[rel])
        assert classes[rec["label"]] == rec["label_name"] == row["label"]
        assert (rec["text"], rec["group"], rec["format"]) == (row["text"], row["group"], "png")
        assert (rec["height"], rec["width"]) == arrays[rel].shape[:2]
        assert Path(rec["path"]) == (tmp_path / row["path"]).resolve()
    # Shards: at most shard_size records, named by split, matching the manifest.
    for split in SPLITS:
        names = summary["shards"][split]
        in_split = read_records(out, split)
        assert sum(1 for s in split_of.values() if s == split) == len(in_split) == summary["totals"][split]
        assert all(split_of[r["id"]] == split for r in in_split)
        assert all(n.startswith(f"{split}-") and n.endswith(f"-of-{len(names):05d}.tfrecord") for n in names)
    import tensorflow as tf
    for path in out.glob("*.tfrecord"):
        assert sum(1 for _ in tf.data.TFRecordDataset(str(path))) <= 4
    # Groups (pairs of consecutive rows) share a split.
    for g in {r["group"] for r in rows}:
        assert len({split_of[r["id"]] for r in rows if r["group"] == g}) == 1


def test_manifest_order_matches_shard_order_and_columns(tmp_path):
    root = tmp_path / "imgs"
    make_folder(root, per_class=8)
    out = run_ingest(config(root, tmp_path, shard_size=5))
    with open(out / "manifest.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header == list(shards_module.MANIFEST_COLUMNS)
    manifest_ids = [r["id"] for r in read_csv(out / "manifest.csv")]
    record_ids = []
    summary = json.loads((out / "dataset.json").read_text())
    for split in SPLITS:
        for name in summary["shards"][split]:
            import tensorflow as tf
            from pipeline.data.schema import parse
            record_ids += [parse(x)["id"].numpy().decode() for x in tf.data.TFRecordDataset(str(out / name))]
    assert record_ids == manifest_ids
    # Shuffled within a split: classes are mixed, not one block per class.
    train_labels = [r["label_name"] for r in read_csv(out / "manifest.csv") if r["split"] == "train"]
    assert train_labels != sorted(train_labels)


# --------------------------------------------------------------------------- duplicates, determinism


def test_exact_duplicates_share_a_split_and_conflicts_are_reported(tmp_path):
    root = tmp_path / "dups"
    make_folder(root, per_class=10)
    for i in range(5):
        shutil.copy(root / "cat" / f"{i:02d}.png", root / "cat" / f"copy-{i}.png")
    shutil.copy(root / "dog" / "03.png", root / "eel" / "dog-lookalike.png")
    out = run_ingest(config(root, tmp_path))
    summary = json.loads((out / "dataset.json").read_text())
    split_of = {r["id"]: r["split"] for r in read_csv(out / "manifest.csv")}
    for i in range(5):
        assert [f"cat/{i:02d}.png", f"cat/copy-{i}.png"] in summary["duplicate_groups"]
        assert split_of[f"cat/{i:02d}.png"] == split_of[f"cat/copy-{i}.png"]
    assert summary["conflicting_duplicates"] == [["dog/03.png", "eel/dog-lookalike.png"]]
    assert split_of["dog/03.png"] == split_of["eel/dog-lookalike.png"]


def test_same_seed_same_dataset_and_worker_count_does_not_matter(tmp_path, monkeypatch):
    root = tmp_path / "src"
    make_folder(root, per_class=12)
    a = run_ingest(config(root, tmp_path / "a", seed=3, shard_size=7))
    monkeypatch.setattr(validate_module, "MIN_ITEMS_FOR_POOL", 1)  # exercise the process pool
    pools = []
    original_close = validate_module.Validator.close
    monkeypatch.setattr(validate_module.Validator, "close",
                        lambda self: (pools.append(self.executor), original_close(self))[1])
    b = run_ingest(config(root, tmp_path / "b", seed=3, shard_size=7, workers=2))
    assert len(pools) == 1 and pools[0] is not None
    c = run_ingest(config(root, tmp_path / "c", seed=4, shard_size=7))
    assert (a / "manifest.csv").read_bytes() == (b / "manifest.csv").read_bytes()
    assert sorted(p.name for p in a.glob("*.tfrecord")) == sorted(p.name for p in b.glob("*.tfrecord"))
    for p in a.glob("*.tfrecord"):
        assert p.read_bytes() == (b / p.name).read_bytes()
    assert (a / "manifest.csv").read_bytes() != (c / "manifest.csv").read_bytes()


def test_class_disjoint_sorted(tmp_path):
    root = tmp_path / "flowers"
    make_folder(root, classes=[f"{k:03d}_f" for k in range(1, 11)], per_class=2)
    out = run_ingest(config(root, tmp_path, split="classes", class_order="sorted", ratios=[0.5, 0.0, 0.5]))
    summary = json.loads((out / "dataset.json").read_text())
    train = {c for c, n in summary["counts"]["train"].items() if n}
    test = {c for c, n in summary["counts"]["test"].items() if n}
    assert train == {f"{k:03d}_f" for k in range(1, 6)} and test == {f"{k:03d}_f" for k in range(6, 11)}
    assert summary["totals"] == {"train": 10, "val": 0, "test": 10}
    assert summary["shards"]["val"] == []


def test_limit_per_class_samples_and_tops_up_after_rejects(tmp_path):
    root = tmp_path / "many"
    make_folder(root, classes=("a", "b"), per_class=10)
    for i in range(4):
        (root / "a" / f"broken-{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    cfg = config(root, tmp_path, limit_per_class=7, seed=1)
    out = run_ingest(cfg)
    manifest = read_csv(out / "manifest.csv")
    per_class = {c: sorted(r["id"] for r in manifest if r["label_name"] == c) for c in "ab"}
    assert len(per_class["a"]) == len(per_class["b"]) == 7
    assert not any("broken" in i for i in per_class["a"])
    # Some sampled images were broken, so the top-up from the shuffled order did run.
    assert any("broken" in r["path"] for r in read_csv(out / "rejects.csv"))
    again = run_ingest(config(root, tmp_path / "again", limit_per_class=7, seed=1))
    assert (again / "manifest.csv").read_bytes() == (out / "manifest.csv").read_bytes()
    other = run_ingest(config(root, tmp_path / "other", limit_per_class=7, seed=2))
    assert {r["id"] for r in read_csv(other / "manifest.csv")} != {r["id"] for r in manifest}


# --------------------------------------------------------------------------- errors


def test_manifest_with_wrong_columns_names_them(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\na.png,cat\n")
    with pytest.raises(IngestError) as info:
        run_ingest(config(bad, tmp_path))
    message = str(info.value)
    for word in ("path", "label", "file", "class", "required", "found"):
        assert word in message


def test_parquet_manifest_with_empty_label_and_missing_file(tmp_path):
    import pandas as pd

    save(tmp_path / "img" / "a.png", pattern(1))
    save(tmp_path / "img" / "b.png", pattern(2))
    pd.DataFrame({"path": ["img/a.png", "img/b.png", "img/nope.png"], "label": ["x", "", "x"]}).to_parquet(
        tmp_path / "list.parquet")
    out = run_ingest(config(tmp_path / "list.parquet", tmp_path))
    reasons = {Path(r["path"]).name: r["reason"] for r in read_csv(out / "rejects.csv")}
    assert reasons == {"b.png": "empty label", "nope.png": "file not found"}
    assert [r["id"] for r in read_csv(out / "manifest.csv")] == ["img/a.png"]


def test_empty_folder_and_all_corrupt_raise(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="no image files found"):
        run_ingest(config(tmp_path / "empty", tmp_path))
    (tmp_path / "junk" / "cat").mkdir(parents=True)
    (tmp_path / "junk" / "cat" / "a.jpg").write_bytes(b"")
    (tmp_path / "junk" / "cat" / "b.jpg").write_text("nope")
    with pytest.raises(IngestError, match="no valid image.*empty file"):
        run_ingest(config(tmp_path / "junk", tmp_path))
    with pytest.raises(IngestError, match="not found"):
        run_ingest(config(tmp_path / "does-not-exist", tmp_path))


# --------------------------------------------------------------------------- idempotency


def test_second_run_does_nothing_and_force_rebuilds(tmp_path, caplog):
    root = tmp_path / "idem"
    make_folder(root, per_class=6)
    cfg = config(root, tmp_path, shard_size=3)
    out = run_ingest(cfg)
    before = shard_stats(out)
    json_before = (out / "dataset.json").read_text()
    with caplog.at_level(logging.INFO, logger="embedlab.ingest"):
        assert run_ingest(cfg) == out
    assert "is up to date (use --force to rebuild)" in caplog.text
    assert shard_stats(out) == before and (out / "dataset.json").read_text() == json_before
    cfg.data.workers = 2  # not part of the fingerprint
    run_ingest(cfg)
    assert shard_stats(out) == before

    run_ingest(cfg, force=True)
    after = shard_stats(out)
    assert after.keys() == before.keys()
    assert all(after[name] != before[name] for name in before)


def test_changed_source_or_settings_rebuild_and_remove_stale_shards(tmp_path):
    root = tmp_path / "grow"
    make_folder(root, per_class=6)
    cfg = config(root, tmp_path, shard_size=2)
    out = run_ingest(cfg)
    many = set(shard_stats(out))
    assert len(many) > 3

    cfg.data.shard_size = 100
    run_ingest(cfg)
    assert set(shard_stats(out)) == {f"{s}-00000-of-00001.tfrecord" for s in SPLITS}

    save(root / "cat" / "new.png", pattern(555))
    before = shard_stats(out)
    run_ingest(cfg)
    assert shard_stats(out) != before
    assert "cat/new.png" in {r["id"] for r in read_csv(out / "manifest.csv")}

    # A missing shard also makes the dataset stale.
    next(out.glob("train-*.tfrecord")).unlink()
    run_ingest(cfg)
    assert len(list(out.glob("train-*.tfrecord"))) == 1


# --------------------------------------------------------------------------- real data


def _fashion_mnist_available() -> bool:
    return any(all((folder / f).is_file() for pair in sources.FASHION_MNIST_FILES for f in pair)
               for folder in sources.fashion_mnist_locations())


@pytest.mark.skipif(not _fashion_mnist_available(),
                    reason="no local Fashion-MNIST (apt-get install dataset-fashion-mnist)")
def test_builtin_fashion_mnist_smoke(tmp_path):
    out = run_ingest(config("fashion_mnist", tmp_path, limit_per_class=3))
    summary = json.loads((out / "dataset.json").read_text())
    assert summary["classes"] == sorted(sources.FASHION_MNIST_CLASSES)
    assert summary["n_images"] == 30 and summary["source_kind"] == "builtin"
    records = read_records(out)
    assert len(records) == 30
    assert all(r["pixels"].shape == (28, 28, 3) and r["id"].startswith("fashion_mnist-") for r in records)
    assert all(r["path"] == f"builtin:fashion_mnist/{int(r['id'].split('-')[1])}" for r in records)
    # Up to date without loading the arrays again.
    before = shard_stats(out)
    run_ingest(config("fashion_mnist", tmp_path, limit_per_class=3))
    assert shard_stats(out) == before


def test_idx_reader_rejects_garbage(tmp_path):
    good = tmp_path / "x-idx1-ubyte"
    good.write_bytes(bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + bytes([1, 2, 3]))
    assert sources.read_idx(good).tolist() == [1, 2, 3]
    short = tmp_path / "y-idx1-ubyte"
    short.write_bytes(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + bytes([1]))
    with pytest.raises(sources.SourceError, match="expected 5"):
        sources.read_idx(short)


@pytest.mark.shared
@pytest.mark.skipif(not SHARED_CLOTHING.is_dir(), reason="../shared/data/clothing10 not present")
def test_real_clothing10_subset(tmp_path):
    out = run_ingest(config(SHARED_CLOTHING, tmp_path, limit_per_class=5, max_side=64))
    summary = json.loads((out / "dataset.json").read_text())
    assert len(summary["classes"]) == 10 and summary["n_images"] == 50
    assert all(summary["counts"]["test"][c] >= 1 for c in summary["classes"])
    records = read_records(out, "test")
    assert all(max(r["pixels"].shape[:2]) == 64 and r["pixels"].shape[2] == 3 for r in records)


def test_broken_worker_pool_falls_back_to_this_process(tmp_path, monkeypatch, caplog):
    from concurrent.futures.process import BrokenProcessPool

    class DyingExecutor:
        """Yields two results, then reports its workers dead (as spawn does under `python -`)."""

        def __init__(self, *args, **kwargs):
            pass

        def map(self, fn, payloads, chunksize=1):
            for payload in list(payloads)[:2]:
                yield fn(payload)
            raise BrokenProcessPool("simulated")

        def shutdown(self, **kwargs):
            pass

    root = tmp_path / "src"
    make_folder(root, per_class=4)
    expected = run_ingest(config(root, tmp_path / "serial"))
    monkeypatch.setattr(validate_module, "MIN_ITEMS_FOR_POOL", 1)
    monkeypatch.setattr(validate_module, "ProcessPoolExecutor", DyingExecutor)
    with caplog.at_level(logging.WARNING, logger="embedlab.ingest"):
        out = run_ingest(config(root, tmp_path / "pool", workers=2))
    assert "worker processes failed" in caplog.text
    assert (out / "manifest.csv").read_bytes() == (expected / "manifest.csv").read_bytes()


def _write_idx(path: Path, array: np.ndarray) -> None:
    import gzip

    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_is_read_from_the_keras_cache_first(tmp_path, monkeypatch):
    folder = tmp_path / "keras" / "datasets" / "fashion-mnist"
    folder.mkdir(parents=True)
    train = np.stack([np.full((28, 28), 10 * i, np.uint8) for i in range(4)])
    test = np.stack([np.full((28, 28), 200 + i, np.uint8) for i in range(2)])
    _write_idx(folder / "train-images-idx3-ubyte.gz", train)
    _write_idx(folder / "train-labels-idx1-ubyte.gz", np.array([0, 1, 9, 1]))
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", test)
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.array([8, 0]))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))

    items = sources.load_builtin("fashion_mnist")
    assert [i.id for i in items] == [f"fashion_mnist-{k:06d}" for k in range(6)]
    assert [i.label_name for i in items] == ["T-shirt/top", "Trouser", "Ankle boot", "Trouser", "Bag", "T-shirt/top"]
    assert items[5].path == "builtin:fashion_mnist/5" and int(items[5].array[0, 0]) == 201

    out = run_ingest(config("fashion_mnist", tmp_path))
    by_id = {r["id"]: r for r in read_records(out)}
    assert len(by_id) == 6
    assert by_id["fashion_mnist-000004"]["label_name"] == "Bag"
    assert np.all(by_id["fashion_mnist-000004"]["pixels"] == 200)


def test_missing_builtins_explain_where_they_looked(tmp_path, monkeypatch):
    import types

    def offline():
        raise OSError("network unreachable")

    fake = types.SimpleNamespace(datasets=types.SimpleNamespace(
        fashion_mnist=types.SimpleNamespace(load_data=offline),
        cifar10=types.SimpleNamespace(load_data=offline)))
    monkeypatch.setitem(__import__("sys").modules, "keras", fake)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "nowhere"))
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    with pytest.raises(IngestError) as info:
        run_ingest(config("fashion_mnist", tmp_path))
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message and "network unreachable" in message
    assert str(tmp_path / "nowhere" / "datasets" / "fashion-mnist") in message
    with pytest.raises(IngestError, match="label_from: parent"):
        run_ingest(config("cifar10", tmp_path))


# --------------------------------------------------------------------------- messages (issue 9, items 10 and 12)


def test_reject_summary_keeps_every_reason_and_adds_up(tmp_path, caplog):
    root = tmp_path / "bad"
    make_folder(root, per_class=3)
    (root / "cat" / "empty.png").write_bytes(b"")
    (root / "cat" / "text.jpg").write_text("not a picture\n")
    (root / "dog" / "notes.txt").write_text("hello\n")
    (root / "dog" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    with caplog.at_level(logging.WARNING, logger="embedlab.ingest"):
        out = run_ingest(config(root, tmp_path))
    rejects = read_csv(out / "rejects.csv")
    line = next(r.getMessage() for r in caplog.records if "rejected" in r.getMessage())
    assert line.startswith(f"phase 0: {len(rejects)} rejected")
    for reason in {r["reason"] for r in rejects}:
        assert f"{reason}: " in line, (reason, line)

    from pipeline.phases.ingest import reject_reasons

    many = [(f"f{i}", f"reason {i % 7}") for i in range(20)] + [("g", "reason 0")]
    text = reject_reasons(many, shown=5)
    assert text.endswith("and 2 more reasons (5 files)")
    listed = [int(part.split(": ")[1]) for part in text.split(", and")[0].split(", ")]
    assert sum(listed) + 5 == len(many)


def test_splits_that_cannot_be_evaluated_are_warned_about(tmp_path, caplog):
    one_class = tmp_path / "one"
    make_folder(one_class, classes=("cat",), per_class=8)
    with caplog.at_level(logging.WARNING, logger="embedlab.ingest"):
        out = run_ingest(config(one_class, tmp_path / "a"))
    assert "only one class (cat)" in caplog.text
    assert any("only one class" in w for w in json.loads((out / "dataset.json").read_text())["warnings"])

    caplog.clear()
    tiny = tmp_path / "tiny"
    make_folder(tiny, classes=("cat", "dog"), per_class=8)  # 16 images: one test image per class
    with caplog.at_level(logging.WARNING, logger="embedlab.ingest"):
        run_ingest(config(tiny, tmp_path / "b"))
    assert "no test image has another image of its class in the gallery (test)" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="embedlab.ingest"):
        run_ingest(config(tiny, tmp_path / "c", ratios=[0.5, 0.0, 0.5]))
    assert "gallery" not in caplog.text, "4 test images per class can all be scored"
