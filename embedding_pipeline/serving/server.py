"""The bundled Triton Inference Server (from the ``nvidia-pytriton`` wheel) as a managed local process.

``start_triton`` is idempotent: a server that already serves the model at ``settings.triton.url`` is used as is
— except that a server this pipeline started reloads the model when the configured ONNX file (the default model,
or ``triton.model_path``) or ``triton.max_batch_size`` no longer matches what it serves. The model it replaces
stays loaded as ``<model_name>_<sha12 of its file>`` while a Milvus collection holds its vectors, so search keeps
embedding queries with the model that built the collection it searches until search is switched to the new one.
Only loopback URLs are ever started locally; for a remote URL the model must already be ready. The server runs from
the ``serving`` environment (numpy < 2, onnxruntime), the way a Triton container would run beside the pipeline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from embedding_pipeline.runtime import processes
from embedding_pipeline.runtime.environments import ensure_env, env_dir
from embedding_pipeline.runtime.locks import file_lock
from embedding_pipeline.runtime.processes import ServiceError, is_secret_variable
from embedding_pipeline.runtime.state import StatePaths
from embedding_pipeline.serving import admin
from embedding_pipeline.serving.models import ModelArtifact, configured_sha256, model_artifact
from embedding_pipeline.serving.repository import write_model_repository
from embedding_pipeline.settings import Settings, TritonSettings

PROCESS_NAME = "triton"
MODEL_VERSION = "1"
# A client that forgets to close its connection holds the server's shutdown for this long (default 30 s).
EXIT_TIMEOUT_S = 10


def base_url(triton: TritonSettings) -> str:
    return triton.url.rstrip("/") if "://" in triton.url else f"http://{triton.url.rstrip('/')}"


def model_ready_url(triton: TritonSettings) -> str:
    version = f"/versions/{triton.model_version}" if triton.model_version else ""
    return f"{base_url(triton)}/v2/models/{triton.model_name}{version}/ready"


def server_ready(triton: TritonSettings) -> bool:
    return processes.http_ok(f"{base_url(triton)}/v2/health/ready")


def model_ready(triton: TritonSettings) -> bool:
    return processes.http_ok(model_ready_url(triton))


# Which models the index still holds vectors of: the 12 hex of each model file's sha256, or None when that cannot
# be told (then no archived model is retired). The caller knows the index; serving does not.
ModelsInUse = Callable[[], "set[str] | None"]


def _unknown() -> set[str] | None:
    return None


def start_triton(settings: Settings, models_in_use: ModelsInUse = _unknown) -> None:
    """Make sure the model at ``settings.triton.url`` is ready, starting the bundled server if needed.

    A replaced model keeps serving under its archived name while ``models_in_use`` lists its file (search on its
    collection goes on); archives no longer in use are unloaded and deleted.
    """
    triton = settings.triton
    if model_ready(triton):
        if triton.is_local and processes.read(settings.paths.run, PROCESS_NAME) is not None:
            _reload_if_changed(settings, models_in_use)
        return
    what = f"model {triton.model_name!r} at {base_url(triton)}"
    if not triton.is_local:
        raise ServiceError(
            f"{what} is not ready, and the pipeline starts Triton itself only for loopback URLs; "
            "start that server (with the model loaded) or point TRITON_URL at 127.0.0.1"
        )
    if triton.model_version not in ("", MODEL_VERSION):
        raise ServiceError(f"the local Triton serves version {MODEL_VERSION} only, not {triton.model_version!r}")
    paths = settings.paths
    paths.run.mkdir(parents=True, exist_ok=True)
    # Several Dagster steps may call this at once: one starts the server, the others wait for it.
    with file_lock(paths.run / f"{PROCESS_NAME}.lock"):
        if model_ready(triton):
            return
        proc = processes.read(paths.run, PROCESS_NAME)
        if proc is None:
            if processes.port_open(_bind_address(triton), triton.port):
                raise ServiceError(
                    f"{what} is not ready, and port {triton.port} is taken by another process; "
                    "stop it or choose another TRITON_URL"
                )
            proc = processes.start(paths.run, paths.logs, PROCESS_NAME, *_prepare(settings, models_in_use))
        try:
            processes.wait_until(lambda: server_ready(triton), triton.ready_timeout_s, "Triton server", proc)
            processes.wait_until(lambda: model_ready(triton), triton.ready_timeout_s, f"Triton {what}", proc)
        except ServiceError:
            processes.stop(paths.run, PROCESS_NAME)
            raise


def stop_triton(settings: Settings) -> bool:
    """Stop the server this pipeline started (True if it was running); a server started elsewhere is left alone."""
    return processes.stop(settings.paths.run, PROCESS_NAME)


def triton_status(settings: Settings) -> dict[str, Any]:
    triton = settings.triton
    proc = processes.read(settings.paths.run, PROCESS_NAME)
    return {
        "url": base_url(triton),
        "model": triton.model_name,
        "managed_pid": proc.pid if proc else None,
        "log": str(proc.log) if proc else None,
        "server_ready": server_ready(triton),
        "model_ready": model_ready(triton),
    }


def _bind_address(triton: TritonSettings) -> str:
    return "127.0.0.1" if triton.host == "localhost" else triton.host


def _write_repository(settings: Settings, artifact: ModelArtifact | None = None) -> bool:
    """The model repository for the configured model (default or ``triton.model_path``); True if files changed."""
    triton = settings.triton
    artifact = artifact or model_artifact(settings.paths, triton.model_path, triton.max_batch_size)
    return write_model_repository(
        settings.paths.model_repository,
        triton.model_name,
        artifact.path,
        artifact.spec,
        max_batch_size=triton.max_batch_size,
        parameters=artifact.parameters,
    )


def _served_config(triton: TritonSettings) -> dict[str, Any]:
    return _http_json(f"{base_url(triton)}/v2/models/{triton.model_name}/config")


def _is_current(triton: TritonSettings, served: dict[str, Any], sha256: str) -> bool:
    params = {key: (value or {}).get("string_value") for key, value in (served.get("parameters") or {}).items()}
    return params.get("artifact_sha256") == sha256 and int(served.get("max_batch_size", -1)) == triton.max_batch_size


def _reload_if_changed(settings: Settings, models_in_use: ModelsInUse) -> None:
    """Rewrite the repository and reload the model in the server we started if it serves another model file or
    batch limit than configured (the server runs in explicit model-control mode, so it never reloads by itself)."""
    triton = settings.triton
    served = _served_config(triton)
    if _is_current(triton, served, configured_sha256(settings.paths, triton.model_path)):
        return
    # Checked before anything changes: a file the pipeline cannot serve leaves the running model alone.
    artifact = model_artifact(settings.paths, triton.model_path, triton.max_batch_size)
    with file_lock(settings.paths.run / f"{PROCESS_NAME}.lock"):
        old_sha = _config_parameter(served, "artifact_sha256")
        archived = _archive_served_model(settings, old_sha) if old_sha and old_sha != artifact.sha256 else None
        if archived:
            # Loaded before the configured model changes, so a search on the old model's collection never fails.
            _load(triton, archived, settings.paths.run)
        _write_repository(settings, artifact)
        # Triton answers once the new model is loaded (it keeps serving the old one until then).
        _load(triton, triton.model_name, settings.paths.run)
        what = f"Triton model {triton.model_name!r}"
        processes.wait_until(lambda: model_ready(triton), triton.ready_timeout_s, what)
        _retire_unused_archives(settings, artifact.sha256, models_in_use())


def archived_model_name(model_name: str, sha256: str) -> str:
    """The name a replaced model keeps serving under: ``<model_name>_<first 12 hex of its file's sha256>``."""
    return f"{model_name}_{sha256[:12]}"


