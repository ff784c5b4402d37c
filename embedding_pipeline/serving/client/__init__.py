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

from embedding_pipeline.serving.client.embedder import SharedMemoryMode, TritonEmbedder
from embedding_pipeline.serving.client.errors import TritonClientError
from embedding_pipeline.serving.client.labels import ModelLabel, embedder_for_label, same_model
from embedding_pipeline.serving.client.model import ModelInputSpec, ModelStatistics
from embedding_pipeline.serving.client.retry import MAX_BACKOFF_S, RetryPolicy, describe_error, is_retryable
from embedding_pipeline.serving.client.transport import WireProtocol

__all__ = [
    "MAX_BACKOFF_S",
    "ModelInputSpec",
    "ModelLabel",
    "ModelStatistics",
    "RetryPolicy",
    "SharedMemoryMode",
    "TritonClientError",
    "TritonEmbedder",
    "WireProtocol",
    "describe_error",
    "embedder_for_label",
    "is_retryable",
    "same_model",
]
