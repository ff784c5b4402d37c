"""Insert = a manifest drop plus its ``ingest_drop`` run, launched through the Dagster webserver.

The request becomes a JSON Lines manifest drop; :class:`embedding_pipeline.orchestration.webserver.WebserverRuns`
places it (partition first, so the drop sensor never launches a second run for it) and submits its run through the
webserver, where the daemon dequeues it under the instance's limits and it shows in the UI like any other run.

A request's ``collection_name`` reaches the run as the Milvus resource's ``collection`` (run config), so the run
writes that name's per-model collection, with the vector index the collection already has.
"""

from __future__ import annotations

import json
import secrets
from datetime import datetime, timezone
from typing import Any

from embedding_pipeline.api.errors import ApiError
from embedding_pipeline.api.inputs import check_input
from embedding_pipeline.api.models import InsertRequest
from embedding_pipeline.api.search import collection_settings
from embedding_pipeline.index.collections import ModelCollections
from embedding_pipeline.orchestration.webserver import LaunchError, RunNotFinished, WebserverRuns
from embedding_pipeline.settings import Settings

MAX_METADATA_BYTES = 64 * 1024


def drop_name(now: datetime | None = None) -> str:
    """A fresh, sortable manifest drop name: ``api-20261108T101500Z-3f2a9c1b.jsonl``."""
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    return f"api-{stamp}-{secrets.token_hex(4)}.jsonl"


def manifest_rows(settings: Settings, request: InsertRequest) -> list[dict[str, Any]]:
    """The manifest lines for ``request``; raises a 422 for an input outside the rules or oversized metadata."""
    limit = settings.api.max_inputs
    if len(request.inputs) > limit:
        raise ApiError(
            422,
            "too_many_inputs",
            f"{len(request.inputs)} inputs; at most {limit} per request (api.max_inputs)",
            {"count": len(request.inputs), "limit": limit},
        )
    rows = []
    for n, uri in enumerate(request.inputs):
        check_input(settings, uri, f"inputs[{n}]")
        row: dict[str, Any] = {"uri": uri}
        if request.ids is not None:
            row["id"] = request.ids[n]
        if request.metadata is not None:
            size = len(json.dumps(request.metadata[n], default=str).encode())
            if size > MAX_METADATA_BYTES:
                raise ApiError(
                    422,
                    "invalid_request",
                    f"metadata[{n}] is {size} bytes as JSON; at most {MAX_METADATA_BYTES}",
                    {"index": n, "bytes": size},
                )
            row["metadata"] = request.metadata[n]
        rows.append(row)
    return rows


class DagsterRuns(WebserverRuns):
    """Inserts as ingest runs launched through the webserver (:class:`WebserverRuns`), with the API's errors."""

    def _resource_config(self, name: str) -> dict[str, Any]:
        """The Milvus resource overrides for a run writing collection name ``name``."""
        config: dict[str, Any] = {"collection": name}
        if name == self.settings.milvus.collection:
            return config
        with ModelCollections(self.settings.milvus.model_copy(update={"collection": name})) as collections:
            target = collections.search_collection()
            if target is None:
                return config  # new name: created by the run with the configured index
            with collections.index(target) as index, index.guard("describing the index"):
                info = index.describe_index()
        milvus = collection_settings(self.settings.milvus, name, info)
        config.update(index_type=milvus.index_type, metric_type=milvus.metric_type)
        if milvus.index_type != self.settings.milvus.index_type:
            config.update(index_params={}, search_params={})
        return config

    def insert(self, request: InsertRequest, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Place ``rows`` (:func:`manifest_rows` of ``request``) as a new drop and launch its run."""
        name = request.collection_name or self.settings.milvus.collection
        try:
            milvus_config = self._resource_config(name)
        except Exception as exc:  # noqa: BLE001 - Milvus down or refusing
            raise ApiError(503, "unavailable", f"cannot read collection {name!r}: {exc}") from exc
        drop = drop_name()
        try:
            run_id = self.launch_manifest_drop(
                drop, rows, {"resources": {"milvus": {"config": milvus_config}}}, trigger="api"
            )
        except LaunchError as exc:
            # Nothing was launched and the drop was taken back: a 503 means "nothing happened, try again".
            raise ApiError(503, "unavailable", str(exc)) from exc
        return {"drop": drop, "run_id": run_id, "status_url": f"/runs/{run_id}", "collection": name}

    def wait(self, run_id: str, timeout_s: float, poll_s: float = 0.5) -> dict[str, Any]:
        """The run's report once it has finished; a 504 ``timeout`` naming the run if it has not in time."""
        try:
            return super().wait(run_id, timeout_s, poll_s)
        except RunNotFinished as exc:
            raise ApiError(
                504, "timeout", f"{exc}; follow it at /runs/{run_id}", {"run_id": run_id, "status": exc.status}
            ) from exc
