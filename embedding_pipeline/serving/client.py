"""Client for the embedding model on any Triton server (the bundled one, a container, a remote cluster).

Everything about the model — input name, datatype, shape, batch limit, output — is read from the server's model
metadata and config, so another model with another layout works without code changes.

How requests travel:

* ``TritonEmbedder`` keeps ``concurrency`` worker threads, each owning its **own** ``tritonclient`` client (the
  HTTP client is gevent-based and not thread-safe, and its ``async_infer`` sleeps 10 ms per call, so threads with
  one plain client each are the fast way to keep several requests in flight). Every call — inference, metadata,
  readiness — runs on a worker, so one embedder may be shared by several threads of its caller.
* ``embed`` splits a batch into ``max_batch_size`` chunks sent concurrently; ``embed_stream`` does the same for an
  iterator of batches, reading the next batch while earlier ones are on the server, and yields results in order.
* HTTP (default) or gRPC; tensors travel as binary data, or through Triton *system shared memory* when the server
  is on this host (see :mod:`embedding_pipeline.serving.shared_memory`).
* Retries with exponential backoff on connection errors, timeouts and 5xx / UNAVAILABLE — never on a refused
  request (4xx, bad input), which would fail the same way again. Errors name the endpoint, the model and the
  number of attempts.

Close the embedder (or use ``with``): each worker then unregisters its shared memory and closes its client — an
open connection holds up the server's shutdown.
"""

from __future__ import annotations

import http.client
import logging
import math
import queue
import re
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Literal, Protocol, TypeVar

import numpy as np

from embedding_pipeline.serving.shared_memory import SharedMemoryRegion

if TYPE_CHECKING:
    from embedding_pipeline.settings import TritonSettings

log = logging.getLogger(__name__)

T = TypeVar("T")
WireProtocol = Literal["http", "grpc"]
SharedMemoryMode = Literal["auto", "on", "off"]

# Triton datatype names -> numpy dtypes, for the types an image or embedding model plausibly uses.
_NUMPY_TYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# A single backoff never exceeds this, however many retries are configured.
MAX_BACKOFF_S = 30.0
# gRPC status codes worth another attempt: the server or the path to it was down, slow or broken.
_RETRYABLE_GRPC = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.INTERNAL",
                   "StatusCode.ABORTED"}
# 5xx codes that mean "this server will never do that", not "try again".
_PERMANENT_5XX = {"501", "505"}


class TritonClientError(RuntimeError):
    """A request to Triton failed; the message names the endpoint, the model and (after retries) the attempts."""

    def __init__(self, message: str, attempts: int = 1, retryable: bool = False) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.retryable = retryable


@dataclass(frozen=True)
class ModelInputSpec:
    """What the served model takes and returns. ``shape`` excludes the batch dimension, e.g. ``(224, 224, 3)``."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    max_batch_size: int
    output_name: str
    output_dim: int
    output_datatype: str = "FP32"

    @property
    def dtype(self) -> np.dtype:
        try:
            return np.dtype(_NUMPY_TYPES[self.datatype])
        except KeyError:
            raise TritonClientError(f"input datatype {self.datatype} is not supported by this client") from None


@dataclass(frozen=True)
class ModelStatistics:
    """The server's counters for the model (summed over versions unless one version was asked for).

    ``request_count`` counts successful requests, ``inference_count`` the rows (images) they carried,
    ``execution_count`` the model runs — fewer than requests when the dynamic batcher merged some.
    ``batch_executions`` maps each executed batch size to how many runs had it.
    """

    request_count: int = 0
    failed_count: int = 0
    inference_count: int = 0
    execution_count: int = 0
    queue_ns: int = 0
    compute_infer_ns: int = 0
    batch_executions: dict[int, int] = field(default_factory=dict)

    @property
    def largest_batch(self) -> int:
        return max(self.batch_executions, default=0)

    @classmethod
    def from_json(cls, data: dict[str, Any], version: str = "") -> "ModelStatistics":
        """From ``get_inference_statistics`` JSON (HTTP numbers, or gRPC's strings with zero fields left out)."""
        totals: dict[str, int] = dict.fromkeys(("requests", "failed", "rows", "runs", "queue", "infer"), 0)
        batches: dict[int, int] = {}
        for entry in data.get("model_stats", []):
            if version and str(entry.get("version", "")) != version:
                continue
            stats = entry.get("inference_stats", {})
            totals["requests"] += int(stats.get("success", {}).get("count", 0))
            totals["failed"] += int(stats.get("fail", {}).get("count", 0))
            totals["queue"] += int(stats.get("queue", {}).get("ns", 0))
            totals["infer"] += int(stats.get("compute_infer", {}).get("ns", 0))
            totals["rows"] += int(entry.get("inference_count", 0))
            totals["runs"] += int(entry.get("execution_count", 0))
            for batch in entry.get("batch_stats", []):
                size = int(batch.get("batch_size", 0))
                batches[size] = batches.get(size, 0) + int(batch.get("compute_infer", {}).get("count", 0))
        return cls(totals["requests"], totals["failed"], totals["rows"], totals["runs"], totals["queue"],
                   totals["infer"], batches)


# -- retry policy ------------------------------------------------------------------------------------------------


def is_retryable(exc: BaseException) -> bool:
    """True for failures another attempt may fix: connection errors, timeouts, 5xx, gRPC UNAVAILABLE & co."""
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, InferenceServerException):
        status = str(exc.status() or "")
        if status.startswith("StatusCode."):
            return status in _RETRYABLE_GRPC
        return len(status) == 3 and status.startswith("5") and status not in _PERMANENT_5XX
    # OSError covers refused/reset connections and socket timeouts; HTTPException a response cut off mid-way.
    return isinstance(exc, (OSError, http.client.HTTPException))


