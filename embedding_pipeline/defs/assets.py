"""The ingest chain for one drop: manifest → tensor batches → embeddings → Milvus rows."""

from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, Iterator, Mapping

from dagster import (
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    Backoff,
    DataVersion,
    DynamicOut,
    DynamicOutput,
    In,
    Jitter,
    MaterializeResult,
    MetadataValue,
    Nothing,
    OpExecutionContext,
    Out,
    Output,
    RetryPolicy,
    asset,
    graph_asset,
    op,
)

from embedding_pipeline import ingest
from embedding_pipeline.defs import metadata as ui
from embedding_pipeline.defs.partitions import drops_partitions
from embedding_pipeline.defs.resources import MilvusResource, TritonResource, step_settings
from embedding_pipeline.runtime import progress
from embedding_pipeline.settings import load_settings
from embedding_pipeline.sources.drops import DROP_SIGNATURE_KEY, drop_signature, find_drop
from embedding_pipeline.sources.statuses import ItemStatus
from embedding_pipeline.storage import layout

GROUP = "image_ingest"
# Who gets asked about these assets in the UI (Dagster owners are e-mail addresses or "team:<name>").
OWNERS = ["team:ml-platform"]
# Steps are serialised per shared service across all runs (limits set in the instance's dagster.yaml): one step
# streams batches to Triton, one writes Milvus, so concurrent drops queue instead of overloading either server.
TRITON_POOL, MILVUS_POOL = "triton", "milvus"


def _retry_policy() -> RetryPolicy:
    """Retries with exponential backoff for steps that call a server: a restarting Triton or Milvus is survived."""
    dagster = load_settings().dagster
    return RetryPolicy(
        max_retries=dagster.step_retries,
        delay=dagster.step_retry_delay_s,
        backoff=Backoff.EXPONENTIAL,
        jitter=Jitter.PLUS_MINUS,
    )


RETRY = _retry_policy()


# A long step logs how far it is this often (count, rate, ETA), so its log in the UI shows it moving.
PROGRESS_LOG_EVERY_S = 5.0


@contextmanager
def _logged_progress(context: AssetExecutionContext | OpExecutionContext) -> Iterator[None]:
    """Log the running stage's progress (:mod:`embedding_pipeline.runtime.progress`) every few seconds."""
    with progress.listening(progress.Throttled(lambda update: context.log.info(update.line()), PROGRESS_LOG_EVERY_S)):
        yield


def _metadata(summary: Mapping[str, Any]) -> dict[str, Any]:
    """A stage summary (its ``as_dict()``, with what the asset adds) as materialization metadata (numbers, JSON,
    and a failures table; see defs/metadata.py)."""
    return ui.summary_metadata(summary)


@asset(
    partitions_def=drops_partitions,
    group_name=GROUP,
    owners=OWNERS,
    kinds={"python"},
    tags={"stage": "sources"},
    code_version="1",
)
def raw_image_manifest(context: AssetExecutionContext) -> MaterializeResult:
    """Every item of the drop — image files and manifest rows — with its id, URI, metadata, sha256 and status.

    Each item is read once and checked to be an image; unreadable items are recorded as `failed` with a
    reason and never stop the good ones. Its metadata previews the first good items as thumbnails.
    """
    settings = load_settings()
    # Taken before the items are read: a file changing meanwhile makes the next rescan see a change.
    signature = drop_signature(find_drop(settings.drops_location, context.partition_key))
    with _logged_progress(context):
        summary = ingest.build_manifest(settings, context.partition_key)
    items_per_s = round(summary.items / summary.seconds, 1) if summary.seconds else 0.0
    if summary.failed:
        context.log.warning(f"{summary.failed} item(s) failed: {summary.failure_examples}")
    files = layout.drop_files(settings, context.partition_key)
    extra = {ui.ROW_COUNT_KEY: summary.items, **ui.output_schema_metadata(files.manifest)}
    preview = ui.drop_preview(settings, context.partition_key)
    if preview is not None:
        extra["preview"] = preview
    shown = {**summary.as_dict(), DROP_SIGNATURE_KEY: signature, "items_per_s": items_per_s}
    return MaterializeResult(metadata={**_metadata(shown), **extra})


# Big drops: the preprocess and embed stages are each a plan step, one step per shard of at most
# `dagster.shard_items` items (parallel in the ingest_drop_sharded job, in turn in ingest_drop), and a commit step
# that puts every shard's files in place at once. The index stage stays one step per drop.


def _shard_key(shard: int) -> str:
    return f"shard_{shard:04d}"


def _attempt_of(shards: list[dict]) -> str:
    """The one write attempt every shard of a stage worked on (the plan always makes at least one shard)."""
    attempts = {s["attempt"] for s in shards}
    if len(attempts) != 1:
        raise RuntimeError(f"the shards worked on {len(attempts)} write attempts, not one: {sorted(attempts)}")
    return attempts.pop()


