"""Exact nearest-neighbour search and retrieval metrics, in chunks, in numpy.

Definitions (every metric is computed per query, then averaged):

* Scores. ``metric="cosine"``: rows are L2-normalised (a zero row stays zero,
  so its scores are 0, never NaN) and the score is the dot product, higher is
  better. ``metric="euclidean"``: the vectors are used as given and ranked by
  ascending euclidean distance; internally the float32 key ``2 q.g - ||g||^2``
  (same order as ascending distance) is what is sorted, and the reported
  neighbour score is the distance itself, ``sqrt(max(||q||^2 - key, 0))``.
  Ties are exact equalities of these float32 scores.
* Exclusion. ``exclude[q]`` (or -1) is the gallery index of query ``q`` itself;
  that item is removed from q's ranking (leave-one-out when the queries are part
  of the gallery), so q sees a gallery of N-1 items instead of N.
* Relevant items of a query: gallery items (after exclusion) whose label equals
  the query's label (``==``; ints, strings, ...). R = their count. Queries with
  R = 0 ("without positive", e.g. the only member of its class in leave-one-out)
  get NaN per-query metrics, are left out of every average and are counted in
  ``n_queries_without_positive`` (as pytorch-metric-learning does).
* Ranking: score descending (distance ascending); equal scores are ordered by
  lower gallery index first. This order defines the neighbour lists and
  P@1, P@k, R@k, R-precision and MAP@R. ``rank`` below is 1-based.
* Effective k: ``k_eff = min(k, gallery size seen by the query)`` (N, or N-1
  with exclusion). ``metrics["k"]`` is the smallest k_eff over the queries.
* P@1 = 1 if the first item is relevant, else 0.
* P@k = (#relevant in the top k_eff) / k_eff.
* R@k ("recall at k" of metric-learning papers) = 1 if at least one relevant item
  is in the top k_eff, else 0.
* R-precision = (#relevant in the top R) / R.
* MAP@R (Musgrave et al. 2020, "A Metric Learning Reality Check")
  = (1/R) * sum_{i=1..R} P(i) * rel(i), where P(i) is the precision at rank i
  and rel(i) is 1 if the item at rank i is relevant.
* AP (averaged into mAP) is over the FULL ranking with scikit-learn's tie
  semantics, i.e. it equals ``sklearn.metrics.average_precision_score(
  y_true=relevance, y_score=score)`` of the query:
  AP = (1/R) * sum_{relevant j} (#relevant with score >= s_j) / (#items with score >= s_j);
  items with equal scores enter together, so AP does not depend on the index order.

Unit vectors: euclidean ranks like cosine (2 - 2 cos); ``unit_identity`` reads one off the other and checks it.

How it is computed. Query rows are scored in blocks: at most ``chunk_size`` rows
are in flight at once (split across worker threads; fewer when their scores would
exceed gallery.SCORE_BUDGET_BYTES), so only that many rows of N float32 scores plus
their sorted copy ever exist; the gallery is scored by gallery.ScoredGallery (in RAM,
or memory-mapped / float16 a segment at a time). Each score row is value-sorted once
(``np.sort`` is several times cheaper than ``np.argsort``), or only its items scoring
at least the query's lowest relevant score or k-th score, the only ones any metric
depends on (gallery.sorted_candidates); the ranks of the
relevant items come from ``np.searchsorted`` of their scores into the sorted row,
and every metric is a function of those ranks: with ranks r_1 < ... < r_R,
AP = (1/R) sum_m m / r_m (without ties) and MAP@R = (1/R) sum_{m: r_m <= R} m / r_m.
Equal float32 scores are common at scale (most rows of 60,000 clustered 512-d
vectors have some), so ties are resolved exactly but only where they touch a
relevant item: the size of each equal-score group is read off the sorted row,
and gallery-index order is looked up (one scan of the row) only for groups that
mix relevant and irrelevant items and start within the first max(R, k) ranks,
the only ranks any index-order-dependent metric sees. The top-k neighbours are
the items at or above the k-th largest score, ordered stably. Worker threads run
numpy's sort and searchsorted, which release the GIL, and single-threaded BLAS
(threadpoolctl limits it for the duration of the call): a multi-threaded BLAS
would keep its threads spinning after each matmul, stealing the cores the
sorting needs.
"""
from __future__ import annotations

