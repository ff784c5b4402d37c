"""The vectors the index sections insert and search, and their metadata.

A collection of ``size`` rows holds the real photo embeddings from section 1 (all but the held-out queries)
and synthetic unit vectors for the rest. The synthetic ones are drawn around the real embeddings' mean with
their per-dimension spread, so they sit where real embeddings sit and actually compete with them as
neighbours; plain Gaussian vectors in 1280 dimensions would all be near-orthogonal to every photo and make
the recall figure meaninglessly easy. Queries are real embeddings the collection does not hold.

Everything is kept as one float32 matrix: at 100k x 1280 that is 512 MB, where Python lists of floats would
take about 4 GB; rows are turned into lists only one insert batch at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

CATEGORIES = 10  # values of the declared filter key: a filter keeps about 1 row in 10
GROUPS = 10  # values of the undeclared (JSON-path) key
CHUNK = 10_000  # rows generated per step, to bound temporary memory


def normalise(matrix: np.ndarray) -> np.ndarray:
    """L2-normalise the rows in place (and return the matrix)."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    np.divide(matrix, np.maximum(norms, 1e-12), out=matrix)
    return matrix


def synthetic(count: int, dim: int, seed: int, like: np.ndarray | None = None) -> np.ndarray:
    """``count`` unit vectors; shaped like the rows of ``like`` (mean, per-dimension std) when given."""
    return fill_synthetic(np.empty((count, dim), dtype=np.float32), seed, like)


def fill_synthetic(out: np.ndarray, seed: int, like: np.ndarray | None = None) -> np.ndarray:
    """Fill ``out`` (float32 rows) with unit vectors in place, a chunk at a time; see :func:`synthetic`."""
    rng = np.random.default_rng(seed)
    dim = out.shape[1]
    if like is not None and len(like) > 1:
        mean, std = like.mean(axis=0), like.std(axis=0)
    else:
        mean, std = np.zeros(dim, dtype=np.float32), np.ones(dim, dtype=np.float32)
    for start in range(0, len(out), CHUNK):
        block = out[start : start + CHUNK]
        block[:] = rng.standard_normal(block.shape, dtype=np.float32)
        block *= std
        block += mean
        normalise(block)
    return out


def category(i: int) -> str:
    return f"c{i % CATEGORIES}"


def group(i: int) -> str:
    return f"g{(i // CATEGORIES) % GROUPS}"


# Every value each filter key takes, for building queries that select them in turn.
KEY_VALUES = {"category": [f"c{k}" for k in range(CATEGORIES)], "group": [f"g{k}" for k in range(GROUPS)]}


@dataclass
class Corpus:
    """``vectors[:real]`` are real photo embeddings, the rest synthetic; ``queries`` are held-out real ones."""

    vectors: np.ndarray  # [size, dim] float32, unit rows
    real: int
    queries: np.ndarray  # [held_out, dim] float32, unit rows
    query_kind: str  # "real photo embeddings" or "synthetic" (when --dim differs from the model's)
    photos: np.ndarray | None = None  # [real] the sample photo each real row was cut from
    query_photos: np.ndarray | None = None  # [held_out] the same for the queries

    @property
    def size(self) -> int:
        return len(self.vectors)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def query(self, i: int) -> np.ndarray:
        """The i-th query of a run: the held-out vectors in turn."""
        return self.queries[i % len(self.queries)]

    def row_id(self, i: int) -> str:
        return f"v{i:07d}"

    def rows(self, start: int, stop: int, model: str) -> list[dict[str, Any]]:
        """Rows ``start..stop`` as the pipeline writes them: id, vector, lineage and metadata."""
        out = []
        for i in range(start, stop):
            kind = "photo" if i < self.real else "synthetic"
            out.append(
                {
                    "id": self.row_id(i),
                    "embedding": self.vectors[i],  # a view; converted to a list one insert batch at a time
                    "uri": f"bench://{kind}/{i}",
                    "sha256": "",
                    "drop": "bench",
                    "model": model,
                    "metadata": {"category": category(i), "group": group(i), "kind": kind},
                }
            )
        return out

    def batches(self, step: int, model: str) -> Iterator[list[dict[str, Any]]]:
        for start in range(0, self.size, step):
            yield self.rows(start, min(start + step, self.size), model)


def build(
    size: int, dim: int, real: np.ndarray | None, photos: np.ndarray | None, queries: int, seed: int = 0
) -> Corpus:
    """A corpus of ``size`` rows; ``real`` (the model's embeddings, or None) supplies held-out queries first.

    ``photos`` labels each real embedding with the sample photo it came from.
    """
    if size < 1:
        raise ValueError(f"sizes must be positive, not {size}")
    if real is not None and len(real) >= 2 and real.shape[1] == dim:
        held = max(1, min(queries, len(real) // 5))  # a fifth at most: the rest must populate the collection
        query_vectors = np.ascontiguousarray(real[-held:], dtype=np.float32)
        kept = real[: len(real) - held][:size]
        vectors = np.empty((size, dim), dtype=np.float32)
        vectors[: len(kept)] = kept
        normalise(vectors[: len(kept)])
        fill_synthetic(vectors[len(kept) :], seed, like=real)
        labels = np.asarray(photos if photos is not None else np.full(len(real), -1))
        return Corpus(
            vectors,
            len(kept),
            normalise(query_vectors),
            "real photo embeddings",
            photos=labels[: len(kept)],
            query_photos=labels[len(real) - held :],
        )
    vectors = synthetic(size, dim, seed)
    return Corpus(vectors, 0, synthetic(max(1, min(queries, 1000)), dim, seed + 1), "synthetic")