def _shard(done: dict) -> ingest.ShardSummary:
    return ingest.ShardSummary(**{k: v for k, v in done.items() if k != "attempt"})


@op(
    ins={"after": In(Nothing)},
    out=DynamicOut(dict),
    tags={"stage": "preprocess"},
    retry_policy=RETRY,
    description="Reads the drop's manifest and the model's input from Triton, decides which items to decode and "
    "splits them into shards.",
)
def plan_preprocessing(context: OpExecutionContext, triton: TritonResource) -> Iterator[DynamicOutput[dict]]:
    settings = step_settings(triton)
    with triton.embedder(settings) as embedder:
        model_input = embedder.input_spec()
        model = embedder.model_version_label()
    plan = ingest.plan_preprocess(settings, context.partition_key, model)
    context.log.info(f"preprocess attempt {plan.attempt}: {plan.shards} shard(s)")
    task = {"attempt": plan.attempt, "datatype": model_input.datatype, "shape": list(model_input.shape)}
    for shard in range(plan.shards):
        yield DynamicOutput({**task, "shard": shard}, mapping_key=_shard_key(shard))


@op(
    out=Out(dict),
    tags={"stage": "preprocess"},
    retry_policy=RETRY,
    description="Decodes one shard's images into exactly the model's input (Pillow + a JAX jit+vmap kernel).",
)
def preprocess_shard(context: OpExecutionContext, triton: TritonResource, task: dict) -> dict:
    settings = step_settings(triton)
    with _logged_progress(context):
        done = ingest.preprocess_shard(
            settings, context.partition_key, task["attempt"], task["shard"], (task["datatype"], task["shape"])
        )
    return {**asdict(done), "attempt": task["attempt"]}


@op(
    out=Out(Nothing),
    tags={"stage": "preprocess"},
    retry_policy=RETRY,
    description="Puts every shard's tensor batches in place as the drop's, in one atomic commit.",
)
def commit_preprocessing(context: OpExecutionContext, triton: TritonResource, shards: list[dict]):
    settings = step_settings(triton)
    summary = ingest.commit_preprocess(
        settings, context.partition_key, _attempt_of(shards), [_shard(s) for s in shards]
    )
    if summary.failed:
        context.log.warning(f"{summary.failed} image(s) could not be decoded: {summary.failure_examples}")
    files = layout.drop_files(settings, context.partition_key)
    extra = {ui.ROW_COUNT_KEY: summary.images, **ui.output_schema_metadata(files.preprocessed)}
    yield Output(None, metadata={**_metadata(summary.as_dict()), **extra})


@graph_asset(
    partitions_def=drops_partitions,
    group_name=GROUP,
    ins={"raw_image_manifest": AssetIn(key=AssetKey("raw_image_manifest"), dagster_type=Nothing)},
    owners=OWNERS,
    kinds={"jax", "arrow"},
    tags={"stage": "preprocess"},
    code_version="1",
)
def preprocessed_batches(raw_image_manifest):
    """The drop's images decoded with Pillow and resized / centre-cropped by a JAX `jit`+`vmap` kernel into
    exactly the model's input (read from Triton's model metadata), stored as Arrow IPC files, one per batch.

    Images that fail to decode (truncated, too many pixels, corrupt) are recorded per item; images already
    embedded by the same model with the same sha256 are not recomputed. A big drop is decoded in shards."""
    return commit_preprocessing(plan_preprocessing(after=raw_image_manifest).map(preprocess_shard).collect())


@op(
    ins={"after": In(Nothing)},
    out=DynamicOut(dict),
    tags={"stage": "embed"},
    retry_policy=RETRY,
    description="Splits the drop's tensor batches into shards for the model.",
)
def plan_embedding(context: OpExecutionContext, triton: TritonResource) -> Iterator[DynamicOutput[dict]]:
    settings = step_settings(triton)
    plan = ingest.plan_embed(settings, context.partition_key)
    context.log.info(f"embed attempt {plan.attempt}: {plan.shards} shard(s)")
    for shard in range(plan.shards):
        yield DynamicOutput({"attempt": plan.attempt, "shard": shard}, mapping_key=_shard_key(shard))


@op(
    out=Out(dict),
    tags={"stage": "embed"},
    pool=TRITON_POOL,
    retry_policy=RETRY,
    description="Sends one shard's tensor batches through the model served by Triton.",
)
def embed_shard(context: OpExecutionContext, triton: TritonResource, task: dict) -> dict:
    settings = step_settings(triton)
    with triton.embedder(settings) as embedder:
        with _logged_progress(context):
            done = ingest.embed_shard(settings, context.partition_key, task["attempt"], task["shard"], embedder)
    return {**asdict(done), "attempt": task["attempt"]}


