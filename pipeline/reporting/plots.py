"""Pictures of an embedding space for the reports (the neighbour grid is in neighbour_grid.py).

Every function renders one PNG, writes it atomically (canvas.save_figure: temporary
sibling, then os.replace) and returns its path, so a report never links to a
half-written image.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

# canvas selects the headless Agg backend before anything of matplotlib draws.
from pipeline.reporting.canvas import DIFFERENT, NEUTRAL
from pipeline.reporting.canvas import new_figure as _new_figure
from pipeline.reporting.canvas import save_figure as _save
from pipeline.reporting.canvas import short as _short
from pipeline.vectors.normalize import l2_normalize

MAX_LEGEND_CLASSES = 20

_PANEL_NAMES = {"pca": "PCA", "tsne": "t-SNE", "t-sne": "t-SNE", "umap": "UMAP"}


# --------------------------------------------------------------------------- helpers

def _encode_labels(labels: Any, class_names: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    """Integer class index per item plus the list of names those indices refer to."""
    labels = np.asarray(labels).ravel()
    if class_names is None:
        uniq, idx = np.unique(labels, return_inverse=True)
        return idx.ravel().astype(np.int64), [str(u) for u in uniq]
    names = [str(c) for c in class_names]
    if labels.size and np.issubdtype(labels.dtype, np.integer):
        idx = labels.astype(np.int64)
        # Labels outside the name list still get a colour of their own rather
        # than crashing the plot or being merged into a real class.
        if idx.min() < 0:
            names = names + ["?"]
            idx = np.where(idx < 0, len(names) - 1, idx)
        if idx.max() >= len(names):
            names = names + [str(i) for i in range(len(names), int(idx.max()) + 1)]
        return idx, names
    lookup = {name: i for i, name in enumerate(names)}
    idx = np.empty(len(labels), dtype=np.int64)
    for i, lab in enumerate(labels):
        key = str(lab)
        if key not in lookup:
            lookup[key] = len(names)
            names.append(key)
        idx[i] = lookup[key]
    return idx, names


def _palette(n: int) -> list[tuple]:
    if n <= 10:
        cmap = colormaps["tab10"]
        return [cmap(i) for i in range(n)]
    if n <= 20:
        cmap = colormaps["tab20"]
        # tab20 pairs a dark and a light shade of each hue; take all darks first
        # so the first ten classes are as distinct as tab10.
        order = list(range(0, 20, 2)) + list(range(1, 20, 2))
        return [cmap(order[i]) for i in range(n)]
    cmap = colormaps["turbo"]
    return [cmap(v) for v in np.linspace(0.05, 0.95, n)]


def _marker_size(n: int) -> float:
    return float(np.clip(4000.0 / max(n, 1), 2.0, 36.0))


def _scatter(ax, points: np.ndarray, idx: np.ndarray, colours: list[tuple]) -> None:
    points = np.asarray(points, dtype=np.float64)
    if len(points) == 0:
        ax.text(0.5, 0.5, "no points", ha="center", va="center", transform=ax.transAxes)
        return
    # Draw in a shuffled order: plotting class by class would bury the first
    # classes under the last ones wherever they overlap.
    order = np.random.default_rng(0).permutation(len(points))
    colour_array = np.asarray(colours)[idx[order]]
    ax.scatter(points[order, 0], points[order, 1], c=colour_array, s=_marker_size(len(points)),
               linewidths=0, alpha=0.8, rasterized=len(points) > 5000)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.2)


def _class_key(fig: Figure, axes, names: list[str], colours: list[tuple], present: np.ndarray) -> None:
    """A legend for up to 20 classes; beyond that a colour bar, since a legend would be unreadable."""
    if len(names) <= MAX_LEGEND_CLASSES:
        handles = [Line2D([], [], marker="o", linestyle="", markersize=6, color=colours[i],
                          label=_short(names[i], 28)) for i in range(len(names)) if present[i]]
        if handles:
            fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False,
                       title="class", title_fontsize=8)
        return
    cmap = ListedColormap(colours)
    norm = BoundaryNorm(np.arange(len(names) + 1) - 0.5, cmap.N)
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, fraction=0.04, pad=0.01)
    step = max(1, math.ceil(len(names) / 10))
    bar.set_ticks(np.arange(0, len(names), step))
    bar.set_label(f"class index ({len(names)} classes)", fontsize=8)
    bar.ax.tick_params(labelsize=7)


def _present(idx: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(idx, minlength=n_classes)[:n_classes] > 0


# --------------------------------------------------------------------------- projections

def plot_projection(points: np.ndarray, labels: Any, class_names: Sequence[str] | None,
                    title: str, path: str | Path) -> Path:
    """2-D scatter of `points` (n, 2) coloured by class."""
    idx, names = _encode_labels(labels, class_names)
    colours = _palette(len(names))
    fig = _new_figure(7.5, 6.0)
    ax = fig.add_subplot()
    _scatter(ax, points, idx, colours)
    ax.set_title(title, fontsize=11)
    _class_key(fig, ax, names, colours, _present(idx, len(names)))
    return _save(fig, path)


def plot_projections_grid(projections: Mapping[str, np.ndarray | None], labels: Any,
                          class_names: Sequence[str] | None, title: str, path: str | Path) -> Path:
    """One panel per projection method (in the mapping's order) and one shared legend."""
    idx, names = _encode_labels(labels, class_names)
    colours = _palette(len(names))
    items = list(projections.items()) or [("no projection", None)]
    fig = _new_figure(4.4 * len(items) + 1.8, 4.8)
    axes = fig.subplots(1, len(items), squeeze=False)[0]
    for ax, (method, pts) in zip(axes, items):
        ax.set_title(_PANEL_NAMES.get(str(method).lower(), str(method)), fontsize=10)
        if pts is None:
            ax.text(0.5, 0.5, "not available", ha="center", va="center", transform=ax.transAxes,
                    color=NEUTRAL)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        _scatter(ax, pts, idx, colours)
    fig.suptitle(title, fontsize=12)
    _class_key(fig, list(axes), names, colours, _present(idx, len(names)))
    return _save(fig, path)


# --------------------------------------------------------------------------- similarity

_MAX_HEATMAP = 3000


def plot_similarity_heatmap(x: np.ndarray, labels: Any, class_names: Sequence[str] | None,
                            path: str | Path, title: str) -> Path:
    """Cosine similarity of every pair in a sample, rows and columns grouped by class."""
    x = np.asarray(x, dtype=np.float64)
    idx, names = _encode_labels(labels, class_names)
    if len(x) > _MAX_HEATMAP:
        # An n x n image beyond a few thousand rows is larger than the figure
        # has pixels and costs memory quadratically; a stratified sample shows
        # the same block structure.
        from pipeline.vectors.projections import stratified_sample

        keep = stratified_sample(idx, _MAX_HEATMAP, seed=0)
        x, idx = x[keep], idx[keep]
    order = np.argsort(idx, kind="stable")
    x, idx = x[order], idx[order]
    unit = l2_normalize(x)
    sim = unit @ unit.T

    fig = _new_figure(7.6, 6.6)
    ax = fig.add_subplot()
    n = len(sim)
    if n == 0:
        ax.text(0.5, 0.5, "no vectors", ha="center", va="center", transform=ax.transAxes)
        return _save(fig, path)
    off_diag = sim[~np.eye(n, dtype=bool)] if n > 1 else sim.ravel()
    # Limits from the off-diagonal percentiles: the diagonal is always 1 and
    # would otherwise wash out the between-class contrast that matters.
    lo, hi = np.percentile(off_diag, [1, 99])
    if hi - lo < 1e-6:
        lo, hi = lo - 0.05, hi + 0.05
    image = ax.imshow(sim, cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    bar.set_label("cosine similarity", fontsize=8)
    bar.ax.tick_params(labelsize=7)

    counts = np.bincount(idx, minlength=len(names))
    edges = np.cumsum(counts)
    for edge in edges[:-1]:
        if 0 < edge < n:
            ax.axhline(edge - 0.5, color="white", linewidth=0.6)
            ax.axvline(edge - 0.5, color="white", linewidth=0.6)
    present = np.flatnonzero(counts)
    if len(present) <= 30:
        centres = edges[present] - counts[present] / 2.0 - 0.5
        tick_names = [_short(names[i], 18) for i in present]
        size = 7 if len(present) <= 15 else 5.5
        ax.set_xticks(centres, tick_names, rotation=90, fontsize=size)
        ax.set_yticks(centres, tick_names, fontsize=size)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"{len(present)} classes, grouped", fontsize=8)
    ax.tick_params(length=0)
    ax.set_title(f"{title}\n(n = {n}, sorted by class)", fontsize=10)
    return _save(fig, path)


# --------------------------------------------------------------------------- spectra and distributions

def plot_pca_variance(explained_ratio: Sequence[float], path: str | Path, title: str) -> Path:
    """Per-component explained variance (left axis) and its running total (right axis)."""
    ratio = np.asarray(explained_ratio, dtype=np.float64).ravel()
    ratio = ratio[np.isfinite(ratio)]
    fig = _new_figure(8.0, 4.6)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=11)
    if ratio.size == 0:
        ax.text(0.5, 0.5, "no spectrum", ha="center", va="center", transform=ax.transAxes)
        return _save(fig, path)
    comps = np.arange(1, ratio.size + 1)
    cumulative = np.cumsum(ratio)

    if ratio.size <= 64:
        ax.bar(comps, ratio, color="#4c78a8", width=0.85, label="per component")
    else:
        ax.fill_between(comps, ratio, step="mid", color="#4c78a8", alpha=0.6, label="per component")
    positive = ratio[ratio > 0]
    if positive.size and positive.max() / positive.min() > 100:
        # Spectra of embeddings span orders of magnitude; on a linear axis
        # everything after the first few components looks like zero.
        ax.set_yscale("log")
    ax.set_xlabel("principal component", fontsize=9)
    ax.set_ylabel("explained variance ratio", fontsize=9, color="#4c78a8")
    ax.tick_params(labelsize=8)
    if ratio.size > 64:
        ax.set_xscale("log")

    twin = ax.twinx()
    twin.plot(comps, cumulative, color="#e45756", linewidth=1.8, label="cumulative")
    twin.set_ylim(0, 1.02)
    twin.set_ylabel("cumulative", fontsize=9, color="#e45756")
    twin.tick_params(labelsize=8)
    for level, style in ((0.90, "--"), (0.99, ":")):
        reached = np.flatnonzero(cumulative >= level - 1e-9)
        where = f"{reached[0] + 1} components" if reached.size else "not reached"
        twin.axhline(level, color="#333333", linestyle=style, linewidth=0.9, label=f"{level:.0%}: {where}")
        if reached.size:
            twin.axvline(reached[0] + 1, color="#333333", linestyle=style, linewidth=0.6, alpha=0.6)
    # Legend below the axes: inside, it would sit on either the bars or the curve.
    fig.legend(loc="outside lower center", ncols=4, fontsize=8, frameon=False)
    return _save(fig, path)


