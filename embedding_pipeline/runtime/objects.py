"""S3-compatible object storage (AWS S3, MinIO, SeaweedFS, Ceph RGW) through boto3: the one client every layer
uses for drops, items and stage outputs that live in a bucket.

Why boto3 (and not fsspec/s3fs): it is AWS's own, kept in step with the API; it reads the standard variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``AWS_PROFILE``) and the
shared config files with no code of ours; its retry modes back off on throttling and 5xx; listing exposes what the
store offers (``Delimiter`` for one level, ``StartAfter`` to resume); and it keeps no listing cache that could show
a sensor a stale bucket (s3fs caches directory listings by default). Conditional reads (``IfMatch``) let an item be
read as the very object that was listed.

:class:`ObjectPath` is a small path-like value (``/``, ``name``, ``parent``, ``is_file``, ``read_bytes`` ...)
over one store, so code written for folders of files can address a prefix the same way where the semantics agree.
Errors come out as :class:`ObjectError` with a ``kind`` that matches the pipeline's per-item error kinds.
"""

from __future__ import annotations

import fnmatch
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

SCHEME = "s3://"

# Error kinds, spelled like sources.statuses.ErrorKind (this layer sits below it).
NOT_FOUND = "not_found"
TOO_LARGE = "too_large"
ACCESS_DENIED = "access_denied"
SOURCE_CHANGED = "source_changed"
UNAVAILABLE = "http_unavailable"
CONNECTION_ERROR = "connection_error"
TIMEOUT = "timeout"
BAD_URI = "bad_url"


class ObjectError(Exception):
    """An object could not be listed, read or written; ``kind`` says why in the per-item vocabulary."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def is_object_uri(value: object) -> bool:
    return isinstance(value, str) and value.lower().startswith(SCHEME)


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ("bucket", "some/key"); raises ObjectError(bad_url) for anything else."""
    if not is_object_uri(uri):
        raise ObjectError(BAD_URI, f"not an s3:// URI: {uri!r}")
    rest = uri[len(SCHEME) :]
    bucket, _, key = rest.partition("/")
    if not bucket or not _valid_bucket(bucket):
        raise ObjectError(BAD_URI, f"invalid bucket name in {uri!r}")
    if any(part in (".", "..") for part in key.split("/")) or "\x00" in key:
        raise ObjectError(BAD_URI, f"'.' and '..' segments are not allowed in object keys: {uri!r}")
    return bucket, key


def _valid_bucket(name: str) -> bool:
    return 3 <= len(name) <= 63 and all(c.isalnum() and not c.isupper() or c in "-." for c in name)


