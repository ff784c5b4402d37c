"""A drop's items: every image file of a folder drop plus every row of its manifest files.

A folder drop may hold loose image files, manifest files, or both; a file listed by one of its manifests is an
item of that manifest only (with the manifest's id and metadata).

Manifest formats (columns / keys):

* ``uri`` — required: a local path (relative paths are relative to the manifest file) or an http(s) URL;
* ``id`` — optional: the row's primary key in Milvus; without one, the id is derived from the content hash, so the
  same image dropped twice is one row;
* ``metadata`` — optional: a JSON object (in CSV, a JSON string);
* any other column is kept as a metadata key.

A row that cannot be read (bad JSON, no ``uri``) becomes an item with an error, never a failed drop.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from embedding_pipeline.sources.drops import MANIFEST_SUFFIXES, READY_MARKER, Drop, ignored


@dataclass
class Entry:
    """One item as listed by the drop, before anything is fetched."""

    uri: str
    id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    origin: str = ""  # which file listed it, for error messages
    error: str | None = None


def is_url(uri: str) -> bool:
    return uri.lower().startswith(("http://", "https://"))


def list_entries(drop: Drop) -> list[Entry]:
    if drop.is_manifest:
        return list(_read_manifest(drop.path))
    files = []
    for path in sorted(p for p in drop.path.rglob("*") if p.is_file()):
        rel = path.relative_to(drop.path)
        if not any(ignored(Path(part)) for part in rel.parts) and path.name != READY_MARKER:
            files.append(path)
    entries = [e for path in files if path.suffix.lower() in MANIFEST_SUFFIXES for e in _read_manifest(path)]
    # Files a manifest lists are items of that manifest (with its ids and metadata), not loose files too.
    listed = {str(Path(e.uri).resolve()) for e in entries if e.uri and not is_url(e.uri)}
    for path in files:
        if path.suffix.lower() not in MANIFEST_SUFFIXES and str(path.resolve()) not in listed:
            entries.append(Entry(uri=str(path), origin=str(path.relative_to(drop.path))))
    return entries


def _read_manifest(path: Path) -> Iterator[Entry]:
    if path.suffix.lower() == ".csv":
        rows = _csv_rows(path)
    else:
        rows = _jsonl_rows(path)
    for where, row in rows:
        origin = f"{path.name}:{where}"
        if isinstance(row, str):  # a parse error
            yield Entry(uri="", origin=origin, error=row)
            continue
        yield _entry_from_row(row, path.parent, origin)


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield n, f"invalid JSON on line {n}: {exc.msg}"
                continue
            yield n, row if isinstance(row, dict) else f"line {n} is not a JSON object"


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        for n, row in enumerate(csv.DictReader(f), 2):
            yield n, {k: v for k, v in row.items() if k is not None and v not in (None, "")}


def _entry_from_row(row: dict[str, Any], base: Path, origin: str) -> Entry:
    uri = row.get("uri")
    if not isinstance(uri, str) or not uri.strip():
        return Entry(uri="", origin=origin, error="missing 'uri'")
    uri = uri.strip()
    if not is_url(uri) and not Path(uri).is_absolute():
        uri = str(base / uri)
    raw_id = row.get("id")
    item_id = str(raw_id).strip() if raw_id not in (None, "") else None
    metadata = row.get("metadata", {})
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except json.JSONDecodeError as exc:
            return Entry(uri=uri, id=item_id, origin=origin, error=f"metadata is not valid JSON: {exc.msg}")
    if not isinstance(metadata, dict):
        return Entry(uri=uri, id=item_id, origin=origin, error="metadata must be a JSON object")
    extra = {k: v for k, v in row.items() if k not in ("uri", "id", "metadata")}
    return Entry(uri=uri, id=item_id, metadata={**extra, **metadata}, origin=origin)
