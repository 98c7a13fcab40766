"""The pictures of the "Groups: originals and their versions" section (pipeline/vectors/groups.py computes the
numbers): closeness histograms, ROC curves, the originals × versions similarity matrix, 2-D projections with a
line from each original to its versions, and grids of the closest and the farthest versions.

Like plots.py, every function renders one PNG through canvas.save_figure (atomic) and returns its path.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib import colormaps
from matplotlib.lines import Line2D

from pipeline.reporting.canvas import DIFFERENT, NEUTRAL, SAME, new_figure, save_figure, short

if TYPE_CHECKING:  # annotations only
    from pipeline.config import EvaluateConfig
    from pipeline.vectors.groups import GroupEvaluation, SimilarityBlock

log = logging.getLogger("embedlab.evaluate")

# Whole groups are projected; t-SNE and UMAP beyond this many points add minutes and nothing a sample does not.
GROUP_PROJECTION_POINTS = 1000
# Rows (originals) of the closest / farthest grids.
GRID_ROWS = 6
_PANEL_NAMES = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}


def _colours(n: int) -> list:
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(max(n, 1))]


# --------------------------------------------------------------------------- projections


def start_group_projection(unit: np.ndarray, items, originals: np.ndarray, query_rows: np.ndarray,
                           settings: EvaluateConfig):
    """(rows projected, running projections, notes) for whole groups of the query split, or None when there is
    no group with a version there. Started before retrieval, like figures.start_projections, to run beside it."""
    from pipeline.vectors.groups import original_of, sample_groups, scored_versions
    from pipeline.vectors.projections import BackgroundProjections, plan_projections

    owner, _ = original_of(items["group"].to_numpy(str), originals)
    versions, own = scored_versions(owner, query_rows)
    if len(versions) == 0:
        return None
    rows = sample_groups(versions, own, min(GROUP_PROJECTION_POINTS, settings.projection_sample), seed=settings.seed)
    methods, skipped = plan_projections(list(settings.projections), len(rows),
                                        len(np.unique(items["label"].to_numpy()[rows])))
    notes = [f"groups: {name} not drawn: {why}" for name, why in skipped.items()]
    return rows, BackgroundProjections(unit[rows], methods, seed=settings.seed), notes


def plot_group_projections(projections: Mapping[str, np.ndarray], rows: np.ndarray, owner: Mapping[int, int],
                           class_of: np.ndarray, class_names: list[str], path: Path, title: str) -> Path:
    """One panel per method: originals as large stars, versions as dots, both coloured by class, a line from each
    original to each of its versions. `owner[row]` is a version's original's row; `class_of[i]` the class index
    of `rows[i]`."""
    colours = _colours(len(class_names))
    at = {int(row): i for i, row in enumerate(rows)}
    fig = new_figure(4.6 * len(projections) + 1.6, 4.8)
    axes = fig.subplots(1, len(projections), squeeze=False)[0]
    for ax, (method, points) in zip(axes, projections.items()):
        for i, row in enumerate(rows):
            if int(row) in owner and owner[int(row)] in at:
                j = at[owner[int(row)]]
                ax.plot([points[j, 0], points[i, 0]], [points[j, 1], points[i, 1]], color=colours[class_of[i]],
                        linewidth=0.6, alpha=0.55, zorder=1)
        is_original = np.array([int(row) not in owner for row in rows])
        for flag, marker, size in ((False, "o", 14), (True, "*", 90)):
            mine = is_original == flag
            ax.scatter(points[mine, 0], points[mine, 1], c=[colours[c] for c in class_of[mine]], marker=marker,
                       s=size, edgecolors="black" if flag else "none", linewidths=0.5, zorder=2 + flag)
        ax.set_title(_PANEL_NAMES.get(str(method).lower(), str(method)), fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    present = sorted(set(class_of.tolist()))
    handles = [Line2D([], [], marker="*", linestyle="", color="black", markersize=9, label="original"),
               Line2D([], [], marker="o", linestyle="", color=NEUTRAL, markersize=4, label="version")]
    handles += [Line2D([], [], marker="o", linestyle="", color=colours[c], markersize=5,
                       label=short(class_names[c], 18)) for c in present[:20]]
    fig.legend(handles=handles, loc="outside right center", fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


# --------------------------------------------------------------------------- closeness


def plot_closeness_histogram(versions_by_role: Mapping[str, np.ndarray], negatives: Mapping[str, np.ndarray],
                             path: Path, title: str) -> Path:
    """Densities of the cosine similarity of each version with its original (one step line per role) and of
    non-matching pairs (filled)."""
    every = [v for v in (*versions_by_role.values(), *negatives.values()) if len(v)]
    low, high = (min(float(np.min(v)) for v in every), max(float(np.max(v)) for v in every)) if every else (0, 1)
    bins = np.linspace(low, high + 1e-9, 41)
    fig = new_figure(7.2, 4.2)
    ax = fig.add_subplot()
    for (name, values), colour in zip(negatives.items(), ("#9ca3af", "#f4a582")):
        if len(values):
            ax.hist(values, bins=bins, density=True, alpha=0.55, color=colour, label=f"{name} (n = {len(values):,})")
    for (role, values), colour in zip(versions_by_role.items(), _colours(len(versions_by_role))):
        if len(values):
            ax.hist(values, bins=bins, density=True, histtype="step", linewidth=2, color=colour,
                    label=f"version ↔ its original: {role} (n = {len(values):,})")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density")
    ax.legend(fontsize=7, frameon=False)
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]], path: Path, title: str) -> Path:
    """ROC curves of "version of this original" vs a non-matching pair, the cosine as the score."""
    fig = new_figure(4.8, 4.6)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color=NEUTRAL, linestyle=":", linewidth=1, label="chance (AUC 0.5)")
    for (name, (fpr, tpr, auc)), colour in zip(curves.items(), (SAME, DIFFERENT)):
        ax.plot(fpr, tpr, color=colour, linewidth=1.8, label=f"vs {name}: AUC {auc:.3f}")
    ax.set_xlabel("false positive rate (non-matching pairs above the threshold)")
    ax.set_ylabel("true positive rate (versions above it)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def plot_block(block: SimilarityBlock, names: list[str], path: Path, title: str) -> Path:
    """The originals × versions cosine matrix; each original's own versions are the framed cells of its row."""
    fig = new_figure(max(5.0, 0.16 * block.matrix.shape[1] + 2.5), max(3.0, 0.3 * block.matrix.shape[0] + 1.6))
    ax = fig.add_subplot()
    image = ax.imshow(block.matrix, cmap="viridis", aspect="auto", interpolation="nearest")
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    bar.set_label("cosine similarity", fontsize=8)
    for row in range(block.matrix.shape[0]):
        columns = np.flatnonzero(block.column_owner == row)
        if len(columns):
            ax.add_patch(_frame(columns[0] - 0.5, row - 0.5, len(columns)))
    ax.set_yticks(np.arange(len(names)), [short(n, 22) for n in names], fontsize=6.5)
    ax.set_xticks([])
    ax.set_xlabel("versions, grouped by their original (framed: the row's own versions)", fontsize=8)
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def _frame(x: float, y: float, width: int):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), width, 1, fill=False, edgecolor="white", linewidth=1.4)