def _stats_box(ax, lines: list[str]) -> None:
    ax.text(0.98, 0.97, "\n".join(lines), transform=ax.transAxes, ha="right", va="top", fontsize=8,
            multialignment="left", family="monospace",
            bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85, "edgecolor": "#cccccc"})


def plot_norm_histogram(norms: Sequence[float], path: str | Path, title: str) -> Path:
    """Histogram of vector L2 norms with mean and median marked."""
    norms = np.asarray(norms, dtype=np.float64).ravel()
    norms = norms[np.isfinite(norms)]
    fig = _new_figure(7.0, 4.2)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=11)
    if norms.size == 0:
        ax.text(0.5, 0.5, "no norms", ha="center", va="center", transform=ax.transAxes)
        return _save(fig, path)
    bins = int(np.clip(np.sqrt(norms.size), 10, 60))
    ax.hist(norms, bins=bins, color="#4c78a8", edgecolor="white", linewidth=0.4)
    ax.axvline(norms.mean(), color="#e45756", linewidth=1.4, label="mean")
    ax.axvline(np.median(norms), color="#333333", linestyle="--", linewidth=1.2, label="median")
    ax.set_xlabel("L2 norm", fontsize=9)
    ax.set_ylabel("vectors", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=8, loc="upper left", framealpha=0.85, edgecolor="#cccccc")
    _stats_box(ax, [f"n    {norms.size}", f"mean {norms.mean():.3g}", f"std  {norms.std():.3g}",
                    f"min  {norms.min():.3g}", f"max  {norms.max():.3g}"])
    return _save(fig, path)


