"""The rescan schedule: re-ingest every drop that is new, changed since it was last read, or whose last run failed.

The sensor ingests each drop once, when it first appears. Drops also change afterwards (files added to a folder, a
manifest edited) and runs fail (a server down all night); the schedule catches both on a cron. What a drop held
when it was last read is its signature (names, sizes, mtimes: :func:`~embedding_pipeline.sources.drops.drop_signature`)
recorded in the ``raw_image_manifest`` materialization of its partition, so a rescan of an unchanged drop folder
requests nothing, whoever launched the earlier run (sensor, schedule, CLI or UI).
"""

from __future__ import annotations

from dataclasses import dataclass

from dagster import (
    AssetKey,
    AssetRecordsFilter,
    DagsterInstance,
    DagsterRunStatus,
    DefaultScheduleStatus,
    RunRequest,
    RunsFilter,
    ScheduleEvaluationContext,
    SkipReason,
    schedule,
)

from embedding_pipeline.defs.jobs import ingest_drop_job
from embedding_pipeline.orchestration.names import DROP_TAG, DROPS_PARTITION, INGEST_ASSETS, PARTITION_TAG, TRIGGER_TAG
from embedding_pipeline.settings import load_settings
from embedding_pipeline.sources.drops import DROP_SIGNATURE_KEY, Drop, complete_drops, drop_signature

SIGNATURE_TAG, REASON_TAG = "drop_signature", "rescan_reason"
MANIFEST_ASSET = AssetKey(INGEST_ASSETS[0])
# A run in one of these states is still working on its drop: requesting another would only queue a duplicate.
_IN_FLIGHT = {
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
    DagsterRunStatus.CANCELING,
}
_ENDED_BADLY = {DagsterRunStatus.FAILURE: "last run failed", DagsterRunStatus.CANCELED: "last run canceled"}


@dataclass(frozen=True)
class RescanDecision:
    """Whether a drop needs an ingest run now, and why (shown as a run tag and in the schedule's skip message)."""

    drop: str
    signature: str
    reason: str | None  # None: up to date, or a run is on it already

    @property
    def wanted(self) -> bool:
        return self.reason is not None


def recorded_signature(instance: DagsterInstance, drop: str) -> str | None:
    """The drop signature of the drop's latest ``raw_image_manifest`` materialization ("" if it has none)."""
    result = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=MANIFEST_ASSET, asset_partitions=[drop]), limit=1, ascending=False
    )
    if not result.records:
        return None
    materialization = result.records[0].asset_materialization
    value = materialization.metadata.get(DROP_SIGNATURE_KEY) if materialization else None
    return str(value.value) if value is not None else ""


def latest_run_status(instance: DagsterInstance, drop: str) -> DagsterRunStatus | None:
    """Status of the newest run of the drop's partition: Dagster tags every partitioned run with it, whoever launched
    it (sensor, schedule, CLI, a backfill, the UI)."""
    runs = instance.get_runs(filters=RunsFilter(tags={PARTITION_TAG: drop}), limit=1)
    return runs[0].status if runs else None


def decide(instance: DagsterInstance, drop: Drop, known: set[str]) -> RescanDecision:
    signature = drop_signature(drop)
    if drop.name not in known:
        return RescanDecision(drop.name, signature, "new")
    status = latest_run_status(instance, drop.name)
    if status in _IN_FLIGHT:
        return RescanDecision(drop.name, signature, None)
    if status in _ENDED_BADLY:
        return RescanDecision(drop.name, signature, _ENDED_BADLY[status])
    recorded = recorded_signature(instance, drop.name)
    if recorded is None:
        return RescanDecision(drop.name, signature, "never ingested")
    if recorded != signature:
        return RescanDecision(drop.name, signature, "changed")
    return RescanDecision(drop.name, signature, None)


def rescan_requests(instance: DagsterInstance) -> tuple[list[RunRequest], list[str], list[str]]:
    """Run requests for the drops that need one, the drops that are new (partitions to add), and the drops that
    are up to date. Only complete drops are looked at: a drop still being written waits for the next tick."""
    settings = load_settings()
    known = set(instance.get_dynamic_partitions(DROPS_PARTITION))
    requests, new, current = [], [], []
    for drop in complete_drops(settings.drops_location, settings.dagster.drop_settle_s):
        decision = decide(instance, drop, known)
        if not decision.wanted:
            current.append(drop.name)
            continue
        if decision.reason == "new":
            new.append(drop.name)
        requests.append(
            RunRequest(
                # The signature in the key: one run per drop content per tick, even if the tick is re-evaluated.
                run_key=f"{drop.name}:{decision.signature}",
                partition_key=drop.name,
                tags={
                    DROP_TAG: drop.name,
                    TRIGGER_TAG: "schedule",
                    SIGNATURE_TAG: decision.signature,
                    REASON_TAG: decision.reason,
                },
            )
        )
    return requests, new, current


_settings = load_settings()


@schedule(
    job=ingest_drop_job,
    cron_schedule=_settings.dagster.rescan_cron,
    default_status=DefaultScheduleStatus.STOPPED,
    description="Re-scans the drop directory and requests an ingest run for each complete drop that is new, "
    "changed since it was last read (files added or removed, a manifest edited: names, sizes and mtimes are "
    "compared), or whose last run failed or was canceled. An unchanged directory requests nothing. Off until "
    "started; the cron is the `dagster.rescan_cron` setting.",
)
def rescan_drops(context: ScheduleEvaluationContext):
    requests, new, current = rescan_requests(context.instance)
    if new:
        # Schedules cannot return partition requests (sensors can): add the partitions here, before the runs
        # that need them are created.
        context.instance.add_dynamic_partitions(DROPS_PARTITION, new)
    if not requests:
        return SkipReason(f"{len(current)} drop(s) up to date; nothing new, changed or failed")
    return requests
