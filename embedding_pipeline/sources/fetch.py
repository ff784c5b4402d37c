"""Reading an item's bytes: local files confined to allowed roots, URLs fetched with limits.

Both raise :class:`FetchError` with a ``kind`` (see the table in :mod:`embedding_pipeline.sources.items`) and a
short, specific message for the per-item error column.

URL downloads are guarded at three levels:

* **addresses** — every TCP connection, including each redirect hop and each retry, resolves the host itself,
  drops addresses the :class:`~embedding_pipeline.sources.addresses.AddressPolicy` refuses (loopback, private,
  link-local, metadata services ... unless allow-listed) and connects to exactly one of the validated addresses,
  so a DNS answer that changes between check and connect (rebinding) cannot redirect it. TLS still verifies the
  certificate against the URL's host name. With ``sources.fetch_proxy`` set, connections go to the proxy (the
  operator's choice, never checked), and the policy is applied to the target host's own DNS answer before each
  request — the proxy resolves the name again, so there the guarantee is only as good as the two answers agreeing;
* **time** — connect and read timeouts per socket operation, plus a wall-clock deadline per download; retries
  with backoff on connection errors, read timeouts, 429 and 5xx, with a server's ``Retry-After`` capped;
* **size** — a ``Content-Length`` over the limit is refused before the body is read, and a body is abandoned as
  soon as it passes the limit.

Redirects are followed here, not by ``requests``: it reads a redirect's whole body into memory before following it.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import threading
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO, Iterator
from urllib.parse import urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3 import exceptions as u3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util.retry import Retry

from embedding_pipeline.settings import SourceSettings
from embedding_pipeline.sources.addresses import AddressPolicy, AddressRefused
from embedding_pipeline.sources.statuses import ErrorKind

MAX_REDIRECTS = 5
# A server asking for a longer pause than this gets this long: one hostile header must not stall a run.
RETRY_AFTER_CAP_S = 5
_CHUNK = 64 * 1024


class FetchError(Exception):
    """An item's bytes could not be read. ``str(exc)`` is the message for the per-item error column."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:  # keep both fields when sent between processes
        return (type(self), (self.kind, self.message))


# ---------------------------------------------------------------------------------------------------------------
# Local files


def read_local(path: str | Path, roots: list[Path], max_bytes: int, identity: str | None = None) -> bytes:
    """The bytes of a regular file under one of ``roots`` (after following every symlink).

    ``identity`` (``"<device>:<inode>:<mtime ns>"``, from :func:`read_local_file` when the item was listed) makes a
    later stage refuse a file that was replaced since: ``source_changed``."""
    data, found = read_local_file(path, roots, max_bytes)
    if identity and found != identity:
        raise FetchError(ErrorKind.SOURCE_CHANGED, f"the file was replaced since the drop was listed: {path}")
    return data


