"""Asset checks, per drop: are the drop's embeddings sound, and does the collection hold them as configured?

The embeddings checks are blocking: one failing (severity ERROR) fails its step, so `milvus_collection` of the same
run never starts and damaged vectors never reach the index. The collection checks run after `milvus_collection` and
are not blocking: nothing is downstream of it for them to hold back, and a failure shows on the asset in the UI.

The logic lives in `embedding_pipeline.quality`; these functions only gather inputs and report outcomes.
"""

import warnings
from typing import Any, Iterable, Iterator

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetKey,
    MetadataValue,
    PreviewWarning,
    multi_asset_check,
)

from embedding_pipeline import ingest, quality
from embedding_pipeline.defs.assets import image_embeddings, milvus_collection
from embedding_pipeline.defs.partitions import drops_partitions
from embedding_pipeline.defs.resources import MilvusResource, TritonResource, step_settings
from embedding_pipeline.index.client import ImageIndex
from embedding_pipeline.index.collections import index_for_drop
from embedding_pipeline.settings import Settings
from embedding_pipeline.storage import layout

EMBEDDING_CHECKS = {
    "embeddings_match_ok_items": "One embedding per item that passed the manifest and preprocessing.",
    "dimension_matches_model": "Every vector has the served model's output dimension and comes from that model.",
    "vectors_are_finite": "No vector holds NaN or infinite values.",
    "vectors_are_normalised": "Every vector has L2 norm 1 (within quality.norm_tolerance); with quality.unit_norm "
    "off, no vector is all zeros.",
}
COLLECTION_CHECKS = {
    "rows_match_embeddings": "The drop's row count (and ids) in Milvus equal its embeddings.",
    "index_as_configured": "The collection's vector index has the configured type, metric and build parameters.",
    "self_retrieval": f"Up to {quality.SELF_RETRIEVAL_SAMPLE} of the drop's stored vectors each find their own id "
    "at rank 1 when searched in the collection.",
}


def _specs(asset: AssetKey, checks: dict[str, str], blocking: bool) -> list[AssetCheckSpec]:
    # Partitioned check specs are a preview feature of Dagster 1.13; they are what makes each check run and record
    # its result per drop, so the warning is expected here and not repeated on every load.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PreviewWarning)
        return [
            AssetCheckSpec(name, asset=asset, description=text, blocking=blocking, partitions_def=drops_partitions)
            for name, text in checks.items()
        ]


def _metadata_value(value: Any) -> Any:
    return MetadataValue.json(value) if isinstance(value, (dict, list)) else value


def _results(
    context: AssetCheckExecutionContext, asset: AssetKey, outcomes: Iterable[quality.Outcome]
) -> Iterator[AssetCheckResult]:
    """Check results for the outcomes that were selected (the UI can run a single check of a group)."""
    selected = {key.name for key in context.selected_asset_check_keys}
    for outcome in outcomes:
        if outcome.check not in selected:
            continue
        if not outcome.passed:
            context.log.error(f"{asset.to_user_string()} {outcome.check}: {outcome.description}")
        yield AssetCheckResult(
            asset_key=asset,
            check_name=outcome.check,
            passed=outcome.passed,
            severity=AssetCheckSeverity.ERROR,
            description=outcome.description,
            metadata={"summary": outcome.description, **{k: _metadata_value(v) for k, v in outcome.metadata.items()}},
        )


@multi_asset_check(
    specs=_specs(image_embeddings.key, EMBEDDING_CHECKS, blocking=True),
    name="image_embeddings_checks",
    description="Checks the drop's embeddings before they are indexed: one per ok item, the model's dimension, "
    "finite values, unit norm. Blocking: a failure keeps `milvus_collection` from running.",
    can_subset=True,
)
def image_embeddings_checks(context: AssetCheckExecutionContext, triton: TritonResource):
    settings = step_settings(triton)
    drop = context.partition_key
    tolerance = settings.quality.norm_tolerance
    # One pass over the drop's vectors serves all four checks.
    stats = quality.embedding_stats(layout.drop_files(settings, drop).embeddings, tolerance)
    expected_ids = quality.ok_item_ids(ingest.item_report(settings, drop))
    with triton.embedder(settings) as embedder:
        model_dimension = embedder.input_spec().output_dim
        served_model = embedder.model_version_label()
    outcomes = quality.embedding_outcomes(
        stats,
        expected_ids,
        model_dimension,
        served_model,
        settings.milvus.embedding_dim,
        tolerance,
        settings.quality.unit_norm,
    )
    yield from _results(context, image_embeddings.key, outcomes)


def _collection_for_drop(settings: Settings, drop: str) -> ImageIndex:
    """The Milvus collection that holds ``drop``'s rows (the one `milvus_collection` wrote them to); the caller
    closes it. ``drop``'s embeddings, whose ``model`` column tells the model, name it."""
    return index_for_drop(settings, settings.milvus, drop)


@multi_asset_check(
    specs=_specs(milvus_collection.key, COLLECTION_CHECKS, blocking=False),
    name="milvus_collection_checks",
    description="Checks the drop's rows in Milvus after indexing: one row per embedding, the configured vector "
    "index, and stored vectors that find themselves.",
    can_subset=True,
)
def milvus_collection_checks(context: AssetCheckExecutionContext, milvus: MilvusResource):
    settings = step_settings(milvus=milvus)
    drop = context.partition_key
    # Ids held by another drop's image are reported per item (id_conflict) and are not this drop's rows.
    conflicts = ingest.index_conflicts(settings, drop)
    embedding_ids = [
        i for i in quality.embedding_ids(layout.drop_files(settings, drop).embeddings) if i not in conflicts
    ]
    with _collection_for_drop(settings, drop) as index:
        outcomes = quality.collection_outcomes(index, drop, embedding_ids)
    yield from _results(context, milvus_collection.key, outcomes)


quality_checks = [image_embeddings_checks, milvus_collection_checks]