@op(
    out=Out(Nothing),
    tags={"stage": "embed"},
    retry_policy=RETRY,
    description="Puts every shard's vectors (and the rows carried over) in place as the drop's embeddings.",
)
def commit_embedding(context: OpExecutionContext, triton: TritonResource, shards: list[dict]):
    settings = step_settings(triton)
    with triton.embedder(settings) as embedder:
        model = embedder.model_version_label()
    summary = ingest.commit_embed(
        settings, context.partition_key, _attempt_of(shards), [_shard(s) for s in shards], model
    )
    version = ingest.embeddings_version(settings, context.partition_key, summary.model)
    files = layout.drop_files(settings, context.partition_key)
    extra = {ui.ROW_COUNT_KEY: summary.embeddings, **ui.output_schema_metadata(files.embeddings)}
    yield Output(None, metadata={**_metadata(summary.as_dict()), **extra}, data_version=DataVersion(version))


@graph_asset(
    partitions_def=drops_partitions,
    group_name=GROUP,
    # The served model (an observable source, defs/models.py): a new model makes every embedded drop stale.
    ins={
        "preprocessed_batches": AssetIn(key=AssetKey("preprocessed_batches"), dagster_type=Nothing),
        "embedding_model": AssetIn(key=AssetKey("embedding_model"), dagster_type=Nothing),
    },
    owners=OWNERS,
    kinds={"triton", "arrow"},
    tags={"stage": "embed"},
    code_version="1",
)
def image_embeddings(preprocessed_batches, embedding_model):
    """One L2-normalised vector per image from the model served by Triton, stored as Arrow with the item's
    lineage (drop, sha256, URI) and the model name and version. A big drop is embedded in shards (the Triton
    pool still lets one shard at a time talk to the server unless raised)."""
    return commit_embedding(plan_embedding(after=[preprocessed_batches, embedding_model]).map(embed_shard).collect())


@asset(
    partitions_def=drops_partitions,
    group_name=GROUP,
    deps=[image_embeddings],
    owners=OWNERS,
    kinds={"milvus"},
    tags={"stage": "index"},
    code_version="1",
    pool=MILVUS_POOL,
    retry_policy=RETRY,
)
def milvus_collection(context: AssetExecutionContext, milvus: MilvusResource) -> MaterializeResult:
    """The drop's vectors upserted by image id into the Milvus collection of the model that embedded them
    (one collection per model, `<milvus.collection>__<model>`; re-running a drop never duplicates, and unchanged
    rows are not rewritten), the vector index ensured, the collection loaded. Search uses the alias
    `milvus.collection`, which stays on the previous model's collection until `switch_search_collection` moves
    it. Its metadata tells the whole drop on one page: seconds and images/s of every stage, items ok, failed and
    skipped, failures by kind with examples, and thumbnails of the first items."""
    from embedding_pipeline.index.collections import ModelCollections

    settings = step_settings(milvus=milvus)
    with ModelCollections(settings.milvus) as collections:
        with _logged_progress(context):
            summary = ingest.index_drop(settings, context.partition_key, collections)
        described: dict[str, Any] = {}
        if summary.collection:
            with collections.index(summary.collection) as index:
                described["index"] = index.describe_index()
    if summary.switch_pending:
        context.log.info(
            f"drop written to {summary.collection}; search still uses {summary.search_collection} until "
            "the switch_search_collection job runs"
        )
    report = ingest.item_report(settings, context.partition_key)
    totals = ingest.report_summary(report)
    story = _drop_story(context, settings, summary, totals, report)
    shown = {**summary.as_dict(), **described, **totals.as_dict()}
    # The story first: the UI lists metadata in this order.
    return MaterializeResult(metadata={**story, **{k: v for k, v in _metadata(shown).items() if k not in story}})


def _drop_story(
    context: AssetExecutionContext, settings, summary: ingest.IndexSummary, totals: ingest.ReportSummary, report: list
) -> dict[str, Any]:
    """What the last asset adds so its page tells the whole drop: every stage's time and rate (earlier stages'
    figures come from their materializations in the instance), all failures by kind, and a preview."""
    drop = context.partition_key
    stages = {**ui.earlier_stage_metadata(context.instance, drop), "index": summary.as_dict()}
    timings = ui.stage_timings(stages, totals.items_ok)
    failures = [r for r in report if r["status"] == ItemStatus.FAILED]
    story = {
        "stage_timings": timings.pop("stage_timings"),
        "failures": MetadataValue.md(ui.failure_table(totals.failures_by_kind, failures)),
    }
    embedded = {r["id"] for r in report if r["stage"] in ("embedded", "reused")}
    preview = ui.drop_preview(settings, drop, only=embedded, what="embedded items")
    if preview is not None:
        story["preview"] = preview
    return {**story, ui.ROW_COUNT_KEY: summary.drop_rows, **timings}


ingest_assets = [raw_image_manifest, preprocessed_batches, image_embeddings, milvus_collection]
