"""Embedding-space diagnostics (numpy) and k-means clustering scores (scikit-learn).

`embedding_diagnostics(x, labels)` returns a JSON-ready dict (Python floats, ints,
lists; NaN where a quantity is undefined, e.g. no same-class pair exists):

* ``n``, ``dim``, ``n_classes``.
* ``norm``: ``{mean, std, min, max}`` of the row L2 norms of x as given
  (std is the population standard deviation).
* ``mean_pairwise_cosine``: mean of cos(x_i, x_j) over all ordered pairs i != j.
  With unit vectors u_i (a zero row stays zero, so its cosines are 0),
  sum_{i != j} u_i.u_j = |sum_i u_i|^2 - sum_i |u_i|^2, which gives the exact mean
  in O(N d) without visiting pairs. Near 0: directions are spread out; near 1:
  the embedding has collapsed towards one direction.
* ``intra_class_cosine``: the same mean over pairs i != j with equal labels, from
  per-class sums of unit vectors; ``inter_class_cosine``: over pairs with
  different labels (all pairs minus same-label pairs).
* ``intra_inter_distance_ratio``: mean squared euclidean distance over same-label
  pairs divided by the mean over different-label pairs, on x as given. Uses
  sum_{i,j in c} |x_i - x_j|^2 = 2 n_c sum_{i in c} |x_i - mu_c|^2 and the same
  identity on the whole set (scatter decomposition), so it is exact and O(N d).
  Below 1 means classes are tighter than the space between them.
* ``pca_explained_variance_ratio``: eigenvalues of the covariance of x (as given,
  centred, divisor n-1) in decreasing order, divided by their sum; the first
  ``max_components`` are listed. The covariance is accumulated over row blocks,
  so memory is O(d^2) whatever n is.
* ``effective_rank``: exp(H(p)) with p the normalised covariance eigenvalues and H
  the Shannon entropy (Roy & Vetterli 2007): 1 for a rank-1 cloud, d for an
  isotropic one.
* ``components_for_90`` / ``components_for_99``: smallest number of principal
  components whose explained-variance ratios sum to at least 0.90 / 0.99.
* ``hubness_skew``: skewness (``scipy.stats.skew``, biased) of the k-occurrence
  counts (how often each gallery item appears in some query's top k). Strongly
  positive: a few "hubs" are everybody's neighbour. 0.0 when every item occurs
  equally often (where the formula is 0/0). ``max_k_occurrence``: the largest
  count. Both None when ``k_occurrence`` is not given.

`clustering_scores(x, labels)` runs k-means with k = number of distinct labels
and compares the clusters with the labels (NMI, ARI).
"""
from __future__ import annotations

import numpy as np

# Rows per block when streaming over x in float64: bounds the extra memory to
# _ROW_BLOCK x dim doubles whatever the number of rows.
_ROW_BLOCK = 8192


