"""The one numpy L2 normaliser of the project (extraction, retrieval, search) and the row norms it uses.

Keras code normalises inside the model (models/layers.py `L2Normalize`, and the losses on their own batches);
everything that holds numpy arrays uses this module.
"""
from __future__ import annotations

import numpy as np

# Row block for the float64 arithmetic, so no float64 copy of a large matrix is ever made.
_BLOCK = 8192


def row_sq_norms(x: np.ndarray) -> np.ndarray:
    """Squared L2 norm of every row of a 2-D array, accumulated in float64."""
    out = np.empty(x.shape[0], dtype=np.float64)
    for start in range(0, x.shape[0], _BLOCK):
        block = x[start:start + _BLOCK].astype(np.float64)
        out[start:start + _BLOCK] = np.einsum("ij,ij->i", block, block)
    return out


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Unit rows (along the last axis) in float32; zero rows stay zero.

    The arithmetic is float64, block by block: rows that are already unit length come back unchanged, and
    the features of randomly initialised backbones (norms ~1e-16, whose squares underflow float32) still
    normalise, since the square of any float32 is representable in float64.
    """
    x = np.asarray(x, dtype=np.float32)
    shape = x.shape
    rows = np.ascontiguousarray(x.reshape(-1, shape[-1]) if x.ndim != 2 else x)
    norms = np.sqrt(row_sq_norms(rows))
    scale = np.zeros_like(norms)
    np.divide(1.0, norms, out=scale, where=norms > 0)
    out = np.empty_like(rows)
    for start in range(0, rows.shape[0], _BLOCK):
        stop = start + _BLOCK
        block = rows[start:stop].astype(np.float64)
        block *= scale[start:stop, None]
        out[start:stop] = block
    return out.reshape(shape)
