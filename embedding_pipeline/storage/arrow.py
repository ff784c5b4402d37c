"""Arrow IPC files for tensor batches and embeddings, one folder per drop, one file per batch.

IPC (Feather v2) rather than Parquet: the files are intermediate, read back whole by the next stage, and IPC
maps them without decoding (Parquet's encoding and compression would cost CPU on every pass for little gain
on already-dense pixels and floats). Tensors use Arrow's fixed-shape tensor extension type, so a file records its
own shape and dtype; every row carries its lineage (drop, sha256, uri).

A drop's folder is written under a temporary name and renamed into place, so a half-written drop is never read
as done.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa

LINEAGE = [("id", pa.string()), ("drop", pa.string()), ("sha256", pa.string()), ("uri", pa.string())]


def tensor_schema(shape: Sequence[int], dtype: str, meta: dict[str, Any] | None = None) -> pa.Schema:
    tensor = pa.fixed_shape_tensor(pa.from_numpy_dtype(np.dtype(dtype)), list(shape))
    return pa.schema([*LINEAGE, ("tensor", tensor)], metadata=_meta(meta))


def embedding_schema(dim: int, meta: dict[str, Any] | None = None) -> pa.Schema:
    fields = [*LINEAGE, ("embedding", pa.list_(pa.float32(), dim)), ("model", pa.string()), ("metadata", pa.string())]
    return pa.schema(fields, metadata=_meta(meta))


def _meta(meta: dict[str, Any] | None) -> dict[str, str] | None:
    return {k: json.dumps(v) for k, v in meta.items()} if meta else None


def tensor_table(rows: dict[str, list], tensors: np.ndarray, schema: pa.Schema) -> pa.Table:
    tensor_type = schema.field("tensor").type
    storage = pa.FixedSizeListArray.from_arrays(
        pa.array(np.ascontiguousarray(tensors).reshape(-1), type=tensor_type.value_type),
        int(np.prod(tensor_type.shape)),
    )
    columns = [pa.array(rows[name], type=t) for name, t in LINEAGE]
    columns.append(pa.ExtensionArray.from_storage(tensor_type, storage))
    return pa.Table.from_arrays(columns, schema=schema)


def embedding_table(rows: dict[str, list], vectors: np.ndarray, schema: pa.Schema) -> pa.Table:
    dim = schema.field("embedding").type.list_size
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1), type=pa.float32())
    columns = [pa.array(rows[name], type=t) for name, t in LINEAGE]
    columns.append(pa.FixedSizeListArray.from_arrays(flat, dim))
    columns.append(pa.array(rows["model"], type=pa.string()))
    columns.append(pa.array(rows["metadata"], type=pa.string()))
    return pa.Table.from_arrays(columns, schema=schema)


def tensors_of(table: pa.Table) -> np.ndarray:
    column = table.column("tensor").combine_chunks()
    return column.to_numpy_ndarray()


def vectors_of(table: pa.Table) -> np.ndarray:
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    return column.values.to_numpy(zero_copy_only=False).reshape(-1, dim)


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file or a folder's entries) to disk: a rename is only as durable as what it points at."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DropWriter:
    """Writes a drop's batch files into a staging folder; :meth:`commit` swaps it in atomically.

    Every file is fsynced before the swap and the parent folder after it, so a crash leaves the old outputs or
    the new ones, never a renamed folder of half-written files."""

    def __init__(self, folder: Path, durable: bool = True):
        """``durable=False`` leaves the files in the page cache (only the benchmark that measures fsync uses it)."""
        self.folder = folder
        self._sync = _fsync if durable else (lambda path: None)
        self.staging = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.staging"
        self.staging.mkdir(parents=True)
        self.files: list[Path] = []
        self.bytes = 0

    def write(self, table: pa.Table) -> Path:
        path = self.staging / f"batch-{len(self.files):05d}.arrow"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        self._sync(path)
        self.files.append(self.folder / path.name)
        self.bytes += path.stat().st_size
        return path

    def add_json(self, name: str, value: Any) -> None:
        """A small side file (failures, reused ids) committed together with the batches."""
        (self.staging / name).write_text(json.dumps(value))
        self._sync(self.staging / name)

    def commit(self) -> list[Path]:
        old = self.folder.parent / f".{self.folder.name}.{uuid.uuid4().hex[:8]}.old"
        self._sync(self.staging)
        if self.folder.exists():
            self.folder.rename(old)
        self.staging.rename(self.folder)
        self._sync(self.folder.parent)
        shutil.rmtree(old, ignore_errors=True)
        return self.files

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> "DropWriter":
        return self

    def __exit__(self, exc_type, *rest: object) -> None:
        if exc_type is not None:
            self.abort()


def batch_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("batch-*.arrow")) if folder.is_dir() else []


def read_batches(folder: Path, columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
    """One table per batch file, memory-mapped: a drop is never held whole. ``columns`` reads only those."""
    for path in batch_files(folder):
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_file(source).read_all()
        yield table.select(list(columns)) if columns else table


def read_json(folder: Path, name: str, default: Any = None) -> Any:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else default


def write_table(path: Path, table: pa.Table) -> None:
    """A single-file table (the drop's manifest), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    _fsync(tmp)
    tmp.replace(path)
    _fsync(path.parent)


def write_parquet(path: Path, table: pa.Table) -> None:
    """A table meant to be read by other tools (near-duplicate groups) as Parquet, written atomically and durably
    like the IPC files: a temporary name in the same folder, fsynced, then renamed over ``path``."""
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
    try:
        pq.write_table(table, str(tmp))
        _fsync(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def read_parquet(path: Path) -> pa.Table:
    import pyarrow.parquet as pq

    return pq.read_table(str(path))


def write_json(path: Path, value: Any) -> None:
    """A small JSON file (a stage's report), written atomically and durably like the tables."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(value))
    _fsync(tmp)
    tmp.replace(path)
    _fsync(path.parent)


def read_table(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all()