def read_local_file(path: str | Path, roots: list[Path], max_bytes: int) -> tuple[bytes, str]:
    """The one guarded way to read a local source: (bytes, ``"<device>:<inode>:<mtime ns>"``) of a regular file under
    one of ``roots``. The path is resolved first (a symlink out of the roots is refused), then opened without
    following a link, without blocking, and checked again on the open descriptor (a file swapped for a FIFO, a device
    or a link in between is refused, never waited on); at most ``max_bytes + 1`` bytes are read."""
    real = os.path.realpath(path)  # follows symlinks, so a link out of the roots is caught below
    if not any(_inside(real, _real_root(str(root))) for root in roots):
        raise FetchError(ErrorKind.OUTSIDE_ROOTS, f"path outside the allowed roots: {path}")
    try:
        # Look before opening: a device is never opened (opening some has effects), a file over the cap never read.
        info = os.stat(real)
        if not stat.S_ISREG(info.st_mode):
            raise FetchError(ErrorKind.NOT_A_FILE, f"not a regular file ({_file_type(info.st_mode)}): {path}")
        if info.st_size > max_bytes:
            raise FetchError(ErrorKind.TOO_LARGE, f"file too large: {info.st_size} bytes > {max_bytes}")
        try:
            with open_regular(real, path) as (f, opened):
                # Sized by the open file, not the cap: read(cap) would allocate the whole cap for every small file.
                data = f.read(min(opened.st_size, max_bytes) + 1)
                if len(data) > opened.st_size and len(data) <= max_bytes:
                    data += f.read(max_bytes + 1 - len(data))  # grew while read: still capped
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a link put in place since the path was resolved
                raise FetchError(ErrorKind.NOT_A_FILE, f"became a symbolic link while being read: {path}") from None
            raise
        if len(data) > max_bytes:
            raise FetchError(ErrorKind.TOO_LARGE, f"file too large: more than {max_bytes} bytes")
        # Inode numbers are reused at once after a delete: the modification time tells a new file in the same slot.
        return data, f"{opened.st_dev}:{opened.st_ino}:{opened.st_mtime_ns}"
    except FileNotFoundError:
        raise FetchError(ErrorKind.NOT_FOUND, f"file not found: {path}") from None
    except PermissionError:
        raise FetchError(ErrorKind.UNREADABLE, f"permission denied: {path}") from None
    except OSError as exc:
        raise FetchError(ErrorKind.UNREADABLE, f"cannot read {path}: {exc.strerror or exc}") from None


@lru_cache(maxsize=256)
def _real_root(root: str) -> str:
    """A root resolved once per process (drop folders and ``allowed_roots``, which settings resolve already)."""
    return os.path.realpath(root)


def _inside(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip("/") + "/")


@contextmanager
def open_regular(path: str | Path, shown: str | Path | None = None) -> Iterator[tuple[BinaryIO, os.stat_result]]:
    """``path`` opened for reading only if it is a regular file: never follows a final symlink (O_NOFOLLOW), never
    blocks on a FIFO (O_NONBLOCK), and checks the type on the open descriptor. Raises :class:`FetchError`
    (``not_a_file``) or ``OSError``."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            raise FetchError(
                ErrorKind.NOT_A_FILE, f"not a regular file ({_file_type(opened.st_mode)}): {shown or path}"
            )
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f, opened


def _file_type(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "special file"


# ---------------------------------------------------------------------------------------------------------------
# Connections that enforce the address policy


class _Deadline:
    """One absolute deadline for a whole download — connect, headers, body, retries and redirects together.

    Per-operation socket timeouts cannot bound a server that trickles its headers a byte at a time; this can: every
    socket the download opens (through :class:`_WatchedConnectionMixin`, on this thread) is shut down when the
    deadline passes, which ends whatever read is blocked on it."""

    _current = threading.local()

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def __enter__(self) -> "_Deadline":
        self._current.watch = self
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        self._current.watch = None
        with self._lock:
            for sock in self._sockets:
                sock.close()  # our duplicates only: the connections themselves stay with their pools
            self._sockets.clear()

    @classmethod
    def left(cls) -> float:
        """Seconds left to the download running on this thread (infinite when none is)."""
        current = getattr(cls._current, "watch", None)
        return current.remaining() if current is not None else float("inf")

    @classmethod
    def watch(cls, sock: socket.socket) -> None:
        """Put ``sock`` under the deadline of the download running on this thread (if any)."""
        current = getattr(cls._current, "watch", None)
        if current is not None:
            current._add(sock)

    def _add(self, sock: socket.socket) -> None:
        # A duplicate descriptor of the same socket: TLS wraps (detaches) the original object, and a pooled
        # connection outlives this download, but shutting down any descriptor of a socket ends every read on it.
        try:
            duplicate = socket.socket(fileno=os.dup(sock.fileno()))
        except OSError:
            return
        with self._lock:
            self._sockets.append(duplicate)
            if self.expired:
                _shutdown(duplicate)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


class _WatchedConnectionMixin:
    """Every new socket goes under the running download's :class:`_Deadline`."""

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()  # type: ignore[misc]
        _Deadline.watch(sock)
        return sock


