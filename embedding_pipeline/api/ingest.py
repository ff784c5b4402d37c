"""Insert = a manifest drop plus its ``ingest_drop`` run, launched through the Dagster webserver.

The request becomes a JSON Lines manifest drop; :class:`embedding_pipeline.orchestration.webserver.WebserverRuns`
places it (partition first, so the drop sensor never launches a second run for it) and submits its run through the
webserver, where the daemon dequeues it under the instance's limits and it shows in the UI like any other run.

A request's ``collection_name`` reaches the run as the Milvus resource's ``collection`` (run config), so the run
writes that name's per-model collection, with the vector index the collection already has.
"""

from __future__ import annotations

from typing import Any

from embedding_pipeline.api.errors import ApiError
from embedding_pipeline.api.models import InsertRequest
from embedding_pipeline.index.named import ingest_milvus_config
from embedding_pipeline.orchestration.webserver import LaunchError, RunNotFinished, WebserverRuns
from embedding_pipeline.settings import Settings
from embedding_pipeline.sources import inserts
from embedding_pipeline.sources.inserts import drop_name  # noqa: F401 - the API's drop names


def manifest_rows(settings: Settings, request: InsertRequest) -> list[dict[str, Any]]:
    """The manifest lines for ``request``; raises a 422 for an input outside the rules or oversized metadata."""
    try:
        return inserts.manifest_rows(settings, request.inputs, request.ids, request.metadata)
    except inserts.InputRefused as exc:
        raise ApiError(422, exc.code, exc.message, exc.details or None) from None


class DagsterRuns(WebserverRuns):
    """Inserts as ingest runs launched through the webserver (:class:`WebserverRuns`), with the API's errors."""

    def _resource_config(self, name: str) -> dict[str, Any]:
        """The Milvus resource overrides for a run writing collection name ``name``."""
        return ingest_milvus_config(self.settings.milvus, name)

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
