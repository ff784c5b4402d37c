"""Start, stop and report the local services: Triton and Milvus, and for ``up`` the Dagster webserver + daemon.

One way to start things, used by the CLI and the tests. Servers are only started for loopback URLs; a remote
Triton or Milvus is used as it is.
"""

from __future__ import annotations

import os
import shutil
import sys
from importlib import resources
from pathlib import Path

from embedding_pipeline.runtime import processes
from embedding_pipeline.index.server import milvus_status, start_milvus, stop_milvus
from embedding_pipeline.serving.server import start_triton, stop_triton, triton_status
from embedding_pipeline.runtime.state import private_state_dir
from embedding_pipeline.settings import CONFIG_ENV, Settings, config_path

WEBSERVER, DAEMON, API = "dagster-webserver", "dagster-daemon", "api"
# Every process the pipeline may start, in the order to stop them (the API first: it calls all the others).
MANAGED = (API, WEBSERVER, DAEMON, "triton", "milvus")
LOCATION_NAME = "embedding_pipeline"


def prepare_dagster_home(settings: Settings, instance_yaml: str | None = None) -> Path:
    """Write the instance config (the packaged one unless ``instance_yaml`` is given) and a workspace file into the
    Dagster home; returns the workspace file."""
    home = settings.paths.dagster_home
    private_state_dir(settings.paths.root)
    home.mkdir(parents=True, exist_ok=True)
    instance = instance_yaml or resources.files("embedding_pipeline").joinpath("dagster_instance.yaml").read_text()
    (home / "dagster.yaml").write_text(instance)
    workspace = home / "workspace.yaml"
    workspace.write_text(
        "load_from:\n"
        "  - python_module:\n"
        "      module_name: embedding_pipeline.defs\n"
        f"      location_name: {LOCATION_NAME}\n"
    )
    return workspace


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


def use_dagster_home(settings: Settings) -> None:
    """Point this process at the pipeline's Dagster instance unless DAGSTER_HOME is set already."""
    if not os.environ.get("DAGSTER_HOME"):
        prepare_dagster_home(settings)
        os.environ["DAGSTER_HOME"] = str(settings.paths.dagster_home)


def start_services(settings: Settings) -> list[str]:
    """Make Milvus and Triton ready; returns the names of the servers this call had to start."""
    private_state_dir(settings.paths.root)
    before = {name for name in ("milvus", "triton") if processes.read(settings.paths.run, name)}
    start_milvus(settings)
    start_triton(settings)
    return [name for name in ("milvus", "triton") if name not in before and processes.read(settings.paths.run, name)]


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
    return {"triton": triton_status(settings), "milvus": milvus_status(settings), "dagster": dagster_status(settings),
            "api": {"url": api_url(settings), "pid": api.pid if api else None}}


def _tool(name: str) -> str:
    # The console scripts installed next to this interpreter, so the same environment runs everything.
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else (shutil.which(name) or name)


def webserver_url(settings: Settings) -> str:
    return f"http://{settings.dagster.webserver_host}:{settings.dagster.webserver_port}"


def _create_instance_storage(settings: Settings) -> None:
    """Create (or migrate) the instance's storage once, before the daemon and webserver start: two processes
    creating a fresh SQLite instance at the same moment can both record the schema version."""
    from dagster import DagsterInstance

    with DagsterInstance.from_config(str(settings.paths.dagster_home)):
        pass


def start_dagster(settings: Settings, timeout_s: float = 120.0, instance_yaml: str | None = None) -> None:
    workspace = prepare_dagster_home(settings, instance_yaml)
    env = child_env(settings)
    paths = settings.paths
    _create_instance_storage(settings)
    if processes.read(paths.run, DAEMON) is None:
        processes.start(paths.run, paths.logs, DAEMON, [_tool("dagster-daemon"), "run", "-w", str(workspace)], env=env)
    if processes.read(paths.run, WEBSERVER) is None:
        argv = [
            _tool("dagster-webserver"),
            "-h", settings.dagster.webserver_host,
            "-p", str(settings.dagster.webserver_port),
            "-w", str(workspace),
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
    processes.wait_until(lambda: processes.port_open(settings.api.host, settings.api.port), timeout_s,
                         f"HTTP API at {url}", proc)


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


def stop_all(settings: Settings, keep: set[str] = frozenset()) -> list[str]:
    """Stop every managed process (Dagster first, so no run starts against a stopping service), except ``keep``."""
    return [name for name in MANAGED if name not in keep and processes.stop(settings.paths.run, name)]
