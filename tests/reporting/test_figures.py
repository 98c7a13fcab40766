"""Phase 2's pictures cost what the data can show (issue 9 items 8, 9), the report lists rejects and label
conflicts (item 11), and phase 2 says why there is nothing to score (item 12)."""
from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.config import EvaluateConfig
from pipeline.reporting.dataset_view import MAX_REJECTS_SHOWN, dataset_context
from pipeline.reporting.figures import MAX_GRID_COLUMNS, draw_neighbour_grids, grid_columns, start_projections
from pipeline.reporting.report import render_report
from pipeline.vectors.projections import MIN_POINTS_NEIGHBOUR_LAYOUT, plan_projections
from pipeline.vectors.retrieval import retrieve

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- item 8: grids capped by the gallery

def test_k_far_above_a_two_item_gallery_draws_a_small_grid(tmp_path):
    """`--k 1000` on a 2-item gallery drew two 137,670-px-wide blank PNGs in 315 s."""
    x = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    labels = np.array([0, 1])
    results = {v: retrieve(x, labels, x, labels, metric=m, k=1000, exclude=np.arange(2))
               for v, m in (("unit/cosine", "cosine"), ("raw/euclidean", "euclidean"))}
    assert results["unit/cosine"].neighbours.shape == (2, 1000)      # the metrics keep the real k
    columns = grid_columns(1000, results["unit/cosine"].neighbours)
    assert columns == 1                                              # leave-one-out: one other item
    items = pd.DataFrame({"id": ["a", "b"], "label": labels, "label_name": ["cat", "dog"]})
    images = {i: np.full((16, 16, 3), 90 * n, dtype=np.uint8) for n, i in enumerate(["a", "b"])}
    started = time.perf_counter()
    grids = draw_neighbour_grids(tmp_path, "t", items, np.arange(2), np.arange(2), results, [0, 1], images, columns)
    assert time.perf_counter() - started < 20
    for grid in grids:
        with Image.open(tmp_path / grid["file"]) as img:
            assert img.width < 600, img.size


def test_grid_columns_never_exceed_the_sane_maximum():
    neighbours = np.tile(np.arange(500), (3, 1))
    assert grid_columns(1000, neighbours) == MAX_GRID_COLUMNS
    assert grid_columns(5, neighbours) == 5
    assert grid_columns(5, np.full((2, 5), -1)) == 1


def test_the_grid_plot_itself_drops_blank_trailing_columns(tmp_path):
    from pipeline.reporting.neighbour_grid import plot_neighbour_grid

    thumb = np.zeros((8, 8, 3), dtype=np.uint8)
    blank = [None] * 998
    path = plot_neighbour_grid([thumb], ["a"], [[thumb, thumb] + blank], [["a", "b"] + blank],
                               [[0.9, 0.1] + blank], [[True, False] + blank], tmp_path / "g.png", "t")
    with Image.open(path) as img:
        assert img.width < 600, img.size


# --------------------------------------------------------------------------- item 9: projections that can say something

def test_neighbour_layouts_are_skipped_on_tiny_or_one_class_samples():
    run, skipped = plan_projections(["pca", "tsne", "umap"], 11, 4)
    assert run == ["pca"] and set(skipped) == {"t-SNE", "UMAP"}
    assert "only 11 points" in skipped["t-SNE"]
    run, skipped = plan_projections(["pca", "tsne"], 500, 1)
    assert run == ["pca"] and "class" in skipped["t-SNE"]
    run, skipped = plan_projections(["pca", "tsne", "umap"], MIN_POINTS_NEIGHBOUR_LAYOUT, 3)
    assert run == ["pca", "tsne", "umap"] and not skipped
    assert plan_projections(["pca"], 3, 2)[0] == []


def test_start_projections_reports_what_it_skipped():
    unit = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    labels = np.repeat(np.arange(4), 10)
    rows, projections, notes = start_projections(unit, labels, np.arange(11), EvaluateConfig())
    assert len(rows) == 11 and list(projections.result()) == ["PCA"]
    assert any(n.startswith("t-SNE not drawn") for n in notes) and any(n.startswith("UMAP not drawn") for n in notes)


