"""Near-duplicate groups, on demand: the `near_duplicates` asset (one drop against the whole collection), its
sanity check, and the `collection_duplicates` job (every row of the collection).

They are not part of `ingest_drop`: a drop's groups are a report about the collection, not a stage an image passes,
and a failed search for them must not fail an ingest. Materialize a drop's partition of `near_duplicates` (or run
`find_duplicates` on it) when its groups are wanted; the logic lives in `embedding_pipeline.duplicates`.
"""

from typing import Any, Optional

from dagster import (
    AssetCheckExecutionContext,
    AssetExecutionContext,
    AssetSelection,
    Config,
    MaterializeResult,
    MetadataValue,
    OpExecutionContext,
    asset,
    define_asset_job,
    in_process_executor,
    job,
    multi_asset_check,
    op,
)
from pydantic import Field

from embedding_pipeline import duplicates
from embedding_pipeline.defs import metadata as ui
from embedding_pipeline.defs.assets import MILVUS_POOL, OWNERS, RETRY, milvus_collection
from embedding_pipeline.defs.checks import _results, _specs
from embedding_pipeline.defs.partitions import drops_partitions
from embedding_pipeline.defs.resources import MilvusResource, step_settings
from embedding_pipeline.index.collections import index_for_drop
from embedding_pipeline.orchestration.names import DUPLICATES_ASSET
from embedding_pipeline.quality import Outcome
from embedding_pipeline.runtime.locks import drop_lock
from embedding_pipeline.settings import Settings
from embedding_pipeline.storage import arrow, layout

GROUP = "image_duplicates"
NEAR_DUPLICATES = DUPLICATES_ASSET
FIND_DUPLICATES_JOB = "find_duplicates"
COLLECTION_DUPLICATES_JOB = "collection_duplicates"
CHECKS = {
    "duplicate_groups_sound": "Every image in a group is in the collection, no image is in two groups, every group "
    "has two or more images and one representative, and every image links to its group at the threshold.",
}


class DuplicatesConfig(Config):
    """The threshold, in the collection's metric (COSINE/IP: similarity, at least; L2: squared distance, at most)."""

    threshold: Optional[float] = Field(
        None, description="Default: duplicates.threshold, else the measured default for the metric (cosine 0.94)."
    )


def _report_metadata(settings: Settings, report: duplicates.DuplicateReport, path: Any) -> dict[str, Any]:
    groups = duplicates.group_list(report.table, 0, ui.DUPLICATE_GROUPS_SHOWN)
    shown = [m for g in groups for m in g["members"][: ui.DUPLICATE_MEMBERS_SHOWN]]
    images = dict(zip((m["id"] for m in shown), ui.hit_thumbnails(settings, shown)))
    return {
        **{k: v for k, v in report.as_dict().items() if v is not None},
        ui.ROW_COUNT_KEY: report.members,
        "path": MetadataValue.path(str(path)),
        "largest_groups": MetadataValue.md(ui.duplicate_groups(groups, images, report.groups)),
    }


@asset(
    partitions_def=drops_partitions,
    group_name=GROUP,
    deps=[milvus_collection],
    owners=OWNERS,
    kinds={"milvus", "parquet"},
    tags={"stage": "duplicates"},
    code_version="1",
    pool=MILVUS_POOL,
    retry_policy=RETRY,
)
def near_duplicates(
    context: AssetExecutionContext, config: DuplicatesConfig, milvus: MilvusResource
) -> MaterializeResult:
    """Groups of near-duplicate images among the drop's images and the images of the whole collection (a copy of an
    older image counts), found with the collection's own vector search, never by comparing every pair: each of the
    drop's stored vectors is searched, pairs at least as close as the threshold are joined into groups. Written as
    Parquet (`data/duplicates/<drop>.parquet`: group, id, uri, drop, representative, score to the representative,
    best link score). On demand: not part of `ingest_drop`. Its metadata shows the largest groups as thumbnails."""
    settings = step_settings(milvus=milvus)
    drop = context.partition_key
    # Under the drop's lock, like the ingest stages: a deletion of the drop never interleaves with its report.
    with drop_lock(settings.paths.locks, drop):
        if not layout.drop_files(settings, drop).manifest.is_file():
            raise ValueError(f"drop {drop!r} has not been ingested (or was deleted): nothing to group")
        report = duplicates.find_for(settings, drop, config.threshold)
        path = layout.drop_files(settings, drop).duplicates
        duplicates.write_report(path, report)
    context.log.info(f"{report.groups} group(s), {report.members} image(s), threshold {report.threshold}")
    return MaterializeResult(metadata=_report_metadata(settings, report, path))


@multi_asset_check(
    specs=_specs(near_duplicates.key, CHECKS, blocking=False),
    name="near_duplicates_checks",
    description="Checks the drop's near-duplicate groups as written: members exist, one group each, links at the "
    "threshold.",
    can_subset=True,
)
def near_duplicates_checks(context: AssetCheckExecutionContext, milvus: MilvusResource):
    settings = step_settings(milvus=milvus)
    drop = context.partition_key
    path = layout.drop_files(settings, drop).duplicates
    table = arrow.read_parquet(path)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    ids = sorted(set(table.column("id").to_pylist()))
    with index_for_drop(settings, settings.milvus, drop) as index:
        present = set(index.rows(ids, ["id"])) if ids else set()
    problems = duplicates.table_problems(table, float(meta["threshold"]), meta["metric"], present)
    summary = (
        f"{duplicates.group_count(table)} group(s) of {table.num_rows} image(s) are sound"
        if not problems
        else "; ".join(f"{kind}: {len(found)}" for kind, found in problems.items())
    )
    outcome = Outcome(
        "duplicate_groups_sound",
        not problems,
        summary,
        {"groups": duplicates.group_count(table), "images": table.num_rows, **problems},
    )
    yield from _results(context, near_duplicates.key, [outcome])


find_duplicates_job = define_asset_job(
    FIND_DUPLICATES_JOB,
    selection=AssetSelection.assets(near_duplicates),
    executor_def=in_process_executor,
    description="Near-duplicate groups of one drop (partition) against the whole collection, and their check.",
)


@op(description="Near-duplicate groups of the whole collection search uses (every row a query), written as Parquet.")
def collection_duplicate_groups(context: OpExecutionContext, config: DuplicatesConfig, milvus: MilvusResource) -> None:
    settings = step_settings(milvus=milvus)
    report = duplicates.find_for(settings, None, config.threshold)
    path = layout.collection_duplicates(settings, settings.milvus.collection)
    duplicates.write_report(path, report)
    context.log.info(f"{report.groups} group(s), {report.members} image(s), threshold {report.threshold}")
    context.add_output_metadata(_report_metadata(settings, report, path))


@job(
    name=COLLECTION_DUPLICATES_JOB,
    description="Near-duplicate groups of the whole collection (config: threshold), on demand.",
)
def collection_duplicates():
    collection_duplicate_groups()


duplicate_assets = [near_duplicates]
duplicate_checks = [near_duplicates_checks]
duplicate_jobs: list[Any] = [find_duplicates_job, collection_duplicates]
