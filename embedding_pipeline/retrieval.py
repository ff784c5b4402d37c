"""Search the collection by image: the same decode + kernels + Triton model as ingest, then Milvus top-k.

Usable without Dagster::

    from embedding_pipeline import search
    for hit in search("query.jpg", top_k=5, filter='metadata["category"] == "nature"'):
        print(hit["id"], hit["score"], hit["uri"])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from embedding_pipeline.index.client import CollectionError, Hit, ImageIndex
from embedding_pipeline.preprocess.preprocessor import Preprocessor, for_model
from embedding_pipeline.settings import Settings, load_settings
from embedding_pipeline.sources.inputs import ImageInput, read_image_input
from embedding_pipeline.vectors import unit_normalised

if TYPE_CHECKING:
    from embedding_pipeline.index.collections import ModelCollections


class ImageSearcher:
    """Holds a Triton client, a compiled preprocessor and a Milvus client; reuse it for many queries.

    Search follows the alias ``milvus.collection`` to the collection it points at and embeds the query with the
    model that built that collection (recorded on it), so after a model change it keeps answering from the old
    model's collection, with the old model, until search is switched; each query re-reads the alias, so a
    long-lived searcher follows the switch. An ``embedder`` or ``index`` given here is used as is (an embedder of
    another model than the collection's is refused).
    """

    def __init__(self, settings: Settings | None = None, embedder=None, index: ImageIndex | None = None):
        self.settings = settings or load_settings()
        self._given_embedder = embedder
        self._given_index = index
        self._embedder = embedder
        self._index = index
        self._collections: ModelCollections | None = None
        self._collection: str | None = None  # the collection the current index and embedder are for
        self._preprocessor: Preprocessor | None = None

    def _follow_alias(self) -> None:
        """Resolve the search collection; when it changed, open it and the client of its model."""
        if self._given_index is not None:
            if self._embedder is None:
                self._use_embedder(self._given_index.recorded_model() if self._given_index.exists() else "")
            return
        from embedding_pipeline.index.collections import ModelCollections

        if self._collections is None:
            self._collections = ModelCollections(self.settings.milvus)
        collection = self._collections.search_collection()
        if collection is None:
            raise CollectionError(
                f"nothing to search yet: Milvus at {self.settings.milvus.uri} has no collection or alias "
                f"{self.settings.milvus.collection!r} (ingest a drop first)"
            )
        if collection == self._collection:
            return
        label = self._collections.model_of(collection)
        if self._index is not None:
            self._index.close()
        self._index = self._collections.index(collection)
        self._use_embedder(label)
        self._collection = collection

    def _use_embedder(self, label: str) -> None:
        from embedding_pipeline.serving.client import TritonEmbedder, embedder_for_label, same_model

        if self._given_embedder is not None:
            served = self._given_embedder.model_version_label()
            if label and not same_model(served, label):
                raise ValueError(
                    f"the collection search uses was built by model {label}, but the embedder given serves {served}"
                )
            return
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
        t = self.settings.triton
        self._embedder = embedder_for_label(t, label) if label else TritonEmbedder.from_settings(t)
        self._preprocessor = None  # the new model may take another input

    @property
    def collection(self) -> str:
        """The collection the next query searches (the alias resolved)."""
        self._follow_alias()
        assert self._index is not None  # opened (or given) by _follow_alias
        return self._collection or self._index.collection

    @property
    def index(self) -> ImageIndex:
        self._follow_alias()
        assert self._index is not None  # opened (or given) by _follow_alias
        return self._index

    @property
    def embedder(self):  # noqa: ANN201 - a TritonEmbedder
        self._follow_alias()
        return self._embedder

    @property
    def preprocessor(self) -> Preprocessor:
        embedder = self.embedder
        if self._preprocessor is None:
            model_input = embedder.input_spec()
            self._preprocessor = for_model(self.settings, model_input.datatype, model_input.shape, batch_size=1)
        return self._preprocessor

    def embed(self, image: ImageInput) -> np.ndarray:
        """The query's vector from the model of the collection search uses."""
        preprocessor = self.preprocessor
        prepared = preprocessor.prepare([read_image_input(image, self.settings.sources)])
        if prepared.errors[0] is not None:
            raise ValueError(f"query image: {prepared.errors[0]}")
        vectors = self._embedder.embed(prepared.tensors)
        # Queries get the same treatment as stored vectors, so scores compare like with like.
        return (unit_normalised(vectors) if self.settings.quality.unit_norm else vectors)[0]

    def search(
        self,
        image: ImageInput,
        top_k: int = 10,
        filter: str | None = None,
        search_params: dict[str, Any] | None = None,
    ) -> list[Hit]:
        """``search_params`` overrides the configured index search parameters for this query (e.g. ``{"ef": 128}``
        for HNSW, ``{"nprobe": 32}`` for IVF_FLAT)."""
        vector = self.embed(image)
        assert self._index is not None  # opened (or given) by _follow_alias, which embed() ran
        return self._index.search(vector, top_k=top_k, filter=filter, search_params=search_params)[0]

    def close(self) -> None:
        if self._embedder is not None:
            self._embedder.close()
        if self._index is not None:
            self._index.close()
        if self._collections is not None:
            self._collections.close()

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
