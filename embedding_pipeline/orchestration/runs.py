"""Jobs run in this process against the pipeline's Dagster instance: ingesting a drop from the CLI, deleting a
drop, switching search to another model's collection and observing the served model.

Each run is recorded in the instance like one launched from the UI. This is the one module (with
:mod:`~embedding_pipeline.orchestration.backfill`) that loads the definitions to execute them; runs launched
through the webserver are :mod:`~embedding_pipeline.orchestration.webserver`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from dagster import DagsterInstance, JobDefinition, execute_job, reconstructable

from embedding_pipeline import ingest as stages
from embedding_pipeline.defs import defs
from embedding_pipeline.defs.models import switch_collection
from embedding_pipeline.defs.retention import delete_drop_data
from embedding_pipeline.orchestration.instance import DagsterDrops, pipeline_instance, step_errors
from embedding_pipeline.orchestration.names import (
    DELETE_DROP_JOB,
    DROP_TAG,
    INGEST_JOB,
    INGEST_SHARDED_JOB,
    OBSERVE_MODEL_JOB,
    PARTITION_TAG,
    SWITCH_JOB,
)
from embedding_pipeline.retention import DropBusyError
from embedding_pipeline.runtime.locks import drop_lock
from embedding_pipeline.runtime.objects import ObjectError, ObjectPath, is_object_uri
from embedding_pipeline.settings import Settings, object_store
from embedding_pipeline.sources.drops import checked_name, estimate_items, find_drop, place_drop
from embedding_pipeline.sources.statuses import ItemStatus


def ingest(
    settings: Settings,
    path: Path | str,
    name: str | None = None,
    run_config: dict[str, Any] | None = None,
    console_log_level: str | None = None,
) -> dict[str, Any]:
    """Register the drop as a partition and execute the ingest job for it; returns a JSON-able summary.

    ``run_config`` is the run's config (e.g. ``{"resources": {"milvus": {"config": {"collection": ...}}}}``, as
    the HTTP API's inserts send it); none by default. ``console_log_level`` (e.g. ``"WARNING"``) quiets what the
    run prints on this process's console; its event log is kept in the instance whatever the level (the UI shows
    it)."""
    instance = pipeline_instance(settings)
    drops = DagsterDrops(instance)
    # A folder, a manifest file, or an s3:// prefix or manifest object (copied into the drop directory).
    source: Path | ObjectPath = object_store(settings.s3).path(str(path)) if is_object_uri(str(path)) else Path(path)
    drop = checked_name(name or (source.name if isinstance(source, ObjectPath) else source.resolve().name))
    with drop_lock(settings.paths.locks, drop):  # no deletion of this drop interleaves with placing it
        busy = drops.runs_in_progress(drop)
        if busy:
            # The run queue keeps one run per drop; a run in this process would bypass it.
            raise DropBusyError(
                f"drop {drop!r} has run(s) queued or in progress ({', '.join(busy)}); wait for them, then ingest again"
            )
        # The partition first: a running sensor skips known partitions, so it won't launch a second run.
        added = not drops.is_partition(drop)
        if added:
            drops.add_partition(drop)
        try:
            place_drop(settings.drops_location, source, drop)
        except Exception:
            if added:
                drops.delete_partition(drop)
            raise
    if console_log_level is not None:
        console = {"loggers": {"console": {"config": {"log_level": console_log_level}}}}
        run_config = {**(run_config or {}), **console}
    if _is_big(settings, drop):
        # Shards in parallel processes (dagster.shard_parallelism at once); the steps' progress stays in their logs.
        job_name = INGEST_SHARDED_JOB
        result: Any = execute_job(
            reconstructable(sharded_ingest_job),
            instance=instance,
            run_config=run_config,
            tags={DROP_TAG: drop, PARTITION_TAG: drop},
            raise_on_error=False,
        )
    else:
        job_name = INGEST_JOB
        result = defs.resolve_job_def(INGEST_JOB).execute_in_process(
            run_config=run_config, instance=instance, partition_key=drop, tags={DROP_TAG: drop}, raise_on_error=False
        )
    summary: dict[str, Any] = {"drop": drop, "run_id": result.run_id, "success": result.success, "job": job_name}
    if not result.success:
        summary["errors"] = step_errors(result.all_events)
    try:
        report = stages.item_report(settings, drop)
    except (OSError, ObjectError):  # no manifest yet (the run failed first): the step errors say why
        report = []
    counts = Counter(r["status"] for r in report)
    summary.update(
        items=len(report),
        ok=counts.get(ItemStatus.OK, 0),
        failed=counts.get(ItemStatus.FAILED, 0),
        skipped=counts.get(ItemStatus.SKIPPED, 0),
    )
    summary["failures"] = [
        {k: r[k] for k in ("id", "uri", "status", "error_kind", "error", "stage")}
        for r in report
        if r["status"] != ItemStatus.OK
    ]
    return summary


def sharded_ingest_job() -> JobDefinition:
    """The sharded ingest job, rebuilt by name in each step's process (``dagster.reconstructable`` target)."""
    return defs.resolve_job_def(INGEST_SHARDED_JOB)


def _is_big(settings: Settings, drop: str) -> bool:
    """More items than one shard holds: the drop runs its shards in parallel processes."""
    try:
        return estimate_items(find_drop(settings.drops_location, drop)) > settings.dagster.shard_items
    except (OSError, ObjectError):
        return False


def execute_delete_drop(settings: Settings, drop: str, dry_run: bool = True) -> dict[str, Any]:
    """Run the ``delete_drop`` job; returns ``{"run_id", "success", "summary" | "errors"}``."""
    op = delete_drop_data.name
    result = defs.resolve_job_def(DELETE_DROP_JOB).execute_in_process(
        run_config={"ops": {op: {"config": {"drop": drop, "dry_run": dry_run}}}},
        instance=pipeline_instance(settings),
        raise_on_error=False,
    )
    outcome: dict[str, Any] = {"run_id": result.run_id, "success": result.success}
    if result.success:
        outcome["summary"] = result.output_for_node(op)
    else:
        outcome["errors"] = step_errors(result.all_events)
    return outcome


def switch_search(settings: Settings, target: str = "", force: bool = False) -> dict[str, Any]:
    """Run ``switch_search_collection`` (to ``target``, a collection or model label; empty: the model Triton
    serves); returns ``{"run_id", "success", "errors"}``."""
    op = switch_collection.name
    result = defs.resolve_job_def(SWITCH_JOB).execute_in_process(
        run_config={"ops": {op: {"config": {"target": target, "force": force}}}},
        instance=pipeline_instance(settings),
        raise_on_error=False,
    )
    return {
        "run_id": result.run_id,
        "success": result.success,
        "errors": [] if result.success else step_errors(result.all_events),
    }


def observe_model(instance: DagsterInstance) -> str:
    """Record an observation of ``embedding_model`` in ``instance``; returns the label observed."""
    result = defs.resolve_job_def(OBSERVE_MODEL_JOB).execute_in_process(instance=instance)
    observation = [e.asset_observation_data for e in result.all_events if e.is_asset_observation][-1]
    return str(observation.asset_observation.tags.get("dagster/data_version", ""))
