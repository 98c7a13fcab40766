"""How both HTML reports show numbers, which cell is "best", and the one Jinja environment that renders them.

Views are built in Python (report.py for phase 2, compare_view.py for phase 5): every number is formatted and
every "best" decided here before Jinja sees it. Jinja autoescapes, so class names, tags and commands cannot
inject markup.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any
from collections.abc import Mapping, Sequence

import jinja2

from pipeline.core.atomic import atomic_open

TEMPLATE_DIR = Path(__file__).parent / "templates"
DASH = "—"


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) or _numpy_number(value)


def _numpy_number(value: Any) -> bool:
    return type(value).__module__ == "numpy" and hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0 \
        and value.dtype.kind in "iuf"


def to_float(value: Any) -> float | None:
    """A finite-or-infinite float, or None for anything that is not a number (NaN included)."""
    if not is_number(value):
        return None
    value = float(value)
    return None if math.isnan(value) else value


def fmt(value: Any, digits: int = 3) -> str:
    """Three decimals for floats, thousands separators for integers, a dash for NaN/None."""
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if is_number(value):
        number = float(value)
        if math.isnan(number) or math.isinf(number):
            return DASH if math.isnan(number) else ("∞" if number > 0 else "−∞")
        if isinstance(value, int) or (_numpy_number(value) and value.dtype.kind in "iu"):
            return f"{int(value):,}"
        return f"{number:.{digits}f}"
    text = str(value)
    return text if text else DASH


def fmt_magnitude(value: Any, digits: int = 3) -> str:
    """Like `fmt`, but a magnitude that fixed decimals would show as 0.000 keeps its significant digits.

    The raw features of a randomly initialised backbone have norms near 1e-16; "0.000 ± 0.000" beside a
    sentence computed from the true numbers would contradict it.
    """
    number = to_float(value)
    if number is None or number == 0 or abs(number) >= 10 ** -digits or math.isinf(number):
        return fmt(value, digits)
    return f"{number:.{digits}g}"


def fmt_count(value: Any) -> str:
    number = to_float(value)
    return DASH if number is None else f"{int(round(number)):,}"


def fmt_seconds(value: Any) -> str:
    number = to_float(value)
    return DASH if number is None else f"{number:.1f} s"


def get(mapping: Any, *keys: str, default: Any = None) -> Any:
    """mapping[k1][k2]..., or `default` wherever a level is missing or not a mapping."""
    for key in keys:
        if not isinstance(mapping, Mapping) or key not in mapping:
            return default
        mapping = mapping[key]
    return mapping


def best_flags(values: Sequence[Any], digits: int = 3) -> list[bool]:
    """The one "best" rule of both reports (every metric shown is higher-is-better).

    A cell is best when it shows the highest number as printed (`digits` decimals), so two cells that read
    the same are both bold. A column with a single row, or where every row shows the same number, has no
    winner to point at.
    """
    shown = [None if to_float(v) is None else round(float(v), digits) for v in values]
    present = [v for v in shown if v is not None]
    if len(values) < 2 or len(set(present)) < 2:
        return [False] * len(values)
    top = max(present)
    return [v is not None and v == top for v in shown]


def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        autoescape=True,
        # Missing keys render empty instead of aborting a run that took an hour.
        undefined=jinja2.ChainableUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render_html(template: str, view: Mapping, path: Path) -> Path:
    """Render `template` with `view` and write it atomically to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    html = environment().get_template(template).render(**view)
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(html)
    return path
