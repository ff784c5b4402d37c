"""Submitting a backfill of ``ingest_drop`` over every drop (re-embedding after a model change).

The one adapter onto Dagster's private modules (``dagster._*``). Dagster 1.13's public API has no call that submits
a partition backfill to an instance for the daemon to run: the UI does it through GraphQL (``launchPartitionBackfill``),
which needs a running webserver, and ``DagsterInstance.add_backfill`` wants a ``PartitionBackfill`` built from a
remote partition set. So the backfill is built here the way the webserver builds it. A Dagster upgrade that moves
these names breaks this module alone; its integration test (re-embed after a model change) says so.
"""

from __future__ import annotations

import sys

from dagster import DagsterInstance
from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.utils import make_new_backfill_id
from dagster._time import get_current_timestamp

from embedding_pipeline.orchestration.names import (
    DEFS_MODULE,
    DROPS_PARTITION,
    INGEST_JOB,
    LOCATION_NAME,
    REEMBED_TAG,
    REPOSITORY_NAME,
)


def launch_reembed_backfill(instance: DagsterInstance, tags: dict[str, str] | None = None) -> tuple[str, list[str]]:
    """Submit a backfill of ``ingest_drop`` over every ``drops`` partition to ``instance``; the daemon runs it.

    Returns the backfill id and the partitions. The backfill names the code location by name, as the UI does,
    so the daemon runs it with the code it loads itself.
    """
    partitions = list(instance.get_dynamic_partitions(DROPS_PARTITION))
    if not partitions:
        raise ValueError("there are no drops to re-embed (no partitions of 'drops' in the Dagster instance)")
    origin = InProcessCodeLocationOrigin(
        LoadableTargetOrigin(executable_path=sys.executable, module_name=DEFS_MODULE),
        location_name=LOCATION_NAME,
    )
    location = origin.create_location(instance)
    try:
        repository = location.get_repository(REPOSITORY_NAME)
        partition_set = next(p for p in repository.get_partition_sets() if p.job_name == INGEST_JOB)
        backfill = PartitionBackfill(
            backfill_id=make_new_backfill_id(),
            partition_set_origin=partition_set.get_remote_origin(),
            status=BulkActionStatus.REQUESTED,
            partition_names=partitions,
            from_failure=False,
            reexecution_steps=None,
            tags={REEMBED_TAG: "true", **(tags or {})},
            backfill_timestamp=get_current_timestamp(),
            title="Re-embed all drops",
            description="Every drop through ingest_drop with the model Triton serves now.",
        )
        instance.add_backfill(backfill)
    finally:
        location.cleanup()
    return backfill.backfill_id, partitions
