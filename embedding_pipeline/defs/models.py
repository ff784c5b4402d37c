"""Model versions in Dagster: the served model as an observable source, re-embedding every drop as a backfill,
and the switch of search to the new model's collection.

* ``embedding_model`` observes the label of the model Triton serves (``<name>:<version>@<sha12 of the file>``) and
  uses it as its data version; ``image_embeddings`` depends on it, so after a model change (and an observation:
  *Observe sources* in the UI, or ``embedding-pipeline reembed``) every embedded drop shows as stale.
* Re-embedding is a backfill of the ``ingest_drop`` job over all ``drops`` partitions, executed by the daemon
  (``Materialize all`` / *Launch backfill* in the UI, or
  :func:`embedding_pipeline.orchestration.backfill.launch_reembed_backfill`). Each run writes its drop
  into the new model's collection; search stays on the old one meanwhile.
* ``switch_search_collection`` moves the search alias to the new model's collection once it holds every drop.
"""

from typing import Any

from dagster import (
    AssetSelection,
    Config,
    DataVersion,
    MetadataValue,
    OpExecutionContext,
    define_asset_job,
    job,
    observable_source_asset,
    op,
)

from embedding_pipeline.defs.resources import MilvusResource, TritonResource, step_settings
from embedding_pipeline.orchestration.names import DROPS_PARTITION, OBSERVE_MODEL_JOB, SWITCH_JOB

MODEL_GROUP = "models"


@observable_source_asset(
    group_name=MODEL_GROUP,
    description="The embedding model Triton serves under `triton.model_name`. Its data version is the model's "
    "label (`<name>:<version>@<sha12 of the ONNX file>`): when the model changes, every embedded drop becomes "
    "stale. Observe it after changing the model (or run `embedding-pipeline reembed`, which observes it first).",
    tags={"stage": "model"},
)
def embedding_model(triton: TritonResource) -> DataVersion:
    with triton.embedder() as embedder:
        return DataVersion(embedder.model_version_label())


observe_embedding_model = define_asset_job(
    OBSERVE_MODEL_JOB,
    selection=AssetSelection.assets(embedding_model.key),
    description="Record the label of the model Triton serves now (the data version of `embedding_model`).",
)


class SwitchConfig(Config):
    """Which collection search should use: a collection name or a model label; empty means the collection of the
    model Triton serves now. ``force`` switches even if drops are missing from it."""

    target: str = ""
    force: bool = False


@op(
    description="Point the search alias at the chosen model's collection (one atomic alter_alias), after checking "
    "that it holds every drop: each drop's rows equal its embeddings for that model. Refuses, listing the "
    "missing drops, unless forced."
)
def switch_collection(
    context: OpExecutionContext, config: SwitchConfig, triton: TritonResource, milvus: MilvusResource
) -> None:
    from embedding_pipeline.index.collections import ModelCollections, embedded_counts, model_collection_name

    settings = step_settings(triton, milvus)
    drops = context.instance.get_dynamic_partitions(DROPS_PARTITION)
    with ModelCollections(settings.milvus) as collections:
        if config.target:
            collection = collections.resolve_target(config.target)
        else:
            with triton.embedder(settings) as embedder:
                label = embedder.model_version_label()
            collection = model_collection_name(collections.alias, label)
        label = collections.model_of(collection) if collection in collections.names() else label
        result = collections.switch(collection, embedded_counts(settings.outputs, drops, label), config.force)
    context.log.info(f"search alias {result['alias']!r}: {result['from']} -> {result['to']} (model {label})")
    context.add_output_metadata({key: _value(value) for key, value in result.items()})


def _value(value: Any) -> Any:
    if value is None:
        return ""
    return MetadataValue.json(value) if isinstance(value, (list, dict)) else value


@job(
    name=SWITCH_JOB,
    description="Switch search to another model's collection (by default: the model Triton serves now) once it "
    "holds every drop. Re-embed all drops first (a backfill of ingest_drop over all partitions).",
)
def switch_search_collection():
    switch_collection()


model_assets = [embedding_model]