@dataclass(frozen=True)
class StoreConfig:
    """How to reach the store. Every ``None`` falls back to boto3's own resolution (environment, profile, config
    files), so ``AWS_ENDPOINT_URL`` and the credential variables alone are enough."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    addressing_style: str = "auto"  # auto: path-style when an endpoint URL is set (MinIO, SeaweedFS), else boto3's
    max_attempts: int = 5
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    modified: float  # seconds since the epoch


class ObjectStore:
    """One boto3 client (thread-safe), created on first use."""

    def __init__(self, config: StoreConfig | None = None):
        self.config = config or StoreConfig()
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config

        c = self.config
        session = boto3.session.Session(profile_name=c.profile) if c.profile else boto3.session.Session()
        endpoint = c.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        style = c.addressing_style
        if style == "auto" and endpoint:
            style = "path"  # a custom endpoint on an IP or localhost has no virtual-host DNS for buckets
        config = Config(
            retries={"max_attempts": c.max_attempts, "mode": "standard"},
            connect_timeout=c.connect_timeout_s,
            read_timeout=c.read_timeout_s,
            s3={"addressing_style": style},
            max_pool_connections=32,
        )
        # botocore itself reads AWS_DEFAULT_REGION and the profile; AWS_REGION is what the SDKs and users set.
        region = c.region or os.environ.get("AWS_REGION") or session.region_name or "us-east-1"
        return session.client("s3", endpoint_url=endpoint or None, region_name=region, config=config)

    def path(self, uri: str) -> "ObjectPath":
        bucket, key = split_uri(uri)
        return ObjectPath(self, bucket, key.strip("/"))

    # -- listing ---------------------------------------------------------------------------------------------

    def list_objects(self, bucket: str, prefix: str = "", start_after: str = "") -> Iterator[ObjectInfo]:
        """Every object under ``prefix`` in key order, after ``start_after`` (the store skips the rest itself)."""
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
        if start_after:
            kwargs["StartAfter"] = start_after
        with _translated(f"s3://{bucket}/{prefix}"):
            for page in self.client.get_paginator("list_objects_v2").paginate(**kwargs):
                for entry in page.get("Contents", []):
                    yield _info(entry)

    def list_level(self, bucket: str, prefix: str) -> tuple[list[ObjectInfo], list[str]]:
        """One level under ``prefix`` (which ends in "/" or is empty): its objects and its sub-prefixes (with
        their trailing "/"). One request per 1,000 names, however many objects lie deeper."""
        objects: list[ObjectInfo] = []
        prefixes: list[str] = []
        with _translated(f"s3://{bucket}/{prefix}"):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
            for page in pages:
                objects.extend(_info(e) for e in page.get("Contents", []))
                prefixes.extend(p["Prefix"] for p in page.get("CommonPrefixes", []))
        return objects, prefixes

    # -- single objects --------------------------------------------------------------------------------------

    def head(self, bucket: str, key: str) -> ObjectInfo | None:
        try:
            with _translated(f"s3://{bucket}/{key}"):
                r = self.client.head_object(Bucket=bucket, Key=key)
        except ObjectError as exc:
            if exc.kind == NOT_FOUND:
                return None
            raise
        return ObjectInfo(key, int(r["ContentLength"]), r.get("ETag", "").strip('"'), r["LastModified"].timestamp())

    def get(self, bucket: str, key: str, max_bytes: int | None = None, etag: str | None = None) -> bytes:
        """The object's bytes. ``max_bytes`` refuses a larger object (checked on the response's length and while
        reading, so a store that lies about it still cannot make us hold more); ``etag`` refuses any other version
        of the object than the one listed (``source_changed``)."""
        return self.fetch(bucket, key, max_bytes, etag)[0]

    def fetch(self, bucket: str, key: str, max_bytes: int | None = None, etag: str | None = None) -> tuple[bytes, str]:
        """:meth:`get`, with the ETag of the version read (one request: no HEAD first)."""
        uri = f"s3://{bucket}/{key}"
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if etag:
            kwargs["IfMatch"] = f'"{etag}"'
        with _translated(uri):
            response = self.client.get_object(**kwargs)
            body = response["Body"]
            try:
                length = int(response.get("ContentLength", -1))
                if max_bytes is not None and length > max_bytes:
                    raise ObjectError(TOO_LARGE, f"{uri} is {length} bytes, over the limit of {max_bytes}")
                limit = max_bytes + 1 if max_bytes is not None else None
                data = body.read(limit) if limit is not None else body.read()
                if max_bytes is not None and len(data) > max_bytes:
                    raise ObjectError(TOO_LARGE, f"{uri} is over the limit of {max_bytes} bytes")
                return data, str(response.get("ETag", "")).strip('"')
            finally:
                body.close()

    def put(self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """One PUT: the object appears whole or not at all (S3 never shows a partly written object)."""
        with _translated(f"s3://{bucket}/{key}"):
            self.client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)

    def delete(self, bucket: str, keys: list[str]) -> int:
        """Delete ``keys`` (1,000 per request); returns how many were asked for. Missing keys are no error."""
        for start in range(0, len(keys), 1000):
            chunk = [{"Key": k} for k in keys[start : start + 1000]]
            with _translated(f"s3://{bucket}/"):
                response = self.client.delete_objects(Bucket=bucket, Delete={"Objects": chunk, "Quiet": True})
            errors = response.get("Errors") or []
            if errors:
                first = errors[0]
                raise ObjectError(
                    ACCESS_DENIED if first.get("Code") == "AccessDenied" else UNAVAILABLE,
                    f"could not delete {len(errors)} object(s) in s3://{bucket}/, e.g. {first.get('Key')}: "
                    f"{first.get('Code')} {first.get('Message')}",
                )
        return len(keys)

    def delete_prefix(self, bucket: str, prefix: str, folder: bool = True) -> int:
        """Delete every object under ``prefix``; a folder prefix must end in "/" so that "cats/" never takes
        "cats.b/" (``folder=False`` deletes by a key's beginning, e.g. one shard's "s0003-batch-" files)."""
        if folder and not prefix.endswith("/"):
            raise ValueError(f"delete_prefix needs a prefix ending in '/', not {prefix!r}")
        return self.delete(bucket, [o.key for o in self.list_objects(bucket, prefix)])

    def copy(self, source_bucket: str, source_key: str, bucket: str, key: str) -> None:
        """A server-side copy (the bytes never pass through this process)."""
        with _translated(f"s3://{source_bucket}/{source_key}"):
            self.client.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": source_bucket, "Key": source_key})

    def make_bucket(self, bucket: str) -> None:
        with _translated(f"s3://{bucket}"):
            try:
                self.client.create_bucket(Bucket=bucket)
            except self.client.exceptions.BucketAlreadyOwnedByYou:
                pass


def _info(entry: dict[str, Any]) -> ObjectInfo:
    return ObjectInfo(
        entry["Key"], int(entry["Size"]), entry.get("ETag", "").strip('"'), entry["LastModified"].timestamp()
    )


class _translated:
    """Turns botocore's exceptions into ObjectError with the pipeline's error kinds."""

    def __init__(self, uri: str):
        self.uri = uri

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None or isinstance(exc, ObjectError):
            return
        from botocore import exceptions as bx

        if isinstance(exc, bx.ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code in ("NoSuchKey", "NoSuchBucket", "404", "NotFound") or status == 404:
                raise ObjectError(NOT_FOUND, f"{self.uri}: no such object or bucket ({code})") from None
            if code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch") or (
                status == 403
            ):
                raise ObjectError(ACCESS_DENIED, f"{self.uri}: access denied ({code})") from None
            if code in ("PreconditionFailed", "412") or status == 412:
                raise ObjectError(SOURCE_CHANGED, f"{self.uri} changed since it was listed") from None
            raise ObjectError(UNAVAILABLE, f"{self.uri}: {code or status} {error.get('Message', '')}".strip()) from None
        if isinstance(exc, bx.ParamValidationError):
            raise ObjectError(BAD_URI, f"{self.uri}: {exc}") from None
        if isinstance(exc, (bx.ConnectTimeoutError, bx.ReadTimeoutError)):
            raise ObjectError(TIMEOUT, f"{self.uri}: {exc}") from None
        if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectionError)):
            raise ObjectError(CONNECTION_ERROR, f"{self.uri}: {exc}") from None
        if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            raise ObjectError(ACCESS_DENIED, f"{self.uri}: no credentials ({exc})") from None


@dataclass(frozen=True)
class ObjectPath:
    """A key (or key prefix, for "folders") in one bucket, with the parts of ``pathlib.Path`` the stages use.

    A "folder" exists while some object lies under ``key + "/"``; keys never end in "/". ``str()`` is the
    ``s3://`` URI."""

    store: ObjectStore = field(compare=False, repr=False)
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}"

    def __fspath__(self) -> str:  # pragma: no cover - never a local path
        raise TypeError(f"{self} is an object in a bucket, not a local file")

    def __truediv__(self, name: str) -> "ObjectPath":
        name = str(name).strip("/")
        return ObjectPath(self.store, self.bucket, f"{self.key}/{name}" if self.key else name)

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        name = self.name
        dot = name.rfind(".")
        return name[dot:] if dot > 0 else ""

    @property
    def parent(self) -> "ObjectPath":
        return ObjectPath(self.store, self.bucket, self.key.rsplit("/", 1)[0] if "/" in self.key else "")

    @property
    def prefix(self) -> str:
        """The key as a folder prefix (ending in "/"), or "" for the bucket's root."""
        return f"{self.key}/" if self.key else ""

    def relative_to(self, other: "ObjectPath") -> str:
        if other.bucket != self.bucket or not self.key.startswith(other.prefix):
            raise ValueError(f"{self} is not under {other}")
        return self.key[len(other.prefix) :]

    def stat(self) -> ObjectInfo | None:
        return self.store.head(self.bucket, self.key)

    def is_file(self) -> bool:
        return bool(self.key) and self.stat() is not None

    def is_dir(self) -> bool:
        return any(True for _ in _first(self.store.list_objects(self.bucket, self.prefix)))

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def read_bytes(self, max_bytes: int | None = None) -> bytes:
        return self.store.get(self.bucket, self.key, max_bytes)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        self.store.put(self.bucket, self.key, data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def unlink(self, missing_ok: bool = True) -> None:
        self.store.delete(self.bucket, [self.key])

    def files(self) -> Iterator[ObjectInfo]:
        """Every object under this folder, at any depth, in key order."""
        return self.store.list_objects(self.bucket, self.prefix)

    def glob(self, pattern: str) -> list["ObjectPath"]:
        """Objects directly in this folder whose name matches ``pattern`` (one level, like Path.glob)."""
        objects, _ = self.store.list_level(self.bucket, self.prefix)
        return [
            ObjectPath(self.store, self.bucket, o.key)
            for o in objects
            if fnmatch.fnmatchcase(o.key[len(self.prefix) :], pattern)
        ]


def _first(iterator: Iterator[ObjectInfo]) -> Iterator[ObjectInfo]:
    for item in iterator:
        yield item
        return
