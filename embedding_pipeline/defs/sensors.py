"""The drop sensor: each complete new drop becomes a partition and one ingest run.

Its memory is the instance's dynamic partitions, not a private cursor: a drop is new while it is not a partition
of ``drops``. Partitions live in the instance's storage, so they survive daemon restarts like a cursor would, and
they are shared with everything else that registers drops — ``embedding-pipeline ingest`` adds the partition before
it places the drop, and a partition added in the UI counts too — where a cursor private to the sensor would
re-ingest those drops. A daemon stopped for a while finds, on its next tick, exactly the drops that arrived
meanwhile. On top, Dagster never creates a second run for one run key (drop name + signature) from this sensor.
"""

from dagster import DefaultSensorStatus, RunRequest, SensorEvaluationContext, SensorResult, SkipReason, sensor

from embedding_pipeline.defs.jobs import ingest_drop_job, ingest_drop_sharded_job
from embedding_pipeline.defs.partitions import drops_partitions
from embedding_pipeline.orchestration.names import (
    DROP_TAG,
    DROPS_PARTITION,
    INGEST_JOB,
    INGEST_SHARDED_JOB,
    TRIGGER_TAG,
)
from embedding_pipeline.runtime.objects import ObjectError
from embedding_pipeline.settings import Settings, load_settings
from embedding_pipeline.sources.drops import Drop, complete_drops, drop_signature, estimate_items, scan

_interval = load_settings().dagster.sensor_interval_s


def ingest_job_for(drop: Drop, settings: Settings) -> str:
    """The job for a new drop: the sharded one (parallel processes) when it holds more than one shard's items."""
    try:
        big = estimate_items(drop) > settings.dagster.shard_items
    except (OSError, ObjectError):  # unreadable now: the in-process job reports it per item or fails the run
        big = False
    return INGEST_SHARDED_JOB if big else INGEST_JOB


@sensor(
    jobs=[ingest_drop_job, ingest_drop_sharded_job],
    minimum_interval_seconds=_interval,
    default_status=DefaultSensorStatus.RUNNING,
    description="Watches the drop directory; a drop counts as complete when it holds a _READY file or has not "
    "changed for `drop_settle_s` seconds. Each new complete drop is added as a partition and ingested once. "
    "Changed drops and failed runs are picked up by the `rescan_drops` schedule. A drop of more than "
    "`dagster.shard_items` items runs in `ingest_drop_sharded` (its shards in parallel processes).",
)
def drop_sensor(context: SensorEvaluationContext):
    settings = load_settings()
    known = set(context.instance.get_dynamic_partitions(DROPS_PARTITION))
    location = settings.drops_location
    # Known drops are not looked into: in a bucket, one delimited listing of the top level per tick.
    new = complete_drops(location, settings.dagster.drop_settle_s, known)
    if not new:
        invalid = scan(location)[1]
        note = f"; ignored names: {invalid[:5]}" if invalid else ""
        return SkipReason(f"no new complete drop in {location}{note}")
    return SensorResult(
        # run_key = drop name + signature: Dagster never launches two runs for one drop from this sensor, yet a drop
        # deleted (partition removed) and dropped again under the same name is a new run.
        run_requests=[
            RunRequest(
                run_key=f"{d.name}:{drop_signature(d)}",
                partition_key=d.name,
                job_name=ingest_job_for(d, settings),
                tags={DROP_TAG: d.name, TRIGGER_TAG: "sensor"},
            )
            for d in new
        ],
        dynamic_partitions_requests=[drops_partitions.build_add_request([d.name for d in new])],
    )
