"""One client connection behind a protocol-neutral interface (HTTP or gRPC), and where it connects to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol

import numpy as np

WireProtocol = Literal["http", "grpc"]


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
        return self._client.infer(model, inputs, model_version=version, outputs=outputs, client_timeout=self._timeout)

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
