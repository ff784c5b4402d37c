"""Arrow IPC files for tensor batches and embeddings, one folder per drop, one file per batch.

IPC (Feather v2) rather than Parquet: the files are intermediate, read back whole by the next stage, and IPC
maps them without decoding (Parquet's encoding and compression would cost CPU on every pass for little gain
on already-dense pixels and floats). Tensors use Arrow's fixed-shape tensor extension type, so a file records its
own shape and dtype; every row carries its lineage (drop, sha256, uri).

A drop's folder is written under a temporary name and renamed into place, so a half-written drop is never read
as done.

The same functions take an :class:`ObjectPath` (stage outputs in an S3-compatible bucket). A bucket has no rename,
so a drop's "folder" there is committed with a small object: each write attempt puts its files under
``<folder>/<attempt>/`` and then one PUT of ``<folder>/_COMMIT.json`` names the attempt and its files. Readers
trust the commit object only: the files of an interrupted attempt are never listed by it, so never read. S3 shows
a PUT whole or not at all, and reads after a write see it, so a reader sees the old commit or the new one. After a
commit, attempts other than the new one and the one it replaced are deleted (a reader that read the previous
commit just before can still finish).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa

from embedding_pipeline.runtime.objects import ObjectPath

Location = Path | ObjectPath
COMMIT = "_COMMIT.json"
PLAN = "_plan.json"
ATTEMPT = "_ATTEMPT"  # on disk: the committed attempt's name, inside the folder

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


def new_attempt(folder: Location) -> str:
    """A fresh write attempt's name: 8 hex digits on disk (the staging folder ``.<drop>.<attempt>.staging``), a
    time-ordered name in a bucket (so a listing shows attempts oldest first)."""
    if isinstance(folder, ObjectPath):
        return f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
    return uuid.uuid4().hex[:8]


def _batch_name(shard: int | None, n: int) -> str:
    # Shards of one attempt write side by side: "s0003-batch-00012.arrow"; the committing writer's own files
    # (rows carried over) are "batch-00000.arrow".
    return f"{'' if shard is None else f's{shard:04d}-'}batch-{n:05d}.arrow"


class DropWriter:
    """Writes a drop's batch files into a staging folder; :meth:`commit` swaps it in atomically.

    Every file is fsynced before the swap and the parent folder after it, so a crash leaves the old outputs or
    the new ones, never a renamed folder of half-written files.

    Shards: writers given the same ``attempt`` and each its own ``shard`` write into one staging folder (from
    parallel processes); they never commit. A writer of that attempt without a shard commits all their files."""

    def __init__(self, folder: Path, durable: bool = True, attempt: str | None = None, shard: int | None = None):
        """``durable=False`` leaves the files in the page cache (only the benchmark that measures fsync uses it)."""
        self.folder = folder
        self._sync = _fsync if durable else (lambda path: None)
        self.attempt = attempt or new_attempt(folder)
        self.staging = folder.parent / f".{folder.name}.{self.attempt}.staging"
        self.staging.mkdir(parents=True, exist_ok=attempt is not None)
        # An attempt named by the caller is shared (a plan, shards): aborting removes this writer's files only, so a
        # retried commit still finds the plan and every shard's files.
        self.shared = attempt is not None
        self.shard = shard
        self.files: list[Path] = []
        self._own: list[Path] = []  # the files this writer wrote in the staging folder
        self.published = False
        self.bytes = 0
        if shard is not None:  # a retried shard starts over
            for stale in self.staging.glob(f"s{shard:04d}-batch-*.arrow"):
                stale.unlink()

    def write(self, table: pa.Table) -> Path:
        path = self.staging / _batch_name(self.shard, len(self.files))
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        self._sync(path)
        self.files.append(self.folder / path.name)
        self._own.append(path)
        self.bytes += path.stat().st_size
        return path

    def add_json(self, name: str, value: Any) -> None:
        """A small side file (failures, reused ids) committed together with the batches."""
        (self.staging / name).write_text(json.dumps(value))
        self._sync(self.staging / name)
        self._own.append(self.staging / name)

    def commit(self, shard_files: int = 0, rows: Sequence[int] | None = None) -> list[Path]:
        """Swap the attempt in. ``shard_files``: how many files the attempt's shards reported; a different count
        (files gone under a concurrent writer's clean-up) refuses the commit instead of publishing a partial set.
        ``rows`` (the shards' rows per file) is for the bucket's commit record; on disk a file's footer is cheap."""
        if self.shard is not None:
            raise RuntimeError("a shard's writer does not commit; the attempt's writer without a shard does")
        names = sorted(p.name for p in self.staging.glob("*batch-*.arrow"))
        _check_count(self.folder, len(names), shard_files + len(self.files))
        (self.staging / PLAN).unlink(missing_ok=True)
        self.files = [self.folder / name for name in names]
        self.bytes = sum((self.staging / name).stat().st_size for name in names)
        (self.staging / ATTEMPT).write_text(self.attempt)  # what this commit is: see commit_id()
        self._sync(self.staging / ATTEMPT)
        old = self.folder.parent / f".{self.folder.name}.{uuid.uuid4().hex[:8]}.old"
        self._sync(self.staging)
        if self.folder.exists():
            self.folder.rename(old)
        self.staging.rename(self.folder)
        self.published = True
        self._sync(self.folder.parent)
        shutil.rmtree(old, ignore_errors=True)
        return self.files

    def abort(self) -> None:
        if self.published:  # in place already: nothing of it may be removed
            return
        if self.shard is not None or self.shared:  # the plan and the other writers' files stay
            for path in self._own:
                path.unlink(missing_ok=True)
            return
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> "DropWriter":
        return self

    def __exit__(self, exc_type, *rest: object) -> None:
        if exc_type is not None:
            self.abort()


def _ipc_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _read_commit(folder: ObjectPath) -> dict[str, Any] | None:
    marker = folder / COMMIT
    if not marker.is_file():
        return None
    return json.loads(marker.read_bytes())


class ObjectDropWriter:
    """:class:`DropWriter` for a folder in a bucket: files under ``<folder>/<attempt>/``, then the commit object
    (see the module's docstring). Shards work as for :class:`DropWriter`.

    Batches upload in the background (``UPLOADS_IN_FLIGHT`` at most, so memory stays bounded) while the caller
    makes the next one; :meth:`flush` (at :meth:`commit` and at the end of a ``with`` block) waits for them and
    raises the first upload error."""

    UPLOADS_IN_FLIGHT = 2

    def __init__(self, folder: ObjectPath, attempt: str | None = None, shard: int | None = None):
        self.folder = folder
        self.attempt = attempt or new_attempt(folder)
        self.staging = folder / self.attempt
        self.shared = attempt is not None  # see DropWriter
        self.shard = shard
        self.files: list[ObjectPath] = []
        self._own: list[ObjectPath] = []
        self.published = False
        self.side: list[str] = []
        self.bytes = 0
        self.rows: list[int] = []  # per file this writer wrote
        self._uploads = ThreadPoolExecutor(self.UPLOADS_IN_FLIGHT, thread_name_prefix="upload")
        self._pending: deque[Future] = deque()
        if shard is not None:  # a retried shard starts over
            folder.store.delete_prefix(folder.bucket, f"{self.staging.prefix}s{shard:04d}-batch-", folder=False)

    def write(self, table: pa.Table) -> ObjectPath:
        data = _ipc_bytes(table)
        path = self.staging / _batch_name(self.shard, len(self.files))
        self._wait(self.UPLOADS_IN_FLIGHT - 1)
        self._pending.append(self._uploads.submit(path.write_bytes, data))
        self.files.append(path)
        self._own.append(path)
        self.rows.append(table.num_rows)
        self.bytes += len(data)
        return path

    def _wait(self, keep: int) -> None:
        while len(self._pending) > keep:
            self._pending.popleft().result()

    def flush(self) -> None:
        """Wait for every upload so far; raises the first that failed."""
        self._wait(0)

    def add_json(self, name: str, value: Any) -> None:
        (self.staging / name).write_bytes(json.dumps(value).encode())
        self._own.append(self.staging / name)
        self.side.append(name)

    def commit(self, shard_files: int = 0, rows: Sequence[int] | None = None) -> list[ObjectPath]:
        """Publish the attempt (see :meth:`DropWriter.commit`). With ``rows`` for every shard file, the record also
        holds each file's rows (in file order), so a reader plans without fetching the files."""
        if self.shard is not None:
            raise RuntimeError("a shard's writer does not commit; the attempt's writer without a shard does")
        self.flush()
        listed = {
            o.key[len(self.staging.prefix) :]: o.size
            for o in self.folder.store.list_objects(self.folder.bucket, self.staging.prefix)
        }
        names = sorted(n for n in listed if "/" not in n and n.endswith(".arrow") and "batch-" in n)
        _check_count(self.folder, len(names), shard_files + len(self.files))
        # Sorted names put this writer's own "batch-*" files before the shards' "s0000-*" ones.
        all_rows = [*self.rows, *rows] if rows is not None and len(rows) == shard_files else None
        self.files = [self.staging / name for name in names]
        self.bytes = sum(listed[n] for n in names)
        previous = _read_commit(self.folder)
        record = {
            "attempt": self.attempt,
            "files": names,
            "side": self.side,
            "bytes": self.bytes,
            "previous": previous["attempt"] if previous else None,
            **({"rows": all_rows} if all_rows is not None else {}),
        }
        (self.folder / COMMIT).write_bytes(json.dumps(record).encode())
        self.published = True
        keep = {self.attempt, record["previous"]}
        store = self.folder.store
        try:
            _, attempts = store.list_level(self.folder.bucket, self.folder.prefix)
            for prefix in attempts:
                if prefix[len(self.folder.prefix) :].rstrip("/") not in keep:
                    store.delete_prefix(self.folder.bucket, prefix)
        except Exception as exc:  # noqa: BLE001 - published already: old attempts go at the next commit
            logging.getLogger(__name__).warning(f"{self.folder}: old attempts left for the next commit: {exc}")
        return self.files

    def abort(self) -> None:
        if self.published:  # in place already: nothing of it may be removed
            return
        for upload in self._pending:  # started uploads finish (or fail) before their objects are removed
            upload.cancel()
        for upload in self._pending:
            if not upload.cancelled():
                try:
                    upload.result()
                except Exception:  # noqa: BLE001 - the write is being abandoned anyway
                    pass
        self._pending.clear()
        try:
            if self.shard is not None or self.shared:  # the plan and the other writers' files stay
                self.folder.store.delete(self.folder.bucket, [p.key for p in self._own])
                return
            self.folder.store.delete_prefix(self.folder.bucket, self.staging.prefix)
        except Exception:  # noqa: BLE001 - best effort: an uncommitted attempt is never read and goes at the next commit
            pass

    def __enter__(self) -> "ObjectDropWriter":
        return self

    def __exit__(self, exc_type, *rest: object) -> None:
        try:
            if exc_type is not None:
                self.abort()
            else:
                self.flush()
        finally:
            self._uploads.shutdown(wait=True)


def _check_count(folder: Location, found: int, expected: int) -> None:
    if found != expected:
        raise RuntimeError(
            f"{folder}: the attempt holds {found} batch file(s), its writers wrote {expected}; another write of "
            "this output ran meanwhile, so nothing is committed (re-run the drop)"
        )


def open_writer(
    folder: Location, durable: bool = True, attempt: str | None = None, shard: int | None = None
) -> DropWriter | ObjectDropWriter:
    """The writer of a drop's batch folder, on disk or in a bucket (``attempt``/``shard``: see DropWriter)."""
    if isinstance(folder, ObjectPath):
        return ObjectDropWriter(folder, attempt, shard)
    return DropWriter(folder, durable, attempt, shard)


def discard_attempts(folder: Location) -> None:
    """Remove the uncommitted attempts a failed run left of ``folder`` on disk (one run per drop at a time, so none
    is in progress); in a bucket the next commit removes them."""
    if isinstance(folder, ObjectPath):
        return
    for stale in folder.parent.glob(f".{folder.name}.*.staging"):
        if re.fullmatch(rf"\.{re.escape(folder.name)}\.[0-9a-f]{{8}}\.staging", stale.name):
            shutil.rmtree(stale, ignore_errors=True)


def staging_of(folder: Location, attempt: str) -> Location:
    """Where attempt ``attempt`` of ``folder`` is written before its commit."""
    if isinstance(folder, ObjectPath):
        return folder / attempt
    return folder.parent / f".{folder.name}.{attempt}.staging"


def write_plan(folder: Location, attempt: str, plan: Any) -> None:
    """A stage's plan (JSON, never pickle: the bucket is not trusted with code), kept with the attempt so that
    its shards, in other processes, read the same plan; removed at the commit."""
    path = staging_of(folder, attempt) / PLAN
    if isinstance(path, Path):
        path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, plan)


def read_plan(folder: Location, attempt: str) -> Any:
    plan = read_json_file(staging_of(folder, attempt) / PLAN)
    if plan is None:
        raise FileNotFoundError(f"no plan for write attempt {attempt} of {folder} (its run was replaced?)")
    return plan


def batch_files(folder: Location) -> list[Any]:
    if isinstance(folder, ObjectPath):
        commit = _read_commit(folder)
        return [folder / commit["attempt"] / name for name in commit["files"]] if commit else []
    return sorted(folder.glob("*batch-*.arrow")) if folder.is_dir() else []


def read_batch(path: Location) -> pa.Table:
    """One batch file: memory-mapped on disk, fetched whole from a bucket."""
    if isinstance(path, ObjectPath):
        return pa.ipc.open_file(pa.py_buffer(path.read_bytes())).read_all()
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all()


def read_batches(folder: Location, columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
    """One table per batch file, memory-mapped: a drop is never held whole. ``columns`` reads only those.
    In a bucket, one object at a time is fetched."""
    for path in batch_files(folder):
        table = read_batch(path)
        yield table.select(list(columns)) if columns else table


def batch_rows(folder: Location) -> list[int]:
    """Rows per batch file, in :func:`batch_files` order: from a bucket's commit record when it has them (no file
    fetched), else from each file (on disk only its footer and one column are touched)."""
    if isinstance(folder, ObjectPath):
        commit = _read_commit(folder)
        if commit and len(commit.get("rows", [])) == len(commit["files"]):
            return [int(n) for n in commit["rows"]]
    return [t.num_rows for t in read_batches(folder, columns=["id"])]


def read_json(folder: Location, name: str, default: Any = None) -> Any:
    if isinstance(folder, ObjectPath):
        commit = _read_commit(folder)
        if not commit or name not in commit.get("side", []):
            return default
        return json.loads((folder / commit["attempt"] / name).read_bytes())
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else default


def commit_id(folder: Location) -> str | None:
    """The name of the attempt whose outputs ``folder`` holds now (None: none, or written before names were kept):
    a stage planned on one commit checks that it still reads that one."""
    if isinstance(folder, ObjectPath):
        commit = _read_commit(folder)
        return str(commit["attempt"]) if commit else None
    marker = folder / ATTEMPT
    return marker.read_text().strip() if marker.is_file() else None


def folder_exists(folder: Location) -> bool:
    """Whether a batch folder holds committed outputs."""
    if isinstance(folder, ObjectPath):
        return (folder / COMMIT).is_file()
    return folder.is_dir()


def write_table(path: Location, table: pa.Table) -> None:
    """A single-file table (the drop's manifest), written atomically."""
    if isinstance(path, ObjectPath):
        path.write_bytes(_ipc_bytes(table))  # one PUT: whole or not at all
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    _fsync(tmp)
    tmp.replace(path)
    _fsync(path.parent)


def write_parquet(path: Location, table: pa.Table) -> None:
    """A table meant to be read by other tools (near-duplicate groups) as Parquet, written atomically and durably
    like the IPC files: a temporary name in the same folder, fsynced, then renamed over ``path``."""
    import pyarrow.parquet as pq

    if isinstance(path, ObjectPath):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        path.write_bytes(sink.getvalue().to_pybytes())
        return

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


def read_parquet(path: Location) -> pa.Table:
    import pyarrow.parquet as pq

    if isinstance(path, ObjectPath):
        return pq.read_table(pa.BufferReader(path.read_bytes()))

    return pq.read_table(str(path))


def write_json(path: Location, value: Any) -> None:
    """A small JSON file (a stage's report), written atomically and durably like the tables."""
    if isinstance(path, ObjectPath):
        path.write_bytes(json.dumps(value).encode())
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(value))
    _fsync(tmp)
    tmp.replace(path)
    _fsync(path.parent)


def read_json_file(path: Location) -> Any:
    """A JSON file written by :func:`write_json`, or None when there is none."""
    if isinstance(path, ObjectPath):
        return json.loads(path.read_bytes()) if path.is_file() else None
    return json.loads(path.read_text()) if path.is_file() else None


def read_table(path: Location) -> pa.Table:
    if isinstance(path, ObjectPath):
        return pa.ipc.open_file(pa.py_buffer(path.read_bytes())).read_all()
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all()
