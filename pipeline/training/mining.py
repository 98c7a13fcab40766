"""Hard-negative tables: for every training item, the items of other classes (and other groups) that an
embedding puts closest to it, most similar first.

`baseline_hard_negatives` is the exact, chunked ranking (never an n x n matrix) on unit vectors rounded to a
grid, so the table is bit-for-bit reproducible whatever the chunking or BLAS kernel (a resumed run re-mines the
same table). `mine_hard_negatives` chooses it up to `FAISS_ABOVE` items and a FAISS index beyond (search
with enough extra neighbours to pass over the false negatives), then optionally mixes in random true negatives
(`random_share`). `changed_negatives` counts how much a refresh changed a table.
"""
from __future__ import annotations

import numpy as np

# Unit vectors are rounded to multiples of 2**-11 before the similarity matmul. Every
# product of two coordinates is then a multiple of 2**-22, and every partial sum of a
# dot product stays below (2**11 + sqrt(d)/2)**2 such units (Cauchy-Schwarz on the
# rounded vectors), well inside float32's 24-bit significand: the float32 matmul is
# exact whatever order BLAS sums in. Unrounded, BLAS can give two identical columns
# different last bits depending on where they sit. So the ranking depends neither on
# chunk_size nor on the BLAS kernel, and duplicate embeddings tie exactly. The rounding
# moves a cosine by ~1e-4.
_UNIT_GRID = 2.0 ** -11
# Every 8th column gives a cheap lower bound on each row's n-th largest similarity.
_SAMPLE_STRIDE = 8
# Up to this many items the exact chunked ranking runs (n^2 d multiply-adds, chunk by chunk, plus a selection
# pass over every similarity); beyond, a FAISS index (pipeline/vectors/index.py: exact flat up to its
# EXACT_LIMIT, IVF-PQ beyond).
FAISS_ABOVE = 50_000


# --------------------------------------------------------------------------- hard negatives from the baseline