class _WatchedPoolMixin:
    """A kept-alive connection taken from the pool goes under the running download's deadline too."""

    def _get_conn(self, timeout: float | None = None) -> Any:
        conn = super()._get_conn(timeout)  # type: ignore[misc]
        sock = getattr(conn, "sock", None)
        if sock is not None:
            _Deadline.watch(sock)
        return conn


class _GuardedConnectionMixin:
    """Resolve, check, then connect to the checked address itself (never a second, unchecked lookup)."""

    policy: AddressPolicy
    _dns_host: str
    port: int
    host: str

    def _new_conn(self) -> socket.socket:
        try:
            addresses = self.policy.resolve(self._dns_host, self.port)
        except socket.gaierror as exc:
            raise u3.NameResolutionError(self.host, self, exc) from exc  # type: ignore[arg-type]
        # The parent connects to ``_dns_host``; point it at the checked address for the duration of the call
        # only, because ``host`` (derived from it) is the TLS server name and the Host header.
        original = self._dns_host
        error: Exception | None = None
        for address in addresses:
            self._dns_host = address
            try:
                return super()._new_conn()  # type: ignore[misc]
            except u3.NewConnectionError as exc:  # refused/unreachable: try the next address, like the resolver
                error = exc
            finally:
                self._dns_host = original
        assert error is not None
        raise error


def _guarded_pool_classes(policy: AddressPolicy) -> dict[str, type]:
    class GuardedHTTPConnection(_WatchedConnectionMixin, _GuardedConnectionMixin, HTTPConnection):
        pass

    class GuardedHTTPSConnection(_WatchedConnectionMixin, _GuardedConnectionMixin, HTTPSConnection):
        pass

    GuardedHTTPConnection.policy = GuardedHTTPSConnection.policy = policy

    class GuardedHTTPConnectionPool(_WatchedPoolMixin, HTTPConnectionPool):
        ConnectionCls = GuardedHTTPConnection

    class GuardedHTTPSConnectionPool(_WatchedPoolMixin, HTTPSConnectionPool):
        ConnectionCls = GuardedHTTPSConnection

    return {"http": GuardedHTTPConnectionPool, "https": GuardedHTTPSConnectionPool}


# Statuses that say "not now" rather than "no": 408 Request Timeout, 425 Too Early, 429 Too Many Requests, 5xx.
TRY_LATER_STATUSES = frozenset({408, 425, 429, *range(500, 600)})


class _WatchedHTTPConnectionPool(_WatchedPoolMixin, HTTPConnectionPool):
    ConnectionCls = type("WatchedHTTPConnection", (_WatchedConnectionMixin, HTTPConnection), {})


class _WatchedHTTPSConnectionPool(_WatchedPoolMixin, HTTPSConnectionPool):
    ConnectionCls = type("WatchedHTTPSConnection", (_WatchedConnectionMixin, HTTPSConnection), {})