def describe_error(exc: BaseException) -> str:
    """A one-line account of a failure: ``HTTP 503: ...``, ``gRPC UNAVAILABLE: ...`` or ``TimeoutError: ...``."""
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, InferenceServerException):
        status = str(exc.status() or "")
        message = str(exc.message() or "").strip()
        if status.startswith("StatusCode."):
            return f"gRPC {status.removeprefix('StatusCode.')}: {message}"
        return f"HTTP {status}: {message}" if status else message
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class RetryPolicy:
    """Attempt an action up to ``retries + 1`` times, sleeping ``backoff_s * 2**n`` (at most 30 s) in between."""

    retries: int = 3
    backoff_s: float = 0.5
    sleep: Callable[[float], None] = time.sleep

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (0-based)."""
        return min(self.backoff_s * 2**attempt, MAX_BACKOFF_S)

    def run(self, action: Callable[[], T], what: str, where: str) -> T:
        """``action()``, retried on retryable failures; raises :class:`TritonClientError` naming ``where``."""
        for attempt in range(self.retries + 1):
            try:
                return action()
            except Exception as exc:  # noqa: BLE001 - classified below, re-raised as TritonClientError
                retryable = is_retryable(exc)
                if not retryable or attempt == self.retries:
                    tries = attempt + 1
                    raise TritonClientError(
                        f"{what} failed for {where} after {tries} attempt{'s' if tries > 1 else ''}: "
                        f"{describe_error(exc)}",
                        attempts=tries,
                        retryable=retryable,
                    ) from exc
                log.info("%s failed for %s (attempt %d), retrying: %s", what, where, attempt + 1,
                         describe_error(exc))
                self.sleep(self.delay(attempt))
        raise AssertionError("unreachable")


# -- one client connection, either protocol ------------------------------------------------------------------------


class _Transport(Protocol):
    """One tritonclient client behind a protocol-neutral interface (JSON dicts shaped like the HTTP API's)."""

    def server_ready(self) -> bool: ...
    def model_ready(self, model: str, version: str) -> bool: ...
    def metadata(self, model: str, version: str) -> dict[str, Any]: ...
    def config(self, model: str, version: str) -> dict[str, Any]: ...
    def repository_index(self) -> list[dict[str, Any]]: ...
    def statistics(self, model: str, version: str) -> dict[str, Any]: ...
    def register_system_shared_memory(self, name: str, key: str, byte_size: int) -> None: ...
    def unregister_system_shared_memory(self, name: str) -> None: ...
    def infer_input(self, name: str, shape: list[int], datatype: str) -> Any: ...
    def requested_output(self, name: str) -> Any: ...
    def set_input_data(self, tensor: Any, array: np.ndarray) -> None: ...
    def infer(self, model: str, version: str, inputs: list[Any], outputs: list[Any]) -> Any: ...
    def close(self) -> None: ...


class _HttpTransport:
    def __init__(self, address: str, timeout_s: float, ssl: bool) -> None:
        import tritonclient.http as httpclient

        self._module = httpclient
        self._client = httpclient.InferenceServerClient(
            address, connection_timeout=timeout_s, network_timeout=timeout_s, ssl=ssl
        )
        self._address = address

    def server_ready(self) -> bool:
        return self._client.is_server_ready()

    def model_ready(self, model: str, version: str) -> bool:
        return self._client.is_model_ready(model, version)

    def metadata(self, model: str, version: str) -> dict[str, Any]:
        return self._client.get_model_metadata(model, version)

    def config(self, model: str, version: str) -> dict[str, Any]:
        return self._client.get_model_config(model, version)

    def repository_index(self) -> list[dict[str, Any]]:
        return self._client.get_model_repository_index(headers=_admin_headers(self._address))

    def statistics(self, model: str, version: str) -> dict[str, Any]:
        return self._client.get_inference_statistics(model, version)

    def register_system_shared_memory(self, name: str, key: str, byte_size: int) -> None:
        self._client.register_system_shared_memory(name, key, byte_size, headers=_admin_headers(self._address))

    def unregister_system_shared_memory(self, name: str) -> None:
        self._client.unregister_system_shared_memory(name, headers=_admin_headers(self._address))

    def infer_input(self, name: str, shape: list[int], datatype: str) -> Any:
        return self._module.InferInput(name, shape, datatype)

    def requested_output(self, name: str) -> Any:
        return self._module.InferRequestedOutput(name, binary_data=True)

    def set_input_data(self, tensor: Any, array: np.ndarray) -> None:
        tensor.set_data_from_numpy(array, binary_data=True)

    def infer(self, model: str, version: str, inputs: list[Any], outputs: list[Any]) -> Any:
        return self._client.infer(model, inputs, model_version=version, outputs=outputs)

    def close(self) -> None:
        self._client.close()


def _admin_headers(address: str, grpc: bool = False) -> dict[str, str]:
    """The key that opens the restricted APIs of the Triton this state directory started — sent to loopback
    addresses only (a remote Triton has its own access control and never sees our key). Triton expects the gRPC
    metadata key with a ``triton-grpc-protocol-`` prefix."""
    from embedding_pipeline.serving import admin

    host = address.rsplit(":", 1)[0].strip("[]")
    if host not in ("127.0.0.1", "localhost", "::1"):
        return {}
    prefix = "triton-grpc-protocol-" if grpc else ""
    return {prefix + name: value for name, value in admin.headers().items()}


class _GrpcTransport:
    def __init__(self, address: str, timeout_s: float, ssl: bool) -> None:
        import tritonclient.grpc as grpcclient

        self._module = grpcclient
        self._timeout = timeout_s
        self._client = grpcclient.InferenceServerClient(address, ssl=ssl, channel_args=_grpc_channel_args())
        self._address = address

    def server_ready(self) -> bool:
        return self._client.is_server_ready(client_timeout=self._timeout)

    def model_ready(self, model: str, version: str) -> bool:
        return self._client.is_model_ready(model, version, client_timeout=self._timeout)

    def metadata(self, model: str, version: str) -> dict[str, Any]:
        data = self._client.get_model_metadata(model, version, as_json=True, client_timeout=self._timeout)
        # Protobuf JSON writes int64 as strings: make shapes look like the HTTP API's.
        for tensor in [*data.get("inputs", []), *data.get("outputs", [])]:
            tensor["shape"] = [int(d) for d in tensor.get("shape", [])]
        return data

    def config(self, model: str, version: str) -> dict[str, Any]:
        data = self._client.get_model_config(model, version, as_json=True, client_timeout=self._timeout)
        config = data.get("config", {})
        # Protobuf JSON leaves out zero values: a model without batching has no max_batch_size at all.
        config["max_batch_size"] = int(config.get("max_batch_size", 0))
        return config

    def repository_index(self) -> list[dict[str, Any]]:
        return self._client.get_model_repository_index(
            headers=_admin_headers(self._address, grpc=True), as_json=True, client_timeout=self._timeout
        ).get("models", [])

    def statistics(self, model: str, version: str) -> dict[str, Any]:
        return self._client.get_inference_statistics(model, version, as_json=True, client_timeout=self._timeout)

    def register_system_shared_memory(self, name: str, key: str, byte_size: int) -> None:
        headers = _admin_headers(self._address, grpc=True)
        self._client.register_system_shared_memory(name, key, byte_size, headers=headers, client_timeout=self._timeout)

    def unregister_system_shared_memory(self, name: str) -> None:
        headers = _admin_headers(self._address, grpc=True)
        self._client.unregister_system_shared_memory(name, headers=headers, client_timeout=self._timeout)

    def infer_input(self, name: str, shape: list[int], datatype: str) -> Any:
        return self._module.InferInput(name, shape, datatype)

    def requested_output(self, name: str) -> Any:
        return self._module.InferRequestedOutput(name)

    def set_input_data(self, tensor: Any, array: np.ndarray) -> None:
        tensor.set_data_from_numpy(array)

    def infer(self, model: str, version: str, inputs: list[Any], outputs: list[Any]) -> Any:
        return self._client.infer(model, inputs, model_version=version, outputs=outputs,
                                  client_timeout=self._timeout)

    def close(self) -> None:
        self._client.close()


def _grpc_channel_args() -> list[tuple[str, int]]:
    """tritonclient's own channel options, plus a short reconnect backoff.

    After a failed connection gRPC refuses calls until its reconnect backoff (1 s, growing to 2 min) has passed;
    our retry policy paces reconnection instead, so the channel must be ready to try again within it.
    """
    from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE

    return [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]


def _split_url(url: str) -> tuple[str, str, bool]:
    """``(host, host:port, ssl)`` of an endpoint given as ``host:port`` or ``http(s)://host:port``."""
    from urllib.parse import urlsplit

    ssl = url.startswith("https://")
    address = (url.split("://", 1)[1] if "://" in url else url).rstrip("/")
    host = urlsplit(f"//{address}").hostname or ""
    return host, address, ssl


def _with_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- workers -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Endpoint:
    """Where and how to connect; shared by all workers of one embedder."""

    protocol: WireProtocol
    address: str  # host:port of the chosen protocol
    ssl: bool
    timeout_s: float
    factory: Callable[[str, float, bool], _Transport] | None = None

    @property
    def label(self) -> str:
        scheme = "grpc" if self.protocol == "grpc" else ("https" if self.ssl else "http")
        return f"{scheme}://{self.address}"

    def connect(self, timeout_s: float | None = None) -> _Transport:
        kind = self.factory or (_GrpcTransport if self.protocol == "grpc" else _HttpTransport)
        return kind(self.address, timeout_s or self.timeout_s, self.ssl)


class _Worker:
    """State owned by one worker thread: its client and its shared memory region. Never touched elsewhere."""

    def __init__(self, pool: "_WorkerPool") -> None:
        self.pool = pool
        self._transport: _Transport | None = None
        self.region: SharedMemoryRegion | None = None

    @property
    def transport(self) -> _Transport:
        if self._transport is None:
            self._transport = self.pool.endpoint.connect()
        return self._transport

    def drop_region(self) -> None:
        region, self.region = self.region, None
        if region is not None:
            region.close()

    def close(self) -> None:
        try:
            self.drop_region()
        finally:
            transport, self._transport = self._transport, None
            if transport is not None:
                transport.close()


_STOP = object()


def _release_gevent_hub() -> None:
    """Free this thread's gevent hub, if it has one.

    ``tritonclient.http`` runs on gevent, which gives every thread that uses it a hub with its own event loop;
    gevent does not free it when the thread ends (two file descriptors per finished worker otherwise).
    """
    import sys

    if "gevent" not in sys.modules:
        return
    from gevent._hub_local import get_hub_if_exists

    hub = get_hub_if_exists()
    if hub is not None:
        hub.destroy(destroy_loop=True)


class _WorkerPool:
    """Up to ``size`` threads taking tasks ``fn(worker)`` from one queue; threads start only as work needs them.

    Holds no reference to the embedder, so an embedder that is garbage-collected unclosed still stops its
    workers (and closes their clients) through a finalizer.
    """

    def __init__(self, endpoint: _Endpoint, size: int) -> None:
        self.endpoint = endpoint
        self.size = size
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable[[_Worker], T]) -> "Future[T]":
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise TritonClientError(f"the client for Triton at {self.endpoint.label} is closed")
            self._tasks.put((future, fn))
            if self._idle > 0:
                self._idle -= 1  # an idle worker takes this task; count it busy now so the next submit can tell
            elif len(self._threads) < self.size:
                thread = threading.Thread(target=self._run, name=f"triton-worker-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()
        return future

    def run(self, fn: Callable[[_Worker], T]) -> T:
        return self.submit(fn).result()

    def _run(self) -> None:
        worker = _Worker(self)
        try:
            while True:
                task = self._tasks.get()
                if task is _STOP:
                    return
                future, fn = task
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(worker))
                    except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                        future.set_exception(exc)
                # The task's closure refers to the embedder: holding it while idle would keep it alive.
                del task, future, fn
                with self._lock:
                    self._idle += 1
        finally:
            try:
                worker.close()
            except Exception as exc:  # noqa: BLE001 - closing must not hide anything else
                log.warning("closing a Triton client for %s failed: %s", self.endpoint.label, exc)
            _release_gevent_hub()

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop every worker after the work already queued; each closes its client and shared memory."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._tasks.put(_STOP)
        deadline = time.monotonic() + timeout_s
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("a Triton worker for %s is still busy after %.0f s", self.endpoint.label, timeout_s)


