"""Real services for the integration tests, started once per session on free loopback ports.

One state directory per session holds the Triton model repository, Milvus data, the Dagster home, drops and
asset outputs; environments and the exported model come from the shared cache (built once, reused by the CLI).
The session's settings are exported through the environment, so Dagster code and child processes see them.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from embedding_pipeline.runtime.processes import free_ports
from embedding_pipeline.runtime.state import CACHE_ENV, HOME_ENV
from embedding_pipeline.settings import CONFIG_ENV, Settings, load_settings
from embedding_pipeline_tests.integration.milvus_servers import milvus_lite, standalone_milvus  # noqa: F401 - fixtures
from embedding_pipeline_tests.integration.s3_server import seaweedfs  # noqa: F401 - fixture

REPO_ROOT = Path(__file__).resolve().parents[2]

# Environments and the exported model are rebuildable and slow to make: share them with the CLI's default cache.
os.environ.setdefault(CACHE_ENV, str(REPO_ROOT / ".embedding_pipeline" / "cache"))


def write_config(home: Path, settle_s: float = 0.0) -> Path:
    """A config file for a fresh home with every port free; returns its path."""
    triton, grpc, metrics, milvus, web, api = free_ports(6)
    config = home / "embedding_pipeline.yaml"
    config.write_text(
        f"triton:\n  url: 127.0.0.1:{triton}\n  grpc_port: {grpc}\n  metrics_port: {metrics}\n"
        f"milvus:\n  uri: http://127.0.0.1:{milvus}\n"
        f"dagster:\n  webserver_port: {web}\n  sensor_interval_s: 1\n  drop_settle_s: {settle_s}\n"
        "  step_retries: 1\n  step_retry_delay_s: 1\n"
        f"api:\n  port: {api}\n"
    )
    return config


def stack_env(home: Path, config: Path) -> dict[str, str]:
    return {HOME_ENV: str(home), CONFIG_ENV: str(config), "DAGSTER_HOME": str(home / "dagster_home")}


@contextmanager
def running_stack(home: Path, config: Path) -> Iterator[Settings]:
    """Triton and Milvus started for ``home`` + ``config``, with this process's environment (and so Dagster code
    and child processes) pointing at them until the block ends; then they are stopped and the environment restored."""
    from embedding_pipeline import services
    from embedding_pipeline.orchestration import instance as orchestration_instance

    env = stack_env(home, config)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        settings = load_settings()
        orchestration_instance.prepare_dagster_home(settings)
        try:
            services.start_services(settings)
            yield settings
        finally:
            services.stop_services(settings)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Iterator[Settings]:
    """Real Triton (default model) and Milvus for the session; this process's environment points at them."""
    home = tmp_path_factory.mktemp("stack_home")
    with running_stack(home, write_config(home)) as settings:
        yield settings


@pytest.fixture(scope="session")
def triton_settings(stack) -> Settings:
    return stack


@pytest.fixture(scope="session")
def ingested_photos(stack) -> dict:
    """The sample photos ingested once as drop ``photos`` through the real Dagster job."""
    from embedding_pipeline.orchestration import runs
    from embedding_pipeline.sources.samples import write_sample_drop

    folder = write_sample_drop(stack.drops, "photos")
    summary = runs.ingest(stack, folder)
    assert summary["success"], summary
    return summary