def embedding_diagnostics(
    x: np.ndarray,
    labels: np.ndarray,
    *,
    k_occurrence: np.ndarray | None = None,
    max_components: int = 256,
) -> dict:
    """Geometry of an embedding set (see the module docstring for every field)."""
    x = _as_matrix(x)
    n, dim = x.shape
    codes, class_sizes = _encode(labels, n)
    n_classes = class_sizes.size
    if isinstance(max_components, bool) or int(max_components) != max_components or max_components < 1:
        raise ValueError(f"max_components must be a positive integer, got {max_components!r}")

    # One streaming pass: row norms, sums of unit vectors (overall and per class),
    # per-class sums of raw vectors.
    norms = np.empty(n)
    unit_sum_by_class = np.zeros((n_classes, dim))
    unit_sq_by_class = np.zeros(n_classes)
    raw_sum_by_class = np.zeros((n_classes, dim))
    for start in range(0, n, _ROW_BLOCK):
        block = x[start:start + _ROW_BLOCK].astype(np.float64)
        block_codes = codes[start:start + _ROW_BLOCK]
        block_norms = np.sqrt(np.einsum("ij,ij->i", block, block))
        norms[start:start + _ROW_BLOCK] = block_norms
        np.add.at(raw_sum_by_class, block_codes, block)
        scale = np.zeros_like(block_norms)
        np.divide(1.0, block_norms, out=scale, where=block_norms > 0)
        block *= scale[:, None]
        np.add.at(unit_sum_by_class, block_codes, block)
        np.add.at(unit_sq_by_class, block_codes, np.einsum("ij,ij->i", block, block))

    sizes = class_sizes.astype(np.float64)
    all_pairs = n * (n - 1.0)
    same_pairs = float(np.sum(sizes * (sizes - 1.0)))
    other_pairs = all_pairs - same_pairs
    unit_sum = unit_sum_by_class.sum(axis=0)
    cosine_all = float(unit_sum @ unit_sum - unit_sq_by_class.sum())
    cosine_same = float(np.sum(np.einsum("ij,ij->i", unit_sum_by_class, unit_sum_by_class) - unit_sq_by_class))

    # Second pass: scatter around each class mean, then the total scatter by the
    # decomposition total = within + sum_c n_c |mu_c - mu|^2 (no cancellation).
    class_means = raw_sum_by_class / np.maximum(sizes, 1.0)[:, None]
    within_by_class = np.zeros(n_classes)
    for start in range(0, n, _ROW_BLOCK):
        block = x[start:start + _ROW_BLOCK].astype(np.float64)
        block_codes = codes[start:start + _ROW_BLOCK]
        block -= class_means[block_codes]
        np.add.at(within_by_class, block_codes, np.einsum("ij,ij->i", block, block))
    mean = raw_sum_by_class.sum(axis=0) / n if n else np.zeros(dim)
    between = float(np.sum(sizes * np.sum((class_means - mean) ** 2, axis=1)))
    total_scatter = float(within_by_class.sum()) + between
    distance_same = float(np.sum(2.0 * sizes * within_by_class))
    distance_all = 2.0 * n * total_scatter
    intra_distance = _ratio(distance_same, same_pairs)
    inter_distance = _ratio(distance_all - distance_same, other_pairs)

    eigenvalues = _covariance_eigenvalues(x, mean)
    total_variance = float(eigenvalues.sum())
    if total_variance > 0:
        explained = eigenvalues / total_variance
        positive = explained[explained > 0]
        effective_rank = float(np.exp(-np.sum(positive * np.log(positive))))
        cumulative = np.cumsum(explained)
        # A tiny tolerance so that e.g. exactly 9 equal components out of 10 count
        # as reaching 0.90 despite rounding in the cumulative sum.
        components_for_90 = int(np.searchsorted(cumulative, 0.90 - 1e-12) + 1)
        components_for_99 = int(np.searchsorted(cumulative, 0.99 - 1e-12) + 1)
        ratio_list = [float(v) for v in explained[: int(max_components)]]
    else:  # all points identical (or fewer than two): no variance to explain
        effective_rank, components_for_90, components_for_99, ratio_list = float("nan"), 0, 0, []

    hubness_skew = max_k_occurrence = None
    if k_occurrence is not None:
        counts = np.asarray(k_occurrence, dtype=np.float64).reshape(-1)
        if counts.size:
            max_k_occurrence = int(counts.max())
            hubness_skew = _skew(counts)

    return {
        "n": int(n),
        "dim": int(dim),
        "n_classes": int(n_classes),
        "norm": {
            "mean": float(norms.mean()) if n else float("nan"),
            "std": float(norms.std()) if n else float("nan"),
            "min": float(norms.min()) if n else float("nan"),
            "max": float(norms.max()) if n else float("nan"),
        },
        "mean_pairwise_cosine": _ratio(cosine_all, all_pairs),
        "intra_class_cosine": _ratio(cosine_same, same_pairs),
        "inter_class_cosine": _ratio(cosine_all - cosine_same, other_pairs),
        "intra_inter_distance_ratio": _ratio(intra_distance, inter_distance),
        "pca_explained_variance_ratio": ratio_list,
        "effective_rank": effective_rank,
        "components_for_90": components_for_90,
        "components_for_99": components_for_99,
        "hubness_skew": hubness_skew,
        "max_k_occurrence": max_k_occurrence,
    }


