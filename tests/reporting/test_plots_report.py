"""Phase-2 pictures and HTML report: projections, every plot function, and render_report."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.reporting import neighbour_grid, plots
from pipeline.vectors.projections import project_2d, stratified_sample
from pipeline.reporting.formatting import fmt
from pipeline.reporting.readings import diagnostics_reading
from pipeline.reporting.report import build_view, render_report

EVIL = "<b>x</b>"


def clustered(n_classes: int = 4, per_class: int = 15, dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * 4
    labels = np.repeat(np.arange(n_classes), per_class)
    x = centres[labels] + rng.normal(size=(len(labels), dim))
    return x.astype(np.float32), labels


def assert_png(path: Path) -> None:
    path = Path(path)
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.width > 50 and img.height > 50
        extrema = img.convert("RGB").getextrema()
    assert any(lo != hi for lo, hi in extrema), "image is a single colour"
    # The atomic writer must not leave its temporary sibling behind.
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".") and ".tmp" in p.name]


# --------------------------------------------------------------------------- projections

@pytest.fixture(scope="module")
def small_projections():
    x, labels = clustered()
    return {"PCA": project_2d(x, "pca", seed=0), "t-SNE": project_2d(x, "tsne", seed=0)}, labels


@pytest.mark.parametrize("method", ["PCA", "t-SNE"])
def test_project_2d_finite(small_projections, method):
    projections, labels = small_projections
    y = projections[method]
    assert y.shape == (len(labels), 2)
    assert y.dtype == np.float32
    assert np.all(np.isfinite(y))
    assert np.ptp(y, axis=0).min() > 0


def test_project_2d_pca_is_deterministic_and_separates():
    x, labels = clustered(n_classes=2, per_class=20)
    a = project_2d(x, "pca")
    b = project_2d(x.copy(), "pca")
    np.testing.assert_allclose(a, b)
    # The first component of two well-separated clusters splits them.
    first = a[:, 0]
    low, high = sorted([first[labels == 0], first[labels == 1]], key=np.mean)
    assert low.max() < high.min()


def test_project_2d_umap_small():
    x, labels = clustered(n_classes=4, per_class=25)
    y = project_2d(x, "umap", seed=0)
    assert y.shape == (100, 2) and y.dtype == np.float32
    assert np.all(np.isfinite(y))


@pytest.mark.parametrize("n", [0, 1, 3])
def test_project_2d_tiny_inputs(n):
    x = np.random.default_rng(0).normal(size=(n, 8))
    for method in ("pca", "tsne", "umap"):
        y = project_2d(x, method)
        assert y.shape == (n, 2) and np.all(np.isfinite(y))


def test_project_2d_rejects_bad_input():
    with pytest.raises(ValueError):
        project_2d(np.zeros((5, 3)), "lda")
    with pytest.raises(ValueError):
        project_2d(np.array([[np.nan, 1.0], [0.0, 1.0]]), "pca")


def test_stratified_sample_keeps_every_class_and_is_seeded():
    labels = np.array(["big"] * 500 + ["mid"] * 40 + ["small"] * 3 + ["one"] * 1)
    idx = stratified_sample(labels, 50, seed=1)
    assert len(idx) == 50 and len(set(idx.tolist())) == 50
    assert set(labels[idx]) == set(labels)
    assert np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(idx, stratified_sample(labels, 50, seed=1))
    assert not np.array_equal(idx, stratified_sample(labels, 50, seed=2))
    # Roughly proportional: the big class dominates.
    assert (labels[idx] == "big").sum() >= 40


def test_stratified_sample_edges():
    labels = np.repeat(np.arange(10), 5)
    np.testing.assert_array_equal(stratified_sample(labels, 50, seed=0), np.arange(50))
    np.testing.assert_array_equal(stratified_sample(labels, 80, seed=0), np.arange(50))
    few = stratified_sample(labels, 4, seed=0)
    assert len(few) == 4 and len(set(labels[few])) == 4
    assert len(stratified_sample(labels, 0, seed=0)) == 0


# --------------------------------------------------------------------------- plots

def test_plot_projection_and_grid(tmp_path, small_projections):
    projections, labels = small_projections
    names = ["T-shirt", "Trouser", EVIL, "Bag"]
    assert_png(plots.plot_projection(projections["PCA"], labels, names, "PCA", tmp_path / "p.png"))
    path = plots.plot_projections_grid({**projections, "UMAP": None}, labels, names, "grid", tmp_path / "g.png")
    assert path == tmp_path / "g.png"
    assert_png(path)


def test_plot_projection_many_classes(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.arange(300) % 25
    points = rng.normal(size=(300, 2)) + labels[:, None]
    assert_png(plots.plot_projection(points, labels, [f"c{i}" for i in range(25)], "25 classes", tmp_path / "p.png"))
    assert_png(plots.plot_projections_grid({"pca": points, "tsne": points[::-1]}, labels, None, "t",
                                           tmp_path / "sub" / "g.png"))


def test_plot_similarity_heatmap(tmp_path):
    x, labels = clustered(n_classes=3, per_class=10)
    order = np.random.default_rng(0).permutation(len(labels))
    assert_png(plots.plot_similarity_heatmap(x[order], labels[order], ["a", "b", "c"], tmp_path / "h.png", "sim"))


def test_plot_pca_variance(tmp_path):
    ratio = np.sort(np.random.default_rng(0).exponential(size=200))[::-1]
    ratio /= ratio.sum()
    assert_png(plots.plot_pca_variance(ratio, tmp_path / "v.png", "spectrum"))
    assert_png(plots.plot_pca_variance([0.5, 0.3, 0.2], tmp_path / "v3.png", "short"))


def test_plot_norm_histogram_and_k_occurrence(tmp_path):
    rng = np.random.default_rng(0)
    assert_png(plots.plot_norm_histogram(rng.gamma(5, 2, size=300), tmp_path / "n.png", "norms"))
    assert_png(plots.plot_norm_histogram(np.ones(50), tmp_path / "n1.png", "unit norms"))
    occurrence = rng.poisson(5, size=400)
    occurrence[:3] = [60, 45, 30]
    assert_png(plots.plot_k_occurrence(occurrence, tmp_path / "k.png", "hubness"))


def test_plot_neighbour_grid_mixed_sizes_and_gaps(tmp_path):
    rng = np.random.default_rng(0)
    colour = (rng.random((40, 60, 3)) * 255).astype(np.uint8)
    grey = (rng.random((28, 28)) * 255).astype(np.uint8)
    floats = rng.random((32, 32, 3))
    path = neighbour_grid.plot_neighbour_grid(
        [colour, grey, None],
        ["Trouser", EVIL, "Bag"],
        [[grey, colour, floats], [colour, None], []],
        [["Trouser", "Bag", "Trouser"], ["Bag", None], []],
        [[0.91, 0.85, float("nan")], [0.5, None], []],
        [[True, False, True], [False, None], []],
        tmp_path / "nn.png", "neighbours", "cosine",
    )
    assert_png(path)
    # Without explicit correctness flags the colours come from label equality.
    assert_png(neighbour_grid.plot_neighbour_grid([grey], ["a"], [[grey, grey]], [["a", "b"]], [[0.1, 0.2]], None,
                                         tmp_path / "nn2.png", "t", "distance"))


def test_plot_metric_bars(tmp_path):
    table = {
        "mobilenet · unit/cosine": {"P@1": 0.81, "MAP@R": 0.42, "ARI": -0.02},
        "mobilenet · raw/euclidean": {"P@1": 0.74, "MAP@R": float("nan"), "ARI": 0.3},
        "resnet · unit/cosine": {"P@1": 0.88, "ARI": 0.5},
    }
    assert_png(plots.plot_metric_bars(table, ["P@1", "MAP@R", "ARI"], tmp_path / "b.png", "compare"))


# --------------------------------------------------------------------------- report

def retrieval_row(p1: float, mapr: float) -> dict:
    return {"P@1": p1, "P@k": p1 - 0.05, "R@k": 0.0123, "mAP": 0.5, "MAP@R": mapr, "R-precision": 0.45,
            "n_queries_evaluated": 99, "n_queries_without_positive": 1}


def diagnostics(cos: float, dim: int = 256) -> dict:
    return {"n": 100, "dim": dim, "norm": {"mean": 1.0, "std": 0.0, "min": 1.0, "max": 1.0},
            "mean_pairwise_cosine": cos, "intra_class_cosine": 0.7, "inter_class_cosine": 0.2,
            "intra_inter_distance_ratio": 0.61, "effective_rank": 40.5, "components_for_90": 30,
            "components_for_99": 120, "hubness_skew": 1.7, "max_k_occurrence": 41,
            "pca_explained_variance_ratio": [0.123456789] * 8}


def backbone(tag: str, p1: float, mapr: float, per_class: bool = True) -> dict:
    metrics = {
        "backbone": {"tag": tag, "name": "mobilenet", "weights": "imagenet",
                     "weights_loaded": "random (imagenet weights unavailable)", "image_size": 128, "dim": 256,
                     "throughput_img_s": 612.3},
        "protocol": {"query_split": "test", "gallery_splits": ["test"], "leave_one_out": True,
                     "n_queries": 10500, "gallery_size": 10500, "k": 5},
        "retrieval": {"unit/cosine": retrieval_row(p1, mapr), "unit/euclidean": retrieval_row(p1, mapr),
                      "raw/euclidean": retrieval_row(p1 - 0.1, mapr - 0.07)},
        "rankings_identical_unit": True,
        "clustering": {"unit": {"NMI": 0.6543, "ARI": 0.4321}, "raw": {"NMI": 0.5, "ARI": float("nan")}},
        "diagnostics": {"unit": diagnostics(0.62), "raw": {**diagnostics(0.62), "norm": {
            "mean": 20.0, "std": 8.0, "min": 3.0, "max": 50.0}}},
        "timings_s": {"retrieval": 1.5, "diagnostics": 0.25, "plots": 3.0},
    }
    if per_class:
        metrics["per_class"] = [{"class": f"class {i}" if i else EVIL, "n_queries": 10 + i,
                                 "P@1": i / 30, "MAP@R": i / 25 if i != 7 else None} for i in range(25)]
    return {
        "tag": tag, "metrics": metrics,
        "plots": {"projections": f"img/{tag}/projections.png", "heatmap": f"img/{tag}/heatmap.png",
                  "pca_variance": None, "norms": f"img/{tag}/norms.png"},
        "grids": [{"title": "cosine (unit vectors)", "path": f"img/{tag}/grid_cosine.png"},
                  {"title": "euclidean (raw features)", "path": f"img/{tag}/grid_raw.png"}],
    }


def full_context() -> dict:
    return {
        "run": "demo", "created": "2026-11-22T15:00:00Z",
        "command": "python run.py all --config configs/demo.yaml && echo <script>alert(1)</script>",
        "dataset": {"name": "fashion_mnist", "source": "fashion_mnist", "split": "stratified",
                    "ratios": {"train": 0.8, "val": 0.05, "test": 0.15}, "seed": 0,
                    "classes": ["T-shirt", "Trouser", EVIL],
                    "counts": {"train": {"T-shirt": 5600, "Trouser": 5600, EVIL: 5600},
                               "test": {"T-shirt": 1050, "Trouser": 1050, EVIL: 1050}},
                    "totals": {"train": 16800, "test": 3150}, "n_images": 19950, "n_rejects": 2,
                    "single_image_classes": ["lonely"], "duplicate_groups": [["a.png", "b.png"], ["c.png", "d.png"]]},
        "comparison_plot": "img/metric_bars.png",
        "backbones": [backbone("mobilenet-a0.25-128-imagenet", 0.8123, 0.4567),
                      backbone("resnet50-224-none", 0.7012, 0.3345, per_class=False)],
        "definitions": True,
    }


def test_render_report_full_context(tmp_path):
    context = full_context()
    (tmp_path / "img").mkdir()
    plots.plot_metric_bars({"a": {"P@1": 0.5}, "b": {"P@1": 0.7}}, ["P@1"], tmp_path / "img" / "metric_bars.png", "c")
    path = render_report(tmp_path, context)
    assert path == tmp_path / "index.html"
    html = path.read_text(encoding="utf-8")

    # header and dataset
    assert "demo" in html and "2026-11-22T15:00:00Z" in html and "configs/demo.yaml" in html
    assert "16,800" in html and "lonely" in html and "a.png, b.png" in html
    # metric values, three decimals, actual k in the headers
    for text in ("0.812", "0.457", "0.701", "0.335", "0.654", "0.432", "0.012", "P@5", "R@5"):
        assert text in html, text
    assert "unit/cosine" in html and "raw/euclidean" in html and "unit/euclidean" in html
    assert "0.123" not in html, "the PCA spectrum list must not be printed"
    # the best of each comparison column is bold
    assert 'class="num best">0.812<' in html
    # the cosine/euclidean sentence with measured differences
    assert "2 − 2·cos" in html and "confirmed" in html
    assert "MAP@R 0.387 raw vs 0.457 unit/cosine (-0.070)" in html
    assert "P@1 0.712 raw vs 0.812 unit/cosine (-0.100)" in html
    # diagnostics reading
    assert "anisotropic" in html.lower() and "effective rank 40 of 256" in html
    # images by relative path; a None plot is simply left out
    for src in ("img/metric_bars.png", "img/mobilenet-a0.25-128-imagenet/projections.png",
                "img/mobilenet-a0.25-128-imagenet/grid_cosine.png", "img/resnet50-224-none/norms.png"):
        assert f'src="{src}"' in html, src
    assert "was not found" in html  # the fake plots do not exist on disk
    # per-class: 25 classes -> worst 10 and best 10, unknown score never among the worst
    assert "Worst 10 classes by MAP@R" in html and "Best 10 classes by MAP@R" in html
    # escaping of every user-supplied string
    assert EVIL not in html and "&lt;b&gt;x&lt;/b&gt;" in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    # offline: no external URLs at all
    assert not re.search(r"https?://", html)
    # definitions
    for name in ("MAP@R", "R-precision", "Musgrave", "Roy &amp; Vetterli", "hubness", "scikit-learn"):
        assert name in html, name
    # the weights warning
    assert "random (imagenet weights unavailable)" in html
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_render_report_missing_optional_keys(tmp_path):
    context = {"run": "bare", "backbones": [{"tag": "only", "metrics": {
        "retrieval": {"unit/cosine": {"P@1": None, "MAP@R": float("nan")}}}}]}
    html = render_report(tmp_path, context).read_text(encoding="utf-8")
    assert "bare" in html and "only" in html and "—" in html
    assert "Backbones compared" not in html
    assert "Metric definitions" in html

    html = render_report(tmp_path / "empty", {}).read_text(encoding="utf-8")
    assert "No backbone was evaluated" in html

    context = full_context()
    del context["dataset"]["counts"], context["dataset"]["totals"], context["comparison_plot"]
    for b in context["backbones"]:
        for key in ("diagnostics", "clustering", "rankings_identical_unit", "protocol", "timings_s"):
            del b["metrics"][key]
        del b["plots"], b["grids"]
    context["definitions"] = False
    html = render_report(tmp_path / "partial", context).read_text(encoding="utf-8")
    assert "P@k" in html and "did not record" in html and "Metric definitions" not in html
    assert not re.search(r"https?://", html)


def test_external_and_absolute_image_paths(tmp_path):
    context = full_context()
    context["comparison_plot"] = "https://example.com/x.png"
    context["backbones"][0]["plots"]["heatmap"] = str(tmp_path / "img" / "abs heat#1.png")
    html = render_report(tmp_path, context).read_text(encoding="utf-8")
    assert "example.com" not in html
    assert 'src="img/abs%20heat%231.png"' in html


def test_format_and_reading_helpers(tmp_path):
    assert fmt(None) == fmt(float("nan")) == fmt(np.float32("nan")) == "—"
    assert fmt(0.12345) == "0.123" and fmt(np.float64(2)) == "2.000" and fmt(10500) == "10,500"
    spread = diagnostics_reading({"mean_pairwise_cosine": 0.02, "effective_rank": 200, "dim": 256,
                                  "intra_inter_distance_ratio": 0.98, "hubness_skew": 0.2}, None)
    assert "spread out" in spread.lower() and "no class structure" in spread and "little hubness" in spread
    assert diagnostics_reading(None, None) == ""
    view = build_view(tmp_path, full_context())
    assert [r["variant"] for r in view["backbones"][0]["rows"]] == ["unit/cosine", "unit/euclidean", "raw/euclidean"]
    assert len(view["comparison"]["rows"]) == 6
    assert view["backbones"][0]["rows"][0]["cells"][0]["text"] == "0.812"


def test_collapsed_embeddings_are_reported_not_laid_out():
    """A collapsed model's vectors agree to float rounding; t-SNE's Barnes-Hut tree would
    recurse on them until the process segfaults, so they are refused with a message."""
    from pipeline.vectors.projections import project_all

    rng = np.random.default_rng(0)
    base = rng.normal(size=64)
    x = (base / np.linalg.norm(base) + rng.normal(scale=1e-9, size=(60, 64))).astype(np.float32)
    out = project_all(x, ["pca", "tsne", "umap"], seed=0)
    assert out["PCA"].shape == (60, 2)
    assert "collapsed" in out["t-SNE"] and "collapsed" in out["UMAP"]


def test_a_dead_projection_process_is_reported_without_rerunning_in_process():
    import concurrent.futures
    from concurrent.futures.process import BrokenProcessPool

    from pipeline.vectors.projections import BackgroundProjections

    x = np.random.default_rng(0).normal(size=(30, 8))
    background = BackgroundProjections(x, [])          # no worker started
    background._inline = (x, ["pca", "tsne", "umap"], 0)
    died = concurrent.futures.Future()
    died.set_exception(BrokenProcessPool("a child process terminated abruptly"))
    fitted = concurrent.futures.Future()
    fitted.set_result({"UMAP": np.zeros((30, 2))})
    background._futures = {"tsne": died, "umap": fitted}     # one process per method: one died, one did not
    out = background.result()
    assert list(out) == ["PCA", "t-SNE", "UMAP"]
    assert out["PCA"].shape == (30, 2) and out["UMAP"].shape == (30, 2)
    assert "projection process died" in out["t-SNE"] and "terminated abruptly" in out["t-SNE"]


def test_training_curves_draw_a_triplet_accuracy_panel_when_the_history_has_one(tmp_path):
    import matplotlib.image as mpimg
    import pandas as pd

    from pipeline.reporting.plots import plot_training_curves

    history = pd.DataFrame({"epoch": [0, 1, 2], "loss": [1.0, 0.8, 0.7], "val_P@1": [0.5, 0.6, 0.62],
                            "val_MAP@R": [0.2, 0.25, 0.3]})
    plain = mpimg.imread(plot_training_curves(history, tmp_path / "plain.png", "t"))
    history["val_triplet_accuracy"] = [0.8, 0.9, 0.95]
    with_triplets = mpimg.imread(plot_training_curves(history, tmp_path / "triplets.png", "t"))
    # One more panel of the same size: the figure is a third wider (4 panels instead of 3).
    assert with_triplets.shape[1] / plain.shape[1] == pytest.approx(4 / 3, rel=0.02)
    assert with_triplets.shape[0] == plain.shape[0]
