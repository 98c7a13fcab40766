"""Category re-ranking of search results (the "hard category mask") and exact-match metadata filters.

A query's category is predicted from the labels of its nearest gallery neighbours (`predict_category`), then its
ranked candidates (over-fetched from the index, e.g. 5k for a top k) are re-ordered towards that category
(`rerank`). `filter_mask` turns `column=value` filters over the item table into a row mask and `apply_mask`
keeps only the candidates it allows. Everything works on a batch of queries at once: candidates are
(n_queries, n_candidates) arrays of gallery rows, best first, with their scores; a row of -1 is FAISS's padding
(fewer hits than asked) and always stays last.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

VOTE_METHODS = ("vote", "weighted")
RERANK_MODES = ("filter", "boost")


def predict_category(neighbour_labels: np.ndarray, neighbour_scores: np.ndarray | None = None,
                     method: str = "vote", valid: np.ndarray | None = None) -> np.ndarray:
    """The category of each query by a vote of its neighbours' labels.

    neighbour_labels: (n_queries, k) labels of each query's neighbours, best first (ints or strings). For a
    query that is itself in the gallery, leave it out of its own neighbours (as phase 2 does).
    method "vote": each neighbour gives one vote; "weighted": each gives its score (similarity, higher is
    better; a negative score counts as 0, a dissimilar neighbour being no evidence for its label).
    valid: optional (n_queries, k) bool, False for padding slots, which do not vote.
    Ties (equal vote counts, or exactly equal score sums) go to the tied label whose best-ranked neighbour comes
    first, i.e. the nearest neighbour among the tied labels decides. A query without any valid neighbour gets the
    label of its first slot. Returns (n_queries,) labels of neighbour_labels' dtype.
    """
    labels = np.asarray(neighbour_labels)
    if labels.ndim != 2 or labels.shape[1] == 0:
        raise ValueError(f"neighbour_labels must be (n_queries, k) with k >= 1, got shape {labels.shape}")
    if method not in VOTE_METHODS:
        raise ValueError(f"unknown vote method {method!r}; expected one of {VOTE_METHODS}")
    n_queries, k = labels.shape
    if method == "weighted":
        if neighbour_scores is None:
            raise ValueError('method "weighted" needs neighbour_scores')
        weights = np.maximum(np.asarray(neighbour_scores, dtype=np.float64), 0.0)
        if weights.shape != labels.shape:
            raise ValueError(f"neighbour_scores has shape {weights.shape}, neighbour_labels {labels.shape}")
        weights = np.nan_to_num(weights, nan=0.0, posinf=0.0)
    else:
        weights = np.ones(labels.shape, dtype=np.float64)
    present = np.ones(labels.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    if present.shape != labels.shape:
        raise ValueError(f"valid has shape {present.shape}, neighbour_labels {labels.shape}")
    weights = np.where(present, weights, 0.0)

    uniques, codes = np.unique(labels, return_inverse=True)
    codes = codes.reshape(labels.shape)
    n_codes = len(uniques)
    flat = (np.arange(n_queries)[:, None] * n_codes + codes).ravel()
    totals = np.bincount(flat, weights=weights.ravel(), minlength=n_queries * n_codes).reshape(n_queries, n_codes)
    # First (best) rank at which each label appears among the query's valid neighbours; k where it does not.
    rank = np.broadcast_to(np.arange(k), labels.shape)
    first_rank = np.full(n_queries * n_codes, k, dtype=np.int64)
    np.minimum.at(first_rank, flat, np.where(present, rank, k).ravel())
    first_rank = first_rank.reshape(n_queries, n_codes)
    tied_best = (totals == totals.max(axis=1, keepdims=True)) & (first_rank < k)
    winner = np.argmin(np.where(tied_best, first_rank, k + 1), axis=1)
    no_vote = ~tied_best.any(axis=1)
    winner[no_vote] = codes[no_vote, 0]
    return uniques[winner]


def rerank(candidates: np.ndarray, scores: np.ndarray, candidate_labels: np.ndarray, category,
           mode: str = "filter", boost: float = 0.1, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Re-order each query's candidates towards its predicted `category`; returns (rows, scores), k columns.

    candidates, scores, candidate_labels: (n_queries, m) gallery rows (best first, -1 = padding), their scores
    and labels. category: (n_queries,) predicted labels, or one label for every query.
    mode "filter": the candidates of the predicted category first, in their original order; if fewer than k of
    them exist, the others follow, also in their original order (a fallback, so a query still gets k results
    when its category is rare among its candidates or mispredicted). Scores are returned unchanged, so they
    descend within each of the two blocks. mode "boost": `boost` is added to the score of every candidate of
    the predicted category and all are re-sorted by the new score (equal ones keep their original order);
    the boosted scores are returned. Padding stays last in both modes. k: columns to keep (default m).
    """
    rows = np.asarray(candidates)
    values = np.asarray(scores, dtype=np.float32)
    labels = np.asarray(candidate_labels)
    if rows.ndim != 2 or values.shape != rows.shape or labels.shape != rows.shape:
        raise ValueError(f"candidates {rows.shape}, scores {values.shape} and candidate_labels {labels.shape} "
                         "must be equal (n_queries, m) arrays")
    if mode not in RERANK_MODES:
        raise ValueError(f"unknown re-rank mode {mode!r}; expected one of {RERANK_MODES}")
    wanted = np.asarray(category)
    if wanted.ndim == 0:
        wanted = np.full(rows.shape[0], wanted)
    if wanted.shape != (rows.shape[0],):
        raise ValueError(f"category must be one label or one per query ({rows.shape[0]}), got shape {wanted.shape}")
    k = rows.shape[1] if k is None else min(int(k), rows.shape[1])
    real = rows >= 0
    matches = real & (labels == wanted[:, None])
    if mode == "filter":
        # 0: the category, 1: the rest, 2: padding; a stable sort keeps the original order inside each group.
        key = np.where(matches, 0, np.where(real, 1, 2))
        order = np.argsort(key, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(rows, order, axis=1), np.take_along_axis(values, order, axis=1)
    boosted = np.where(matches, values + np.float32(boost), values)
    boosted = np.where(real, boosted, -np.inf).astype(np.float32)
    order = np.argsort(-boosted, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(rows, order, axis=1), np.take_along_axis(boosted, order, axis=1)


def filter_mask(table_columns: Mapping[str, np.ndarray], filters: Mapping[str, object]) -> np.ndarray:
    """(n_items,) bool: the items whose every filtered column equals the filter's value (all filters must hold).

    table_columns: column name -> (n_items,) array (the item table). A filter value may be a list/tuple/set
    (any of its values matches). A string value on a numeric column is converted to the column's type
    ("3" matches 3), as filters typed on a command line are strings. No filters: every item.
    """
    columns = {name: np.asarray(values) for name, values in table_columns.items()}
    lengths = {len(values) for values in columns.values()}
    if len(lengths) > 1:
        raise ValueError(f"the item table's columns differ in length: {sorted(lengths)}")
    unknown = [name for name in filters if name not in columns]
    if unknown:
        raise ValueError(f"unknown filter column(s) {', '.join(map(repr, unknown))}; "
                         f"the item table has: {', '.join(columns)}")
    n_items = lengths.pop() if lengths else 0
    keep = np.ones(n_items, dtype=bool)
    for name, value in filters.items():
        column = columns[name]
        accepted = list(value) if isinstance(value, (list, tuple, set, frozenset)) else [value]
        matches = np.zeros(n_items, dtype=bool)
        for v in accepted:
            # `==` per value rather than np.isin: object columns (text with missing values) cannot be sorted.
            matches |= np.broadcast_to(np.asarray(column == _as_column_type(v, column, name), dtype=bool), n_items)
        keep &= matches
    return keep


def apply_mask(candidates: np.ndarray, scores: np.ndarray, keep: np.ndarray,
               k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Only the candidates whose gallery row `keep` allows, in their original order, then padding
    (row -1, score -inf) to k columns (default m)."""
    rows = np.asarray(candidates)
    values = np.asarray(scores, dtype=np.float32)
    allowed = np.asarray(keep, dtype=bool)
    if rows.ndim != 2 or values.shape != rows.shape:
        raise ValueError(f"candidates {rows.shape} and scores {values.shape} must be equal (n_queries, m) arrays")
    k = rows.shape[1] if k is None else min(int(k), rows.shape[1])
    passes = (rows >= 0) & allowed[np.where(rows >= 0, rows, 0)]
    order = np.argsort(~passes, axis=1, kind="stable")[:, :k]
    kept = np.take_along_axis(passes, order, axis=1)
    out_rows = np.where(kept, np.take_along_axis(rows, order, axis=1), -1)
    out_scores = np.where(kept, np.take_along_axis(values, order, axis=1), -np.inf).astype(np.float32)
    return out_rows, out_scores


def _as_column_type(value, column: np.ndarray, name: str):
    if isinstance(value, str) and column.dtype.kind in "biuf":
        try:
            return column.dtype.type(float(value)) if column.dtype.kind == "f" else column.dtype.type(int(value))
        except ValueError:
            raise ValueError(f"filter {name}={value!r}: column {name!r} holds numbers") from None
    return value