def clustering_scores(x: np.ndarray, labels: np.ndarray, *, seed: int = 0, max_points: int = 20000) -> dict:
    """k-means (k = number of distinct labels) against the labels.

    Returns {"NMI", "ARI", "n_points", "n_clusters"}: normalized mutual information
    and adjusted Rand index (scikit-learn) between the k-means clusters and the
    labels. k-means (scikit-learn, k-means++ init, one run, `seed`) is fitted on
    x as given, on a stratified random subsample of at most `max_points` rows
    (seeded; every class keeps at least one row when max_points allows), because
    its cost grows with N * k. With fewer than 2 classes the scores are NaN and a
    "skipped" reason is added.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    x = _as_matrix(x)
    codes, class_sizes = _encode(labels, x.shape[0])
    n_clusters = int(class_sizes.size)
    if isinstance(max_points, bool) or int(max_points) != max_points or max_points < 1:
        raise ValueError(f"max_points must be a positive integer, got {max_points!r}")
    nan = float("nan")
    if n_clusters < 2:
        return {"NMI": nan, "ARI": nan, "n_points": int(x.shape[0]), "n_clusters": n_clusters,
                "skipped": f"k-means needs at least 2 classes, got {n_clusters}"}
    if max_points < n_clusters:
        return {"NMI": nan, "ARI": nan, "n_points": 0, "n_clusters": n_clusters,
                "skipped": f"max_points={max_points} is below the number of classes ({n_clusters})"}

    rows = _stratified_sample(codes, class_sizes, int(max_points), seed)
    sample = x[rows].astype(np.float32)
    kmeans = KMeans(n_clusters=n_clusters, n_init=1, random_state=seed)
    clusters = kmeans.fit_predict(sample)
    return {
        "NMI": float(normalized_mutual_info_score(codes[rows], clusters)),
        "ARI": float(adjusted_rand_score(codes[rows], clusters)),
        "n_points": int(rows.size),
        "n_clusters": n_clusters,
    }


def _stratified_sample(codes: np.ndarray, class_sizes: np.ndarray, max_points: int, seed: int) -> np.ndarray:
    """Sorted row indices: each class keeps its share of max_points (largest remainders), at least one row."""
    n = codes.size
    if n <= max_points:
        return np.arange(n)
    exact_share = class_sizes * (max_points / n)
    quota = np.maximum(np.floor(exact_share).astype(np.int64), 1)
    quota = np.minimum(quota, class_sizes)
    left = max_points - int(quota.sum())
    # Rounding down leaves rows over: hand them one at a time to the classes that
    # rounding shortchanged most (and that still have rows). The one-row minimum
    # can overshoot instead: then trim the largest quotas.
    while left > 0:
        shortfall = np.where(quota < class_sizes, exact_share - quota, -np.inf)
        for c in np.argsort(-shortfall, kind="stable")[:left]:
            if quota[c] < class_sizes[c]:
                quota[c] += 1
                left -= 1
    while left < 0:
        c = int(np.argmax(quota))
        quota[c] -= 1
        left += 1
    rng = np.random.default_rng(seed)
    order = np.argsort(codes, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(class_sizes)])
    picked = [
        rng.choice(order[bounds[c]:bounds[c + 1]], size=int(quota[c]), replace=False)
        for c in range(class_sizes.size)
    ]
    return np.sort(np.concatenate(picked))


def _covariance_eigenvalues(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    n, dim = x.shape
    if n < 2:
        return np.zeros(dim)
    scatter = np.zeros((dim, dim))
    for start in range(0, n, _ROW_BLOCK):
        block = x[start:start + _ROW_BLOCK].astype(np.float64) - mean
        scatter += block.T @ block
    eigenvalues = np.linalg.eigvalsh(scatter / (n - 1))[::-1]
    # Rounding leaves tiny negative eigenvalues for rank-deficient data.
    return np.clip(eigenvalues, 0.0, None)


def _skew(counts: np.ndarray) -> float:
    if np.all(counts == counts[0]):
        return 0.0
    from scipy.stats import skew

    return float(skew(counts))


def _ratio(numerator: float, denominator: float) -> float:
    if not denominator or not np.isfinite(denominator) or not np.isfinite(numerator):
        return float("nan")
    return float(numerator / denominator)


def _as_matrix(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (n, dim), got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"x must be numeric, got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError("x contains NaN or infinite values")
    return x


def _encode(labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer class codes (equal exactly when labels are ==) and class sizes."""
    values = np.asarray(labels)
    if values.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {values.shape}")
    if values.dtype.kind in "biufUS":
        _, codes = np.unique(values, return_inverse=True)
        codes = codes.reshape(-1)
    else:
        seen: dict = {}
        codes = np.fromiter((seen.setdefault(v, len(seen)) for v in values.tolist()), dtype=np.int64, count=n)
    codes = codes.astype(np.int64)
    return codes, np.bincount(codes, minlength=int(codes.max(initial=-1)) + 1)
