"""Phase-2 metrics of category re-ranking (seed 003's "hard category mask"), exact over the whole gallery.

Each query's category is the vote of its `vote_k` nearest gallery neighbours (itself left out, as in phase 2),
then the whole gallery is re-ranked towards it and scored by `retrieval.retrieve`, unchanged. The re-ranked
order is fed to `retrieve` exactly: appending √b·one-hot(category) to every unit vector (the query's predicted
category, each gallery item's own label) keeps every row's norm equal (√(1 + b)), so a gallery item's cosine
with the query becomes (cos + b·[same category]) / (1 + b) — the order of score + b for the predicted category.
"filter" is b = 4: wider than any gap between two cosines (at most 2), so the predicted category comes first
in its original order and the rest follows in theirs — what `rerank.rerank(mode="filter")` does on a
candidate pool, here over the whole gallery.

Relevance in phase 2 is "same label", the very thing the vote predicts, so a filtered query whose category is
right has nearly every relevant item first: MAP@R then measures the vote's accuracy more than the embedding
(the report says so beside the numbers).
"""
from __future__ import annotations

import logging

import numpy as np

from pipeline.vectors.index import build_index, search
from pipeline.vectors.normalize import l2_normalize
from pipeline.vectors.rerank import predict_category
from pipeline.vectors.retrieval import retrieve

FILTER_BOOST = 4.0      # > 2, the widest gap between two cosine scores
MODES = ("filter", "boost")
SCORES = ("P@1", "P@k", "MAP@R", "mAP")

log = logging.getLogger(__name__)


def neighbours_without_self(query: np.ndarray, gallery: np.ndarray, exclude: np.ndarray,
                            k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's k nearest gallery rows by cosine and their scores, its own row (exclude >= 0) left out.

    Exact (a flat inner-product index, which FAISS searches in blocks: no query × gallery matrix is kept).
    Rows are -1 (score -inf) where the gallery has fewer than k other items.
    """
    index = build_index(gallery, "flat")
    scores, rows = search(index, query, min(k + 1, len(gallery)))
    keep = (rows != exclude[:, None]) & (rows >= 0)
    # The query itself is normally first but a duplicate may outrank it: a stable sort moves the dropped
    # slot to the end and keeps the order of the rest.
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    kept = np.take_along_axis(keep, order, axis=1)
    rows = np.where(kept, np.take_along_axis(rows, order, axis=1), -1)
    scores = np.where(kept, np.take_along_axis(scores, order, axis=1), -np.inf).astype(np.float32)
    if rows.shape[1] < k:
        pad = k - rows.shape[1]
        rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return rows, scores


def with_category(unit: np.ndarray, codes: np.ndarray, n_codes: int, boost: float) -> np.ndarray:
    """unit vectors with √boost·one-hot(code) appended (every row's norm becomes √(1 + boost))."""
    onehot = np.zeros((len(unit), n_codes), dtype=np.float32)
    onehot[np.arange(len(unit)), codes] = np.sqrt(boost)
    return np.concatenate([np.asarray(unit, dtype=np.float32), onehot], axis=1)


def evaluate_reranking(query: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray,
                       gallery_labels: np.ndarray, *, exclude: np.ndarray, settings,
                       baseline: dict | None = None, vote: str = "vote") -> dict:
    """metrics.json's "rerank": the metrics without re-ranking and with each mode, and the vote's accuracy.

    query, gallery: embeddings (normalised here). exclude: (n_queries,) gallery row of each query, -1 where it is
    not in the gallery. settings: phase 2's (k, chunk_size, rerank: a subset of MODES, rerank_boost: b for
    "boost", rerank_vote_k). baseline: the unit/cosine metrics already
    computed (saves a pass); computed here when None. Returns {"vote_k", "vote", "vote_accuracy",
    "n_queries", "rows": [{"mode", "boost", SCORES...}]}.
    """
    k, chunk_size, modes = settings.k, settings.chunk_size, settings.rerank
    boost, vote_k = settings.rerank_boost, settings.rerank_vote_k
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown re-rank mode(s) {unknown}; expected some of {MODES}")
    query = l2_normalize(np.asarray(query, dtype=np.float32))
    gallery = l2_normalize(np.asarray(gallery, dtype=np.float32))
    exclude = np.asarray(exclude, dtype=np.int64)
    categories, gallery_codes = np.unique(np.asarray(gallery_labels), return_inverse=True)
    # A query whose label no gallery item has gets code -1: its category can never be predicted right.
    position = np.searchsorted(categories, np.asarray(query_labels))
    position = np.clip(position, 0, len(categories) - 1)
    query_codes = np.where(categories[position] == np.asarray(query_labels), position, -1)

    rows, scores = neighbours_without_self(query, gallery, exclude, vote_k)
    valid = rows >= 0
    predicted = predict_category(gallery_codes[np.where(valid, rows, 0)], scores, method=vote, valid=valid)
    if baseline is None:
        baseline = retrieve(query, query_labels, gallery, gallery_labels, k=k, exclude=exclude,
                            chunk_size=chunk_size).metrics
    table = [{"mode": "none", "boost": None, **{name: baseline.get(name) for name in SCORES}}]
    gallery_side = {}
    for mode in modes:
        b = FILTER_BOOST if mode == "filter" else float(boost)
        if b not in gallery_side:
            gallery_side[b] = with_category(gallery, gallery_codes, len(categories), b)
        found = retrieve(with_category(query, predicted, len(categories), b), query_labels, gallery_side[b],
                         gallery_labels, k=k, exclude=exclude, chunk_size=chunk_size)
        table.append({"mode": mode, "boost": None if mode == "filter" else b,
                      **{name: found.metrics.get(name) for name in SCORES}})
        log.info("re-ranking %s: P@1 %.3f → %.3f, MAP@R %.3f → %.3f", mode, table[0]["P@1"], table[-1]["P@1"],
                 table[0]["MAP@R"], table[-1]["MAP@R"])
    return {"vote": vote, "vote_k": int(vote_k), "vote_accuracy": float(np.mean(predicted == query_codes)),
            "n_queries": int(len(query)), "k": int(k), "rows": table}

