"""What a drop is, and when it counts as complete.

A drop is either a sub-folder of the drop directory (images and/or manifest files inside) or a manifest file
(``.jsonl`` / ``.csv``) placed directly in the drop directory. Its name (the folder or file name) is its Dagster
partition key.

A drop counts as complete when

* it is a folder holding a ``_READY`` file (write it last), or
* nothing in it has been modified for ``settle_s`` seconds (for writers that cannot write a marker).

Hidden names (``.*``) and in-flight names (``*.tmp``, ``*.part``) are ignored, so copying with a temporary name
and renaming at the end is always safe.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

READY_MARKER = "_READY"
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
    path: Path

    @property
    def is_manifest(self) -> bool:
        return self.path.is_file()


def ignored(path: Path) -> bool:
    return path.name.startswith(".") or path.name.lower().endswith(_IN_FLIGHT_SUFFIXES)


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
    if drop.path.is_dir() and (drop.path / READY_MARKER).exists():
        return True
    now = time.time() if now is None else now
    return now - _newest_mtime(drop.path) >= settle_s


def scan(drops_dir: Path) -> tuple[list[Drop], list[str]]:
    """All drops in ``drops_dir`` (complete or not), and the names skipped as invalid."""
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


def complete_drops(drops_dir: Path, settle_s: float) -> list[Drop]:
    now = time.time()
    return [d for d in scan(drops_dir)[0] if is_complete(d, settle_s, now)]


def find_drop(drops_dir: Path, name: str) -> Drop:
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


def checked_name(name: str) -> str:
    """``name`` if it is a valid drop name; raises ValueError saying what is allowed."""
    if not DROP_NAME.match(name):
        raise ValueError(f"invalid drop name {name!r}: use letters, digits, '.', '_' or '-' (max 128)")
    return name


def place_drop(drops: Path, path: Path, name: str | None = None) -> str:
    """Copy ``path`` (a folder or manifest file) into the drop directory ``drops`` as drop ``name``; returns the
    name.

    A path already in the drop directory is used where it is. The copy lands under a hidden name and is renamed
    at the end, so the sensor never sees half a drop.
    """
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
