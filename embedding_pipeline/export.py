"""Export a collection's rows, vectors included, to one Parquet file (for notebooks, Spark, DuckDB).

Rows are read from Milvus a page at a time with the index client's escaped key cursor and written as one Parquet row
group per page, so memory stays flat whatever the collection's size. The file is written under a temporary name next
to the target and renamed into place when complete: a failed export never leaves a half-written file behind.

Columns: ``id``, ``uri``, ``drop``, ``drops`` (every drop that lists the image), ``sha256``, ``model``, ``metadata``
(a JSON string) and ``embedding``, a fixed-size list of float32 of the collection's dimension.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedding_pipeline.index import expressions
from embedding_pipeline.index.client import VECTOR_FIELD, CollectionError, ImageIndex, drop_filter
from embedding_pipeline.index.collections import ModelCollections
from embedding_pipeline.index.filters import MEMBERSHIP_FIELD
from embedding_pipeline.settings import MilvusSettings

PAGE_ROWS = 4096  # rows per Milvus query and per Parquet row group (about 21 MB of 1280-d vectors)
SCALAR_COLUMNS = ("id", "uri", "drop", "drops", "sha256", "model", "metadata")
# Keys of the file's schema metadata.
COLLECTION_KEY = b"embedding_pipeline.collection"
DIMENSION_KEY = b"embedding_pipeline.dimension"


class ExportError(ValueError):
    """The export cannot run as asked (an unknown drop, no collection, both or neither of drops and all)."""


def export_schema(dim: int, collection: str = "") -> pa.Schema:
    """The schema of an export file for ``dim``-dimensional vectors."""
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("uri", pa.string()),
        pa.field("drop", pa.string()),
        pa.field("drops", pa.list_(pa.string())),
        pa.field("sha256", pa.string()),
        pa.field("model", pa.string()),
        pa.field("metadata", pa.string()),
        pa.field(VECTOR_FIELD, pa.list_(pa.float32(), dim)),
    ]
    return pa.schema(fields, metadata={COLLECTION_KEY: collection.encode(), DIMENSION_KEY: str(dim).encode()})


def page_table(rows: Sequence[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """One page of Milvus rows as a table of ``schema``. A row without ``drops`` (a collection made before drop
    membership) is listed by its ``drop``; a vector of the wrong length is refused."""
    if not rows:
        return schema.empty_table()
    dim = schema.field(VECTOR_FIELD).type.list_size
    try:
        vectors = np.asarray([r[VECTOR_FIELD] for r in rows], dtype=np.float32).reshape(len(rows), -1)
    except ValueError:  # vectors of different lengths
        vectors = np.empty((len(rows), 0), dtype=np.float32)
    if vectors.shape != (len(rows), dim):
        bad = next((r["id"] for r in rows if len(r[VECTOR_FIELD]) != dim), rows[0]["id"])
        raise CollectionError(f"row {bad!r} has a vector whose length is not the collection's dimension {dim}")
    columns = {
        "id": [r["id"] for r in rows],
        "uri": [r.get("uri", "") for r in rows],
        "drop": [r.get("drop", "") for r in rows],
        "drops": [list(r.get(MEMBERSHIP_FIELD) or ([r["drop"]] if r.get("drop") else [])) for r in rows],
        "sha256": [r.get("sha256", "") for r in rows],
        "model": [r.get("model", "") for r in rows],
        "metadata": [json.dumps(r.get("metadata") or {}, ensure_ascii=False) for r in rows],
    }
    arrays = [pa.array(columns[name], type=schema.field(name).type) for name in SCALAR_COLUMNS]
    arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim))
    return pa.Table.from_arrays(arrays, schema=schema)


@dataclass(frozen=True)
class WriteResult:
    path: Path
    rows: int
    bytes: int
    row_groups: int


def write_pages(pages: Iterable[Sequence[dict[str, Any]]], schema: pa.Schema, out: Path) -> WriteResult:
    """Write ``pages`` (each one row group) to ``out`` through a temporary file in the same folder, fsynced and
    renamed into place when every page is written; on any failure the temporary file is removed and ``out`` is left
    as it was. No pages still make a valid file with the schema and no rows."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    tmp = Path(name)
    rows = groups = 0
    try:
        with os.fdopen(fd, "wb") as sink:
            with pq.ParquetWriter(sink, schema) as writer:
                for page in pages:
                    if not page:
                        continue
                    writer.write_table(page_table(page, schema), row_group_size=len(page))
                    rows += len(page)
                    groups += 1
            sink.flush()
            os.fsync(sink.fileno())
        # mkstemp makes the file owner-only: give it the permissions a plain new file gets.
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return WriteResult(out, rows, out.stat().st_size, groups)