def _config_parameter(config: dict[str, Any], key: str) -> str:
    return str(((config.get("parameters") or {}).get(key) or {}).get("string_value") or "")


def _load(triton: TritonSettings, model: str, run_dir: Path | None = None) -> None:
    _http_json(
        f"{base_url(triton)}/v2/repository/models/{model}/load",
        method="POST",
        timeout=triton.ready_timeout_s,
        headers=admin.headers(run_dir),
    )


def _archive_served_model(settings: Settings, sha256: str) -> str | None:
    """Copy the repository entry of the model being replaced to its archived name (config renamed); returns the
    name, or None when the entry no longer holds that model (its files were replaced already)."""
    repo, name = settings.paths.model_repository, settings.triton.model_name
    archived = archived_model_name(name, sha256)
    target = repo / archived
    if target.is_dir():
        return archived
    config = repo / name / "config.pbtxt"
    if not config.is_file() or sha256 not in config.read_text():
        return None
    staging = repo.parent / f".{archived}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(repo / name, staging)
    staged = staging / "config.pbtxt"
    staged.write_text(staged.read_text().replace(f'name: "{name}"', f'name: "{archived}"', 1))
    os.replace(staging, target)
    return archived


def _archives(settings: Settings) -> dict[str, str]:
    """Archived models in the repository: directory name -> the 12 hex of its file's sha256."""
    repo, prefix = settings.paths.model_repository, f"{settings.triton.model_name}_"
    if not repo.is_dir():
        return {}
    return {
        entry.name: entry.name[len(prefix) :]
        for entry in repo.iterdir()
        if entry.is_dir() and entry.name.startswith(prefix) and re.fullmatch(r"[0-9a-f]{12}", entry.name[len(prefix) :])
    }