def _skewness(values: np.ndarray) -> float:
    centred = values - values.mean()
    var = np.mean(centred ** 2)
    if var <= 0:
        return 0.0
    return float(np.mean(centred ** 3) / var ** 1.5)


def plot_k_occurrence(k_occurrence: Sequence[int], path: str | Path, title: str) -> Path:
    """How often each item appears in others' k-NN lists; a long right tail means hubs."""
    occ = np.asarray(k_occurrence, dtype=np.float64).ravel()
    occ = occ[np.isfinite(occ)]
    fig = _new_figure(7.0, 4.2)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=11)
    if occ.size == 0:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return _save(fig, path)
    top = occ.max()
    bins = np.arange(-0.5, top + 1.5, 1.0) if top <= 200 else 60
    ax.hist(occ, bins=bins, color="#72b7b2", edgecolor="white", linewidth=0.3)
    # Hubs are single items far out in the tail; a log count axis keeps them
    # visible next to the bulk.
    ax.set_yscale("log")
    ax.axvline(occ.mean(), color="#e45756", linewidth=1.2)
    ax.set_xlabel("k-occurrence (times an item is among another item's k nearest neighbours)",
                  fontsize=9)
    ax.set_ylabel("items (log)", fontsize=9)
    ax.tick_params(labelsize=8)
    # The tall bars sit on the left, so every label goes in the box on the right.
    _stats_box(ax, [f"skewness {_skewness(occ):.3f}", f"max      {int(top)}",
                    f"never    {np.mean(occ == 0):.1%}", f"mean     {occ.mean():.2f} (red; = k)"])
    return _save(fig, path)


