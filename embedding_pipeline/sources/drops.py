"""What a drop is, and when it counts as complete.

A drop is either a sub-folder of the drop directory (images and/or manifest files inside) or a manifest file
(``.jsonl`` / ``.csv``) placed directly in the drop directory. Its name (the folder or file name) is its Dagster
partition key.

A drop counts as complete when

* it is a folder holding a ``_READY`` file (write it last), or
* nothing in it has been modified for ``settle_s`` seconds (for writers that cannot write a marker).

Hidden names (``.*``) and in-flight names (``*.tmp``, ``*.part``) are ignored, so copying with a temporary name
and renaming at the end is always safe.

The drop directory may also be a prefix in an S3-compatible bucket (``s3://bucket/drops``): each sub-prefix is a
folder drop and each ``.jsonl``/``.csv`` object directly under it a manifest drop; ``_READY`` objects and the settle
time (on the objects' LastModified) work as for folders. Listing the drops is one delimited listing of the top level
(one request per 1,000 drops, however many objects they hold); a drop's own objects are listed only while it is new
and its marker is missing, and for its signature.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import AbstractSet

from embedding_pipeline.runtime.objects import ObjectError, ObjectPath

READY_MARKER = "_READY"
COPY_WORKERS = 8
# estimate_items reads at most this much of a manifest; a larger one counts as this many items (surely big).
ESTIMATE_BYTES = 64 * 1024 * 1024
ESTIMATE_BIG = 10**9  # objects copied at once when a drop is placed in a bucket
# Metadata key of the raw_image_manifest materialization that records what the drop held when it was read.
DROP_SIGNATURE_KEY = "drop_signature"
MANIFEST_SUFFIXES = (".jsonl", ".csv")
_IN_FLIGHT_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload")
# Partition keys appear in paths and expressions: keep them plain.
# \Z, not $: "$" also matches before a trailing newline, and "name\n" is no drop name.
DROP_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")


@dataclass(frozen=True)
class Drop:
    name: str
    path: Path | ObjectPath

    @property
    def is_manifest(self) -> bool:
        if isinstance(self.path, ObjectPath):
            # In a bucket, a manifest drop is an object directly under the drops prefix; a folder drop is a prefix.
            return self.name.lower().endswith(MANIFEST_SUFFIXES) and self.path.is_file()
        return self.path.is_file()

    @property
    def root(self) -> Path | ObjectPath:
        """Where the drop's own relative paths point: its folder, or the folder holding its manifest."""
        return self.path.parent if self.is_manifest else self.path


def ignored(path: Path | ObjectPath | str) -> bool:
    name = path if isinstance(path, str) else path.name
    return name.startswith(".") or name.lower().endswith(_IN_FLIGHT_SUFFIXES)


def ignored_key(relative: str) -> bool:
    """A key below a drop prefix is left out when any of its segments is hidden or in flight, or it is the marker."""
    parts = relative.split("/")
    return relative == READY_MARKER or any(not part or ignored(part) for part in parts)


def _newest_mtime(path: Path) -> float:
    if path.is_file():
        return path.stat().st_mtime
    newest = path.stat().st_mtime
    # lstat and no descent into symlinked folders: a dangling link or a link loop must not stall the drop.
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        for name in dirnames + filenames:
            try:
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
            except OSError:  # removed while we looked: the drop is still changing
                return time.time()
    return newest


def is_complete(drop: Drop, settle_s: float, now: float | None = None) -> bool:
    now = time.time() if now is None else now
    if isinstance(drop.path, ObjectPath):
        return _object_complete(drop, settle_s, now)
    if drop.path.is_dir() and (drop.path / READY_MARKER).exists():
        return True
    return now - _newest_mtime(drop.path) >= settle_s


def _object_complete(drop: Drop, settle_s: float, now: float) -> bool:
    path = drop.path
    assert isinstance(path, ObjectPath)
    try:
        if drop.is_manifest:
            info = path.stat()
            return info is not None and now - info.modified >= settle_s
        if (path / READY_MARKER).is_file():
            return True
        newest = max((o.modified for o in path.files()), default=None)
    except ObjectError:  # the store did not answer: not complete yet, the next tick looks again
        return False
    return newest is not None and now - newest >= settle_s


def scan(drops_dir: Path | ObjectPath) -> tuple[list[Drop], list[str]]:
    """All drops in ``drops_dir`` (complete or not), and the names skipped as invalid."""
    if isinstance(drops_dir, ObjectPath):
        return _scan_objects(drops_dir)
    drops: list[Drop] = []
    invalid: list[str] = []
    if not drops_dir.is_dir():
        return drops, invalid
    for path in sorted(drops_dir.iterdir()):
        if ignored(path):
            continue
        if not (path.is_dir() or path.suffix.lower() in MANIFEST_SUFFIXES):
            invalid.append(path.name)
            continue
        if not DROP_NAME.match(path.name) or path.is_symlink():
            # A symlinked drop would make its target (say "/") the folder its manifest may read from.
            invalid.append(path.name)
            continue
        drops.append(Drop(path.name, path))
    return drops, invalid


