"""Boxes of a manifest (`x, y, w, h`): parsed, checked against their image, turned into crops.

A manifest row with a box is one item: the crop of its image (several rows may name one image, one item per
box). The unit is the dataset's `data.box_units`, never guessed from the values: "pixels" (x, y = the top-left
corner, w, h = the size, in pixels of the image as displayed, i.e. after its EXIF orientation) or "fractions"
(the same, as fractions of the image's width and height). Edges are rounded to whole pixels; the box must then
lie inside the image and keep at least one pixel each way. A box that does not is the item's reject reason,
never an exception (pure functions, no TensorFlow, so they run in phase 0's worker processes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BOX_COLUMNS = ("x", "y", "w", "h")
BOX_UNITS = ("pixels", "fractions")


@dataclass(frozen=True)
class Box:
    x: float
    y: float
    w: float
    h: float
    units: str = "pixels"

    def text(self) -> str:
        """The box as the manifest wrote it (numbers in their shortest form), for ids and messages."""
        return ",".join(f"{v:g}" for v in (self.x, self.y, self.w, self.h))


class BoxError(ValueError):
    """A box that cannot be used (one-line reason, which becomes the item's reject reason)."""


def parse_box(row: dict, units: str) -> Box | None:
    """The box of a manifest row: None when its box cells are all empty (the whole image); BoxError when only some
    are given, or one is not a finite number."""
    if units not in BOX_UNITS:
        raise ValueError(f"box units must be one of {BOX_UNITS}, got {units!r}")
    cells = [str(row.get(c, "")).strip() for c in BOX_COLUMNS]
    if not any(cells):
        return None
    if not all(cells):
        missing = [c for c, v in zip(BOX_COLUMNS, cells) if not v]
        raise BoxError(f"incomplete box (no {', '.join(missing)})")
    try:
        values = [float(v) for v in cells]
    except ValueError:
        raise BoxError(f"box values are not numbers ({','.join(cells)})") from None
    if not all(math.isfinite(v) for v in values):
        raise BoxError(f"box values are not finite ({','.join(cells)})")
    return Box(*values, units=units)


def pixel_box(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) in whole pixels of a `width` × `height` image; BoxError when the box is empty or
    not inside the image."""
    scale_x, scale_y = (width, height) if box.units == "fractions" else (1, 1)
    if box.w <= 0 or box.h <= 0:
        raise BoxError(f"empty box ({box.text()} {box.units}: width and height must be > 0)")
    edges = (box.x * scale_x, box.y * scale_y, (box.x + box.w) * scale_x, (box.y + box.h) * scale_y)
    left, top, right, bottom = (int(round(v)) for v in edges)
    if left < 0 or top < 0 or right > width or bottom > height:
        raise BoxError(f"box {box.text()} ({box.units}) is not inside the {width}×{height} image")
    if right <= left or bottom <= top:
        raise BoxError(f"empty box ({box.text()} {box.units} is under one pixel in the {width}×{height} image)")
    return left, top, right, bottom


def crop_array(image: np.ndarray, edges: tuple[int, int, int, int]) -> np.ndarray:
    """The pixels of `edges` (left, top, right, bottom) of an H × W [× C] array."""
    left, top, right, bottom = edges
    return image[top:bottom, left:right]


def box_record(edges: tuple[int, int, int, int]) -> str:
    """How the TFRecords, manifest.csv and items.csv store a crop's box: `left,top,width,height` in pixels of the
    source image (which `path` names)."""
    left, top, right, bottom = edges
    return f"{left},{top},{right - left},{bottom - top}"


def box_item_id(path_id: str, box: Box) -> str:
    """The id of a box item without an `id` cell: its image's id and the box as written (stable when rows move)."""
    return f"{path_id}#{box.text()}"
