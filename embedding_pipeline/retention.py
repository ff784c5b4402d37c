"""Retention: delete one drop — its source, its files, its rows in Milvus and its Dagster partition.

:func:`plan_drop_deletion` lists what would go (paths with file counts and bytes, rows per collection) without
touching anything; :func:`delete_drop` removes it and reports what went. Both refuse a name that is invalid or that
nothing is known about, and deleting refuses a drop that a run is still working on.

What a drop owns:

* its **source** in the drop directory (folder or manifest file). It is removed, not kept with a tombstone: the
  drop sensor's memory is the set of partitions, so a source left behind after its partition is gone would be
  ingested again as a new drop. Dropping the same name again later is a new drop.
* its **files** under ``<home>/data``: ``manifests/<drop>.arrow``, ``preprocessed/<drop>/``, ``embeddings/<drop>/``,
  ``index/<drop>.json``, ``duplicates/<drop>.parquet`` and leftovers of interrupted writes
  (``.<drop>.<hex>.staging`` / ``.old`` folders, ``<drop>.<hex>.tmp`` files);
* the **downloaded blobs** of its URL items (``blobs/<sha[:2]>/<sha>``, content-addressed, so shared by every drop
  listing the same bytes): a blob is removed only when no other drop's manifest lists a URL with that content;
* its **rows** in every collection of the configured name: ``<milvus.collection>`` itself and each per-model
  ``<milvus.collection>__<model>`` (where ``milvus.collection`` may be an alias, which is never listed itself).
  A row holds one image and lists every drop holding it: a row that another drop still lists only loses this drop
  from its membership and stays searchable; a row listed by this drop alone is deleted;
* its **partition** of ``drops``, and where the event storage supports it, its materialization history.

The order makes an interrupted deletion safe to run again: the source goes first (renamed to a hidden name, which
the sensor ignores, then removed), the partition last, so until the end the drop is still known and a second
``delete_drop`` finishes the job.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from embedding_pipeline.index.client import ImageIndex
from embedding_pipeline.index.collections import ModelCollections
from embedding_pipeline.orchestration.names import DROPS_PARTITION as PARTITIONS
from embedding_pipeline.runtime.locks import drop_lock, membership_lock
from embedding_pipeline.runtime.objects import ObjectPath
from embedding_pipeline.settings import MilvusSettings, Settings
from embedding_pipeline.sources.drops import DROP_NAME
from embedding_pipeline.sources.items import blob_path
from embedding_pipeline.sources.manifest import is_url
from embedding_pipeline.storage import arrow
from embedding_pipeline.storage.layout import drop_files


class UnknownDropError(ValueError):
    """The name is not a drop: nothing of it exists (partition, source, files or rows)."""


class DropBusyError(RuntimeError):
    """A run is still working on the drop: deleting under it would leave half a drop behind."""


@dataclass(frozen=True)
class PlannedPath:
    """A file or folder that belongs to the drop: what it is, how many files it holds and their size."""

    kind: str  # source, manifest, preprocessed, embeddings, index, duplicates, blob, leftover
    path: Path | ObjectPath  # in a bucket: an object, or a prefix (every object under it)
    files: int
    bytes: int


@dataclass
class DeletionPlan:
    """What deleting a drop removes. ``rows`` maps each collection to the drop's row count in it."""

    drop: str
    paths: list[PlannedPath] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    shared_blobs: int = 0  # downloaded blobs of the drop that other drops list too: kept
    partition: bool = False  # the drop is a partition of ``drops`` (False when no instance was asked)
    runs_in_progress: list[str] = field(default_factory=list)

    @property
    def files(self) -> int:
        return sum(p.files for p in self.paths)

    @property
    def bytes(self) -> int:
        return sum(p.bytes for p in self.paths)

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())

    @property
    def empty(self) -> bool:
        """Nothing of the drop exists anywhere."""
        return not self.paths and not self.total_rows and not self.partition

    def as_dict(self) -> dict[str, Any]:
        return {
            "drop": self.drop,
            "paths": [{"kind": p.kind, "path": str(p.path), "files": p.files, "bytes": p.bytes} for p in self.paths],
            "files": self.files,
            "bytes": self.bytes,
            "rows": dict(self.rows),
            "total_rows": self.total_rows,
            "shared_blobs_kept": self.shared_blobs,
            "partition": self.partition,
            "runs_in_progress": list(self.runs_in_progress),
        }

    def markdown(self, rows_title: str = "rows") -> str:
        """A table of every path and collection (what the Dagster run shows as metadata)."""
        lines = ["| what | where | files | bytes | " + rows_title + " |", "|---|---|---:|---:|---:|"]
        for p in self.paths:
            lines.append(f"| {p.kind} | `{p.path}` | {p.files} | {p.bytes} | |")
        for collection, count in sorted(self.rows.items()):
            lines.append(f"| Milvus rows | collection `{collection}` | | | {count} |")
        lines.append(f"| partition | `{PARTITIONS}` / `{self.drop}` | | | {'yes' if self.partition else 'no'} |")
        lines.append(f"| **total** | | **{self.files}** | **{self.bytes}** | **{self.total_rows}** |")
        if self.shared_blobs:
            lines.append(f"\n{self.shared_blobs} downloaded blob(s) are listed by other drops too and are kept.")
        return "\n".join(lines)