class RowSource(Protocol):
    """Where exported rows come from: a collection of an :class:`ImageIndex` (see :class:`MilvusRows`)."""

    collection: str

    def dimension(self) -> int | None: ...

    def has_membership(self) -> bool: ...

    def pages(
        self, filter: str, fields: Sequence[str], page_rows: int = ..., strong: bool = ...
    ) -> Iterator[list[dict[str, Any]]]: ...


def selection_filter(drops: Sequence[str], membership: bool) -> str:
    """The expression selecting the rows of ``drops`` (every row when empty)."""
    if not drops:
        return 'id != ""'
    parts = [drop_filter(d) if membership else expressions.equals("drop", d) for d in drops]
    return parts[0] if len(parts) == 1 else " or ".join(f"({p})" for p in parts)


@dataclass(frozen=True)
class ExportSummary:
    path: str
    collection: str
    dimension: int
    drops: list[str]  # empty: the whole collection
    rows: int
    bytes: int
    row_groups: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_selection(drops: Sequence[str], all_rows: bool) -> list[str]:
    """The drops to export, in order without repeats; refuses both or neither of ``drops`` and ``all_rows``."""
    if bool(drops) == bool(all_rows):
        raise ExportError("name the drops to export or ask for all of them (--all), not both and not neither")
    for drop in drops:
        if not drop:
            raise ExportError("a drop name is empty")
    return list(dict.fromkeys(drops))


def export_rows(
    source: RowSource, out: Path, drops: Sequence[str] = (), all_rows: bool = False, page_rows: int = PAGE_ROWS
) -> ExportSummary:
    """Write the rows of ``drops`` (or every row, with ``all_rows``) of ``source``'s collection to ``out``.

    An unknown drop (no row of the collection lists it) is refused before anything is written."""
    started = time.perf_counter()
    wanted = check_selection(drops, all_rows)
    dim = source.dimension()
    if dim is None:
        raise ExportError(f"collection {source.collection!r} does not exist")
    membership = source.has_membership()
    unknown = [d for d in wanted if not _has_rows(source, selection_filter([d], membership))]
    if unknown:
        raise ExportError(
            f"unknown drop(s) {', '.join(repr(d) for d in unknown)}: no row of collection {source.collection!r} "
            "belongs to them"
        )
    fields = ["uri", "drop", "sha256", "model", "metadata", VECTOR_FIELD] + ([MEMBERSHIP_FIELD] if membership else [])
    pages = source.pages(selection_filter(wanted, membership), fields, page_rows=page_rows)
    written = write_pages(pages, export_schema(dim, source.collection), out)
    return ExportSummary(
        str(written.path),
        source.collection,
        dim,
        wanted,
        written.rows,
        written.bytes,
        written.row_groups,
        round(time.perf_counter() - started, 3),
    )


def _has_rows(source: RowSource, filter: str) -> bool:
    return any(page for page in source.pages(filter, [], page_rows=1))


def export_embeddings(
    milvus: MilvusSettings,
    out: Path,
    drops: Sequence[str] = (),
    all_rows: bool = False,
    collection: str | None = None,
    page_rows: int = PAGE_ROWS,
) -> ExportSummary:
    """Export from ``collection``, or by default from the collection search uses (``milvus.collection`` resolved
    through its alias), to the Parquet file ``out``; see :func:`export_rows`."""
    check_selection(drops, all_rows)
    if not collection:
        with ModelCollections(milvus) as collections:
            collection = collections.search_collection()
        if collection is None:
            raise ExportError(f"nothing to export: no collection behind {milvus.collection!r} yet")
    with ImageIndex(milvus.model_copy(update={"collection": collection})) as index:
        return export_rows(index, out, drops, all_rows, page_rows)
