"""The ingest chain for one drop: manifest → tensor batches → embeddings → Milvus rows."""


from typing import Any

from dagster import AssetExecutionContext, Backoff, Jitter, MaterializeResult, MetadataValue, RetryPolicy, asset

from embedding_pipeline import ingest
from embedding_pipeline.defs.partitions import drops_partitions
from embedding_pipeline.defs.resources import MilvusResource, TritonResource
from embedding_pipeline.settings import load_settings

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


def _metadata(summary: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in summary.items():
        if isinstance(value, (dict, list)):
            out[key] = MetadataValue.json(value)
        elif key.endswith("bytes"):
            out[key] = MetadataValue.int(int(value))
        else:
            out[key] = value
    return out


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
    reason and never stop the good ones.
    """
    summary = ingest.build_manifest(load_settings(), context.partition_key)
    if summary["failed"]:
        context.log.warning(f"{summary['failed']} item(s) failed: {summary['failure_examples']}")
    return MaterializeResult(metadata=_metadata(summary))


@asset(
    partitions_def=drops_partitions,
    group_name=GROUP,
    deps=[raw_image_manifest],
    owners=OWNERS,
    kinds={"jax", "arrow"},
    tags={"stage": "preprocess"},
    code_version="1",
    retry_policy=RETRY,
)
def preprocessed_batches(context: AssetExecutionContext, triton: TritonResource) -> MaterializeResult:
    """The drop's images decoded with Pillow and resized / centre-cropped by a JAX `jit`+`vmap` kernel into
    exactly the model's input (read from Triton's model metadata), stored as Arrow IPC files, one per batch.

    Images that fail to decode (truncated, too many pixels, corrupt) are recorded per item; images already
    embedded by the same model with the same sha256 are not recomputed."""
    with triton.embedder() as embedder:
        model_input = embedder.input_spec()
        model = embedder.model_version_label()
    summary = ingest.preprocess_drop(
        load_settings(), context.partition_key, (model_input.datatype, tuple(model_input.shape)), model
    )
    if summary["failed"]:
        context.log.warning(f"{summary['failed']} image(s) could not be decoded: {summary['failure_examples']}")
    return MaterializeResult(metadata=_metadata(summary))


@asset(
    partitions_def=drops_partitions,
    group_name=GROUP,
    deps=[preprocessed_batches],
    owners=OWNERS,
    kinds={"triton", "arrow"},
    tags={"stage": "embed"},
    code_version="1",
    pool=TRITON_POOL,
    retry_policy=RETRY,
)
def image_embeddings(context: AssetExecutionContext, triton: TritonResource) -> MaterializeResult:
    """One L2-normalised vector per image from the model served by Triton, stored as Arrow with the item's
    lineage (drop, sha256, URI) and the model name and version."""
    with triton.embedder() as embedder:
        summary = ingest.embed_drop(load_settings(), context.partition_key, embedder)
    return MaterializeResult(metadata=_metadata(summary))


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
    """The drop's vectors upserted by image id into the Milvus collection (re-running a drop never
    duplicates, and unchanged rows are not rewritten), the vector index ensured, the collection loaded for
    search. Its metadata sums up the whole drop: items ok, failed and skipped, failures by kind."""
    settings = load_settings()
    with milvus.index() as index:
        summary = ingest.index_drop(settings, context.partition_key, index)
        summary["index"] = index.describe_index()
    summary.update(ingest.report_summary(ingest.item_report(settings, context.partition_key)))
    return MaterializeResult(metadata=_metadata(summary))


ingest_assets = [raw_image_manifest, preprocessed_batches, image_embeddings, milvus_collection]
