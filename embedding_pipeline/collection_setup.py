"""Creating a collection name: the per-model collection of the model Triton serves now, behind the name as alias.

The same layout as ingest (:mod:`embedding_pipeline.index.collections`): the name is an alias over one collection
per model, so a later insert into the name writes exactly the collection created here, and search follows it.
The HTTP API's ``POST /collections/create`` and the Python API's ``create_collection`` both call
:func:`create_collection`; each turns its errors into its own shape.
"""

from __future__ import annotations

from typing import Any

from embedding_pipeline.index.client import CollectionError
from embedding_pipeline.settings import ConfigError, MilvusSettings, Settings


class DimensionMismatch(ValueError):
    """The dimension asked for is not the one the served model produces."""

    def __init__(self, dim: int, model_dim: int, model: str):
        self.dim, self.model_dim, self.model = dim, model_dim, model
        super().__init__(
            f"dim {dim} does not match the served model {model}, which produces {model_dim}-d vectors "
            "(leave dim out to use the model's)"
        )

    @property
    def details(self) -> dict[str, Any]:
        return {"dim": self.dim, "model_dim": self.model_dim, "model": self.model}


class InvalidIndexParams(ValueError):
    """The index type, metric or build parameters asked for do not fit together."""


class CollectionConflict(CollectionError):
    """The name exists with another shape (index, metric, model or a plain collection)."""


def served_model(embedder: Any) -> tuple[str, int]:
    """(label, output dimension) of the model ``embedder`` (a TritonEmbedder) serves now."""
    return embedder.model_version_label(), embedder.input_spec().output_dim


def collection_milvus(
    base: MilvusSettings,
    name: str,
    index_type: str | None = None,
    metric_type: str | None = None,
    index_params: dict[str, Any] | None = None,
) -> MilvusSettings:
    """``base`` for collection name ``name`` with the index asked for; :class:`InvalidIndexParams` when it does
    not fit together."""
    update: dict[str, Any] = {"collection": name}
    if index_type is not None:
        update["index_type"] = index_type
        if index_type != base.index_type:
            update["index_params"], update["search_params"] = {}, {}  # the configured ones are another type's
    if metric_type is not None:
        update["metric_type"] = metric_type
    if index_params is not None:
        update["index_params"] = index_params
    try:
        milvus = MilvusSettings.model_validate({**base.model_dump(exclude_unset=True), **update})
        from embedding_pipeline.index import params

        params.check_settings(milvus)
    except (ConfigError, ValueError) as exc:
        raise InvalidIndexParams(str(exc)) from None
    return milvus


def create_collection(
    settings: Settings,
    name: str,
    model: tuple[str, int],
    dim: int | None = None,
    description: str = "",
    index_type: str | None = None,
    metric_type: str | None = None,
    index_params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Create collection name ``name`` for ``model`` (label, dimension: :func:`served_model`), or find it already
    there with the same shape (``"created": False``). What ``index_type`` and ``metric_type`` leave open is what
    an existing collection has.

    Raises :class:`DimensionMismatch` (``dim`` is not the model's), :class:`InvalidIndexParams`,
    :class:`CollectionConflict` (the name exists with another shape) or :class:`CollectionError` (Milvus cannot
    be reached or refuses).
    """
    from embedding_pipeline.index.collections import ModelCollections, model_collection_name

    label, model_dim = model
    if dim is not None and dim != model_dim:
        raise DimensionMismatch(dim, model_dim, label)
    target = model_collection_name(name, label)
    with ModelCollections(settings.milvus.model_copy(update={"collection": name})) as probe:
        search = probe.search_collection()
        existing = search if search == name else (target if target in probe.names() else None)
        if existing is not None:
            with probe.index(existing) as index, index.guard("describing the index"):
                found = index.describe_index()
            # What the caller leaves open is what the collection has: asking again is not a conflict.
            index_type = index_type or found.get("index_type")
            metric_type = metric_type or found.get("metric_type")
    milvus = collection_milvus(settings.milvus, name, index_type, metric_type, index_params)
    try:
        with ModelCollections(milvus) as collections:
            index, placement = collections.index_for_model(label, model_dim)
            with index:
                info = index.describe_index()
    except CollectionError as exc:
        text = str(exc)
        if any(sign in text for sign in ("holds", "index but the settings ask", "made for model", "plain collection")):
            raise CollectionConflict(f"collection {name!r} exists with another shape: {text}") from None
        raise
    return {
        "name": name,
        "dim": model_dim,
        "index_type": info.get("index_type") or milvus.index_type,
        "metric_type": info.get("metric_type") or milvus.metric_type,
        "created": existing is None,
        "description": description,
        "collection": placement.collection,
        "model": label,
    }
