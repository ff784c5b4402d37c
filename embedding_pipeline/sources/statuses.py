"""The fixed vocabularies of an item's outcome: its ``status`` and, unless ok, its ``error_kind``.

Both are :class:`enum.StrEnum`: a member *is* its string (``ItemStatus.OK == "ok"``, ``json.dumps`` writes
``"ok"``), so manifests, reports and API responses read exactly as plain strings, and a value read back from JSON
or Arrow (a plain ``str``) compares equal to the member. Compare with ``==`` / ``in``, never with ``is``.

Two places still tell a member from its string: ``repr`` (``<ErrorKind.TIMEOUT: 'timeout'>``, shown when a log line
formats a dict or list) and Dagster's serialiser, which refuses an enum member it does not know as a metadata value.
Records that reach them (the failure examples of a stage summary) hold ``str(member)``, the plain string.

The table in :mod:`embedding_pipeline.sources.items` (and the README's "What happens to each item") says which
stage sets each kind and which kinds are transient.
"""

from __future__ import annotations

from enum import StrEnum


class ItemStatus(StrEnum):
    """How an item ended."""

    OK = "ok"  # passed every stage run so far (no error_kind)
    FAILED = "failed"  # stopped at some stage; ``error_kind`` says why
    SKIPPED = "skipped"  # left out on purpose (a duplicate or a file that is clearly no image): not an error


class ErrorKind(StrEnum):
    """Why an item failed or was skipped (``†``: transient, the failure may pass by itself)."""

    # manifest
    BAD_ROW = "bad_row"  # a manifest line that is not valid JSON or an object, has no uri, or a long id
    BAD_METADATA = "bad_metadata"  # metadata is not a JSON object (or not valid JSON), or is over 64 KiB
    DUPLICATE_ID = "duplicate_id"  # an id already used by another item of the drop
    DUPLICATE = "duplicate"  # skipped: the same content listed again without an id (one row, not an error)
    IGNORED = "ignored"  # skipped: a loose file of a folder drop that is clearly no image (.txt, .md ...)
    # local files
    NOT_FOUND = "not_found"  # the path does not exist
    OUTSIDE_ROOTS = "outside_roots"  # the path (after .. and symlinks) is outside the drop and allowed_roots
    NOT_A_FILE = "not_a_file"  # a directory, FIFO, device or socket
    TOO_LARGE = "too_large"  # bigger than max_image_bytes (also for downloads)
    UNREADABLE = "unreadable"  # † permission denied or another I/O error
    ACCESS_DENIED = "access_denied"  # † an s3:// object the credentials may not read
    # URLs
    BAD_URL = "bad_url"  # no host, or a scheme other than http/https (ftp://, file:// ...)
    REFUSED_ADDRESS = "refused_address"  # the host resolves only to non-public addresses that are not allow-listed
    HTTP_ERROR = "http_error"  # a 4xx status or another status that is not 200 (the message has the code)
    HTTP_UNAVAILABLE = "http_unavailable"  # † 408, 425, 429 or 5xx: the server says "not now" (after retries)
    TIMEOUT = "timeout"  # † connect/read timeout (after retries), or the download deadline passed
    CONNECTION_ERROR = "connection_error"  # † DNS failure, refused connection, reset, TLS failure
    TOO_MANY_REDIRECTS = "too_many_redirects"  # more redirects than the limit
    # content
    EMPTY_FILE = "empty_file"  # zero bytes
    NOT_IMAGE = "not_image"  # not an image by its content (HTML page, text, PDF, SVG, HEIC ...)
    # decoding (set by the preprocess stage)
    TRUNCATED = "truncated"  # the image data ends early
    TOO_MANY_PIXELS = "too_many_pixels"  # declares more pixels than allowed (decompression bomb guard)
    DECODE_ERROR = "decode_error"  # the image data is corrupt
    SOURCE_CHANGED = "source_changed"  # † the file changed between the manifest stage and decoding
    # indexing (set by the index stage)
    ID_CONFLICT = "id_conflict"  # the id already names another image that another drop holds (that image stays)
