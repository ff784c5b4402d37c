"""From a drop to its items: bytes read once, content-hashed, checked to be an image, given an id and a status.

Downloaded bytes are kept in a content-addressed blob store so later stages never download twice.
"""

from __future__ import annotations

import hashlib
import io
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from embedding_pipeline.settings import SourceSettings
from embedding_pipeline.sources.drops import Drop
from embedding_pipeline.sources.fetch import FetchError, UrlFetcher, read_local
from embedding_pipeline.sources.manifest import Entry, is_url, list_entries

OK, FAILED = "ok", "failed"


@dataclass
class Item:
    id: str
    uri: str
    metadata: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""
    size: int = 0
    source: str = ""  # where the bytes are now: the local file, or the blob of a download
    status: str = OK
    error: str = ""

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


def content_id(sha256: str) -> str:
    """The id of an item dropped without one: the same image always gets the same id."""
    return f"sha256-{sha256[:32]}"


def blob_path(blob_dir: Path, sha256: str) -> Path:
    return blob_dir / sha256[:2] / sha256


def check_image_header(data: bytes) -> str | None:
    """None if Pillow recognises an image format in ``data``, else the reason. Reads the header only."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.size  # noqa: B018 - forces the header parse
    except UnidentifiedImageError:
        return "not an image (unrecognised format)"
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for broken headers
        return f"unreadable image header: {exc}"
    return None


def collect_items(drop: Drop, settings: SourceSettings, blob_dir: Path) -> list[Item]:
    entries = list_entries(drop)
    root = drop.path if drop.path.is_dir() else drop.path.parent
    roots = [root, *settings.allowed_roots]
    urls = sorted({e.uri for e in entries if e.error is None and is_url(e.uri)})
    downloaded = _download_all(urls, settings, blob_dir)

    items: list[Item] = []
    seen_ids: dict[str, str] = {}
    for entry in entries:
        item = _resolve(entry, roots, settings, downloaded)
        if item.status == OK:
            owner = seen_ids.get(item.id)
            if owner is not None:
                # The same content listed twice without ids is one row, not an error.
                same_content = entry.id is None and item.id == content_id(item.sha256)
                item.status = "skipped" if same_content else FAILED
                item.error = f"duplicate of {owner}" if same_content else f"duplicate id {item.id!r} in this drop"
            else:
                seen_ids[item.id] = entry.origin or item.uri
        items.append(item)
    return items


def _resolve(entry: Entry, roots: list[Path], settings: SourceSettings, downloaded: dict) -> Item:
    item = Item(id=entry.id or "", uri=entry.uri, metadata=entry.metadata)
    if entry.error is not None:
        return _failed(item, entry, entry.error)
    try:
        if is_url(entry.uri):
            result = downloaded[entry.uri]
            if isinstance(result, FetchError):
                raise result
            sha, size, source = result
        else:
            data = read_local(entry.uri, roots, settings.max_image_bytes)
            problem = check_image_header(data)
            if problem:
                raise FetchError(problem)
            sha, size, source = hashlib.sha256(data).hexdigest(), len(data), str(Path(entry.uri).resolve())
    except FetchError as exc:
        return _failed(item, entry, str(exc))
    item.sha256, item.size, item.source = sha, size, source
    item.id = item.id or content_id(sha)
    return item


def _failed(item: Item, entry: Entry, error: str) -> Item:
    item.status, item.error = FAILED, error
    # Failed items still need a stable, unique id for reports.
    item.id = item.id or f"error-{hashlib.sha256((entry.origin + entry.uri).encode()).hexdigest()[:16]}"
    return item


def _download_all(urls: list[str], settings: SourceSettings, blob_dir: Path) -> dict[str, Any]:
    if not urls:
        return {}
    local = threading.local()
    fetchers: list[UrlFetcher] = []
    lock = threading.Lock()

    def one(url: str) -> Any:
        fetcher = getattr(local, "fetcher", None)
        if fetcher is None:
            fetcher = local.fetcher = UrlFetcher(settings)
            with lock:
                fetchers.append(fetcher)
        try:
            data = fetcher.get(url)
            problem = check_image_header(data)
            if problem:
                raise FetchError(problem)
        except FetchError as exc:
            return exc
        sha = hashlib.sha256(data).hexdigest()
        path = blob_path(blob_dir, sha)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{threading.get_ident()}")
            tmp.write_bytes(data)
            tmp.replace(path)
        return sha, len(data), str(path)

    try:
        with ThreadPoolExecutor(max_workers=min(settings.fetch_workers, len(urls))) as pool:
            return dict(zip(urls, pool.map(one, urls)))
    finally:
        for f in fetchers:
            f.close()
