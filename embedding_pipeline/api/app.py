"""The HTTP API: health, collections, insert (a Dagster run per request) and search, over the pipeline's own code.

Run it with ``embedding-pipeline serve-api`` (or ``uvicorn embedding_pipeline.api.app:app``); ``up`` starts it
beside the Dagster UI. Search runs in this long-lived process with warm clients (the Python API's
``ImageSearcher``); ingest stays in Dagster, where it is queued, retried, recorded and visible.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterable, Mapping, Optional

from fastapi import FastAPI, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.middleware.trustedhost import TrustedHostMiddleware

from embedding_pipeline.api import errors
from embedding_pipeline.api.errors import ApiError, invalid
from embedding_pipeline.api.guards import ApiKeyGuard, BodyLimit, InFlightLimit, api_key_from_env
from embedding_pipeline.api.inputs import read_query
from embedding_pipeline.api.models import (
    CreateCollectionRequest,
    CreateCollectionResponse,
    DuplicatesResponse,
    InsertAccepted,
    InsertRequest,
    RunReport,
    SearchRequest,
    SearchResponse,
)
from embedding_pipeline.settings import Settings, load_settings

log = logging.getLogger(__name__)

ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "details": {}},
        }
    },
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"description": text, "content": {"application/json": {"schema": ERROR_SCHEMA}}}
    for status, text in (
        (401, "Missing or wrong API key"),
        (413, "Request body too large"),
        (422, "Invalid request"),
        (503, "A service is down"),
    )
}


@dataclass
class ApiServices:
    """What the endpoints call; the defaults are the real services, tests may pass fakes."""

    search: Any  # SearchService
    collections: Any  # CollectionService
    runs: Any  # DagsterRuns
    health: Callable[[], dict[str, Any]]
    duplicates: Any = None  # DuplicatesService

    def close(self) -> None:
        for service in (self.search, self.collections, self.runs, self.duplicates):
            close = getattr(service, "close", None)
            if close is not None:
                close()


def real_services(settings: Settings) -> ApiServices:
    from embedding_pipeline.api import health
    from embedding_pipeline.api.collections import CollectionService
    from embedding_pipeline.api.duplicates import DuplicatesService
    from embedding_pipeline.api.ingest import DagsterRuns
    from embedding_pipeline.api.search import SearchService

    runs = DagsterRuns(settings)

    def report() -> dict[str, Any]:
        return {
            "triton": health.triton_health(settings),
            "milvus": health.milvus_health(settings),
            "dagster": runs.reachable(),
        }

    return ApiServices(SearchService(settings), CollectionService(settings), runs, report, DuplicatesService(settings))


# Form fields a multipart search may carry besides the file.
MULTIPART_FIELDS = ("topk", "offset", "min_score", "collapse", "collapse_threshold", "filter_expr", "collection_name")


def _search_openapi() -> dict[str, Any]:
    """The search body: JSON (a path/URL or a vector) or a multipart upload; FastAPI cannot infer both."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": SearchRequest.model_json_schema()},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {"type": "string", "format": "binary", "description": "The query image."},
                            "topk": {"type": "integer", "minimum": 1, "default": 10},
                            "offset": {"type": "integer", "minimum": 0, "default": 0},
                            "min_score": {"type": "number"},
                            "collapse": {"type": "boolean", "default": False},
                            "collapse_threshold": {"type": "number"},
                            "filter_expr": {"type": "string"},
                            "collection_name": {"type": "string"},
                        },
                    }
                },
            },
        }
    }


