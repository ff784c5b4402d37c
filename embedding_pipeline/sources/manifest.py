"""A drop's items: every image file of a folder drop plus every row of its manifest files.

A folder drop may hold loose image files, manifest files, or both; a file listed by one of its manifests is an
item of that manifest only (with the manifest's id and metadata).

Manifest formats (columns / keys):

* ``uri`` — required: a local path (relative paths are relative to the manifest file), an http(s) URL or an
  ``s3://bucket/key`` object (relative paths in a manifest that lives in a bucket name objects beside it);
* ``id`` — optional: the row's primary key in Milvus; without one, the id is derived from the content hash, so the
  same image dropped twice is one row;
* ``metadata`` — optional: a JSON object (in CSV, a JSON string);
* any other column is kept as a metadata key.

A row that cannot be read (bad JSON, no ``uri``) becomes an item with an error, never a failed drop.

Folder drops are walked without following symlinked folders (a link loop must not hang a run); symlinked files
are listed and later refused if they point outside the allowed roots. Loose files whose extension says they are
clearly not images (``notes.txt``, ``README.md``, ``checksums.sha256`` ...) become skipped items of kind
``ignored``, and so does a ``.csv`` file without a ``uri`` column: both are common companions of image folders.
A file named like an image is always an item, whatever its content turns out to be.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from embedding_pipeline.runtime.objects import ObjectError, ObjectPath, is_object_uri
from embedding_pipeline.sources.drops import MANIFEST_SUFFIXES, READY_MARKER, Drop, ignored, ignored_key
from embedding_pipeline.sources.fetch import FetchError, open_regular
from embedding_pipeline.sources.statuses import ErrorKind


@dataclass
class Entry:
    """One item as listed by the drop, before anything is fetched."""

    uri: str
    id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    origin: str = ""  # which file listed it, for error messages
    error: str | None = None
    error_kind: str = ""  # set with ``error``; ``ignored`` means skipped on purpose, not failed


# Extensions of files that often sit next to images and are certainly not images themselves.
IGNORED_SUFFIXES = frozenset(
    ".txt .md .rst .json .yaml .yml .toml .ini .cfg .log .pdf .html .htm .xml .doc .docx .xls .xlsx .odt "
    ".zip .tar .gz .tgz .sha256 .sha1 .md5 .py .sh".split()
)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# What one Milvus row can hold (the id is a VARCHAR(512) primary key; JSON fields are capped server-side):
# checked per row here so one oversized row fails alone instead of failing the drop's upsert.
# Milvus 2.x measures VARCHAR lengths in UTF-8 bytes: 512 bytes (512 ASCII characters, fewer beyond ASCII).
MAX_ID_CHARS = 512
MAX_METADATA_BYTES = 64 * 1024
# A manifest object in a bucket is read whole: larger ones fail the listing rather than fill memory.
MAX_MANIFEST_OBJECT_BYTES = 512 * 1024 * 1024


def is_url(uri: str) -> bool:
    return uri.lower().startswith(("http://", "https://"))


def looks_like_url(uri: str) -> bool:
    """Any ``scheme://`` form, supported or not (``ftp://``, ``file://``): never taken as a local path."""
    return _SCHEME.match(uri) is not None


def list_entries(drop: Drop) -> list[Entry]:
    """Every item the drop lists. A manifest that cannot be read fails the listing (raises): its items are not
    known to have left the drop, so no stage may act as if they had."""
    if isinstance(drop.path, ObjectPath):
        return _object_entries(drop, drop.path)
    if not drop.path.is_dir() and not drop.is_manifest:
        raise FetchError(ErrorKind.NOT_A_FILE, f"drop {drop.name!r} is neither a folder nor a regular manifest file")
    if drop.is_manifest:
        return list(_read_manifest(drop.path))
    files = _walk(drop.path)
    entries: list[Entry] = []
    loose: list[Path] = []
    for path in files:
        if path.suffix.lower() in MANIFEST_SUFFIXES and _readable_manifest(path, drop.path):
            entries += _read_manifest(path)
        else:
            # Images, data files, and manifest-named things that cannot be read safely (reported per item).
            loose.append(path)
    # Files a manifest lists are items of that manifest (with its ids and metadata), not loose files too.
    listed = {os.path.realpath(e.uri) for e in entries if e.uri and not looks_like_url(e.uri)}
    for path in loose:
        if os.path.realpath(path) in listed:
            continue
        origin = str(path.relative_to(drop.path))
        entry = Entry(uri=str(path), origin=origin)
        if path.suffix.lower() in IGNORED_SUFFIXES or (path.suffix.lower() == ".csv" and path.is_file()):
            entry.error, entry.error_kind = f"not an image file, ignored: {origin}", ErrorKind.IGNORED
        entries.append(entry)
    return entries


def _object_entries(drop: Drop, path: ObjectPath) -> list[Entry]:
    """The entries of a drop in a bucket: like a folder's, with objects for files (no links, no FIFOs there)."""
    if drop.is_manifest:
        return list(_read_manifest(path))
    prefix = path.prefix
    try:
        objects = [o for o in path.files() if not ignored_key(o.key[len(prefix) :])]
    except ObjectError as exc:
        raise FetchError(exc.kind, f"could not list drop {drop.name!r}: {exc}") from None
    entries: list[Entry] = []
    loose: list[ObjectPath] = []
    for info in objects:
        obj = ObjectPath(path.store, path.bucket, info.key)
        if obj.suffix.lower() in MANIFEST_SUFFIXES and (obj.suffix.lower() != ".csv" or _csv_has_uri(obj)):
            entries += _read_manifest(obj)
        else:
            loose.append(obj)
    listed = {e.uri for e in entries if is_object_uri(e.uri)}
    for obj in loose:
        if str(obj) in listed:
            continue
        origin = obj.relative_to(path)
        entry = Entry(uri=str(obj), origin=origin)
        if obj.suffix.lower() in IGNORED_SUFFIXES or obj.suffix.lower() == ".csv":
            entry.error, entry.error_kind = f"not an image file, ignored: {origin}", ErrorKind.IGNORED
        entries.append(entry)
    return entries


