"""The neighbour grid: one row per query, the query and its nearest gallery items, framed by whether they
share its class. A query may be a text (text → image search): its cell then shows the text. Written
atomically like every picture (canvas.save_figure)."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any
from collections.abc import Sequence

import numpy as np
from PIL import Image

from pipeline.reporting.canvas import DIFFERENT, NEUTRAL, SAME, new_figure, save_figure, short

_THUMB = 96
# A text query's cell: this many characters per line, this many lines (then "…").
_TEXT_WIDTH, _TEXT_LINES = 18, 7


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


def _last_filled(images: Any, labels: Any, scores: Any, i: int) -> int:
    """1 + the last position of row i that has an image, a label or a score (0 for an empty row)."""
    rows = [_row(images, i), _row(labels, i), _row(scores, i)]
    for j in range(max(len(r) for r in rows) - 1, -1, -1):
        if any(_at(r, j) is not None for r in rows):
            return j + 1
    return 0


def _text_cell(text: str) -> str:
    lines = textwrap.wrap(str(text), _TEXT_WIDTH) or [""]
    if len(lines) > _TEXT_LINES:
        lines = lines[:_TEXT_LINES]
        lines[-1] = short(lines[-1] + " …", _TEXT_WIDTH)
    return "\n".join(lines)


def _format_score(score: Any) -> str:
    try:
        value = float(score)
    except (TypeError, ValueError):
        return "—"
    return "—" if math.isnan(value) else f"{value:.3f}"


def plot_neighbour_grid(query_images: Sequence[Any], query_labels: Sequence[Any],
                        neighbour_images: Sequence[Sequence[Any]], neighbour_labels: Sequence[Sequence[Any]],
                        neighbour_scores: Sequence[Sequence[float]], correct: Sequence[Sequence[bool]] | None,
                        path: str | Path, title: str, score_name: str = "score",
                        query_texts: Sequence[str | None] | None = None) -> Path:
    """One row per query: the query, then its top-k neighbours framed green (same class) or red.
    `query_texts[i]`, when given, is shown in the query's cell instead of its image (a text query)."""
    n_rows = len(query_images)
    # Columns after the last filled cell of every row would only add blank width (k above the gallery size).
    k = max([_last_filled(neighbour_images, neighbour_labels, neighbour_scores, i) for i in range(n_rows)] + [1])
    fig = new_figure(1.25 * (k + 1) + 0.3, 1.62 * max(n_rows, 1) + 0.6)
    if n_rows == 0:
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, "no queries", ha="center", va="center", transform=ax.transAxes)
        fig.suptitle(title, fontsize=11)
        return save_figure(fig, path)

    # A narrow empty column separates the query from its neighbours.
    grid = fig.add_gridspec(n_rows, k + 2, width_ratios=[1, 0.12] + [1] * k)
    for i in range(n_rows):
        q_label = _at(list(query_labels), i) if query_labels is not None else None
        ax = fig.add_subplot(grid[i, 0])
        text = _at(list(query_texts), i) if query_texts is not None else None
        ax.imshow(_thumbnail(query_images[i]) if text is None else np.full((_THUMB, _THUMB, 3), 255, np.uint8))
        if text is not None:
            ax.text(0.5, 0.5, _text_cell(text), ha="center", va="center", fontsize=6.5, color="#111111",
                    transform=ax.transAxes)
        elif query_images[i] is None:
            ax.text(0.5, 0.5, "no image", ha="center", va="center", fontsize=7, color=NEUTRAL,
                    transform=ax.transAxes)
        _frame(ax, NEUTRAL, width=2.5)
        ax.set_xlabel(f"query\n{short(q_label, 16)}", fontsize=7.5, color="#111111")
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
            ax.set_xlabel(f"{short(label, 16)}\n{score_name} {_format_score(score)}",
                          fontsize=7.5, color=colour if flag is not None else "#111111")
            if i == 0:
                ax.set_title(f"#{j + 1}", fontsize=8, color=NEUTRAL)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)
