"""Images named in requests: the same rules as a manifest in the drop folder.

A local path must be absolute and lie (after ``..`` and symlinks) inside the drop folder or one of
``sources.allowed_roots`` — exactly where an ingested manifest may point. URLs must be http(s) and are fetched by
the same guarded fetcher as ingest (address policy, timeouts, size limit).
"""

from __future__ import annotations

import os
from pathlib import Path

from embedding_pipeline.api.errors import invalid
from embedding_pipeline.settings import Settings
from embedding_pipeline.sources.fetch import FetchError, read_local
from embedding_pipeline.sources.inputs import read_image_input
from embedding_pipeline.sources.manifest import is_url, looks_like_url


def allowed_roots(settings: Settings) -> list[Path]:
    """Where local inputs may lie: the drop folder (a manifest drop's own root) and ``sources.allowed_roots``."""
    return [settings.drops, *(Path(r).expanduser() for r in settings.sources.allowed_roots)]


def check_input(settings: Settings, uri: str, where: str) -> None:
    """Raise a 422 unless ``uri`` is an http(s) URL or an absolute path inside the allowed roots."""
    if is_url(uri):
        return
    if looks_like_url(uri):
        scheme = uri.split("://", 1)[0]
        raise invalid("bad_input", f"{where}: unsupported URL scheme {scheme!r} (only http and https): {uri}")
    if not os.path.isabs(uri):
        raise invalid("bad_input", f"{where}: a local path must be absolute: {uri}")
    real = Path(os.path.realpath(uri))
    if not any(real.is_relative_to(os.path.realpath(root)) for root in allowed_roots(settings)):
        roots = ", ".join(str(r) for r in allowed_roots(settings))
        raise invalid(
            "outside_roots",
            f"{where}: path outside the allowed roots ({roots}): {uri}",
            {"input": uri, "allowed_roots": roots},
        )


def read_query(settings: Settings, uri: str) -> bytes:
    """The bytes of a query image named by path or URL; a 422 naming the reason when it cannot be read.

    Every read failure is the named input's (a missing file, a URL that refuses, times out or does not resolve):
    this service is fine, so it is never a 5xx. ``details.kind`` is the fetcher's error kind (the item kinds of
    ingest: ``not_found``, ``too_large``, ``refused_address``, ``timeout`` ...).
    """
    check_input(settings, uri, "query_input")
    try:
        if is_url(uri):
            return read_image_input(uri, settings.sources)
        return read_local(uri, allowed_roots(settings), settings.sources.max_image_bytes)
    except FetchError as exc:
        raise invalid("unreadable_input", f"query_input: {exc}", {"kind": exc.kind}) from None
