"""Images named in requests: the same rules as a manifest in the drop folder.

The rules themselves are :mod:`embedding_pipeline.sources.inserts` (shared with the Python API); here they answer
in the API's 422 shape.
"""

from __future__ import annotations

from embedding_pipeline.api.errors import invalid
from embedding_pipeline.settings import Settings
from embedding_pipeline.sources import inserts
from embedding_pipeline.sources.fetch import FetchError, read_local
from embedding_pipeline.sources.inputs import read_image_input
from embedding_pipeline.sources.inserts import allowed_roots
from embedding_pipeline.sources.manifest import is_url


def check_input(settings: Settings, uri: str, where: str) -> None:
    """Raise a 422 unless ``uri`` is an http(s) URL or an absolute path inside the allowed roots."""
    try:
        inserts.check_input(settings, uri, where)
    except inserts.InputRefused as exc:
        raise invalid(exc.code, exc.message, exc.details or None) from None


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
