"""A collection name as callers give it (the HTTP API's and the Python API's ``collection_name``).

A name is an alias over one collection per model (:mod:`embedding_pipeline.index.collections`). Here: the rule a
name must follow, the settings of a name following the vector index its collection already has, and the Milvus
resource config of an ingest run that writes the name.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from embedding_pipeline.settings import MilvusSettings

# Milvus collection (and alias) names: letters, digits and '_', not starting with a digit. Per-model collections
# append "__<model>" to it, so leave room for that under Milvus's 255.
COLLECTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


def check_collection_name(name: Optional[str]) -> Optional[str]:
    """``name`` unchanged; ValueError unless it is None or a valid collection name."""
    if name is not None and (not isinstance(name, str) or not COLLECTION_NAME.fullmatch(name)):
        raise ValueError(
            "a collection name uses letters, digits and '_', does not start with a digit, and has at most 128 "
            "characters"
        )
    return name


def collection_settings(base: MilvusSettings, name: str, index_info: dict[str, Any] | None) -> MilvusSettings:
    """``base`` for collection ``name``, with the index type and metric of its existing vector index
    (``describe_index``) where known, so searches and ingest runs agree with the collection as it is."""
    update: dict[str, Any] = {"collection": name}
    if index_info:
        if index_info.get("index_type") in ("FLAT", "IVF_FLAT", "HNSW"):
            update["index_type"] = index_info["index_type"]
            if update["index_type"] != base.index_type:
                # The configured parameters are for another index type: the type's defaults apply. (An existing
                # collection's build parameters are never used again: its index is built once, at creation.)
                update["index_params"] = {}
                update["search_params"] = {}
        if index_info.get("metric_type") in ("COSINE", "IP", "L2"):
            update["metric_type"] = index_info["metric_type"]
    return MilvusSettings.model_validate({**base.model_dump(exclude_unset=True), **update})


def ingest_milvus_config(base: MilvusSettings, name: str) -> dict[str, Any]:
    """The Milvus resource config of an ingest run writing collection name ``name``: the name, and the index type
    and metric of the collection it already has (none yet: the run creates it with the configured index). Raises
    what the Milvus client raises when the server cannot be read."""
    from embedding_pipeline.index.collections import ModelCollections

    config: dict[str, Any] = {"collection": name}
    if name == base.collection:
        return config
    with ModelCollections(base.model_copy(update={"collection": name})) as collections:
        target = collections.search_collection()
        if target is None:
            return config
        with collections.index(target) as index, index.guard("describing the index"):
            info = index.describe_index()
    milvus = collection_settings(base, name, info)
    config.update(index_type=milvus.index_type, metric_type=milvus.metric_type)
    if milvus.index_type != base.index_type:
        config.update(index_params={}, search_params={})
    return config
