"""The Triton client's retry policy, statistics parsing, worker threads and streaming, with fakes (no server)."""

from __future__ import annotations

import http.client
import socket
import threading
import time

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from embedding_pipeline.serving.client import (
    MAX_BACKOFF_S,
    ModelStatistics,
    RetryPolicy,
    TritonClientError,
    TritonEmbedder,
    describe_error,
    is_retryable,
)
from embedding_pipeline.serving.client.embedder import _missing_model_problem

WHERE = "model 'm' on Triton at http://127.0.0.1:9"


class FakeSleep:
    """Records the delays the policy asks for instead of sleeping (a fake clock)."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


class FakeFlakyAction:
    """Raises the given exceptions in turn, then returns "ok"; counts calls (a fake request)."""

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "ok"


def http_error(status: str, message: str = "boom") -> InferenceServerException:
    return InferenceServerException(msg=message, status=status)


@pytest.mark.parametrize(
    "failure",
    [
        ConnectionRefusedError(111, "Connection refused"),
        ConnectionResetError(104, "Connection reset by peer"),
        socket.timeout("timed out"),
        TimeoutError("timed out"),
        http.client.HTTPException("connection closed"),
        http_error("500"),
        http_error("502"),
        http_error("503"),
        http_error("504"),
        http_error("StatusCode.UNAVAILABLE"),
        http_error("StatusCode.DEADLINE_EXCEEDED"),
    ],
    ids=repr,
)
def test_transient_failures_are_retried_with_exponential_backoff(failure):
    sleep = FakeSleep()
    action = FakeFlakyAction(failure, failure)
    assert RetryPolicy(retries=3, backoff_s=0.5, sleep=sleep).run(action, "inference", WHERE) == "ok"
    assert action.calls == 3
    assert sleep.delays == [0.5, 1.0]


@pytest.mark.parametrize(
    "failure",
    [
        http_error("400", "unexpected shape for input 'image'"),
        http_error("404", "Request for unknown model"),
        http_error("409"),
        http_error("501"),
        http_error("StatusCode.INVALID_ARGUMENT"),
        http_error("StatusCode.NOT_FOUND"),
        InferenceServerException(msg="model version must be a string"),  # raised by the client itself
        ValueError("bad input"),
    ],
    ids=repr,
)
def test_refused_requests_are_never_retried(failure):
    sleep = FakeSleep()
    action = FakeFlakyAction(failure)
    with pytest.raises(TritonClientError) as info:
        RetryPolicy(retries=5, backoff_s=0.5, sleep=sleep).run(action, "inference on a batch of 2", WHERE)
    assert action.calls == 1 and sleep.delays == []
    assert info.value.attempts == 1 and not info.value.retryable
    assert str(info.value).startswith(f"inference on a batch of 2 failed for {WHERE} after 1 attempt: ")


def test_giving_up_names_where_what_and_how_many_attempts():
    sleep = FakeSleep()
    action = FakeFlakyAction(*[http_error("503", "Service Unavailable")] * 10)
    with pytest.raises(TritonClientError) as info:
        RetryPolicy(retries=2, backoff_s=0.1, sleep=sleep).run(action, "inference on a batch of 32", WHERE)
    assert action.calls == 3 and info.value.attempts == 3 and info.value.retryable
    assert str(info.value) == (
        f"inference on a batch of 32 failed for {WHERE} after 3 attempts: HTTP 503: Service Unavailable"
    )
    assert sleep.delays == pytest.approx([0.1, 0.2])


def test_a_refusal_after_a_transient_failure_stops_at_once():
    sleep = FakeSleep()
    action = FakeFlakyAction(ConnectionResetError(104, "reset"), http_error("400", "bad shape"), http_error("503"))
    with pytest.raises(TritonClientError, match="after 2 attempts: HTTP 400: bad shape"):
        RetryPolicy(retries=5, backoff_s=1, sleep=sleep).run(action, "inference", WHERE)
    assert action.calls == 2 and sleep.delays == [1]


def test_zero_retries_means_one_attempt_and_backoff_is_capped():
    action = FakeFlakyAction(ConnectionResetError(104, "reset"))
    with pytest.raises(TritonClientError, match="after 1 attempt: ConnectionResetError"):
        RetryPolicy(retries=0, sleep=FakeSleep()).run(action, "inference", WHERE)
    assert RetryPolicy(retries=20, backoff_s=0.5).delay(19) == MAX_BACKOFF_S
    assert [RetryPolicy(backoff_s=0.25).delay(n) for n in range(4)] == [0.25, 0.5, 1.0, 2.0]


def test_errors_are_described_by_protocol():
    assert describe_error(http_error("503", "busy")) == "HTTP 503: busy"
    assert describe_error(http_error("StatusCode.UNAVAILABLE", "down")) == "gRPC UNAVAILABLE: down"
    assert describe_error(ConnectionRefusedError(111, "Connection refused")).startswith("ConnectionRefusedError")
    assert is_retryable(http_error("503")) and not is_retryable(http_error("400"))


def test_statistics_parse_http_numbers_and_grpc_strings_alike():
    http_json = {
        "model_stats": [
            {
                "name": "m",
                "version": "1",
                "inference_count": 70,
                "execution_count": 3,
                "inference_stats": {
                    "success": {"count": 3, "ns": 9},
                    "fail": {"count": 1, "ns": 1},
                    "queue": {"count": 3, "ns": 500},
                    "compute_infer": {"count": 3, "ns": 700},
                },
                "batch_stats": [
                    {"batch_size": 32, "compute_infer": {"count": 2, "ns": 1}},
                    {"batch_size": 6, "compute_infer": {"count": 1, "ns": 1}},
                ],
            }
        ]
    }
    # gRPC's JSON writes int64 as strings and leaves zero fields out.
    grpc_json = {
        "model_stats": [
            {
                "name": "m",
                "version": "1",
                "inference_count": "70",
                "execution_count": "3",
                "inference_stats": {
                    "success": {"count": "3", "ns": "9"},
                    "fail": {"count": "1"},
                    "queue": {"ns": "500"},
                    "compute_infer": {"count": "3", "ns": "700"},
                    "cache_hit": {},
                },
                "batch_stats": [
                    {"batch_size": "32", "compute_infer": {"count": "2"}},
                    {"batch_size": "6", "compute_infer": {"count": "1"}},
                ],
            },
            {"name": "m", "version": "2", "inference_stats": {"success": {}}},
        ]
    }
    expected = ModelStatistics(3, 1, 70, 3, 500, 700, {32: 2, 6: 1})
    assert ModelStatistics.from_json(http_json) == expected
    assert ModelStatistics.from_json(grpc_json) == expected
    assert ModelStatistics.from_json(grpc_json, version="2") == ModelStatistics()
    assert expected.largest_batch == 32


def test_missing_model_explanations_list_what_the_server_has():
    index = [{"name": "image_embedder", "version": "1", "state": "READY"}, {"name": "other"}]
    assert _missing_model_problem("nope", "", index) == (
        "the server is up but has no model 'nope'; its repository has: image_embedder (READY), other (unloaded)"
    )
    assert "not version 7 (versions: 1)" in _missing_model_problem("image_embedder", "7", index)
    failed = [{"name": "m", "version": "1", "state": "UNAVAILABLE", "reason": "load failed: bad onnx"}]
    assert _missing_model_problem("m", "", failed) == (
        "the server is up and lists model 'm', but it is not ready (version 1: UNAVAILABLE (load failed: bad onnx))"
    )
    assert _missing_model_problem("m", "", []).endswith("its repository has: no models")


class FakeTransport:
    """Stands in for one tritonclient client: a model [N, 4] UINT8 -> [N, 2] FP32 with max_batch_size 3.

    Records which thread created and used it, how many requests overlapped, and whether it was closed.
    """

    instances: list["FakeTransport"] = []
    lock = threading.Lock()
    in_flight = 0
    peak_in_flight = 0

    def __init__(self, address: str, timeout_s: float, ssl: bool) -> None:
        self.owner = threading.get_ident()
        self.closed = False
        self.foreign_use = False
        with FakeTransport.lock:
            FakeTransport.instances.append(self)

    def _check_thread(self) -> None:
        self.foreign_use |= threading.get_ident() != self.owner

    def server_ready(self) -> bool:
        return True

    def model_ready(self, model: str, version: str) -> bool:
        return True

    def metadata(self, model: str, version: str) -> dict:
        self._check_thread()
        return {
            "name": model,
            "versions": ["1"],
            "inputs": [{"name": "x", "datatype": "UINT8", "shape": [-1, 4]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
        }

    def config(self, model: str, version: str) -> dict:
        return {"max_batch_size": 3}

    def infer_input(self, name, shape, datatype):
        return {"name": name, "shape": shape}

    def requested_output(self, name):
        return name

    def set_input_data(self, tensor, array):
        tensor["data"] = array

    def infer(self, model, version, inputs, outputs):
        self._check_thread()
        with FakeTransport.lock:
            FakeTransport.in_flight += 1
            FakeTransport.peak_in_flight = max(FakeTransport.peak_in_flight, FakeTransport.in_flight)
        data = inputs[0]["data"]
        time.sleep(0.002 * (1 + int(data[0, 0]) % 5))  # uneven service times: answers come back out of order
        with FakeTransport.lock:
            FakeTransport.in_flight -= 1
        out = np.stack([data[:, 0], data[:, 1:].sum(axis=1)], axis=1).astype(np.float32)
        return type("FakeResult", (), {"as_numpy": lambda self, name: out})()

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_transports():
    FakeTransport.instances = []
    FakeTransport.in_flight = FakeTransport.peak_in_flight = 0
    yield FakeTransport


def _fake_embedder(concurrency: int) -> TritonEmbedder:
    return TritonEmbedder("127.0.0.1:9", "m", concurrency=concurrency, transport_factory=FakeTransport)


def _expected(batch: np.ndarray) -> np.ndarray:
    return np.stack([batch[:, 0], batch[:, 1:].sum(axis=1)], axis=1).astype(np.float32)


def test_embed_splits_by_max_batch_size_and_keeps_order(fake_transports):
    batch = (np.arange(40, dtype=np.uint8).reshape(10, 4) * 3) % 251
    with _fake_embedder(concurrency=3) as embedder:
        assert embedder.input_spec().max_batch_size == 3
        out = embedder.embed(batch)
    np.testing.assert_array_equal(out, _expected(batch))
    assert fake_transports.peak_in_flight > 1  # chunks of one batch overlapped


def test_stream_yields_in_order_with_one_client_per_worker_thread(fake_transports):
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 255, (int(rng.integers(0, 8)), 4), dtype=np.uint8) for _ in range(30)]
    read = []

    def produce():
        for i, b in enumerate(batches):
            read.append(i)
            yield b

    with _fake_embedder(concurrency=4) as embedder:
        outs = []
        for k, out in enumerate(embedder.embed_stream(produce())):
            # Batches ahead of the one being yielded were already taken from the producer (read-ahead).
            assert len(read) >= min(k + 2, len(batches)) or k == len(batches) - 1
            outs.append(out)
    assert len(outs) == len(batches)
    for b, out in zip(batches, outs):
        np.testing.assert_array_equal(out, _expected(b))
        assert out.shape == (len(b), 2)
    transports = fake_transports.instances
    assert 1 < len(transports) <= 4 + 1  # the workers' clients, plus none shared
    assert len({t.owner for t in transports}) == len(transports)
    assert not any(t.foreign_use for t in transports)
    assert all(t.closed for t in transports)
    assert fake_transports.peak_in_flight <= 4
    assert not [t for t in threading.enumerate() if t.name.startswith("triton-worker")]


def test_a_failed_chunk_fails_the_stream_and_closed_embedders_refuse_work(fake_transports):
    class FakeBrokenTransport(FakeTransport):
        def infer(self, model, version, inputs, outputs):
            raise InferenceServerException(msg="unexpected shape", status="400")

    embedder = TritonEmbedder("127.0.0.1:9", "m", concurrency=2, transport_factory=FakeBrokenTransport)
    with embedder:
        with pytest.raises(TritonClientError, match=r"inference on a batch of 3 failed .* after 1 attempt: HTTP 400"):
            list(embedder.embed_stream(np.zeros((5, 3, 4), np.uint8)))
    with pytest.raises(TritonClientError, match="closed"):
        embedder.embed(np.zeros((1, 4), np.uint8))
    with pytest.raises(TritonClientError, match=r"takes \[N x 4\] UINT8, got \(1, 5\)"):
        TritonEmbedder("127.0.0.1:9", "m", transport_factory=FakeTransport).embed(np.zeros((1, 5), np.uint8))


def test_constructor_refuses_bad_options():
    with pytest.raises(ValueError, match="grpc_port"):
        TritonEmbedder("127.0.0.1:9", "m", protocol="grpc")
    with pytest.raises(ValueError, match="shared_memory"):
        TritonEmbedder("127.0.0.1:9", "m", shared_memory="always")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="concurrency"):
        TritonEmbedder("127.0.0.1:9", "m", concurrency=0)


def test_from_settings_takes_every_client_setting():
    from embedding_pipeline.settings import TritonSettings

    settings = TritonSettings(
        url="[::1]:8000",
        protocol="grpc",
        grpc_port=8001,
        concurrency=3,
        retries=5,
        retry_backoff_s=0.1,
        shared_memory="off",
        timeout_s=7,
        model_name="m",
    )
    embedder = TritonEmbedder.from_settings(settings)
    try:
        assert embedder.endpoint.label == "grpc://[::1]:8001"
        assert (embedder.concurrency, embedder.retry_policy.retries, embedder.retry_policy.backoff_s) == (3, 5, 0.1)
        assert embedder.timeout_s == 7 and not embedder.uses_shared_memory
    finally:
        embedder.close()
    auto_local = TritonEmbedder.from_settings(TritonSettings(url="127.0.0.1:8000"))
    auto_remote = TritonEmbedder.from_settings(TritonSettings(url="triton.example.com:8000"))
    assert auto_local.uses_shared_memory and not auto_remote.uses_shared_memory
    auto_local.close(), auto_remote.close()


class FakeColourTransport(FakeTransport):
    """A fake model on [N, 16, 16, 3] UINT8 images returning each image's mean colour, one image per request."""

    def metadata(self, model: str, version: str) -> dict:
        return {
            "name": model,
            "versions": ["1"],
            "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, 16, 16, 3]}],
            "outputs": [{"name": "embedding", "datatype": "FP32", "shape": [-1, 3]}],
        }

    def config(self, model: str, version: str) -> dict:
        return {"max_batch_size": 1}

    def infer(self, model, version, inputs, outputs):
        data = inputs[0]["data"]
        time.sleep(0.01 if data.mean() > 80 else 0.001)  # red images are slow: answers arrive out of order
        out = data.reshape(len(data), -1, 3).mean(axis=1).astype(np.float32)
        return type("FakeResult", (), {"as_numpy": lambda self, name: out})()


