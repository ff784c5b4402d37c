"""Section 3 of ``embedding-pipeline bench``: search latency, filtered and not, and recall against exact search.

Each query is one :meth:`ImageIndex.search` call at top-10 (what a user's search costs, hits with their fields
included), timed on its own. Three kinds: no filter; a filter on the declared key (``metadata["category"]``,
stored as a typed scalar field because ``milvus.filter_fields`` declares it); a filter on an undeclared key
(served by the rows' mirror of it; a collection without mirrors evaluates it as a JSON path on every row). A
fourth figure sends 8 queries per call, as the HTTP API does for concurrent clients. The references are numpy brute
force over the same matrix with the same queries, one at a time, and FAISS called directly (:mod:`.faiss_ref`).
Recall@10 compares the unfiltered hits with the exact top-10.

A kind stops early when it has used its time budget (a JSON-path filter on milvus-lite can take seconds per
query); the figures say how many queries were measured.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from embedding_pipeline.bench import corpus as corpus_mod
from embedding_pipeline.bench.corpus import Corpus
from embedding_pipeline.index.client import ImageIndex
from embedding_pipeline.index.expressions import literal as quote
from embedding_pipeline.retrieval import ranked, stored_vector

TOP_K = 10
TARGET_FILTER_RATIO = 1.5  # declared-key filter p99 vs unfiltered p99
TARGET_JSON_FILTER_RATIO = 3.0  # undeclared-key filter p99 vs unfiltered p99
TARGET_RECALL = 0.99  # HNSW recall@10 on real embeddings
BATCH = 8  # queries per call in the batched figure (what the API's coalescing sends under 8 clients)
TARGET_BY_ID_RATIO = 1.5  # search by a stored item's id vs by its vector, p50 and p99
WARMUP_QUERIES = 3
DECLARED_KEY, JSON_KEY = "category", "group"


def latency(ms: list[float]) -> dict[str, Any]:
    """Count, average and percentiles of per-query milliseconds."""
    values = np.asarray(ms, dtype=np.float64)
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {
        "queries": len(values),
        "avg_ms": round(float(values.mean()), 3),
        "p50_ms": round(float(p50), 3),
        "p95_ms": round(float(p95), 3),
        "p99_ms": round(float(p99), 3),
    }


def filter_for(key: str) -> Callable[[int], tuple[str, str]]:
    """Query i's (expression, expected value) for a metadata key; values rotate so every query differs."""
    values = corpus_mod.KEY_VALUES[key]

    def make(i: int) -> tuple[str, str]:
        value = values[i % len(values)]
        return f"metadata[{quote(key)}] == {quote(value)}", value

    return make


def run_queries(
    index: ImageIndex, corpus: Corpus, queries: int, budget_s: float, key: str | None = None
) -> tuple[dict[str, Any], list[list[str]]]:
    """Time ``queries`` single-vector searches (fewer if ``budget_s`` runs out); also returns the hit ids."""
    make = filter_for(key) if key else None
    for i in range(WARMUP_QUERIES):  # the first searches after a load pay one-off costs
        index.search(corpus.query(i), top_k=TOP_K, filter=make(i)[0] if make else None)
    ms, ids, wrong, short = [], [], 0, 0
    started = time.perf_counter()
    for i in range(queries):
        expr, value = make(i) if make else (None, None)
        t0 = time.perf_counter()
        hits = index.search(corpus.query(i), top_k=TOP_K, filter=expr)[0]
        ms.append(1000 * (time.perf_counter() - t0))
        ids.append([h.id for h in hits])
        short += len(hits) < TOP_K
        if key:
            wrong += sum(h.metadata.get(key) != value for h in hits)
        if time.perf_counter() - started > budget_s:
            break
    figures = latency(ms)
    figures.update(short_results=short, budget_exhausted=len(ms) < queries)
    if key:
        example = filter_for(key)(0)[0]
        figures.update(filter=example, run_as=index.rewrite(example), wrong_hits=wrong)
    return figures, ids


