"""Row-vector helpers shared by extraction, evaluation and search."""
from __future__ import annotations

import numpy as np


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Unit rows in float32; zero rows stay zero.

    The overall scale is divided out before squaring because randomly initialised
    backbones produce features of norm ~1e-16, whose squares underflow any epsilon.
    """
    x = np.asarray(x, dtype=np.float32)
    scale = np.max(np.abs(x), axis=-1, keepdims=True)
    y = x / np.maximum(scale, np.float32(1e-30))
    norms = np.linalg.norm(y, axis=-1, keepdims=True)
    return (y / np.maximum(norms, np.float32(1e-12))).astype(np.float32)