@dataclass
class DeletionResult:
    """What :func:`delete_drop` removed: the plan it followed, rows deleted per collection, and the partition."""

    plan: DeletionPlan
    deleted_rows: dict[str, int] = field(default_factory=dict)
    partition_deleted: bool = False
    history: str = ""  # what happened to the partition's materialization history

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.plan.as_dict(),
            "deleted_rows": dict(self.deleted_rows),
            "partition_deleted": self.partition_deleted,
            "history": self.history,
        }


class DropRows(Protocol):
    """The vector store as retention sees it: which collections exist, and a drop's rows in each."""

    def collections(self) -> list[str]: ...

    def count(self, collection: str, drop: str) -> int: ...

    def delete(self, collection: str, drop: str) -> int: ...

    def close(self) -> None: ...


class DropRegistry(Protocol):
    """Where drops are registered as partitions, with their runs and history (the Dagster instance:
    :class:`embedding_pipeline.orchestration.instance.DagsterDrops`)."""

    def is_partition(self, drop: str) -> bool: ...

    def runs_in_progress(self, drop: str, this_run: str | None = None) -> list[str]: ...

    def wipe_history(self, drop: str) -> str: ...

    def delete_partition(self, drop: str) -> None: ...


class MilvusDropRows:
    """:class:`DropRows` on a real Milvus; one client per collection, closed by :meth:`close`."""

    def __init__(self, settings: MilvusSettings):
        self.settings = settings
        self._indexes: dict[str, ImageIndex] = {}

    def collections(self) -> list[str]:
        # Real collections only (the per-model ones, and a legacy one): never the alias, through which a row
        # would be counted or deleted twice.
        with ModelCollections(self.settings) as collections:
            return collections.names()

    def _index(self, collection: str) -> ImageIndex:
        if collection not in self._indexes:
            self._indexes[collection] = ImageIndex(self.settings.model_copy(update={"collection": collection}))
        return self._indexes[collection]

    def count(self, collection: str, drop: str) -> int:
        # Strong: rows written a moment ago by another process (a run's index step) must be counted.
        return self._index(collection).count_drop(drop, consistency_level="Strong")

    def delete(self, collection: str, drop: str) -> int:
        # Persisted by delete_drop: a deleted drop must not come back after a server restart.
        return self._index(collection).delete_drop(drop)

    def close(self) -> None:
        for index in self._indexes.values():
            index.close()
        self._indexes.clear()


def check_name(drop: str) -> str:
    if not isinstance(drop, str) or not DROP_NAME.match(drop):
        raise ValueError(f"invalid drop name {drop!r}: use letters, digits, '.', '_' or '-' (max 128)")
    return drop