def _retire_unused_archives(settings: Settings, configured_sha: str, in_use: set[str] | None) -> None:
    """Unload and delete archived models that no collection uses any more (``in_use``), or that are the configured
    model again (it serves under its own name)."""
    if in_use is None:
        return
    triton = settings.triton
    for archived, sha12 in _archives(settings).items():
        if sha12 in in_use and not configured_sha.startswith(sha12):
            continue
        try:
            _http_json(
                f"{base_url(triton)}/v2/repository/models/{archived}/unload",
                method="POST",
                headers=admin.headers(settings.paths.run),
            )
        except ServiceError:
            pass  # not loaded: nothing to unload
        shutil.rmtree(settings.paths.model_repository / archived, ignore_errors=True)


def _archives_to_load(settings: Settings, configured_sha: str, in_use: set[str] | None) -> list[str]:
    """Archived models a freshly started server loads besides the configured one: those a collection still uses
    (all of them when that cannot be told), unless it is the configured model itself."""
    archives = _archives(settings)
    return sorted(
        name
        for name, sha12 in archives.items()
        if (in_use is None or sha12 in in_use) and not configured_sha.startswith(sha12)
    )


def _http_json(
    url: str, method: str = "GET", timeout: float = 10.0, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:2000]
        raise ServiceError(f"Triton answered {exc.code} to {method} {url}: {detail}") from None
    except OSError as exc:
        raise ServiceError(f"{method} {url} failed: {exc}") from None
    return json.loads(body) if body.strip() else {}


def _prepare(settings: Settings, models_in_use: ModelsInUse) -> tuple[list[str], dict[str, str]]:
    """Environments, model, repository and backend directory; returns the server's argv and environment."""
    paths = settings.paths
    triton = settings.triton
    python = ensure_env(paths, "serving")
    artifact = model_artifact(paths, triton.model_path, triton.max_batch_size)
    _write_repository(settings, artifact)
    layout = _serving_layout(python)
    tritonserver_root = Path(layout["purelib"]) / "pytriton" / "tritonserver"
    backends = _assemble_backends(paths, tritonserver_root, layout["version"])
    address = _bind_address(triton)
    argv = [
        str(tritonserver_root / "bin" / "tritonserver"),
        f"--model-repository={paths.model_repository}",
        f"--backend-directory={backends}",
        # Explicit control: only our model loads, whatever else sits in the repository.
        "--model-control-mode=explicit",
        f"--load-model={triton.model_name}",
        *(f"--load-model={name}" for name in _archives_to_load(settings, artifact.sha256, models_in_use())),
        f"--http-address={address}",
        f"--http-port={triton.port}",
        f"--grpc-address={address}",
        f"--grpc-port={triton.grpc_port}",
        f"--metrics-address={address}",
        f"--metrics-port={triton.metrics_port}",
        # Loading models, shared memory, trace and log settings: only for callers holding this start's key.
        *admin.server_flags(admin.new_key(paths.run)),
        "--exit-on-error=true",
        f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
    ]
    return argv, _server_env(paths, layout)


def _serving_layout(python: Path) -> dict[str, str]:
    code = (
        "import json, sys, sysconfig; print(json.dumps({'purelib': sysconfig.get_paths()['purelib'], "
        "'libdir': sysconfig.get_config_var('LIBDIR'), 'version': '%d.%d' % sys.version_info[:2]}))"
    )
    out = subprocess.run([str(python), "-I", "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def _assemble_backends(paths: StatePaths, tritonserver_root: Path, py_version: str) -> Path:
    """``<triton>/backends/python`` with the backend library, its utils and the stub for the serving Python."""
    target = paths.triton / "backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    backend = tritonserver_root / "backends" / "python"
    sources = [
        backend / "libtriton_python.so",
        backend / "triton_python_backend_utils.py",
        # The backend looks for its stub next to libtriton_python.so.
        tritonserver_root / "python_backend_stubs" / py_version / "triton_python_backend_stub",
    ]
    for source in sources:
        if not source.is_file():
            raise ServiceError(f"{source} is missing from the serving environment; delete {source.parents[3]}")
        dest = target / source.name
        stat = source.stat()
        if not dest.is_file() or (dest.stat().st_size, int(dest.stat().st_mtime)) != (stat.st_size, int(stat.st_mtime)):
            tmp = dest.with_name(f".{dest.name}.tmp")
            shutil.copy2(source, tmp)
            os.replace(tmp, dest)
    return target.parent


def _server_env(paths: StatePaths, layout: dict[str, str]) -> dict[str, str]:
    serving = env_dir(paths, "serving")
    # The server needs none of the pipeline's secrets (Milvus credentials, the API key).
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV") and not is_secret_variable(k)
    }
    libs = Path(layout["purelib"]) / "nvidia_pytriton.libs"
    # The stub must load the serving Python's own libpython, not the system one (mismatched stdlib otherwise).
    env["LD_LIBRARY_PATH"] = ":".join(p for p in (str(libs), layout["libdir"], env.get("LD_LIBRARY_PATH")) if p)
    # The stub finds its site-packages through the first python on PATH.
    env["PATH"] = f"{serving / 'bin'}:{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(serving)
    return env
