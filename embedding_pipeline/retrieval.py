"""Search the collection by image: the same decode + kernels + Triton model as ingest, then Milvus top-k.

Usable without Dagster::

    from embedding_pipeline import search
    for hit in search("query.jpg", top_k=5, filter='metadata["category"] == "nature"'):
        print(hit["id"], hit["score"], hit["uri"])
"""

from __future__ import annotations

from typing import Any

import numpy as np

from embedding_pipeline.index.client import Hit, ImageIndex
from embedding_pipeline.preprocess.preprocessor import Preprocessor, for_model
from embedding_pipeline.settings import Settings, load_settings
from embedding_pipeline.sources.inputs import ImageInput, read_image_input

class ImageSearcher:
    """Holds a Triton client, a compiled preprocessor and a Milvus client; reuse it for many queries."""

    def __init__(self, settings: Settings | None = None, embedder=None, index: ImageIndex | None = None):
        from embedding_pipeline.serving.client import TritonEmbedder

        self.settings = settings or load_settings()
        t = self.settings.triton
        self.embedder = embedder or TritonEmbedder.from_settings(t)
        self._index = index
        self._preprocessor: Preprocessor | None = None

    @property
    def index(self) -> ImageIndex:
        # Created on first search, so embedding alone never needs Milvus.
        if self._index is None:
            self._index = ImageIndex(self.settings.milvus)
        return self._index

    @property
    def preprocessor(self) -> Preprocessor:
        if self._preprocessor is None:
            model_input = self.embedder.input_spec()
            self._preprocessor = for_model(self.settings, model_input.datatype, model_input.shape, batch_size=1)
        return self._preprocessor

    def embed(self, image: ImageInput) -> np.ndarray:
        prepared = self.preprocessor.prepare([read_image_input(image, self.settings.sources)])
        if prepared.errors[0] is not None:
            raise ValueError(f"query image: {prepared.errors[0]}")
        return self.embedder.embed(prepared.tensors)[0]

    def search(
        self,
        image: ImageInput,
        top_k: int = 10,
        filter: str | None = None,
        search_params: dict[str, Any] | None = None,
    ) -> list[Hit]:
        """``search_params`` overrides the configured index search parameters for this query (e.g. ``{"ef": 128}``
        for HNSW, ``{"nprobe": 32}`` for IVF_FLAT)."""
        return self.index.search(self.embed(image), top_k=top_k, filter=filter, search_params=search_params)[0]

    def close(self) -> None:
        self.embedder.close()
        if self._index is not None:
            self._index.close()

    def __enter__(self) -> "ImageSearcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def search(
    image: ImageInput,
    top_k: int = 10,
    filter: str | None = None,
    settings: Settings | None = None,
    search_params: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Top-k most similar indexed images: dicts with id, score, uri, drop, sha256, model and metadata."""
    with ImageSearcher(settings) as searcher:
        hits = searcher.search(image, top_k=top_k, filter=filter, search_params=search_params)
        return [hit.as_dict() for hit in hits]
