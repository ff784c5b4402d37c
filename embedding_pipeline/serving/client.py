"""Client for the embedding model on any Triton server (the bundled one, a container, a remote cluster).

Everything about the model — input name, datatype, shape, batch limit, output — is read from the server's model
metadata and config, so another model with another layout works without code changes.

``TritonEmbedder`` wraps one ``tritonclient.http`` client, which is gevent-based and **not thread-safe**: use one
embedder per thread (or process), and close it (or use ``with``) — an open connection holds up the server's
shutdown.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

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


class TritonClientError(RuntimeError):
    """A request to Triton failed; the message names the server URL and the model."""


@dataclass(frozen=True)
class ModelInputSpec:
    """What the served model takes and returns. ``shape`` excludes the batch dimension, e.g. ``(224, 224, 3)``."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    max_batch_size: int
    output_name: str
    output_dim: int

    @property
    def dtype(self) -> np.dtype:
        try:
            return np.dtype(_NUMPY_TYPES[self.datatype])
        except KeyError:
            raise TritonClientError(f"input datatype {self.datatype} is not supported by this client") from None


class TritonEmbedder:
    """Embeds image batches with a model served by Triton over HTTP. One instance per thread; close it when done."""

    def __init__(
        self,
        url: str,
        model_name: str,
        model_version: str = "",
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 0.5,
    ) -> None:
        import tritonclient.http as httpclient

        self._http = httpclient
        self.url = url
        self.model_name = model_name
        self.model_version = model_version
        self.retries = retries
        self.backoff_s = backoff_s
        ssl = url.startswith("https://")
        # tritonclient wants host:port without a scheme.
        address = url.split("://", 1)[1] if "://" in url else url
        self._client = httpclient.InferenceServerClient(
            address.rstrip("/"), connection_timeout=timeout_s, network_timeout=timeout_s, ssl=ssl
        )
        self._spec: ModelInputSpec | None = None
        self._metadata: dict[str, Any] | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> "TritonEmbedder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _what(self) -> str:
        version = f" version {self.model_version}" if self.model_version else ""
        return f"model {self.model_name!r}{version} on Triton at {self.url}"

    def _live_client(self):  # noqa: ANN202 - tritonclient type, imported lazily
        if self._client is None:
            raise TritonClientError(f"the client for {self._what()} is closed")
        return self._client

    # -- model description -----------------------------------------------------------------------------------

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until the server and the model are ready; raise naming URL and model after ``timeout_s``."""
        client = self._live_client()
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while True:
            try:
                if not client.is_server_ready():
                    last = "server not ready"
                elif not client.is_model_ready(self.model_name, self.model_version):
                    last = "server ready, model not ready (is it in the repository and loaded?)"
                else:
                    return
            except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise TritonClientError(f"{self._what()} not ready after {timeout_s:.0f} s: {last}")
            time.sleep(0.25)

    def metadata(self) -> dict[str, Any]:
        if self._metadata is None:
            self._metadata = self._call(
                lambda c: c.get_model_metadata(self.model_name, self.model_version), "reading model metadata"
            )
        return self._metadata

    def input_spec(self) -> ModelInputSpec:
        """The model's input/output as the server describes it (cached after the first call)."""
        if self._spec is None:
            metadata = self.metadata()
            config = self._call(lambda c: c.get_model_config(self.model_name, self.model_version), "reading config")
            if len(metadata.get("inputs", [])) != 1 or not metadata.get("outputs"):
                raise TritonClientError(f"{self._what()} must have exactly one input and at least one output")
            max_batch = int(config.get("max_batch_size", 0))
            source, output = metadata["inputs"][0], metadata["outputs"][0]
            # With batching on, the metadata shapes start with the batch dimension (-1).
            skip = 1 if max_batch > 0 else 0
            out_dims = [int(d) for d in output["shape"]][skip:]
            if any(d < 0 for d in out_dims):
                raise TritonClientError(f"{self._what()} has a variable output shape {output['shape']}")
            self._spec = ModelInputSpec(
                name=source["name"],
                datatype=source["datatype"],
                shape=tuple(int(d) for d in source["shape"][skip:]),
                max_batch_size=max_batch,
                output_name=output["name"],
                output_dim=math.prod(out_dims),
            )
        return self._spec

    def model_version_label(self) -> str:
        """``"<name>:<version>"`` of the model that answers, e.g. ``"image_embedder:1"``."""
        metadata = self.metadata()
        versions = metadata.get("versions") or []
        version = self.model_version or max(versions, key=lambda v: (len(v), v), default="?")
        return f"{metadata.get('name', self.model_name)}:{version}"

    # -- inference -------------------------------------------------------------------------------------------

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """Embeddings (float32, ``[N, output_dim]``) for ``batch`` (``[N, *shape]``), split by max_batch_size."""
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
        if len(batch) == 0:
            return np.zeros((0, spec.output_dim), dtype=np.float32)
        step = spec.max_batch_size or len(batch)
        parts = [self._infer(np.ascontiguousarray(batch[i : i + step]), spec) for i in range(0, len(batch), step)]
        return np.concatenate(parts).astype(np.float32, copy=False)

    def _infer(self, chunk: np.ndarray, spec: ModelInputSpec) -> np.ndarray:
        tensor = self._http.InferInput(spec.name, list(chunk.shape), spec.datatype)
        tensor.set_data_from_numpy(chunk, binary_data=True)
        wanted = [self._http.InferRequestedOutput(spec.output_name, binary_data=True)]
        result = self._call(
            lambda c: c.infer(self.model_name, [tensor], model_version=self.model_version, outputs=wanted),
            f"inference on a batch of {len(chunk)}",
        )
        output = result.as_numpy(spec.output_name)
        if output is None or output.shape[0] != len(chunk):
            got = None if output is None else output.shape
            raise TritonClientError(f"{self._what()} returned {got} for a batch of {len(chunk)}")
        return output.reshape(len(chunk), spec.output_dim)

    def _call(self, action, what: str):  # noqa: ANN001, ANN202 - a callable on the tritonclient client
        """Run ``action(client)``, retrying with backoff on connection errors and 5xx; never on 4xx."""
        client = self._live_client()
        for attempt in range(self.retries + 1):
            try:
                return action(client)
            except self._http.InferenceServerException as exc:
                status = str(exc.status() or "")
                retryable = status.startswith("5")
                error = f"HTTP {status}: {exc.message()}" if status else str(exc.message())
            except OSError as exc:
                retryable = True
                error = f"{type(exc).__name__}: {exc}"
            if not retryable or attempt == self.retries:
                tries = f" (after {attempt + 1} attempts)" if attempt else ""
                raise TritonClientError(f"{what} failed for {self._what()}{tries}: {error}")
            time.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")