def _scan_objects(location: ObjectPath) -> tuple[list[Drop], list[str]]:
    objects, prefixes = location.store.list_level(location.bucket, location.prefix)
    drops: list[Drop] = []
    invalid: list[str] = []
    names = [(p[len(location.prefix) :].rstrip("/"), False) for p in prefixes]
    names += [(o.key[len(location.prefix) :], True) for o in objects]
    for name, is_object in sorted(names):
        if not name or ignored(name):  # "": the prefix's own folder marker ("drops/", as consoles create folders)
            continue
        if is_object and not name.lower().endswith(MANIFEST_SUFFIXES):
            invalid.append(name)
            continue
        if not DROP_NAME.match(name):
            invalid.append(name)
            continue
        drops.append(Drop(name, location / name))
    return drops, invalid


def complete_drops(drops_dir: Path | ObjectPath, settle_s: float, known: AbstractSet[str] = frozenset()) -> list[Drop]:
    """The complete drops whose names are not in ``known`` (drops already known are not looked into)."""
    now = time.time()
    return [d for d in scan(drops_dir)[0] if d.name not in known and is_complete(d, settle_s, now)]


def find_drop(drops_dir: Path | ObjectPath, name: str) -> Drop:
    if isinstance(drops_dir, ObjectPath):
        found = drops_dir / name if DROP_NAME.match(name) else None
        if found is None or not (found.is_dir() or (name.lower().endswith(MANIFEST_SUFFIXES) and found.is_file())):
            raise FileNotFoundError(f"no drop named {name!r} in {drops_dir}")
        return Drop(name, found)
    path = drops_dir / name
    if not DROP_NAME.match(name) or not path.exists():
        raise FileNotFoundError(f"no drop named {name!r} in {drops_dir}")
    if path.is_symlink():
        raise PermissionError(
            f"drop {name!r} in {drops_dir} is a symbolic link; drops are refused as links (a link would make its "
            "target the folder the drop's manifests may read from): copy or move the drop in instead"
        )
    return Drop(name, path)


def drop_signature(drop: Drop) -> str:
    """A short fingerprint of what the drop holds now: every file's relative path, size and mtime (ns).

    Files are chosen like the ingest stage chooses them (hidden and in-flight names and the ``_READY`` marker left
    out, symlinked folders not entered; a link counts by its target path), so a re-scan of an unchanged drop gives
    the same value, and adding, removing, replacing or editing a file (a manifest too) gives another. File contents
    are not read: a scan stays cheap on large drops. URLs a manifest lists are not fetched either.
    """
    digest = hashlib.sha256()
    if isinstance(drop.path, ObjectPath):
        # In a bucket: every object's key, size and ETag (a rewrite changes the ETag even at the same size).
        if drop.is_manifest:
            info = drop.path.stat()
            listed = [(drop.path.name, info.size, info.etag)] if info else []
        else:
            prefix = drop.path.prefix
            listed = [(o.key[len(prefix) :], o.size, o.etag) for o in drop.path.files()]
            listed = [entry for entry in listed if not ignored_key(entry[0])]
        for relative, size, etag in sorted(listed):
            digest.update(f"{relative}\0{size}\0{etag}\n".encode())
        return digest.hexdigest()[:16]
    if drop.path.is_file():
        entries = [(drop.path.name, drop.path)]
    else:
        entries = []
        for dirpath, dirnames, filenames in os.walk(drop.path, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not ignored(Path(d)))
            for name in filenames:
                if not ignored(Path(name)) and name != READY_MARKER:
                    path = Path(dirpath) / name
                    entries.append((path.relative_to(drop.path).as_posix(), path))
    for relative, path in sorted(entries):
        try:
            stat = os.lstat(path)
            target = os.readlink(path) if os.path.islink(path) else ""
        except OSError:  # removed while we looked: that is a change too
            stat, target = None, "<gone>"
        size, mtime = (stat.st_size, stat.st_mtime_ns) if stat else (-1, -1)
        digest.update(f"{relative}\0{size}\0{mtime}\0{target}\n".encode())
    return digest.hexdigest()[:16]


