"""Text ↔ image retrieval and zero-shot classification, on unit vectors of one shared space (CLIP).

Both are exact retrieval (`retrieval.retrieve`, cosine, chunked: never a queries × gallery matrix beyond a
chunk) with another notion of relevance, so every definition of retrieval.py holds: ties are ordered by
lower gallery index, queries without any relevant item (R = 0) are left out of every average and counted.

* Relevance by key. A query is relevant to the gallery items whose key equals its own. For text → image
  with "item" relevance the key is the item (the text's own image is the one relevant image, R = 1, so
  MAP@R = R@1 and AP = 1 / rank of the own image); with "class" relevance it is the label (every image of
  the text's class). Image → text alike, the gallery being texts. Nothing is left out of its own ranking:
  a text and an image are never the same gallery entry.
* R@k (k in `RECALL_AT`) = 1 if at least one relevant item is among the first min(k, gallery size)
  results; MAP@R and mAP as in retrieval.py.
* Zero-shot classification: each image ranks the class prompts (one unit vector per class, in label
  order); top-k accuracy = the share of images whose own class is among the first min(k, n_classes)
  prompts. It is text → image retrieval turned around, with the class index as the key.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.vectors.retrieval import retrieve

RECALL_AT = (1, 5, 10)
ZERO_SHOT_TOP = (1, 5)


@dataclass
class CrossModalResult:
    # "R@1", "R@5", "R@10", "MAP@R", "mAP": means over evaluated queries (NaN if none); "n_queries",
    # "n_queries_evaluated", "n_queries_without_positive", "gallery_size": ints.
    metrics: dict
    # (n_queries, max k) int64 gallery indices, best first; -1 where the gallery is smaller.
    neighbours: np.ndarray
    # (n_queries, max k) float32 cosine similarities; NaN at padding.
    neighbour_scores: np.ndarray
    # (n_queries,) int64: number of relevant gallery items of each query (R).
    n_relevant: np.ndarray


def recall_at(neighbours: np.ndarray, query_keys: np.ndarray, gallery_keys: np.ndarray, k: int) -> np.ndarray:
    """(n_queries,) bool: a gallery item with the query's key is among the first k neighbours."""
    top = neighbours[:, :k]
    hits = (top >= 0) & (np.asarray(gallery_keys)[np.maximum(top, 0)] == np.asarray(query_keys)[:, None])
    return hits.any(axis=1)


def crossmodal_retrieval(query: np.ndarray, query_keys: np.ndarray, gallery: np.ndarray, gallery_keys: np.ndarray,
                         *, ks: tuple[int, ...] = RECALL_AT, chunk_size: int = 1024) -> CrossModalResult:
    """Rank the gallery (one modality) for every query (the other) and score it: R@k for every k of `ks`,
    MAP@R and mAP. Relevance: equal keys (item ids for "item" relevance, labels for "class")."""
    query_keys, gallery_keys = np.asarray(query_keys), np.asarray(gallery_keys)
    result = retrieve(query, query_keys, gallery, gallery_keys, metric="cosine", k=max(ks), chunk_size=chunk_size)
    n_relevant = result.per_query["n_relevant"]
    evaluated = n_relevant > 0
    metrics = {}
    for k in ks:
        hits = recall_at(result.neighbours, query_keys, gallery_keys, k)
        metrics[f"R@{k}"] = float(hits[evaluated].mean()) if evaluated.any() else float("nan")
    metrics["MAP@R"] = result.metrics["MAP@R"]
    metrics["mAP"] = result.metrics["mAP"]
    metrics.update({name: result.metrics[name] for name in
                    ("n_queries", "n_queries_evaluated", "n_queries_without_positive", "gallery_size")})
    return CrossModalResult(metrics, result.neighbours, result.neighbour_scores, n_relevant)


def zero_shot(images: np.ndarray, labels: np.ndarray, class_prompts: np.ndarray, *,
              top: tuple[int, ...] = ZERO_SHOT_TOP, chunk_size: int = 1024) -> dict:
    """Zero-shot classification of `images` (labels = class indices into `class_prompts`' rows):
    {"top-1": accuracy, "top-5": ..., "k": {"top-5": effective k, ...}, "n_queries", "n_classes",
    "predicted": (n,) int64 best class, "per_class": [{"label", "n", "top-1", "top-5"}] for the labels present}."""
    labels = np.asarray(labels, dtype=np.int64)
    n_classes = int(class_prompts.shape[0])
    result = retrieve(images, labels, class_prompts, np.arange(n_classes), metric="cosine", k=max(top),
                      chunk_size=chunk_size)
    hits = {f"top-{k}": recall_at(result.neighbours, labels, np.arange(n_classes), k) for k in top}
    out = {name: float(hit.mean()) if len(hit) else float("nan") for name, hit in hits.items()}
    out["k"] = {f"top-{k}": min(k, n_classes) for k in top}
    out["n_queries"] = int(len(labels))
    out["n_classes"] = n_classes
    out["predicted"] = result.neighbours[:, 0].copy()
    out["per_class"] = [{"label": int(label), "n": int((labels == label).sum()),
                         **{name: float(hit[labels == label].mean()) for name, hit in hits.items()}}
                        for label in np.unique(labels)]
    return out
