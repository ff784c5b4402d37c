"""The Triton client against the real bundled Triton: discovery, batching, concurrency, retries, errors, shared memory.

Flaky networks are played by small loopback proxies in front of the real server (an HTTP proxy that answers
chosen requests itself, and a TCP proxy that resets connections); everything behind them is the real Triton.
Server statistics (``get_inference_statistics``) show what reached the model.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from embedding_pipeline.runtime.processes import free_ports
from embedding_pipeline.serving.client import (
    ModelStatistics,
    RetryPolicy,
    TritonClientError,
    TritonEmbedder,
)

pytestmark = pytest.mark.integration

PROTOCOLS = ["http", "grpc"]
SIZE = 224
CLIENT_LOG = "embedding_pipeline.serving.client"


def embedder_for(stack, protocol: str = "http", **changes) -> TritonEmbedder:
    return TritonEmbedder.from_settings(stack.triton.model_copy(update={"protocol": protocol, **changes}))


def stats_delta(before: ModelStatistics, after: ModelStatistics) -> ModelStatistics:
    batches = {
        size: after.batch_executions.get(size, 0) - before.batch_executions.get(size, 0)
        for size in after.batch_executions
    }
    return ModelStatistics(
        after.request_count - before.request_count,
        after.failed_count - before.failed_count,
        after.inference_count - before.inference_count,
        after.execution_count - before.execution_count,
        after.queue_ns - before.queue_ns,
        after.compute_infer_ns - before.compute_infer_ns,
        {size: n for size, n in batches.items() if n},
    )


def settled_delta(embedder: TritonEmbedder, before: ModelStatistics, requests: int) -> ModelStatistics:
    """Statistics since ``before`` once ``requests`` requests are counted: the server counts a request only after
    its response has gone out, so the last one can be missing from a read made the moment it arrived."""
    deadline = time.monotonic() + 5
    while True:
        delta = stats_delta(before, embedder.statistics())
        if delta.request_count >= requests or time.monotonic() > deadline:
            return delta
        time.sleep(0.02)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """70 distinct model-sized images, so a misplaced chunk cannot go unnoticed."""
    return np.random.default_rng(7).integers(0, 256, (70, SIZE, SIZE, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def singles(stack, images) -> np.ndarray:
    """Each image embedded on its own (batch of one), through the plain HTTP path."""
    with embedder_for(stack, concurrency=1, shared_memory="off") as embedder:
        return np.concatenate([embedder.embed(image[None]) for image in images])


# -- loopback proxies standing in for a flaky network ---------------------------------------------------------------


class FaultInjectingHttpProxy:
    """An HTTP/1.1 proxy in front of the real Triton that answers chosen requests itself and forwards the rest.

    ``fail(path_part, "503", "reset", ...)``: the next requests whose path contains ``path_part`` get those
    outcomes in turn (an HTTP status, or ``reset``: the connection is dropped with a TCP reset). ``seen`` lists
    every request as ``(method, path, outcome)``.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.seen: list[tuple[str, str, str]] = []
        self._plans: list[tuple[str, list[str]]] = []
        self._upstreams: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                proxy._handle(self)

            do_POST = do_GET

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def fail(self, path_part: str, *outcomes: str) -> None:
        with self._lock:
            self._plans.append((path_part, list(outcomes)))

    def requests_to(self, path_part: str) -> list[str]:
        return [outcome for _, path, outcome in self.seen if path_part in path]

    def _outcome(self, path: str) -> str:
        with self._lock:
            for part, outcomes in self._plans:
                if part in path and outcomes:
                    return outcomes.pop(0)
        return "forwarded"

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else None
        outcome = self._outcome(handler.path)
        with self._lock:
            self.seen.append((handler.command, handler.path, outcome))
        if outcome == "reset":
            handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            handler.close_connection = True
            return
        if outcome != "forwarded":
            self._reply(
                handler,
                int(outcome),
                {"Content-Type": "application/json"},
                json.dumps({"error": f"injected {outcome} by the test proxy"}).encode(),
            )
            return
        upstream = getattr(handler, "upstream", None)
        if upstream is None:
            upstream = handler.upstream = http.client.HTTPConnection(self.upstream, timeout=60)
            with self._lock:
                self._upstreams.append(upstream)
        skip = {"host", "connection", "content-length"}
        upstream.request(
            handler.command,
            handler.path,
            body=body,
            headers={k: v for k, v in handler.headers.items() if k.lower() not in skip},
        )
        response = upstream.getresponse()
        data = response.read()
        skip = {"content-length", "transfer-encoding", "connection"}
        self._reply(handler, response.status, {k: v for k, v in response.getheaders() if k.lower() not in skip}, data)

    @staticmethod
    def _reply(handler: BaseHTTPRequestHandler, status: int, headers: dict[str, str], data: bytes) -> None:
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        for upstream in self._upstreams:  # an open connection would hold up Triton's shutdown
            upstream.close()


