"""The image collection in Milvus: schema, indexes, idempotent upserts, per-drop deletes and search.

One row per image id (VARCHAR primary key), so re-ingesting a drop overwrites rather than duplicates. The vector
dimension comes from the model; a collection that exists with another dimension, index type or metric is refused,
never mixed. Indexes are built once, when the collection is created; the collection is loaded before searching.

Works the same against the embedded milvus-lite server and a remote Milvus (URI + token or user/password, TLS,
database); error messages name the URI, never a password.
"""

from __future__ import annotations

import json
import logging
import re
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from numpy.typing import ArrayLike

from embedding_pipeline.index import expressions
from embedding_pipeline.index import params as index_params
from embedding_pipeline.index.filters import (
    MEMBERSHIP_FIELD,
    MIRROR_PREFIX,
    VARCHAR_MAX,
    TypeMismatch,
    check_declared,
    mirrored_values,
    presence_field,
    rewrite_drop_filter,
    rewrite_filter,
    typed_values,
    value_field,
)
from embedding_pipeline.settings import ConfigError, MilvusSettings

log = logging.getLogger(__name__)

ID_MAX = 512
URI_MAX = 4096
DROP_MAX = 256
# Milvus caps an array field's capacity at 4096: one image can be listed by at most that many drops.
MAX_DROPS_PER_ROW = 4096
SCALAR_FIELDS = ("uri", "sha256", "drop", "model", "metadata")
VECTOR_FIELD = "embedding"
# Collection property saying its rows carry metadata mirrors (see index.filters) under this prefix.
MIRROR_PROPERTY = "embedding_pipeline.metadata_mirrors"
# Collection property naming the model whose vectors the collection holds (set once, when it is created).
MODEL_PROPERTY = "embedding_pipeline.model"
CONSISTENCY_LEVELS = ("Strong", "Session", "Bounded", "Eventually")


def check_consistency(level: str) -> str:
    if level not in CONSISTENCY_LEVELS:
        raise ValueError(f"consistency_level must be one of {', '.join(CONSISTENCY_LEVELS)}, not {level!r}")
    return level


# Milvus refuses messages over 64 MB (proxy.grpc.serverMaxRecvSize); stay far below it whatever the row size.
MAX_UPSERT_BYTES = 16 * 1024 * 1024
UPSERT_IN_FLIGHT = 2
PAGE_ROWS = 1000  # rows per page when listing
MAX_QUERY_ROWS = 16_384  # the most rows one plain query returns
# Scalar index types per declared type, best first. Milvus 2.4+ and milvus-lite take INVERTED for all four (milvus-lite
# takes nothing else); Milvus 2.3 takes only Trie for VARCHAR and STL_SORT for numbers and cannot index BOOL (a BOOL
# column is still a plain scan, far cheaper than parsing JSON).
SCALAR_INDEX_CANDIDATES: dict[str, tuple[str, ...]] = {
    "VARCHAR": ("INVERTED", "Trie"),
    "INT64": ("INVERTED", "STL_SORT"),
    "DOUBLE": ("INVERTED", "STL_SORT"),
    "BOOL": ("INVERTED",),
}
SCALAR_INDEX_MILVUS_2_3: dict[str, tuple[str, ...]] = {
    "VARCHAR": ("Trie",),
    "INT64": ("STL_SORT",),
    "DOUBLE": ("STL_SORT",),
    "BOOL": (),
}
_DATA_TYPES = ("VARCHAR", "INT64", "DOUBLE", "BOOL")

# pymilvus pings every 10 s, even on idle connections; gRPC servers that keep gRPC's default ping policy
# (milvus-lite's does) answer a third ping within 5 minutes with GOAWAY "too_many_pings", which breaks the
# client's next call. Ping rarely and only during calls: a long-lived client (a search service, a benchmark
# parent) then stays usable however long it idles.
GRPC_OPTIONS = {"grpc.keepalive_time_ms": 600_000, "grpc.keepalive_permit_without_calls": 0}


