"""Concurrent queries to the HTTP API's search service share calls (real Triton, real Milvus): images that arrive
together go to Triton in one request and their vectors to Milvus in one search, and each query gets exactly the
answer it gets alone. A bad query among them gets its own error and spoils nobody else's."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from embedding_pipeline.api.errors import ApiError
from embedding_pipeline.api.search import SearchService

pytestmark = pytest.mark.integration

CALLERS = 16


def _answer(outcome) -> list[tuple[str, float]]:
    return [(h.id, round(h.score, 4)) for h in outcome.hits]


def _burst(calls: list) -> list:
    """Run every call at once (behind a barrier); each result, or the exception it raised."""
    results: list = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(k: int) -> None:
        start.wait()
        try:
            results[k] = calls[k]()
        except Exception as exc:  # noqa: BLE001 - compared by the test
            results[k] = exc

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_concurrent_queries_share_calls_and_get_their_own_answers(stack, ingested_photos):
    folder = stack.drops / "photos"
    images = [p.read_bytes() for p in sorted(folder.glob("*.jpg"))]
    assert len(images) >= 8
    service = SearchService(stack)
    try:
        service.warm()
        entry = next(iter(service._entries.values()))
        index, embedder = entry.searcher.index, entry.searcher.embedder
        assert index._coalescer is not None and embedder._coalescer is not None
        vectors = list(index.vectors(sorted(index.ids())).values())[:8]

        image_alone = [_answer(service.search_image(data, 5)) for data in images]
        vector_alone = [_answer(service.search_vector(v.tolist(), 5)) for v in vectors]
        calls = [lambda d=d: service.search_image(d, 5) for d in images[:8]]
        calls += [lambda v=v: service.search_vector(v.tolist(), 5) for v in vectors]
        for _ in range(10):
            results = _burst(calls)
            assert [_answer(r) for r in results[:8]] == image_alone[:8]
            assert [_answer(r) for r in results[8:]] == vector_alone
            shared = [c.items > c.calls for c in (embedder._coalescer, index._coalescer)]
            if all(shared):
                break
        # Some calls carried several queries: fewer Triton requests and Milvus searches than queries.
        assert embedder._coalescer.items > embedder._coalescer.calls
        assert index._coalescer.items > index._coalescer.calls

        # A query Milvus refuses (its filter) and one that is not an image, amid good ones: only they fail.
        bad_filter = 'metadata["category"] ==== 1'
        mixed = [lambda d=d: service.search_image(d, 5) for d in images[:6]]
        mixed.append(lambda: service.search_image(images[0], 5, bad_filter))
        mixed.append(lambda: service.search_image(b"not an image at all", 5))
        results = _burst(mixed)
        assert [_answer(r) for r in results[:6]] == image_alone[:6]
        assert isinstance(results[6], ApiError) and results[6].status == 422 and "filter_expr" in str(results[6])
        assert isinstance(results[7], ApiError) and results[7].status in (400, 422), results[7]
        assert np.isfinite([s for r in results[:6] for _, s in _answer(r)]).all()
    finally:
        service.close()