def run_batched(index: ImageIndex, corpus: Corpus, queries: int, budget_s: float) -> dict[str, Any]:
    """Searches of ``BATCH`` query vectors in one call (how the HTTP API sends concurrent queries): milliseconds
    per call, and per query."""
    calls = max(1, queries // BATCH)

    def batch(c: int) -> np.ndarray:
        return np.stack([corpus.query(c * BATCH + k) for k in range(BATCH)])

    index.search(batch(0), top_k=TOP_K)
    ms = []
    started = time.perf_counter()
    for c in range(calls):
        vectors = batch(c)
        t0 = time.perf_counter()
        index.search(vectors, top_k=TOP_K)
        ms.append(1000 * (time.perf_counter() - t0))
        if time.perf_counter() - started > budget_s:
            break
    figures = latency(ms)
    figures.update(batch=BATCH, per_query_p50_ms=round(figures["p50_ms"] / BATCH, 3))
    return figures


def by_id_and_by_vector(index: ImageIndex, corpus: Corpus, queries: int, budget_s: float) -> dict[str, Any]:
    """ "More like this" timed against searching with the same vector: query i is stored row i; by id reads its
    vector from Milvus then searches without it (retrieval.ranked with exclude), by vector searches with the
    vector already in hand. Alternating, so both see the same server state."""
    n = min(queries, corpus.size)
    vectors = [stored_vector(index, corpus.row_id(i)) for i in range(min(n, WARMUP_QUERIES))]
    for vector in vectors:
        ranked(index, vector, TOP_K)
    by_id, by_vector = [], []
    started = time.perf_counter()
    for i in range(n):
        row = corpus.row_id(i)
        t0 = time.perf_counter()
        ranked(index, stored_vector(index, row), TOP_K, exclude=row)
        by_id.append(1000 * (time.perf_counter() - t0))
        vector = corpus.vectors[i]
        t0 = time.perf_counter()
        ranked(index, vector, TOP_K + 1)
        by_vector.append(1000 * (time.perf_counter() - t0))
        if time.perf_counter() - started > budget_s:
            break
    ids, vecs = latency(by_id), latency(by_vector)
    p50 = ids["p50_ms"] / vecs["p50_ms"] if vecs["p50_ms"] else float("inf")
    p99 = ids["p99_ms"] / vecs["p99_ms"] if vecs["p99_ms"] else float("inf")
    return {
        "by_id": ids,
        "by_vector": vecs,
        "by_id_to_by_vector_p50": round(p50, 3),
        "by_id_to_by_vector_p99": round(p99, 3),
        "target_by_id_ratio": TARGET_BY_ID_RATIO,
        "by_id_target_met": p50 <= TARGET_BY_ID_RATIO and p99 <= TARGET_BY_ID_RATIO,
    }


def brute_force(corpus: Corpus, queries: int, budget_s: float) -> dict[str, Any]:
    """numpy exact top-10 per query over the same matrix (rows are unit vectors: dot product = cosine)."""
    vectors = corpus.vectors
    ms = []
    started = time.perf_counter()
    for i in range(queries):
        t0 = time.perf_counter()
        scores = vectors @ corpus.query(i)
        top = np.argpartition(-scores, TOP_K)[:TOP_K] if len(scores) > TOP_K else np.arange(len(scores))
        top[np.argsort(-scores[top])]
        ms.append(1000 * (time.perf_counter() - t0))
        if time.perf_counter() - started > budget_s:
            break
    return latency(ms)


def exact_neighbours(corpus: Corpus, k: int = TOP_K, chunk: int = 100) -> np.ndarray:
    """[held-out queries, k] row numbers of the exact top-k, best first."""
    out = np.empty((len(corpus.queries), min(k, corpus.size)), dtype=np.int64)
    for start in range(0, len(corpus.queries), chunk):
        scores = corpus.queries[start : start + chunk] @ corpus.vectors.T
        if corpus.size > k:
            top = np.argpartition(-scores, k, axis=1)[:, :k]
        else:
            top = np.tile(np.arange(corpus.size), (len(scores), 1))
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        out[start : start + chunk] = np.take_along_axis(top, order, axis=1)
    return out


def recall(corpus: Corpus, hit_ids: list[list[str]]) -> dict[str, Any]:
    """Recall@10 of the index's unfiltered hits for the distinct held-out queries, against exact search."""
    exact = exact_neighbours(corpus)
    measured = min(len(exact), len(hit_ids))
    found = 0
    for i in range(measured):
        want = {corpus.row_id(int(r)) for r in exact[i]}
        found += len(want & set(hit_ids[i]))
    value = found / (measured * exact.shape[1]) if measured else 0.0
    figures: dict[str, Any] = {
        "recall_at_10": round(value, 4),
        "queries": measured,
        "vectors": corpus.query_kind,
        "real_rows": corpus.real,
        "synthetic_rows": corpus.size - corpus.real,
    }
    if corpus.real and corpus.photos is not None and corpus.query_photos is not None:
        # Sanity of the embeddings themselves: a variant's nearest stored neighbour is cut from the same photo.
        top1 = exact[:measured, 0]
        same = [top1[i] < corpus.real and corpus.photos[top1[i]] == corpus.query_photos[i] for i in range(measured)]
        figures["same_photo_top1"] = round(float(np.mean(same)), 4) if same else 0.0
    return figures


def run(index: ImageIndex, corpus: Corpus, queries: int, budget_s: float, index_type: str) -> dict[str, Any]:
    """Every figure of section 3 for one loaded collection."""
    unfiltered, ids = run_queries(index, corpus, queries, budget_s)
    declared, _ = run_queries(index, corpus, queries, budget_s, DECLARED_KEY)
    json_path, _ = run_queries(index, corpus, queries, budget_s, JSON_KEY)
    batched = run_batched(index, corpus, queries, budget_s)
    numpy_ref = brute_force(corpus, queries, budget_s)
    more_like_this = by_id_and_by_vector(index, corpus, queries, budget_s)
    quality = recall(corpus, ids)
    base = unfiltered["p99_ms"]
    ratio = declared["p99_ms"] / base if base else float("inf")
    json_ratio = json_path["p99_ms"] / base if base else float("inf")
    targets = {
        "declared_filter_to_unfiltered_p99": round(ratio, 3),
        "target_declared_filter_ratio": TARGET_FILTER_RATIO,
        "declared_filter_target_met": ratio <= TARGET_FILTER_RATIO,
        "json_filter_to_unfiltered_p99": round(json_ratio, 3),
        "target_json_filter_ratio": TARGET_JSON_FILTER_RATIO,
        "json_filter_target_met": json_ratio <= TARGET_JSON_FILTER_RATIO,
    }
    if index_type == "HNSW" and corpus.real:
        targets.update(target_recall=TARGET_RECALL, recall_target_met=quality["recall_at_10"] >= TARGET_RECALL)
    return {
        "top_k": TOP_K,
        "unfiltered": unfiltered,
        "filtered_declared": declared,
        "filtered_json_path": json_path,
        "batched": batched,
        "numpy_brute_force": numpy_ref,
        "more_like_this": more_like_this,
        "recall": quality,
        **targets,
    }
