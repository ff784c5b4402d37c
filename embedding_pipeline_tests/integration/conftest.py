"""Real services for the integration tests, each started once per session on free loopback ports."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Iterator

import pytest

from embedding_pipeline.settings import Settings, load_settings
from embedding_pipeline.state import CACHE_ENV

REPO_ROOT = Path(__file__).resolve().parents[2]

# Environments and the exported model are rebuildable and slow to make: share them with the CLI's default cache.
os.environ.setdefault(CACHE_ENV, str(REPO_ROOT / ".embedding_pipeline" / "cache"))


def free_ports(count: int) -> list[int]:
    """Ports free right now; all sockets stay open until every port is picked, so the ports differ."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture(scope="session")
def triton_settings(tmp_path_factory) -> Iterator[Settings]:
    """Settings for a real Triton serving the default model in a throw-away home; stopped after the session."""
    from embedding_pipeline.serving.server import start_triton, stop_triton

    home = tmp_path_factory.mktemp("triton_home")
    http_port, grpc_port, metrics_port = free_ports(3)
    # gRPC and metrics ports have no environment variables: they come from a config file.
    config = home / "embedding_pipeline.yaml"
    config.write_text(f"triton:\n  grpc_port: {grpc_port}\n  metrics_port: {metrics_port}\n")
    settings = load_settings(
        config_file=config,
        environ={"EMBEDDING_PIPELINE_HOME": str(home), "TRITON_URL": f"127.0.0.1:{http_port}"},
    )
    try:
        start_triton(settings)
        yield settings
    finally:
        stop_triton(settings)
