"""embedding_pipeline: image drops → JAX preprocessing → Triton embeddings → Milvus, as a Dagster code location.

Importing the package is cheap; the Dagster definitions and heavy modules load on first use, so the kernels and
clients stay importable without Dagster, while ``dagster ... -m embedding_pipeline`` still finds the definitions
(as ``embedding_pipeline.definitions``, loaded from ``embedding_pipeline.defs``).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "search",
    "ImageSearcher",
    "ImageEmbeddingPipeline",
    "ServiceConfig",
    "Settings",
    "load_settings",
    "definitions",
]

_LAZY = {
    "search": ("embedding_pipeline.retrieval", "search"),
    "ImageSearcher": ("embedding_pipeline.retrieval", "ImageSearcher"),
    "ImageEmbeddingPipeline": ("embedding_pipeline.pipeline_api", "ImageEmbeddingPipeline"),
    "ServiceConfig": ("embedding_pipeline.settings", "ServiceConfig"),
    "Settings": ("embedding_pipeline.settings", "Settings"),
    "load_settings": ("embedding_pipeline.settings", "load_settings"),
    "definitions": ("embedding_pipeline.defs", "defs"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'embedding_pipeline' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
