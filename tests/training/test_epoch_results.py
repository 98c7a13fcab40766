"""Per-epoch retrieval results (train.epoch_results_top_k): the JSON records against a brute-force ranking."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.training.callbacks import EpochRetrievalResults, RetrievalValidation, retrieval_records


def brute_force_top_k(embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out cosine top-k by a full similarity matrix: score descending, ties by lower index."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    scores = unit.astype(np.float64) @ unit.T.astype(np.float64)
    ranked, ranked_scores = [], []
    for query, row in enumerate(scores):
        order = [j for j in np.lexsort((np.arange(len(row)), -row)) if j != query][:k]
        ranked.append(order)
        ranked_scores.append(row[order])
    return np.array(ranked), np.array(ranked_scores)


def _validated(embeddings: np.ndarray, labels: np.ndarray, k: int) -> RetrievalValidation:
    validator = RetrievalValidation(None, None, labels, embed=lambda: embeddings, k=k)
    validator.on_epoch_end(0, {"loss": 1.0})
    return validator


@pytest.mark.parametrize("k", [3, 40])
def test_epoch_results_are_the_brute_force_top_k(tmp_path, k):
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(30, 8)).astype(np.float32)
    embeddings[7] = embeddings[3] * 2.0          # a tie: the same direction, the lower index first
    labels = rng.integers(0, 4, 30)
    names = np.array(["cat", "dog", "eel", "fox"], dtype=object)[labels]
    ids = np.array([f"item-{i:02d}" for i in range(30)])
    callback = EpochRetrievalResults(_validated(embeddings, labels, k), tmp_path / "results", ids, names)
    callback.on_epoch_end(4, {"loss": 1.0})

    records = json.loads((tmp_path / "results/retrieval_results_epoch_05.json").read_text())
    expected, expected_scores = brute_force_top_k(embeddings, k)
    assert len(records) == 30
    for query, record in enumerate(records):
        assert set(record) == {"query_id", "query_label", "ranked_ids", "scores", "labels"}
        assert record["query_id"] == ids[query] and record["query_label"] == names[query]
        assert len(record["ranked_ids"]) == min(k, 29)   # leave-one-out: 29 candidates at most
        assert record["ranked_ids"] == ids[expected[query]].tolist()
        assert record["labels"] == names[expected[query]].tolist()
        np.testing.assert_allclose(record["scores"], expected_scores[query], atol=1e-5)
        assert all(a >= b for a, b in zip(record["scores"], record["scores"][1:]))
    assert records[3]["ranked_ids"][0] == "item-07" and records[7]["ranked_ids"][0] == "item-03"


def test_integer_labels_are_written_as_numbers_and_padding_is_dropped():
    neighbours = np.array([[1, -1], [0, -1]])
    scores = np.array([[0.5, np.nan], [0.5, np.nan]], dtype=np.float32)
    records = retrieval_records(np.array(["a", "b"]), np.array([3, 4]), neighbours, scores)
    assert records == [{"query_id": "a", "query_label": 3, "ranked_ids": ["b"], "scores": [0.5], "labels": [4]},
                       {"query_id": "b", "query_label": 4, "ranked_ids": ["a"], "scores": [0.5], "labels": [3]}]
    json.dumps(records)


def test_no_file_for_an_epoch_that_could_not_be_ranked(tmp_path):
    embeddings = np.full((4, 3), np.nan, dtype=np.float32)
    callback = EpochRetrievalResults(_validated(embeddings, np.array([0, 0, 1, 1]), 2), tmp_path, np.arange(4),
                                     np.array([0, 0, 1, 1]))
    callback.on_epoch_end(0, {"loss": 1.0})
    assert not any(tmp_path.iterdir())


def test_the_callback_runs_after_validation_and_before_the_backup_only_when_asked(tmp_path):
    from pipeline.config import TrainConfig
    from pipeline.training.callbacks import training_callbacks
    from pipeline.training.checkpoints import EpochBackup
    from pipeline.training.loop import Resume

    items = pd.DataFrame({"id": ["a", "b"], "label": [0, 1], "label_name": ["x", "y"]})
    resume = Resume(0, pd.DataFrame({"epoch": []}))
    validator = RetrievalValidation(None, None, np.array([0, 1]), embed=lambda: np.eye(2), k=5)
    on = training_callbacks(tmp_path, TrainConfig(epoch_results_top_k=5), validator, [], resume, val_items=items)
    kinds = [type(callback) for callback in on]
    assert kinds.index(RetrievalValidation) < kinds.index(EpochRetrievalResults) < kinds.index(EpochBackup)
    results = on[kinds.index(EpochRetrievalResults)]
    assert results.labels.tolist() == ["x", "y"] and results.folder == tmp_path / "results"
    off = training_callbacks(tmp_path, TrainConfig(), validator, [], resume, val_items=items)
    assert EpochRetrievalResults not in [type(callback) for callback in off]
