"""Creating a collection name: the per-model collection of the model Triton serves now, behind the name as alias.

The same layout as ingest (:mod:`embedding_pipeline.index.collections`): the name is an alias over one collection
per model, so a later insert into the name writes exactly the collection created here, and search follows it.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from embedding_pipeline.api.errors import ApiError, invalid
from embedding_pipeline.api.models import CreateCollectionRequest
from embedding_pipeline.index.client import CollectionError
from embedding_pipeline.settings import ConfigError, MilvusSettings, Settings

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
            return embedder.model_version_label(), embedder.input_spec().output_dim
        except Exception as exc:  # noqa: BLE001 - any Triton failure: the model cannot be asked
            raise ApiError(503, "unavailable", f"cannot read the served model from Triton: {exc}") from exc

    def _milvus(self, request: CreateCollectionRequest) -> MilvusSettings:
        base = self.settings.milvus
        update: dict[str, Any] = {"collection": request.name}
        if request.index_type is not None:
            update["index_type"] = request.index_type
            if request.index_type != base.index_type:
                update["index_params"], update["search_params"] = {}, {}  # the configured ones are another type's
        if request.metric_type is not None:
            update["metric_type"] = request.metric_type
        if request.index_params is not None:
            update["index_params"] = request.index_params
        try:
            milvus = MilvusSettings.model_validate({**base.model_dump(exclude_unset=True), **update})
            from embedding_pipeline.index import params

            params.check_settings(milvus)
        except (ConfigError, ValueError) as exc:
            raise invalid("invalid_index_params", str(exc)) from None
        return milvus

    def create(self, request: CreateCollectionRequest) -> dict[str, Any]:
        from embedding_pipeline.index.collections import ModelCollections, model_collection_name

        label, model_dim = self.served_model()
        if request.dim is not None and request.dim != model_dim:
            raise invalid(
                "dimension_mismatch",
                f"dim {request.dim} does not match the served model {label}, which produces {model_dim}-d vectors "
                "(leave dim out to use the model's)",
                {"dim": request.dim, "model_dim": model_dim, "model": label},
            )
        target = model_collection_name(request.name, label)
        try:
            with ModelCollections(self.settings.milvus.model_copy(update={"collection": request.name})) as probe:
                search = probe.search_collection()
                existing = search if search == request.name else (target if target in probe.names() else None)
                if existing is not None:
                    with probe.index(existing) as index, index.guard("describing the index"):
                        found = index.describe_index()
                    # What the request leaves open is what the collection has: asking again is not a conflict.
                    request = request.model_copy(
                        update={
                            "index_type": request.index_type or found.get("index_type"),
                            "metric_type": request.metric_type or found.get("metric_type"),
                        }
                    )
        except CollectionError as exc:
            raise ApiError(503, "unavailable", str(exc)) from None
        milvus = self._milvus(request)
        try:
            with ModelCollections(milvus) as collections:
                index, placement = collections.index_for_model(label, model_dim)
                with index:
                    info = index.describe_index()
        except CollectionError as exc:
            text = str(exc)
            if (
                "holds" in text
                or "index but the settings ask" in text
                or "made for model" in text
                or "plain collection" in text
            ):
                raise ApiError(
                    409, "conflict", f"collection {request.name!r} exists with another shape: {text}"
                ) from None
            raise ApiError(503, "unavailable", text) from None
        return {
            "name": request.name,
            "dim": model_dim,
            "index_type": info.get("index_type") or milvus.index_type,
            "metric_type": info.get("metric_type") or milvus.metric_type,
            "created": existing is None,
            "description": request.description,
            "collection": placement.collection,
            "model": label,
        }

    def close(self) -> None:
        with self._lock:
            if self._embedder is not None:
                self._embedder.close()
                self._embedder = None