def baseline_hard_negatives(
    embeddings: np.ndarray,
    labels: np.ndarray,
    n_negatives: int = 10,
    chunk_size: int = 1024,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """int64 (n, n_negatives): per row, the rows of other labels most cosine-similar to it, most similar first.

    Equal similarities (duplicate embeddings, a zero row, which is equally similar to
    everything) are ranked by lower row index. Rows with fewer than n_negatives items
    of other labels are padded with -1. Queries are processed `chunk_size` rows at a
    time against all rows, so memory is chunk_size x n, never n x n. Similarities are
    those of the unit vectors rounded to multiples of 2**-11 (see _UNIT_GRID), which
    makes the result exact and independent of chunk_size. `groups` (optional, int per row, -1 = none): rows
    sharing a group are never each other's negatives either (false negatives: versions of one original).
    """
    embeddings = np.asarray(embeddings)
    labels = np.asarray(labels)
    if embeddings.ndim != 2 or labels.shape != (len(embeddings),):
        raise ValueError(f"embeddings must be (n, d) with one label per row; got {embeddings.shape} and {labels.shape}")
    if n_negatives < 1 or chunk_size < 1:
        raise ValueError(f"n_negatives and chunk_size must be at least 1, got {n_negatives} and {chunk_size}")
    if not np.isfinite(embeddings).all():
        raise ValueError("embeddings hold NaN or infinite values")
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != labels.shape:
            raise ValueError(f"groups must hold one value per row; got {groups.shape} for {labels.shape}")
    unit = _grid_unit_rows(embeddings)
    hard = np.empty((len(unit), n_negatives), dtype=np.int64)
    for start in range(0, len(unit), chunk_size):
        stop = min(start + chunk_size, len(unit))
        similarities = unit[start:stop] @ unit.T
        # Items of the query's own label are its positives (the query included).
        similarities[labels[start:stop, None] == labels[None, :]] = -np.inf
        if groups is not None:
            chunk_groups = groups[start:stop, None]
            similarities[(chunk_groups == groups[None, :]) & (chunk_groups >= 0)] = -np.inf
        hard[start:stop] = _top_columns(similarities, n_negatives)
    return hard


def _grid_unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit length (zero rows stay zero), rounded to multiples of _UNIT_GRID."""
    rows = embeddings.astype(np.float64)  # a copy, scaled in place below
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    np.divide(rows, norms, out=rows, where=norms > 0)
    np.multiply(rows, 1 / _UNIT_GRID, out=rows)
    np.round(rows, out=rows)
    return (rows * _UNIT_GRID).astype(np.float32)


def _top_columns(values: np.ndarray, n_top: int) -> np.ndarray:
    """Per row, the columns of its n_top largest finite values, largest first, equal values by lower column; -1 pads.

    Selecting in full rows (argpartition) costs more than the matmul, so each row's
    n_top-th largest value is first bounded from below on a strided sample of its
    columns: a subset's n_top-th largest can't exceed the whole row's, so every top
    column (ties included) is at or above the bound, and only ~n_top * stride columns
    pass it. Those candidates are sorted exactly. Rows where too many columns pass
    (many equal values, or too few finite ones in the sample) are done one by one.
    """
    n_rows, n_cols = values.shape
    top = np.full((n_rows, n_top), -1, dtype=np.int64)
    stride = _SAMPLE_STRIDE if n_cols >= 2 * _SAMPLE_STRIDE * n_top else 1
    sample = values[:, ::stride]
    kth = sample.shape[1] - n_top
    if kth >= 0:
        floor = np.partition(sample, kth, axis=1)[:, kth]
    else:
        floor = np.full(n_rows, -np.inf, dtype=values.dtype)
    candidates = values >= floor[:, None]
    # About n_top * stride columns pass in a typical row; eight times that means ties or too few finite values.
    crowded = np.flatnonzero(candidates.sum(axis=1) > 8 * n_top * stride)
    candidates[crowded] = False
    # flatnonzero of the flat mask is ~10x faster than a 2-D np.nonzero.
    flat = np.flatnonzero(candidates)
    rows, cols = np.divmod(flat, n_cols)
    candidate_values = values.reshape(-1)[flat]
    order = np.lexsort((cols, -candidate_values, rows))
    rows, cols, candidate_values = rows[order], cols[order], candidate_values[order]
    rank = np.arange(rows.size) - np.searchsorted(rows, rows)  # position within the row's run
    keep = (rank < n_top) & (candidate_values > -np.inf)
    top[rows[keep], rank[keep]] = cols[keep]
    for row in crowded:
        top[row] = _top_columns_of_row(values[row], n_top)
    return top


def _top_columns_of_row(row_values: np.ndarray, n_top: int) -> np.ndarray:
    """_top_columns for one row, exact threshold first: for rows with many equal values."""
    top = np.full(n_top, -1, dtype=np.int64)
    finite = np.flatnonzero(row_values > -np.inf)
    if finite.size <= n_top:
        chosen = finite
    else:
        kth = row_values.size - n_top
        threshold = np.partition(row_values, kth)[kth]
        above = np.flatnonzero(row_values > threshold)
        chosen = np.concatenate([above, np.flatnonzero(row_values == threshold)[:n_top - above.size]])
    ranked = chosen[np.lexsort((chosen, -row_values[chosen]))]
    top[:ranked.size] = ranked
    return top




# --------------------------------------------------------------------------- mining for a (refreshed) table

def mine_hard_negatives(embeddings: np.ndarray, keys: np.ndarray, n_negatives: int, *,
                        groups: np.ndarray | None = None, random_share: float = 0.0, seed=0,
                        chunk_size: int = 1024, faiss_above: int = FAISS_ABOVE) -> tuple[np.ndarray, dict]:
    """(int64 (n, n_negatives) table, {"method", "n_random"}): each row's hardest true negatives, as
    baseline_hard_negatives ranks them (same key or same group excluded), with the last
    round(random_share * n_negatives) of each row replaced by seeded random true negatives."""
    keys = np.asarray(keys)
    if len(keys) > faiss_above:
        table, method = _faiss_hard_negatives(embeddings, keys, n_negatives, groups), "faiss"
    else:
        table = baseline_hard_negatives(embeddings, keys, n_negatives, chunk_size=chunk_size, groups=groups)
        method = "exact"
    n_random = int(np.floor(random_share * n_negatives + 0.5))
    if n_random:
        table = mix_random_negatives(table, keys, n_random, np.random.default_rng(seed), groups)
    return table, {"method": method, "n_random": n_random}


def _excluded(keys: np.ndarray, groups: np.ndarray | None, rows: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """(len(rows), m) bool: candidate j of row i is a false negative of it (same key, or same group >= 0)."""
    same = keys[candidates] == keys[rows][:, None]
    if groups is not None:
        row_groups = groups[rows][:, None]
        same |= (groups[candidates] == row_groups) & (row_groups >= 0)
    return same | (candidates < 0)


def _faiss_hard_negatives(embeddings: np.ndarray, keys: np.ndarray, n_negatives: int,
                          groups: np.ndarray | None, query_chunk: int = 4096) -> np.ndarray:
    """The FAISS form of baseline_hard_negatives: every row searches the index for n_negatives + (its
    excluded items) neighbours, the false negatives are passed over; rows an approximate index left short
    are ranked exactly against all rows. Equal scores keep FAISS's order."""
    from pipeline.vectors.index import build_index, search

    unit = _grid_unit_rows(embeddings)
    index = build_index(unit, "auto")
    _, key_index, key_sizes = np.unique(keys, return_inverse=True, return_counts=True)
    per_row = key_sizes[key_index]
    if groups is not None:
        _, group_index, group_sizes = np.unique(groups, return_inverse=True, return_counts=True)
        per_row = per_row + np.where(groups >= 0, group_sizes[group_index], 0)
    table = np.full((len(unit), n_negatives), -1, dtype=np.int64)
    short = []
    # Rows with as many excluded items search together, so no row asks for far more neighbours than it needs.
    for extra in np.unique(per_row):
        rows = np.flatnonzero(per_row == extra)
        k = int(min(len(unit), n_negatives + extra))
        for start in range(0, len(rows), query_chunk):
            chunk = rows[start:start + query_chunk]
            _, found = search(index, unit[chunk], k)
            found = np.where(_excluded(keys, groups, chunk, found), -1, found)
            for i, row in enumerate(chunk):
                kept = found[i][found[i] >= 0][:n_negatives]
                table[row, :kept.size] = kept
                if kept.size < n_negatives and (keys != keys[row]).sum() > kept.size:
                    short.append(row)
    if short:
        short = np.asarray(short)
        exact = _exact_rows(unit, keys, groups, short, n_negatives)
        table[short] = exact
    return table


def _exact_rows(unit: np.ndarray, keys, groups, rows: np.ndarray, n_negatives: int, chunk_size: int = 256):
    """baseline_hard_negatives for some query rows against every row (on grid unit vectors already)."""
    out = np.empty((len(rows), n_negatives), dtype=np.int64)
    everything = np.arange(len(unit))
    for start in range(0, len(rows), chunk_size):
        chunk = rows[start:start + chunk_size]
        similarities = unit[chunk] @ unit.T
        similarities[_excluded(keys, groups, chunk, np.broadcast_to(everything, (len(chunk), len(unit))))] = -np.inf
        out[start:start + len(chunk)] = _top_columns(similarities, n_negatives)
    return out


def mix_random_negatives(table: np.ndarray, keys: np.ndarray, n_random: int, rng: np.random.Generator,
                         groups: np.ndarray | None = None, tries: int = 8) -> np.ndarray:
    """`table` with its last `n_random` columns replaced by random true negatives of each row (not of its key or
    group, not already in its row), drawn with `rng`; a row with too few true negatives keeps -1 there."""
    table = np.array(table, dtype=np.int64)
    n, m = table.shape
    keep = m - n_random
    table[:, keep:] = -1
    for column in range(keep, m):
        todo = np.arange(n)
        for _ in range(tries):
            if not todo.size:
                break
            drawn = rng.integers(0, n, size=todo.size)
            bad = _excluded(keys, groups, todo, drawn[:, None])[:, 0] | (table[todo] == drawn[:, None]).any(axis=1)
            table[todo[~bad], column] = drawn[~bad]
            todo = todo[bad]
        for row in todo:   # rows rejection sampling kept missing: drawn from their exact candidate list
            candidates = np.flatnonzero(~_excluded(keys, groups, np.array([row]), np.arange(n)[None, :])[0])
            candidates = np.setdiff1d(candidates, table[row])
            if candidates.size:
                table[row, column] = rng.choice(candidates)
    return table


def changed_negatives(old: np.ndarray | None, new: np.ndarray) -> int:
    """How many (row, negative) entries of `new` were not among that row's negatives in `old` (all, without
    an old table); -1 padding is not counted."""
    new = np.asarray(new)
    if old is None:
        return int((new >= 0).sum())
    old = np.asarray(old)
    present = (new[:, :, None] == old[:, None, :]).any(axis=2)
    return int(((new >= 0) & ~present).sum())