def test_ingest_streams_batches_through_the_workers_and_keeps_rows_aligned(tmp_path, fake_transports):
    from embedding_pipeline import ingest
    from embedding_pipeline.settings import load_settings
    from embedding_pipeline.storage import arrow
    from embedding_pipeline_tests.images import encode

    settings = load_settings(environ={"EMBEDDING_PIPELINE_HOME": str(tmp_path)})
    settings = settings.model_copy(update={"preprocess": settings.preprocess.model_copy(update={"batch_size": 2})})
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 0, 0), (0, 0, 255)]
    drop = settings.drops / "d1"
    drop.mkdir(parents=True)
    for i, colour in enumerate(colours):
        (drop / f"img{i}_{colours.index(colour)}.png").write_bytes(encode(np.full((20 + i, 30, 3), colour, np.uint8)))
    ingest.build_manifest(settings, "d1")
    ingest.preprocess_drop(settings, "d1", ("UINT8", (16, 16, 3)), "m:1")

    with TritonEmbedder("127.0.0.1:9", "m", concurrency=3, transport_factory=FakeColourTransport) as embedder:
        summary = ingest.embed_drop(settings, "d1", embedder)
    assert (summary.computed, summary.dimension, summary.model) == (5, 3, "m:1")
    assert len(fake_transports.instances) > 1  # several workers took part
    tables = list(arrow.read_batches(ingest.drop_files(settings, "d1").embeddings))
    vectors = np.concatenate([arrow.vectors_of(t) for t in tables])
    uris = sum((t.column("uri").to_pylist() for t in tables), [])
    assert len(uris) == 5
    for uri, vector in zip(uris, vectors):
        assert np.argmax(vector) == int(uri[-5])  # the file name ends in its colour's channel


