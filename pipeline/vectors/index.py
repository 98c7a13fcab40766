"""FAISS wrappers: build, save, load and search an index over unit embeddings, and measure its recall.

Inner product on unit vectors is cosine similarity, so every kind ranks by inner product:

* ``flat``: `IndexFlatIP`, exact; search cost grows linearly with the collection.
* ``hnsw``: `IndexHNSWFlat` (graph over the full float32 vectors); sub-linear search, a little recall lost,
  about 1.1x the memory of ``flat``.
* ``ivfpq``: `IndexIVFPQ` (inverted lists of 8-bit product-quantised residuals, ``dim / 8`` bytes per item)
  whose top ``k * refine_factor`` candidates are re-scored on 8-bit scalar-quantised copies (``dim`` bytes per
  item), wrapped in `IndexRefine`: under a third of the memory of ``flat``. Trained on a seeded sample.
* ``auto``: ``flat`` up to ``exact_limit`` items (`EXACT_LIMIT`), `LARGE_KIND` (``ivfpq``) beyond. Measured
  by bench/bench_index.py (BENCHMARKS.md, "Index by size"; 512-d, 2 shared cores): the exact index answers
  ~1,400 batched / ~60 single queries/s at 100k items (so ~30 ms per single query at 200k, inside the 100 ms
  budget of a search request), but only ~70 / ~2 at 1M. At 1M, IVF-PQ reached recall@10 0.97 at >1,000
  batched queries/s in 0.59 GB, built in 6 min; HNSW32 needed efSearch 128 for 0.977 at ~400 queries/s, in
  2.3 GB, built in 14 min.

Row i of the index is row i of `embeddings.npy` (items.csv says which image it is). Search-time settings
(``efSearch``, ``nprobe``, the refine factor) are stored inside the index, so a saved and reloaded index
searches the same way.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pipeline.core.atomic import atomic_path
from pipeline.vectors.normalize import l2_normalize

INDEX_KINDS = ("flat", "hnsw", "ivfpq", "auto")

# `auto` builds an exact index up to this many items and `LARGE_KIND` beyond (measured: BENCHMARKS.md).
EXACT_LIMIT = 200_000
LARGE_KIND = "ivfpq"

# Exact search is scored this many gallery rows at a time, so memory stays (queries x block) floats.
_EXACT_BLOCK = 32_768
# k-means wants at least this many training points per centroid (FAISS warns below 39).
_MIN_POINTS_PER_CENTROID = 39
# ... and gains little from more than this many (FAISS's own subsampling limit is 256).
_TRAIN_POINTS_PER_CENTROID = 64


def choose_kind(n_items: int, *, exact_limit: int = EXACT_LIMIT) -> str:
    """The kind `auto` builds for a collection of `n_items`: exact up to `exact_limit`, `LARGE_KIND` beyond."""
    return "flat" if n_items <= exact_limit else LARGE_KIND


def ivfpq_layout(n_items: int, dim: int) -> dict:
    """nlist, M, nbits and nprobe of the IVF-PQ index for `n_items` vectors of `dim` dimensions.

    nlist ~ 4 sqrt(N) (FAISS's guideline is 4-16 sqrt(N); the low end keeps k-means training cheap on 2 cores),
    a power of two, and small enough that every centroid gets 39 training points. M = dim / 8 sub-quantizers
    (8 dimensions, one byte each: 64 bytes per 512-d item), the largest divisor of dim not above dim / 8 when
    8 does not divide it. nbits = 8 (256 centroids per sub-quantizer) unless the collection is too small to
    train them. nprobe = 16 (nlist / 128 beyond 2,048 lists; at most nlist): in bench_index.py 16 probes gave
    recall@10 >= 0.95 at 8k (Flowers, 128 lists), 100k and 1M items (clustered, 1,024 and 2,048 lists), and
    the 1M point stayed above 1,000 queries/s on 2 cores.
    """
    if n_items < 1 or dim < 1:
        raise ValueError(f"cannot lay out an IVF-PQ index for {n_items} items of dim {dim}")
    by_size = 4 * math.sqrt(n_items)
    by_training = n_items / _MIN_POINTS_PER_CENTROID
    nlist = 2 ** max(0, int(math.floor(math.log2(max(1.0, min(by_size, by_training))))))
    m = max(d for d in range(1, max(1, dim // 8) + 1) if dim % d == 0)
    nbits = int(min(8, max(1, math.floor(math.log2(max(2.0, n_items / _MIN_POINTS_PER_CENTROID))))))
    nprobe = min(nlist, max(16, nlist // 128))
    return {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": nprobe}


def build_index(
    embeddings: np.ndarray,
    kind: str = "flat",
    *,
    hnsw_m: int = 32,
    ef_search: int = 128,
    ef_construction: int = 40,
    nprobe: int | None = None,
    refine_factor: int = 8,
    exact_limit: int = EXACT_LIMIT,
    seed: int = 0,
):
    """A FAISS index over `embeddings` (unit rows; row i becomes id i) of `kind` (see the module docstring).

    `ef_search` (HNSW), `nprobe` (IVF-PQ, default from `ivfpq_layout`) and `refine_factor` (IVF-PQ) are the
    search-time settings stored in the index (`set_search_params` changes them); `exact_limit` is where `auto`
    switches from exact to `LARGE_KIND`; `seed` picks the IVF-PQ training sample and seeds its k-means.
    """
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"cannot index an array of shape {x.shape}")
    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown index kind {kind!r}; expected one of {INDEX_KINDS}")
    if kind == "auto":
        kind = choose_kind(x.shape[0], exact_limit=exact_limit)
    n, dim = x.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
    else:
        layout = ivfpq_layout(n, dim)
        quantizer = faiss.IndexFlatIP(dim)
        coarse = faiss.IndexIVFPQ(quantizer, dim, layout["nlist"], layout["m"], layout["nbits"],
                                  faiss.METRIC_INNER_PRODUCT)
        coarse.cp.seed = seed
        coarse.nprobe = min(layout["nlist"], nprobe or layout["nprobe"])
        # PQ codes alone rank the true top 10 only ~70% right on clustered 512-d data (bench_index.py), so the
        # top k x refine_factor candidates are re-scored on 8-bit scalar-quantised copies (dim bytes per item,
        # near-exact on unit vectors): 4x smaller than float32, still far below flat and HNSW.
        refine = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        index = faiss.IndexRefine(coarse, refine)
        index.k_factor = refine_factor
        rng = np.random.default_rng(seed)
        n_train = min(n, max(_TRAIN_POINTS_PER_CENTROID * layout["nlist"],
                             _TRAIN_POINTS_PER_CENTROID * 2 ** layout["nbits"]))
        sample = np.sort(rng.choice(n, size=n_train, replace=False)) if n_train < n else slice(None)
        index.train(np.ascontiguousarray(x[sample]))
    index.add(x)
    return index


def index_kind(index) -> str:
    """"flat", "hnsw" or "ivfpq": what `build_index` built (for a bundle's card)."""
    import faiss

    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexRefine):
        index = faiss.downcast_index(index.base_index)
    for kind, cls in (("flat", faiss.IndexFlat), ("hnsw", faiss.IndexHNSW), ("ivfpq", faiss.IndexIVFPQ)):
        if isinstance(index, cls):
            return kind
    raise ValueError(f"not an index build_index makes: {type(index).__name__}")


def set_search_params(index, *, ef_search: int | None = None, nprobe: int | None = None,
                      refine_factor: int | None = None) -> None:
    """Change the search-time settings stored in `index` (those that apply to its kind; None keeps one)."""
    import faiss

    kind = index_kind(index)
    wanted = {"ef_search": ef_search, "nprobe": nprobe, "refine_factor": refine_factor}
    applies = {"flat": (), "hnsw": ("ef_search",), "ivfpq": ("nprobe", "refine_factor")}[kind]
    for name, value in wanted.items():
        if value is None:
            continue
        if name not in applies:
            raise ValueError(f"{name} does not apply to a {kind} index")
        if int(value) < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        target = faiss.downcast_index(index)
        if name == "ef_search":
            target.hnsw.efSearch = int(value)
        elif name == "refine_factor":
            target.k_factor = int(value)
        else:
            faiss.downcast_index(target.base_index).nprobe = int(value)


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
    """Top-k (scores, row indices) for each query; queries are L2-normalised here.

    Approximate indexes may return fewer than k hits: those slots hold row -1 and score -inf (FAISS itself
    writes -FLT_MAX there, a number that would pass for a score).
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    scores, rows = index.search(l2_normalize(q), min(k, index.ntotal))
    scores[rows < 0] = -np.inf
    return scores, rows


def exact_kth_scores(queries: np.ndarray, embeddings: np.ndarray, k: int) -> np.ndarray:
    """The k-th largest inner product of every query over all of `embeddings`, scored block by block
    (never a queries x N matrix larger than queries x `_EXACT_BLOCK`)."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    best = np.full((q.shape[0], k), -np.inf, dtype=np.float32)
    for start in range(0, embeddings.shape[0], _EXACT_BLOCK):
        block = np.asarray(embeddings[start:start + _EXACT_BLOCK], dtype=np.float32)
        scores = np.concatenate([best, q @ block.T], axis=1)
        best = -np.partition(-scores, k - 1, axis=1)[:, :k]
    return best.min(axis=1)


def measure_recall(index, embeddings: np.ndarray, k: int = 10, sample: int = 1000, seed: int = 0) -> float:
    """Recall@k of `index` against exact inner-product search, on a seeded sample of the indexed vectors.

    `sample` rows of `embeddings` (the vectors the index holds, row i = id i; drawn without replacement by
    `numpy.random.default_rng(seed)`) are the queries; each asks the index for k rows. A returned row counts
    as a true neighbour when its exact score reaches the query's exact k-th best score (minus 1e-5, float32
    rounding of two different summation orders), so items tied at the cut are never counted as misses.
    Recall = true neighbours / k, averaged over the queries. An exact index scores 1.0.
    """
    x = np.asarray(embeddings)
    n = x.shape[0]
    if x.ndim != 2 or n == 0:
        raise ValueError(f"cannot measure recall over an array of shape {x.shape}")
    if n != index.ntotal:
        raise ValueError(f"the index holds {index.ntotal} vectors but {n} embeddings were given")
    if k < 1 or sample < 1:
        raise ValueError(f"k and sample must be positive, got k={k}, sample={sample}")
    k = min(k, n)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False))
    queries = l2_normalize(x[rows])
    _, found = search(index, queries, k)
    kth = exact_kth_scores(queries, x, k)
    valid = found >= 0
    found_vectors = np.asarray(x[np.where(valid, found, 0).ravel()], dtype=np.float32).reshape(*found.shape, -1)
    found_scores = np.einsum("qkd,qd->qk", found_vectors, queries)
    hits = valid & (found_scores >= kth[:, None] - 1e-5)
    # FAISS never returns a row twice for one query, so counting hits counts distinct true neighbours.
    return float(hits.sum(axis=1).mean() / k)
