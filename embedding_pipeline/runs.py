"""Launching an ingest run for a drop in the pipeline's Dagster instance (so it shows in the UI)."""

from __future__ import annotations

import shutil
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from embedding_pipeline.settings import Settings
from embedding_pipeline.sources.drops import DROP_NAME


def _checked_name(name: str) -> str:
    if not DROP_NAME.match(name):
        raise ValueError(f"invalid drop name {name!r}: use letters, digits, '.', '_' or '-' (max 128)")
    return name


def place_drop(settings: Settings, path: Path, name: str | None = None) -> str:
    """Copy ``path`` (a folder or manifest file) into the drop directory as drop ``name``; returns the name.

    A path already in the drop directory is used where it is. The copy lands under a hidden name and is renamed
    at the end, so the sensor never sees half a drop.
    """
    source = path.resolve()
    if not source.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    drops = settings.drops
    name = _checked_name(name or source.name)
    target = drops / name
    if source == target:
        return name
    if target.exists():
        raise FileExistsError(f"a drop named {name!r} already exists in {drops}; pick another name with --drop")
    drops.mkdir(parents=True, exist_ok=True)
    staging = drops / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
    if source.is_dir():
        # Links stay links: copying their targets would smuggle files from outside the allowed roots into the
        # drop, where the confinement check would no longer see where they came from.
        shutil.copytree(source, staging, symlinks=True)
    else:
        shutil.copy2(source, staging)
    staging.rename(target)
    return name


def ingest(settings: Settings, path: Path, name: str | None = None) -> dict[str, Any]:
    """Register the drop as a partition and execute the ingest job for it; returns a JSON-able summary."""
    from dagster import DagsterInstance

    from embedding_pipeline import ingest as stages
    from embedding_pipeline.defs import defs
    from embedding_pipeline.defs.partitions import drops_partitions
    from embedding_pipeline.services import use_dagster_home

    use_dagster_home(settings)
    instance = DagsterInstance.get()
    drop = _checked_name(name or Path(path).resolve().name)
    from embedding_pipeline.runtime.locks import drop_lock
    from embedding_pipeline.retention import DropBusyError, runs_in_progress

    with drop_lock(settings.paths.data, drop):  # no deletion of this drop interleaves with placing it
        busy = runs_in_progress(instance, drop, None)
        if busy:
            # The run queue keeps one run per drop; a run in this process would bypass it.
            raise DropBusyError(f"drop {drop!r} has run(s) queued or in progress ({', '.join(busy)}); wait for "
                                "them, then ingest again")
        # The partition first: a running sensor skips known partitions, so it won't launch a second run.
        added = not instance.has_dynamic_partition(drops_partitions.name, drop)
        if added:
            instance.add_dynamic_partitions(drops_partitions.name, [drop])
        try:
            place_drop(settings, Path(path), drop)
        except Exception:
            if added:
                instance.delete_dynamic_partition(drops_partitions.name, drop)
            raise
    job = defs.resolve_job_def("ingest_drop")
    result = job.execute_in_process(instance=instance, partition_key=drop, tags={"drop": drop}, raise_on_error=False)
    summary: dict[str, Any] = {"drop": drop, "run_id": result.run_id, "success": result.success}
    if not result.success:
        summary["errors"] = step_errors(result.all_events)
    try:
        report = stages.item_report(settings, drop)
    except OSError:
        report = []
    counts = Counter(r["status"] for r in report)
    summary.update(items=len(report), ok=counts.get("ok", 0), failed=counts.get("failed", 0),
                   skipped=counts.get("skipped", 0))
    summary["failures"] = [
        {k: r[k] for k in ("id", "uri", "status", "error_kind", "error", "stage")} for r in report if r["status"] != "ok"
    ]
    return summary


_WRAPPERS = ("DagsterExecutionStepExecutionError", "RetryRequested")


def step_errors(events: list[Any]) -> list[dict[str, str]]:
    """The failed steps of a run with their error messages (what a user needs to see first when a run fails)."""
    errors = []
    for event in events:
        if event.is_step_failure and event.step_failure_data is not None:
            error = event.step_failure_data.error
            retried = error is not None and (error.message or "").startswith("Exceeded max_retries")
            # A step that raised from inside a Dagster wrapper, or ran out of retries, carries the real exception
            # as its cause.
            while error is not None and error.cause is not None and (
                any(name in (error.cls_name or "") for name in _WRAPPERS)
                or (error.message or "").startswith("Exceeded max_retries")
            ):
                error = error.cause
            message = error.message.strip() if error is not None else "unknown error"
            errors.append({"step": event.step_key or "", "error": message + (" (retries exhausted)" if retried else "")})
    return errors