def _size(path: Path | ObjectPath) -> tuple[int, int]:
    """(files, bytes) under ``path``, links counted as themselves and never followed."""
    if isinstance(path, ObjectPath):
        info = path.stat() if path.key else None
        if info is not None:
            return 1, info.size
        listed = list(path.files())
        return len(listed), sum(o.size for o in listed)
    if path.is_symlink() or path.is_file():
        return 1, path.lstat().st_size
    files = size = 0
    for dirpath, _dirnames, filenames in os.walk(path, followlinks=False):
        for name in filenames:
            try:
                size += os.lstat(os.path.join(dirpath, name)).st_size
                files += 1
            except OSError:  # removed while we looked
                pass
    return files, size


def _planned(kind: str, path: Path | ObjectPath) -> PlannedPath:
    files, size = _size(path)
    return PlannedPath(kind, path, files, size)


def _exists(path: Path | ObjectPath) -> bool:
    if isinstance(path, ObjectPath):
        return path.exists()
    return path.exists() or path.is_symlink()


def _leftovers(settings: Settings, drop: str) -> list[Path]:
    """Staging and swapped-out folders and temporary manifests that interrupted writes of this drop left behind.
    Matched exactly (``<drop>.<8 hex>``), so drop ``a`` never claims drop ``a.b``'s files."""
    files = drop_files(settings, drop)
    if isinstance(files.data, ObjectPath):
        # In a bucket a write is one PUT or an attempt under the drop's own prefix (removed with it): no leftovers.
        return []
    folder_pattern = re.compile(rf"^\.{re.escape(drop)}\.[0-9a-f]{{8}}\.(staging|old)$")
    manifest_pattern = re.compile(rf"^{re.escape(drop)}\.[0-9a-f]{{8}}\.tmp$")
    found: list[Path] = []
    for location, pattern in (
        (files.preprocessed, folder_pattern),
        (files.embeddings, folder_pattern),
        (files.manifest, manifest_pattern),
        (files.index_report, manifest_pattern),
        (files.duplicates, manifest_pattern),
    ):
        parent = location.parent
        if isinstance(parent, Path) and parent.is_dir():
            found.extend(sorted(p for p in parent.iterdir() if pattern.match(p.name)))
    return found


def _downloaded(manifest: Path | ObjectPath) -> set[str]:
    """sha256 of every URL item a manifest lists (their bytes live in the blob store)."""
    table = arrow.read_table(manifest).select(["uri", "sha256"])
    return {sha for uri, sha in zip(*(table.column(c).to_pylist() for c in ("uri", "sha256"))) if sha and is_url(uri)}


def _blobs(settings: Settings, drop: str) -> tuple[list[Path], int]:
    """The drop's downloaded blobs that no other drop lists, and how many are shared (kept)."""
    files = drop_files(settings, drop)
    if not files.manifest.is_file():
        return [], 0
    own = _downloaded(files.manifest)
    if not own:
        return [], 0
    others: set[str] = set()
    manifests: list[Path | ObjectPath] = list(files.manifest.parent.glob("*.arrow"))
    for manifest in sorted(manifests, key=str):
        if str(manifest) != str(files.manifest):
            others |= _downloaded(manifest)
    existing = [sha for sha in sorted(own) if blob_path(files.blobs, sha).is_file()]
    mine = [blob_path(files.blobs, sha) for sha in existing if sha not in others]
    return mine, len(existing) - len(mine)