def create_app(
    settings: Optional[Settings] = None, services: Optional[ApiServices] = None, api_key: Optional[str] = None
) -> FastAPI:
    """The FastAPI app. ``api_key`` defaults to ``$EMBEDDING_PIPELINE_API_KEY`` (no key: no authentication)."""
    settings = settings or load_settings()
    api_key = api_key if api_key is not None else api_key_from_env()
    state: dict[str, ApiServices] = {}
    # Query images decoded at once: each decode can hold ~100 MB, and the thread pool has ~40 workers.
    decode_slots = threading.BoundedSemaphore(settings.api.max_decodes)
    health_cache = _HealthCache(settings.api.health_cache_s)

    def svc() -> ApiServices:
        if "services" not in state:
            state["services"] = services or real_services(settings)
        return state["services"]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc()
        warming = None
        if services is None:
            # Warm the default collection's searcher (clients, compiled kernel) so the first query is fast. In the
            # background: a Triton still starting must not hold up serving /health.
            warming = threading.Thread(target=_warm, args=(state["services"].search,), name="api-warm", daemon=True)
            warming.start()
        try:
            yield
        finally:
            if warming is not None:
                warming.join(timeout=30)
            # Dropped, not kept closed: an app started again (a test client's second block) opens fresh ones.
            await run_in_threadpool(state.pop("services").close)

    app = FastAPI(
        title="embedding_pipeline",
        version="1",
        description="Image embeddings: insert images (a Dagster run per request) and search them by image or vector.",
        lifespan=lifespan,
        responses=_ERRORS,
    )
    app.state.settings = settings
    errors.install(app)

    @app.get(
        "/health",
        summary="Status of Triton, Milvus and the Dagster instance",
        responses={503: {"description": "Something is down (same shape, status 'unavailable')"}},
    )
    def health() -> JSONResponse:
        from embedding_pipeline.api.health import healthy

        report = health_cache.get(svc().health)
        ok = healthy(report)
        return JSONResponse({"status": "ok" if ok else "unavailable", **report}, status_code=200 if ok else 503)

    @app.post(
        "/collections/create",
        status_code=201,
        response_model=CreateCollectionResponse,
        summary="Create a collection name for the served model (idempotent)",
        responses={
            200: {
                "description": "It exists already with this shape (created: false)",
                "model": CreateCollectionResponse,
            },
            409: {"description": "It exists with another shape"},
        },
    )
    def create_collection(body: CreateCollectionRequest, response: Response) -> dict[str, Any]:
        result = svc().collections.create(body)
        if not result["created"]:
            response.status_code = 200
        return result

    @app.post(
        "/insert",
        status_code=202,
        response_model=InsertAccepted | RunReport,
        summary="Ingest images as a drop: one Dagster run",
        responses={
            200: {"description": "wait=true: the finished run's report", "model": RunReport},
            504: {"description": "wait=true and the run did not finish in time"},
        },
    )
    def insert(body: InsertRequest, response: Response) -> dict[str, Any]:
        from embedding_pipeline.api.ingest import manifest_rows

        accepted = svc().runs.insert(body, manifest_rows(settings, body))
        if not body.wait:
            return accepted
        response.status_code = 200
        return svc().runs.wait(accepted["run_id"], body.timeout_s or settings.api.insert_timeout_s)

    @app.get(
        "/runs/{run_id}",
        response_model=RunReport,
        summary="An ingest run: status and per-item failures",
        responses={404: {"description": "No such run"}},
    )
    def run_status(run_id: str) -> dict[str, Any]:
        if not 1 <= len(run_id) <= 64 or not run_id.replace("-", "").isalnum():
            raise ApiError(404, "not_found", f"no run {run_id!r}")
        report = svc().runs.report(run_id)
        if report is None:
            raise ApiError(404, "not_found", f"no run {run_id!r}")
        return report

    @app.post(
        "/search",
        response_model=SearchResponse,
        response_model_exclude_unset=True,
        openapi_extra=_search_openapi(),
        summary="Top-k similar images: by image (path, URL or upload) or by vector",
        responses={404: {"description": "No such collection"}},
    )
    async def search(request: Request) -> dict[str, Any]:
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            body, image = await _multipart_search(request)
        elif content_type.startswith("application/json") or not content_type:
            body, image = await _json_search(request), None
        else:
            raise ApiError(
                415, "unsupported_media_type", f"send application/json or multipart/form-data, not {content_type!r}"
            )
        if body.topk > settings.api.max_topk:
            raise invalid(
                "invalid_request",
                f"topk: at most {settings.api.max_topk} (api.max_topk)",
                [{"loc": ["body", "topk"], "msg": f"at most {settings.api.max_topk}"}],
            )
        window = settings.api.max_window
        if body.offset + body.topk > window:
            raise invalid(
                "invalid_request",
                f"offset + topk: at most {window} (api.max_window)",
                [{"loc": ["body", "offset"], "msg": f"offset + topk at most {window}"}],
            )
        service = svc().search
        collapse = (body.collapse_threshold if body.collapse_threshold is not None else True) if body.collapse else None
        options: dict[str, Any] = {"min_score": body.min_score, "offset": body.offset, "collapse": collapse}
        query = (body.topk, body.filter_expr, body.collection_name, body.search_params)

        def run() -> Any:
            if body.vector is not None:
                return service.search_vector(body.vector, *query, **options)
            if body.query_id is not None:
                return service.search_id(body.query_id, *query, include_self=body.include_self, **options)
            if image is not None:
                data = image
            else:
                assert body.query_input is not None  # a SearchRequest has exactly one query
                with decode_slots:
                    data = read_query(settings, body.query_input)
            # The slot bounds decoding only: embedding and searching are shared with concurrent queries.
            return service.search_image(data, *query, decode_slot=decode_slots, **options)

        outcome = await run_in_threadpool(run)

        def result(h: Any) -> dict[str, Any]:
            out = {"id": h.id, "score": h.score, "uri": h.uri, "metadata": h.metadata, "drop": h.drop}
            if h.duplicates is not None:
                out["duplicates"] = list(h.duplicates)
            return out

        return {
            "results": [result(h) for h in outcome.hits],
            "took_ms": round(outcome.took_ms, 3),
            "collection": outcome.collection,
            "resolved_collection": outcome.resolved,
        }

    @app.get(
        "/duplicates",
        response_model=DuplicatesResponse,
        summary="Near-duplicate groups of a drop (against the whole collection) or of the collection, by page",
        responses={404: {"description": "No such drop, or nothing indexed yet"}},
    )
    def near_duplicates(
        drop: Optional[str] = Query(
            None,
            description="A drop: its images against the whole collection. Default: "
            "every image of the collection search uses.",
        ),
        threshold: Optional[float] = Query(
            None,
            description="COSINE/IP: similarity of at least this; L2: squared distance of at most this. "
            "Default: duplicates.threshold, else the measured default (cosine 0.94).",
        ),
        offset: int = Query(0, ge=0, description="Groups to skip (largest first)."),
        limit: int = Query(20, ge=1, le=100, description="Groups per page."),
    ) -> dict[str, Any]:
        service = svc().duplicates
        if service is None:
            raise ApiError(503, "unavailable", "near-duplicate groups are not served by this API")
        return service.page(drop, threshold, offset, limit)

    async def _json_search(request: Request) -> SearchRequest:
        raw = await request.body()
        try:
            return SearchRequest.model_validate_json(raw or b"null")
        except ValidationError as exc:
            raise RequestValidationError(_with_body_loc(exc.errors())) from None

    async def _multipart_search(request: Request) -> tuple[SearchRequest, bytes]:
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as exc:  # noqa: BLE001 - malformed multipart bodies raise several types
            raise invalid("invalid_request", f"malformed multipart body: {exc}") from None
        try:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise invalid(
                    "invalid_request",
                    "multipart search needs a file field 'file' holding the image",
                    [{"loc": ["body", "file"], "msg": "field required"}],
                )
            unknown = set(form.keys()) - {"file", *MULTIPART_FIELDS}
            if unknown:
                raise invalid("invalid_request", f"unknown form field(s): {', '.join(sorted(unknown))}")
            data = await upload.read()
            if not data:
                raise invalid("bad_image", "the uploaded file is empty")
            if len(data) > settings.sources.max_image_bytes:
                raise invalid(
                    "too_large",
                    f"the uploaded file has {len(data)} bytes; at most "
                    f"{settings.sources.max_image_bytes} (sources.max_image_bytes)",
                )
            fields: dict[str, Any] = {k: form.get(k) for k in MULTIPART_FIELDS if form.get(k) not in (None, "")}
            try:
                # The vector is a placeholder that satisfies "exactly one query"; the upload is the query.
                body = SearchRequest.model_validate({**fields, "vector": [0.0]})
            except ValidationError as exc:
                raise RequestValidationError(_with_body_loc(exc.errors())) from None
            return body.model_copy(update={"vector": None}), data
        finally:
            await form.close()

    # The last added runs first: the key is checked before a large body is read.
    app.add_middleware(BodyLimit, max_bytes=settings.api.max_request_bytes)
    if api_key:
        app.add_middleware(ApiKeyGuard, api_key=api_key)
    app.add_middleware(InFlightLimit, limit=settings.api.max_in_flight)
    # Outermost: a request naming another host (DNS rebinding from a page in a local browser) is refused first.
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(settings.api.allowed_hosts))
    return app


