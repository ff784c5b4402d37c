"""Insert = a manifest drop plus its ``ingest_drop`` run, launched through the Dagster webserver.

The request becomes a JSON Lines manifest placed in the drop folder (:func:`embedding_pipeline.runs.place_drop`:
written aside, renamed in). Its partition is registered first, so the drop sensor, which only takes drops that
are not partitions yet, never launches a second run for it. The run is submitted through the webserver's GraphQL
API (``DagsterGraphQLClient``): it is queued in the instance, the daemon dequeues it under the instance's limits
(one run per drop, two at a time), and it shows in the UI like any other run, tagged with its drop.

A request's ``collection_name`` reaches the run as the Milvus resource's ``collection`` (run config), so the run
writes that name's per-model collection, with the vector index the collection already has.
"""

from __future__ import annotations

import json
import secrets
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from embedding_pipeline.api.errors import ApiError
from embedding_pipeline.api.inputs import check_input
from embedding_pipeline.api.models import InsertRequest
from embedding_pipeline.api.search import collection_settings
from embedding_pipeline.settings import Settings
from embedding_pipeline.sources.statuses import ItemStatus

JOB = "ingest_drop"
PARTITION_TAG = "dagster/partition"
DROP_TAG, TRIGGER_TAG = "drop", "trigger"
# Statuses after which a run changes no more.
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}
MAX_METADATA_BYTES = 64 * 1024


def drop_name(now: datetime | None = None) -> str:
    """A fresh, sortable manifest drop name: ``api-20261108T101500Z-3f2a9c1b.jsonl``."""
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    return f"api-{stamp}-{secrets.token_hex(4)}.jsonl"


def manifest_rows(settings: Settings, request: InsertRequest) -> list[dict[str, Any]]:
    """The manifest lines for ``request``; raises a 422 for an input outside the rules or oversized metadata."""
    limit = settings.api.max_inputs
    if len(request.inputs) > limit:
        raise ApiError(422, "too_many_inputs", f"{len(request.inputs)} inputs; at most {limit} per request "
                       "(api.max_inputs)", {"count": len(request.inputs), "limit": limit})
    rows = []
    for n, uri in enumerate(request.inputs):
        check_input(settings, uri, f"inputs[{n}]")
        row: dict[str, Any] = {"uri": uri}
        if request.ids is not None:
            row["id"] = request.ids[n]
        if request.metadata is not None:
            size = len(json.dumps(request.metadata[n], default=str).encode())
            if size > MAX_METADATA_BYTES:
                raise ApiError(422, "invalid_request", f"metadata[{n}] is {size} bytes as JSON; at most "
                               f"{MAX_METADATA_BYTES}", {"index": n, "bytes": size})
            row["metadata"] = request.metadata[n]
        rows.append(row)
    return rows


