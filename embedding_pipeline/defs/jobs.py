"""Jobs: ingest one drop (the asset chain), and search the collection by image (ops)."""

from typing import Any

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
    op,
)

from embedding_pipeline.defs.assets import GROUP
from embedding_pipeline.defs.resources import MilvusResource, TritonResource, step_settings
from embedding_pipeline.orchestration.names import INGEST_JOB

# In-process: the four steps share one process, so JAX and the clients initialise once per run.
ingest_drop_job = define_asset_job(
    INGEST_JOB,
    selection=AssetSelection.groups(GROUP),
    executor_def=in_process_executor,
    description="Ingest one drop (partition): manifest → tensor batches → embeddings → Milvus.",
)


class SearchQuery(Config):
    """A search request: an image (local path or http(s) URL), how many hits, and an optional Milvus filter."""

    image: str
    top_k: int = 10
    filter: str = ""


@op(
    out=Out(dict),
    description="Embed the query image through the same preprocessing as ingest and the Triton model "
    "that built the collection search uses (the alias `milvus.collection` resolved).",
)
def embed_query(
    context: OpExecutionContext, config: SearchQuery, triton: TritonResource, milvus: MilvusResource
) -> dict[str, Any]:
    from embedding_pipeline.retrieval import ImageSearcher
    from embedding_pipeline.sources.inputs import read_image_input
    from embedding_pipeline.thumbnails import thumbnail_uri

    settings = step_settings(triton, milvus)
    # Read once (a URL is fetched once): the bytes are embedded and shown as the query's thumbnail.
    image = read_image_input(config.image, settings.sources)
    with ImageSearcher(settings) as searcher:
        vector = searcher.embed(image)
        collection = searcher.collection
        model = searcher.embedder.model_version_label()
    context.log.info(f"embedded {config.image} → {vector.shape[0]}-d vector with {model} for collection {collection}")
    return {
        "image": config.image,
        "vector": vector.tolist(),
        "top_k": config.top_k,
        "filter": config.filter,
        "collection": collection,
        "thumbnail": thumbnail_uri(image, max_pixels=settings.preprocess.max_pixels),
    }


@op(ins={"query": In(dict)}, out=Out(list), description="Top-k nearest images in Milvus, with the filter applied.")
def search_collection(context: OpExecutionContext, query: dict[str, Any], milvus: MilvusResource) -> list:
    from embedding_pipeline.index.client import ImageIndex

    # The collection the query was embedded for, not the alias: a switch in between cannot mix models.
    with ImageIndex(milvus.settings().model_copy(update={"collection": query["collection"]})) as index:
        hits = index.search([query["vector"]], top_k=query["top_k"], filter=query["filter"] or None)[0]
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


@job(description="Search the image collection by image: embed the query → search Milvus → report the hits.")
def search_images():
    query = embed_query()
    report_results(query, search_collection(query))