# --------------------------------------------------------------------------- everything of one evaluation


def draw_group_plots(plot_dir: Path, dataset_dir: Path, items, found: GroupEvaluation, projection,
                     splits: list[str], tag: str) -> tuple[dict, list, list[str]]:
    """({key: file}, [grid {title, file}], notes) of the section."""
    from pipeline.vectors.groups import roc_points

    plot_dir.mkdir(parents=True, exist_ok=True)
    roles = np.array([r or "unspecified" for r in items["role"].to_numpy(str)[found.versions]])
    cosine = found.closeness["cosine"]
    made = {}
    by_role = {role: cosine[roles == role] for role in sorted(set(roles))}
    negatives = {f"{name.replace('_', ' ')} pairs": found.negatives[name]["cosine"] for name in found.negatives}
    plot_closeness_histogram(by_role, negatives, plot_dir / "groups_closeness.png",
                             f"{tag}: how close each version is to its original")
    made["closeness"] = "groups_closeness.png"
    curves = {}
    for name in found.negatives:
        auc = found.metrics["closeness"]["auc"][name]["cosine"]["auc"]
        if not np.isnan(auc):
            curves[f"{name.replace('_', ' ')} pairs"] = (*roc_points(cosine, found.negatives[name]["cosine"]), auc)
    if curves:
        plot_roc(curves, plot_dir / "groups_roc.png", f"{tag}: version of this original, or not?")
        made["roc"] = "groups_roc.png"
    ids, names = items["id"].to_numpy(str), items["label_name"].to_numpy(str)
    block = found.block
    plot_block(block, [f"{names[r]}: {Path(ids[r]).stem}" for r in block.original_rows], plot_dir / "groups_matrix.png",
               f"{tag}: originals × versions (cosine, {len(block.original_rows)} originals)")
    made["matrix"] = "groups_matrix.png"
    notes: list[str] = []
    if projection is not None:
        rows, running, notes = projection
        drawn = {}
        for method, value in running.result().items():
            if isinstance(value, str):
                notes.append(f"groups: {method} not drawn: {value}")
            else:
                drawn[method] = value
        if drawn:
            owner = dict(zip(found.versions.tolist(), found.own_original.tolist()))
            class_names = sorted(set(names[rows]))
            class_of = np.array([class_names.index(n) for n in names[rows]])
            plot_group_projections(drawn, rows, owner, class_of, class_names, plot_dir / "groups_projections.png",
                                   f"{tag}: originals (★) joined to their versions ({len(rows)} points)")
            made["projections"] = "groups_projections.png"
    grids = _closest_and_farthest(plot_dir, dataset_dir, items, found, roles, splits, tag)
    return made, grids, notes


