"""From a drop to its items: bytes read once, content-hashed, checked to be an image, given an id and a status.

Downloaded bytes are kept in a content-addressed blob store so later stages never download twice.

Every item has a ``status`` (``ok``, ``failed`` or ``skipped``) and, unless ok, an ``error_kind`` from a fixed
vocabulary (reports and dashboards group by it) plus a specific ``error`` message:

======================== ======== ================================================================================
kind                     status   meaning
======================== ======== ================================================================================
*manifest*
``bad_row``              failed   a manifest line that is not valid JSON or an object, has no ``uri``, or a long id
``bad_metadata``         failed   ``metadata`` is not a JSON object (or not valid JSON), or is over 64 KiB
``duplicate_id``         failed   an id already used by another item of the drop
``duplicate``            skipped  the same content listed again without an id (it is one row, not an error)
``ignored``              skipped  a loose file of a folder drop that is clearly no image (``.txt``, ``.md`` ...)
*local files*
``not_found``            failed   the path does not exist
``outside_roots``        failed   the path (after ``..`` and symlinks) is outside the drop and ``allowed_roots``
``not_a_file``           failed   a directory, FIFO, device or socket
``too_large``            failed   bigger than ``max_image_bytes`` (also for downloads)
``unreadable``           failed†  permission denied or another I/O error
*objects (s3://)*
``access_denied``        failed†  the store's credentials may not read the object
(``not_found``, ``too_large``, ``outside_roots`` and ``bad_url`` as above; store errors as for URLs)
*URLs*
``bad_url``              failed   no host, or a scheme other than http/https (``ftp://``, ``file://`` ...)
``refused_address``      failed   the host resolves only to non-public addresses that are not allow-listed
``http_error``           failed   a 4xx status or another status that is not 200 (the message has the code)
``http_unavailable``     failed†  408, 425, 429 or 5xx: the server says "not now" (after retries)
``timeout``              failed†  connect/read timeout (after retries), or the download deadline passed
``connection_error``     failed†  DNS failure, refused connection, reset, TLS failure
``too_many_redirects``   failed   more redirects than the limit
*content*
``empty_file``           failed   zero bytes
``not_image``            failed   not an image by its content (HTML page, text, PDF, SVG, HEIC ...)
*decoding (set by the preprocess stage)*
``truncated``            failed   the image data ends early
``too_many_pixels``      failed   declares more pixels than allowed (decompression bomb guard)
``decode_error``         failed   the image data is corrupt
``source_changed``       failed†  the file changed between the manifest stage and decoding
*indexing (set by the index stage)*
``id_conflict``          failed   the id already names another image that another drop holds (that image stays)
======================== ======== ================================================================================

† *transient*: the failure may pass by itself. On a re-run, an item failing with a transient kind keeps the row
that an earlier run of the drop indexed for it (reported as ``kept_previous``); every other failure is permanent and
removes the item's row from the drop, as does an item that left the drop's listing. A drop where everything failed
transiently therefore removes nothing.

File extensions and ``Content-Type`` headers are never trusted: a PNG named ``.jpg`` is fine, an HTML error page
served as ``image/jpeg`` is ``not_image``.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from embedding_pipeline.runtime.objects import ObjectError, ObjectPath, ObjectStore, is_object_uri, split_uri
from embedding_pipeline.settings import SourceSettings
from embedding_pipeline.sources.drops import Drop
from embedding_pipeline.sources.fetch import FetchError, UrlFetcher, read_local_file
from embedding_pipeline.sources.manifest import Entry, is_url, list_entries, looks_like_url
from embedding_pipeline.sources.sniff import PIL_FORMATS, sniff
from embedding_pipeline.sources.statuses import ErrorKind, ItemStatus

OK, FAILED, SKIPPED = ItemStatus.OK, ItemStatus.FAILED, ItemStatus.SKIPPED
_SKIP_KINDS = {ErrorKind.IGNORED, ErrorKind.DUPLICATE}
# Failures that may pass by themselves (see the table above): they never remove a row indexed before.
TRANSIENT_KINDS = frozenset(
    {
        ErrorKind.HTTP_UNAVAILABLE,
        ErrorKind.TIMEOUT,
        ErrorKind.CONNECTION_ERROR,
        ErrorKind.UNREADABLE,
        ErrorKind.ACCESS_DENIED,
        ErrorKind.SOURCE_CHANGED,
    }
)


def is_transient(kind: str) -> bool:
    """True if a failure of ``kind`` may pass by itself, so the item's earlier row is kept."""
    return kind in TRANSIENT_KINDS


