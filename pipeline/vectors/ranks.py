"""From score rows to retrieval results: the ranks of every query's relevant items, exact ties, every metric
and the top-k lists, written into the query's slots of a `RankPlan` (retrieval.py builds the plan and produces the
rows: whole score rows, or a segment scan's candidates; the definitions are in retrieval.py's docstring).

Rows hold either every gallery item (column j is item j) or only the candidates a metric can see
(`segment_scan.CandidateRows`); `sorted_scores` holds each row's scores ascending, left-padded with -inf, so the
rank of a score is counted within the candidates.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.vectors.gallery import ScoredGallery
from pipeline.vectors.segment_scan import CandidateRows

# Equal-score groups longer than this are located by binary search instead of walked.
WALK_LIMIT = 16

# Budget (in elements) for the per-group rows x R arrays of relevant scores,
# ranks and precisions: about 150 MB of temporaries per worker.
GROUP_ELEMENTS = 1 << 22


@dataclass
class RankPlan:
    """Everything a worker needs to turn a block of score rows into results."""

    gallery_size: int
    metric: str
    query_codes: np.ndarray       # (n_queries,) label code of each query
    gallery_codes: np.ndarray     # (gallery_size,) label code of each gallery item
    members_of: list              # class code -> sorted gallery indices with that label
    n_relevant: np.ndarray        # (n_queries,) R after exclusion
    excluded_is_member: np.ndarray  # (n_queries,) bool: the excluded item carries the query's label
    k_eff: np.ndarray             # (n_queries,) effective k
    query_sq_norms: np.ndarray | None  # float64, euclidean only (to turn keys into distances)
    query: np.ndarray             # (n_queries, dim) float32, normalised for cosine
    gallery: ScoredGallery        # scores query blocks (resident, or streamed a segment at a time)
    exclude: np.ndarray           # (n_queries,) gallery index to drop, or -1
    neighbours: np.ndarray
    neighbour_scores: np.ndarray
    per_query: dict
    # Blocks whose rows were sorted whole / as candidates only (retrieval.py): once whole sorts are all that
    # happened (relevant items spread through every ranking), the lower bounds are no longer computed.
    full_sorts: int = 0
    candidate_sorts: int = 0
    # Segment scan: set once a block's candidates were most of the gallery (or past the budget); later blocks
    # then score whole rows.
    whole_rows_pay: bool = False


def score_rows(plan: RankPlan, scores: CandidateRows, sorted_scores: np.ndarray, query_ids: np.ndarray) -> None:
    """Fill the results of queries `query_ids` from their score rows (whole, or candidates only) in place."""
    _top_k(plan, scores, sorted_scores, query_ids)

    # Queries of one class with the same exclusion status share their relevant set
    # (up to the excluded item), so their relevant scores form one rectangular block
    # and all metrics are computed on it at once.
    evaluated = np.flatnonzero(plan.n_relevant[query_ids] > 0)
    group_key = plan.query_codes[query_ids[evaluated]] * 2 + plan.excluded_is_member[query_ids[evaluated]]
    for key in np.unique(group_key):
        rows = evaluated[group_key == key]
        code = int(key) // 2
        # A few rows at a time when classes are large, so the rows x R temporaries
        # stay around GROUP_ELEMENTS whatever the class sizes.
        step = max(1, GROUP_ELEMENTS // max(1, plan.members_of[code].size))
        for first in range(0, rows.size, step):
            part = rows[first:first + step]
            _score_group(plan, scores, sorted_scores, part, query_ids[part], code, bool(key % 2))


def _score_group(
    plan: RankPlan,
    scores: CandidateRows,
    sorted_scores: np.ndarray,
    rows: np.ndarray,
    queries: np.ndarray,
    code: int,
    excluded_is_member: bool,
) -> None:
    """Metrics of queries that share their relevant set (`rows` index the block)."""
    # Sorted rows hold the candidates (padded to one width): ranks count the items above within them.
    gallery_size = sorted_scores.shape[1]
    members = plan.members_of[code]
    relevant = scores.gather(rows, members)
    relevant.sort(axis=1)
    if excluded_is_member:
        relevant = relevant[:, 1:]  # the excluded item is the row's single -inf
    n_rows, n_rel = relevant.shape
    if n_rel and np.isneginf(relevant[:, 0]).any():
        raise RuntimeError("retrieval: a relevant item is missing from its query's candidates (internal error)")

    # Everything below is indexed by p, the position of a relevant score in its
    # ascending row; the matching position in the ranking is m = n_rel - p.
    after_last_equal = np.empty(relevant.shape, dtype=np.int64)
    shared = np.empty(relevant.shape, dtype=bool)
    for i, row in enumerate(rows):
        sorted_row = sorted_scores[row]
        found = sorted_row.searchsorted(relevant[i], side="right")
        after_last_equal[i] = found
        # Slot found-1 holds the score itself; an equal value one slot lower means
        # another item has the same score. (found-2 = -1 wraps to the row maximum,
        # which equals the score only in a constant row, a tie as well, or in a
        # one-item gallery, where the tie path gives the same answer.)
        np.equal(sorted_row[found - 2], relevant[i], out=shared[i])

    ranks = gallery_size + 1 - after_last_equal  # exact where the score is not shared
    m = np.arange(n_rel, 0, -1, dtype=np.float64)
    precision = m / ranks
    average_precision = precision.sum(axis=1)
    k_eff = plan.k_eff[queries]
    if shared.any():
        average_precision += _resolve_ties(
            plan, scores, sorted_scores, rows, relevant, after_last_equal, shared, ranks, precision,
            np.maximum(n_rel, k_eff), code,
        )
    average_precision /= n_rel

    hits_at_k = np.count_nonzero(ranks <= k_eff[:, None], axis=1)
    in_top_r = ranks <= n_rel
    out = plan.per_query
    out["AP"][queries] = average_precision
    out["P@1"][queries] = ranks[:, -1] == 1
    out["P@k"][queries] = hits_at_k / k_eff
    out["R@k"][queries] = hits_at_k > 0
    out["R-precision"][queries] = np.count_nonzero(in_top_r, axis=1) / n_rel
    out["MAP@R"][queries] = np.where(in_top_r, precision, 0.0).sum(axis=1) / n_rel


def _resolve_ties(
    plan: RankPlan,
    scores: CandidateRows,
    sorted_scores: np.ndarray,
    rows: np.ndarray,
    relevant: np.ndarray,
    after_last_equal: np.ndarray,
    shared: np.ndarray,
    ranks: np.ndarray,
    precision: np.ndarray,
    rank_cutoff: np.ndarray,
    code: int,
) -> np.ndarray:
    """Fix ranks and precision (in place) where relevant scores are tied; return the AP-sum corrections.

    In float32, ties are common at scale (in 60,000 clustered 512-d vectors most
    query rows have some), so this works on all tied items of the group at once.
    A run is the set of relevant items of one row sharing one score value; since
    `relevant` is sorted, a run is contiguous in p.
    """
    gallery_size = sorted_scores.shape[1]  # the candidates' width: counts of items above are within it
    n_rows, n_rel = relevant.shape
    tied_row, tied_p = np.nonzero(shared)
    tied_value = relevant[tied_row, tied_p]
    is_start = np.ones(tied_row.size, dtype=bool)
    is_start[1:] = (tied_row[1:] != tied_row[:-1]) | (tied_value[1:] != tied_value[:-1])
    run_start = np.flatnonzero(is_start)
    run_of = np.cumsum(is_start) - 1
    run_row = tied_row[run_start]
    run_value = tied_value[run_start]
    run_after = after_last_equal[run_row, tied_p[run_start]]
    run_relevant_first = tied_p[run_start]
    run_relevant_end = np.append(tied_p[run_start[1:] - 1], tied_p[-1]) + 1
    run_first = _first_equal(sorted_scores, rows[run_row], run_value, run_after)
    run_greater = gallery_size - run_after

    # AP, scikit-learn style: a relevant score s counts every item with score >= s,
    # tied ones included.
    exact = (n_rel - run_relevant_first[run_of]) / (gallery_size - run_first[run_of])
    ap_correction = np.bincount(tied_row, weights=exact - precision[tied_row, tied_p], minlength=n_rows)

    # Stable ranks. The run's group of equal scores takes ranks n_greater+1 ...
    # If every member of the group is relevant, they fill those ranks in any order.
    # If it also holds irrelevant items, gallery-index order decides, which needs a
    # scan of the row; it only matters for groups that start within the first
    # max(R, k_eff) ranks, since deeper ranks enter no metric but AP (tie-invariant).
    order_in_run = run_relevant_end[run_of] - 1 - tied_p  # 0 for the best-ranked
    new_ranks = run_greater[run_of] + 1 + order_in_run
    group_size = run_after - run_first
    mixed = (group_size > run_relevant_end - run_relevant_first) & (run_greater < rank_cutoff[run_row])
    for run in np.flatnonzero(mixed):
        row = rows[run_row[run]]
        in_group = scores.items_at(row, np.flatnonzero(scores.scores[row] == run_value[run]))
        relevant_offsets = np.flatnonzero(plan.gallery_codes[in_group] == code)
        items = run_of == run
        new_ranks[items] = run_greater[run] + 1 + relevant_offsets[order_in_run[items]]
    ranks[tied_row, tied_p] = new_ranks
    precision[tied_row, tied_p] = (n_rel - tied_p) / new_ranks
    return ap_correction


def _first_equal(
    sorted_scores: np.ndarray, rows: np.ndarray, values: np.ndarray, after_last_equal: np.ndarray
) -> np.ndarray:
    """Index of the first occurrence of values[i] in sorted_scores[rows[i]].

    Tie groups are mostly two or three items, so walking down from the last
    occurrence beats a binary search; long runs fall back to searchsorted.
    """
    flat_sorted = sorted_scores.reshape(-1)
    row_offset = rows * sorted_scores.shape[1]
    first = after_last_equal - 1
    pending = np.arange(first.size)
    for _ in range(WALK_LIMIT):
        if not pending.size:
            break
        below = first[pending] - 1
        continues = below >= 0
        candidates = pending[continues]
        continues[continues] = flat_sorted[row_offset[candidates] + below[continues]] == values[candidates]
        pending = pending[continues]
        first[pending] -= 1
    for i in pending:
        first[i] = np.searchsorted(sorted_scores[rows[i]], values[i], side="left")
    return first


def _top_k(plan: RankPlan, rows: CandidateRows, sorted_scores: np.ndarray, query_ids: np.ndarray) -> None:
    """Neighbour lists: everything at or above the k_eff-th largest score, stably ordered."""
    scores = rows.scores
    n_rows, row_width = scores.shape
    width = sorted_scores.shape[1]  # candidates only, left-padded: the top k_eff are its last columns
    k_eff = plan.k_eff[query_ids]
    active = np.flatnonzero(k_eff > 0)
    threshold = np.full(n_rows, np.inf, dtype=np.float32)
    threshold[active] = sorted_scores[active, width - k_eff[active]]
    # A row is crowded when the score just below its top k_eff equals the
    # threshold (a tie across the cut). Those rows are done one by one, so a row of
    # identical scores cannot blow up memory; the others have exactly k_eff
    # candidates at or above the threshold.
    has_below = active[k_eff[active] < width]
    crowded = has_below[sorted_scores[has_below, width - k_eff[has_below] - 1] == threshold[has_below]]
    n_candidates = k_eff.copy()
    n_candidates[crowded] = 0
    cut = threshold.copy()
    cut[crowded] = np.inf
    at_or_above = scores >= cut[:, None]

    flat = np.flatnonzero(at_or_above)
    if flat.size:
        row_of, column = np.divmod(flat, row_width)
        candidate_scores = scores[row_of, column]
        # flatnonzero yields columns in increasing order within each row (and so gallery indices), and
        # lexsort is stable, so equal scores keep the lower gallery index first.
        order = np.lexsort((-candidate_scores, row_of))
        row_of, column, candidate_scores = row_of[order], column[order], candidate_scores[order]
        row_start = np.concatenate([[0], np.cumsum(n_candidates)])
        slot = np.arange(flat.size) - row_start[row_of]
        _store_neighbours(plan, query_ids[row_of], slot, rows.items_at(row_of, column), candidate_scores)

    for row in crowded:
        values = scores[row]
        need = int(k_eff[row])
        above = np.flatnonzero(values > threshold[row])
        at_cut = np.flatnonzero(values == threshold[row])[: need - above.size]
        above = above[np.argsort(-values[above], kind="stable")]
        column = np.concatenate([above, at_cut])
        _store_neighbours(plan, np.full(need, query_ids[row]), np.arange(need), rows.items_at(row, column),
                          values[column])


def _store_neighbours(
    plan: RankPlan, queries: np.ndarray, slot: np.ndarray, column: np.ndarray, scores: np.ndarray
) -> None:
    plan.neighbours[queries, slot] = column
    if plan.metric == "euclidean":
        distance_sq = plan.query_sq_norms[queries] - scores.astype(np.float64)
        scores = np.sqrt(np.maximum(distance_sq, 0.0))
    plan.neighbour_scores[queries, slot] = scores