class _WatchedAdapter(HTTPAdapter):
    """Through a proxy: no address policy (the operator's proxy), but the deadline still covers every socket."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _WatchedHTTPConnectionPool,
            "https": _WatchedHTTPSConnectionPool,
        }

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = {"http": _WatchedHTTPConnectionPool, "https": _WatchedHTTPSConnectionPool}
        return manager


class _GuardedAdapter(HTTPAdapter):
    def __init__(self, policy: AddressPolicy, **kwargs: Any):
        self._policy = policy  # before super().__init__, which builds the pool manager
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _guarded_pool_classes(self._policy)


class _Retry(Retry):
    def increment(
        self,
        method: Any = None,
        url: Any = None,
        response: Any = None,
        error: Any = None,
        _pool: Any = None,
        _stacktrace: Any = None,
    ) -> "_Retry":
        # urllib3 drains a retried response's body to reuse the connection; a hostile error body can be endless,
        # so drop the connection instead.
        if response is not None:
            response.close()
        if _Deadline.left() <= 0:
            # The download's one deadline has passed: no further try, whatever the retry budget says.
            raise u3.MaxRetryError(_pool, url, error or u3.ResponseError("the download deadline passed"))
        return super().increment(method, url, response=response, error=error, _pool=_pool, _stacktrace=_stacktrace)

    def get_backoff_time(self) -> float:
        return max(0.0, min(super().get_backoff_time(), _Deadline.left()))

    def get_retry_after(self, response: Any) -> float | None:
        wait = super().get_retry_after(response)
        return None if wait is None else max(0.0, min(wait, _Deadline.left()))


# ---------------------------------------------------------------------------------------------------------------
# Downloads


class UrlFetcher:
    """A requests session with retries/backoff and the address policy; one per thread (sessions are not
    thread-safe). Close it when done."""

    def __init__(self, settings: SourceSettings):
        self.settings = settings
        self.policy = AddressPolicy.from_settings(settings.allow_private_urls, settings.private_allowlist)
        retry = _Retry(
            total=settings.fetch_retries,
            backoff_factor=0.5,
            backoff_max=RETRY_AFTER_CAP_S,
            retry_after_max=RETRY_AFTER_CAP_S,
            status_forcelist=(429, 500, 502, 503, 504),
            allowed_methods=("GET",),
            raise_on_status=False,
            redirect=False,
        )
        self.session = requests.Session()
        # Environment proxies and .netrc credentials would route around the address policy.
        self.session.trust_env = False
        self.session.headers["Accept-Encoding"] = "identity"  # images are compressed already; no decompression
        if settings.fetch_proxy:
            self.session.proxies = {"http": settings.fetch_proxy, "https": settings.fetch_proxy}
            adapter: HTTPAdapter = _WatchedAdapter(max_retries=retry)
        else:
            adapter = _GuardedAdapter(self.policy, max_retries=retry)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def get(self, url: str) -> bytes:
        """The body of ``url`` (redirects followed here, each hop checked), within one absolute deadline
        (``sources.fetch_deadline_s``) that covers connecting, headers, body, retries and redirects."""
        with _Deadline(self.settings.fetch_deadline_s) as deadline:
            try:
                data = self._get(url, deadline)
            except FetchError:
                if deadline.expired:
                    raise self._late(url) from None
                raise
            if deadline.expired:
                # A body cut by the deadline can look complete (HTTP/1.0 ends a body by closing the connection).
                raise self._late(url)
            return data

    def _late(self, url: str) -> FetchError:
        return FetchError(ErrorKind.TIMEOUT, f"download took longer than {self.settings.fetch_deadline_s:g} s: {url}")

    def _get(self, url: str, deadline: _Deadline) -> bytes:
        current = url
        for _ in range(MAX_REDIRECTS + 1):
            self._check(current)
            if deadline.remaining() <= 0:
                raise self._late(url)
            with self._request(current, deadline.remaining()) as resp:
                target = self.session.get_redirect_target(resp)
                if target:
                    current = urljoin(resp.url, target)
                    continue
                if resp.status_code != 200:
                    # A server error or "try later" may pass; any other status is the server's answer about the URL.
                    unavailable = resp.status_code in TRY_LATER_STATUSES
                    kind = ErrorKind.HTTP_UNAVAILABLE if unavailable else ErrorKind.HTTP_ERROR
                    raise FetchError(kind, f"HTTP {resp.status_code} from {current}")
                return self._body(resp, current, deadline)
        raise FetchError(ErrorKind.TOO_MANY_REDIRECTS, f"more than {MAX_REDIRECTS} redirects from {url}")

    def close(self) -> None:
        self.session.close()

    def _check(self, url: str) -> None:
        try:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        except ValueError as exc:
            raise FetchError(ErrorKind.BAD_URL, f"invalid URL ({exc}): {url}") from None
        if parts.scheme.lower() not in ("http", "https"):
            raise FetchError(ErrorKind.BAD_URL, f"unsupported URL scheme {parts.scheme!r} (only http/https): {url}")
        if not parts.hostname:
            raise FetchError(ErrorKind.BAD_URL, f"URL has no host: {url}")
        if self.settings.fetch_proxy and not self.policy.allow_all:
            # Through a proxy no connection of ours reaches the target: check its address up front.
            try:
                self.policy.resolve(parts.hostname, port)
            except AddressRefused as exc:
                raise FetchError(ErrorKind.REFUSED_ADDRESS, str(exc)) from None
            except socket.gaierror as exc:
                message = f"cannot resolve {parts.hostname}: {exc.strerror}"
                raise FetchError(ErrorKind.CONNECTION_ERROR, message) from None

    def _request(self, url: str, remaining: float) -> requests.Response:
        t = max(0.001, min(self.settings.fetch_timeout_s, remaining))
        try:
            return self.session.get(url, stream=True, timeout=(t, t), allow_redirects=False)
        except AddressRefused as exc:
            raise FetchError(ErrorKind.REFUSED_ADDRESS, str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - requests/urllib3 raise many types; classify them all
            raise _classify(exc, url, t) from None

    def _body(self, resp: requests.Response, url: str, deadline: _Deadline) -> bytes:
        limit = self.settings.max_image_bytes
        declared = resp.headers.get("Content-Length", "").strip()
        if declared.isdigit() and int(declared) > limit:
            message = f"download too large: Content-Length {declared} > {limit} bytes: {url}"
            raise FetchError(ErrorKind.TOO_LARGE, message)
        chunks: list[bytes] = []
        total = 0
        try:
            while True:
                # read1 returns after one socket read, so a trickling server still meets the deadline check.
                chunk = resp.raw.read1(_CHUNK)
                if not chunk:
                    break
                total += len(chunk)
                if total > limit:
                    raise FetchError(ErrorKind.TOO_LARGE, f"download larger than {limit} bytes: {url}")
                if deadline.remaining() < 0:
                    raise FetchError(
                        ErrorKind.TIMEOUT, f"download took longer than {self.settings.fetch_deadline_s:g} s: {url}"
                    )
                chunks.append(chunk)
        except FetchError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise _classify(exc, url, self.settings.fetch_timeout_s) from None
        return b"".join(chunks)


def _causes(exc: BaseException) -> list[BaseException]:
    """The exception and what it wraps: requests wraps urllib3's errors in ``args[0]``, urllib3 in ``reason``."""
    seen: list[BaseException] = []
    todo: list[Any] = [exc]
    while todo:
        e = todo.pop(0)
        if not isinstance(e, BaseException) or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [getattr(e, "reason", None), e.args[0] if e.args else None, e.__cause__, e.__context__]
    return seen


