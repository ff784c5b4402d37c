"""A local HTTP server that misbehaves on request, for download tests (127.0.0.1 only, random port).

Routes (every response but ``/status`` is ``200`` unless said otherwise)::

    /files/<name>                    the file from ``files_dir``, always as ``Content-Type: image/jpeg``
    /status/<code>                   that status code
    /flaky/<n>/<name>                500 for the first n requests of this path, then the file
    /retry-after/<n>/<s>/<name>      503 with ``Retry-After: <s>`` for the first n requests, then the file
    /slow/<seconds>                  sleeps, then answers
    /trickle/<bytes>/<interval>      that many bytes, one every ``interval`` seconds, no Content-Length
    /trickle-headers/<n>/<interval>  a status line, then n header bytes one every ``interval`` seconds
    /loop                            302 to itself
    /redirect?to=<url>               302 to the URL
    /big/<bytes>                     that many bytes streamed without Content-Length
    /declared-big                    Content-Length of 1 GB, a few bytes, then the connection closes
    /html                            an HTML "404 not found" page with status 200 and Content-Type image/jpeg

The ``Content-Type`` is ``image/jpeg`` everywhere on purpose: clients must judge content by its bytes.
Requests are counted per path (query included) for "fetched once" and retry assertions. A request in absolute
form (``GET http://host/files/x``, as sent to a forward proxy) is served like its path, so the server can also
stand in for a proxy.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

HTML_404 = (
    b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
    b"<body><h1>Not Found</h1><p>The requested image was not found on this server.</p></body></html>\n"
)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request, client_address):  # noqa: ANN001
        pass  # clients hang up on purpose (size limits, timeouts); tracebacks would only be noise


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    owner: "TestServer"

    def log_message(self, format, *args):  # noqa: A002, ANN001
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.owner._count(self.path, self.headers.get("Host", ""))
        parts = urlsplit(self.path)
        route = parts.path.strip("/").split("/")
        try:
            handler = getattr(self, "_" + route[0].replace("-", "_"), None)
            if handler is None:
                self._send(404, b"no such route")
            else:
                handler(route[1:], parse_qs(parts.query))
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _send(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _file(self, name: str) -> None:
        path = (self.owner.files_dir or Path("/nonexistent")) / name
        if not path.is_file():
            self._send(404, b"not found")
        else:
            self._send(200, path.read_bytes())

    def _files(self, args: list[str], query: dict) -> None:
        self._file("/".join(args))

    def _status(self, args: list[str], query: dict) -> None:
        self._send(int(args[0]), f"status {args[0]}".encode())

    def _flaky(self, args: list[str], query: dict) -> None:
        if self.owner.requests(self.path) <= int(args[0]):
            self._send(500, b"try again")
        else:
            self._file("/".join(args[1:]))

    def _retry_after(self, args: list[str], query: dict) -> None:
        if self.owner.requests(self.path) <= int(args[0]):
            self._send(503, b"busy", {"Retry-After": args[1]})
        else:
            self._file("/".join(args[2:]))

    def _slow(self, args: list[str], query: dict) -> None:
        time.sleep(float(args[0]))
        self._send(200, b"late")

    def _trickle_headers(self, args: list[str], query: dict) -> None:
        # Each byte arrives well within any read timeout; only a deadline over the whole download stops this.
        self.wfile.write(b"HTTP/1.1 200 OK\r\n")
        self.wfile.flush()
        for _ in range(int(args[0])):
            time.sleep(float(args[1]))
            self.wfile.write(b"X")
            self.wfile.flush()

    def _trickle(self, args: list[str], query: dict) -> None:
        self._stream(int(args[0]), chunk=1, pause=float(args[1]))

    def _loop(self, args: list[str], query: dict) -> None:
        self._send(302, b"", {"Location": "/loop"})

    def _redirect(self, args: list[str], query: dict) -> None:
        self._send(302, b"", {"Location": query["to"][0]})

    def _big(self, args: list[str], query: dict) -> None:
        self._stream(int(args[0]), chunk=64 * 1024, pause=0.0)

    def _declared_big(self, args: list[str], query: dict) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(1_000_000_000))
        self.end_headers()
        self.wfile.write(b"\xff\xd8\xff\xe0" + b"\0" * 1000)
        self.close_connection = True

    def _html(self, args: list[str], query: dict) -> None:
        self._send(200, HTML_404)

    def _stream(self, total: int, chunk: int, pause: float) -> None:
        # HTTP/1.0 without Content-Length: the body ends when the connection closes.
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.end_headers()
        sent = 0
        while sent < total:
            n = min(chunk, total - sent)
            self.wfile.write(b"\0" * n)
            self.wfile.flush()
            sent += n
            if pause:
                time.sleep(pause)
        self.close_connection = True


class TestServer:
    """``with TestServer(files_dir) as server: server.url("/files/a.jpg")``.

    ``url_host`` is the host name put into URLs (the socket always listens on 127.0.0.1), e.g. ``localhost`` to
    test that a name resolving to loopback is refused like the address itself.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, files_dir: Path | None = None, url_host: str = "127.0.0.1", tls: ssl.SSLContext | None = None):
        self.files_dir = files_dir
        self.url_host = url_host
        self.tls = tls  # a server-side context makes it an HTTPS server
        self._counts: Counter[str] = Counter()
        self.last_host = ""  # the Host header of the latest request
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.url_host}:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + "/" + path.lstrip("/")

    def requests(self, path: str) -> int:
        """How many requests reached ``path`` (as sent, query included)."""
        with self._lock:
            return self._counts[path]

    def _count(self, path: str, host: str) -> None:
        with self._lock:
            self._counts[path] += 1
            self.last_host = host

    def __enter__(self) -> "TestServer":
        handler = type("Handler", (_Handler,), {"owner": self})
        self._server = _Server(("127.0.0.1", 0), handler)
        if self.tls is not None:
            self._server.socket = self.tls.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, name="test-http", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
