"""Ensembles of embedding spaces on arrays: the members' unit vectors, weighted, combined and re-normalised.

For members x_1 … x_m (n × d_i each, one row per item, rows in the same item order) and weights w_i > 0:

    u_i = x_i / ||x_i||                      every member L2-normalised first, so no space dominates by its scale
    concat:  r = [w_1·u_1, …, w_m·u_m]       (n × Σ d_i)
    mean:    r = Σ w_i·u_i / Σ w_i           (n × d; every member must have the same d)
    unit = r / ||r||

With `concat` the ensemble's cosine of two items is Σ w_i²·cos_i / Σ w_i², a weighted mean of the members'
cosines (so a weight acts squared on similarities); `mean` averages the vectors themselves, which is only
meaningful when the members share one space (e.g. the same model at two image sizes). `r` is kept as the
ensemble's "raw" features (the input of its final normalisation, as phase 4 keeps a head's).

models/ensemble.py computes the same in a Keras graph (the exported bundle); tests check the two agree.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.vectors.normalize import l2_normalize

COMBINES = ("concat", "mean")


class EnsembleError(ValueError):
    """The members cannot be combined as asked (one-line reason)."""


def check_members(dims: Sequence[int], combine: str, weights: Sequence[float] | None = None,
                  names: Sequence[str] | None = None) -> list[float]:
    """The weights to use (1 each when none are given), after checking the combination is possible."""
    names = list(names) if names is not None else [f"member {i}" for i in range(len(dims))]
    if combine not in COMBINES:
        raise EnsembleError(f"combine must be one of {COMBINES}, got {combine!r}")
    if len(dims) < 2:
        raise EnsembleError(f"an ensemble needs at least two members, got {len(dims)}")
    chosen = [1.0] * len(dims) if not weights else [float(w) for w in weights]
    if len(chosen) != len(dims):
        raise EnsembleError(f"{len(chosen)} weights for {len(dims)} members")
    if not all(np.isfinite(w) and w > 0 for w in chosen):
        raise EnsembleError(f"weights must be positive finite numbers, got {chosen}")
    if combine == "mean" and len(set(dims)) != 1:
        listing = ", ".join(f"{name} is {dim}-d" for name, dim in zip(names, dims))
        raise EnsembleError(f"combine 'mean' averages vectors and needs members of one dimension ({listing}): "
                            "use combine 'concat'")
    return chosen


def combined_dim(dims: Sequence[int], combine: str) -> int:
    return int(sum(dims)) if combine == "concat" else int(dims[0])


def combine_embeddings(members: Sequence[np.ndarray], combine: str = "concat",
                       weights: Sequence[float] | None = None, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """(raw, unit): the combination before and after its final L2 normalisation, float32, computed a chunk
    of rows at a time (members may be memory-mapped)."""
    if not members:
        raise EnsembleError("an ensemble needs at least two members, got 0")
    n = len(members[0])
    if any(m.ndim != 2 or len(m) != n for m in members):
        raise EnsembleError(f"members must be 2-D arrays of one length, got {[m.shape for m in members]}")
    dims = [int(m.shape[1]) for m in members]
    chosen = check_members(dims, combine, weights)
    raw = np.empty((n, combined_dim(dims, combine)), dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        parts = [w * l2_normalize(m[start:stop]) for m, w in zip(members, chosen)]
        raw[start:stop] = np.concatenate(parts, axis=1) if combine == "concat" else sum(parts) / sum(chosen)
    return raw, l2_normalize(raw)
