"""Candidates of a large gallery, collected the way GEMM runs fast: a block of many queries scored against one
gallery segment at a time, keeping per query only the items some metric can see.

Why. Retrieval over whole score rows (`retrieval`'s row scan) keeps at most `gallery.SCORE_BUDGET_BYTES` of rows
in flight, so a 1,000,000-item gallery is scored 50 queries at a time: skinny matrix products that repack the
whole gallery for every 50 queries and run at about 60 % of the CPU's product speed. Here a block of up to
`chunk_size` queries (1,024 by default) is multiplied with `SEGMENT_SCAN_ROWS` gallery rows at a time (the shape
FAISS uses for its exact k-NN), and only scores at or above each query's lower bound are kept.

The lower bound of a query is the lowest score any metric depends on: min(its lowest relevant score, its
k_eff-th largest score). Both are known before the scan: the relevant scores by scoring the query against its
class's members, and a value at most the k_eff-th largest score as the k_eff-th largest of a subset (the relevant
items and the first gallery segment; the k-th largest of a subset never exceeds that of the whole), needed only
when the query has fewer than k_eff relevant items. The bound is lowered by a margin that covers float32
rounding differences between that pre-pass and the scan (`key_error_margin`): a few extra candidates below every
relevant item change no rank. Nothing missed passes silently: `collect` raises when a query keeps fewer than k_eff
candidates, and `ranks` when a relevant item is not among its query's candidates.

A block whose candidates would pass `CANDIDATE_BUDGET`, or `gallery.CANDIDATE_SHARE` of its score rows, is
given up (None): relevant items spread through the whole ranking make the candidates most of the gallery, and
then whole rows cost less (8 bytes an item against ~20 here) and are sorted as fast.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.vectors.gallery import CANDIDATE_SHARE, ScoredGallery

# Gallery rows per product: 1,024 queries x 16,384 rows = 64 MB of float32 scores per worker.
SEGMENT_SCAN_ROWS = 16384

# Candidates (query, item) one block may keep (~20 bytes each while collected, 12 once laid out).
CANDIDATE_BUDGET = 12 << 20

# Float32 dot products of d-dimensional vectors are off by at most about d * eps * |q| |g| (Higham's bound);
# the margin takes four times that, so the pre-pass and the scan cannot disagree across the bound.
_MARGIN_FACTOR = 4.0


@dataclass
class CandidateRows:
    """Each query row's candidates in gallery order, padded on the right to one width W.

    ``scores[i, j]`` is the ranking key of item ``columns[i, j]`` for row i; padding is ``-inf`` at column
    ``gallery_size``, which sorts below every candidate (as `gallery.sorted_candidates`' left padding does).
    """

    scores: np.ndarray   # (n_rows, W) float32
    columns: np.ndarray | None  # (n_rows, W) int64, ascending per row; None: whole rows (column j is item j)
    gallery_size: int

    @classmethod
    def whole(cls, scores: np.ndarray) -> CandidateRows:
        """Whole score rows: every item a candidate, column j item j."""
        return cls(scores=scores, columns=None, gallery_size=scores.shape[1])

    def items_at(self, row: int | np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Gallery indices of the given columns of row(s)."""
        return positions if self.columns is None else self.columns[row, positions]

    def gather(self, rows: np.ndarray, items: np.ndarray) -> np.ndarray:
        """(len(rows), len(items)) scores of the gallery items `items` (ascending) in the given rows; -inf where
        an item is not a candidate of the row."""
        if self.columns is None:
            return self.scores[rows[:, None], items[None, :]]
        stride = self.gallery_size + 1
        offsets = np.arange(rows.size, dtype=np.int64)[:, None] * stride
        # Rows ascend and padding (gallery_size) is below the next row's offset: one flat sorted haystack.
        haystack = (self.columns[rows] + offsets).ravel()
        needles = (items[None, :] + offsets).ravel()
        at = np.minimum(np.searchsorted(haystack, needles), haystack.size - 1)
        found = haystack[at] == needles
        values = self.scores[rows].ravel()[at]
        return np.where(found, values, np.float32(-np.inf)).reshape(rows.size, items.size)


def key_error_margin(gallery: ScoredGallery, query_sq_norms: np.ndarray | None) -> np.ndarray | float:
    """How far two float32 computations of one ranking key may differ (see _MARGIN_FACTOR)."""
    eps = float(np.finfo(np.float32).eps)
    scale = _MARGIN_FACTOR * gallery.dim * eps
    if gallery.metric == "cosine":
        return scale  # unit (or zero) rows: |q . g| <= 1
    g_max = float(np.sqrt(gallery.sq_norms.max(initial=0.0)))
    q_norms = np.sqrt(query_sq_norms)
    return scale * (2.0 * q_norms * g_max + g_max * g_max) + 4 * eps * g_max * g_max


def lower_bounds(
    gallery: ScoredGallery,
    query: np.ndarray,
    codes: np.ndarray,
    members_of: list,
    exclude: np.ndarray,
    k_eff: np.ndarray,
    margin: np.ndarray | float,
) -> np.ndarray:
    """Per query row: a key at or below every score a metric depends on (see the module docstring)."""
    n_rows = query.shape[0]
    bound = np.full(n_rows, np.inf, dtype=np.float64)
    few_relevant = np.zeros(n_rows, dtype=bool)
    for code in np.unique(codes):
        rows = np.flatnonzero(codes == code)
        members = members_of[code] if code < len(members_of) else np.empty(0, dtype=np.int64)
        relevant = gallery.keys_of(query[rows], members) if members.size else np.empty((rows.size, 0), np.float32)
        relevant[members[None, :] == exclude[rows, None]] = np.inf  # the excluded item is never ranked
        if members.size:
            bound[rows] = relevant.min(axis=1)
        counted = np.count_nonzero(np.isfinite(relevant), axis=1)
        few_relevant[rows] = counted < k_eff[rows]
    rows = np.flatnonzero(few_relevant & (k_eff > 0))
    if rows.size:
        # At least k_eff + 1 rows, so that k_eff of them remain besides the excluded item.
        stop = min(gallery.size, max(SEGMENT_SCAN_ROWS, int(k_eff.max()) + 1))
        subset = gallery.keys(query[rows], 0, stop)
        inside = exclude[rows] < stop
        subset[np.flatnonzero(inside), exclude[rows][inside]] = -np.inf
        for i, row in enumerate(rows):
            members = members_of[codes[row]] if codes[row] < len(members_of) else np.empty(0, dtype=np.int64)
            beyond = members[(members >= stop) & (members != exclude[row])]   # relevant items past the subset
            extra = gallery.keys_of(query[row:row + 1], beyond)[0]
            values = np.concatenate([subset[i], extra])
            kth = np.partition(values, values.size - k_eff[row])[values.size - k_eff[row]]
            bound[row] = min(bound[row], float(kth))
    return bound - margin


def collect(
    gallery: ScoredGallery, query: np.ndarray, bound: np.ndarray, exclude: np.ndarray, k_eff: np.ndarray
) -> CandidateRows | None:
    """Every (row, item) with key >= bound[row], the excluded item left out; None past CANDIDATE_BUDGET or
    CANDIDATE_SHARE of the rows. Raises if a row ends with fewer than k_eff candidates (a bound that was not one)."""
    n_rows = query.shape[0]
    row_parts, column_parts, score_parts = [], [], []
    kept = 0
    budget = min(CANDIDATE_BUDGET, CANDIDATE_SHARE * n_rows * gallery.size)
    bound32 = bound.astype(np.float32)[:, None]
    for start in range(0, gallery.size, SEGMENT_SCAN_ROWS):
        stop = min(start + SEGMENT_SCAN_ROWS, gallery.size)
        part = gallery.keys(query, start, stop)
        inside = np.flatnonzero((exclude >= start) & (exclude < stop))
        part[inside, exclude[inside] - start] = -np.inf
        # flatnonzero + divmod: a fifth of np.nonzero's time on a (1024, 16384) mask.
        rows, columns = np.divmod(np.flatnonzero(part >= bound32), stop - start)
        kept += rows.size
        if kept > budget:
            return None
        score_parts.append(part[rows, columns])
        row_parts.append(rows.astype(np.int32))
        column_parts.append(columns.astype(np.int64) + start)
    rows = np.concatenate(row_parts)
    # Segments come in gallery order and flatnonzero is row-major, so a stable sort by row keeps columns ascending.
    order = np.argsort(rows, kind="stable")
    rows = rows[order]
    counts = np.bincount(rows, minlength=n_rows)
    if np.any(counts < k_eff):
        raise RuntimeError("segment scan: a query kept fewer candidates than its k (internal error in the bound)")
    width = int(counts.max(initial=0))
    slot = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
    scores = np.full((n_rows, width), -np.inf, dtype=np.float32)
    columns = np.full((n_rows, width), gallery.size, dtype=np.int64)
    scores[rows, slot] = np.concatenate(score_parts)[order]
    columns[rows, slot] = np.concatenate(column_parts)[order]
    return CandidateRows(scores=scores, columns=columns, gallery_size=gallery.size)
