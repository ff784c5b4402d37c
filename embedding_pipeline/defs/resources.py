"""Dagster resources over the plain Triton and Milvus clients; clients are created lazily, per use."""


from typing import Any

from dagster import ConfigurableResource

from embedding_pipeline.index.client import ImageIndex
from embedding_pipeline.settings import MilvusSettings, TritonSettings


class TritonResource(ConfigurableResource):
    """The model server that turns tensors into embeddings (NVIDIA Triton, HTTP)."""

    url: str
    model_name: str
    model_version: str = ""
    timeout_s: float = 60.0
    ready_timeout_s: float = 60.0

    @classmethod
    def from_settings(cls, s: TritonSettings) -> "TritonResource":
        return cls(url=s.url, model_name=s.model_name, model_version=s.model_version, timeout_s=s.timeout_s,
                   ready_timeout_s=s.ready_timeout_s)

    def embedder(self):
        """A new client, ready to use; the caller closes it (clients are not thread-safe, so don't share)."""
        from embedding_pipeline.serving.client import TritonEmbedder

        client = TritonEmbedder(self.url, self.model_name, self.model_version, self.timeout_s)
        client.wait_ready(self.ready_timeout_s)
        return client

    def settings(self) -> TritonSettings:
        return TritonSettings(url=self.url, model_name=self.model_name, model_version=self.model_version,
                              timeout_s=self.timeout_s, ready_timeout_s=self.ready_timeout_s)


class MilvusResource(ConfigurableResource):
    """The vector database holding one row per image (Milvus, by URI)."""

    uri: str
    token: str = ""
    db_name: str = ""
    collection: str = "image_embeddings"
    embedding_dim: int | None = None
    index_type: str = "HNSW"
    metric_type: str = "COSINE"
    index_params: dict[str, Any] = {}
    search_params: dict[str, Any] = {}
    insert_batch_size: int = 1000

    @classmethod
    def from_settings(cls, s: MilvusSettings) -> "MilvusResource":
        return cls(**s.model_dump())

    def settings(self) -> MilvusSettings:
        return MilvusSettings(**{name: getattr(self, name) for name in MilvusSettings.model_fields})

    def index(self) -> ImageIndex:
        """A new client for the collection; the caller closes it."""
        return ImageIndex(self.settings())

