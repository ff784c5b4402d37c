"""Jobs: ingest one drop (the asset chain), and search the collection by image (ops)."""

from typing import Any, Optional

from dagster import (
    AssetSelection,
    Config,
    In,
    MetadataValue,
    OpExecutionContext,
    Out,
    define_asset_job,
    in_process_executor,
    job,
    multiprocess_executor,
    op,
)
from pydantic import Field

from embedding_pipeline.defs.assets import GROUP
from embedding_pipeline.defs.resources import MilvusResource, TritonResource, step_settings
from embedding_pipeline.orchestration.names import INGEST_JOB, INGEST_SHARDED_JOB
from embedding_pipeline.settings import load_settings

# In-process: the steps share one process, so JAX and the clients initialise once per run.
ingest_drop_job = define_asset_job(
    INGEST_JOB,
    selection=AssetSelection.groups(GROUP),
    executor_def=in_process_executor,
    description="Ingest one drop (partition): manifest → tensor batches → embeddings → Milvus.",
)
# One process per step, `dagster.shard_parallelism` at once: the shards of a big drop decode and embed in parallel
# (the Triton and Milvus pools still bound how many steps talk to each server). Each step starts its own process,
# which costs seconds: small drops run in ingest_drop.
ingest_drop_sharded_job = define_asset_job(
    INGEST_SHARDED_JOB,
    selection=AssetSelection.groups(GROUP),
    executor_def=multiprocess_executor.configured(
        {"max_concurrent": load_settings().dagster.shard_parallelism}, name="shard_executor"
    ),
    description="Ingest one big drop (partition) with its shards in parallel processes.",
)


class SearchQuery(Config):
    """A search request: an image (local path or http(s) URL) or the id of an indexed item ("more like this"),
    how many hits, and the options every search surface has."""

    image: str = Field("", description="Query image: a local path or an http(s) URL. Give this or `id`.")
    id: str = Field(
        "", description="Search with the vector stored for this id (no re-embedding). Give this or `image`."
    )
    include_self: bool = Field(False, description="With `id`: keep the item itself in the results.")
    top_k: int = Field(10, ge=1, description="Hits to return.")
    offset: int = Field(0, ge=0, description="Hits to skip first (the next page).")
    filter: str = Field("", description='Milvus expression, e.g. metadata["category"] == "nature".')
    min_score: Optional[float] = Field(
        None, description="Only hits at least this good: COSINE/IP score >= it, L2 distance <= it."
    )
    collapse: bool = Field(False, description="Fold near-duplicates under the best of them (`duplicates` on a hit).")
    collapse_threshold: Optional[float] = Field(
        None, description="Near-duplicate threshold for `collapse`; default `duplicates.threshold`."
    )


@op(
    out=Out(dict),
    description="The query vector: the query image embedded through the same preprocessing as ingest and the "
    "Triton model that built the collection search uses (the alias `milvus.collection` resolved), or the vector "
    "stored for the query id.",
)
def embed_query(
    context: OpExecutionContext, config: SearchQuery, triton: TritonResource, milvus: MilvusResource
) -> dict[str, Any]:
    from embedding_pipeline.duplicates import threshold_for
    from embedding_pipeline.retrieval import ImageSearcher, stored_vector
    from embedding_pipeline.sources.inputs import read_image_input
    from embedding_pipeline.thumbnails import thumbnail_uri

    if bool(config.image) == bool(config.id):
        raise ValueError("give exactly one of `image` and `id` in the search config")
    settings = step_settings(triton, milvus)
    thumbnail = None
    with ImageSearcher(settings) as searcher:
        # Resolved once: the vector is made for (or read from) the collection the next op searches.
        target = searcher.target()
        collection = target.collection
        if config.id:
            vector = stored_vector(target.index, config.id)
            context.log.info(f"stored vector of {config.id!r} ({vector.shape[0]}-d) from collection {collection}")
        else:
            # Read once (a URL is fetched once): the bytes are embedded and shown as the query's thumbnail.
            image = read_image_input(config.image, settings.sources)
            vector = searcher.embed(image, target)
            model = target.embedder.model_version_label()
            thumbnail = thumbnail_uri(image, max_pixels=settings.preprocess.max_pixels)
            context.log.info(
                f"embedded {config.image} → {vector.shape[0]}-d vector with {model} for collection {collection}"
            )
    collapse = None
    if config.collapse:
        collapse = threshold_for(settings, settings.milvus.metric_type, config.collapse_threshold)
    return {
        "image": config.image or f"id {config.id}",
        "vector": vector.tolist(),
        "top_k": config.top_k,
        "offset": config.offset,
        "filter": config.filter,
        "min_score": config.min_score,
        "collapse": collapse,
        "exclude": config.id if config.id and not config.include_self else None,
        "collection": collection,
        "thumbnail": thumbnail,
    }


@op(ins={"query": In(dict)}, out=Out(list), description="Top-k nearest images in Milvus, with the filter applied.")
def search_collection(context: OpExecutionContext, query: dict[str, Any], milvus: MilvusResource) -> list:
    from embedding_pipeline.index.client import ImageIndex
    from embedding_pipeline.retrieval import ranked

    # The collection the query was embedded for, not the alias: a switch in between cannot mix models.
    with ImageIndex(milvus.settings().model_copy(update={"collection": query["collection"]})) as index:
        hits = ranked(
            index,
            query["vector"],
            query["top_k"],
            filter=query["filter"] or None,
            min_score=query.get("min_score"),
            offset=query.get("offset", 0),
            collapse=query.get("collapse"),
            exclude=query.get("exclude"),
        )
    return [{**h.as_dict(), "query": query["image"]} for h in hits]


@op(
    ins={"query": In(dict), "hits": In(list)},
    description="Report the hits as run metadata: the query's thumbnail and a table of rank, id, score, thumbnail "
    "and URI.",
)
def report_results(context: OpExecutionContext, query: dict, hits: list) -> None:
    from embedding_pipeline.defs import metadata as ui
    from embedding_pipeline.settings import load_settings

    for rank, h in enumerate(hits, 1):
        context.log.info(f"hit {rank}: id={h['id']} score={h['score']:.4f} uri={h['uri']}")
    table = ui.search_results(query["image"], query.get("thumbnail"), hits, ui.hit_thumbnails(load_settings(), hits))
    context.add_output_metadata(
        {
            "hits": MetadataValue.md(table),
            "top_hit": hits[0]["id"] if hits else "",
            "top_score": float(hits[0]["score"]) if hits else 0.0,
            "count": len(hits),
        }
    )


@job(
    description="Search the image collection by image or by an indexed item's id: the query vector → search Milvus "
    "(minimum score, offset, near-duplicates collapsed, as configured) → report the hits."
)
def search_images():
    query = embed_query()
    report_results(query, search_collection(query))
