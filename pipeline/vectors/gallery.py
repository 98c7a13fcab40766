"""The gallery side of exact retrieval: score rows computed a gallery segment at a time, and the sorted
part of each row that the ranks need.

A gallery is either *resident* (an array in RAM, converted once to C-contiguous float32, normalised once for
cosine and multiplied directly: the fastest path) or *streamed* (a memory-mapped `.npy` from `open_gallery`, or
float16 storage): then rows are read `SEGMENT_ROWS` at a time, converted to float32 (float16 storage, float32
accumulation), multiplied and dropped, so beyond the file's own pages only one float32 segment per worker
exists. Cosine scores of a streamed gallery are (q . g) / ||g|| with ||g|| computed once in float64, the same
ranking key as the dot product with a normalised copy up to float32 rounding.

Score buffers are sized by `SCORE_BUDGET_BYTES` (`rows_in_flight`), not by the gallery: at 60,000 items 1,024
query rows fit, at 1,000,000 only 64, so peak memory beyond the embeddings stays the same whatever the gallery.

`sorted_candidates` sorts, per score row, only the items that can enter a metric: those scoring at least the
lowest relevant score (every rank of a relevant item, and so every metric, depends only on items scoring at or
above it) or the k-th largest, whichever is lower. With well-separated classes that is a small share of a large
gallery; when it is not (relevant items spread through the ranking), the whole row is sorted as before.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.vectors.normalize import l2_normalize, row_sq_norms

# Gallery rows converted to float32 at a time by a streamed gallery (8 MB at 512-d float16 -> 16 MB float32).
SEGMENT_ROWS = 8192

# Bytes of score rows in flight across all workers (each row: its scores and their sorted copy, 8 bytes/item).
SCORE_BUDGET_BYTES = 768 << 20

# Sort only the candidates when they are at most this share of the block's scores; beyond it the extra
# compare-and-compress pass costs more than the smaller sort saves.
CANDIDATE_SHARE = 0.5

# Rows of validation / norm computation at a time (float64 temporaries).
_CHECK_ROWS = 4096


def open_gallery(path: str | Path) -> np.ndarray:
    """A `.npy` gallery memory-mapped read-only (nothing is read until scored)."""
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    if array.ndim != 2:
        raise ValueError(f"{path}: a gallery must be 2-D (n, dim), got shape {array.shape}")
    return array


def rows_in_flight(chunk_size: int, gallery_size: int, n_workers: int) -> int:
    """Query rows scored at once: `chunk_size`, lowered so their score buffers fit SCORE_BUDGET_BYTES."""
    by_budget = SCORE_BUDGET_BYTES // (8 * max(1, gallery_size))
    return max(n_workers, min(chunk_size, by_budget))


class ScoredGallery:
    """Ranking keys of query blocks against a gallery (see the module docstring).

    ``metric="cosine"``: the key is the cosine similarity (zero rows score 0). ``"euclidean"``: the key is
    ``2 q.g - ||g||^2`` (same order as ascending distance; the caller turns it into a distance).
    """

    def __init__(self, gallery: np.ndarray, metric: str):
        array = gallery if isinstance(gallery, np.ndarray) else np.asarray(gallery)
        if array.ndim != 2:
            raise ValueError(f"gallery must be 2-D (n, dim), got shape {array.shape}")
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise ValueError(f"gallery must be numeric, got dtype {array.dtype}")
        self.metric = metric
        self.size, self.dim = array.shape
        # Memory maps and float16 storage are read a segment at a time; anything else in RAM is converted once.
        self.streamed = isinstance(array, np.memmap) or array.dtype == np.float16
        self.sq_norms = None        # float64 (size,), euclidean
        self.key_offsets = None     # float32 ||g||^2, euclidean
        self.inverse_norms = None   # float32 1/||g|| (0 for zero rows), streamed cosine
        if self.streamed:
            self._array = array
            self._check_and_measure()
        else:
            array = np.ascontiguousarray(array, dtype=np.float32)
            if not np.isfinite(array).all():
                raise ValueError("gallery contains NaN or infinite values")
            if metric == "cosine":
                self._array = l2_normalize(array)
            else:
                self._array = array
                self.sq_norms = row_sq_norms(array)
        if self.sq_norms is not None:
            self.key_offsets = self.sq_norms.astype(np.float32)

    @property
    def resident_array(self) -> np.ndarray | None:
        """The float32 matrix scored (normalised for cosine), when the gallery is resident."""
        return None if self.streamed else self._array

    def segment(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop as float32 (for a streamed gallery: read and converted now)."""
        return np.asarray(self._array[start:stop], dtype=np.float32)

    def score_into(self, query: np.ndarray, out: np.ndarray) -> None:
        """out[i, j] = ranking key of query row i against gallery item j (query float32, normalised for cosine)."""
        if not self.streamed:
            np.matmul(query, self._array.T, out=out)
            self._to_keys(out, slice(None))
            return
        for start in range(0, self.size, SEGMENT_ROWS):
            stop = min(start + SEGMENT_ROWS, self.size)
            out[:, start:stop] = self.keys(query, start, stop)

    def keys(self, query: np.ndarray, start: int, stop: int) -> np.ndarray:
        """Ranking keys of the query rows against gallery rows start..stop, as a new float32 array."""
        part = query @ self.segment(start, stop).T
        self._to_keys(part, slice(start, stop))
        return part

    def keys_of(self, query: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Ranking keys of the query rows against the gallery items `items` (indices), as a new float32 array."""
        part = query @ np.asarray(self._array[items], dtype=np.float32).T
        self._to_keys(part, items)
        return part

    def _to_keys(self, products: np.ndarray, where) -> None:
        """Dot products with gallery rows `where` -> ranking keys, in place."""
        if self.metric == "cosine":
            if self.streamed:
                products *= self.inverse_norms[where]
        else:
            products *= 2.0
            products -= self.key_offsets[where]

    def _check_and_measure(self) -> None:
        """One streamed pass: finite values, and the norms each metric needs."""
        sq = np.empty(self.size, dtype=np.float64)
        for start in range(0, self.size, _CHECK_ROWS):
            block = np.asarray(self._array[start:start + _CHECK_ROWS], dtype=np.float64)
            if not np.isfinite(block).all():
                raise ValueError("gallery contains NaN or infinite values")
            sq[start:start + _CHECK_ROWS] = np.einsum("ij,ij->i", block, block)
        if self.metric == "cosine":
            norms = np.sqrt(sq)
            inverse = np.zeros_like(norms)
            np.divide(1.0, norms, out=inverse, where=norms > 0)
            self.inverse_norms = inverse.astype(np.float32)
        else:
            self.sq_norms = sq


def sorted_candidates(scores: np.ndarray, lower_bound: np.ndarray | None, buffer: np.ndarray) -> np.ndarray:
    """Each row's scores >= lower_bound[row], sorted ascending, as an (n_rows, W) view of `buffer` (flat,
    at least n_rows * N floats), W the most candidates of any row; shorter rows are padded with -inf on the
    left, which every rank computation treats as items below all candidates (as the excluded item is).
    Returns the full sorted rows when the candidates are more than CANDIDATE_SHARE of the scores, or
    without bounds."""
    n_rows, gallery_size = scores.shape
    if lower_bound is not None:
        keep = scores >= lower_bound[:, None]
        counts = np.count_nonzero(keep, axis=1)
    if lower_bound is None or counts.sum() > CANDIDATE_SHARE * scores.size:
        out = buffer[: n_rows * gallery_size].reshape(n_rows, gallery_size)
        np.copyto(out, scores)
        out.sort(axis=1)
        return out
    width = int(counts.max(initial=0))
    out = buffer[: n_rows * width].reshape(n_rows, width)
    for row in range(n_rows):
        pad = width - int(counts[row])
        out[row, :pad] = -np.inf
        values = out[row, pad:]
        values[...] = scores[row][keep[row]]
        values.sort()
    return out
