"""The image collection in Milvus: schema, index, idempotent upserts, per-drop deletes and search.

One row per image id (VARCHAR primary key), so re-ingesting a drop overwrites rather than duplicates. The vector
dimension comes from the model; a collection that exists with another dimension is refused, never mixed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from embedding_pipeline.settings import MilvusSettings

ID_MAX = 512
URI_MAX = 4096
SCALAR_FIELDS = ("uri", "sha256", "drop", "model", "metadata")


# pymilvus pings every 10 s, even on idle connections; gRPC servers that keep gRPC's default ping policy
# (milvus-lite's does) answer a third ping within 5 minutes with GOAWAY "too_many_pings", which breaks the
# client's next call. Ping rarely and only during calls: a long-lived client (a search service, a benchmark
# parent) then stays usable however long it idles.
GRPC_OPTIONS = {"grpc.keepalive_time_ms": 600_000, "grpc.keepalive_permit_without_calls": 0}


def connect(settings: MilvusSettings, timeout: float = 30.0):
    """A pymilvus ``MilvusClient`` for ``settings`` (raises whatever pymilvus raises when it cannot connect)."""
    from pymilvus import MilvusClient

    kwargs: dict[str, Any] = {"uri": settings.uri, "token": settings.token, "timeout": timeout,
                              "grpc_options": GRPC_OPTIONS}
    if settings.db_name:
        kwargs["db_name"] = settings.db_name
    return MilvusClient(**kwargs)


class CollectionError(RuntimeError):
    """The collection cannot be used as asked (wrong dimension, bad filter, unreachable server)."""


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    uri: str = ""
    drop: str = ""
    sha256: str = ""
    model: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "score": self.score,
            "uri": self.uri,
            "drop": self.drop,
            "sha256": self.sha256,
            "model": self.model,
            "metadata": self.metadata,
        }


def quote(value: str) -> str:
    """A Milvus expression string literal (JSON escaping is what the expression parser accepts)."""
    return json.dumps(value)


class ImageIndex:
    """A client for one image collection. Connects lazily; safe to create outside a Dagster run."""

    def __init__(self, settings: MilvusSettings):
        self.settings = settings
        self.collection = settings.collection
        self._client = None

    @property
    def client(self):
        if self._client is None:
            try:
                self._client = connect(self.settings)
            except Exception as exc:  # noqa: BLE001 - pymilvus raises several types for "cannot connect"
                raise CollectionError(f"cannot connect to Milvus at {self.settings.uri}: {exc}") from exc
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> "ImageIndex":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- collection ------------------------------------------------------------------------------------------

    def exists(self) -> bool:
        return bool(self.client.has_collection(self.collection))

    def dimension(self) -> int | None:
        """The vector dimension of the existing collection, or None if it doesn't exist."""
        if not self.exists():
            return None
        info = self.client.describe_collection(self.collection)
        for f in info["fields"]:
            if f["name"] == "embedding":
                return int(f["params"]["dim"])
        raise CollectionError(f"collection {self.collection!r} has no 'embedding' field; it was not made by this pipeline")

    def ensure_collection(self, dim: int) -> None:
        """Create the collection with its index if missing, check its dimension, and load it for search."""
        if self.settings.embedding_dim is not None and self.settings.embedding_dim != dim:
            raise CollectionError(
                f"MILVUS_EMBEDDING_DIM is {self.settings.embedding_dim} but the model produces {dim}-d vectors"
            )
        existing = self.dimension()
        if existing is None:
            self._create(dim)
        elif existing != dim:
            raise CollectionError(
                f"collection {self.collection!r} holds {existing}-d vectors but the model produces {dim}-d; "
                "use another collection name (MILVUS_COLLECTION) rather than mixing dimensions"
            )
        self.client.load_collection(self.collection)

    def _create(self, dim: int) -> None:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=ID_MAX)
        schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("uri", DataType.VARCHAR, max_length=URI_MAX)
        schema.add_field("sha256", DataType.VARCHAR, max_length=64)
        schema.add_field("drop", DataType.VARCHAR, max_length=256)
        schema.add_field("model", DataType.VARCHAR, max_length=256)
        schema.add_field("metadata", DataType.JSON)
        index = self.client.prepare_index_params()
        index.add_index(
            field_name="embedding",
            index_type=self.settings.index_type,
            metric_type=self.settings.metric_type,
            params=dict(self.settings.index_params) if self.settings.index_type != "FLAT" else {},
        )
        self.client.create_collection(self.collection, schema=schema, index_params=index)

    def describe_index(self) -> dict[str, Any]:
        return dict(self.client.describe_index(self.collection, "embedding"))

    # -- writes ----------------------------------------------------------------------------------------------

    def upsert(self, rows: Sequence[dict[str, Any]]) -> int:
        """Insert or overwrite rows by id, in batches kept well under the engine's message size limit."""
        done = 0
        step = self.settings.insert_batch_size
        for start in range(0, len(rows), step):
            chunk = [_row(r) for r in rows[start : start + step]]
            result = self.client.upsert(self.collection, chunk)
            done += int(result["upsert_count"])
        return done

    def _iterate(self, filter: str, fields: list[str]) -> Iterable[dict[str, Any]]:
        """All rows matching ``filter``, page by page (a plain query is capped at 16,384 rows)."""
        iterator = self.client.query_iterator(self.collection, batch_size=1000, filter=filter, output_fields=fields)
        try:
            while True:
                page = iterator.next()
                if not page:
                    return
                yield from page
        finally:
            iterator.close()

    def drop_ids(self, drop: str) -> set[str]:
        return {r["id"] for r in self._iterate(f"drop == {quote(drop)}", ["id"])}

    def drop_rows(self, drop: str) -> dict[str, tuple]:
        """id -> (sha256, model, uri, canonical metadata JSON) of the drop's stored rows."""
        rows = self._iterate(f"drop == {quote(drop)}", ["id", "sha256", "model", "uri", "metadata"])
        return {
            r["id"]: (r["sha256"], r["model"], r["uri"], json.dumps(r.get("metadata") or {}, sort_keys=True, default=str))
            for r in rows
        }

    def delete_ids(self, ids: Iterable[str]) -> int:
        ids = list(ids)
        if not ids:
            return 0
        deleted = 0
        for start in range(0, len(ids), 1000):
            result = self.client.delete(self.collection, ids=ids[start : start + 1000])
            deleted += len(result) if isinstance(result, list) else int(result.get("delete_count", 0))
        return deleted

    def delete_drop(self, drop: str) -> int:
        return self.delete_ids(self.drop_ids(drop))

    # -- reads -----------------------------------------------------------------------------------------------

    def count(self, filter: str = "") -> int:
        rows = self.client.query(self.collection, filter=filter, output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def count_drop(self, drop: str) -> int:
        return self.count(f"drop == {quote(drop)}")

    def vectors(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        rows = self.client.get(self.collection, ids=list(ids), output_fields=["embedding"])
        return {r["id"]: np.asarray(r["embedding"], dtype=np.float32) for r in rows}

    def search(
        self,
        vectors: np.ndarray,
        top_k: int = 10,
        filter: str | None = None,
        search_params: dict[str, Any] | None = None,
    ) -> list[list[Hit]]:
        """Top-k hits for each query vector; ``filter`` is a Milvus boolean expression."""
        if top_k < 1:
            raise ValueError("top_k must be >= 1")
        params = dict(self.settings.search_params if search_params is None else search_params)
        if self.settings.index_type == "FLAT":
            params = {}
        data = np.asarray(vectors, dtype=np.float32)
        if data.ndim == 1:
            data = data[None, :]
        try:
            result = self.client.search(
                self.collection,
                data=data.tolist(),
                limit=top_k,
                filter=filter or "",
                output_fields=list(SCALAR_FIELDS),
                search_params={"metric_type": self.settings.metric_type, "params": params},
            )
        except Exception as exc:  # noqa: BLE001 - pymilvus wraps server-side parse errors in MilvusException
            raise CollectionError(f"search failed (filter {filter!r}): {exc}") from exc
        return [[_hit(h) for h in hits] for hits in result]


def _row(r: dict[str, Any]) -> dict[str, Any]:
    vector = r["embedding"]
    return {
        "id": r["id"],
        "embedding": vector.tolist() if isinstance(vector, np.ndarray) else list(vector),
        "uri": r.get("uri", "")[:URI_MAX],
        "sha256": r.get("sha256", ""),
        "drop": r.get("drop", ""),
        "model": r.get("model", ""),
        "metadata": r.get("metadata") or {},
    }


def _hit(h: dict[str, Any]) -> Hit:
    entity = h.get("entity", {})
    return Hit(
        id=str(h["id"]),
        score=float(h["distance"]),
        uri=entity.get("uri", ""),
        drop=entity.get("drop", ""),
        sha256=entity.get("sha256", ""),
        model=entity.get("model", ""),
        metadata=entity.get("metadata") or {},
    )
