"""pipeline/core/artifacts.py: one reader/writer per artifact, the fingerprints, the one up-to-date rule."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.config import EvaluateConfig, ExtractConfig
from pipeline.core import artifacts
from pipeline.core.errors import PhaseInputError


def test_is_current_needs_the_record_and_the_same_fingerprint(tmp_path):
    meta = tmp_path / "meta.json"
    assert not artifacts.is_current(meta, "abc")
    meta.write_text("not json")
    assert not artifacts.is_current(meta, "abc")
    meta.write_text(json.dumps({"fingerprint": "abc"}))
    assert artifacts.is_current(meta, "abc") and not artifacts.is_current(meta, "abd")
    assert not artifacts.is_current(meta, None)


def test_trained_embeddings_fingerprint_is_a_hash_like_every_other():
    training = {"fingerprint": "f" * 16, "created": "2026-01-01T00:00:00+00:00"}
    fingerprint = artifacts.trained_embeddings_fingerprint(training, ExtractConfig())
    assert len(fingerprint) == 16 and all(c in "0123456789abcdef" for c in fingerprint)
    assert fingerprint != artifacts.trained_embeddings_fingerprint({**training, "created": "later"}, ExtractConfig())
    assert fingerprint != artifacts.trained_embeddings_fingerprint(training, ExtractConfig(dtype="float16"))


def test_dataset_settings_key_ignores_layout_but_not_the_split():
    from pipeline.config import DataConfig

    base = DataConfig(source="/data/x")
    key = artifacts.dataset_settings_key(base)
    assert key == artifacts.dataset_settings_key(DataConfig(source="/data/x", workers=3, shard_size=7,
                                                            tfrecords_dir="elsewhere"))
    assert key != artifacts.dataset_settings_key(DataConfig(source="/data/x", seed=7))
    assert key != artifacts.dataset_settings_key(DataConfig(source="/other/x"))
    # dataset.json records the same settings, so a folder's key can be checked from it.
    recorded = {"source": "/data/x", "split": "stratified", "class_order": "shuffled", "ratios": [0.7, 0.15, 0.15],
                "seed": 42, "label_from": "first", "max_side": 0, "limit_per_class": 0, "shard_size": 2048}
    assert artifacts.dataset_settings_key(recorded) == key


def _embedding_set(out, n=6, dim=4, dataset="d1"):
    out.mkdir(parents=True)
    items = pd.DataFrame({"row": range(n), "split": ["test"] * n, "id": [f"{i:03d}" for i in range(n)],
                          "label": [i % 2 for i in range(n)], "label_name": ["007", "008"] * (n // 2),
                          "path": [f"p{i}" for i in range(n)], "text": [""] * n, "group": [""] * n})
    raw = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    artifacts.write_embedding_artifacts(out, items, raw, unit, ExtractConfig())
    (out / "meta.json").write_text(json.dumps({"fingerprint": "e", "dataset_fingerprint": dataset}))
    return items, unit


def test_embedding_set_round_trip_keeps_text_columns_text(tmp_path):
    items, unit = _embedding_set(tmp_path / "emb")
    loaded, unit_back, raw, meta = artifacts.load_embeddings(tmp_path / "emb")
    assert loaded["id"].tolist() == items["id"].tolist() and loaded["label_name"].tolist()[0] == "007"
    assert loaded["group"].tolist() == [""] * len(items)
    np.testing.assert_allclose(unit_back, unit, atol=1e-6)
    vectors = json.loads((tmp_path / "emb/embeddings.json").read_text())
    assert len(vectors) == len(items) and vectors[0]["id"] == "000"
    features = artifacts.load_phase1_features(tmp_path / "emb")
    assert features["features"].shape == raw.shape


def test_embeddings_of_another_dataset_build_are_refused(tmp_path):
    _embedding_set(tmp_path / "emb", dataset="old-build")
    artifacts.load_embeddings(tmp_path / "emb", {"fingerprint": "old-build"})
    with pytest.raises(PhaseInputError, match=r"run `python run.py phase1 --run A` again"):
        artifacts.load_embeddings(tmp_path / "emb", {"fingerprint": "new-build", "name": "x"}, "A")
    with pytest.raises(PhaseInputError, match="phase1"):
        artifacts.load_phase1_features(tmp_path / "emb", {"fingerprint": "new-build"})


def test_missing_embeddings_name_the_phase_to_run(tmp_path):
    with pytest.raises(PhaseInputError, match="run `python run.py phase1` first"):
        artifacts.load_embeddings(tmp_path / "nothing")


def test_evaluation_fingerprint_follows_embeddings_and_settings():
    meta = {"fingerprint": "e", "created": "t"}
    base = artifacts.evaluation_fingerprint(meta, EvaluateConfig())
    assert base != artifacts.evaluation_fingerprint({**meta, "created": "t2"}, EvaluateConfig())
    assert base != artifacts.evaluation_fingerprint(meta, EvaluateConfig(k=10))


def test_phase4_embeddings_recorded_in_the_older_fingerprint_form_stay_current():
    """Folders written before fingerprints were hashed keep their phase-4 embeddings (no silent redo, no refusal)."""
    from types import SimpleNamespace

    training = {"fingerprint": "abc", "created": "2026-11-20T10:00:00+00:00"}
    extract = SimpleNamespace(dtype="float32", index="flat")
    legacy = "abc-2026-11-20T10:00:00+00:00-float32-flat"
    assert artifacts.trained_embeddings_match(legacy, training, extract)
    assert artifacts.trained_embeddings_match(artifacts.trained_embeddings_fingerprint(training, extract),
                                              training, extract)
    retrained = {**training, "created": "2026-11-21T10:00:00+00:00"}
    assert not artifacts.trained_embeddings_match(legacy, retrained, extract)
    assert not artifacts.trained_embeddings_match(None, training, extract)


def test_float16_embeddings_come_back_unit_length_so_the_unit_identity_holds(tmp_path):
    """float16 storage rounds unit vectors up to ~1e-4 off unit length; loaded, they are renormalised, so phase 2
    reads unit/euclidean off unit/cosine instead of failing its check and paying a second pass."""
    from pipeline.vectors.retrieval import retrieve
    from pipeline.vectors.unit_identity import check_unit_identity

    n, dim = 400, 64
    out = tmp_path / "emb"
    out.mkdir()
    items = pd.DataFrame({"row": range(n), "split": ["test"] * n, "id": [f"{i:03d}" for i in range(n)],
                          "label": [i % 4 for i in range(n)], "label_name": ["a", "b", "c", "d"] * (n // 4),
                          "path": [f"p{i}" for i in range(n)], "text": [""] * n, "group": [""] * n})
    raw = np.random.default_rng(1).normal(size=(n, dim)).astype(np.float32)
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    artifacts.write_embedding_artifacts(out, items, raw, unit, ExtractConfig(dtype="float16"))
    (out / "meta.json").write_text(json.dumps({"fingerprint": "e", "dataset_fingerprint": "d1"}))
    assert np.load(out / "embeddings.npy").dtype == np.float16
    stored = np.load(out / "embeddings.npy").astype(np.float32)
    labels = items["label"].to_numpy()
    everyone = np.arange(n)

    def identity(x):
        cosine = retrieve(x, labels, x, labels, k=5, exclude=everyone)
        return check_unit_identity(x, labels, x, labels, cosine, k=5, exclude=everyone, sample_size=n)

    assert not identity(stored).holds   # the stored values as they are: the check fails
    _, loaded, _, _ = artifacts.load_embeddings(out)
    assert loaded.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(loaded.astype(np.float64), axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(loaded, unit, atol=2e-3)
    assert identity(loaded).holds
