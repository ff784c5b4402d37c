"""Checks that run before any endpoint: the optional API key, and the request body size limit.

Both are plain ASGI middleware, so they also cover unknown routes and bodies FastAPI never parses, and they answer
in the API's one error shape.
"""

from __future__ import annotations

import hmac
import json
import os
from typing import Any, Awaitable, Callable, Sequence

from embedding_pipeline.api.errors import error_body

API_KEY_ENV = "EMBEDDING_PIPELINE_API_KEY"
# Reachable without a key: load balancers probe health, and the docs only describe the API.
OPEN_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


def public_bind_problem(host: str, has_key: bool, insecure: bool) -> str | None:
    """Why serving on ``host`` is refused (None: it is fine). A non-loopback bind needs an API key, or ``insecure``
    said out loud: without a key anyone who reaches the address can insert and search."""
    import ipaddress

    if has_key or insecure:
        return None
    name = host.strip("[]")
    try:
        loopback = ipaddress.ip_address(name).is_loopback
    except ValueError:
        loopback = name == "localhost"
    if loopback:
        return None
    return (
        f"refusing to serve the API on {host} without an API key: anyone who reaches that address could insert and "
        "search. Set EMBEDDING_PIPELINE_API_KEY, bind 127.0.0.1, or pass --insecure if that is what you want"
    )


def api_key_from_env() -> str | None:
    return os.environ.get(API_KEY_ENV) or None


async def _reject(
    send: Send, status: int, code: str, message: str, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    body = json.dumps(error_body(code, message)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class ApiKeyGuard:
    """Requires ``X-API-Key: <key>`` or ``Authorization: Bearer <key>`` on every path but :data:`OPEN_PATHS`."""

    def __init__(self, app: App, api_key: str):
        self.app = app
        self.key = api_key.encode()

    def _presented(self, scope: Scope) -> bytes | None:
        key = _header(scope, b"x-api-key")
        if key is None:
            auth = _header(scope, b"authorization") or ""
            scheme, _, token = auth.partition(" ")
            key = token.strip() if scheme.lower() == "bearer" else None
        return key.encode("latin-1") if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path", "") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        presented = self._presented(scope)
        # compare_digest: the time taken does not reveal how much of a guessed key was right.
        if presented is None or not hmac.compare_digest(presented, self.key):
            message = "missing API key" if presented is None else "wrong API key"
            await _reject(
                send,
                401,
                "unauthorized",
                f"{message}: send the header 'X-API-Key: <key>' or 'Authorization: Bearer <key>'",
                [(b"www-authenticate", b"Bearer")],
            )
            return
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuses bodies over ``max_bytes`` with 413: at once from ``Content-Length``, else while reading (chunked)."""

    def __init__(self, app: App, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"request body larger than {self.max_bytes} bytes (api.max_request_bytes)"
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > self.max_bytes
            except ValueError:
                await _reject(send, 400, "bad_request", f"invalid Content-Length header {declared!r}")
                return
            if too_large:
                await _reject(send, 413, "request_too_large", message)
                return
        # Without a trustworthy length (chunked upload), buffer up to the limit before the app sees anything, so
        # the refusal can still be a clean 413 rather than a connection cut mid-response.
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            event = await receive()
            if event["type"] == "http.disconnect":
                return
            chunk = event.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _reject(send, 413, "request_too_large", message)
                return
            chunks.append(chunk)
            more = event.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class InFlightLimit:
    """At most ``limit`` requests in progress; the next ones get a clear 503 with ``Retry-After`` at once instead of
    queueing on the worker threads (a burst of slow URL searches or long waits cannot starve everyone else).
    ``/health`` is always answered: it is how operators see the API is busy rather than down."""

    def __init__(self, app: App, limit: int):
        self.app = app
        self.limit = limit
        self.active = 0  # the event loop is one thread: no lock needed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path", "") == "/health":
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            await _reject(
                send,
                503,
                "busy",
                f"{self.active} requests are in progress (api.max_in_flight); retry shortly",
                [(b"retry-after", b"1")],
            )
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1
