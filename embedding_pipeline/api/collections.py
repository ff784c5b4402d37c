"""Creating a collection name over HTTP: :func:`embedding_pipeline.collection_setup.create_collection` (shared with
the Python API) with the served model read through a kept Triton client, and its errors in the API's shape."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from embedding_pipeline import collection_setup
from embedding_pipeline.api.errors import ApiError, invalid
from embedding_pipeline.api.models import CreateCollectionRequest
from embedding_pipeline.index.client import CollectionError
from embedding_pipeline.settings import MilvusSettings, Settings

if TYPE_CHECKING:
    from embedding_pipeline.serving.client import TritonEmbedder


class CollectionService:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._embedder: TritonEmbedder | None = None
        self._lock = threading.Lock()

    def served_model(self) -> tuple[str, int]:
        """(label, output dimension) of the model Triton serves now."""
        from embedding_pipeline.serving.client import TritonEmbedder

        with self._lock:
            if self._embedder is None:
                self._embedder = TritonEmbedder.from_settings(self.settings.triton)
            embedder = self._embedder
        try:
            return collection_setup.served_model(embedder)
        except Exception as exc:  # noqa: BLE001 - any Triton failure: the model cannot be asked
            raise ApiError(503, "unavailable", f"cannot read the served model from Triton: {exc}") from exc

    def _milvus(self, request: CreateCollectionRequest) -> MilvusSettings:
        try:
            return collection_setup.collection_milvus(
                self.settings.milvus, request.name, request.index_type, request.metric_type, request.index_params
            )
        except collection_setup.InvalidIndexParams as exc:
            raise invalid("invalid_index_params", str(exc)) from None

    def create(self, request: CreateCollectionRequest) -> dict[str, Any]:
        model = self.served_model()
        try:
            return collection_setup.create_collection(
                self.settings,
                request.name,
                model,
                dim=request.dim,
                description=request.description,
                index_type=request.index_type,
                metric_type=request.metric_type,
                index_params=request.index_params,
            )
        except collection_setup.DimensionMismatch as exc:
            raise invalid("dimension_mismatch", str(exc), exc.details) from None
        except collection_setup.InvalidIndexParams as exc:
            raise invalid("invalid_index_params", str(exc)) from None
        except collection_setup.CollectionConflict as exc:
            raise ApiError(409, "conflict", str(exc)) from None
        except CollectionError as exc:
            raise ApiError(503, "unavailable", str(exc)) from None

    def close(self) -> None:
        with self._lock:
            if self._embedder is not None:
                self._embedder.close()
                self._embedder = None
