"""The drop sensor: each complete new drop becomes a partition and one ingest run."""


from dagster import DefaultSensorStatus, RunRequest, SensorEvaluationContext, SensorResult, SkipReason, sensor

from embedding_pipeline.defs.jobs import ingest_drop_job
from embedding_pipeline.defs.partitions import drops_partitions
from embedding_pipeline.settings import load_settings
from embedding_pipeline.sources.drops import complete_drops, scan

_interval = load_settings().dagster.sensor_interval_s


@sensor(
    job=ingest_drop_job,
    minimum_interval_seconds=_interval,
    default_status=DefaultSensorStatus.RUNNING,
    description="Watches the drop directory; a drop counts as complete when it holds a _READY file or has not "
    "changed for `drop_settle_s` seconds. Each new complete drop is added as a partition and ingested once.",
)
def drop_sensor(context: SensorEvaluationContext):
    settings = load_settings()
    known = set(context.instance.get_dynamic_partitions(drops_partitions.name))
    new = [d.name for d in complete_drops(settings.drops, settings.dagster.drop_settle_s) if d.name not in known]
    if not new:
        invalid = scan(settings.drops)[1]
        note = f"; ignored names: {invalid[:5]}" if invalid else ""
        return SkipReason(f"no new complete drop in {settings.drops}{note}")
    return SensorResult(
        # run_key = drop name: Dagster never launches two runs for one drop from this sensor.
        run_requests=[RunRequest(run_key=name, partition_key=name, tags={"drop": name}) for name in new],
        dynamic_partitions_requests=[drops_partitions.build_add_request(new)],
    )
