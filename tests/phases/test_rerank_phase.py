"""Phase 2 with `evaluate.rerank`: metrics.json's "rerank" and the report's "Category re-ranking" section, whose
reading follows from its own table. Synthetic embeddings, no images."""
from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from pipeline.config import ConfigError, EvaluateConfig, RunConfig, validate
from pipeline.phases.evaluate import evaluate_backbone
from pipeline.reporting.report import render_report

TAG = "b"


def write_embeddings(root: Path) -> None:
    emb = root / "embeddings" / TAG
    emb.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 20)
    centres = rng.normal(size=(4, 8))
    raw = (centres[labels] + 1.1 * rng.normal(size=(len(labels), 8))).astype(np.float32)
    pd.DataFrame({"id": [f"i{n}" for n in range(len(labels))], "split": "test", "label": labels,
                  "label_name": [f"c{v}" for v in labels], "path": "", "text": "", "group": ""}).to_csv(
        emb / "items.csv", index=False)
    np.save(emb / "features_raw.npy", raw)
    np.save(emb / "embeddings.npy", raw / np.linalg.norm(raw, axis=1, keepdims=True))
    (emb / "meta.json").write_text(json.dumps({
        "backbone": {"name": "mobilenet", "weights": "none"}, "weights_loaded": "random", "image_size": 32,
        "dim": 8, "fingerprint": "f", "created": "now"}))


def evaluate(root: Path, **settings) -> dict:
    run_dir = SimpleNamespace(config=SimpleNamespace(name="r"), embeddings_dir=lambda t: root / "embeddings" / t,
                              eval_dir=lambda t: root / "eval" / t, dataset_dir=root / "none")
    out = evaluate_backbone(run_dir, TAG, EvaluateConfig(projections=["pca"], grid_queries=0, kmeans=False,
                                                         **settings), force=True)
    return json.loads((out / "metrics.json").read_text())


def test_phase2_measures_reranking_and_the_report_reads_its_own_table(tmp_path):
    write_embeddings(tmp_path)
    metrics = evaluate(tmp_path, rerank=["filter", "boost"], rerank_boost=0.2, rerank_vote_k=5)
    rerank = metrics["rerank"]
    assert [r["mode"] for r in rerank["rows"]] == ["none", "filter", "boost"]
    assert rerank["rows"][0]["P@1"] == metrics["retrieval"]["unit/cosine"]["P@1"]
    assert rerank["rows"][2]["boost"] == 0.2 and rerank["vote_k"] == 5 and rerank["n_queries"] == 80
    assert "rerank" in metrics["timings_s"]

    html = render_report(tmp_path / "report", {"run": "r", "backbones": [{"tag": TAG, "metrics": metrics}]}
                         ).read_text(encoding="utf-8")
    assert "Category re-ranking" in html
    base, filtered = rerank["rows"][0]["P@1"], rerank["rows"][1]["P@1"]
    verb = "raises" if filtered > base + 0.0005 else "lowers" if filtered < base - 0.0005 else "leaves"
    assert re.search(rf"The filter {verb} P@1", html)
    assert f"right for {rerank['vote_accuracy']:.1%}" in html


def test_without_rerank_settings_there_is_no_section(tmp_path):
    write_embeddings(tmp_path)
    metrics = evaluate(tmp_path)
    assert "rerank" not in metrics
    html = render_report(tmp_path / "report", {"run": "r", "backbones": [{"tag": TAG, "metrics": metrics}]}
                         ).read_text(encoding="utf-8")
    assert "Category re-ranking" not in html


@pytest.mark.parametrize("field, value, message", [
    ("rerank", ["sort"], "unknown mode"), ("rerank_boost", 0.0, "rerank_boost"), ("rerank_vote_k", 0, "vote_k")])
def test_bad_rerank_settings_are_one_clear_error(field, value, message):
    config = RunConfig()
    setattr(config.evaluate, field, value)
    with pytest.raises(ConfigError, match=message):
        validate(config)