import contextlib
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np

from pipeline.vectors.gallery import ScoredGallery, rows_in_flight, sorted_candidates
from pipeline.core.cpus import available_cores
from pipeline.vectors import ranks
from pipeline.vectors.ranks import RankPlan, score_rows
from pipeline.vectors.segment_scan import CandidateRows, collect, key_error_margin, lower_bounds
from pipeline.vectors.normalize import l2_normalize, row_sq_norms

METRICS = ("cosine", "euclidean")
# How score rows are produced: "rows" (whole rows, a budget of them in flight), "segments" (large query blocks
# against gallery segments, candidates only: segment_scan), "auto" (segments from SEGMENT_SCAN_MIN_GALLERY items).
SCANS = ("auto", "rows", "segments")
# At 200,000 items the score budget already holds fewer than 500 whole rows (bench 18: the skinny products
# of 1M-item rows ran at ~60 % of the product speed FAISS gets from 4,096-query blocks).
SEGMENT_SCAN_MIN_GALLERY = 200_000

# Per-query array name -> name of its mean in `RetrievalResult.metrics`.
_MEAN_OF = {"P@1": "P@1", "P@k": "P@k", "R@k": "R@k", "AP": "mAP", "MAP@R": "MAP@R", "R-precision": "R-precision"}
# The means a RetrievalResult reports, in the order every table shows them.
SCORE_NAMES: tuple[str, ...] = tuple(_MEAN_OF.values())

# A progress bar is shown (when asked for) only for passes of more query chunks than this.
PROGRESS_MIN_CHUNKS = 3

# Blocks sorted whole before the candidate bounds stop being computed (see ranks.RankPlan.full_sorts).
_PROBE_BLOCKS = 2

@dataclass
class RetrievalResult:
    # "P@1", "P@k", "R@k", "mAP", "MAP@R", "R-precision": means over evaluated
    # queries (Python floats, NaN if none); "k" (smallest effective k), "n_queries",
    # "n_queries_evaluated", "n_queries_without_positive", "gallery_size": ints.
    metrics: dict
    # (n_queries, k) int64 gallery indices, best first; -1 where fewer than k candidates.
    neighbours: np.ndarray
    # (n_queries, k) float32: cosine similarity, or euclidean distance (not squared); NaN at padding.
    neighbour_scores: np.ndarray
    # "AP", "MAP@R", "P@1", "P@k", "R@k", "R-precision": (n_queries,) float64, NaN for
    # queries without positive; "n_relevant": (n_queries,) int64 R.
    per_query: dict
    # (gallery_size,) int64: number of queries with the item in their top k (hubness).
    k_occurrence: np.ndarray


