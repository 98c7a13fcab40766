"""Retrieval metrics the way pytorch-metric-learning's AccuracyCalculator computes them, with faiss-cpu and numpy
(no torch): the yardstick embedlab's evaluation is compared with in bench/bench_eval_scale.py (issue 13).

AccuracyCalculator (pytorch-metric-learning 2.x, `utils/accuracy_calculator.py`) does:

1. k = the size of the largest class among the reference labels (its default `k=None` -> "max_bin_count"),
   so every query's R relevant items can fit in its neighbour list;
2. one exact FAISS k-NN search of the queries against the reference set (its `FaissKNN`; for cosine similarity
   on unit vectors an inner-product index), asking for k + 1 neighbours when the queries are part of the
   reference ("embeddings come from the same source") and dropping the query itself;
3. every metric from the (n_queries, k) neighbour labels: precision_at_1, r_precision and
   mean_average_precision_at_r, with R = the number of reference items of the query's label (itself excluded);
   queries with R = 0 are left out.

Where a query's own item is not the first neighbour (an exact duplicate scored first), pytorch-metric-learning
drops the first neighbour anyway; here the query's own index is dropped wherever it is (the intended protocol,
the one embedlab uses), so both can be compared query for query.

What this cannot give: the full-ranking mAP (embedlab's `mAP`): the neighbour list stops at k, so the ranks of
relevant items beyond the largest class size are unknown. `AP@k_max` below is the average precision over the
k retrieved items only (pytorch-metric-learning's `mean_average_precision`), a different number.
The memory cost is the point of the comparison: n_queries x (k + 1) distances and ids (12 bytes each), with k
the largest class: 9,000 x 6,001 for CIFAR-10 in its 60,000 images (648 MB), and it grows with the gallery.
"""
from __future__ import annotations

import numpy as np

# Queries whose metrics are computed at once; reference rows added to the index at once.
_CHUNK = 1024
_ADD_ROWS = 65536


def knn_metrics(query: np.ndarray, query_labels: np.ndarray, reference: np.ndarray, reference_labels: np.ndarray,
                query_ids_in_reference: np.ndarray | None = None) -> dict:
    """P@1, R-precision, MAP@R (and AP@k_max) of cosine k-NN on unit vectors, AccuracyCalculator style.

    query_ids_in_reference: each query's index in `reference` (-1 when it is not there), or None when no
    query is part of the reference."""
    import faiss

    query = np.ascontiguousarray(query, dtype=np.float32)
    query_labels = np.asarray(query_labels)
    reference_labels = np.asarray(reference_labels)
    n_queries = len(query)
    own = np.full(n_queries, -1) if query_ids_in_reference is None else np.asarray(query_ids_in_reference)
    same_source = bool((own >= 0).any())

    _, counts = np.unique(reference_labels, return_counts=True)
    k = int(counts.max())
    index = faiss.IndexFlatIP(reference.shape[1])
    # In blocks: a memory-mapped reference is copied once, into FAISS, not first into RAM as a whole.
    for start in range(0, len(reference), _ADD_ROWS):
        index.add(np.ascontiguousarray(reference[start:start + _ADD_ROWS], dtype=np.float32))
    _, found = index.search(query, k + 1 if same_source else k)

    # Drop each query's own item (or, where it is not among the neighbours, the last one).
    if same_source:
        is_own = found == own[:, None]
        drop = np.where(is_own.any(axis=1), is_own.argmax(axis=1), k)
        keep = np.ones(found.shape, dtype=bool)
        keep[np.arange(n_queries), drop] = False
        found = found[keep].reshape(n_queries, k)

    label_index = {label: i for i, label in enumerate(np.unique(reference_labels))}
    class_size = counts[[label_index.get(label, 0) for label in query_labels.tolist()]]
    known = np.array([label in label_index for label in query_labels.tolist()])
    own_is_relevant = (own >= 0) & (reference_labels[np.maximum(own, 0)] == query_labels)
    n_relevant = np.where(known, class_size, 0) - own_is_relevant
    evaluated = n_relevant > 0

    # The metrics in query chunks, so their temporaries do not add to the neighbour lists' own memory.
    map_at_r, r_precision, ap_at_k = (np.zeros(n_queries) for _ in range(3))
    first_relevant = np.zeros(n_queries, dtype=bool)
    ranks = np.arange(1, k + 1)
    for start in range(0, n_queries, _CHUNK):
        rows = slice(start, start + _CHUNK)
        relevant = reference_labels[found[rows]] == query_labels[rows, None]
        within_r = ranks[None, :] <= n_relevant[rows, None]
        precision_at = np.cumsum(relevant, axis=1) / ranks
        r = np.maximum(n_relevant[rows], 1)
        map_at_r[rows] = np.sum(precision_at * (relevant & within_r), axis=1) / r
        r_precision[rows] = np.sum(relevant & within_r, axis=1) / r
        ap_at_k[rows] = np.sum(precision_at * relevant, axis=1) / np.maximum(relevant.sum(axis=1), 1)
        first_relevant[rows] = relevant[:, 0]

    def mean(values: np.ndarray) -> float:
        return float(values[evaluated].mean()) if evaluated.any() else float("nan")

    return {
        "P@1": mean(first_relevant.astype(np.float64)),
        "R-precision": mean(r_precision),
        "MAP@R": mean(map_at_r),
        "AP@k_max": mean(ap_at_k),
        "k": k,
        "n_queries": int(n_queries),
        "n_queries_evaluated": int(evaluated.sum()),
        "neighbour_list_bytes": int(found.size * (4 + 8)),
        "per_query": {"P@1": first_relevant, "MAP@R": map_at_r, "R-precision": r_precision,
                      "evaluated": evaluated},
        "first_neighbour": found[:, 0],
    }
