"""Dagster resources over the plain Triton and Milvus clients; clients are created lazily, per use.

A field left empty takes its value from the pipeline settings (YAML file + environment) when the resource is used,
not when the code location loads, so runs follow the environment they run in. Set a field (launchpad or
Definitions) to override one value.
"""

from typing import Any, Optional, TypeVar

from dagster import ConfigurableResource
from pydantic import BaseModel

from embedding_pipeline.index.client import ImageIndex
from embedding_pipeline.settings import MilvusSettings, TritonSettings, load_settings

S = TypeVar("S", bound=BaseModel)


def _overlay(base: S, resource: ConfigurableResource) -> S:
    overrides = {name: getattr(resource, name) for name in type(base).model_fields if getattr(resource, name, None)
                 is not None}
    return type(base).model_validate({**base.model_dump(), **overrides})


class TritonResource(ConfigurableResource):
    """The model server that turns tensors into embeddings (NVIDIA Triton, HTTP or gRPC)."""

    url: Optional[str] = None
    model_name: Optional[str] = None
    model_version: Optional[str] = None
    timeout_s: Optional[float] = None
    ready_timeout_s: Optional[float] = None
    protocol: Optional[str] = None
    concurrency: Optional[int] = None
    retries: Optional[int] = None
    retry_backoff_s: Optional[float] = None
    shared_memory: Optional[str] = None

    def settings(self) -> TritonSettings:
        return _overlay(load_settings().triton, self)

    def embedder(self):
        """A new client, ready to use, with ``concurrency`` requests in flight; the caller closes it."""
        from embedding_pipeline.serving.client import TritonEmbedder

        s = self.settings()
        client = TritonEmbedder.from_settings(s)
        try:
            client.wait_ready(s.ready_timeout_s)
        except Exception:
            client.close()
            raise
        return client


class MilvusResource(ConfigurableResource):
    """The vector database holding one row per image (Milvus, by URI)."""

    uri: Optional[str] = None
    token: Optional[str] = None
    db_name: Optional[str] = None
    collection: Optional[str] = None
    embedding_dim: Optional[int] = None
    index_type: Optional[str] = None
    metric_type: Optional[str] = None
    index_params: Optional[dict[str, Any]] = None
    search_params: Optional[dict[str, Any]] = None
    insert_batch_size: Optional[int] = None
    user: Optional[str] = None
    password: Optional[str] = None
    secure: Optional[bool] = None
    ca_pem_path: Optional[str] = None
    server_name: Optional[str] = None
    consistency_level: Optional[str] = None
    filter_fields: Optional[dict[str, str]] = None

    def settings(self) -> MilvusSettings:
        return _overlay(load_settings().milvus, self)

    def index(self) -> ImageIndex:
        """A new client for the collection; the caller closes it."""
        return ImageIndex(self.settings())