# -- the embedder --------------------------------------------------------------------------------------------------


class TritonEmbedder:
    """Embeds image batches with a model served by Triton. Safe to share between threads; close it when done.

    Build it with :meth:`from_settings` (what the pipeline does); the positional form is kept for callers that
    pass a URL and model directly (one worker, HTTP, no shared memory unless asked for).
    """

    def __init__(
        self,
        url: str,
        model_name: str,
        model_version: str = "",
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        *,
        protocol: WireProtocol = "http",
        grpc_port: int | None = None,
        concurrency: int = 1,
        shared_memory: SharedMemoryMode = "off",
        ready_timeout_s: float = 60.0,
        transport_factory: Callable[[str, float, bool], Any] | None = None,
    ) -> None:
        """``transport_factory(address, timeout_s, ssl)`` replaces the tritonclient client each worker opens
        (default: HTTP or gRPC per ``protocol``); what it returns must offer the same calls as those."""
        if protocol not in ("http", "grpc"):
            raise ValueError(f"protocol must be 'http' or 'grpc', not {protocol!r}")
        if shared_memory not in ("auto", "on", "off"):
            raise ValueError(f"shared_memory must be 'auto', 'on' or 'off', not {shared_memory!r}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, not {concurrency}")
        host, address, ssl = _split_url(url)
        if not host:
            raise ValueError(f"no host in Triton URL {url!r}")
        if protocol == "grpc":
            if grpc_port is None:
                raise ValueError("protocol 'grpc' needs grpc_port (the server's gRPC port)")
            address = _with_port(host, grpc_port)
        self.url = url
        self.model_name = model_name
        self.model_version = model_version
        self.timeout_s = timeout_s
        self.ready_timeout_s = ready_timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.protocol = protocol
        self.concurrency = concurrency
        self.endpoint = _Endpoint(protocol, address, ssl, timeout_s, transport_factory)
        self.retry_policy = RetryPolicy(retries, backoff_s)
        # "auto" uses shared memory only where it can work: a server on this host. "on" insists (and says why
        # it could not); it is also how to ask for it with a server on this host under a non-loopback address.
        self._shm_wanted = shared_memory == "on" or (shared_memory == "auto" and host in _LOOPBACK)
        self.shared_memory = shared_memory
        self._shm_refused_logged = False
        self._pool = _WorkerPool(self.endpoint, concurrency)
        self._finalizer = weakref.finalize(self, self._pool.close)
        self._lock = threading.Lock()
        self._spec: ModelInputSpec | None = None
        self._config: dict[str, Any] | None = None
        self._metadata: dict[str, Any] | None = None

    @classmethod
    def from_settings(cls, triton: "TritonSettings") -> "TritonEmbedder":
        """The embedder the settings describe: protocol, concurrency, timeouts, retries and shared memory."""
        return cls(
            triton.url,
            triton.model_name,
            triton.model_version,
            triton.timeout_s,
            triton.retries,
            triton.retry_backoff_s,
            protocol=triton.protocol,
            grpc_port=triton.grpc_port,
            concurrency=triton.concurrency,
            shared_memory=triton.shared_memory,
            ready_timeout_s=triton.ready_timeout_s,
        )

    # -- lifecycle -------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Finish queued work, then close every worker's client and shared memory. Safe to call twice."""
        self._finalizer()

    def __enter__(self) -> "TritonEmbedder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def uses_shared_memory(self) -> bool:
        """Whether inputs go (or will try to go) through system shared memory rather than the wire."""
        return self._shm_wanted

    def _what(self) -> str:
        version = f" version {self.model_version}" if self.model_version else ""
        return f"model {self.model_name!r}{version} on Triton at {self.endpoint.label}"

    def _call(self, action: Callable[[_Transport], T], what: str) -> T:
        """``action(transport)`` on a worker, with the retry policy."""
        return self._pool.run(lambda w: self.retry_policy.run(lambda: action(w.transport), what, self._what()))

    # -- readiness -------------------------------------------------------------------------------------------

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until the server and the model are ready; after ``timeout_s`` raise saying which one is not.

        A server that answers but lacks the model is told apart from one that does not answer, and the error
        lists the models the server's repository does have.
        """
        timeout_s = self.ready_timeout_s if timeout_s is None else timeout_s
        self._pool.run(lambda w: self._wait_ready(timeout_s))

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        # A probe must not outlive the wait: its own connection with a timeout no longer than the wait.
        probe = self.endpoint.connect(timeout_s=max(1.0, min(self.timeout_s, timeout_s)))
        try:
            while True:
                problem = self._readiness_problem(probe)
                if problem is None:
                    return
                if time.monotonic() >= deadline:
                    raise TritonClientError(f"{self._what()} not ready after {timeout_s:g} s: {problem}")
                time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
        finally:
            probe.close()

    def _readiness_problem(self, probe: _Transport) -> str | None:
        """None when the model is ready, else what is wrong, in words."""
        try:
            if not probe.server_ready():
                return "the server answers but is not ready yet"
            if probe.model_ready(self.model_name, self.model_version):
                return None
            index = probe.repository_index()
        except Exception as exc:  # noqa: BLE001 - any failure here means "not reachable (yet)"
            if is_retryable(exc):
                return f"the server is not reachable ({describe_error(exc)}); is it running?"
            return f"the server refused the readiness check ({describe_error(exc)})"
        return _missing_model_problem(self.model_name, self.model_version, index)

    # -- model description -----------------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        with self._lock:
            if self._metadata is None:
                self._metadata = self._call(
                    lambda t: t.metadata(self.model_name, self.model_version), "reading model metadata"
                )
            return self._metadata

    def config(self) -> dict[str, Any]:
        """The model's configuration as the server reports it (cached after the first call)."""
        with self._lock:
            if self._config is None:
                self._config = self._call(
                    lambda t: t.config(self.model_name, self.model_version), "reading model config"
                )
            return self._config

    def input_spec(self) -> ModelInputSpec:
        """The model's input/output as the server describes it (cached after the first call)."""
        metadata = self.metadata()
        config = self.config()
        with self._lock:
            if self._spec is None:
                self._spec = self._spec_from(metadata, config)
            return self._spec

    def _spec_from(self, metadata: dict[str, Any], config: dict[str, Any]) -> ModelInputSpec:
        if len(metadata.get("inputs", [])) != 1 or not metadata.get("outputs"):
            raise TritonClientError(f"{self._what()} must have exactly one input and at least one output")
        max_batch = int(config.get("max_batch_size", 0))
        source, output = metadata["inputs"][0], metadata["outputs"][0]
        # With batching on, the metadata shapes start with the batch dimension (-1).
        skip = 1 if max_batch > 0 else 0
        out_dims = [int(d) for d in output["shape"]][skip:]
        if any(d < 0 for d in out_dims):
            raise TritonClientError(f"{self._what()} has a variable output shape {output['shape']}")
        return ModelInputSpec(
            name=source["name"],
            datatype=source["datatype"],
            shape=tuple(int(d) for d in source["shape"][skip:]),
            max_batch_size=max_batch,
            output_name=output["name"],
            output_dim=math.prod(out_dims),
            output_datatype=output["datatype"],
        )

    def model_version_label(self) -> str:
        """``"<name>:<version>"`` of the model that answers, e.g. ``"image_embedder:1"``, plus
        ``"@<12 hex>"`` of the served ONNX file when its config records it (repositories this pipeline writes do).

        Stored with every vector: replacing the model file behind the same name and version changes the label, so
        old vectors are never taken for the new model's.
        """
        metadata = self.metadata()
        versions = metadata.get("versions") or []
        version = self.model_version or max(versions, key=lambda v: (len(v), v), default="?")
        label = f"{metadata.get('name', self.model_name)}:{version}"
        artifact = _parameter(self.config(), "artifact_sha256")
        return f"{label}@{artifact[:12]}" if artifact else label

    def statistics(self) -> ModelStatistics:
        """The server's inference counters for this model (requests, rows, executions, batch sizes)."""
        data = self._call(lambda t: t.statistics(self.model_name, self.model_version), "reading statistics")
        return ModelStatistics.from_json(data, self.model_version)

    # -- inference -------------------------------------------------------------------------------------------

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """Embeddings (float32, ``[N, output_dim]``) for ``batch`` (``[N, *shape]``).

        A batch larger than the model's ``max_batch_size`` is split, and the chunks are sent concurrently.
        """
        return self._gather(self._submit(batch))

    def embed_stream(self, batches: Iterable[np.ndarray], in_flight: int | None = None) -> Iterator[np.ndarray]:
        """Embeddings for each batch of ``batches``, yielded in order, with requests kept in flight meanwhile.

        The next batch is taken from ``batches`` while earlier ones are on the server, so producing batches
        (reading files, preprocessing) overlaps transfer and inference. At most ``in_flight`` chunks (default
        twice the concurrency) are outstanding, which bounds memory. On an error, or when the consumer stops
        early, chunks not yet sent are cancelled.
        """
        limit = max(1, in_flight or 2 * self.concurrency)
        pending: deque[list[Future]] = deque()
        outstanding = 0
        try:
            for batch in batches:
                futures = self._submit(batch)
                pending.append(futures)
                outstanding += len(futures)
                while outstanding >= limit and len(pending) > 1:
                    done = pending.popleft()
                    outstanding -= len(done)
                    yield self._gather(done)
            while pending:
                done = pending.popleft()
                yield self._gather(done)
        finally:
            for futures in pending:
                for future in futures:
                    future.cancel()

    def _submit(self, batch: np.ndarray) -> list[Future]:
        """Check ``batch`` against the model, split it by max_batch_size and queue the chunks; [] when empty."""
        spec = self.input_spec()
        batch = np.asarray(batch)
        expected = "x".join("?" if d < 0 else str(d) for d in spec.shape)
        shape_ok = batch.ndim == len(spec.shape) + 1 and all(
            want < 0 or got == want for got, want in zip(batch.shape[1:], spec.shape)
        )
        if not shape_ok:
            raise TritonClientError(f"{self._what()} takes [N x {expected}] {spec.datatype}, got {batch.shape}")
        if batch.dtype != spec.dtype:
            if not np.can_cast(batch.dtype, spec.dtype, casting="safe"):
                raise TritonClientError(f"{self._what()} takes {spec.datatype}, got {batch.dtype} (convert first)")
            batch = batch.astype(spec.dtype)
        step = spec.max_batch_size or max(len(batch), 1)
        chunks = [np.ascontiguousarray(batch[i : i + step]) for i in range(0, len(batch), step)]
        return [self._pool.submit(lambda w, c=chunk: self._infer(w, c, spec)) for chunk in chunks]

    def _gather(self, futures: list[Future]) -> np.ndarray:
        if not futures:
            return np.zeros((0, self.input_spec().output_dim), dtype=np.float32)
        try:
            parts = [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return np.concatenate(parts).astype(np.float32, copy=False)

    # -- on a worker thread ----------------------------------------------------------------------------------

    def _infer(self, worker: _Worker, chunk: np.ndarray, spec: ModelInputSpec, reregister: bool = True) -> np.ndarray:
        transport = worker.transport
        tensor = transport.infer_input(spec.name, list(chunk.shape), spec.datatype)
        region = self._region_for(worker, chunk.nbytes) if self._shm_wanted else None
        if region is not None:
            tensor.set_shared_memory(region.name, region.write(chunk))
        else:
            transport.set_input_data(tensor, chunk)
        wanted = [transport.requested_output(spec.output_name)]
        what = f"inference on a batch of {len(chunk)}"

        def send() -> Any:
            return transport.infer(self.model_name, self.model_version, [tensor], wanted)

        try:
            result = self.retry_policy.run(send, what, self._what())
        except TritonClientError as exc:
            if region is None or not reregister or region.name not in str(exc):
                raise
            # The server forgot our region (it restarted while we waited): register a new one and send again.
            log.info("Triton at %s lost shared memory region %s; registering it again", self.endpoint.label,
                     region.name)
            worker.drop_region()
            return self._infer(worker, chunk, spec, reregister=False)
        output = result.as_numpy(spec.output_name)
        if output is None or output.shape[0] != len(chunk):
            got = None if output is None else output.shape
            raise TritonClientError(f"{self._what()} returned {got} for a batch of {len(chunk)}")
        return output.reshape(len(chunk), spec.output_dim)

    def _region_for(self, worker: _Worker, nbytes: int) -> SharedMemoryRegion | None:
        """The worker's input region, created (or grown) and registered on first need; None means use the wire."""
        if worker.region is not None and worker.region.byte_size >= nbytes:
            return worker.region
        worker.drop_region()
        spec = self._spec
        # Sized for a full batch up front, so a model with fixed dims never re-registers.
        full = spec.max_batch_size * spec.dtype.itemsize * math.prod(spec.shape) if spec and all(
            d > 0 for d in spec.shape) else 0
        size = max(nbytes, full)
        try:
            # A server that is briefly unreachable is retried like any request; only a refusal means "cannot".
            worker.region = self.retry_policy.run(
                lambda: SharedMemoryRegion.create(worker.transport, size, "input"),
                "registering system shared memory", self._what())
        except TritonClientError as exc:
            if exc.retryable:
                raise
            problem = describe_error(exc.__cause__ or exc)
            if self.shared_memory == "on":
                raise TritonClientError(
                    f"shared_memory is 'on' but {self._what()} cannot use a system shared memory region "
                    f"({problem}); run the server on this host with access to /dev/shm, or set "
                    "triton.shared_memory to 'auto' or 'off'"
                ) from exc
            self._shm_wanted = False  # every worker falls back, not just this one
            if not self._shm_refused_logged:
                self._shm_refused_logged = True
                log.warning("Triton at %s cannot use system shared memory (%s); sending tensors over %s instead",
                            self.endpoint.label, problem, self.protocol.upper())
            return None
        return worker.region


def _missing_model_problem(model: str, version: str, index: list[dict[str, Any]]) -> str:
    """Why a model is not ready, from the server's repository index (which lists unloaded models too)."""
    entries = [e for e in index if e.get("name") == model]
    if not entries:
        names = sorted({str(e.get("name")) for e in index if e.get("name")})
        have = ", ".join(
            f"{n} ({'/'.join(sorted({str(e.get('state') or 'unloaded') for e in index if e.get('name') == n}))})"
            for n in names
        )
        return f"the server is up but has no model {model!r}; its repository has: {have or 'no models'}"
    if version and not any(str(e.get("version", "")) == version for e in entries):
        versions = ", ".join(sorted(str(e.get("version")) for e in entries if e.get("version")))
        return f"the server is up and has model {model!r}, but not version {version} (versions: {versions or 'none'})"
    states = "; ".join(
        f"version {e.get('version') or '?'}: {e.get('state') or 'not loaded'}"
        + (f" ({e['reason']})" if e.get("reason") else "")
        for e in entries
    )
    return f"the server is up and lists model {model!r}, but it is not ready ({states})"


def _parameter(config: dict[str, Any], key: str) -> str:
    """A string parameter of a model config (``parameters { key: ... value: { string_value: ... } }``)."""
    value = (config.get("parameters") or {}).get(key) or {}
    if not isinstance(value, dict):
        return ""
    return str(value.get("string_value") or value.get("stringValue") or "")


# -- finding the model that built a collection ---------------------------------------------------------------------

_LABEL = re.compile(r"(?P<name>[^:@]+):(?P<version>[^@]*)(?:@(?P<artifact>[0-9a-fA-F]+))?")


@dataclass(frozen=True)
class ModelLabel:
    """A model label as stored with every vector: ``<name>:<version>`` plus ``@<12 hex>`` of the served file."""

    name: str
    version: str
    artifact: str = ""

    @classmethod
    def parse(cls, label: str) -> "ModelLabel":
        match = _LABEL.fullmatch(label.strip())
        if not match:
            raise ValueError(f"not a model label: {label!r} (expected <name>:<version>[@<sha256 prefix>])")
        version = match.group("version")
        return cls(match.group("name"), "" if version == "?" else version, (match.group("artifact") or "").lower())


def same_model(a: str, b: str) -> bool:
    """Whether two labels name the same model: the same file when both record one (whatever name serves it),
    else the same name and version."""
    la, lb = ModelLabel.parse(a), ModelLabel.parse(b)
    if la.artifact and lb.artifact:
        return la.artifact == lb.artifact
    return (la.name, la.version) == (lb.name, lb.version)


def embedder_for_label(triton: "TritonSettings", label: str) -> TritonEmbedder:
    """A client for the model that ``label`` names, as Triton at ``triton.url`` serves it; the caller closes it.

    The configured model when it is that model; else any ready model whose config records the same file
    (``artifact_sha256``: the bundled server keeps a replaced model loaded as ``<model_name>_<sha12>`` while a
    collection still uses it); else, for a label without a file hash, that name and version as they are (keep
    the old version served with Triton's version policy). Raises :class:`TritonClientError` saying which model is
    missing and what the server has.
    """
    wanted = ModelLabel.parse(label)
    embedder = TritonEmbedder.from_settings(triton)
    try:
        embedder.wait_ready()
        if same_model(embedder.model_version_label(), label):
            keep, embedder = embedder, None  # the configured model: handed to the caller, not closed here
            return keep
        index = embedder._call(lambda t: t.repository_index(), "listing the model repository")
        ready = [e for e in index if str(e.get("state", "")).upper() == "READY" and e.get("name")]
        for entry in ready:
            name, version = str(entry["name"]), str(entry.get("version", ""))
            if wanted.artifact:
                config = embedder._call(lambda t: t.config(name, version), f"reading the config of {name!r}")
                if not _parameter(config, "artifact_sha256").lower().startswith(wanted.artifact):
                    continue
            elif (name, version) != (wanted.name, wanted.version or version):
                continue
            return TritonEmbedder.from_settings(triton.model_copy(update={"model_name": name, "model_version": version}))
        served = ", ".join(sorted({str(e["name"]) for e in ready})) or "no ready model"
    finally:
        if embedder is not None:
            embedder.close()
    raise TritonClientError(
        f"the collection search uses was built by model {label}, which Triton at {triton.url} does not "
        f"serve (ready: {served}). Serve that model again, or re-embed every drop with the current model and "
        "switch search to its collection (embedding-pipeline reembed, then embedding-pipeline models switch)"
    )
