"""The embedded Milvus: one milvus-lite server process shared by every pipeline process.

milvus-lite opened as a file allows one process per data directory, while Dagster runs steps, sensors and ad hoc
searches in different processes; so the pipeline runs milvus-lite in server mode on loopback and everyone connects
by URI — exactly as they would to a remote Milvus.
"""

from __future__ import annotations

import os
import sys

from embedding_pipeline.index.client import redact
from embedding_pipeline.runtime import processes
from embedding_pipeline.settings import Settings

NAME = "milvus"


def milvus_ready(settings: Settings) -> bool:
    """True if a Milvus server answers at the configured URI (with the configured credentials and TLS).

    Inconsistent connection settings raise :class:`ConfigError` rather than reading as "not ready".
    """
    from embedding_pipeline.index.client import connect, connection_kwargs

    connection_kwargs(settings.milvus)
    if settings.milvus.is_local and not processes.port_open(settings.milvus.host, settings.milvus.port):
        return False
    try:
        client = connect(settings.milvus, timeout=5)
    except Exception:  # noqa: BLE001 - any failure to connect means "not ready"
        return False
    try:
        client.list_collections()
        return True
    except Exception:  # noqa: BLE001
        return False
    finally:
        client.close()


def lite_environment(settings: Settings) -> dict[str, str]:
    """The engine's own knobs, from ``milvus.lite_memtable_mb``: rows wait in memory (and in the write-ahead log)
    until that much has accumulated or the pipeline flushes at the end of a drop. With the engine's default
    (128 MiB, ~25,000 rows of 1280-d) a 100,000-row drop became four segments, each indexed as it was written and
    indexed again when compaction merged them: twice the index-building work, while the inserts were running.
    The default, 256 MiB, makes it two segments that are never merged (docs/benchmarks.md has the figures)."""
    limit = settings.milvus.lite_memtable_mb * 1024 * 1024
    return {
        "MILVUS_LITE_MEMTABLE_MEMORY_LIMIT_BYTES": str(limit),
        "MILVUS_LITE_WAL_SIZE_LIMIT_BYTES": str(2 * limit),
    }


def start_milvus(settings: Settings, timeout_s: float = 60.0) -> None:
    """Start the local milvus-lite server unless a Milvus already answers at ``settings.milvus.uri``."""
    if milvus_ready(settings):
        return
    if not settings.milvus.is_local:
        from embedding_pipeline.index.client import connection_problem

        problem = connection_problem(settings.milvus, RuntimeError("no answer to list_collections"))
        raise processes.ServiceError(f"{problem}; the pipeline only starts servers on loopback URIs")
    paths = settings.paths
    paths.milvus_data.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable,
        "-c",
        "import sys; from milvus_lite.cmdline import main; sys.exit(main())",
        "server",
        "--data-dir",
        str(paths.milvus_data),
        "--host",
        "127.0.0.1",
        "--port",
        str(settings.milvus.port),
    ]
    # The engine needs none of the pipeline's secrets (Milvus credentials, the API key).
    env = processes.without_secrets(os.environ)
    env.update(lite_environment(settings))
    proc = processes.start(paths.run, paths.logs, NAME, argv, env=env)
    processes.wait_until(lambda: milvus_ready(settings), timeout_s, f"Milvus at {redact(settings.milvus.uri)}", proc)


def stop_milvus(settings: Settings) -> bool:
    return processes.stop(settings.paths.run, NAME)


def milvus_status(settings: Settings) -> dict:
    proc = processes.read(settings.paths.run, NAME)
    return {
        "uri": redact(settings.milvus.uri),
        "managed_pid": proc.pid if proc else None,
        "ready": milvus_ready(settings),
    }
