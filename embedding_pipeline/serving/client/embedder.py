"""The embedder: readiness, model description and inference over a pool of worker threads."""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Literal, TypeVar

import numpy as np

from embedding_pipeline.serving.client.errors import TritonClientError
from embedding_pipeline.serving.client.model import ModelInputSpec, ModelStatistics
from embedding_pipeline.serving.client.pool import _Worker, _WorkerPool
from embedding_pipeline.serving.client.retry import RetryPolicy, describe_error, is_retryable
from embedding_pipeline.serving.client.transport import WireProtocol, _Endpoint, _split_url, _Transport, _with_port
from embedding_pipeline.serving.shared_memory import SharedMemoryRegion

if TYPE_CHECKING:
    from embedding_pipeline.settings import TritonSettings

# One logger for the whole client, named after the package.
log = logging.getLogger(__package__)

T = TypeVar("T")
SharedMemoryMode = Literal["auto", "on", "off"]

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


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
        self._coalescer: Any = None  # set by coalesce
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
        if self._coalescer is not None:
            batch = np.asarray(batch)
            return self._coalescer((batch.shape[1:], batch.dtype.str), batch)
        return self._gather(self._submit(batch))

    def coalesce(self, max_batch: int = 16, max_concurrent: int = 2) -> None:
        """From now on, :meth:`embed` calls from concurrent threads with inputs of one shape go to Triton together,
        as one request (see :mod:`embedding_pipeline.runtime.batching`); each caller gets its own rows back."""
        from embedding_pipeline.runtime.batching import Coalescer

        def run(key: Any, batches: list[np.ndarray]) -> list[np.ndarray]:
            vectors = self._gather(self._submit(np.concatenate(batches)))
            bounds = np.cumsum([len(b) for b in batches])[:-1]
            return list(np.split(vectors, bounds))

        self._coalescer = Coalescer(run, max_batch=max_batch, max_concurrent=max_concurrent)

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
        return [self._pool.submit(functools.partial(self._infer, chunk=chunk, spec=spec)) for chunk in chunks]

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
            log.info(
                "Triton at %s lost shared memory region %s; registering it again", self.endpoint.label, region.name
            )
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
        full = (
            spec.max_batch_size * spec.dtype.itemsize * math.prod(spec.shape)
            if spec and all(d > 0 for d in spec.shape)
            else 0
        )
        size = max(nbytes, full)
        try:
            # A server that is briefly unreachable is retried like any request; only a refusal means "cannot".
            worker.region = self.retry_policy.run(
                lambda: SharedMemoryRegion.create(worker.transport, size, "input"),
                "registering system shared memory",
                self._what(),
            )
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
                log.warning(
                    "Triton at %s cannot use system shared memory (%s); sending tensors over %s instead",
                    self.endpoint.label,
                    problem,
                    self.protocol.upper(),
                )
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
