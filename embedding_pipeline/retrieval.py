"""Search the collection by image, by vector or by an indexed item's id: the same decode + kernels + Triton model
as ingest, then Milvus top-k, with the options every surface shares (:func:`ranked`): a minimum score, an offset
for paging, and near-duplicates collapsed under the best of them.

Usable without Dagster::

    from embedding_pipeline import search
    for hit in search("query.jpg", top_k=5, filter='metadata["category"] == "nature"'):
        print(hit["id"], hit.score, hit["uri"])
    more_like_it = search(id="img_1", min_score=0.5)
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ContextManager

import numpy as np

from embedding_pipeline.duplicates import threshold_for
from embedding_pipeline.index import params as index_params
from embedding_pipeline.index.client import CollectionError, Hit, ImageIndex, UnknownItem
from embedding_pipeline.preprocess.preprocessor import Preprocessor, for_model
from embedding_pipeline.settings import Settings, load_settings
from embedding_pipeline.sources.inputs import ImageInput, read_image_input
from embedding_pipeline.vectors import unit_normalised

if TYPE_CHECKING:
    from embedding_pipeline.index.collections import ModelCollections


def search_reads(index: ImageIndex, ids: list[str]) -> dict[str, dict[str, Any]]:
    """The stored vectors of ``ids`` for a search: read at Bounded consistency (a Strong read costs a Milvus server
    ~0.4 s), then any id not seen read again at Strong, so an item written moments ago is still found."""
    fields = ["id", "embedding"]
    rows = index.rows(ids, fields, consistency_level="Bounded")
    missing = [i for i in ids if i not in rows]
    if missing:
        rows.update(index.rows(missing, fields))
    return rows


def stored_vector(index: ImageIndex, item_id: str) -> np.ndarray:
    """The vector stored for ``item_id``; :class:`UnknownItem` if there is none (after a Strong read)."""
    row = search_reads(index, [item_id]).get(item_id)
    if row is None:
        raise UnknownItem(item_id, index.collection)
    return np.asarray(row["embedding"], dtype=np.float32)


def _collapse(index: ImageIndex, hits: list[Hit], threshold: float, wanted: int) -> list[Hit]:
    """Fold each hit within ``threshold`` of a better kept hit under it (hits come best first). Once ``wanted``
    hits are kept, later ones are only folded, never kept. Each hit is scored against the kept vectors only, so
    the cost grows with candidates × kept, not candidates²."""
    if not hits:
        return []
    metric = index.settings.metric_type.upper()
    rows = search_reads(index, [h.id for h in hits])
    kept: list[Hit] = []
    folded: list[list[str]] = []
    matrix: np.ndarray | None = None  # the kept vectors, one per row (NaN for a hit without a stored vector)
    for hit in hits:
        row = rows.get(hit.id)
        vector = np.asarray(row["embedding"], dtype=np.float32) if row is not None else None
        if vector is not None and kept and matrix is not None:
            scores = index_params.pair_scores(matrix[: len(kept)], vector[None, :], metric)[:, 0]
            close = [k for k, score in enumerate(scores) if index_params.passes(metric, float(score), threshold)]
            if close:
                folded[close[0]].append(hit.id)
                continue
        if len(kept) >= wanted:
            continue  # enough distinct hits: later ones only matter as duplicates of these
        if vector is not None and matrix is None:
            matrix = np.full((wanted, vector.shape[0]), np.nan, dtype=np.float32)
        if matrix is not None and vector is not None:
            matrix[len(kept)] = vector
        kept.append(hit)
        folded.append([])
    return [replace(hit, duplicates=tuple(ids)) for hit, ids in zip(kept, folded)]


def ranked(
    index: ImageIndex,
    vector: Any,
    top_k: int = 10,
    *,
    filter: str | None = None,
    search_params: dict[str, Any] | None = None,
    min_score: float | None = None,
    offset: int = 0,
    collapse: float | None = None,
    exclude: str | None = None,
) -> list[Hit]:
    """Hits ``offset`` to ``offset + top_k`` of the ranking of ``vector`` in ``index``, best first.

    * ``min_score`` keeps only hits at least that good (:func:`~embedding_pipeline.index.params.passes`: a lower
      bound on COSINE/IP scores, an upper bound on L2 distances). The ranking is cut, never reordered: page 2
      starts where page 1 ended (exactly on FLAT; an approximate index searches each window on its own, with a
      candidate list that grows with it, so a deep page may differ slightly from one larger search).
    * ``collapse`` (a score threshold between stored vectors, in the same terms) folds every hit close enough to a
      better one under it (``duplicates`` on the kept hit); the ranking then counts kept hits only, and more
      candidates are fetched until ``offset + top_k`` distinct hits are found or the collection has no more.
    * ``exclude`` leaves one id out (the item itself, in a search by id).
    """
    if top_k < 1:
        raise ValueError("top_k must be >= 1")
    if offset < 0:
        raise ValueError("offset must be >= 0")
    wanted = offset + top_k
    window = index_params.MAX_RESULT_WINDOW
    if wanted > window:
        raise ValueError(f"offset + top_k must be at most {window}, not {wanted}")
    metric = index.settings.metric_type
    limit = min(window, wanted + (1 if exclude is not None else 0))
    if collapse is not None:
        limit = min(window, max(4 * limit, 32))
    while True:
        found = index.search(vector, top_k=limit, filter=filter, search_params=search_params)[0]
        candidates = [h for h in found if h.id != exclude]
        hits = candidates
        if min_score is not None:
            hits = [h for h in candidates if index_params.passes(metric, h.score, min_score)]
        # No more to fetch: Milvus returned fewer than asked, or the cut-off ended the ranking inside this window.
        exhausted = len(found) < limit or len(hits) < len(candidates)
        if collapse is None:
            return hits[offset:wanted]
        kept = _collapse(index, hits, collapse, wanted)
        if len(kept) >= wanted or exhausted or limit >= window:
            return kept[offset:wanted]
        limit = min(window, 4 * limit)


@dataclass(frozen=True)
class SearchTarget:
    """The collection one query uses and the clients for it, resolved once. A query embedded and searched through
    one target never mixes two models, even when the alias moves between the two steps."""

    collection: str
    index: ImageIndex
    embedder: Any  # a TritonEmbedder for the model recorded on the collection


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
        self._preprocessor_of: Any = None  # the embedder the preprocessor was built for

    def target(self) -> SearchTarget:
        """Resolve the alias once: the collection the next query searches, its index and its model's embedder.
        Every step of one query goes through the same target."""
        self._follow_alias()
        assert self._index is not None  # opened (or given) by _follow_alias
        return SearchTarget(self._collection or self._index.collection, self._index, self._embedder)

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

    @property
    def collection(self) -> str:
        """The collection the next query searches (the alias resolved)."""
        return self.target().collection

    @property
    def index(self) -> ImageIndex:
        return self.target().index

    @property
    def embedder(self):  # noqa: ANN201 - a TritonEmbedder
        return self.target().embedder

    @property
    def preprocessor(self) -> Preprocessor:
        return self._preprocessor_for(self.target().embedder)

    def _preprocessor_for(self, embedder) -> Preprocessor:  # noqa: ANN001 - a TritonEmbedder
        if self._preprocessor is None or self._preprocessor_of is not embedder:
            model_input = embedder.input_spec()
            self._preprocessor = for_model(self.settings, model_input.datatype, model_input.shape, batch_size=1)
            self._preprocessor_of = embedder
        return self._preprocessor

    def embed(
        self, image: ImageInput, target: SearchTarget | None = None, decode_slot: ContextManager | None = None
    ) -> np.ndarray:
        """The query's vector from the model of the collection search uses (of ``target``'s, when given).
        ``decode_slot`` is held while the image is read and decoded (a server bounds how many decode at once),
        not while it is embedded."""
        target = target or self.target()
        preprocessor = self._preprocessor_for(target.embedder)
        with decode_slot or nullcontext():
            prepared = preprocessor.prepare([read_image_input(image, self.settings.sources)])
        if prepared.errors[0] is not None:
            raise ValueError(f"query image: {prepared.errors[0]}")
        vectors = target.embedder.embed(prepared.tensors)
        # Queries get the same treatment as stored vectors, so scores compare like with like.
        return (unit_normalised(vectors) if self.settings.quality.unit_norm else vectors)[0]

    def _collapse_threshold(self, collapse: bool | float | None, index: ImageIndex) -> float | None:
        if collapse is None or collapse is False:
            return None
        if collapse is True:
            return threshold_for(self.settings, index.settings.metric_type)
        threshold = float(collapse)
        if not np.isfinite(threshold):
            raise ValueError(f"collapse threshold must be a finite number, not {collapse!r}")
        return threshold

    def search(
        self,
        image: ImageInput,
        top_k: int = 10,
        filter: str | None = None,
        search_params: dict[str, Any] | None = None,
        *,
        min_score: float | None = None,
        offset: int = 0,
        collapse: bool | float | None = None,
        decode_slot: ContextManager | None = None,
    ) -> list[Hit]:
        """Hits for a query image (see :func:`ranked` for ``min_score``, ``offset`` and ``collapse``; ``collapse``
        True uses ``duplicates.threshold``). ``search_params`` overrides the configured index search parameters for
        this query (e.g. ``{"ef": 128}`` for HNSW, ``{"nprobe": 32}`` for IVF_FLAT). ``decode_slot``: see
        :meth:`embed`."""
        target = self.target()
        vector = self.embed(image, target, decode_slot)
        return self.search_vector(
            vector, top_k, filter, search_params, min_score=min_score, offset=offset, collapse=collapse, target=target
        )

    def search_vector(
        self,
        vector: Any,
        top_k: int = 10,
        filter: str | None = None,
        search_params: dict[str, Any] | None = None,
        *,
        min_score: float | None = None,
        offset: int = 0,
        collapse: bool | float | None = None,
        exclude: str | None = None,
        target: SearchTarget | None = None,
    ) -> list[Hit]:
        """Hits for a query vector of the collection's dimension, used as given (in ``target``'s collection, when
        given: the one the vector was made for)."""
        index = (target or self.target()).index
        return ranked(
            index,
            vector,
            top_k,
            filter=filter,
            search_params=search_params,
            min_score=min_score,
            offset=offset,
            collapse=self._collapse_threshold(collapse, index),
            exclude=exclude,
        )

    def search_by_id(
        self,
        item_id: str,
        top_k: int = 10,
        filter: str | None = None,
        search_params: dict[str, Any] | None = None,
        *,
        min_score: float | None = None,
        offset: int = 0,
        collapse: bool | float | None = None,
        include_self: bool = False,
    ) -> list[Hit]:
        """ "More like this": hits for the vector stored with ``item_id`` in the collection search uses (no
        re-embedding), the item itself left out unless ``include_self``. :class:`UnknownItem` for an unknown id."""
        target = self.target()
        vector = stored_vector(target.index, item_id)
        return self.search_vector(
            vector,
            top_k,
            filter,
            search_params,
            min_score=min_score,
            offset=offset,
            collapse=collapse,
            exclude=None if include_self else item_id,
            target=target,
        )

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
    image: ImageInput | None = None,
    top_k: int = 10,
    filter: str | None = None,
    settings: Settings | None = None,
    search_params: dict[str, Any] | None = None,
    *,
    id: str | None = None,
    min_score: float | None = None,
    offset: int = 0,
    collapse: bool | float | None = None,
    include_self: bool = False,
) -> list[Hit]:
    """Top-k most similar indexed images to ``image``, or to the item stored under ``id``: :class:`Hit` objects,
    read as ``hit.score`` or ``hit["score"]`` (id, score, uri, drop, drops, sha256, model, metadata)."""
    if (image is None) == (id is None):
        raise ValueError("give exactly one of image and id")
    options: dict[str, Any] = {"min_score": min_score, "offset": offset, "collapse": collapse}
    with ImageSearcher(settings) as searcher:
        if id is not None:
            return searcher.search_by_id(id, top_k, filter, search_params, include_self=include_self, **options)
        return searcher.search(image, top_k, filter, search_params, **options)
