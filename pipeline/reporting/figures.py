"""The pictures of phases 2, 4 and 5: what to draw for one evaluation, at a cost that follows the data, and
copying them next to the reports.

The plot functions themselves are in plots.py; this module decides what is worth drawing (projections that
can say something at this sample size, neighbour grids no wider than the gallery) and on which items.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.core import atomic

if TYPE_CHECKING:  # annotations only: reporting does not depend on the config module
    from pipeline.config import EvaluateConfig

log = logging.getLogger("embedlab.evaluate")

# Variant -> how its neighbour grid is titled.
GRID_VARIANTS = {"unit/cosine": "cosine (unit vectors)", "raw/euclidean": "euclidean (raw pooled features)"}
# A grid row wider than this is unreadable on a page (and `--k 1000` once drew 137,670 px wide PNGs):
# the grids show the first neighbours, the metrics still use the real k.
MAX_GRID_COLUMNS = 10
MAX_GRID_ROWS = 20
# t-SNE and UMAP beyond this many points take minutes and show nothing a sample does not.
MAX_PROJECTION_POINTS = 5000


def start_projections(unit: np.ndarray, labels: np.ndarray, query_rows: np.ndarray, settings: EvaluateConfig):
    """(the rows projected, the running projections, notes on what was skipped or shrunk).

    Started before retrieval so the projection process works while the main one ranks.
    """
    from pipeline.vectors.projections import BackgroundProjections, plan_projections, stratified_sample

    notes = []
    wanted = settings.projection_sample
    if wanted > MAX_PROJECTION_POINTS:
        notes.append(f"projection sample capped at {MAX_PROJECTION_POINTS:,} points (evaluate.projection_sample "
                     f"is {wanted:,})")
        wanted = MAX_PROJECTION_POINTS
    projection_rows = query_rows[stratified_sample(labels[query_rows], wanted, seed=settings.seed)]
    methods, skipped = plan_projections(list(settings.projections), len(projection_rows),
                                        len(np.unique(labels[projection_rows])))
    notes += [f"{name} not drawn: {why}" for name, why in skipped.items()]
    return projection_rows, BackgroundProjections(unit[projection_rows], methods, seed=settings.seed), notes


def grid_columns(k: int, neighbours: np.ndarray) -> int:
    """How many neighbours a grid row shows: k, but never more than any query has, nor MAX_GRID_COLUMNS."""
    found = int((np.asarray(neighbours) >= 0).sum(axis=1).max(initial=0))
    return max(1, min(int(k), found, MAX_GRID_COLUMNS))


def grid_queries(query_labels: np.ndarray, n: int, seed: int) -> list[int]:
    """Positions (in the query list) of the grid's queries: one per class first, so the grid shows the
    variety of the dataset."""
    rng = np.random.default_rng(seed)
    by_class: dict = {}
    for i in rng.permutation(len(query_labels)):
        by_class.setdefault(query_labels[i], int(i))
    return list(by_class.values())[: min(n, MAX_GRID_ROWS)]


def make_evaluation_plots(plot_dir: Path, dataset_dir: Path, items, unit, raw, query_rows, gallery_rows, results,
                          diagnostics, settings: EvaluateConfig, tag: str, projection_rows,
                          projections: dict) -> tuple[dict, list, list[str]]:
    """Draw every picture of one evaluation: ({key: file}, [grid {title, file}], notes for the report)."""
    from pipeline.reporting import plots as P
    from pipeline.vectors.projections import stratified_sample

    plot_dir.mkdir(parents=True, exist_ok=True)
    labels = items["label"].to_numpy()
    class_names = [name for _, name in sorted(dict(zip(items["label"], items["label_name"])).items())]
    label_index = {label: i for i, label in enumerate(sorted(set(items["label"])))}
    q_labels = np.array([label_index[v] for v in labels[query_rows]])
    made: dict[str, str] = {}
    notes: list[str] = []

    for name, value in list(projections.items()):
        if isinstance(value, str):
            log.warning("phase 2: %s projection skipped: %s", name, value)
            notes.append(f"{name} not drawn: {value}")
            del projections[name]
    if projections:
        p_labels = np.array([label_index[v] for v in labels[projection_rows]])
        P.plot_projections_grid(projections, p_labels, class_names,
                                f"{tag}: test embeddings ({len(projection_rows)} points)", plot_dir / "projections.png")
        made["projections"] = "projections.png"
    heat = stratified_sample(q_labels, settings.heatmap_sample, seed=settings.seed)
    P.plot_similarity_heatmap(unit[query_rows][heat], q_labels[heat], class_names, plot_dir / "heatmap.png",
                              f"{tag}: cosine similarity, sorted by class")
    made["heatmap"] = "heatmap.png"
    P.plot_pca_variance(diagnostics["unit"]["pca_explained_variance_ratio"], plot_dir / "pca_variance.png",
                        f"{tag}: PCA explained variance (unit vectors)")
    made["pca_variance"] = "pca_variance.png"
    P.plot_norm_histogram(np.linalg.norm(raw[gallery_rows], axis=1), plot_dir / "norms.png",
                          f"{tag}: norms of raw pooled features")
    made["norms"] = "norms.png"
    P.plot_k_occurrence(results["unit/cosine"].k_occurrence, plot_dir / "k_occurrence.png",
                        f"{tag}: k-occurrence (k={settings.k}), cosine")
    made["k_occurrence"] = "k_occurrence.png"

    grids = []
    if settings.grid_queries > 0:
        from pipeline.data.record_reader import list_shards, load_thumbnails

        chosen = grid_queries(q_labels, settings.grid_queries, settings.seed)
        columns = min(grid_columns(settings.k, results[v].neighbours[chosen]) for v in GRID_VARIANTS)
        if columns < settings.k:
            notes.append(f"the neighbour grids show the first {columns} neighbours of k = {settings.k}"
                         + (" (all the gallery holds)" if columns < MAX_GRID_COLUMNS else ""))
        wanted = {items["id"].iat[query_rows[i]] for i in chosen}
        for variant in GRID_VARIANTS:
            for n in results[variant].neighbours[chosen, :columns].reshape(-1):
                if n >= 0:
                    wanted.add(items["id"].iat[gallery_rows[n]])
        splits = sorted(set([settings.query_split, *settings.gallery_splits]))
        shards = [p for split in splits for p in list_shards(dataset_dir, split)]
        images = load_thumbnails(shards, wanted)
        grids = draw_neighbour_grids(plot_dir, tag, items, query_rows, gallery_rows, results, chosen, images,
                                     columns)
    return made, grids, notes


def draw_neighbour_grids(plot_dir: Path, tag: str, items, query_rows, gallery_rows, results, chosen: list[int],
                         images: dict, columns: int) -> list[dict]:
    """One grid per variant of GRID_VARIANTS: the chosen queries and their first `columns` neighbours."""
    from pipeline.reporting.neighbour_grid import plot_neighbour_grid

    ids = items["id"].to_numpy()
    names = items["label_name"].to_numpy()
    labels = items["label"].to_numpy()
    grids = []
    for variant, title in GRID_VARIANTS.items():
        result = results[variant]
        q_images, q_names, n_images, n_names, n_scores, correct = [], [], [], [], [], []
        for i in chosen:
            q = query_rows[i]
            q_images.append(images.get(ids[q]))
            q_names.append(names[q])
            row_images, row_names, row_scores, row_ok = [], [], [], []
            for n, score in zip(result.neighbours[i, :columns], result.neighbour_scores[i, :columns]):
                if n < 0:
                    row_images.append(None), row_names.append(None), row_scores.append(None), row_ok.append(None)
                    continue
                g = gallery_rows[n]
                row_images.append(images.get(ids[g]))
                row_names.append(names[g])
                row_scores.append(float(score))
                row_ok.append(bool(labels[g] == labels[q]))
            n_images.append(row_images), n_names.append(row_names)
            n_scores.append(row_scores), correct.append(row_ok)
        file = f"grid_{variant.replace('/', '_')}.png"
        plot_neighbour_grid(q_images, q_names, n_images, n_names, n_scores, correct, plot_dir / file,
                              f"{tag}: top-{columns} neighbours, {title}",
                              "cosine" if variant.endswith("cosine") else "distance")
        grids.append({"title": title, "file": file})
    return grids


def draw_text_query_grid(plot_dir: Path, dataset_dir: Path, items, text_rows, gallery_rows, neighbours,
                         scores, splits: list[str], tag: str, k: int) -> str:
    """Text → image: each chosen text (a row of `items`) and its first k images (gallery positions in
    `neighbours`), framed green when of the text's class; ★ marks the text's own image. Returns the file name."""
    from pipeline.data.record_reader import list_shards, load_thumbnails
    from pipeline.reporting.neighbour_grid import plot_neighbour_grid

    ids, names = items["id"].to_numpy(), items["label_name"].to_numpy()
    labels, texts = items["label"].to_numpy(), items["text"].to_numpy()
    columns = grid_columns(k, neighbours)
    wanted = {ids[gallery_rows[n]] for n in neighbours[:, :columns].reshape(-1) if n >= 0}
    images = load_thumbnails([p for split in splits for p in list_shards(dataset_dir, split)], wanted)
    n_images, n_names, n_scores, correct = [], [], [], []
    for q, row, row_scores in zip(text_rows, neighbours[:, :columns], scores[:, :columns]):
        cells = [(gallery_rows[n], float(s)) for n, s in zip(row, row_scores) if n >= 0]
        n_images.append([images.get(ids[g]) for g, _ in cells])
        n_names.append([("★ " if g == q else "") + str(names[g]) for g, _ in cells])
        n_scores.append([s for _, s in cells])
        correct.append([bool(labels[g] == labels[q]) for g, _ in cells])
    file = "grid_text_to_image.png"
    plot_dir.mkdir(parents=True, exist_ok=True)
    plot_neighbour_grid([None] * len(text_rows), [names[q] for q in text_rows], n_images, n_names, n_scores,
                        correct, plot_dir / file, f"{tag}: text → image, top-{columns} images", "cosine",
                        query_texts=[texts[q] for q in text_rows])
    return file


def report_section(tag: str, eval_dir: Path, metrics: dict, report_dir: Path) -> dict:
    """Copy a backbone's plots next to the report and point the template at them."""
    img_dir = report_dir / "img" / tag
    img_dir.mkdir(parents=True, exist_ok=True)

    def copy(name: str | None) -> str | None:
        if not name or not (eval_dir / "plots" / name).is_file():
            return None
        shutil.copy2(eval_dir / "plots" / name, img_dir / name)
        return f"img/{tag}/{name}"

    plots = {key: copy(name) for key, name in metrics.get("plots", {}).items()}
    grids = [{"title": g["title"], "path": copy(g["file"])} for g in metrics.get("grids", [])]
    text = metrics.get("text") or {}
    text_grid = copy(text.get("grid")) if isinstance(text, dict) else None
    groups = metrics.get("groups") if isinstance(metrics.get("groups"), dict) else {}
    group_images = {"plots": {key: copy(name) for key, name in (groups.get("plots") or {}).items()},
                    "grids": [{"title": g["title"], "path": copy(g["file"])} for g in groups.get("grids") or []]}
    return {"tag": tag, "metrics": metrics, "plots": plots, "grids": [g for g in grids if g["path"]],
            "text_grid": text_grid, "group_images": group_images}


def copy_model_pictures(models: list[dict], report_dir: Path) -> list[dict]:
    """Phase 5: each model's projections and cosine grid, copied next to the comparison report."""
    img = report_dir / "img" / "compare"
    img.mkdir(parents=True, exist_ok=True)
    pictures = []
    for m in models:
        entry = {"title": f"{m['backbone']} · {m['loss']}", "projections": None, "grid": None}
        for key, name in (("projections", "projections.png"), ("grid", "grid_unit_cosine.png")):
            source = m["eval_dir"] / "plots" / name
            if source.is_file():
                target = img / f"{m['eval_tag'].replace('+', '_')}_{name}"
                with atomic.atomic_path(target) as tmp:
                    shutil.copyfile(source, tmp)
                entry[key] = target.relative_to(report_dir).as_posix()
        pictures.append(entry)
    return pictures
