"""Warm searchers, one per per-model collection, shared by the API's worker threads.

A name is an alias over one collection per model (:mod:`embedding_pipeline.index.collections`). Each per-model
collection gets one :class:`~embedding_pipeline.retrieval.ImageSearcher` (Triton client, compiled preprocessor,
Milvus client) on that collection, created on first use and kept: it embeds with the model recorded on the
collection, exactly like the Python API, and a query pays only decode + kernel + inference + one search call. The
alias is re-read at most once per ``ALIAS_TTL_S``, so a model switch reaches search within that time. Index
settings come from the collection's own vector index, so per-query search parameters are checked against the
index the collection really has.

Thread safety: ``TritonEmbedder`` sends every call through its own worker threads (each owning its client), the
Milvus client's gRPC channel is thread-safe, and the preprocessor keeps no state between calls, so one searcher
serves all request threads at once; resolving names and opening searchers run under one lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedding_pipeline.api.errors import ApiError, invalid
from embedding_pipeline.index.client import CollectionError, Hit, UnknownItem
from embedding_pipeline.index.named import collection_settings
from embedding_pipeline.settings import ConfigError, Settings
from embedding_pipeline.vectors import unit_normalised

log = logging.getLogger(__name__)

# Searchers kept warm at once; the least recently used beyond this are closed (each holds Triton worker threads).
MAX_SEARCHERS = 4
# How long a name's alias resolution is trusted: a model switch reaches search within this time, and queries in
# between cost no extra Milvus calls.
ALIAS_TTL_S = 1.0
EVICTED_CLOSE_DELAY_S = 60.0


@dataclass
class SearchOutcome:
    hits: list[Hit]
    collection: str  # the name asked for (the alias)
    resolved: str  # the per-model collection searched
    took_ms: float = 0.0


def _is_unreachable(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(
        word in text
        for word in (
            "cannot connect",
            "nothing answers",
            "unavailable",
            "fail connecting",
            "connection refused",
            "deadline exceeded",
            "not reachable",
        )
    )


def classify(exc: BaseException, filter_expr: str | None = None) -> ApiError:
    """The API error for an exception raised by a search (an engine refusing the filter is the client's fault)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ConfigError):  # search_params that do not fit the index type
        return invalid("invalid_search_params", str(exc))
    if isinstance(exc, UnknownItem):
        return ApiError(404, "not_found", str(exc), {"query_id": exc.item_id})
    if isinstance(exc, ValueError) and str(exc).startswith("offset + top_k"):
        return invalid("invalid_request", str(exc))
    if isinstance(exc, CollectionError) and "nothing to search yet" in str(exc):
        return ApiError(404, "not_found", str(exc))
    if isinstance(exc, CollectionError) and filter_expr and not _is_unreachable(exc):
        return invalid(
            "invalid_filter",
            f"the search engine refused filter_expr {filter_expr!r}: {exc}",
            {"filter_expr": filter_expr},
        )
    if isinstance(exc, ValueError) and str(exc).startswith("query image"):
        return invalid("bad_image", str(exc))
    if isinstance(exc, CollectionError):
        # Our own message: it names the operation and the server (URI redacted, never a password).
        return ApiError(503, "unavailable", str(exc))
    # Anything else (a gRPC or HTTP client error) may carry addresses or paths: logged, not returned.
    log.warning("search failed: %s: %s", type(exc).__name__, exc)
    return ApiError(
        503, "unavailable", f"a service the search needs is unavailable ({type(exc).__name__}); see the API's log"
    )


@dataclass
class _Entry:
    searcher: Any  # an ImageSearcher on one per-model collection
    dims: dict[str, int] = field(default_factory=dict)  # collection -> vector dimension


@dataclass
class _Alias:
    collections: Any  # a ModelCollections for the name
    target: str | None = None
    checked: float = -1e9  # monotonic time of the last resolution


class SearchService:
    """Search by image bytes or by vector in a named collection (default ``milvus.collection``)."""

    def __init__(self, settings: Settings, max_searchers: int = MAX_SEARCHERS, alias_ttl_s: float = ALIAS_TTL_S):
        self.settings = settings
        self.max_searchers = max_searchers
        self.alias_ttl_s = alias_ttl_s
        self._aliases: OrderedDict[str, _Alias] = OrderedDict()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    # -- names and searchers ----------------------------------------------------------------------------------

    def _resolve(self, name: str) -> str:
        """The per-model collection behind ``name``, re-read from Milvus at most every ``alias_ttl_s``."""
        from embedding_pipeline.index.collections import ModelCollections

        alias = self._aliases.get(name)
        if alias is None:
            alias = _Alias(ModelCollections(self.settings.milvus.model_copy(update={"collection": name})))
            self._aliases[name] = alias
            while len(self._aliases) > 4 * self.max_searchers:
                self._aliases.popitem(last=False)[1].collections.close()
        self._aliases.move_to_end(name)
        now = time.monotonic()
        if alias.target is None or now - alias.checked > self.alias_ttl_s:
            alias.target, alias.checked = alias.collections.search_collection(), now
        if alias.target is None:
            raise ApiError(404, "not_found", f"collection {name!r} does not exist (create it, or insert into it first)")
        return alias.target

    def _open(self, collection: str) -> _Entry:
        from embedding_pipeline.index.client import ImageIndex
        from embedding_pipeline.retrieval import ImageSearcher

        probe = ImageIndex(self.settings.milvus.model_copy(update={"collection": collection}))
        with probe, probe.guard("describing the index"):
            try:
                info = probe.describe_index()
            except Exception:  # noqa: BLE001 - a collection without an index: the settings' type applies
                info = None
        milvus = collection_settings(self.settings.milvus, collection, info)
        # The index given: the searcher embeds with the model recorded on it and resolves nothing per query
        # (the alias is resolved here, at most every alias_ttl_s).
        searcher = ImageSearcher(self.settings.model_copy(update={"milvus": milvus}), index=ImageIndex(milvus))
        batch = self.settings.api.query_batch
        try:
            if batch > 1:
                # Concurrent requests share calls: their vectors one Milvus search, their images one Triton request.
                searcher.index.coalesce_searches(max_batch=batch)
                searcher.embedder.coalesce(max_batch=batch)
            # Opens the model's Triton client and compiles the kernel once, here, rather than racing in the
            # first concurrent queries.
            searcher.preprocessor  # noqa: B018
        except Exception:
            searcher.close()
            raise
        return _Entry(searcher)

    def _entry(self, name: str | None) -> tuple[str, str, _Entry]:
        name = name or self.settings.milvus.collection
        with self._lock:
            collection = self._resolve(name)
            entry = self._entries.get(collection)
            if entry is not None:
                self._entries.move_to_end(collection)
                return name, collection, entry
            entry = self._open(collection)
            self._entries[collection] = entry
            while len(self._entries) > self.max_searchers:
                _, old = self._entries.popitem(last=False)
                # Requests may still be using it: close it once they have surely finished.
                timer = threading.Timer(EVICTED_CLOSE_DELAY_S, old.searcher.close)
                timer.daemon = True
                timer.start()
            return name, collection, entry

    def warm(self, name: str | None = None) -> str:
        """Open the searcher of ``name`` and compile its preprocessor now, so the first query is not slow."""
        return self._entry(name)[0]

    # -- queries ----------------------------------------------------------------------------------------------

    def _run(self, name: str | None, filter_expr: str | None, query) -> SearchOutcome:  # noqa: ANN001
        started = time.perf_counter()
        try:
            name, resolved, entry = self._entry(name)
            hits = query(entry, resolved)
        except Exception as exc:  # noqa: BLE001 - mapped to an API error below
            raise classify(exc, filter_expr) from exc
        return SearchOutcome(hits, name or "", resolved, (time.perf_counter() - started) * 1000)

    def search_image(
        self,
        image: bytes,
        topk: int,
        filter_expr: str | None = None,
        collection: str | None = None,
        search_params: dict[str, Any] | None = None,
        **options: Any,
    ) -> SearchOutcome:
        """``options``: ``min_score``, ``offset``, ``collapse`` (see :func:`embedding_pipeline.retrieval.ranked`),
        ``decode_slot`` (held while the image decodes)."""

        def query(entry: _Entry, resolved: str) -> list[Hit]:
            return entry.searcher.search(image, topk, filter_expr, search_params, **options)

        return self._run(collection, filter_expr, query)

    def search_id(
        self,
        item_id: str,
        topk: int,
        filter_expr: str | None = None,
        collection: str | None = None,
        search_params: dict[str, Any] | None = None,
        **options: Any,
    ) -> SearchOutcome:
        """More like ``item_id``: its stored vector as the query; ``options`` as :meth:`search_image`, plus
        ``include_self``."""

        def query(entry: _Entry, resolved: str) -> list[Hit]:
            return entry.searcher.search_by_id(item_id, topk, filter_expr, search_params, **options)

        return self._run(collection, filter_expr, query)

    def search_vector(
        self,
        vector: list[float],
        topk: int,
        filter_expr: str | None = None,
        collection: str | None = None,
        search_params: dict[str, Any] | None = None,
        **options: Any,
    ) -> SearchOutcome:
        def query(entry: _Entry, resolved: str) -> list[Hit]:
            index = entry.searcher.index
            dim = entry.dims.get(resolved)
            if dim is None:
                dim = entry.dims[resolved] = int(index.dimension() or 0)
            if len(vector) != dim:
                raise invalid(
                    "dimension_mismatch",
                    f"vector has {len(vector)} components but collection {resolved!r} holds {dim}-d vectors",
                    {"got": len(vector), "expected": dim},
                )
            data = np.asarray([vector], dtype=np.float32)
            if self.settings.quality.unit_norm:
                # Stored vectors are unit length: a query is scaled the same way, so scores compare like with like.
                # In float64: squares of tiny (1e-30) or huge components under/overflow in float32.
                if not np.linalg.norm(np.asarray(vector, dtype=np.float64)) > 0:
                    raise invalid("invalid_vector", "vector must not be all zeros")
                data = unit_normalised(data)
            return entry.searcher.search_vector(data[0], topk, filter_expr, search_params, **options)

        return self._run(collection, filter_expr, query)

    def close(self) -> None:
        with self._lock:
            entries, aliases = list(self._entries.values()), list(self._aliases.values())
            self._entries.clear()
            self._aliases.clear()
        for entry in entries:
            entry.searcher.close()
        for alias in aliases:
            alias.collections.close()
