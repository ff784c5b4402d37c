"""The bundled Triton's administrative APIs, restricted to a key made at each start.

Triton's model-repository API loads models (with file overrides, on a server with the python backend, that is
running code of the caller's choosing), and its shared-memory, trace and logging APIs map memory or write files.
The server the pipeline starts restricts them (``--http-restricted-api`` / ``--grpc-restricted-protocol``) to
requests carrying the header :data:`HEADER` with a key generated at each start and written, owner-only, into the
state directory's ``run/`` folder; the pipeline's own processes read it from there. Inference, health, metadata and
statistics stay open on loopback.

The key is on the server's command line (Triton takes it no other way): on a machine whose process list other
users can read (no ``hidepid``), they can see it. The state directory itself is 0700.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from embedding_pipeline.runtime.state import StatePaths

HEADER = "x-embedding-pipeline-admin"
KEY_FILE = "triton-admin.key"
RESTRICTED = ("model-repository", "shared-memory", "trace", "logging")


def new_key(run_dir: Path) -> str:
    """A fresh key for a server about to start, written owner-only to ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(24)
    path = run_dir / KEY_FILE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key)
    tmp.replace(path)
    return key


def server_flags(key: str) -> list[str]:
    apis = ",".join(RESTRICTED)
    return [f"--http-restricted-api={apis}:{HEADER}={key}", f"--grpc-restricted-protocol={apis}:{HEADER}={key}"]


def _run_dir() -> Path:
    """The state directory the settings name (the configuration file may set ``home``), else the environment's."""
    try:
        from embedding_pipeline.settings import load_settings

        return load_settings().paths.run
    except Exception:  # noqa: BLE001 - an unreadable configuration: the environment's state directory
        return StatePaths.from_env().run


def read_key(run_dir: Path | None = None) -> str | None:
    """The key of the server this state directory started (None when there is none). Read at each call: a
    restarted server has a new key."""
    path = (run_dir or _run_dir()) / KEY_FILE
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def headers(run_dir: Path | None = None) -> dict[str, str]:
    """The header that opens the restricted APIs, or nothing (a Triton the pipeline did not start)."""
    key = read_key(run_dir)
    return {HEADER: key} if key else {}
