"""Pictures of an embedding space for the phase-2 report.

Every function renders one PNG, writes it atomically (temporary sibling, then
os.replace, via pipeline.core.atomic) and returns its path, so a report never links
to a half-written image.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

# Headless: the pipeline runs on servers and in CI where no display exists, and
# Agg must be chosen before pyplot is imported anywhere in the process.
matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib import colormaps  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import BoundaryNorm, ListedColormap  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.core.atomic import atomic_path  # noqa: E402

DPI = 110
MAX_LEGEND_CLASSES = 20
NEUTRAL = "#6b7280"
SAME = "#1a9850"
DIFFERENT = "#d73027"

_PANEL_NAMES = {"pca": "PCA", "tsne": "t-SNE", "t-sne": "t-SNE", "umap": "UMAP"}


# --------------------------------------------------------------------------- helpers

def _new_figure(width: float, height: float) -> Figure:
    # A bare Figure (not pyplot.figure) is garbage-collected with its last
    # reference, so a long evaluation drawing hundreds of plots does not leak.
    return Figure(figsize=(width, height), layout="constrained", facecolor="white")


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, facecolor="white")
    return path


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


def _short(text: Any, width: int) -> str:
    text = "—" if text is None else str(text)
    return text if len(text) <= width else text[: width - 1] + "…"


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
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = x / np.where(norms > 0, norms, 1.0)
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


# --------------------------------------------------------------------------- neighbours

_THUMB = 96


def _to_rgb_uint8(image: Any) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8)
    return arr


def _thumbnail(image: Any, size: int = _THUMB) -> np.ndarray:
    """Fit the image inside size x size keeping its aspect ratio, padded with white."""
    if image is None:
        # An image that could not be loaded still gets its cell, so the row's
        # labels and scores stay aligned with their ranks.
        return np.full((size, size, 3), 230, dtype=np.uint8)
    img = Image.fromarray(_to_rgb_uint8(image))
    w, h = img.size
    scale = size / max(w, h, 1)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    # Enlarging tiny images (28 px digits, 32 px CIFAR) with nearest keeps their
    # pixels honest instead of inventing a blur; shrinking needs a real filter.
    resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS
    img = img.resize(new, resample)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(img, ((size - new[0]) // 2, (size - new[1]) // 2))
    return np.asarray(canvas)


def _frame(ax, colour: str, linestyle: str = "-", width: float = 3.5) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_color(colour)
        spine.set_linewidth(width)
        spine.set_linestyle(linestyle)


def _row(seq: Any, i: int) -> list:
    if seq is None:
        return []
    try:
        row = seq[i]
    except (IndexError, KeyError, TypeError):
        return []
    return [] if row is None else list(row)


def _at(row: list, j: int) -> Any:
    return row[j] if j < len(row) else None


def _format_score(score: Any) -> str:
    try:
        value = float(score)
    except (TypeError, ValueError):
        return "—"
    return "—" if math.isnan(value) else f"{value:.3f}"


def plot_neighbour_grid(query_images: Sequence[Any], query_labels: Sequence[Any],
                        neighbour_images: Sequence[Sequence[Any]], neighbour_labels: Sequence[Sequence[Any]],
                        neighbour_scores: Sequence[Sequence[float]], correct: Sequence[Sequence[bool]] | None,
                        path: str | Path, title: str, score_name: str = "score") -> Path:
    """One row per query: the query, then its top-k neighbours framed green (same class) or red."""
    n_rows = len(query_images)
    k = max([len(_row(neighbour_images, i)) for i in range(n_rows)] + [1])
    fig = _new_figure(1.25 * (k + 1) + 0.3, 1.62 * max(n_rows, 1) + 0.6)
    if n_rows == 0:
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, "no queries", ha="center", va="center", transform=ax.transAxes)
        fig.suptitle(title, fontsize=11)
        return _save(fig, path)

    # A narrow empty column separates the query from its neighbours.
    grid = fig.add_gridspec(n_rows, k + 2, width_ratios=[1, 0.12] + [1] * k)
    for i in range(n_rows):
        q_label = _at(list(query_labels), i) if query_labels is not None else None
        ax = fig.add_subplot(grid[i, 0])
        ax.imshow(_thumbnail(query_images[i]))
        if query_images[i] is None:
            ax.text(0.5, 0.5, "no image", ha="center", va="center", fontsize=7, color=NEUTRAL,
                    transform=ax.transAxes)
        _frame(ax, NEUTRAL, width=2.5)
        ax.set_xlabel(f"query\n{_short(q_label, 16)}", fontsize=7.5, color="#111111")
        if i == 0:
            ax.set_title("query", fontsize=8, color=NEUTRAL)

        images = _row(neighbour_images, i)
        labels = _row(neighbour_labels, i)
        scores = _row(neighbour_scores, i)
        flags = _row(correct, i)
        for j in range(k):
            image, label, score = _at(images, j), _at(labels, j), _at(scores, j)
            if image is None and label is None and score is None:
                continue
            ax = fig.add_subplot(grid[i, j + 2])
            ax.imshow(_thumbnail(image))
            if image is None:
                ax.text(0.5, 0.5, "no image", ha="center", va="center", fontsize=7, color=NEUTRAL,
                        transform=ax.transAxes)
            flag = _at(flags, j)
            if flag is None and label is not None and q_label is not None:
                flag = str(label) == str(q_label)
            if flag is None:
                colour, style = NEUTRAL, "-"
            else:
                # Dashed red as well as coloured, so the frames still read for
                # red-green colour-blind viewers.
                colour, style = (SAME, "-") if bool(flag) else (DIFFERENT, "--")
            _frame(ax, colour, style)
            ax.set_xlabel(f"{_short(label, 16)}\n{score_name} {_format_score(score)}",
                          fontsize=7.5, color=colour if flag is not None else "#111111")
            if i == 0:
                ax.set_title(f"#{j + 1}", fontsize=8, color=NEUTRAL)
    fig.suptitle(title, fontsize=11)
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
