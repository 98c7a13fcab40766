"""Originals and their versions: how close each generated version of an item is to its original, in an
embedding space (cosine on unit vectors throughout).

A group is the original and its versions (items sharing a `group`; the one whose role is "original" is the
original, every other member a version of it). Groups with no original or several are left out by the caller.

* Group retrieval, two directions, exact and chunked (`retrieval.retrieve` with "relevance by key", the key
  being the group; never a queries × gallery matrix beyond a block):
  original → versions: each original ranks the versions of the gallery; its relevant items are its own
  versions (R = their number). version → original: each version ranks the originals of the gallery; the one
  relevant item is its own original (R = 1, so MAP@R = R@1 and AP = 1 / rank). R@k = 1 when the first
  relevant item is within the first min(k, gallery size) results; MAP@R and mAP as in retrieval.py; the rank
  of the first relevant item (1-based; ties ordered by lower gallery index, as in retrieval.py) gives its mean
  and median. Queries with no relevant item in the gallery are left out of the averages and counted.
* Closeness of a version to its original: cosine similarity, and the seed's mean squared and mean absolute
  error between the two embeddings (per dimension). On unit vectors MSE = (2 − 2·cos) / d, so it orders pairs
  exactly as the cosine does (the same AUC); MAE does not. Non-matching pairs: each version with originals of
  other groups, drawn uniformly (seeded): any other original ("random"), and another original of the
  version's own class ("same class", a harder baseline).
* AUC: the probability that a matching pair is closer than a non-matching one, ties counting one half, from
  the rank (Mann–Whitney) formula with mid-ranks; its uncertainty from a bootstrap over groups (pairs of one
  group are not independent: they share the original).
* Neighbourhood consistency: the share of an item's k nearest neighbours that two neighbour lists share
  (|A ∩ B| / k), between two embedding spaces of the same items (before vs after training), or between an
  original and its version in one space (against non-matching pairs).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.vectors.normalize import l2_normalize
from pipeline.vectors.retrieval import retrieve

RECALL_AT = (1, 5, 10)
# Query rows × gallery elements scored at once when ranking (float32 scores plus a boolean mask).
_BLOCK_ELEMENTS = 1 << 22
BOOTSTRAP_SAMPLES = 200


# --------------------------------------------------------------------------- structure


def original_of(groups: np.ndarray, originals: np.ndarray) -> tuple[np.ndarray, dict]:
    """(for every item, the row of its group's original, or -1; counts of what was left out).

    An item gets an original when it is in a group (non-empty), is not itself the original, and its group has
    exactly one original. Originals themselves and ungrouped items get -1, as do all members of groups with
    no original or several originals (counted in the second value)."""
    groups = np.asarray(groups).astype(str)
    originals = np.asarray(originals, dtype=bool)
    out = np.full(len(groups), -1, dtype=np.int64)
    grouped = groups != ""
    names, inverse, sizes = np.unique(groups[grouped], return_inverse=True, return_counts=True)
    n_originals = np.bincount(inverse, weights=originals[grouped], minlength=len(names)).astype(np.int64)
    first_original = np.full(len(names), -1, dtype=np.int64)
    rows = np.flatnonzero(grouped)
    for row, code in zip(rows[originals[grouped]], inverse[originals[grouped]]):
        first_original[code] = row
    valid = (n_originals == 1) & (sizes > 1)
    versions = valid[inverse] & ~originals[grouped]
    out[rows[versions]] = first_original[inverse[versions]]
    left_out = {"groups_without_original": int((n_originals == 0).sum()),
                "groups_with_several_originals": int((n_originals > 1).sum()),
                "groups_without_versions": int(((n_originals == 1) & (sizes == 1)).sum())}
    return out, left_out


def versions_of(own_original: np.ndarray) -> dict[int, np.ndarray]:
    """{original row: positions (into `own_original`) of its versions, in order}, by one sort."""
    own_original = np.asarray(own_original, dtype=np.int64)
    order = np.argsort(own_original, kind="stable")
    originals, starts = np.unique(own_original[order], return_index=True)
    return {int(o): part for o, part in zip(originals, np.split(order, starts[1:]))}


def scored_versions(owner: np.ndarray, query_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows of the versions in `query_rows` whose original is there too, their originals' rows); `owner` as
    `original_of` returns it."""
    in_query = np.zeros(len(owner), dtype=bool)
    in_query[query_rows] = True
    versions = np.flatnonzero(in_query & (owner >= 0) & in_query[np.maximum(owner, 0)])
    return versions, owner[versions]


# --------------------------------------------------------------------------- retrieval


def first_relevant_ranks(query: np.ndarray, query_keys: np.ndarray, gallery: np.ndarray, gallery_keys: np.ndarray,
                         chunk_size: int = 1024) -> np.ndarray:
    """(n_queries,) float64: the 1-based rank of each query's first relevant gallery item (equal key) under
    cosine similarity, ties ordered by lower gallery index; NaN for a query without any relevant item.

    rank = 1 + #irrelevant items scoring above the best relevant score s* + #irrelevant items scoring exactly
    s* at a lower gallery index than the first relevant item scoring s*. Scored in blocks of query rows."""
    q, g = l2_normalize(query), l2_normalize(gallery)
    query_keys, gallery_keys = np.asarray(query_keys), np.asarray(gallery_keys)
    ranks = np.full(len(q), np.nan)
    if len(g) == 0:
        return ranks
    block = max(1, min(int(chunk_size), _BLOCK_ELEMENTS // len(g)))
    index = np.arange(len(g))
    for start in range(0, len(q), block):
        scores = q[start:start + block] @ g.T
        relevant = query_keys[start:start + block, None] == gallery_keys[None, :]
        has = relevant.any(axis=1)
        best = np.where(relevant, scores, -np.inf).max(axis=1, initial=-np.inf)
        at_best = relevant & (scores == best[:, None])
        first = np.where(at_best.any(axis=1), at_best.argmax(axis=1), 0)
        ahead = ~relevant & ((scores > best[:, None]) | ((scores == best[:, None]) & (index < first[:, None])))
        ranks[start:start + block] = np.where(has, 1.0 + ahead.sum(axis=1), np.nan)
    return ranks


def group_retrieval(query: np.ndarray, query_keys: np.ndarray, gallery: np.ndarray, gallery_keys: np.ndarray, *,
                    ks: tuple[int, ...] = RECALL_AT, chunk_size: int = 1024) -> tuple[dict, np.ndarray]:
    """(metrics, per-query first-relevant ranks) of one direction: R@k for every k of `ks`, MAP@R, mAP, mean and
    median rank of the first relevant item, and the query counts (see the module docstring)."""
    query_keys, gallery_keys = np.asarray(query_keys), np.asarray(gallery_keys)
    counts = {"n_queries": int(len(query_keys)), "gallery_size": int(len(gallery_keys))}
    if len(query_keys) == 0 or len(gallery_keys) == 0:
        nan = float("nan")
        return ({**{f"R@{k}": nan for k in ks}, "MAP@R": nan, "mAP": nan, "mean_rank": nan, "median_rank": nan,
                 **counts, "n_queries_evaluated": 0, "n_queries_without_positive": int(len(query_keys))},
                np.full(len(query_keys), np.nan))
    ranked = retrieve(query, query_keys, gallery, gallery_keys, metric="cosine", k=max(ks), chunk_size=chunk_size)
    ranks = first_relevant_ranks(query, query_keys, gallery, gallery_keys, chunk_size)
    scored = ~np.isnan(ranks)
    metrics = {f"R@{k}": float((ranks[scored] <= min(k, len(gallery_keys))).mean()) if scored.any()
               else float("nan") for k in ks}
    metrics["MAP@R"] = ranked.metrics["MAP@R"]
    metrics["mAP"] = ranked.metrics["mAP"]
    metrics["mean_rank"] = float(ranks[scored].mean()) if scored.any() else float("nan")
    metrics["median_rank"] = float(np.median(ranks[scored])) if scored.any() else float("nan")
    metrics.update(counts)
    metrics["n_queries_evaluated"] = int(scored.sum())
    metrics["n_queries_without_positive"] = int((~scored).sum())
    return metrics, ranks


# --------------------------------------------------------------------------- closeness


def pair_closeness(x: np.ndarray, a: np.ndarray, b: np.ndarray, block: int = 8192) -> dict[str, np.ndarray]:
    """For the pairs (x[a[i]], x[b[i]]): "cosine" (of the L2-normalised rows), "mse" and "mae" (mean squared and
    mean absolute difference per dimension, of the rows as given); float64, `block` pairs at a time."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    out = {name: np.zeros(len(a)) for name in ("cosine", "mse", "mae")}
    for start in range(0, len(a), block):
        left = np.asarray(x[a[start:start + block]], dtype=np.float64)
        right = np.asarray(x[b[start:start + block]], dtype=np.float64)
        unit_l, unit_r = l2_normalize(left).astype(np.float64), l2_normalize(right).astype(np.float64)
        diff = left - right
        out["cosine"][start:start + block] = np.einsum("ij,ij->i", unit_l, unit_r)
        out["mse"][start:start + block] = (diff ** 2).mean(axis=1)
        out["mae"][start:start + block] = np.abs(diff).mean(axis=1)
    return out


def non_matching_pairs(versions: np.ndarray, own_original: np.ndarray, pool_of: np.ndarray, pools: list[np.ndarray],
                       per_version: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(version rows, original rows): `per_version` draws per version, each an original of its pool other than its
    own, uniformly with replacement (seeded). `pool_of[i]` says which of `pools` (arrays of original rows) version
    i draws from. Versions whose pool holds no other original get no pair. Pairs come pool by pool."""
    rng = np.random.default_rng(seed)
    versions, own_original = np.asarray(versions, np.int64), np.asarray(own_original, np.int64)
    pool_of = np.asarray(pool_of, np.int64)
    left, right = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for index, pool in enumerate(pools):
        members = np.flatnonzero(pool_of == index)
        pool = np.unique(np.asarray(pool, np.int64))
        if len(members) == 0 or len(pool) == 0:
            continue
        position = np.minimum(np.searchsorted(pool, own_original[members]), len(pool) - 1)
        inside = pool[position] == own_original[members]
        others = len(pool) - inside
        keep = others > 0
        members, position, inside, others = members[keep], position[keep], inside[keep], others[keep]
        # A draw among the others: an index below the own original's position, or one past it.
        draws = (rng.random((len(members), per_version)) * others[:, None]).astype(np.int64)
        draws += (inside[:, None] & (draws >= position[:, None]))
        left.append(np.repeat(versions[members], per_version))
        right.append(pool[draws].reshape(-1))
    return np.concatenate(left), np.concatenate(right)


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive scores above a negative) + ½ P(equal), by the rank formula: with mid-ranks r of the pooled
    scores, AUC = (Σ r(positives) − n₊(n₊ + 1)/2) / (n₊ n₋). NaN when either side is empty."""
    positive, negative = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    n_pos, n_neg = len(positive), len(negative)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    pooled = np.concatenate([positive, negative])
    values, inverse, counts = np.unique(pooled, return_inverse=True, return_counts=True)
    # The items of the j-th distinct value occupy ranks ends[j] - counts[j] + 1 .. ends[j]: their mid-rank.
    ends = np.cumsum(counts)
    mid_ranks = ends - (counts - 1) / 2.0
    rank_sum = mid_ranks[inverse.ravel()[:n_pos]].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def weighted_auc(positive: np.ndarray, negative: np.ndarray, positive_weights: np.ndarray,
                 negative_weights: np.ndarray) -> float:
    """The AUC with a weight per score (a bootstrap's multiplicities): Σ w₊ w₋ ([s₊ > s₋] + ½[s₊ = s₋]) / (W₊ W₋)."""
    order = np.argsort(negative, kind="stable")
    neg_sorted, neg_weights = np.asarray(negative)[order], np.asarray(negative_weights, np.float64)[order]
    cumulative = np.concatenate([[0.0], np.cumsum(neg_weights)])
    below = cumulative[np.searchsorted(neg_sorted, positive, side="left")]
    equal = cumulative[np.searchsorted(neg_sorted, positive, side="right")] - below
    total = float(np.sum(positive_weights)) * cumulative[-1]
    if total <= 0:
        return float("nan")
    return float(np.sum(np.asarray(positive_weights, np.float64) * (below + 0.5 * equal)) / total)


def auc_with_interval(positive: np.ndarray, positive_cluster: np.ndarray, negative: np.ndarray,
                      negative_cluster: np.ndarray, *, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> dict:
    """{"auc", "se", "ci95": [low, high], "bootstrap_samples", "n_positive", "n_negative", "n_clusters"}: the AUC
    (`roc_auc`) and its spread over `samples` resamplings of the clusters (groups) with replacement, each pair
    entering as often as its cluster was drawn (percentile interval; se = the resamples' standard deviation)."""
    positive, negative = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    clusters, codes = np.unique(np.concatenate([positive_cluster, negative_cluster]).astype(str),
                                return_inverse=True)
    pos_code, neg_code = codes[:len(positive)], codes[len(positive):]
    out = {"auc": roc_auc(positive, negative), "se": float("nan"), "ci95": [float("nan"), float("nan")],
           "bootstrap_samples": 0, "n_positive": int(len(positive)), "n_negative": int(len(negative)),
           "n_clusters": int(len(clusters))}
    if np.isnan(out["auc"]) or len(clusters) < 2 or samples < 2:
        return out
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(samples):
        drawn = np.bincount(rng.integers(0, len(clusters), len(clusters)), minlength=len(clusters))
        value = weighted_auc(positive, negative, drawn[pos_code], drawn[neg_code])
        if not np.isnan(value):
            values.append(value)
    if len(values) >= 2:
        out.update(se=float(np.std(values, ddof=1)), ci95=[float(np.percentile(values, 2.5)),
                                                           float(np.percentile(values, 97.5))],
                   bootstrap_samples=len(values))
    return out


def roc_points(positive: np.ndarray, negative: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) of every threshold on the scores, from (0, 0) to (1, 1)."""
    positive, negative = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    thresholds = np.unique(np.concatenate([positive, negative]))[::-1]
    tpr = np.searchsorted(np.sort(-positive), -thresholds, side="right") / max(len(positive), 1)
    fpr = np.searchsorted(np.sort(-negative), -thresholds, side="right") / max(len(negative), 1)
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


def distribution(values: np.ndarray) -> dict:
    """{"n", "mean", "std", "median", "q10", "q90", "min", "max"} of a sample (NaN statistics when empty)."""
    values = np.asarray(values, np.float64)
    if len(values) == 0:
        nan = float("nan")
        return {"n": 0, "mean": nan, "std": nan, "median": nan, "q10": nan, "q90": nan, "min": nan, "max": nan}
    q10, median, q90 = np.percentile(values, [10, 50, 90])
    return {"n": int(len(values)), "mean": float(values.mean()), "std": float(values.std()),
            "median": float(median), "q10": float(q10), "q90": float(q90), "min": float(values.min()),
            "max": float(values.max())}


# --------------------------------------------------------------------------- neighbourhoods


def neighbour_overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n,) float64: |A_i ∩ B_i| / k for the neighbour lists a[i] and b[i] ((n, k) indices into one gallery, -1 as
    padding, which never counts), k = the number of valid entries of the longer list; NaN when both are empty."""
    a, b = np.asarray(a), np.asarray(b)
    out = np.full(len(a), np.nan)
    for i, (left, right) in enumerate(zip(a, b)):
        left, right = set(left[left >= 0].tolist()), set(right[right >= 0].tolist())
        size = max(len(left), len(right))
        if size:
            out[i] = len(left & right) / size
    return out


@dataclass
class SimilarityBlock:
    """Cosine similarity of a sample of originals (rows) × all their versions (columns, grouped by original)."""

    matrix: np.ndarray        # (n_originals, n_versions) float32
    original_rows: np.ndarray  # item rows of the originals, in row order
    version_rows: np.ndarray   # item rows of the versions, in column order
    column_owner: np.ndarray   # (n_versions,) the matrix row of each column's own original


def similarity_block(x: np.ndarray, versions: np.ndarray, own_original: np.ndarray, n_originals: int,
                     seed: int = 0) -> SimilarityBlock:
    """A seeded sample of at most `n_originals` originals (those of `own_original`) and every version of them."""
    originals = np.unique(own_original)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(originals, size=min(n_originals, len(originals)), replace=False))
    columns, owner = [], []
    for row, original in enumerate(chosen):
        mine = versions[own_original == original]
        columns.append(mine)
        owner.append(np.full(len(mine), row))
    version_rows = np.concatenate(columns) if columns else np.zeros(0, np.int64)
    unit_o, unit_v = l2_normalize(x[chosen]), l2_normalize(x[version_rows])
    return SimilarityBlock(unit_o @ unit_v.T, chosen, version_rows,
                           np.concatenate(owner) if owner else np.zeros(0, np.int64))


# --------------------------------------------------------------------------- one evaluation


@dataclass
class GroupEvaluation:
    """metrics.json's "groups" and the arrays its pictures are drawn from."""

    metrics: dict
    versions: np.ndarray        # item rows of the scored versions (query split)
    own_original: np.ndarray    # the item row of each one's original
    closeness: dict             # "cosine", "mse", "mae": (n_versions,) of each version with its original
    negatives: dict             # "random", "same_class": {"cosine", "mse", "mae"} of non-matching pairs
    block: SimilarityBlock


def _auc_table(positive: dict, pos_cluster: np.ndarray, negative: dict, neg_cluster: np.ndarray, seed: int) -> dict:
    """AUC of each closeness measure (larger cosine, smaller MSE/MAE = closer) with its bootstrap interval."""
    return {name: auc_with_interval(sign * positive[name], pos_cluster, sign * negative[name], neg_cluster, seed=seed)
            for name, sign in (("cosine", 1.0), ("mse", -1.0), ("mae", -1.0))}


def evaluate_groups(x: np.ndarray, groups: np.ndarray, originals: np.ndarray, roles: np.ndarray,
                    classes: np.ndarray, query_rows: np.ndarray, gallery_rows: np.ndarray, *,
                    neighbours: np.ndarray | None = None, base_neighbours: np.ndarray | None = None, k: int = 5,
                    seed: int = 0, chunk_size: int = 1024, negatives_per_version: int = 5,
                    matrix_originals: int = 12) -> GroupEvaluation | None:
    """Everything the module docstring defines, on the items of `x` (rows = items): the groups of the query split
    are scored, the gallery being `gallery_rows` (retrieval) and, for the neighbourhoods, the phase's own top-k
    lists `neighbours` ((len(query_rows), k) gallery positions) and, when given, those of the same items in
    another space (`base_neighbours`, before training). None when the query split holds no original with a
    version."""
    groups, classes, roles = np.asarray(groups).astype(str), np.asarray(classes).astype(str), np.asarray(roles)
    owner, left_out = original_of(groups, originals)
    versions, own = scored_versions(owner, query_rows)
    if len(versions) == 0:
        return None
    in_gallery = np.zeros(len(groups), dtype=bool)
    in_gallery[gallery_rows] = True
    query_originals = np.unique(own)
    has_version = np.zeros(len(groups), dtype=bool)
    has_version[owner[owner >= 0]] = True
    gallery_versions = np.flatnonzero(in_gallery & (owner >= 0))
    gallery_originals = np.flatnonzero(in_gallery & has_version)

    retrieval = {}
    retrieval["original_to_versions"], _ = group_retrieval(
        x[query_originals], groups[query_originals], x[gallery_versions], groups[gallery_versions],
        chunk_size=chunk_size)
    retrieval["version_to_original"], _ = group_retrieval(
        x[versions], groups[versions], x[gallery_originals], groups[gallery_originals], chunk_size=chunk_size)

    positive = pair_closeness(x, versions, own)
    class_names = sorted(set(classes[query_originals]))
    class_pools = [query_originals[classes[query_originals] == name] for name in class_names]
    class_index = {name: i for i, name in enumerate(class_names)}
    drawn = {"random": non_matching_pairs(versions, own, np.zeros(len(versions), np.int64), [query_originals],
                                          negatives_per_version, seed),
             "same_class": non_matching_pairs(versions, own, np.array([class_index.get(c, -1)
                                                                       for c in classes[versions]]),
                                              class_pools, negatives_per_version, seed + 1)}
    negatives = {name: pair_closeness(x, a, b) for name, (a, b) in drawn.items()}
    clusters = {name: groups[a] for name, (a, _) in drawn.items()}
    role_names = np.array([role or "unspecified" for role in roles[versions]])
    closeness = {
        "measures": {name: {"versions": distribution(positive[name]),
                            **{kind: distribution(negatives[kind][name]) for kind in negatives}}
                     for name in ("cosine", "mse", "mae")},
        "auc": {kind: _auc_table(positive, groups[versions], negatives[kind], clusters[kind], seed)
                for kind in negatives},
        "per_role": [], "per_class": [],
        "negatives_per_version": negatives_per_version,
    }
    random_cos = negatives["random"]["cosine"]
    for role in sorted(set(role_names)):
        mine = role_names == role
        closeness["per_role"].append({
            "role": role, "cosine": distribution(positive["cosine"][mine]),
            "mse_mean": float(positive["mse"][mine].mean()), "mae_mean": float(positive["mae"][mine].mean()),
            "auc": auc_with_interval(positive["cosine"][mine], groups[versions][mine], random_cos,
                                     clusters["random"], seed=seed)})
    negative_class = classes[drawn["random"][0]]
    for name in sorted(set(classes[versions])):
        mine = classes[versions] == name
        closeness["per_class"].append({
            "class": name, "cosine": distribution(positive["cosine"][mine]),
            "auc": roc_auc(positive["cosine"][mine], random_cos[negative_class == name])})

    metrics = {
        "protocol": {"n_groups": int(len(query_originals)), "n_versions": int(len(versions)),
                     "gallery_versions": int(len(gallery_versions)), "gallery_originals": int(len(gallery_originals)),
                     "left_out": left_out, "bootstrap_samples": BOOTSTRAP_SAMPLES, "seed": seed},
        "retrieval": retrieval, "closeness": closeness,
        "neighbourhood": _neighbourhoods(versions, own, drawn["random"], query_rows, neighbours, base_neighbours, k),
    }
    return GroupEvaluation(metrics, versions, own, positive, negatives,
                           similarity_block(x, versions, own, matrix_originals, seed))


def _neighbourhoods(versions: np.ndarray, own: np.ndarray, random_pairs: tuple[np.ndarray, np.ndarray],
                    query_rows: np.ndarray, neighbours: np.ndarray | None, base_neighbours: np.ndarray | None,
                    k: int) -> dict:
    """Overlap of top-k lists: an original's and its version's (against non-matching pairs), and every query's
    before and after training."""
    out: dict = {"k": int(k)}
    if neighbours is None:
        return out
    position = {int(row): i for i, row in enumerate(query_rows)}

    def overlap(a: np.ndarray, b: np.ndarray) -> dict:
        keep = [i for i in range(len(a)) if int(a[i]) in position and int(b[i]) in position]
        values = neighbour_overlap(neighbours[[position[int(a[i])] for i in keep]],
                                   neighbours[[position[int(b[i])] for i in keep]]) if keep else np.zeros(0)
        values = values[~np.isnan(values)]
        return {"mean": float(values.mean()) if len(values) else float("nan"), "n_pairs": int(len(values))}

    out["original_vs_version"] = overlap(versions, own)
    out["random_pairs"] = overlap(*random_pairs)
    if base_neighbours is not None:
        values = neighbour_overlap(base_neighbours, neighbours)
        values = values[~np.isnan(values)]
        out["before_after"] = {"mean": float(values.mean()) if len(values) else float("nan"),
                               "median": float(np.median(values)) if len(values) else float("nan"),
                               "n_items": int(len(values))}
    return out


def sample_groups(versions: np.ndarray, own_original: np.ndarray, max_points: int, seed: int = 0) -> np.ndarray:
    """Sorted item rows of whole groups (an original and all its versions), groups drawn in a seeded order until
    the next would pass `max_points` (at least one group)."""
    members_of = versions_of(own_original)
    originals = np.array(sorted(members_of), dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(originals))
    rows: list[np.ndarray] = []
    total = 0
    for original in originals[order]:
        members = np.concatenate([[original], versions[members_of[int(original)]]])
        if rows and total + len(members) > max_points:
            break
        rows.append(members)
        total += len(members)
    return np.sort(np.concatenate(rows)) if rows else np.zeros(0, np.int64)
