"""Start, stop and report the local services: Triton and Milvus, and for ``up`` the Dagster webserver + daemon.

One way to start things, used by the CLI and the tests. Servers are only started for loopback URLs; a remote
Triton or Milvus is used as it is.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import AbstractSet

from embedding_pipeline.index.collections import ModelCollections
from embedding_pipeline.index.server import milvus_status, start_milvus, stop_milvus
from embedding_pipeline.orchestration.instance import create_instance_storage, prepare_dagster_home
from embedding_pipeline.runtime import processes
from embedding_pipeline.runtime.state import private_state_dir
from embedding_pipeline.serving.client import ModelLabel
from embedding_pipeline.serving.server import start_triton, stop_triton, triton_status
from embedding_pipeline.settings import CONFIG_ENV, Settings, config_path

WEBSERVER, DAEMON, API = "dagster-webserver", "dagster-daemon", "api"
# Every process the pipeline may start, in the order to stop them (the API first: it calls all the others).
MANAGED = (API, WEBSERVER, DAEMON, "triton", "milvus")


def child_env(settings: Settings) -> dict[str, str]:
    """The environment of Dagster processes: same settings, absolute paths, the instance's home."""
    env = dict(os.environ)
    env["EMBEDDING_PIPELINE_HOME"] = str(settings.paths.root)
    env["EMBEDDING_PIPELINE_CACHE"] = str(settings.paths.cache)
    env["DAGSTER_HOME"] = str(settings.paths.dagster_home)
    config = config_path(env)
    if config is not None:
        # Absolute, so processes started in another directory read the same file.
        env[CONFIG_ENV] = str(config.resolve())
    return env


def start_services(settings: Settings) -> list[str]:
    """Make Milvus and Triton ready; returns the names of the servers this call had to start."""
    private_state_dir(settings.paths.root)
    before = {name for name in ("milvus", "triton") if processes.read(settings.paths.run, name)}
    start_milvus(settings)
    start_triton(settings, lambda: models_in_use(settings))
    return [name for name in ("milvus", "triton") if name not in before and processes.read(settings.paths.run, name)]


def models_in_use(settings: Settings) -> set[str] | None:
    """The 12-hex file hashes of the models whose vectors the collections behind ``milvus.collection`` hold;
    None when Milvus cannot tell (not running, unreachable): then Triton retires no archived model."""
    milvus = settings.milvus
    if not processes.port_open(milvus.host, milvus.port, timeout=2):
        return None
    try:
        with ModelCollections(milvus, connect_timeout=5) as collections:
            labels = collections.labels()
    except Exception:  # noqa: BLE001 - Milvus unusable: keep every archived model
        return None
    hashes = set()
    for label in labels:
        try:
            hashes.add(ModelLabel.parse(label).artifact[:12])
        except ValueError:
            continue
    return hashes


def stop_services(settings: Settings, only: list[str] | None = None) -> list[str]:
    """Stop the local Triton and Milvus (or only the named ones); returns the names actually stopped."""
    stopped = []
    if (only is None or "triton" in only) and stop_triton(settings):
        stopped.append("triton")
    if (only is None or "milvus" in only) and stop_milvus(settings):
        stopped.append("milvus")
    return stopped


def services_status(settings: Settings) -> dict:
    api = processes.read(settings.paths.run, API)
    return {
        "triton": triton_status(settings),
        "milvus": milvus_status(settings),
        "dagster": dagster_status(settings),
        "api": {"url": api_url(settings), "pid": api.pid if api else None},
    }


def _tool(name: str) -> str:
    # The console scripts installed next to this interpreter, so the same environment runs everything.
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else (shutil.which(name) or name)


def webserver_url(settings: Settings) -> str:
    return f"http://{settings.dagster.webserver_host}:{settings.dagster.webserver_port}"


def start_dagster(settings: Settings, timeout_s: float = 120.0, instance_yaml: str | None = None) -> None:
    workspace = prepare_dagster_home(settings, instance_yaml)
    env = child_env(settings)
    paths = settings.paths
    create_instance_storage(settings)
    if processes.read(paths.run, DAEMON) is None:
        processes.start(paths.run, paths.logs, DAEMON, [_tool("dagster-daemon"), "run", "-w", str(workspace)], env=env)
    if processes.read(paths.run, WEBSERVER) is None:
        argv = [
            _tool("dagster-webserver"),
            "-h",
            settings.dagster.webserver_host,
            "-p",
            str(settings.dagster.webserver_port),
            "-w",
            str(workspace),
        ]
        proc = processes.start(paths.run, paths.logs, WEBSERVER, argv, env=env)
        url = webserver_url(settings)
        processes.wait_until(lambda: processes.http_ok(f"{url}/server_info"), timeout_s, f"Dagster UI at {url}", proc)


def stop_dagster(settings: Settings) -> list[str]:
    return [name for name in (WEBSERVER, DAEMON) if processes.stop(settings.paths.run, name)]


def api_url(settings: Settings) -> str:
    return f"http://{settings.api.host}:{settings.api.port}"


def start_api(settings: Settings, timeout_s: float = 120.0) -> None:
    """Start the HTTP API (``embedding-pipeline serve-api``) as a managed process; wait until it answers."""
    paths = settings.paths
    if processes.read(paths.run, API) is not None:
        return
    argv = [_tool("embedding-pipeline"), "serve-api", "--host", settings.api.host, "--port", str(settings.api.port)]
    proc = processes.start(paths.run, paths.logs, API, argv, env=child_env(settings))
    url = api_url(settings)
    # Any answer from /health means it serves (503 only says a service behind it is not ready yet).
    processes.wait_until(
        lambda: processes.port_open(settings.api.host, settings.api.port), timeout_s, f"HTTP API at {url}", proc
    )


def stop_api(settings: Settings) -> bool:
    return processes.stop(settings.paths.run, API)


def dagster_status(settings: Settings) -> dict:
    paths = settings.paths
    web = processes.read(paths.run, WEBSERVER)
    daemon = processes.read(paths.run, DAEMON)
    return {
        "url": webserver_url(settings),
        "webserver_pid": web.pid if web else None,
        "daemon_pid": daemon.pid if daemon else None,
    }


def stop_all(settings: Settings, keep: AbstractSet[str] = frozenset()) -> list[str]:
    """Stop every managed process (Dagster first, so no run starts against a stopping service), except ``keep``."""
    return [name for name in MANAGED if name not in keep and processes.stop(settings.paths.run, name)]