# --------------------------------------------------------------------------- comparisons

def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def plot_metric_bars(table: Mapping[str, Mapping[str, float]], metrics: Sequence[str],
                     path: str | Path, title: str) -> Path:
    """Grouped bars: one group per metric, one bar per row of `table` (backbone, variant, ...)."""
    rows = list(table.keys())
    metrics = list(metrics)
    values = np.array([[_as_float(table[r].get(m)) for m in metrics] for r in rows], dtype=np.float64)
    width_in = float(np.clip(1.0 + len(metrics) * max(1.0, 0.35 * len(rows)), 6.0, 16.0))
    fig = _new_figure(width_in, 4.8)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=11)
    if not rows or not metrics:
        ax.text(0.5, 0.5, "nothing to compare", ha="center", va="center", transform=ax.transAxes)
        return _save(fig, path)

    colours = _palette(len(rows))
    bar_w = 0.8 / len(rows)
    centres = np.arange(len(metrics))
    annotate = len(rows) * len(metrics) <= 48
    for r, name in enumerate(rows):
        xs = centres - 0.4 + bar_w * (r + 0.5)
        heights = np.nan_to_num(values[r], nan=0.0)
        ax.bar(xs, heights, width=bar_w * 0.92, color=colours[r], label=_short(name, 64))
        if annotate:
            for x, v in zip(xs, values[r]):
                missing = bool(np.isnan(v))
                ax.annotate("n/a" if missing else f"{v:.3f}", (x, 0 if missing else max(v, 0)),
                            xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                            fontsize=6.5, color=NEUTRAL if missing else "#111111",
                            rotation=0 if missing or len(rows) <= 2 else 90)
    finite = values[np.isfinite(values)]
    upper = max(1.0, float(finite.max()) if finite.size else 1.0)
    lower = min(0.0, float(finite.min()) if finite.size else 0.0)
    # Headroom for the rotated value labels above the tallest bar.
    ax.set_ylim(lower * 1.1, upper * (1.18 if annotate else 1.05))
    ax.axhline(0, color="#333333", linewidth=0.6)
    ax.set_xticks(centres, metrics, fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(True, axis="y", alpha=0.25)
    ax.set_axisbelow(True)
    longest = max(len(str(r)) for r in rows)
    fig.legend(loc="outside lower center", ncols=min(len(rows), 2 if longest > 30 else 3), fontsize=8, frameon=False)
    return _save(fig, path)


# --------------------------------------------------------------------------- training curves (phase 3)

def plot_training_curves(history, path: str | Path, title: str, before: Mapping[str, float] | None = None,
                         metrics: Sequence[str] = ("P@1", "MAP@R"), monitor: str = "val_MAP@R") -> Path:
    """Training loss and the validation `metrics` per epoch (a DataFrame with `epoch`, `loss`,
    `val_<metric>`, and `val_triplet_accuracy` drawn when present); `before`: the untrained model's scores,
    drawn as a dotted line; the best epoch by `monitor` is marked."""
    epochs = history["epoch"].to_numpy() + 1
    # Runs with groups also score validation triplets (seed 000's per-epoch triplet accuracy): a panel of its own.
    if "val_triplet_accuracy" in history and "triplet_accuracy" not in metrics:
        metrics = (*metrics, "triplet_accuracy")
    fig = _new_figure(3.3 * (len(metrics) + 1), 3.4)
    panels = [("loss", "training loss")] + [(f"val_{name}", f"validation {name}") for name in metrics]
    for ax, (column, label) in zip(fig.subplots(1, len(panels)), panels):
        if column in history:
            values = history[column].to_numpy(dtype=float)
            ax.plot(epochs, values, marker="o", markersize=3)
            metric = column.removeprefix("val_")
            if before and column != "loss" and math.isfinite(before.get(metric, float("nan"))):
                ax.axhline(before[metric], color=DIFFERENT, linestyle=":", linewidth=1, label="untrained head")
            if column == monitor and np.isfinite(values).any():
                best = int(np.nanargmax(values))
                ax.axvline(epochs[best], color=NEUTRAL, linestyle="--", linewidth=1,
                           label=f"best: epoch {epochs[best]}")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="lower right", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)