def _closest_and_farthest(plot_dir: Path, dataset_dir: Path, items, found: GroupEvaluation, roles: np.ndarray,
                          splits: list[str], tag: str) -> list[dict]:
    """Two grids of GRID_ROWS originals each, those whose versions are closest to them on average and those whose
    versions are farthest: every row the original, then its versions, closest first."""
    from pipeline.data.record_reader import list_shards, load_thumbnails
    from pipeline.reporting.neighbour_grid import plot_neighbour_grid

    from pipeline.vectors.groups import versions_of

    cosine = found.closeness["cosine"]
    rows_of = {o: rows[np.argsort(-cosine[rows], kind="stable")] for o, rows in versions_of(found.own_original).items()}
    originals = np.array(sorted(rows_of), dtype=np.int64)
    mean = np.array([cosine[rows_of[int(o)]].mean() for o in originals])
    order = originals[np.argsort(-mean, kind="stable")]
    n = min(GRID_ROWS, len(order))
    chosen = {"closest": order[:n], "farthest": order[::-1][:n]}
    ids, names = items["id"].to_numpy(str), items["label_name"].to_numpy(str)
    wanted = {ids[r] for picks in chosen.values() for o in picks for r in [o, *found.versions[rows_of[o]]]}
    images = load_thumbnails([p for split in splits for p in list_shards(dataset_dir, split)], wanted)
    grids = []
    for name, picks in chosen.items():
        file = f"groups_{name}.png"
        plot_neighbour_grid([images.get(ids[o]) for o in picks], [f"original · {names[o]}" for o in picks],
                            [[images.get(ids[found.versions[i]]) for i in rows_of[o]] for o in picks],
                            [[roles[i] for i in rows_of[o]] for o in picks],
                            [[float(cosine[i]) for i in rows_of[o]] for o in picks],
                            [[True] * len(rows_of[o]) for o in picks], plot_dir / file,
                            f"{tag}: originals whose versions are {name}", "cosine")
        grids.append({"title": f"The {n} originals whose versions are {name} to them on average: each row the "
                               "original, then its versions, closest first", "file": file})
    return grids