class _HealthCache:
    """The last health report, reused for ``ttl_s``: unauthenticated callers cannot make every request open new
    Milvus and Triton connections. Concurrent callers share one probe."""

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._report: dict[str, Any] | None = None
        self._at = -1e9

    def get(self, probe: Any) -> dict[str, Any]:
        fresh = self._report is not None and time.monotonic() - self._at <= self.ttl_s
        if fresh:
            return self._report  # type: ignore[return-value]
        # One caller probes; the others get the last report at once rather than wait on a slow service.
        if not self._lock.acquire(blocking=self._report is None):
            return self._report  # type: ignore[return-value]
        try:
            if self._report is None or time.monotonic() - self._at > self.ttl_s:
                self._report = probe()
                self._at = time.monotonic()
            return self._report
        finally:
            self._lock.release()


def _warm(search: Any) -> None:
    try:
        search.warm()
    except Exception as exc:  # noqa: BLE001 - no collection yet, or a service still starting: health reports it
        log.info("search not warmed at start: %s", exc)


def _with_body_loc(errors_: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Pydantic's errors located under ``body`` as FastAPI reports them (and without the raw input)."""
    return [{"loc": ["body", *e.get("loc", ())], "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors_]


def __getattr__(name: str) -> Any:
    # ``uvicorn embedding_pipeline.api.app:app``: built on first access, so importing this module reads no settings.
    if name == "app":
        globals()["app"] = create_app()
        return globals()["app"]
    raise AttributeError(name)
