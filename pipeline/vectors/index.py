"""FAISS wrappers: build, save, load and search an index over unit embeddings.

Inner product on unit vectors is cosine similarity, so the exact index is
`IndexFlatIP`; `hnsw` trades a little recall for sub-linear search on large galleries.
Row i of the index is row i of `embeddings.npy` (items.csv says which image it is).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.atomic import atomic_path
from pipeline.vectors.normalize import l2_normalize

INDEX_KINDS = ("flat", "hnsw")


def build_index(embeddings: np.ndarray, kind: str = "flat", *, hnsw_m: int = 32, ef_search: int = 128):
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"cannot index an array of shape {x.shape}")
    dim = x.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ef_search
    else:
        raise ValueError(f"unknown index kind {kind!r}; expected one of {INDEX_KINDS}")
    index.add(x)
    return index


def save_index(index, path: str | Path) -> None:
    import faiss

    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def load_index(path: str | Path):
    import faiss

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FAISS index not found: {path}")
    return faiss.read_index(str(path))


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, row indices) for each query; queries are L2-normalised here."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    return index.search(l2_normalize(q), min(k, index.ntotal))