@dataclass
class Item:
    id: str
    uri: str
    metadata: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""
    size: int = 0
    source: str = ""  # where the bytes are now: the local file, or the blob of a download
    # "<device>:<inode>:<mtime ns>" of a local file, or the ETag of an object, when listed: later stages refuse a
    # replaced one.
    file_id: str = ""
    status: str = OK  # an ItemStatus (a plain str once read back from the manifest)
    error: str = ""
    error_kind: str = ""  # an ErrorKind, or "" when ok

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


def content_id(sha256: str) -> str:
    """The id of an item dropped without one: the same image always gets the same id."""
    return f"sha256-{sha256[:32]}"


def blob_path(blob_dir: Path, sha256: str) -> Path:
    return blob_dir / sha256[:2] / sha256


def check_image(data: bytes) -> str:
    """The image format of ``data`` judged by its bytes, confirmed by Pillow's header parse; raises
    :class:`FetchError` (``empty_file`` / ``not_image``) otherwise. Reads the header only, never decodes."""
    from PIL import Image, UnidentifiedImageError

    found = sniff(data)
    if found.kind:
        raise FetchError(found.kind, found.reason)
    try:
        with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as img:
            img.size  # noqa: B018 - forces the header parse
            return img.format or found.format
    except Image.DecompressionBombError:
        # The header parsed (it is what declared the size); the pixel limit is decoding's call (too_many_pixels).
        return found.format or "image"
    except UnidentifiedImageError:
        if found.format:
            message = f"{found.format} signature but Pillow cannot read its header"
            raise FetchError(ErrorKind.NOT_IMAGE, message) from None
        raise FetchError(ErrorKind.NOT_IMAGE, "not an image (unrecognised format)") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for broken headers
        raise FetchError(ErrorKind.NOT_IMAGE, f"unreadable {found.format or 'image'} header: {exc}") from None


def check_image_header(data: bytes) -> str | None:
    """None if ``data`` is a recognised image, else the reason (see :func:`check_image`)."""
    try:
        check_image(data)
    except FetchError as exc:
        return str(exc)
    return None


def object_prefixes(drop_root: Path | ObjectPath | None, settings: SourceSettings) -> list[str]:
    """The ``s3://`` prefixes a drop's items may be read from: the drop's own (when it lies in a bucket) and
    ``sources.allowed_prefixes``; each ends in "/" so that ``s3://b/cats`` never admits ``s3://b/cats.b/x``."""
    own = [f"s3://{drop_root.bucket}/{drop_root.prefix}"] if isinstance(drop_root, ObjectPath) else []
    return own + [p.rstrip("/") + "/" for p in settings.allowed_prefixes]


def object_allowed(uri: str, prefixes: list[str]) -> bool:
    bucket, key = split_uri(uri)  # raises ObjectError(bad_url) for '..' segments and bad buckets
    return any(f"s3://{bucket}/{key}".startswith(p) for p in prefixes)


def read_object(store: ObjectStore, uri: str, prefixes: list[str], max_bytes: int, etag: str | None = None):
    """(bytes, etag) of the object ``uri`` after the prefix check; raises FetchError with the item's kind."""
    try:
        if not object_allowed(uri, prefixes):
            raise FetchError(
                ErrorKind.OUTSIDE_ROOTS,
                f"{uri} is outside the drop's prefix and sources.allowed_prefixes",
            )
        bucket, key = split_uri(uri)
        return store.fetch(bucket, key, max_bytes, etag=etag or None)
    except ObjectError as exc:
        raise FetchError(exc.kind, str(exc)) from None


def collect_items(drop: Drop, settings: SourceSettings, blob_dir: Path, store: ObjectStore | None = None) -> list[Item]:
    """The drop's items, each read once. ``store`` reads ``s3://`` items (a drop in a bucket brings its own)."""
    entries = list_entries(drop)
    root = drop.root
    roots = [root, *settings.allowed_roots] if isinstance(root, Path) else list(settings.allowed_roots)
    # Each distinct URL is downloaded once per run, however often it is listed.
    urls = sorted({e.uri for e in entries if e.error is None and is_url(e.uri)})
    downloaded = _download_all(urls, settings, blob_dir)
    objects = sorted({e.uri for e in entries if e.error is None and is_object_uri(e.uri)})
    if isinstance(drop.path, ObjectPath):
        store = drop.path.store
    downloaded.update(_read_objects(objects, settings, store, object_prefixes(root, settings)))

    items: list[Item] = []
    seen_ids: dict[str, str] = {}
    for entry in entries:
        item = _resolve(entry, roots, settings, downloaded)
        if item.status == OK:
            owner = seen_ids.get(item.id)
            if owner is not None:
                # The same content listed twice without ids is one row, not an error.
                if entry.id is None and item.id == content_id(item.sha256):
                    _mark(item, ErrorKind.DUPLICATE, f"duplicate of {owner}")
                else:
                    message = f"duplicate id {item.id!r} in this drop (first listed by {owner})"
                    _mark(item, ErrorKind.DUPLICATE_ID, message)
            else:
                seen_ids[item.id] = entry.origin or item.uri
        items.append(item)
    return items