def _classify(exc: Exception, url: str, timeout: float) -> FetchError:
    causes = _causes(exc)

    def has(*types: type) -> bool:
        return any(isinstance(c, types) for c in causes)

    if has(AddressRefused):
        refused = next(c for c in causes if isinstance(c, AddressRefused))
        return FetchError(ErrorKind.REFUSED_ADDRESS, str(refused))
    if has(requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema, requests.exceptions.MissingSchema):
        return FetchError(ErrorKind.BAD_URL, f"invalid URL: {url}")
    if has(u3.LocationValueError):
        return FetchError(ErrorKind.BAD_URL, f"invalid URL: {url}")
    if has(requests.exceptions.TooManyRedirects):
        return FetchError(ErrorKind.TOO_MANY_REDIRECTS, f"too many redirects from {url}")
    if has(u3.NameResolutionError):
        return FetchError(ErrorKind.CONNECTION_ERROR, f"cannot resolve host of {url}")
    if has(u3.NewConnectionError):  # a subclass of ConnectTimeoutError, so before the timeouts
        return FetchError(ErrorKind.CONNECTION_ERROR, f"cannot connect to {url}")
    if has(requests.exceptions.Timeout, u3.TimeoutError, socket.timeout):
        return FetchError(ErrorKind.TIMEOUT, f"timed out after {timeout:g} s: {url}")
    if has(requests.exceptions.SSLError, u3.SSLError):
        return FetchError(ErrorKind.CONNECTION_ERROR, f"TLS error for {url}")
    return FetchError(ErrorKind.CONNECTION_ERROR, f"download failed for {url}: {type(exc).__name__}")
