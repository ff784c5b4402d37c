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
from embedding_pipeline.defs.resources import MilvusResource, TritonResource

# In-process: the four steps share one process, so JAX and the clients initialise once per run.
ingest_drop_job = define_asset_job(
    "ingest_drop",
    selection=AssetSelection.groups(GROUP),
    executor_def=in_process_executor,
    description="Ingest one drop (partition): manifest → tensor batches → embeddings → Milvus.",
)


class SearchQuery(Config):
    """A search request: an image (local path or http(s) URL), how many hits, and an optional Milvus filter."""

    image: str
    top_k: int = 10
    filter: str = ""


@op(out=Out(dict), description="Embed the query image through the same preprocessing and Triton model as ingest.")
def embed_query(context: OpExecutionContext, config: SearchQuery, triton: TritonResource) -> dict[str, Any]:
    from embedding_pipeline.retrieval import ImageSearcher
    from embedding_pipeline.settings import load_settings

    with triton.embedder() as embedder:
        vector = ImageSearcher(load_settings(), embedder=embedder).embed(config.image)
    context.log.info(f"embedded {config.image} → {vector.shape[0]}-d vector")
    return {"image": config.image, "vector": vector.tolist(), "top_k": config.top_k, "filter": config.filter}


@op(ins={"query": In(dict)}, out=Out(list), description="Top-k nearest images in Milvus, with the filter applied.")
def search_collection(context: OpExecutionContext, query: dict[str, Any], milvus: MilvusResource) -> list:
    with milvus.index() as index:
        hits = index.search([query["vector"]], top_k=query["top_k"], filter=query["filter"] or None)[0]
    return [{**h.as_dict(), "query": query["image"]} for h in hits]


@op(ins={"hits": In(list)}, description="Report the hits as run metadata: a table of id, score and URI.")
def report_results(context: OpExecutionContext, hits: list) -> None:
    lines = ["| rank | id | score | uri |", "|---|---|---|---|"]
    for rank, h in enumerate(hits, 1):
        lines.append(f"| {rank} | {h['id']} | {h['score']:.4f} | {h['uri']} |")
        context.log.info(f"hit {rank}: id={h['id']} score={h['score']:.4f} uri={h['uri']}")
    context.add_output_metadata(
        {
            "hits": MetadataValue.md("\n".join(lines)),
            "top_hit": hits[0]["id"] if hits else "",
            "top_score": float(hits[0]["score"]) if hits else 0.0,
            "count": len(hits),
        }
    )


@job(description="Search the image collection by image: embed the query → search Milvus → report the hits.")
def search_images():
    report_results(search_collection(embed_query()))