def _resolve(entry: Entry, roots: list[Path], settings: SourceSettings, downloaded: dict) -> Item:
    item = Item(id=entry.id or "", uri=entry.uri, metadata=entry.metadata)
    try:
        if entry.error is not None:
            raise FetchError(entry.error_kind or ErrorKind.BAD_ROW, entry.error)
        if is_url(entry.uri) or is_object_uri(entry.uri):
            result = downloaded[entry.uri]
            if isinstance(result, FetchError):
                raise result
            sha, size, source = result[:3]
            if len(result) > 3:
                item.file_id = result[3]  # the object's ETag: preprocessing reads this version or none
        elif looks_like_url(entry.uri):
            scheme = entry.uri.split("://", 1)[0]
            raise FetchError(ErrorKind.BAD_URL, f"unsupported URL scheme {scheme!r} (only http/https): {entry.uri}")
        else:
            data, item.file_id = read_local_file(entry.uri, roots, settings.max_image_bytes)
            check_image(data)
            sha, size, source = hashlib.sha256(data).hexdigest(), len(data), os.path.realpath(entry.uri)
    except FetchError as exc:
        _mark(item, exc.kind, str(exc))
        # Failed items still need a stable, unique id for reports.
        item.id = item.id or f"error-{hashlib.sha256((entry.origin + entry.uri).encode()).hexdigest()[:16]}"
        return item
    item.sha256, item.size, item.source = sha, size, source
    item.id = item.id or content_id(sha)
    return item


def _mark(item: Item, kind: str, error: str) -> None:
    item.status = SKIPPED if kind in _SKIP_KINDS else FAILED
    item.error_kind, item.error = kind, error


def _blob_intact(path: Path, sha256: str, size: int) -> bool:
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size != size:
            return False
        return hashlib.sha256(path.read_bytes()).hexdigest() == sha256
    except OSError:
        return False


def _read_objects(
    uris: list[str], settings: SourceSettings, store: ObjectStore | None, prefixes: list[str]
) -> dict[str, Any]:
    """uri -> (sha256, size, uri, etag) or FetchError for each ``s3://`` item, read in parallel; the bytes are
    not kept (preprocessing reads the same version again, by ETag)."""
    if not uris:
        return {}

    def one(uri: str) -> Any:
        if store is None:
            return FetchError(ErrorKind.BAD_URL, f"{uri}: no object store is configured")
        try:
            data, etag = read_object(store, uri, prefixes, settings.max_image_bytes)
            check_image(data)
        except FetchError as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - one odd object must fail its item, not the drop
            return FetchError(ErrorKind.CONNECTION_ERROR, f"reading {uri} failed: {type(exc).__name__}: {exc}")
        return hashlib.sha256(data).hexdigest(), len(data), uri, etag

    with ThreadPoolExecutor(max_workers=min(settings.fetch_workers * 2, len(uris))) as pool:
        return dict(zip(uris, pool.map(one, uris)))


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
            check_image(data)
        except FetchError as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - one odd URL must fail its item, not the drop
            return FetchError(ErrorKind.CONNECTION_ERROR, f"download failed for {url}: {type(exc).__name__}: {exc}")
        sha = hashlib.sha256(data).hexdigest()
        path = blob_path(blob_dir, sha)
        if not _blob_intact(path, sha, len(data)):
            # Missing, or damaged on disk (its bytes no longer hash to its name): written again from this download.
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{threading.get_ident()}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(path)
        return sha, len(data), str(path)

    try:
        with ThreadPoolExecutor(max_workers=min(settings.fetch_workers, len(urls))) as pool:
            return dict(zip(urls, pool.map(one, urls)))
    finally:
        for f in fetchers:
            f.close()
