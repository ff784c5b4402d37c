"""The floor beside the store's search and build figures: FAISS (installed with milvus-lite) called directly on the
same vectors, with the same index type and parameters, in this process, one query at a time.

milvus-lite builds and searches FAISS indexes too, so the ratio of its figures to these is what the engine adds:
request handling, per-segment bookkeeping, reading the hits' fields. Only HNSW and FLAT have a direct counterpart
here; other index types report none.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from embedding_pipeline.bench.corpus import Corpus
from embedding_pipeline.bench.search import TOP_K, WARMUP_QUERIES, latency


def run(
    corpus: Corpus,
    index_type: str,
    build_params: dict[str, Any],
    search_params: dict[str, Any],
    metric: str,
    queries: int,
    budget_s: float,
) -> dict[str, Any] | None:
    """Build the index over ``corpus.vectors`` and time single-query top-10 searches; None for other types."""
    import faiss

    if index_type not in ("HNSW", "FLAT"):
        return None
    dim = corpus.dim
    # Rows and queries are unit vectors: cosine is the inner product.
    kind = faiss.METRIC_L2 if metric.upper() == "L2" else faiss.METRIC_INNER_PRODUCT
    index: Any
    if index_type == "HNSW":
        index = faiss.IndexHNSWFlat(dim, int(build_params.get("M", 16)), kind)
        index.hnsw.efConstruction = int(build_params.get("efConstruction", 200))
    else:
        index = faiss.IndexFlat(dim, kind)
    vectors = np.ascontiguousarray(corpus.vectors, dtype=np.float32)
    started = time.perf_counter()
    index.add(vectors)
    build_s = time.perf_counter() - started
    if index_type == "HNSW":
        index.hnsw.efSearch = max(int(search_params.get("ef", 64)), TOP_K)
    for i in range(WARMUP_QUERIES):
        index.search(corpus.query(i)[None, :], TOP_K)
    ms = []
    started = time.perf_counter()
    for i in range(queries):
        query = np.ascontiguousarray(corpus.query(i)[None, :], dtype=np.float32)
        t0 = time.perf_counter()
        index.search(query, TOP_K)
        ms.append(1000 * (time.perf_counter() - t0))
        if time.perf_counter() - started > budget_s:
            break
    return {
        "index_type": index_type,
        "build_seconds": round(build_s, 2),
        "search": latency(ms),
        "threads": int(faiss.omp_get_max_threads()),
    }
