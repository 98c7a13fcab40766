"""Euclidean retrieval of unit vectors read off their cosine retrieval, and the check that this is valid.

On the unit sphere ||a - b||^2 = 2 - 2 cos(a, b), so euclidean distance ranks exactly like cosine similarity:
``euclidean_from_cosine`` reads the euclidean result off the cosine one (same neighbours and metrics, scores
sqrt(max(0, 2 - 2 cos))) instead of a second pass, and ``check_unit_identity`` verifies the identity on a seeded
sample of queries by really ranking them by euclidean distance.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.vectors.retrieval import RetrievalResult, check_exclude, retrieve

# Largest |d_euclidean^2 - (2 - 2 cos)| the unit identity tolerates: float32 scores of
# unit vectors are exact to about 1e-7, vectors a thousandth off unit length miss it by ~1e-3.
IDENTITY_TOLERANCE = 1e-5


@dataclass
class UnitIdentityCheck:
    """How a real euclidean ranking of sampled queries compared with their cosine ranking."""

    n_sampled: int
    # Top-k lists equal index for index.
    n_identical: int
    # Top-k lists whose scores agree rank by rank (d^2 = 2 - 2 cos within IDENTITY_TOLERANCE): equal,
    # or differing only in the order of items whose scores are equal up to float32 rounding.
    n_consistent: int
    max_sq_distance_error: float
    sample: np.ndarray  # (n_sampled,) sorted query indices checked

    @property
    def holds(self) -> bool:
        return self.n_consistent == self.n_sampled

    def as_dict(self) -> dict:
        return {"n_sampled": self.n_sampled, "n_identical": self.n_identical, "n_consistent": self.n_consistent,
                "max_sq_distance_error": self.max_sq_distance_error, "tolerance": IDENTITY_TOLERANCE,
                "holds": self.holds}


def euclidean_from_cosine(cosine: RetrievalResult) -> RetrievalResult:
    """The euclidean result of unit vectors, read off their cosine result: on the unit sphere
    ||a - b||^2 = 2 - 2 cos(a, b), so the ranking, neighbour lists and metrics are the same and each
    neighbour score becomes the distance sqrt(max(0, 2 - 2 cos)). Valid only where check_unit_identity holds."""
    cos = cosine.neighbour_scores.astype(np.float64)
    distance = np.sqrt(np.maximum(2.0 - 2.0 * cos, 0.0)).astype(np.float32)  # NaN padding stays NaN
    return RetrievalResult(
        metrics=dict(cosine.metrics),
        neighbours=cosine.neighbours.copy(),
        neighbour_scores=distance,
        per_query={name: values.copy() for name, values in cosine.per_query.items()},
        k_occurrence=cosine.k_occurrence.copy(),
    )


def check_unit_identity(
    query: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    cosine: RetrievalResult,
    *,
    k: int = 5,
    exclude: np.ndarray | None = None,
    sample_size: int = 1000,
    seed: int = 0,
    chunk_size: int = 1024,
    scan: str = "auto",
) -> UnitIdentityCheck:
    """Rank a seeded sample of the queries by real euclidean distance and compare with `cosine`
    (their cosine result on the same vectors): same top-k lists, and at every rank
    d^2 = 2 - 2 cos within IDENTITY_TOLERANCE. Vectors that are not unit length fail it."""
    n_queries = len(cosine.neighbours)
    if isinstance(sample_size, bool) or int(sample_size) != sample_size or sample_size < 1:
        raise ValueError(f"sample_size must be a positive integer, got {sample_size!r}")
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n_queries, size=min(int(sample_size), n_queries), replace=False))
    exclude_idx = check_exclude(exclude, n_queries, len(gallery))
    euclidean = retrieve(np.asarray(query)[sample], np.asarray(query_labels)[sample], gallery, gallery_labels,
                         metric="euclidean", k=k, exclude=exclude_idx[sample], chunk_size=chunk_size, scan=scan)
    cos_neighbours = cosine.neighbours[sample]
    identical = np.all(euclidean.neighbours == cos_neighbours, axis=1)
    valid = euclidean.neighbours >= 0
    implied = 2.0 - 2.0 * cosine.neighbour_scores[sample].astype(np.float64)
    error = np.abs(euclidean.neighbour_scores.astype(np.float64) ** 2 - implied)
    error = np.where(valid & (cos_neighbours >= 0), error, 0.0)
    consistent = np.all(valid == (cos_neighbours >= 0), axis=1) & np.all(error <= IDENTITY_TOLERANCE, axis=1)
    return UnitIdentityCheck(
        n_sampled=int(sample.size),
        n_identical=int(identical.sum()),
        n_consistent=int(consistent.sum()),
        max_sq_distance_error=float(error.max(initial=0.0)),
        sample=sample,
    )