class DagsterRuns:
    """Launches ingest runs through the webserver's GraphQL API and reads runs from the instance."""

    def __init__(self, settings: Settings):
        from embedding_pipeline.services import use_dagster_home

        self.settings = settings
        use_dagster_home(settings)
        self._instance = None
        self._client = None

    @property
    def instance(self):  # noqa: ANN201 - a DagsterInstance
        if self._instance is None:
            from dagster import DagsterInstance

            self._instance = DagsterInstance.get()
        return self._instance

    @property
    def client(self):  # noqa: ANN201 - a DagsterGraphQLClient
        if self._client is None:
            from dagster_graphql import DagsterGraphQLClient

            d = self.settings.dagster
            self._client = DagsterGraphQLClient(d.webserver_host, port_number=d.webserver_port, timeout=60)
        return self._client

    # -- launching ----------------------------------------------------------------------------------------------

    def _resource_config(self, name: str) -> dict[str, Any]:
        """The Milvus resource overrides for a run writing collection name ``name``."""
        from embedding_pipeline.index.collections import ModelCollections

        config: dict[str, Any] = {"collection": name}
        if name == self.settings.milvus.collection:
            return config
        with ModelCollections(self.settings.milvus.model_copy(update={"collection": name})) as collections:
            target = collections.search_collection()
            if target is None:
                return config  # new name: created by the run with the configured index
            with collections.index(target) as index, index._guard("describing the index"):
                info = index.describe_index()
        milvus = collection_settings(self.settings.milvus, name, info)
        config.update(index_type=milvus.index_type, metric_type=milvus.metric_type)
        if milvus.index_type != self.settings.milvus.index_type:
            config.update(index_params={}, search_params={})
        return config

    def insert(self, request: InsertRequest, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Place ``rows`` (:func:`manifest_rows` of ``request``) as a new drop and launch its run."""
        from dagster_graphql import DagsterGraphQLClientError

        from embedding_pipeline.defs.partitions import drops_partitions
        from embedding_pipeline.runs import place_drop

        name = request.collection_name or self.settings.milvus.collection
        try:
            milvus_config = self._resource_config(name)
        except Exception as exc:  # noqa: BLE001 - Milvus down or refusing
            raise ApiError(503, "unavailable", f"cannot read collection {name!r}: {exc}") from exc
        drop = drop_name()
        # The partition before the file: the sensor only launches runs for drops that are no partition yet.
        self.instance.add_dynamic_partitions(drops_partitions.name, [drop])
        try:
            with tempfile.TemporaryDirectory(prefix="api-insert-") as tmp:
                manifest = Path(tmp) / drop
                manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
                place_drop(self.settings, manifest, drop)
        except Exception:
            self.instance.delete_dynamic_partition(drops_partitions.name, drop)
            raise
        try:
            run_id = self.client.submit_job_execution(
                JOB,
                run_config={"resources": {"milvus": {"config": milvus_config}}},
                tags={PARTITION_TAG: drop, DROP_TAG: drop, TRIGGER_TAG: "api"},
            )
        except DagsterGraphQLClientError as exc:
            # Nothing was launched: take the drop back, so a 503 means "nothing happened, try again".
            (self.settings.drops / drop).unlink(missing_ok=True)
            self.instance.delete_dynamic_partition(drops_partitions.name, drop)
            raise ApiError(503, "unavailable", f"the Dagster webserver at {self.settings.dagster.webserver_host}:"
                           f"{self.settings.dagster.webserver_port} did not launch the run: {exc}") from exc
        return {"drop": drop, "run_id": run_id, "status_url": f"/runs/{run_id}", "collection": name}

    # -- reading ------------------------------------------------------------------------------------------------

    def report(self, run_id: str) -> dict[str, Any] | None:
        """The run's status and per-item outcome; None for an unknown run."""
        from embedding_pipeline import ingest as stages
        from embedding_pipeline.runs import step_errors

        run = self.instance.get_run_by_id(run_id)
        if run is None:
            return None
        drop = run.tags.get(DROP_TAG) or run.tags.get(PARTITION_TAG) or ""
        status = run.status.value
        report: list[dict[str, Any]] = []
        if drop:
            try:
                report = stages.item_report(self.settings, drop)
            except (OSError, ValueError):
                report = []  # not read yet (queued, or failed before the manifest stage)
        errors: list[dict[str, str]] = []
        if status == "FAILURE":
            events = [e.dagster_event for e in self.instance.all_logs(run_id) if e.dagster_event is not None]
            errors = step_errors(events)
        counts = Counter(r["status"] for r in report)
        return {
            "run_id": run_id,
            "status": status,
            "drop": drop,
            "items": len(report),
            "ok": counts.get(ItemStatus.OK, 0),
            "failed": counts.get(ItemStatus.FAILED, 0),
            "skipped": counts.get(ItemStatus.SKIPPED, 0),
            "failures": [{k: str(r.get(k) or "") for k in ("id", "uri", "error_kind", "error", "stage")}
                         for r in report if r["status"] != ItemStatus.OK],
            "errors": errors,
        }

    def wait(self, run_id: str, timeout_s: float, poll_s: float = 0.5) -> dict[str, Any]:
        """The run's report once it has finished; a 504 ``timeout`` naming the run if it has not in time."""
        deadline = time.monotonic() + timeout_s
        while True:
            run = self.instance.get_run_by_id(run_id)
            if run is not None and run.status.value in FINISHED:
                return self.report(run_id) or {}
            if time.monotonic() >= deadline:
                status = run.status.value if run is not None else "UNKNOWN"
                raise ApiError(504, "timeout", f"run {run_id} has not finished after {timeout_s:g} s (status "
                               f"{status}); follow it at /runs/{run_id}", {"run_id": run_id, "status": status})
            time.sleep(poll_s)

    def reachable(self) -> dict[str, Any]:
        """Whether the instance answers and the webserver is up."""
        from embedding_pipeline import processes
        from embedding_pipeline.services import webserver_url

        url = webserver_url(self.settings)
        out: dict[str, Any] = {"webserver": url}
        try:
            self.instance.get_runs(limit=1)
            out["instance_reachable"] = True
        except Exception as exc:  # noqa: BLE001 - storage missing, locked or broken
            out["instance_reachable"], out["instance_error"] = False, str(exc)
        out["webserver_reachable"] = processes.http_ok(f"{url}/server_info")
        return out

    def close(self) -> None:
        if self._instance is not None:
            self._instance.dispose()
            self._instance = None