def retrieve(
    query: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    *,
    metric: str = "cosine",
    k: int = 5,
    exclude: np.ndarray | None = None,
    chunk_size: int = 1024,
    progress: bool = False,
    scan: str = "auto",
) -> RetrievalResult:
    """Rank the gallery for every query and score the rankings (see module docstring)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if scan not in SCANS:
        raise ValueError(f"scan must be one of {SCANS}, got {scan!r}")
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    k, chunk_size = int(k), int(chunk_size)

    same_matrix = query is gallery
    scored = ScoredGallery(gallery, metric)
    gallery_size = scored.size
    if same_matrix and scored.resident_array is not None:
        query32 = scored.resident_array  # already float32 (and normalised for cosine)
    else:
        query32 = _as_float32_matrix(query, "query")
        if metric == "cosine":
            query32 = l2_normalize(query32)
    n_queries = query32.shape[0]
    if gallery_size == 0:
        raise ValueError("the gallery is empty")
    if query32.shape[1] != scored.dim:
        raise ValueError(f"query dim {query32.shape[1]} != gallery dim {scored.dim}")
    query_codes, gallery_codes = _encode_labels(query_labels, gallery_labels, n_queries, gallery_size)
    exclude_idx = check_exclude(exclude, n_queries, gallery_size)

    query_sq_norms = None
    if metric == "euclidean":
        gallery_sq64 = scored.sq_norms
        query_sq_norms = gallery_sq64 if same_matrix else row_sq_norms(query32)
        # 2 q.g - ||g||^2 must not overflow float32, or ranks would be meaningless.
        if max(gallery_sq64.max(initial=0.0), query_sq_norms.max(initial=0.0)) > np.finfo(np.float32).max / 8:
            raise ValueError("vector norms too large for float32 euclidean scoring")

    # Class membership as sorted index lists: the relevant set of a query is then a
    # lookup instead of an n_queries x N label comparison.
    n_codes = int(max(query_codes.max(initial=-1), gallery_codes.max(initial=-1))) + 1
    order = np.argsort(gallery_codes, kind="stable")
    bounds = np.searchsorted(gallery_codes[order], np.arange(n_codes + 1))
    members_of = [order[bounds[c]:bounds[c + 1]] for c in range(n_codes)]
    class_sizes = np.diff(bounds)

    has_exclusion = exclude_idx >= 0
    excluded_is_member = has_exclusion & (gallery_codes[np.maximum(exclude_idx, 0)] == query_codes)
    n_relevant = class_sizes[query_codes] - excluded_is_member
    k_eff = np.minimum(k, gallery_size - has_exclusion).astype(np.int64)

    plan = RankPlan(
        gallery_size=gallery_size,
        metric=metric,
        query_codes=query_codes,
        gallery_codes=gallery_codes,
        members_of=members_of,
        n_relevant=n_relevant.astype(np.int64),
        excluded_is_member=excluded_is_member,
        k_eff=k_eff,
        query_sq_norms=query_sq_norms,
        query=query32,
        gallery=scored,
        exclude=exclude_idx,
        neighbours=np.full((n_queries, k), -1, dtype=np.int64),
        neighbour_scores=np.full((n_queries, k), np.nan, dtype=np.float32),
        per_query={name: np.full(n_queries, np.nan) for name in _MEAN_OF},
    )
    plan.per_query["n_relevant"] = plan.n_relevant

    # Each worker thread scores its own block of rows end to end (matmul, sort,
    # ranks) with single-threaded BLAS: numpy's sort and searchsorted release the
    # GIL, and a multi-threaded BLAS would keep its threads spinning after every
    # matmul, stealing the cores the sorting needs. At most chunk_size rows are in
    # flight at once (fewer for large galleries: gallery.rows_in_flight), split across the workers.
    n_workers = max(1, min(_worker_count(), n_queries))
    block_rows = max(1, -(-rows_in_flight(chunk_size, gallery_size, n_workers) // n_workers))
    if scan == "segments" or (scan == "auto" and gallery_size >= SEGMENT_SCAN_MIN_GALLERY):
        # Blocks of up to chunk_size queries in class order: a block's pre-pass scores few classes' members.
        scan_rows = max(1, min(chunk_size, -(-n_queries // n_workers)))
        order = np.argsort(query_codes, kind="stable")
        blocks = [order[start:start + scan_rows] for start in range(0, n_queries, scan_rows)]
        work = _process_segment_block
    else:
        blocks = [np.arange(start, min(start + block_rows, n_queries)) for start in range(0, n_queries, block_rows)]
        work = _process_block
    buffers = threading.local()
    blas_limit = _single_threaded_blas() if n_workers > 1 else contextlib.nullcontext()
    # A bar only for passes long enough to wait for: it counts queries, so tqdm's
    # rate reads as queries/s and its estimate as the time left.
    n_chunks = -(-n_queries // chunk_size)
    bar = None
    if progress and n_chunks > PROGRESS_MIN_CHUNKS:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_queries, desc=f"retrieval ({metric})", unit=" queries", dynamic_ncols=True)
    with blas_limit, ThreadPoolExecutor(max_workers=n_workers) as pool:
        jobs = {pool.submit(work, plan, query_ids, block_rows, buffers): query_ids.size for query_ids in blocks}
        try:
            for job in as_completed(jobs):
                job.result()
                if bar is not None:
                    bar.update(jobs[job])
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            if bar is not None:
                bar.close()

    valid = plan.neighbours >= 0
    k_occurrence = np.bincount(plan.neighbours[valid], minlength=gallery_size).astype(np.int64)
    evaluated = plan.n_relevant > 0
    metrics: dict = {}
    for name, mean_name in _MEAN_OF.items():
        metrics[mean_name] = float(plan.per_query[name][evaluated].mean()) if evaluated.any() else float("nan")
    metrics["k"] = int(k_eff.min()) if n_queries else int(min(k, gallery_size))
    metrics["n_queries"] = int(n_queries)
    metrics["n_queries_evaluated"] = int(evaluated.sum())
    metrics["n_queries_without_positive"] = int(n_queries - evaluated.sum())
    metrics["gallery_size"] = int(gallery_size)
    return RetrievalResult(
        metrics=metrics,
        neighbours=plan.neighbours,
        neighbour_scores=plan.neighbour_scores,
        per_query=plan.per_query,
        k_occurrence=k_occurrence,
    )


def _process_segment_block(plan: RankPlan, query_ids: np.ndarray, block_rows: int, buffers: threading.local) -> None:
    """A block of queries through the segment scan (segment_scan), or whole rows when candidates do not pay."""
    if not plan.whole_rows_pay:
        query, exclude, k_eff = plan.query[query_ids], plan.exclude[query_ids], plan.k_eff[query_ids]
        sq_norms = None if plan.query_sq_norms is None else plan.query_sq_norms[query_ids]
        bound = lower_bounds(plan.gallery, query, plan.query_codes[query_ids], plan.members_of, exclude, k_eff,
                             key_error_margin(plan.gallery, sq_norms))
        candidates = collect(plan.gallery, query, bound, exclude, k_eff)
        if candidates is not None:
            # -inf padding sorts to the left, as sorted_candidates pads.
            score_rows(plan, candidates, np.sort(candidates.scores, axis=1), query_ids)
            return
        plan.whole_rows_pay = True
    for start in range(0, query_ids.size, block_rows):
        _process_block(plan, query_ids[start:start + block_rows], block_rows, buffers)


def _process_block(plan: RankPlan, query_ids: np.ndarray, block_rows: int, buffers: threading.local) -> None:
    gallery_size = plan.gallery_size
    if getattr(buffers, "scores", None) is None:
        # Reused across the blocks of one thread: fresh 100 MB arrays per block
        # would mostly cost page faults.
        buffers.scores = np.empty((block_rows, gallery_size), dtype=np.float32)
        buffers.sorted = np.empty(block_rows * gallery_size, dtype=np.float32)
    scores = buffers.scores[: query_ids.size]
    plan.gallery.score_into(plan.query[query_ids], scores)
    excluded = plan.exclude[query_ids]
    rows = np.flatnonzero(excluded >= 0)
    # -inf sorts below every finite score: the excluded item can never be ranked,
    # counted as "greater" or tie with anything.
    scores[rows, excluded[rows]] = -np.inf
    # Only items scoring at least the lowest relevant score (or the k-th largest) enter any metric, so
    # only they are sorted (sorted rows are left-padded with -inf, see gallery.sorted_candidates).
    try_candidates = plan.candidate_sorts > 0 or plan.full_sorts < _PROBE_BLOCKS
    bounds = _lower_bounds(plan, scores, query_ids) if try_candidates else None
    sorted_scores = sorted_candidates(scores, bounds, buffers.sorted)
    if sorted_scores.shape[1] < gallery_size:
        plan.candidate_sorts += 1
    else:
        plan.full_sorts += 1
    score_rows(plan, CandidateRows.whole(scores), sorted_scores, query_ids)


def _lower_bounds(plan: RankPlan, scores: np.ndarray, query_ids: np.ndarray) -> np.ndarray:
    """Per score row: the lowest score any metric depends on, min(lowest relevant score, k_eff-th largest)."""
    n_rows, gallery_size = scores.shape
    bound = np.full(n_rows, np.inf, dtype=np.float32)
    codes = plan.query_codes[query_ids]
    has_relevant = plan.n_relevant[query_ids] > 0
    for code in np.unique(codes[has_relevant]):
        rows = np.flatnonzero(has_relevant & (codes == code))
        members = plan.members_of[code]
        step = max(1, ranks.GROUP_ELEMENTS // max(1, members.size))
        for first in range(0, rows.size, step):
            part = rows[first:first + step]
            relevant = scores[part[:, None], members[None, :]]
            relevant[relevant == -np.inf] = np.inf  # the excluded item is not a candidate
            bound[part] = relevant.min(axis=1)
    k_eff = plan.k_eff[query_ids]
    active = np.flatnonzero(k_eff > 0)
    # Usually every row is active: compare the block in place (scores[active] would copy all of it first,
    # 400 MB per 100 rows of a 1M gallery).
    block = scores if active.size == n_rows else scores[active]
    enough = np.count_nonzero(block >= bound[active, None], axis=1) >= k_eff[active]
    for row in active[~enough]:
        cut = gallery_size - int(k_eff[row])
        bound[row] = min(bound[row], np.partition(scores[row], cut)[cut])
    return bound


def _as_float32_matrix(x: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(x)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, dim), got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{name} must be numeric, got dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def _encode_labels(query_labels, gallery_labels, n_queries: int, gallery_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes such that codes are equal exactly when the labels are `==`."""
    q = np.asarray(query_labels)
    g = np.asarray(gallery_labels)
    if q.shape != (n_queries,):
        raise ValueError(f"query_labels must have shape ({n_queries},), got {q.shape}")
    if g.shape != (gallery_size,):
        raise ValueError(f"gallery_labels must have shape ({gallery_size},), got {g.shape}")
    numeric = "biuf"
    if (q.dtype.kind in numeric and g.dtype.kind in numeric) or (q.dtype.kind == g.dtype.kind and q.dtype.kind in "US"):
        _, codes = np.unique(np.concatenate([q, g]), return_inverse=True)
        codes = codes.reshape(-1)
    else:
        # Mixed or object labels: a dict keeps Python's == semantics (1 != "1").
        seen: dict = {}
        codes = np.fromiter(
            (seen.setdefault(v, len(seen)) for v in itertools.chain(q.tolist(), g.tolist())),
            dtype=np.int64,
            count=n_queries + gallery_size,
        )
    codes = codes.astype(np.int64)
    return codes[:n_queries], codes[n_queries:]


def check_exclude(exclude, n_queries: int, gallery_size: int) -> np.ndarray:
    """`exclude` as int64 gallery indices (-1: none), one per query; all -1 when None."""
    if exclude is None:
        return np.full(n_queries, -1, dtype=np.int64)
    idx = np.asarray(exclude)
    if idx.shape != (n_queries,):
        raise ValueError(f"exclude must have shape ({n_queries},), got {idx.shape}")
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"exclude must hold integer gallery indices, got dtype {idx.dtype}")
    idx = idx.astype(np.int64)
    if idx.size and (idx.min() < -1 or idx.max() >= gallery_size):
        raise ValueError(f"exclude values must lie in [-1, {gallery_size - 1}]")
    return idx


def _single_threaded_blas():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # without it, BLAS keeps its own threads: slower, still correct
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _worker_count() -> int:
    return min(available_cores(), 8)
