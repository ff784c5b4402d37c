"""Dagster resources over the plain Triton and Milvus clients; clients are created lazily, per use.

The resources' fields are derived from the settings model (:class:`~embedding_pipeline.settings.TritonSettings`,
:class:`~embedding_pipeline.settings.MilvusSettings`): same names, same descriptions, every one optional. A field
left empty takes its value from the pipeline settings (YAML file + environment) of the process that runs the step,
not of the process that loads the code location, so runs follow the environment they run in. Set a field
(launchpad or Definitions) to override one value for a run.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any, Literal, Optional, TypeVar, Union, get_args, get_origin

from dagster import ConfigurableResource
from pydantic import BaseModel, Field, create_model

from embedding_pipeline.index.client import ImageIndex
from embedding_pipeline.retrieval import ImageSearcher
from embedding_pipeline.serving.client import TritonEmbedder
from embedding_pipeline.settings import MilvusSettings, Settings, TritonSettings, load_settings

S = TypeVar("S", bound=BaseModel)

# The Triton settings a run may override: the client's. Where the bundled server listens and which model file it
# serves are the server's settings, fixed when it starts.
TRITON_RUN_FIELDS = (
    "url",
    "model_name",
    "model_version",
    "timeout_s",
    "ready_timeout_s",
    "protocol",
    "concurrency",
    "retries",
    "retry_backoff_s",
    "shared_memory",
)


def _config_type(annotation: Any) -> Any:
    """The Dagster config type of a settings field: literals as strings (the settings model checks the value),
    dicts as dicts of any value, ``X | None`` as ``X``."""
    origin = get_origin(annotation)
    if origin is Literal:
        return str
    if origin in (Union, types.UnionType):
        return _config_type(next(a for a in get_args(annotation) if a is not type(None)))
    if origin is dict:
        return dict[str, Any]
    return annotation


def _overridable(model: type[BaseModel], names: tuple[str, ...] | None = None) -> dict[str, Any]:
    fields = model.model_fields
    return {
        name: (Optional[_config_type(fields[name].annotation)], Field(None, description=fields[name].description))
        for name in (names or tuple(fields))
    }


def _overlay(base: S, resource: ConfigurableResource) -> S:
    overrides = {
        name: getattr(resource, name) for name in type(base).model_fields if getattr(resource, name, None) is not None
    }
    return type(base).model_validate({**base.model_dump(), **overrides})


class _TritonResource(ConfigurableResource):
    """The model server that turns tensors into embeddings (NVIDIA Triton, HTTP or gRPC)."""

    def settings(self, base: Settings | None = None) -> TritonSettings:
        """The Triton settings of this run: ``base`` (default: loaded now) with this resource's fields on top."""
        return _overlay((base or load_settings()).triton, self)

    def embedder(self, base: Settings | None = None) -> TritonEmbedder:
        """A new client, ready to use, with ``concurrency`` requests in flight; the caller closes it."""
        s = self.settings(base)
        client = TritonEmbedder.from_settings(s)
        try:
            client.wait_ready(s.ready_timeout_s)
        except Exception:
            client.close()
            raise
        return client


class _MilvusResource(ConfigurableResource):
    """The vector database holding one row per image (Milvus, by URI)."""

    def settings(self, base: Settings | None = None) -> MilvusSettings:
        """The Milvus settings of this run: ``base`` (default: loaded now) with this resource's fields on top."""
        return _overlay((base or load_settings()).milvus, self)

    def index(self, base: Settings | None = None) -> ImageIndex:
        """A new client for the collection; the caller closes it."""
        return ImageIndex(self.settings(base))

    def searcher(self, triton: _TritonResource | None = None) -> ImageSearcher:
        """A searcher over this resource's collection and ``triton``'s server, for ad hoc search outside any run
        (a notebook); the caller closes it::

            from embedding_pipeline.defs import defs
            with defs.resources["milvus"].searcher(defs.resources["triton"]) as searcher:
                hits = searcher.search("query.jpg", top_k=5)
        """
        return ImageSearcher(step_settings(triton, self))


if TYPE_CHECKING:
    # The fields exist at run time only (derived below); for the type checker the classes are their behaviour.
    class TritonResource(_TritonResource): ...

    class MilvusResource(_MilvusResource): ...

else:
    TritonResource = create_model(
        "TritonResource",
        __base__=_TritonResource,
        __module__=__name__,
        **_overridable(TritonSettings, TRITON_RUN_FIELDS),
    )
    MilvusResource = create_model(
        "MilvusResource", __base__=_MilvusResource, __module__=__name__, **_overridable(MilvusSettings)
    )


def step_settings(triton: _TritonResource | None = None, milvus: _MilvusResource | None = None) -> Settings:
    """The settings of one step, loaded once, with the run's resource overrides applied: what the step passes to
    the plain functions it calls."""
    settings = load_settings()
    update: dict[str, Any] = {}
    if triton is not None:
        update["triton"] = triton.settings(settings)
    if milvus is not None:
        update["milvus"] = milvus.settings(settings)
    return settings.model_copy(update=update) if update else settings