def _csv_has_uri(obj: ObjectPath) -> bool:
    with _open_text(obj, newline="") as f:
        header = next(csv.reader(f), [])
    return "uri" in (h.strip() for h in header)


def _walk(folder: Path) -> list[Path]:
    """Every non-hidden, settled file below ``folder``, sorted; symlinked folders are not entered."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = [d for d in dirnames if not ignored(Path(d))]
        for name in filenames:
            if not ignored(Path(name)) and name != READY_MARKER:
                found.append(Path(dirpath) / name)
    return sorted(found)


def _readable_manifest(path: Path, folder: Path) -> bool:
    """A regular file inside the drop (opening a FIFO would block; a link out of the drop is not ours to read),
    and for CSV one with a ``uri`` column (other CSV files are data that happens to sit beside the images)."""
    real = Path(os.path.realpath(path))
    if not real.is_file() or not real.is_relative_to(os.path.realpath(folder)):
        return False
    if path.suffix.lower() != ".csv":
        return True
    try:
        with _open_text(real, newline="") as f:
            header = next(csv.reader(f), [])
    except FetchError:  # swapped for something that is not a regular file: an item that fails, as any such file
        return False
    return "uri" in (h.strip() for h in header)


def _read_manifest(path: Path | ObjectPath) -> Iterator[Entry]:
    if path.suffix.lower() == ".csv":
        rows = _csv_rows(path)
    else:
        rows = _jsonl_rows(path)
    for where, row in rows:
        origin = f"{path.name}:{where}"
        if isinstance(row, str):  # a parse error
            yield Entry(uri="", origin=origin, error=row, error_kind=ErrorKind.BAD_ROW)
            continue
        yield _entry_from_row(row, path.parent, origin)


@contextmanager
def _open_text(path: Path | ObjectPath, newline: str | None = None) -> Iterator[io.TextIOWrapper]:
    """A manifest opened through the guarded opener: a regular file only (a FIFO never blocks the sensor or a
    run), no final symlink followed. A manifest object is read whole, up to a cap; a manifest that cannot be read
    fails the listing (its items are not known to have left the drop)."""
    if isinstance(path, ObjectPath):
        try:
            data = path.read_bytes(MAX_MANIFEST_OBJECT_BYTES)
        except ObjectError as exc:
            raise FetchError(exc.kind, f"could not read manifest {path}: {exc}") from None
        yield io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="replace", newline=newline)
        return
    with open_regular(path) as (raw, _):
        yield io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline=newline)


def _jsonl_rows(path: Path | ObjectPath) -> Iterator[tuple[int, dict[str, Any] | str]]:
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield n, f"invalid JSON on line {n}: {exc.msg}"
                continue
            yield n, row if isinstance(row, dict) else f"line {n} is not a JSON object"


def _csv_rows(path: Path | ObjectPath) -> Iterator[tuple[int, dict[str, Any] | str]]:
    with _open_text(path, newline="") as f:
        for n, row in enumerate(csv.DictReader(f), 2):
            yield n, {k: v for k, v in row.items() if k is not None and v not in (None, "")}


def _entry_from_row(row: dict[str, Any], base: Path | ObjectPath, origin: str) -> Entry:
    raw_id = row.get("id")
    item_id = str(raw_id).strip() if raw_id not in (None, "") else None
    uri = row.get("uri")
    if not isinstance(uri, str) or not uri.strip():
        return Entry(uri="", id=item_id, origin=origin, error="missing 'uri'", error_kind=ErrorKind.BAD_ROW)
    uri = uri.strip()
    if not looks_like_url(uri) and not Path(uri).is_absolute():
        # Relative to the manifest: a file beside it on disk, an object beside it in its bucket.
        uri = str(base / uri)
    metadata = row.get("metadata", {})
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except json.JSONDecodeError as exc:
            error = f"metadata is not valid JSON: {exc.msg}"
            return Entry(uri=uri, id=item_id, origin=origin, error=error, error_kind=ErrorKind.BAD_METADATA)
    if not isinstance(metadata, dict):
        error = "metadata must be a JSON object"
        return Entry(uri=uri, id=item_id, origin=origin, error=error, error_kind=ErrorKind.BAD_METADATA)
    if item_id is not None and len(item_id.encode()) > MAX_ID_CHARS:
        error = f"id longer than {MAX_ID_CHARS} bytes as UTF-8"
        return Entry(uri=uri, id=item_id[:64] + "…", origin=origin, error=error, error_kind=ErrorKind.BAD_ROW)
    if item_id is not None and "\0" in item_id:
        # The one character no Milvus expression can carry: such an id could never be read or deleted again.
        return Entry(
            uri=uri,
            id=item_id.replace("\0", "\\0"),
            origin=origin,
            error="id contains a NUL character",
            error_kind=ErrorKind.BAD_ROW,
        )
    extra = {k: v for k, v in row.items() if k not in ("uri", "id", "metadata")}
    merged = {**extra, **metadata}
    size = len(json.dumps(merged, default=str).encode())
    if size > MAX_METADATA_BYTES:
        error = f"metadata is {size} bytes as JSON; at most {MAX_METADATA_BYTES} are stored"
        return Entry(uri=uri, id=item_id, origin=origin, error=error, error_kind=ErrorKind.BAD_METADATA)
    return Entry(uri=uri, id=item_id, metadata=merged, origin=origin)
