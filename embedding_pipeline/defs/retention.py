"""The ``delete_drop`` job: retention from the Dagster UI (Launchpad) or the CLI.

One op, configured with the drop's name. It is a dry run unless ``dry_run: false``: the run then only shows what
would go. Either way the run records a markdown table of paths (files, bytes) and Milvus rows per collection as
metadata and logs it; the logic is `embedding_pipeline.retention`.
"""

from typing import Any

from dagster import Config, MetadataValue, OpExecutionContext, Out, in_process_executor, job, op
from pydantic import Field

from embedding_pipeline import retention
from embedding_pipeline.defs.assets import MILVUS_POOL
from embedding_pipeline.defs.resources import MilvusResource, step_settings
from embedding_pipeline.orchestration.instance import DagsterDrops
from embedding_pipeline.orchestration.names import DELETE_DROP_JOB, DROP_TAG


class DeleteDropConfig(Config):
    """Which drop to delete; a dry run (the default) deletes nothing and shows what would go."""

    drop: str = Field(description="The drop (partition key) to delete.")
    dry_run: bool = Field(True, description="Only show what would be deleted; set false to delete.")


def _metadata(summary: dict[str, Any], table: str) -> dict[str, Any]:
    return {
        "dry_run": summary["dry_run"],
        "drop": summary["drop"],
        "deletion": MetadataValue.md(table),
        "files": summary["files"],
        "bytes": MetadataValue.int(summary["bytes"]),
        "milvus_rows": summary["total_rows"],
        "rows_per_collection": MetadataValue.json(summary.get("deleted_rows", summary["rows"])),
        "partition": summary["partition"],
        "paths": MetadataValue.json(summary["paths"]),
    }


@op(
    out=Out(dict, description="What was deleted (or would be, in a dry run): paths, rows per collection, partition."),
    pool=MILVUS_POOL,  # it deletes Milvus rows: one writer at a time, like the index step
    tags={"kind": "retention"},
)
def delete_drop_data(context: OpExecutionContext, config: DeleteDropConfig, milvus: MilvusResource) -> dict:
    """Deletes one drop: its source in the drop directory, its files (manifest, tensor batches, embeddings,
    downloaded blobs no other drop uses), its rows in every collection of the configured name, and its partition.
    Refuses an unknown drop and a drop with a run in progress. A dry run only reports."""
    settings = step_settings(milvus=milvus)
    retention.check_name(config.drop)
    # Tagged like the drop's ingest runs: filtering Runs by the tag shows a drop's whole life.
    context.instance.add_run_tags(context.run_id, {DROP_TAG: config.drop})
    drops = DagsterDrops(context.instance)
    if config.dry_run:
        plan = retention.plan_drop_deletion(settings, config.drop, drops, this_run=context.run_id)
        summary = {**plan.as_dict(), "dry_run": True}
        table = plan.markdown("rows")
        verb = "would delete"
        if plan.runs_in_progress:
            context.log.warning(
                f"run(s) in progress on {config.drop!r}: {plan.runs_in_progress}; a real run would refuse now"
            )
    else:
        result = retention.delete_drop(settings, config.drop, drops, this_run=context.run_id)
        summary = {**result.as_dict(), "dry_run": False}
        table = result.plan.markdown("rows deleted")
        verb = "deleted"
        context.log.info(f"materialization history: {result.history}")
    context.log.info(
        f"{verb} drop {config.drop!r}: {summary['files']} file(s), {summary['bytes']} bytes, "
        f"{summary['total_rows']} Milvus row(s) {summary['rows']}\n{table}"
    )
    context.add_output_metadata(_metadata(summary, table))
    return summary


@job(
    name=DELETE_DROP_JOB,
    executor_def=in_process_executor,
    tags={"kind": "retention"},
    description="Delete one drop (config `drop`): source, files, Milvus rows in every collection, partition. "
    "Dry run by default (`dry_run: true`): the run's metadata then shows what would go.",
)
def delete_drop():
    delete_drop_data()


retention_jobs = [delete_drop]
