"""What every picture of the reports shares: a headless figure, an atomic PNG writer, colours, short labels."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

# Headless: the pipeline runs on servers and in CI where no display exists, and
# Agg must be chosen before pyplot is imported anywhere in the process.
matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402

from pipeline.core.atomic import atomic_path  # noqa: E402

DPI = 110
NEUTRAL = "#6b7280"
SAME = "#1a9850"
DIFFERENT = "#d73027"


def new_figure(width: float, height: float) -> Figure:
    # A bare Figure (not pyplot.figure) is garbage-collected with its last
    # reference, so a long evaluation drawing hundreds of plots does not leak.
    return Figure(figsize=(width, height), layout="constrained", facecolor="white")


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as a PNG atomically and return its path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, facecolor="white")
    return path


def short(text: Any, width: int) -> str:
    text = "—" if text is None else str(text)
    return text if len(text) <= width else text[: width - 1] + "…"
