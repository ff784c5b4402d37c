"""Vector math that ingest, search and the checks share: unit normalisation and what counts as a sound vector."""

from __future__ import annotations

import numpy as np

# A model that L2-normalises returns float32 vectors whose norms are within ~1e-6 of 1. Anything further off was not
# produced by the model (or was damaged since), and inner-product scores on it would be wrong. (The default of
# ``quality.norm_tolerance``.)
NORM_TOLERANCE = 1e-3


def unit_normalised(vectors: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (float32). Zero and non-finite rows are left as they are, so the checks still
    see and report them."""
    vectors = np.asarray(vectors, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        norms = np.linalg.norm(vectors.astype(np.float64), axis=1, keepdims=True)
    usable = np.isfinite(norms) & (norms > 0)
    return np.where(usable, vectors / np.where(usable, norms, 1.0), vectors).astype(np.float32)


def sound_vectors(vectors: np.ndarray, tolerance: float = NORM_TOLERANCE, unit_norm: bool = True) -> np.ndarray:
    """One boolean per row: the vector is finite and its L2 norm is within ``tolerance`` of 1 (with ``unit_norm``
    off: is not 0) — what the embedding checks accept."""
    vectors = np.asarray(vectors, dtype=np.float32)
    finite = np.isfinite(vectors).all(axis=1)
    with np.errstate(invalid="ignore", over="ignore"):
        norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    return finite & ((np.abs(norms - 1.0) <= tolerance) if unit_norm else (norms > 0))