def estimate_items(drop: Drop) -> int:
    """About how many items the drop holds, without reading them: its files (or objects), or the lines of its
    manifest. Used to pick the job that runs a big drop's shards in parallel."""
    if drop.is_manifest:
        # At most ESTIMATE_BYTES are read (the sensor calls this every tick for a new drop): a bigger manifest
        # counts as big.
        if isinstance(drop.path, ObjectPath):
            info = drop.path.stat()
            if info is None or info.size > ESTIMATE_BYTES:
                return ESTIMATE_BIG
            data = drop.path.read_bytes(ESTIMATE_BYTES)
        else:
            with open(drop.path, "rb") as handle:
                data = handle.read(ESTIMATE_BYTES + 1)
            if len(data) > ESTIMATE_BYTES:
                return ESTIMATE_BIG
        return data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
    if isinstance(drop.path, ObjectPath):
        prefix = drop.path.prefix
        return sum(1 for o in drop.path.files() if not ignored_key(o.key[len(prefix) :]))
    count = 0
    for _dirpath, dirnames, filenames in os.walk(drop.path, followlinks=False):
        dirnames[:] = [d for d in dirnames if not ignored(d)]
        count += sum(1 for name in filenames if not ignored(name) and name != READY_MARKER)
    return count


def checked_name(name: str) -> str:
    """``name`` if it is a valid drop name; raises ValueError saying what is allowed."""
    if not DROP_NAME.match(name):
        raise ValueError(f"invalid drop name {name!r}: use letters, digits, '.', '_' or '-' (max 128)")
    return name


def place_drop(drops: Path | ObjectPath, path: Path | ObjectPath, name: str | None = None) -> str:
    """Copy ``path`` (a folder or manifest file, or a prefix or manifest object in a bucket) into the drop
    directory ``drops`` (a folder or a prefix in a bucket) as drop ``name``; returns the name.

    A path already in the drop directory is used where it is. On disk the copy lands under a hidden name and is
    renamed at the end, so the sensor never sees half a drop; in a bucket (no renames there) the objects are
    copied first and the ``_READY`` marker last.
    """
    if isinstance(drops, ObjectPath) or isinstance(path, ObjectPath):
        return _place_objects(drops, path, name)
    source = path.resolve()
    if not source.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    name = checked_name(name or source.name)
    target = drops / name
    if source == target:
        return name
    if target.exists():
        raise FileExistsError(f"a drop named {name!r} already exists in {drops}; pick another name with --drop")
    drops.mkdir(parents=True, exist_ok=True)
    staging = drops / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
    if source.is_dir():
        # Links stay links: copying their targets would smuggle files from outside the allowed roots into the
        # drop, where the confinement check would no longer see where they came from.
        shutil.copytree(source, staging, symlinks=True)
    else:
        shutil.copy2(source, staging)
    staging.rename(target)
    return name


def _place_objects(drops: Path | ObjectPath, source: Path | ObjectPath, name: str | None) -> str:
    """place_drop where the source or the drop directory is in a bucket: upload, server-side copy or download."""
    if isinstance(source, Path):
        source = source.resolve()
        if not source.exists():
            raise FileNotFoundError(f"no such file or folder: {source}")
    name = checked_name(name or source.name)
    if isinstance(source, ObjectPath):
        is_file = source.is_file()
        if not is_file and not source.is_dir():
            raise FileNotFoundError(f"no such object or prefix: {source}")
    else:
        is_file = source.is_file()
    target = drops / name
    if isinstance(source, ObjectPath) and isinstance(target, ObjectPath) and str(source) == str(target):
        return name
    if target.exists():
        raise FileExistsError(f"a drop named {name!r} already exists in {drops}; pick another name with --drop")
    if is_file:
        if not name.lower().endswith(MANIFEST_SUFFIXES):
            raise ValueError(f"a manifest drop needs a .jsonl or .csv name, not {name!r}")
        _copy_one(source, target)
        return name
    pairs: list[tuple[Path | ObjectPath, str]]
    if isinstance(source, Path):
        pairs = [
            (p, p.relative_to(source).as_posix())
            for p in sorted(source.rglob("*"))
            if p.is_file() and not p.is_symlink() and not ignored_key(p.relative_to(source).as_posix())
        ]
    else:
        prefix = source.prefix
        pairs = [
            (ObjectPath(source.store, source.bucket, o.key), o.key[len(prefix) :])
            for o in source.files()
            if not ignored_key(o.key[len(prefix) :])
        ]
    if isinstance(target, Path):
        # A download into the local drop folder: staged under a hidden name, renamed at the end.
        staging = target.parent / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            for item, relative in pairs:
                _copy_one(item, staging / relative)
            staging.mkdir(parents=True, exist_ok=True)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return name
    # Copies in parallel (each is one request); the marker only after every one of them succeeded.
    with ThreadPoolExecutor(COPY_WORKERS) as pool:
        for done in [pool.submit(_copy_one, item, target / relative) for item, relative in pairs]:
            done.result()
    (target / READY_MARKER).write_bytes(b"")
    return name


def _copy_one(source: Path | ObjectPath, target: Path | ObjectPath) -> None:
    if isinstance(source, ObjectPath) and isinstance(target, ObjectPath) and source.store is target.store:
        target.store.copy(source.bucket, source.key, target.bucket, target.key)
        return
    data = source.read_bytes()
    if isinstance(target, Path):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    else:
        target.write_bytes(data)
