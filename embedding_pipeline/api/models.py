"""Request and response bodies of the HTTP API (the original spec's field names), with the checks that need no settings.

Checks that depend on the configuration (top-k limit, allowed roots, input count) run in the endpoints, which
know the settings, and answer in the same 422 shape.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from embedding_pipeline.index.named import check_collection_name
from embedding_pipeline.sources.manifest import MAX_ID_CHARS

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_URI_CHARS = 4096
MAX_FILTER_CHARS = 4096
MAX_DIM = 32768

IndexType = Literal["FLAT", "IVF_FLAT", "HNSW"]
MetricType = Literal["COSINE", "IP", "L2"]


class _Body(BaseModel):
    # Unknown keys are refused: a misspelt "top_k" must not silently mean the default.
    model_config = ConfigDict(extra="forbid")


class CreateCollectionRequest(_Body):
    name: str = Field(..., description="Collection name: the alias search and insert use (`collection_name`).")
    dim: Optional[int] = Field(
        None,
        ge=1,
        le=MAX_DIM,
        description="Vector dimension; must be the model's (default: the served model's output dimension).",
    )
    description: str = Field("", max_length=2048, description="Free text, echoed back.")
    index_type: Optional[IndexType] = Field(None, description="Vector index (default: milvus.index_type).")
    metric_type: Optional[MetricType] = Field(None, description="Similarity metric (default: milvus.metric_type).")
    index_params: Optional[dict[str, Any]] = Field(
        None,
        description='Index build parameters, e.g. {"M": 16, "efConstruction": 256} for HNSW, '
        '{"nlist": 128} for IVF_FLAT.',
    )

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        check_collection_name(name)
        return name


class CreateCollectionResponse(BaseModel):
    name: str
    dim: int
    index_type: str
    metric_type: str
    created: bool
    description: str = ""
    collection: str = Field(..., description="The per-model collection behind the name.")
    model: str = Field(..., description="The model whose vectors it holds.")


class InsertRequest(_Body):
    inputs: list[str] = Field(
        ...,
        min_length=1,
        description="Absolute local paths (inside the drop folder or sources.allowed_roots) or http(s) URLs.",
    )
    ids: Optional[list[str]] = Field(None, description="One id per input (default: derived from the content).")
    metadata: Optional[list[dict[str, Any]]] = Field(None, description="One JSON object per input.")
    collection_name: Optional[str] = Field(None, description="Default: milvus.collection.")
    wait: bool = Field(False, description="Answer when the run has ended (200) instead of at once (202).")
    timeout_s: Optional[float] = Field(
        None, gt=0, le=600, description="With wait: how long to wait (at most 600 s) (default api.insert_timeout_s)."
    )

    @field_validator("collection_name")
    @classmethod
    def _collection(cls, name: Optional[str]) -> Optional[str]:
        return check_collection_name(name)

    @field_validator("inputs")
    @classmethod
    def _inputs(cls, inputs: list[str]) -> list[str]:
        for n, uri in enumerate(inputs):
            if not uri.strip() or len(uri) > MAX_URI_CHARS or _CONTROL.search(uri):
                raise ValueError(
                    f"inputs[{n}] must be a non-empty path or URL of at most {MAX_URI_CHARS} "
                    "characters without control characters"
                )
        return [uri.strip() for uri in inputs]

    @field_validator("ids")
    @classmethod
    def _ids(cls, ids: Optional[list[str]]) -> Optional[list[str]]:
        if ids is None:
            return ids
        for n, item_id in enumerate(ids):
            if not item_id.strip() or len(item_id.encode()) > MAX_ID_CHARS or _CONTROL.search(item_id):
                raise ValueError(f"ids[{n}] must be 1 to {MAX_ID_CHARS} bytes (UTF-8) without control characters")
        seen: dict[str, int] = {}
        for n, item_id in enumerate(ids):
            if item_id.strip() in seen:
                raise ValueError(f"ids[{n}] repeats ids[{seen[item_id.strip()]}] ({item_id!r}); ids must be unique")
            seen[item_id.strip()] = n
        return [i.strip() for i in ids]

    @model_validator(mode="after")
    def _same_lengths(self) -> "InsertRequest":
        for name in ("ids", "metadata"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.inputs):
                raise ValueError(f"{name} has {len(values)} entries but inputs has {len(self.inputs)}; one per input")
        return self


class InsertAccepted(BaseModel):
    drop: str
    run_id: str
    status_url: str
    collection: str


class Failure(BaseModel):
    id: str
    uri: str
    error_kind: str
    error: str
    stage: str


class RunReport(BaseModel):
    run_id: str
    status: str = Field(..., description="The Dagster run status (QUEUED, STARTED, SUCCESS, FAILURE ...).")
    drop: str
    items: int
    ok: int
    failed: int
    skipped: int = 0
    failures: list[Failure] = Field(default_factory=list)
    errors: list[dict[str, str]] = Field(default_factory=list, description="Failed steps and their errors.")


class SearchRequest(_Body):
    query_input: Optional[str] = Field(
        None,
        max_length=MAX_URI_CHARS,
        description="Query image: an absolute local path (inside the allowed roots) or an http(s) URL.",
    )
    vector: Optional[list[float]] = Field(
        None,
        min_length=1,
        max_length=MAX_DIM,
        description="A query vector of the collection's dimension, instead of an image.",
    )
    query_id: Optional[str] = Field(
        None,
        max_length=MAX_URI_CHARS,
        description="More like this: search with the vector stored for this id in the collection (no re-embedding).",
    )
    include_self: bool = Field(False, description="With query_id: keep the item itself in the results.")
    topk: int = Field(10, ge=1, description="Hits to return (at most api.max_topk).")
    offset: int = Field(0, ge=0, description="Hits to skip first: the next page starts at offset + topk.")
    min_score: Optional[float] = Field(
        None,
        description="Only hits at least this good: for COSINE and IP a score >= min_score, for L2 a distance "
        "<= min_score. The ranking is cut, never reordered, so pages stay consistent.",
    )
    collapse: bool = Field(
        False, description="Fold near-duplicates under the best of them (their ids in the kept hit's `duplicates`)."
    )
    collapse_threshold: Optional[float] = Field(
        None,
        description="With collapse: the near-duplicate threshold in the collection's score terms (COSINE/IP: at least "
        "this similar; L2: at most this squared distance). Default: duplicates.threshold.",
    )
    filter_expr: Optional[str] = Field(
        None,
        max_length=MAX_FILTER_CHARS,
        description='Milvus boolean expression, e.g. metadata["category"] == "nature".',
    )
    collection_name: Optional[str] = Field(None, description="Default: milvus.collection.")
    search_params: Optional[dict[str, Any]] = Field(
        None, description='Per-query index parameters, e.g. {"ef": 128} (HNSW) or {"nprobe": 32} (IVF_FLAT).'
    )

    @field_validator("collection_name")
    @classmethod
    def _collection(cls, name: Optional[str]) -> Optional[str]:
        return check_collection_name(name)

    @field_validator("vector")
    @classmethod
    def _finite(cls, vector: Optional[list[float]]) -> Optional[list[float]]:
        if vector is not None and not all(math.isfinite(v) for v in vector):
            raise ValueError("vector components must be finite numbers")
        return vector

    @model_validator(mode="after")
    def _one_query(self) -> "SearchRequest":
        if sum(q is not None for q in (self.query_input, self.vector, self.query_id)) != 1:
            raise ValueError("give exactly one of query_input (an image path or URL), vector and query_id")
        if self.include_self and self.query_id is None:
            raise ValueError("include_self needs query_id")
        if self.collapse_threshold is not None and not (self.collapse and math.isfinite(self.collapse_threshold)):
            raise ValueError("collapse_threshold needs collapse: true and a finite number")
        return self


class Hit(BaseModel):
    id: str
    score: float = Field(..., description="COSINE/IP: similarity, higher is closer; L2: squared distance, lower is.")
    uri: str
    metadata: dict[str, Any]
    drop: str = ""
    duplicates: Optional[list[str]] = Field(
        None, description="With collapse: ids of the near-duplicates folded under this hit (absent otherwise)."
    )


class SearchResponse(BaseModel):
    results: list[Hit]
    took_ms: float
    collection: str = Field(..., description="The collection name searched (milvus.collection by default).")
    resolved_collection: str = Field(..., description="The per-model collection behind that name.")


class DuplicateMember(BaseModel):
    id: str
    uri: str
    drop: str = Field(..., description="A drop that lists the image.")
    representative: bool = Field(..., description="The member closest to all others in its group.")
    score: float = Field(..., description="Score to the representative, in the collection's metric.")
    link_score: float = Field(..., description="Best score to another member (at least as close as the threshold).")


class DuplicateGroup(BaseModel):
    group: int = Field(..., description="Group number: 0 is the largest group.")
    size: int
    representative: str = Field(..., description="Id of the representative (listed first among the members).")
    members: list[DuplicateMember]


class DuplicatesResponse(BaseModel):
    drop: Optional[str] = Field(None, description="The drop whose images were the queries; null: the collection.")
    threshold: float = Field(..., description="COSINE/IP: similarity of at least this; L2: squared distance at most.")
    metric: str
    total_groups: int
    images_in_groups: int
    offset: int
    limit: int
    groups: list[DuplicateGroup]
