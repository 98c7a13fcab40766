"""Phase 2 at scale (issue 13): one retrieval pass per distinct ranking (unit/euclidean read off unit/cosine after
a sampled check of the identity, its own pass where the check fails) and `evaluate.max_queries` (a seeded
class-stratified query sample, recorded in metrics.json and shown in the report). Synthetic embeddings, no images."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from pipeline.config import EvaluateConfig
from pipeline.core.artifacts import evaluation_fingerprint
from pipeline.core.errors import PhaseInputError
from pipeline.phases.evaluate import evaluate_backbone
from pipeline.reporting.report import render_report
from pipeline.vectors.retrieval import retrieve

TAG = "b"
# Test split: classes of 24, 24, 16 and 8 items; train split: 20 more items.
CLASS_SIZES = (24, 24, 16, 8)


def write_embeddings(root: Path, unit_length: bool = True) -> None:
    emb = root / "embeddings" / TAG
    emb.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = np.concatenate([np.repeat(np.arange(len(CLASS_SIZES)), CLASS_SIZES), rng.integers(0, 4, 20)])
    split = ["test"] * sum(CLASS_SIZES) + ["train"] * 20
    centres = rng.normal(size=(len(CLASS_SIZES), 8))
    raw = (centres[labels] + 0.9 * rng.normal(size=(len(labels), 8))) * rng.uniform(0.5, 3, (len(labels), 1))
    raw = raw.astype(np.float32)
    pd.DataFrame({"id": [f"i{n}" for n in range(len(labels))], "split": split, "label": labels,
                  "label_name": [f"c{v}" for v in labels], "path": "", "text": "", "group": ""}).to_csv(
        emb / "items.csv", index=False)
    np.save(emb / "features_raw.npy", raw)
    # Not unit length: what the identity check has to catch.
    np.save(emb / "embeddings.npy", raw / np.linalg.norm(raw, axis=1, keepdims=True) if unit_length else raw)
    (emb / "meta.json").write_text(json.dumps({
        "backbone": {"name": "mobilenet", "weights": "none"}, "weights_loaded": "random", "image_size": 32,
        "dim": 8, "fingerprint": "f", "created": "now"}))


def evaluate(root: Path, **settings) -> tuple[dict, Path]:
    run_dir = SimpleNamespace(config=SimpleNamespace(name="r"), embeddings_dir=lambda t: root / "embeddings" / t,
                              eval_dir=lambda t: root / "eval" / t, dataset_dir=root / "none")
    out = evaluate_backbone(run_dir, TAG, EvaluateConfig(projections=["pca"], grid_queries=0, kmeans=False,
                                                         **settings), force=True)
    return json.loads((out / "metrics.json").read_text()), out


def report_html(root: Path, metrics: dict) -> str:
    path = render_report(root / "report", {"run": "r", "backbones": [{"tag": TAG, "metrics": metrics}]})
    return path.read_text(encoding="utf-8")


def written_embeddings(root: Path):
    emb = root / "embeddings" / TAG
    items = pd.read_csv(emb / "items.csv")
    test = np.flatnonzero(items["split"].to_numpy() == "test")
    return items, test, np.load(emb / "embeddings.npy")


def test_unit_euclidean_is_read_off_unit_cosine(tmp_path):
    write_embeddings(tmp_path)
    metrics, out = evaluate(tmp_path)
    retrieval = metrics["retrieval"]
    assert list(retrieval) == ["unit/cosine", "unit/euclidean", "raw/euclidean"]
    assert retrieval["unit/euclidean"] == retrieval["unit/cosine"]
    identity = metrics["unit_identity"]
    n_queries = sum(CLASS_SIZES)
    assert identity["holds"] and identity["unit_euclidean"] == "read off unit/cosine"
    assert identity["n_sampled"] == n_queries == identity["n_identical"]        # all 72 fit the sample of 500
    assert metrics["rankings_identical_unit"] is True and metrics["topk_agreement_unit"] == 1.0

    # The written unit/euclidean neighbours are those of a real euclidean pass, distances within float rounding.
    items, test, unit = written_embeddings(tmp_path)
    real = retrieve(unit[test], items["label"][test], unit[test], items["label"][test], metric="euclidean", k=5,
                    exclude=np.arange(len(test)))
    table = pd.read_csv(out / "neighbours.csv")
    rows = table[table["variant"] == "unit/euclidean"]
    np.testing.assert_array_equal(rows["neighbour_id"].to_numpy(), items["id"].to_numpy()[test][real.neighbours]
                                  .reshape(-1))
    np.testing.assert_allclose(rows["score"].to_numpy(), real.neighbour_scores.reshape(-1), atol=2e-5)
    assert real.metrics == retrieval["unit/euclidean"]

    html = report_html(tmp_path, metrics)
    assert f"seeded sample of {n_queries} queries" in html and "comes from that sample" in html


def test_vectors_that_are_not_unit_length_get_their_own_pass_and_a_warning(tmp_path, caplog):
    write_embeddings(tmp_path, unit_length=False)
    with caplog.at_level(logging.WARNING, logger="embedlab.evaluate"):
        metrics, _ = evaluate(tmp_path)
    assert "unit/euclidean gets its own pass" in caplog.text
    identity = metrics["unit_identity"]
    assert identity["holds"] is False and identity["unit_euclidean"] == "computed"
    assert identity["n_consistent"] < identity["n_sampled"] and metrics["rankings_identical_unit"] is False
    items, test, unit = written_embeddings(tmp_path)
    real = retrieve(unit[test], items["label"][test], unit[test], items["label"][test], metric="euclidean", k=5,
                    exclude=np.arange(len(test)))
    assert metrics["retrieval"]["unit/euclidean"] == real.metrics
    assert metrics["retrieval"]["unit/euclidean"] != metrics["retrieval"]["unit/cosine"]
    html = report_html(tmp_path, metrics)
    assert "did not confirm it" in html and "own full pass" in html


def test_max_queries_draws_a_seeded_stratified_sample_and_says_so(tmp_path):
    write_embeddings(tmp_path)
    metrics, out = evaluate(tmp_path, max_queries=36)
    drawn = metrics["protocol"]["query_sample"]
    assert drawn == {"max_queries": 36, "n_available": 72, "n_sampled": 36, "method": "stratified by class",
                     "seed": 0, "n_classes": 4}
    assert metrics["protocol"]["n_queries"] == 36 and metrics["retrieval"]["unit/cosine"]["n_queries"] == 36
    # The gallery is never sampled: 72 items, minus the query itself.
    assert metrics["protocol"]["gallery_size"] == 72 == metrics["retrieval"]["raw/euclidean"]["gallery_size"]
    queries = [r["query_id"] for r in json.loads((out / "neighbours.json").read_text())]
    label_of = written_embeddings(tmp_path)[0].set_index("id")["label"]
    per_class = label_of[queries].value_counts().sort_index()
    assert per_class.tolist() == [size // 2 for size in CLASS_SIZES]          # proportional to the class sizes

    same, _ = evaluate(tmp_path, max_queries=36)
    assert same["retrieval"] == metrics["retrieval"]
    _, other_out = evaluate(tmp_path, max_queries=36, seed=1)
    assert [r["query_id"] for r in json.loads((other_out / "neighbours.json").read_text())] != queries

    html = report_html(tmp_path, metrics)
    assert "Queries: 36 of the 72 items of the query split" in html and "seed 0" in html

    everyone, _ = evaluate(tmp_path, max_queries=0)
    assert everyone["protocol"]["query_sample"] is None and everyone["protocol"]["n_queries"] == 72
    assert "Queries: " not in report_html(tmp_path, everyone)


def test_max_queries_enters_the_fingerprint_and_must_not_be_negative(tmp_path):
    meta = {"fingerprint": "f", "created": "now"}
    assert evaluation_fingerprint(meta, EvaluateConfig()) != evaluation_fingerprint(meta, EvaluateConfig(
        max_queries=10))
    write_embeddings(tmp_path)
    with pytest.raises(PhaseInputError, match="max_queries must be a non-negative integer"):
        evaluate(tmp_path, max_queries=-1)


def test_projections_start_once_retrieval_is_done(tmp_path, monkeypatch):
    """Scheduling (BENCHMARKS 18): the projection process starts after the last retrieval pass, not beside it."""
    import pipeline.reporting.figures as figures
    import pipeline.vectors.retrieval as retrieval
    import pipeline.vectors.unit_identity as unit_identity

    calls = []
    real_retrieve, real_start = retrieval.retrieve, figures.start_projections
    counted = lambda *a, **kw: calls.append("retrieve") or real_retrieve(*a, **kw)  # noqa: E731
    monkeypatch.setattr(retrieval, "retrieve", counted)
    monkeypatch.setattr(unit_identity, "retrieve", counted)   # the identity check's sampled euclidean pass
    monkeypatch.setattr(figures, "start_projections",
                        lambda *a, **kw: calls.append("projections") or real_start(*a, **kw))
    write_embeddings(tmp_path)
    evaluate(tmp_path)
    started = calls.index("projections")
    assert calls.count("projections") == 1
    assert calls[:started].count("retrieve") >= 3 and "retrieve" not in calls[started:]   # 2 passes + the check
