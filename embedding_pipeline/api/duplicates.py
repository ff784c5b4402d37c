"""``GET /duplicates``: near-duplicate groups of a drop or of the whole collection, a page of groups at a time.

Groups are found by the collection's own search when asked (``embedding_pipeline.duplicates``); the last few
reports are kept for ``CACHE_S`` seconds, so walking the pages of one report searches once and the pages agree.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

from embedding_pipeline import duplicates
from embedding_pipeline.api.errors import ApiError, invalid
from embedding_pipeline.api.search import classify
from embedding_pipeline.settings import Settings
from embedding_pipeline.sources.drops import DROP_NAME
from embedding_pipeline.storage import layout

CACHE_S = 60.0
CACHED_REPORTS = 8
MAX_LIMIT = 100


class DuplicatesService:
    def __init__(self, settings: Settings, cache_s: float = CACHE_S):
        self.settings = settings
        self.cache_s = cache_s
        self._lock = threading.Lock()
        # One report computed at a time: a burst of identical requests waits for the first, then reads its result;
        # different ones queue rather than scanning the collection side by side.
        self._computing = threading.Lock()
        self._reports: dict[tuple[str | None, float | None], tuple[float, duplicates.DuplicateReport]] = {}

    def report(self, drop: str | None, threshold: float | None) -> duplicates.DuplicateReport:
        key = (drop, threshold)
        now = time.monotonic()
        with self._lock:
            cached = self._reports.get(key)
            if cached is not None and now - cached[0] <= self.cache_s:
                return cached[1]
        with self._computing:
            with self._lock:
                cached = self._reports.get(key)
                if cached is not None and time.monotonic() - cached[0] <= self.cache_s:
                    return cached[1]
            return self._compute(key, drop, threshold)

    def _compute(
        self, key: tuple[str | None, float | None], drop: str | None, threshold: float | None
    ) -> duplicates.DuplicateReport:
        now = time.monotonic()
        try:
            found = duplicates.find_for(self.settings, drop, threshold)
        except ValueError as exc:
            if str(exc).startswith("threshold"):
                raise invalid("invalid_request", str(exc), [{"loc": ["query", "threshold"]}]) from exc
            raise classify(exc) from exc
        except Exception as exc:  # noqa: BLE001 - mapped to the API's error shape
            raise classify(exc) from exc
        with self._lock:
            self._reports = {k: v for k, v in self._reports.items() if now - v[0] <= self.cache_s}
            self._reports[key] = (now, found)
            while len(self._reports) > CACHED_REPORTS:
                self._reports.pop(next(iter(self._reports)))
        return found

    def page(self, drop: str | None, threshold: float | None, offset: int, limit: int) -> dict[str, Any]:
        check_request(self.settings, drop, threshold, offset, limit)
        return duplicates.report_page(self.report(drop, threshold), offset, limit)


def check_request(settings: Settings, drop: str | None, threshold: float | None, offset: int, limit: int) -> None:
    """422 for a bad parameter, 404 for a drop that was never ingested."""
    if threshold is not None and not math.isfinite(threshold):
        raise invalid("invalid_request", "threshold must be a finite number", [{"loc": ["query", "threshold"]}])
    if offset < 0:
        raise invalid("invalid_request", "offset must be 0 or more", [{"loc": ["query", "offset"]}])
    if not 1 <= limit <= MAX_LIMIT:
        raise invalid("invalid_request", f"limit must be between 1 and {MAX_LIMIT}", [{"loc": ["query", "limit"]}])
    if drop is not None:
        if not DROP_NAME.match(drop):
            raise invalid("invalid_request", f"invalid drop name {drop!r}", [{"loc": ["query", "drop"]}])
        if not layout.drop_files(settings, drop).manifest.is_file():
            raise ApiError(404, "not_found", f"no ingested drop {drop!r}")