def test_umap_is_imported_without_tensorflow():
    code = ("import sys; from pipeline.vectors.projections import _import_umap; u = _import_umap(); "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'; assert u.UMAP")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=300)


# --------------------------------------------------------------------------- item 11: rejects and label conflicts

def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _dataset(tmp_path: Path, n_rejects: int) -> Path:
    folder = tmp_path / "tfrecords" / "d"
    folder.mkdir(parents=True)
    _write_csv(folder / "rejects.csv", ["path", "reason"],
               [[f"/src/bad_{i:03d}.txt", "not an image"] for i in range(n_rejects)])
    _write_csv(folder / "manifest.csv", ["id", "split", "label", "label_name", "path", "sha256"], [
        ["cat/a", "train", 0, "cat", "/src/cat/a.png", "h1"], ["dog/a", "train", 1, "dog", "/src/dog/a.png", "h1"],
        ["cat/b", "test", 0, "cat", "/src/cat/b.png", "h2"], ["cat/c", "test", 0, "cat", "/src/cat/c.png", "h2"],
    ])
    return folder


def test_report_lists_rejects_with_a_cap_and_a_link(tmp_path):
    folder = _dataset(tmp_path, MAX_REJECTS_SHOWN + 12)
    meta = {"name": "d", "n_rejects": MAX_REJECTS_SHOWN + 12,
            "duplicate_groups": [["cat/a", "dog/a"], ["cat/b", "cat/c"]],
            "conflicting_duplicates": [["cat/a", "dog/a"]]}
    report = tmp_path / "report"
    context = {"run": "r", "dataset": dataset_context(folder, meta, report), "backbones": []}
    html = render_report(report, context).read_text(encoding="utf-8")
    assert "/src/bad_000.txt" in html and "not an image" in html
    assert f"/src/bad_{MAX_REJECTS_SHOWN - 1:03d}.txt" in html and f"/src/bad_{MAX_REJECTS_SHOWN:03d}.txt" not in html
    assert "and 12 more" in html and 'href="rejects.csv"' in html
    assert (report / "rejects.csv").read_text() == (folder / "rejects.csv").read_text()
    assert "1 label conflict" in html and "/src/cat/a.png (cat), /src/dog/a.png (dog)" in html


def test_label_conflicts_of_an_older_dataset_are_computed_from_the_manifest(tmp_path):
    folder = _dataset(tmp_path, 0)
    context = dataset_context(folder, {"name": "d", "n_rejects": 0}, tmp_path / "report")
    assert context["label_conflicts"] == [[{"id": "cat/a", "path": "/src/cat/a.png", "label": "cat"},
                                           {"id": "dog/a", "path": "/src/dog/a.png", "label": "dog"}]]
    assert not (tmp_path / "report" / "rejects.csv").exists()


# --------------------------------------------------------------------------- item 12: nothing to score

def test_phase2_says_why_nothing_can_be_scored(tmp_path, caplog):
    """Every test class has a single image: no query has a positive, so there is no P@1 to print."""
    from pipeline.phases.evaluate import evaluate_backbone

    tag = "b"
    emb = tmp_path / "embeddings" / tag
    emb.mkdir(parents=True)
    rng = np.random.default_rng(0)
    split = ["train"] * 6 + ["test"] * 3
    label = [0, 0, 1, 1, 2, 2, 0, 1, 2]
    pd.DataFrame({"id": [f"i{n}" for n in range(9)], "split": split, "label": label,
                  "label_name": [f"c{v}" for v in label], "path": "", "text": "", "group": ""}).to_csv(
        emb / "items.csv", index=False)
    raw = rng.normal(size=(9, 8)).astype(np.float32)
    np.save(emb / "features_raw.npy", raw)
    np.save(emb / "embeddings.npy", raw / np.linalg.norm(raw, axis=1, keepdims=True))
    (emb / "meta.json").write_text(json.dumps({
        "backbone": {"name": "mobilenet", "weights": "none"}, "weights_loaded": "random", "image_size": 32,
        "dim": 8, "fingerprint": "f", "created": "now"}))
    run_dir = SimpleNamespace(config=SimpleNamespace(name="r"), embeddings_dir=lambda t: tmp_path / "embeddings" / t,
                              eval_dir=lambda t: tmp_path / "eval" / t, dataset_dir=tmp_path / "none")
    settings = EvaluateConfig(projections=["pca"], grid_queries=0)
    with caplog.at_level(logging.INFO, logger="embedlab.evaluate"):
        out = evaluate_backbone(run_dir, tag, settings, force=True)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["scoring_note"] == ("nothing to score: no query has a positive in the gallery: every test class "
                                       "has a single image")
    assert "every test class has a single image" in caplog.text and "nan" not in caplog.text.lower()
    html = render_report(tmp_path / "report", {"run": "r", "backbones": [{"tag": tag, "metrics": metrics}]}) \
        .read_text(encoding="utf-8")
    assert "Nothing to score: no query has a positive in the gallery: every test class has a single image." in html
    assert "P@1</th>" not in html