def redact(uri: str) -> str:
    """``uri`` without a password in its user-info part (safe to show in messages and logs)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def connection_kwargs(settings: MilvusSettings) -> dict[str, Any]:
    """MilvusClient keyword arguments for ``settings``: credentials, TLS, database. Raises ConfigError naming the
    setting that is inconsistent or points at a missing file."""
    if settings.token and (settings.user or settings.password):
        raise ConfigError("set either milvus.token or milvus.user + milvus.password, not both")
    if bool(settings.user) != bool(settings.password):
        raise ConfigError("milvus.user and milvus.password must be set together")
    token = settings.token or (f"{settings.user}:{settings.password}" if settings.user else "")
    secure = settings.secure or urlsplit(settings.uri).scheme == "https"
    kwargs: dict[str, Any] = {"uri": settings.uri, "token": token, "grpc_options": GRPC_OPTIONS}
    if settings.db_name:
        kwargs["db_name"] = settings.db_name
    if not secure and (settings.ca_pem_path or settings.server_name):
        raise ConfigError(
            "milvus.ca_pem_path / milvus.server_name are TLS settings, but TLS is off: set milvus.secure: true "
            "or use an https:// URI"
        )
    if secure:
        kwargs["secure"] = True
        if settings.ca_pem_path:
            ca = Path(settings.ca_pem_path).expanduser()
            if not ca.is_file():
                raise ConfigError(f"milvus.ca_pem_path: no certificate file at {ca}")
            # pymilvus verifies the server against ``server_pem_path`` (root certificates) for one-way TLS; its
            # ``ca_pem_path`` is used only together with a client certificate.
            kwargs["server_pem_path"] = str(ca)
        if settings.server_name:
            kwargs["server_name"] = settings.server_name
    return kwargs


def connect(settings: MilvusSettings, timeout: float = 30.0):
    """A pymilvus ``MilvusClient`` for ``settings`` (raises whatever pymilvus raises when it cannot connect).

    Each client gets its own channel (``dedicated``): pymilvus otherwise shares one per address + token, and a
    client asking for other TLS settings (another CA, no TLS) would silently ride on a channel opened with the first
    client's. Session consistency is unaffected: pymilvus keeps the last-write timestamps per process.
    """
    from pymilvus import MilvusClient

    return MilvusClient(timeout=timeout, dedicated=True, **connection_kwargs(settings))


def connection_problem(settings: MilvusSettings, exc: BaseException) -> str:
    """A message for a failed connection that says what to check; names the URI, never a secret."""
    from embedding_pipeline.runtime.processes import port_open

    where = redact(settings.uri)
    text = str(exc)
    if "database" in text.lower() and ("not exist" in text.lower() or "not found" in text.lower()):
        return f"database {settings.db_name!r} does not exist on Milvus at {where} (milvus.db_name): {text}"
    if not port_open(settings.host, settings.port, timeout=2):
        return f"cannot connect to Milvus at {where}: nothing answers at {settings.host}:{settings.port}"
    tls = " and the TLS settings (milvus.secure, milvus.ca_pem_path, milvus.server_name)"
    return (
        f"Milvus at {where} refused the connection: check the credentials (milvus.token, or milvus.user + "
        f"milvus.password){tls}: {text}"
    )


class CollectionError(RuntimeError):
    """The collection cannot be used as asked (wrong dimension, bad filter, unreachable server)."""


class UnknownItem(LookupError):
    """A search by id named an id the collection does not hold."""

    def __init__(self, item_id: str, collection: str):
        self.item_id, self.collection = item_id, collection
        super().__init__(f"no item with id {item_id!r} in collection {collection!r}")


@dataclass(frozen=True, eq=False)
class Hit(Mapping[str, Any]):
    """One search result. Read it by attribute (``hit.score``) or as a read-only mapping (``hit["score"]``,
    ``hit.get("uri")``, ``dict(hit)``), the same keys as :meth:`as_dict`.

    ``score`` is Milvus's: for COSINE and IP higher is more similar; for L2 it is the squared distance, lower is more
    similar. ``duplicates`` lists the ids folded under this hit when the search collapsed near-duplicates (None when
    it did not collapse).
    """

    id: str
    score: float
    uri: str = ""
    drop: str = ""
    sha256: str = ""
    model: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    drops: tuple[str, ...] = ()
    duplicates: tuple[str, ...] | None = None

    def as_dict(self) -> dict[str, Any]:
        out = {
            "id": self.id,
            "score": self.score,
            "uri": self.uri,
            "drop": self.drop,
            "sha256": self.sha256,
            "model": self.model,
            "metadata": self.metadata,
            "drops": list(self.drops or ((self.drop,) if self.drop else ())),
        }
        if self.duplicates is not None:
            out["duplicates"] = list(self.duplicates)
        return out

    def __getitem__(self, key: str) -> Any:
        return self.as_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.as_dict())

    def __len__(self) -> int:
        return len(self.as_dict())

    def __hash__(self) -> int:
        return hash((self.id, self.score))


def all_rows_filter() -> str:
    """Every row (ids are never empty): the filter of a scan over the whole collection."""
    return expressions.not_equals("id", "")


def drop_filter(drop: str) -> str:
    """The rows of ``drop``: every row whose membership lists it (an image listed by several drops is one row)."""
    return expressions.array_contains(MEMBERSHIP_FIELD, drop)


class MembershipMissing(CollectionError):
    """The collection predates drop membership (no ``drops`` field): it can be searched, never written to."""


class ImageIndex:
    """A client for one image collection. Connects lazily; safe to create outside a Dagster run.

    Raises :class:`ConfigError` at once if the index parameters or declared filter fields are invalid.
    """

    def __init__(self, settings: MilvusSettings, connect_timeout: float = 30.0, model_label: str = ""):
        """``model_label`` is recorded on the collection if this client creates it (see :meth:`recorded_model`)."""
        self.settings = settings
        self.model_label = model_label
        # A refused TLS handshake is retried by gRPC until this runs out, so it bounds how long a bad CA takes.
        self.connect_timeout = connect_timeout
        self.collection = settings.collection
        self.declared = check_declared(settings.filter_fields)
        index_params.check_settings(settings)
        connection_kwargs(settings)  # inconsistent credentials or TLS settings fail here, before any call
        self._client = None
        self._filter_fields: dict[str, str] | None = None
        self._membership: bool | None = None
        self._mirrored: bool | None = None
        self._coalescer: Any = None  # set by coalesce_searches
        self._lite: bool | None = None  # milvus-lite (pages need its key-order mark), known after the first page
        # Milvus 2.3 answers a delete without a timestamp, so a Session read after it may not see it: reads that
        # follow a delete through this client run Strong instead (milvus-lite is always strong: no cost there).
        self._deleted = False
        # Rows whose metadata value did not fit a declared key's type (stored, typed column empty), newest last.
        self.type_mismatches: list[TypeMismatch] = []

    @property
    def client(self):
        if self._client is None:
            try:
                client = connect(self.settings, timeout=self.connect_timeout)
            except Exception as exc:  # noqa: BLE001 - pymilvus raises several types for "cannot connect"
                raise CollectionError(connection_problem(self.settings, exc)) from exc
            self._check_database(client)
            self._client = client
        return self._client

    def _check_database(self, client) -> None:  # noqa: ANN001 - a MilvusClient
        """Milvus 2.3 answers calls in a missing database as if it were empty: say so instead."""
        db = self.settings.db_name
        if not db:
            return
        try:
            databases = client.list_databases()
        except Exception:  # noqa: BLE001 - no privilege to list, or no databases at all: the calls will tell
            return
        if db not in databases:
            client.close()
            raise CollectionError(
                f"database {db!r} does not exist on Milvus at {redact(self.settings.uri)} (milvus.db_name); "
                f"create it first (it has: {', '.join(databases)})"
            )

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> "ImageIndex":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- collection ------------------------------------------------------------------------------------------

    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Turn whatever pymilvus raises into a :class:`CollectionError` naming the operation, the collection and
        the server (a dead server otherwise surfaces as a bare "Fail connecting to server on host:port")."""
        try:
            yield
        except (CollectionError, ConfigError):
            raise
        except Exception as exc:  # noqa: BLE001 - pymilvus and gRPC raise many types
            where = redact(self.settings.uri)
            raise CollectionError(f"{what} on collection {self.collection!r} at Milvus {where} failed: {exc}") from exc

    def _loaded(self, call):  # noqa: ANN001, ANN202 - any read on the collection
        """Run ``call()``; if the server released the collection (a restarted Milvus does), load it and retry once."""
        try:
            return call()
        except Exception as exc:  # noqa: BLE001
            text = str(exc).lower()
            if "not loaded" not in text and "released" not in text:
                raise
            self.client.load_collection(self.collection)
            return call()

    def exists(self) -> bool:
        with self.guard("checking the collection"):
            return bool(self.client.has_collection(self.collection))

    def _describe(self) -> dict[str, Any]:
        try:
            return self.client.describe_collection(self.collection)
        except Exception as exc:  # noqa: BLE001 - pymilvus raises MilvusException for a missing collection
            if not self.exists():
                raise CollectionError(
                    f"collection {self.collection!r} does not exist on Milvus at {redact(self.settings.uri)}"
                    + (f" (database {self.settings.db_name!r})" if self.settings.db_name else "")
                ) from exc
            raise

    def recorded_model(self) -> str:
        """The model label recorded on the collection when it was created ("" for one made without it)."""
        properties = self._describe().get("properties") or {}
        return str(properties.get(MODEL_PROPERTY, ""))

    def dimension(self) -> int | None:
        """The vector dimension of the existing collection, or None if it doesn't exist."""
        if not self.exists():
            return None
        for f in self._describe()["fields"]:
            if f["name"] == VECTOR_FIELD:
                return int(f["params"]["dim"])
        raise CollectionError(
            f"collection {self.collection!r} has no 'embedding' field; it was not made by this pipeline"
        )

    def ensure_collection(self, dim: int) -> None:
        """Create the collection with its indexes if missing, check it fits the settings, and load it."""
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
        else:
            self._check_vector_index()
            self.require_membership()
        self.filter_fields()
        with self.guard("loading"):
            self.client.load_collection(self.collection)

    def _check_vector_index(self) -> None:
        try:
            info = self.describe_index()
        except Exception:  # noqa: BLE001 - no index to compare (a collection made elsewhere): nothing to refuse
            return
        for key, wanted in (("index_type", self.settings.index_type), ("metric_type", self.settings.metric_type)):
            have = info.get(key)
            if have and have != wanted:
                raise CollectionError(
                    f"collection {self.collection!r} has a {info.get('index_type')}/{info.get('metric_type')} "
                    f"vector index but the settings ask for {self.settings.index_type}/{self.settings.metric_type}; "
                    "an index is built once, with the collection: use another collection name (MILVUS_COLLECTION)"
                )

    def has_membership(self) -> bool:
        """True if the collection has the ``drops`` array (every collection this version creates has it)."""
        if self._membership is None:
            self._membership = any(f["name"] == MEMBERSHIP_FIELD for f in self._describe()["fields"])
        return self._membership

    def has_mirrors(self) -> bool:
        """True if every row carries mirrors of its metadata keys (collections this version creates): filters on
        undeclared keys then read the mirrors rather than each row's JSON."""
        if self._mirrored is None:
            info = self._describe()
            properties = info.get("properties") or {}
            self._mirrored = bool(info.get("enable_dynamic_field")) and properties.get(MIRROR_PROPERTY) == MIRROR_PREFIX
        return self._mirrored

    def require_membership(self) -> None:
        """Refuse to write to a collection made before drop membership: with one ``drop`` per row, a second drop
        listing the same image would take the row over and deleting either would delete it for both."""
        if not self.has_membership():
            raise MembershipMissing(
                f"collection {self.collection!r} was created before drop membership (it has no {MEMBERSHIP_FIELD!r} "
                "field), so it cannot record an image listed by several drops; it stays searchable but is not "
                "written to. Set milvus.collection to a new name and re-run the drops to index them there"
            )

    def filter_fields(self) -> dict[str, str]:
        """Declared metadata key -> type, as the existing collection holds them (its schema is the authority).

        A key declared in the settings but missing from the collection is refused: the columns are fixed when the
        collection is created. Keys the collection declares beyond the settings are used as well, so rows stay
        complete and filters stay fast whatever the reader's settings say.
        """
        if self._filter_fields is not None:
            return self._filter_fields
        fields = {f["name"]: f for f in self._describe()["fields"]}
        found: dict[str, str] = {}
        for name, f in fields.items():
            key = name[len("meta_") :] if name.startswith("meta_") else None
            if key and presence_field(key) in fields:
                found[key] = _type_name(f["type"])
        missing = {k: t for k, t in self.declared.items() if found.get(k) != t}
        if missing:
            wanted = ", ".join(f"{k} ({t})" for k, t in missing.items())
            have = ", ".join(f"{k} ({t})" for k, t in found.items()) or "none"
            raise CollectionError(
                f"collection {self.collection!r} was created without the declared filter field(s) {wanted} "
                f"(it has: {have}); declared fields are fixed when a collection is created: use a new collection "
                "(MILVUS_COLLECTION) for milvus.filter_fields to apply"
            )
        self._filter_fields = found
        return found

    def _create(self, dim: int) -> None:
        from pymilvus import DataType, MilvusClient

        # The dynamic field holds the metadata mirrors; nothing else is written there.
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=True)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=ID_MAX)
        schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("uri", DataType.VARCHAR, max_length=URI_MAX)
        schema.add_field("sha256", DataType.VARCHAR, max_length=64)
        schema.add_field("drop", DataType.VARCHAR, max_length=DROP_MAX)
        schema.add_field(
            MEMBERSHIP_FIELD,
            DataType.ARRAY,
            element_type=DataType.VARCHAR,
            max_capacity=MAX_DROPS_PER_ROW,
            max_length=DROP_MAX,
        )
        schema.add_field("model", DataType.VARCHAR, max_length=256)
        schema.add_field("metadata", DataType.JSON)
        for key, kind in self.declared.items():
            extra = {"max_length": VARCHAR_MAX} if kind == "VARCHAR" else {}
            schema.add_field(value_field(key), getattr(DataType, kind), **extra)
            schema.add_field(presence_field(key), DataType.BOOL)
        try:
            # The model is a collection property: both Milvus 2.3 and milvus-lite keep those (milvus-lite drops
            # a collection's description).
            properties = {MIRROR_PROPERTY: MIRROR_PREFIX}
            if self.model_label:
                properties[MODEL_PROPERTY] = self.model_label
            self.client.create_collection(
                self.collection, schema=schema, consistency_level=self.settings.consistency_level, properties=properties
            )
        except Exception:
            if self.exists():  # another process created it meanwhile: check it like any existing one
                self._check_vector_index()
                return
            raise
        try:
            index = self.client.prepare_index_params()
            # Parameters go nested under "params": the wire form both Milvus 2.x and milvus-lite read (milvus-lite
            # drops them when they come as separate keys, which is how pymilvus sends a flat dict).
            index.add_index(
                field_name=VECTOR_FIELD,
                index_type=self.settings.index_type,
                metric_type=self.settings.metric_type,
                params={"params": index_params.build_params(self.settings)},
            )
            self.client.create_index(self.collection, index)
            for key, kind in self.declared.items():
                self._create_scalar_index(value_field(key), kind)
                self._create_scalar_index(presence_field(key), "BOOL")
        except Exception as exc:
            # The collection is new and empty: remove it rather than leave one without its indexes behind.
            self.client.drop_collection(self.collection)
            raise CollectionError(f"building the indexes of collection {self.collection!r} failed: {exc}") from exc

    def _scalar_candidates(self, kind: str) -> tuple[str, ...]:
        """Index types to try for a declared type on this server (asking a 2.3 server for INVERTED only earns an
        error in its log)."""
        try:
            version = str(self.client.get_server_version())
        except Exception:  # noqa: BLE001 - unknown server: try everything
            version = ""
        match = re.match(r"v?(\d+)\.(\d+)", version)
        if match and (int(match.group(1)), int(match.group(2))) < (2, 4):
            return SCALAR_INDEX_MILVUS_2_3[kind]
        return SCALAR_INDEX_CANDIDATES[kind]

    def _create_scalar_index(self, field_name: str, kind: str) -> str | None:
        """The first scalar index type the engine accepts for this field, built; None if it takes none."""
        refusals = []
        for index_type in self._scalar_candidates(kind):
            index = self.client.prepare_index_params()
            index.add_index(field_name=field_name, index_type=index_type, index_name=field_name)
            try:
                self.client.create_index(self.collection, index)
                return index_type
            except Exception as exc:  # noqa: BLE001 - the engine says no: try the next type
                refusals.append(f"{index_type}: {str(exc)[:160]}")
        log.info(
            "no scalar index on %s.%s (%s); filters on it scan the column",
            self.collection,
            field_name,
            "; ".join(refusals),
        )
        return None

    def describe_index(self) -> dict[str, Any]:
        """The vector index: ``index_type``, ``metric_type``, ``params`` (the build parameters) and build state."""
        raw = dict(self.client.describe_index(self.collection, VECTOR_FIELD) or {})
        return _normalise_index(raw)

    def scalar_indexes(self) -> dict[str, str | None]:
        """Column -> scalar index type (None where the engine built none) for the declared filter fields."""
        names = set(self.client.list_indexes(self.collection))
        out: dict[str, str | None] = {}
        for key in self.filter_fields():
            for column in (value_field(key), presence_field(key)):
                info = self.client.describe_index(self.collection, column) if column in names else None
                out[column] = info.get("index_type") if info else None
        return out

    # -- writes ----------------------------------------------------------------------------------------------

    def upsert(self, rows: Sequence[dict[str, Any]]) -> int:
        """Insert or overwrite rows by id, in calls kept well under the engine's message size limit.

        Up to ``UPSERT_IN_FLIGHT`` calls are in flight, so packing one call (client CPU, ~0.1 ms per 1280-d row)
        overlaps the server storing the previous one. Rows repeating an id go one call at a time, so the last
        value given always wins.
        """
        from concurrent.futures import ThreadPoolExecutor

        fields = self.filter_fields()
        membership = self.has_membership()
        mirrors = self.has_mirrors()
        in_flight = UPSERT_IN_FLIGHT if len({r["id"] for r in rows}) == len(rows) else 1
        done = 0
        # (rows in the call, their type mismatches, the call) in submission order
        pending: deque[tuple[int, list[TypeMismatch], Any]] = deque()

        def collect() -> int:
            count, problems, future = pending.popleft()
            with self.guard(f"upserting {count} rows"):
                result = future.result()
            if problems:
                self._report_mismatches(problems)
            return int(result["upsert_count"])

        client = self.client
        with ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="milvus-upsert") as pool:
            try:
                for batch in _batches(rows, self.settings.insert_batch_size, MAX_UPSERT_BYTES):
                    chunk = []
                    problems: list[TypeMismatch] = []
                    for r in batch:
                        row = _row(r, membership)
                        if mirrors:
                            row.update(mirrored_values(row["metadata"]))
                        if fields:
                            columns, mismatches = typed_values(row["id"], row["metadata"], fields)
                            row.update(columns)
                            problems.extend(mismatches)
                        chunk.append(row)
                    if len(pending) >= in_flight:
                        done += collect()
                    pending.append((len(chunk), problems, pool.submit(client.upsert, self.collection, chunk)))
                while pending:
                    done += collect()
            finally:
                for _, _, future in pending:
                    future.cancel()
        return done

    def _report_mismatches(self, problems: list[TypeMismatch]) -> None:
        self.type_mismatches.extend(problems)
        first = problems[0]
        log.warning(
            "%d metadata value(s) do not fit their declared filter field type; the rows are stored with the "
            "typed column empty (first: id %r, key %r, %s: %s)",
            len(problems),
            first.id,
            first.key,
            first.declared,
            first.reason,
        )

    def _iterate(self, filter: str, fields: list[str], strong: bool = False) -> Iterable[dict[str, Any]]:
        """All rows matching ``filter``, page by page in primary-key order (a plain query is capped at 16,384 rows).
        ``strong`` reads at Strong consistency: reads that decide what to delete must see every write before them.
        """
        for page in self.pages(filter, fields, strong=strong):
            yield from page

    def pages(
        self, filter: str, fields: Sequence[str], page_rows: int = PAGE_ROWS, strong: bool = False
    ) -> Iterator[list[dict[str, Any]]]:
        """The rows matching ``filter`` (``id`` plus ``fields``) in pages of at most ``page_rows``, in primary-key
        order: one query per page, so a reader holds one page at a time. The vector field, if asked for, comes as
        float32 arrays.

        Not pymilvus's ``query_iterator``: it pages with ``id > "<last id>"`` pasted in unescaped, so an id holding a
        quote or a newline breaks the listing (or rewrites it). The cursor here is a literal from :mod:`.expressions`.
        """
        if not 1 <= page_rows <= MAX_QUERY_ROWS:
            raise ValueError(f"page_rows must be between 1 and {MAX_QUERY_ROWS}, not {page_rows}")
        extra = {**self._key_order(), **({"consistency_level": "Strong"} if strong else {})}
        columns = list(dict.fromkeys(["id", *fields]))
        if VECTOR_FIELD in columns:
            # Vectors as float32 arrays over one buffer per page, not lists of Python floats (8x the memory).
            extra["strict_float32"] = True
        last: str | None = None
        while True:
            expr = filter if last is None else f"({filter}) and id > {expressions.literal(last)}"
            with self.guard(f"reading rows ({filter})"):
                page = self._loaded(
                    lambda expr=expr: self.client.query(
                        self.collection,
                        filter=expr,
                        output_fields=columns,
                        limit=page_rows,
                        **extra,  # noqa: B023
                    )
                )
            if not page:
                return
            rows = list(page)
            yield rows
            if len(rows) < page_rows:
                return
            keys = [r["id"] for r in rows]
            if keys != sorted(keys):
                # Paging by key needs a full page in key order (both engines return that; UTF-8 byte order is
                # code point order). Anything else could skip rows: stop rather than decide from half a listing.
                raise CollectionError(f"Milvus returned a page of {self.collection!r} out of key order; cannot list it")
            last = keys[-1]
            del rows, page, keys

    def _key_order(self) -> dict[str, Any]:
        """Query options that make a limited query return the smallest keys, in key order (what paging by key needs).

        Milvus merges its segments' results by primary key. milvus-lite returns rows in storage order (segments, then
        the memtable) and sorts by key only for a query marked as an iterator's: without the mark, a full page can be
        in key order and still skip smaller keys stored later, silently. The mark is sent to milvus-lite only:
        pymilvus sends no consistency timestamp with it, and milvus-lite reads are always strong anyway.
        """
        return {"iterator": "True"} if self.is_lite() else {}

    def is_lite(self) -> bool:
        """True if the server is milvus-lite (a Python engine: one call at a time uses it fully)."""
        if self._lite is None:
            # Asked until answered: a guess cached after one failed call would page a milvus-lite without the mark
            # for the client's whole life. A failure here fails the call that needed it.
            with self.guard("reading the server version"):
                version = str(self.client.get_server_version())
            self._lite = version.startswith("milvus_lite")
        return self._lite

    def scan(self, filter: str, fields: Sequence[str], strong: bool = False) -> Iterator[dict[str, Any]]:
        """Every row matching ``filter`` (built by :mod:`.expressions`, never pasted from a user), ``fields`` of
        each, a page at a time in key order: a whole collection is never held at once."""
        return iter(self._iterate(filter, list(fields), strong=strong))

    def drop_ids(self, drop: str) -> set[str]:
        """Ids of every row ``drop`` lists (Strong)."""
        self.require_membership()
        return {r["id"] for r in self._iterate(drop_filter(drop), ["id"], strong=True)}

    def drop_rows(self, drop: str) -> dict[str, dict[str, Any]]:
        """id -> the stored row (sha256, model, uri, metadata, drop, drops; no vector) of every row ``drop`` lists,
        read at Strong consistency (what is deleted is decided from it)."""
        self.require_membership()
        fields = ["id", "sha256", "model", "uri", "metadata", "drop", MEMBERSHIP_FIELD]
        return {r["id"]: r for r in self._iterate(drop_filter(drop), fields, strong=True)}

    def rows(
        self, ids: Iterable[str], fields: Sequence[str], consistency_level: str = "Strong"
    ) -> dict[str, dict[str, Any]]:
        """id -> row (``fields``) of the stored rows among ``ids``, read at Strong consistency (what decisions to
        write or delete need). Searches may read at ``Bounded``: on a Milvus server a Strong read waits for the
        next time tick (~0.4 s); milvus-lite reads are always strong."""
        check_consistency(consistency_level)
        wanted = sorted(set(ids))
        out: dict[str, dict[str, Any]] = {}
        for chunk in expressions.chunks(wanted):
            expr = expressions.in_list("id", chunk)
            with self.guard(f"reading {len(chunk)} rows"):
                found = self._loaded(
                    lambda expr=expr: self.client.query(
                        self.collection,
                        filter=expr,
                        output_fields=list(fields),
                        consistency_level=consistency_level,
                    )
                )
            out.update((r["id"], r) for r in found)
        return out

    def delete_ids(self, ids: Iterable[str]) -> int:
        """Delete rows by id, whatever drops list them (the expression is built by :mod:`.expressions`, never by
        pymilvus's unescaped ``ids=``)."""
        ids = sorted(set(ids))
        deleted = 0
        for chunk in expressions.chunks(ids):
            with self.guard(f"deleting {len(chunk)} rows"):
                result = self.client.delete(self.collection, filter=expressions.in_list("id", chunk))
            deleted += len(result) if isinstance(result, list) else int(result.get("delete_count", 0))
            self._deleted = True
        return deleted

    def release(self, drop: str, ids: Iterable[str]) -> tuple[int, int]:
        """Take ``drop`` out of the membership of rows ``ids``: a row that no other drop lists is deleted, a row
        that others still list is written back without ``drop`` (same vector; its ``drop`` field moves to a drop
        that still lists it). Returns (rows deleted, rows kept for other drops)."""
        self.require_membership()
        fields = ["id", VECTOR_FIELD, *SCALAR_FIELDS, MEMBERSHIP_FIELD]
        gone: list[str] = []
        rewritten: list[dict[str, Any]] = []
        for row in self.rows(ids, fields).values():
            listed = row.get(MEMBERSHIP_FIELD) or []
            if drop not in listed:
                continue  # not this drop's row: never deleted or rewritten on its behalf
            members = [d for d in listed if d != drop]
            if not members:
                gone.append(row["id"])
            else:
                shown = row["drop"] if row["drop"] in members else members[0]
                rewritten.append({**row, "drop": shown, MEMBERSHIP_FIELD: members})
        if rewritten:
            self.upsert(rewritten)
        deleted = self.delete_ids(gone)
        if rewritten or gone:
            # Persisted now: a membership change lost in a crash would leave a row listed by a deleted drop.
            self.flush()
        return deleted, len(rewritten)

    def flush(self) -> None:
        """Persist what was written so far: a drop's rows must outlive a server crash that happens later (an
        unflushed milvus-lite segment was lost with everything in it when the server was killed mid-upsert)."""
        with self.guard("flushing"):
            self.client.flush(self.collection)

    def delete_drop(self, drop: str) -> int:
        """Take ``drop`` out of every row it lists; returns the rows deleted (those no other drop lists).

        A collection made before drop membership records one drop per row: there the rows shown with ``drop`` are
        deleted, as that version did."""
        if not self.has_membership():
            ids = {r["id"] for r in self._iterate(expressions.equals("drop", drop), ["id"], strong=True)}
            deleted = self.delete_ids(ids)
            if deleted:
                self.flush()
            return deleted
        deleted, _ = self.release(drop, self.drop_ids(drop))
        return deleted

    # -- reads -----------------------------------------------------------------------------------------------

    def rewrite(self, filter: str | None) -> str:
        """``filter`` with comparisons on declared metadata keys moved to their typed columns."""
        if not filter:
            return ""
        if self.has_membership():
            filter = rewrite_drop_filter(filter)
        return rewrite_filter(filter, self.filter_fields(), mirrored=self.has_mirrors())

    def count(self, filter: str = "", consistency_level: str | None = None) -> int:
        rows = self._call(
            "count",
            filter,
            lambda expr, extra: self.client.query(self.collection, filter=expr, output_fields=["count(*)"], **extra),
            consistency_level,
        )
        return int(rows[0]["count(*)"])

    def count_drop(self, drop: str, consistency_level: str | None = None) -> int:
        """Rows that ``drop`` lists."""
        return self.count(expressions.equals("drop", drop), consistency_level=consistency_level)

    def ids(self, filter: str = "", consistency_level: str | None = None, limit: int = 16384) -> set[str]:
        """Ids of the rows matching ``filter`` (at most ``limit``)."""
        rows = self._call(
            "query",
            filter,
            lambda expr, extra: self.client.query(
                self.collection, filter=expr, output_fields=["id"], limit=limit, **extra
            ),
            consistency_level,
        )
        return {r["id"] for r in rows}

    def vectors(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        rows = self.rows(ids, ["id", VECTOR_FIELD])
        return {i: np.asarray(r[VECTOR_FIELD], dtype=np.float32) for i, r in rows.items()}

    def search(
        self,
        vectors: ArrayLike,
        top_k: int = 10,
        filter: str | None = None,
        search_params: dict[str, Any] | None = None,
        consistency_level: str | None = None,
    ) -> list[list[Hit]]:
        """Top-k hits for each query vector; ``filter`` is a Milvus boolean expression.

        ``search_params`` overrides the configured ones for this query (keys are checked against the index type);
        ``consistency_level`` overrides the collection's (``Strong``, ``Session``, ``Bounded``, ``Eventually``).
        """
        if top_k < 1:
            raise ValueError("top_k must be >= 1")
        data = np.asarray(vectors, dtype=np.float32)
        if data.ndim == 1:
            data = data[None, :]
        if self._coalescer is not None and len(data) == 1:
            key = (top_k, filter or "", json.dumps(search_params, sort_keys=True, default=repr), consistency_level)
            return [self._coalescer(key, (data[0], search_params))]
        return self._search_now(data, top_k, filter, search_params, consistency_level)

    def coalesce_searches(self, max_batch: int = 16, max_concurrent: int | None = None) -> None:
        """From now on, single-vector searches from concurrent threads that agree on top-k, filter, parameters
        and consistency go to the server together, as one multi-vector search (see
        :mod:`embedding_pipeline.runtime.batching`); answers are the same as one search each.

        ``max_concurrent`` calls run at once (default: one on milvus-lite, whose search is Python holding one lock,
        so a second call in flight only halves the batches; four on a Milvus server, which searches in parallel).
        """
        from embedding_pipeline.runtime.batching import Coalescer

        if max_concurrent is None:
            max_concurrent = 1 if self.is_lite() else 4

        def run(key: Any, items: list[tuple[np.ndarray, dict[str, Any] | None]]) -> list[list[Hit]]:
            top_k, filter, _, consistency_level = key
            vectors = np.stack([vector for vector, _ in items])
            return self._search_now(vectors, top_k, filter or None, items[0][1], consistency_level)

        self._coalescer = Coalescer(run, max_batch=max_batch, max_concurrent=max_concurrent)

    def _search_now(
        self,
        data: np.ndarray,
        top_k: int,
        filter: str | None,
        search_params: dict[str, Any] | None,
        consistency_level: str | None,
    ) -> list[list[Hit]]:
        params = index_params.search_params(self.settings, search_params, top_k)
        result = self._call(
            "search",
            filter,
            lambda expr, extra: self.client.search(
                self.collection,
                data=data.tolist(),
                limit=top_k,
                filter=expr,
                output_fields=self._output_fields(),
                search_params={"metric_type": self.settings.metric_type, "params": params},
                **extra,
            ),
            consistency_level,
        )
        return [[_hit(h) for h in hits] for hits in result]

    def _output_fields(self) -> list[str]:
        return [*SCALAR_FIELDS, MEMBERSHIP_FIELD] if self.has_membership() else list(SCALAR_FIELDS)

    def _call(self, what: str, filter: str | None, call, consistency_level: str | None):  # noqa: ANN001
        """Run a filtered read: rewrite the filter, apply the consistency level, load the collection if the
        server released it (a restarted Milvus), and name the filter when the engine refuses it."""
        extra: dict[str, Any] = {}
        if consistency_level is not None:
            extra["consistency_level"] = check_consistency(consistency_level)
        elif self._deleted and self.settings.consistency_level == "Session":
            extra["consistency_level"] = "Strong"
        expr = self.rewrite(filter)
        try:
            return self._loaded(lambda: call(expr, extra))
        except CollectionError:
            raise
        except Exception as exc:  # noqa: BLE001 - pymilvus wraps server-side parse errors in MilvusException
            shown = f"filter {filter!r}" + (f", run as {expr!r}" if expr != (filter or "") else "")
            where = redact(self.settings.uri)
            raise CollectionError(f"{what} failed ({shown}) on Milvus at {where}: {exc}") from exc


def _type_name(data_type: Any) -> str:
    name = getattr(data_type, "name", str(data_type))
    return name if name in _DATA_TYPES else str(name)


def _normalise_index(raw: dict[str, Any]) -> dict[str, Any]:
    """describe_index output in one shape: engines return build parameters nested (a dict or JSON text) or as
    top-level string values."""
    known = {
        "index_type",
        "metric_type",
        "field_name",
        "index_name",
        "total_rows",
        "indexed_rows",
        "pending_index_rows",
        "state",
        "params",
    }
    params = raw.get("params")
    if isinstance(params, str):
        params = json.loads(params or "{}")
    if params is None:
        params = {k: v for k, v in raw.items() if k not in known}
    out = {k: v for k, v in raw.items() if k in known}
    out["params"] = {k: _number(v) for k, v in dict(params).items()}
    return out


def _number(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            try:
                return float(value)
            except ValueError:
                return value
    return value


def _row_bytes(row: dict[str, Any]) -> int:
    """About what a row costs in an upsert message: 4 bytes per vector component plus its text."""
    vector = row["embedding"]
    size = 4 * (vector.size if isinstance(vector, np.ndarray) else len(vector))
    # The metadata twice: as the JSON document and as its mirrors.
    size += 2 * len(json.dumps(row.get("metadata") or {}, default=str).encode())
    size += sum(len(str(row.get(k, "")).encode()) for k in ("id", "uri", "sha256", "drop", "model"))
    return size + 64  # field headers and the declared columns


def _batches(rows: Sequence[dict[str, Any]], max_rows: int, max_bytes: int) -> Iterator[Sequence[dict[str, Any]]]:
    """Consecutive slices of ``rows`` with at most ``max_rows`` rows and about ``max_bytes`` bytes each."""
    start = 0
    while start < len(rows):
        end, size = start, 0
        while end < len(rows) and end - start < max_rows:
            size += _row_bytes(rows[end])
            if size > max_bytes and end > start:
                break
            end += 1
        yield rows[start:end]
        start = end


def _row(r: dict[str, Any], membership: bool = True) -> dict[str, Any]:
    vector = r["embedding"]
    row = {
        "id": r["id"],
        "embedding": vector.tolist() if isinstance(vector, np.ndarray) else list(vector),
        # Milvus 2.x counts VARCHAR lengths in bytes: cut at a character boundary within URI_MAX bytes.
        "uri": r.get("uri", "").encode()[:URI_MAX].decode(errors="ignore"),
        "sha256": r.get("sha256", ""),
        "drop": r.get("drop", ""),
        "model": r.get("model", ""),
        "metadata": r.get("metadata") or {},
    }
    if membership:
        drops = list(r.get(MEMBERSHIP_FIELD) or ([row["drop"]] if row["drop"] else []))
        if len(drops) > MAX_DROPS_PER_ROW:
            raise CollectionError(
                f"image {row['id']!r} is listed by {len(drops)} drops; a row can belong to at most {MAX_DROPS_PER_ROW}"
            )
        row[MEMBERSHIP_FIELD] = drops
    return row


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
        drops=tuple(entity.get(MEMBERSHIP_FIELD) or ()),
    )