def plan_drop_deletion(
    settings: Settings,
    drop: str,
    registry: DropRegistry | None = None,
    rows: DropRows | None = None,
    this_run: str | None = None,
) -> DeletionPlan:
    """What deleting ``drop`` would remove; removes nothing.

    ``registry`` (optional) adds whether the drop is a partition and which runs are working on it (``this_run``,
    the caller's own run, left out). ``rows`` is the vector store (default: the configured Milvus). Raises
    ``ValueError`` for an invalid name and :class:`UnknownDropError` when nothing of the drop exists.
    """
    check_name(drop)
    files = drop_files(settings, drop)
    plan = DeletionPlan(drop)
    source = settings.drops_location / drop
    if _exists(source):
        plan.paths.append(_planned("source", source))
    for kind, path in (
        ("manifest", files.manifest),
        ("preprocessed", files.preprocessed),
        ("embeddings", files.embeddings),
        ("index", files.index_report),
        ("duplicates", files.duplicates),
    ):
        if _exists(path):
            plan.paths.append(_planned(kind, path))
    blobs, plan.shared_blobs = _blobs(settings, drop)
    plan.paths.extend(_planned("blob", path) for path in blobs)
    plan.paths.extend(_planned("leftover", path) for path in _leftovers(settings, drop))
    with ExitStack() as stack:
        if rows is None:
            rows = MilvusDropRows(settings.milvus)
            stack.callback(rows.close)
        for collection in rows.collections():
            count = rows.count(collection, drop)
            if count:
                plan.rows[collection] = count
    if registry is not None:
        plan.partition = registry.is_partition(drop)
        plan.runs_in_progress = registry.runs_in_progress(drop, this_run)
    if plan.empty:
        raise UnknownDropError(
            f"no drop named {drop!r}: it is not a partition of {PARTITIONS!r} and has no source in "
            f"{settings.drops_location}, no files under {settings.outputs} and no rows in Milvus "
            f"(collections {settings.milvus.collection!r} and {settings.milvus.collection + '__*'!r})"
        )
    return plan


def _remove(path: Path | ObjectPath) -> None:
    if isinstance(path, ObjectPath):
        # No rename in a bucket. The drop stays a partition until the very end of the deletion, so neither the
        # sensor nor the schedule starts a run for what is left while objects go.
        if path.is_file():
            path.unlink()
        else:
            path.store.delete_prefix(path.bucket, path.prefix)
        return
    if path.is_dir() and not path.is_symlink():
        # Renamed to a hidden name first: scans (the sensor, the schedule) ignore it from this moment on, even if
        # removing a large folder takes a while or is interrupted.
        hidden = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.deleting"
        path.rename(hidden)
        shutil.rmtree(hidden)
    elif _exists(path):
        path.unlink()
        if path.parent.name != "blobs" and path.parent.parent.name == "blobs":
            # A blob's fan-out folder (blobs/<sha[:2]>/) goes with its last blob.
            with contextlib.suppress(OSError):
                path.parent.rmdir()


def delete_drop(
    settings: Settings,
    drop: str,
    registry: DropRegistry,
    rows: DropRows | None = None,
    this_run: str | None = None,
) -> DeletionResult:
    """Delete ``drop``: its source, files, unshared blobs, rows in every collection, history and partition.

    Refuses (before removing anything) an invalid or unknown name, and a drop with a run queued or in progress
    other than ``this_run``. Raises if rows remain in a collection after the delete.
    """
    check_name(drop)
    with ExitStack() as stack:
        # No stage of this drop runs while it is deleted (the stages take the same lock), and the check for runs
        # in progress happens under it, so none can start between the check and the deletion's first step.
        stack.enter_context(drop_lock(settings.paths.locks, drop))
        if rows is None:
            rows = MilvusDropRows(settings.milvus)
            stack.callback(rows.close)
        plan = plan_drop_deletion(settings, drop, registry, rows=rows, this_run=this_run)
        if plan.runs_in_progress:
            raise DropBusyError(
                f"drop {drop!r} has {len(plan.runs_in_progress)} run(s) queued or in progress "
                f"({', '.join(plan.runs_in_progress)}); wait for them to finish or cancel them, then delete again"
            )
        result = DeletionResult(plan)
        sources = [p for p in plan.paths if p.kind == "source"]
        # The source first: from here on no sensor or schedule can see the drop and ingest it again.
        for planned in sources + [p for p in plan.paths if p.kind != "source"]:
            _remove(planned.path)
        for collection in rows.collections():
            with membership_lock(settings.paths.locks):
                deleted = rows.delete(collection, drop)
            remaining = rows.count(collection, drop)
            if remaining:
                raise RuntimeError(
                    f"{remaining} row(s) of drop {drop!r} are still in collection {collection!r} after deleting "
                    f"{deleted}; run the deletion again"
                )
            if deleted or collection in plan.rows:
                result.deleted_rows[collection] = deleted
    result.history = registry.wipe_history(drop)
    # The partition last: until here the drop stays known, so an interrupted deletion can be run again.
    registry.delete_partition(drop)
    result.partition_deleted = plan.partition and not registry.is_partition(drop)
    return result
