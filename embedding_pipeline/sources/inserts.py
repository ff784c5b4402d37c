"""Images named by a caller for inserting (the HTTP API's inserts and the Python API's ``insert_images``): the
rules they follow and the manifest lines of the drop they become.

A local path must be absolute and lie (after ``..`` and symlinks) inside the drop folder or one of
``sources.allowed_roots`` — exactly where an ingested manifest may point, because the ingest run reads it under
those rules. URLs must be http(s); the run fetches them with the guarded fetcher (address policy, timeouts, size
limit).
"""

from __future__ import annotations

import json
import os
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from embedding_pipeline.runtime.objects import ObjectError, ObjectPath, is_object_uri
from embedding_pipeline.settings import Settings
from embedding_pipeline.sources.manifest import MAX_METADATA_BYTES, is_url, looks_like_url


class InputRefused(ValueError):
    """An input (or the request as a whole) breaks a rule; ``code`` names which, ``details`` says more."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code, self.message, self.details = code, message, details or {}


def drop_name(now: datetime | None = None, prefix: str = "api") -> str:
    """A fresh, sortable manifest drop name: ``api-20261108T101500Z-3f2a9c1b.jsonl``."""
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    return f"{prefix}-{stamp}-{secrets.token_hex(4)}.jsonl"


def allowed_roots(settings: Settings) -> list[Path]:
    """Where local inputs may lie: the drop folder (a manifest drop's own root) and ``sources.allowed_roots``."""
    drops = settings.drops_location
    local = [drops] if isinstance(drops, Path) else []
    return [*local, *(Path(r).expanduser() for r in settings.sources.allowed_roots)]


def check_input(settings: Settings, uri: str, where: str) -> None:
    """Raise :class:`InputRefused` unless ``uri`` is an http(s) URL, an absolute path inside the allowed roots, or
    an ``s3://`` object under the drops prefix (when drops live in a bucket) or ``sources.allowed_prefixes``."""
    if is_url(uri):
        return
    if is_object_uri(uri):
        from embedding_pipeline.sources.items import object_allowed, object_prefixes

        location = settings.drops_location
        prefixes = object_prefixes(location if isinstance(location, ObjectPath) else None, settings.sources)
        try:
            allowed = object_allowed(uri, prefixes)
        except ObjectError as exc:
            raise InputRefused("bad_input", f"{where}: {exc}") from None
        if not allowed:
            raise InputRefused(
                "outside_roots",
                f"{where}: object outside the allowed prefixes ({', '.join(prefixes) or 'none'}): {uri} "
                "(add its prefix to sources.allowed_prefixes)",
                {"input": uri, "allowed_prefixes": prefixes},
            )
        return
    if looks_like_url(uri):
        scheme = uri.split("://", 1)[0]
        raise InputRefused("bad_input", f"{where}: unsupported URL scheme {scheme!r} (only http and https): {uri}")
    if not os.path.isabs(uri):
        raise InputRefused("bad_input", f"{where}: a local path must be absolute: {uri}")
    real = Path(os.path.realpath(uri))
    if not any(real.is_relative_to(os.path.realpath(root)) for root in allowed_roots(settings)):
        roots = ", ".join(str(r) for r in allowed_roots(settings))
        raise InputRefused(
            "outside_roots",
            f"{where}: path outside the allowed roots ({roots}): {uri} (add its folder to sources.allowed_roots)",
            {"input": uri, "allowed_roots": roots},
        )


def manifest_rows(
    settings: Settings,
    inputs: Sequence[str],
    ids: Sequence[str] | None = None,
    metadata: Sequence[Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The manifest lines for ``inputs`` (with ``ids`` and ``metadata``, one per input, when given); raises
    :class:`InputRefused` for too many inputs, an input outside the rules or oversized metadata."""
    limit = settings.api.max_inputs
    if len(inputs) > limit:
        raise InputRefused(
            "too_many_inputs",
            f"{len(inputs)} inputs; at most {limit} per request (api.max_inputs)",
            {"count": len(inputs), "limit": limit},
        )
    rows = []
    for n, uri in enumerate(inputs):
        check_input(settings, uri, f"inputs[{n}]")
        row: dict[str, Any] = {"uri": uri}
        if ids is not None:
            row["id"] = ids[n]
        if metadata is not None:
            size = len(json.dumps(metadata[n], default=str).encode())
            if size > MAX_METADATA_BYTES:
                raise InputRefused(
                    "invalid_request",
                    f"metadata[{n}] is {size} bytes as JSON; at most {MAX_METADATA_BYTES}",
                    {"index": n, "bytes": size},
                )
            row["metadata"] = metadata[n]
        rows.append(row)
    return rows
