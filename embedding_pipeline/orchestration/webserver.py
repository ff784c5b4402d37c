"""Ingest runs launched through the Dagster webserver, and read back from the instance.

A run submitted through the webserver's GraphQL API (``DagsterGraphQLClient``) is queued in the instance; the
daemon dequeues it under the instance's limits (one run per drop, two at a time), and it shows in the UI like any
other run, tagged with its drop. The HTTP API inserts this way.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from dagster import DagsterInstance
from dagster_graphql import DagsterGraphQLClient, DagsterGraphQLClientError

from embedding_pipeline import ingest as stages
from embedding_pipeline.orchestration.instance import DagsterDrops, pipeline_instance, run_step_errors
from embedding_pipeline.orchestration.names import (
    DROP_TAG,
    FINISHED_STATUSES,
    INGEST_JOB,
    PARTITION_TAG,
    TRIGGER_TAG,
)
from embedding_pipeline.runtime import processes
from embedding_pipeline.services import webserver_url
from embedding_pipeline.settings import Settings
from embedding_pipeline.sources.drops import place_drop
from embedding_pipeline.sources.statuses import ItemStatus


class LaunchError(RuntimeError):
    """The webserver did not launch the run; the drop and its partition were taken back."""


class RunNotFinished(TimeoutError):
    """A run did not finish in the time given."""

    def __init__(self, run_id: str, status: str, timeout_s: float):
        self.run_id, self.status, self.timeout_s = run_id, status, timeout_s
        super().__init__(f"run {run_id} has not finished after {timeout_s:g} s (status {status})")


class WebserverRuns:
    """Launches ingest runs through the webserver's GraphQL API and reads runs from the instance."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._instance: DagsterInstance | None = None
        self._client: DagsterGraphQLClient | None = None

    @property
    def instance(self) -> DagsterInstance:
        if self._instance is None:
            self._instance = pipeline_instance(self.settings)
        return self._instance

    @property
    def client(self) -> DagsterGraphQLClient:
        if self._client is None:
            d = self.settings.dagster
            self._client = DagsterGraphQLClient(d.webserver_host, port_number=d.webserver_port, timeout=60)
        return self._client

    def launch_manifest_drop(
        self, drop: str, rows: list[dict[str, Any]], run_config: dict[str, Any], trigger: str
    ) -> str:
        """Place ``rows`` as the JSON Lines manifest drop ``drop`` and launch its ingest run; returns the run id.

        The partition is registered before the file lands: the sensor only launches runs for drops that are no
        partition yet, so it never launches a second one. The manifest is written aside and renamed in. If the
        webserver does not launch the run, the drop and its partition are taken back (:class:`LaunchError`), so
        a failure means nothing happened.
        """
        drops = DagsterDrops(self.instance)
        drops.add_partition(drop)
        try:
            with tempfile.TemporaryDirectory(prefix="api-insert-") as tmp:
                manifest = Path(tmp) / drop
                manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
                place_drop(self.settings.drops_location, manifest, drop)
        except Exception:
            drops.delete_partition(drop)
            raise
        try:
            return self.client.submit_job_execution(
                INGEST_JOB, run_config=run_config, tags={PARTITION_TAG: drop, DROP_TAG: drop, TRIGGER_TAG: trigger}
            )
        except DagsterGraphQLClientError as exc:
            (self.settings.drops_location / drop).unlink(missing_ok=True)
            drops.delete_partition(drop)
            raise LaunchError(
                f"the Dagster webserver at {self.settings.dagster.webserver_host}:"
                f"{self.settings.dagster.webserver_port} did not launch the run: {exc}"
            ) from exc

    def report(self, run_id: str) -> dict[str, Any] | None:
        """The run's status and per-item outcome; None for an unknown run."""
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
        errors = run_step_errors(self.instance, run_id) if status == "FAILURE" else []
        counts = Counter(r["status"] for r in report)
        return {
            "run_id": run_id,
            "status": status,
            "drop": drop,
            "items": len(report),
            "ok": counts.get(ItemStatus.OK, 0),
            "failed": counts.get(ItemStatus.FAILED, 0),
            "skipped": counts.get(ItemStatus.SKIPPED, 0),
            "failures": [
                {k: str(r.get(k) or "") for k in ("id", "uri", "error_kind", "error", "stage")}
                for r in report
                if r["status"] != ItemStatus.OK
            ],
            "errors": errors,
        }

    def wait(self, run_id: str, timeout_s: float, poll_s: float = 0.5) -> dict[str, Any]:
        """The run's report once it has finished; :class:`RunNotFinished` if it has not in time."""
        deadline = time.monotonic() + timeout_s
        while True:
            run = self.instance.get_run_by_id(run_id)
            if run is not None and run.status.value in FINISHED_STATUSES:
                return self.report(run_id) or {}
            if time.monotonic() >= deadline:
                raise RunNotFinished(run_id, run.status.value if run is not None else "UNKNOWN", timeout_s)
            time.sleep(poll_s)

    def reachable(self) -> dict[str, Any]:
        """Whether the instance answers and the webserver is up."""
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