class ResettingTcpProxy:
    """Pipes bytes between clients and the real Triton (HTTP or gRPC alike). After ``reset_next(n)``, the next
    ``n`` times a client sends data, that connection is reset instead of forwarded."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.connections = 0
        self.resets_done = 0
        self._resets_left = 0
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def port(self) -> int:
        return self._listener.getsockname()[1]

    def reset_next(self, count: int) -> None:
        with self._lock:
            self._resets_left = count

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            upstream = socket.create_connection(self.upstream)
            with self._lock:
                self.connections += 1
                self._sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _take_reset(self) -> bool:
        with self._lock:
            if self._resets_left <= 0:
                return False
            self._resets_left -= 1
            self.resets_done += 1
            return True

    def _pipe(self, source: socket.socket, target: socket.socket, from_client: bool) -> None:
        try:
            while data := source.recv(65536):
                if from_client and self._take_reset():
                    source.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    break
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            if from_client:
                source.close()  # with SO_LINGER 0 this sends the reset

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()


@pytest.fixture
def http_proxy(stack):
    proxy = FaultInjectingHttpProxy(stack.triton.url)
    try:
        yield proxy
    finally:
        proxy.close()


# -- discovery -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_spec_is_what_the_onnx_model_declares(stack, protocol):
    import onnxruntime as ort

    path = stack.paths.model_repository / stack.triton.model_name / "1" / "model.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (declared_in,), (declared_out, *_) = session.get_inputs(), session.get_outputs()
    with embedder_for(stack, protocol) as embedder:
        embedder.wait_ready()
        spec = embedder.input_spec()
        label = embedder.model_version_label()
    assert (spec.name, spec.datatype, spec.dtype) == (declared_in.name, "UINT8", np.dtype(np.uint8))
    assert declared_in.type == "tensor(uint8)"
    assert spec.shape == tuple(declared_in.shape[1:]) == (SIZE, SIZE, 3)
    assert (spec.output_name, spec.output_datatype) == (declared_out.name, "FP32")
    assert spec.output_dim == declared_out.shape[-1] == 1280
    assert spec.max_batch_size == stack.triton.max_batch_size
    # The label names the served file (its config's artifact_sha256), over either protocol.
    from embedding_pipeline.serving.models import file_sha256

    assert label == f"{stack.triton.model_name}:1@{file_sha256(path)[:12]}"


# -- batching and concurrency ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_batch_beyond_max_batch_size_is_split_and_kept_in_order(stack, images, singles, protocol):
    with embedder_for(stack, protocol, concurrency=2) as embedder:
        before = embedder.statistics()
        vectors = embedder.embed(images)
        delta = settled_delta(embedder, before, requests=3)
    assert vectors.shape == (70, 1280) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, singles, atol=1e-5)
    assert delta.inference_count == 70
    assert delta.request_count == 3  # 32 + 32 + 6
    assert max(delta.batch_executions) <= stack.triton.max_batch_size
    assert sum(size * n for size, n in delta.batch_executions.items()) == 70


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_several_requests_are_in_flight_and_merged_by_the_dynamic_batcher(stack, images, singles, protocol):
    one_by_one = [image[None] for image in images[:48]]

    def run(concurrency: int) -> tuple[np.ndarray, ModelStatistics]:
        with embedder_for(stack, protocol, concurrency=concurrency) as embedder:
            before = embedder.statistics()
            vectors = np.concatenate(list(embedder.embed_stream(iter(one_by_one))))
            return vectors, settled_delta(embedder, before, requests=len(one_by_one))

    serial, serial_stats = run(1)
    parallel, parallel_stats = run(4)
    np.testing.assert_allclose(serial, singles[:48], atol=1e-5)
    np.testing.assert_allclose(parallel, singles[:48], atol=1e-5)
    assert serial_stats.request_count == parallel_stats.request_count == 48
    # One request at a time: nothing to merge. Four in flight: requests waited together and ran as one batch.
    assert serial_stats.execution_count == 48
    assert parallel_stats.execution_count < 48
    assert parallel_stats.largest_batch > 1


# -- retries ---------------------------------------------------------------------------------------------------------


def test_retries_after_503_and_a_reset_then_succeeds(stack, images, singles, http_proxy, caplog):
    caplog.set_level(logging.INFO, logger=CLIENT_LOG)
    settings = stack.triton.model_copy(
        update={"url": http_proxy.url, "retries": 3, "retry_backoff_s": 0.05, "concurrency": 1, "shared_memory": "off"}
    )
    with TritonEmbedder.from_settings(settings) as embedder:
        embedder.input_spec()
        http_proxy.fail("/infer", "503", "reset")
        vectors = embedder.embed(images[:5])
    np.testing.assert_allclose(vectors, singles[:5], atol=1e-5)
    assert http_proxy.requests_to("/infer") == ["503", "reset", "forwarded"]
    retried = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retried) == 2 and http_proxy.url in retried[0] and "HTTP 503" in retried[0]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_connection_resets_are_retried_over_either_protocol(stack, images, singles, caplog, protocol):
    caplog.set_level(logging.INFO, logger=CLIENT_LOG)
    upstream = stack.triton.grpc_port if protocol == "grpc" else stack.triton.port
    proxy = ResettingTcpProxy(upstream)
    try:
        settings = stack.triton.model_copy(
            update={
                "url": f"127.0.0.1:{proxy.port}",
                "grpc_port": proxy.port,
                "protocol": protocol,
                "retries": 5,
                "retry_backoff_s": 0.05,
                "concurrency": 1,
                "shared_memory": "off",
            }
        )
        with TritonEmbedder.from_settings(settings) as embedder:
            embedder.input_spec()
            connections_before = proxy.connections
            proxy.reset_next(2)
            vectors = embedder.embed(images[:3])
        np.testing.assert_allclose(vectors, singles[:3], atol=1e-5)
        assert proxy.resets_done == 2
        assert proxy.connections > connections_before  # the client reconnected after the resets
        assert any("retrying" in r.getMessage() for r in caplog.records)
    finally:
        proxy.close()


def test_a_4xx_is_never_retried(stack, images, http_proxy):
    settings = stack.triton.model_copy(
        update={"url": http_proxy.url, "retries": 5, "retry_backoff_s": 0.05, "shared_memory": "off"}
    )
    with TritonEmbedder.from_settings(settings) as embedder:
        embedder.input_spec()
        http_proxy.fail("/infer", "400")
        with pytest.raises(TritonClientError) as info:
            embedder.embed(images[:2])
    assert http_proxy.requests_to("/infer") == ["400"]
    assert info.value.attempts == 1
    message = str(info.value)
    assert f"model '{stack.triton.model_name}'" in message and http_proxy.url in message
    assert "after 1 attempt: HTTP 400: injected 400" in message


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_real_server_refusing_bad_input_is_not_retried(stack, protocol):
    with embedder_for(stack, protocol) as embedder:
        transport = embedder.endpoint.connect()  # our own client, on this thread
        try:
            calls = []

            def send_floats():
                calls.append(1)
                tensor = transport.infer_input("image", [1, SIZE, SIZE, 3], "FP32")
                transport.set_input_data(tensor, np.zeros((1, SIZE, SIZE, 3), np.float32))
                return transport.infer(stack.triton.model_name, "", [tensor], [transport.requested_output("embedding")])

            with pytest.raises(TritonClientError) as info:
                RetryPolicy(retries=5, backoff_s=0.05).run(send_floats, "inference", "the test")
        finally:
            transport.close()
    assert len(calls) == 1 and info.value.attempts == 1
    status = "gRPC INVALID_ARGUMENT" if protocol == "grpc" else "HTTP 400"
    assert f"{status}: " in str(info.value) and "expects 'UINT8'" in str(info.value)


# -- clear errors ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_missing_model_and_missing_server_are_told_apart(stack, protocol):
    missing = stack.triton.model_copy(update={"model_name": "no_such_model", "protocol": protocol})
    with TritonEmbedder.from_settings(missing) as embedder:
        with pytest.raises(TritonClientError) as info:
            embedder.wait_ready(1)
        message = str(info.value)
        assert embedder.endpoint.label in message
        assert "not ready after 1 s: the server is up but has no model 'no_such_model'" in message
        assert f"its repository has: {stack.triton.model_name} (READY)" in message
        with pytest.raises(
            TritonClientError,
            match=r"reading model metadata failed for model 'no_such_model' .*"
            r"after 1 attempt: (HTTP 404|gRPC NOT_FOUND)",
        ):
            embedder.input_spec()

    (port,) = free_ports(1)
    down = stack.triton.model_copy(
        update={
            "url": f"127.0.0.1:{port}",
            "grpc_port": port,
            "protocol": protocol,
            "retries": 1,
            "retry_backoff_s": 0.01,
        }
    )
    with TritonEmbedder.from_settings(down) as embedder:
        with pytest.raises(
            TritonClientError,
            match=rf"127\.0\.0\.1:{port} not ready after 0\.5 s: the server is "
            r"not reachable .*is it running\?",
        ):
            embedder.wait_ready(0.5)
        with pytest.raises(TritonClientError, match=rf"on Triton at \w+://127\.0\.0\.1:{port} after 2 attempts"):
            embedder.input_spec()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_wrong_input_is_refused_naming_the_expected_input(stack, protocol):
    with embedder_for(stack, protocol) as embedder:
        with pytest.raises(TritonClientError, match=r"takes \[N x 224x224x3\] UINT8, got \(2, 100, 100, 3\)"):
            embedder.embed(np.zeros((2, 100, 100, 3), np.uint8))
        with pytest.raises(TritonClientError, match=r"takes UINT8, got float32 \(convert first\)"):
            embedder.embed(np.zeros((2, SIZE, SIZE, 3), np.float32))
        with pytest.raises(TritonClientError, match=r"takes \[N x 224x224x3\] UINT8, got \(224, 224, 3\)"):
            embedder.embed(np.zeros((SIZE, SIZE, 3), np.uint8))


# -- shared memory ---------------------------------------------------------------------------------------------------


def _our_regions(stack) -> list[str]:
    import tritonclient.http as httpclient

    from embedding_pipeline.serving import admin

    # The shared-memory API is restricted to the key of this server's start (serving/admin.py).
    with httpclient.InferenceServerClient(stack.triton.url) as client:
        status = client.get_system_shared_memory_status(headers=admin.headers(stack.paths.run))
    return [r["name"] for r in status if r["name"].startswith(f"embedding_pipeline_{os.getpid()}_")]


def _our_shm_files() -> list[str]:
    return [f for f in os.listdir("/dev/shm") if f.startswith(f"embedding_pipeline_{os.getpid()}_")]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_shared_memory_gives_identical_vectors_and_cleans_up(stack, images, protocol):
    with embedder_for(stack, protocol, shared_memory="off", concurrency=2) as wire:
        expected = wire.embed(images)
    with embedder_for(stack, protocol, shared_memory="on", concurrency=2) as shm:
        assert shm.uses_shared_memory
        vectors = shm.embed(images)
        streamed = np.concatenate(list(shm.embed_stream(iter([images[:10], images[10:]]))))
        regions = _our_regions(stack)
        assert 1 <= len(regions) <= 2 and all(r.endswith("_input") for r in regions)  # one per worker
        assert sorted(_our_shm_files()) == sorted(regions)
    np.testing.assert_array_equal(vectors, expected)
    np.testing.assert_allclose(streamed, expected, atol=1e-5)
    assert _our_shm_files() == []  # unlinked on close
    _wait_for(lambda: _our_regions(stack) == [], 10, "the regions to be unregistered on close")


def test_auto_falls_back_to_the_wire_once_and_on_says_why_it_cannot(stack, images, singles, http_proxy, caplog):
    caplog.set_level(logging.INFO, logger=CLIENT_LOG)
    http_proxy.fail("/systemsharedmemory/", *["400"] * 10)  # a server that cannot open our memory
    settings = stack.triton.model_copy(update={"url": http_proxy.url, "concurrency": 2, "shared_memory": "auto"})
    with TritonEmbedder.from_settings(settings) as auto:
        assert auto.uses_shared_memory  # loopback URL: it tries
        vectors = auto.embed(images)
        assert not auto.uses_shared_memory
    np.testing.assert_allclose(vectors, singles, atol=1e-5)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == CLIENT_LOG]
    assert len(warnings) == 1 and "cannot use system shared memory" in warnings[0] and "HTTP 400" in warnings[0]
    assert _our_shm_files() == []

    with TritonEmbedder.from_settings(settings.model_copy(update={"shared_memory": "on"})) as on:
        with pytest.raises(
            TritonClientError,
            match=r"shared_memory is 'on' but model 'image_embedder' on Triton at "
            rf"http://{http_proxy.url} cannot use a system shared memory "
            r"region \(HTTP 400: injected 400",
        ):
            on.embed(images[:2])
    assert _our_shm_files() == []


def test_close_stops_every_worker_and_its_client(stack, images):
    def workers() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("triton-worker")]

    assert workers() == []
    embedder = embedder_for(stack, concurrency=3)
    embedder.embed(images[:70])
    assert 1 < len(workers()) <= 3
    embedder.close()
    assert workers() == []
    with pytest.raises(TritonClientError, match="closed"):
        embedder.embed(images[:1])


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_embedders_opened_and_closed_many_times_leak_no_descriptors(stack, images, protocol):
    def cycle() -> None:
        with embedder_for(stack, protocol, concurrency=2) as embedder:
            embedder.embed(images[:40])  # both workers busy: two clients, two shared memory regions

    cycle()
    before = len(os.listdir("/proc/self/fd"))
    cycles = 15
    for _ in range(cycles):
        cycle()
    # Each cycle's worker threads are gone; what they held (sockets, event loops, shared memory) went with them.
    # A leak costs at least one descriptor per worker per cycle (the gevent loop leaked two); gRPC's own
    # process-wide pollers may open a few lazily, so allow less than one per cycle.
    assert len(os.listdir("/proc/self/fd")) - before < cycles
    assert _our_shm_files() == []


def _wait_for(condition, timeout_s: float, what: str) -> None:
    """Polls ``condition``: the server applies an unregister a moment after a busy client's call returns."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