class FakeShmRefusingTransport(FakeTransport):
    """A fake server that cannot open our shared memory (as one in another container would answer)."""

    def register_system_shared_memory(self, name, key, byte_size):
        raise InferenceServerException(msg=f"Unable to open shared memory region: '{key}'", status="400")


class FakeShmUnreachableTransport(FakeTransport):
    """A fake server whose connection drops whenever shared memory is registered."""

    def register_system_shared_memory(self, name, key, byte_size):
        raise ConnectionResetError(104, "Connection reset by peer")


def _shm_files() -> set[str]:
    import os

    return {f for f in os.listdir("/dev/shm") if f.startswith(f"embedding_pipeline_{os.getpid()}_")}


def test_auto_shared_memory_falls_back_to_the_wire_once_when_refused(fake_transports, caplog):
    batch = np.arange(28, dtype=np.uint8).reshape(7, 4)
    with caplog.at_level("WARNING", logger="embedding_pipeline.serving.client"):
        with TritonEmbedder(
            "127.0.0.1:9", "m", concurrency=3, shared_memory="auto", transport_factory=FakeShmRefusingTransport
        ) as embedder:
            np.testing.assert_array_equal(embedder.embed(batch), _expected(batch))
            np.testing.assert_array_equal(embedder.embed(batch), _expected(batch))
            assert not embedder.uses_shared_memory
    warnings = [r.getMessage() for r in caplog.records if r.name == "embedding_pipeline.serving.client"]
    assert len(warnings) == 1 and "HTTP 400: Unable to open shared memory region" in warnings[0]
    assert _shm_files() == set()  # the memory made for the refused registration was unlinked again


def test_on_shared_memory_refused_or_unreachable_is_a_clear_error(fake_transports):
    with TritonEmbedder("127.0.0.1:9", "m", shared_memory="on", transport_factory=FakeShmRefusingTransport) as e:
        with pytest.raises(
            TritonClientError,
            match=r"shared_memory is 'on' but model 'm' on Triton at "
            r"http://127\.0\.0\.1:9 cannot use a system shared memory region",
        ):
            e.embed(np.zeros((2, 4), np.uint8))
    # An unreachable server is a failed request (retried, then reported), not a reason to give up shared memory.
    with TritonEmbedder(
        "127.0.0.1:9",
        "m",
        retries=1,
        backoff_s=0.001,
        shared_memory="auto",
        transport_factory=FakeShmUnreachableTransport,
    ) as e:
        with pytest.raises(
            TritonClientError,
            match=r"registering system shared memory failed .* after 2 attempts: "
            r"ConnectionResetError",
        ):
            e.embed(np.zeros((2, 4), np.uint8))
        assert e.uses_shared_memory
    assert _shm_files() == set()
