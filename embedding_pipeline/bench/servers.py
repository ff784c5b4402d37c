"""Servers for ``embedding-pipeline bench``, all inside one throw-away state directory.

The benchmark never touches the configured servers or their data: it starts the bundled Triton and a fresh
Milvus (milvus-lite, or the full Milvus standalone server) on free loopback ports under a temporary home, and
removes everything on the way out — after a failure or Ctrl-C too. Environments and the exported model still
come from the shared cache, so nothing is rebuilt.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from embedding_pipeline.runtime import processes
from embedding_pipeline.runtime.state import CACHE_ENV
from embedding_pipeline.settings import MilvusSettings, Settings

if TYPE_CHECKING:
    from embedding_pipeline.index.standalone import StandaloneMilvus

STORES = ("lite", "standalone")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (all its threads), or None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int | None) -> float | None:
    """The most resident memory process ``pid`` has used so far (VmHWM), in MiB; None if unknown."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        return None
    return None


def wait_until_idle(pid: int, quiet_s: float = 1.0, busy_share: float = 0.1, timeout_s: float = 900.0) -> float:
    """Block until process ``pid`` used under ``busy_share`` of a core for ``quiet_s``; returns the seconds waited.

    milvus-lite builds segment indexes on a background thread after a flush and reports them as finished at
    once; its CPU going quiet is the only outside sign that the build is over.
    """
    started = time.monotonic()
    last = cpu_seconds(pid)
    while last is not None and time.monotonic() - started < timeout_s:
        time.sleep(quiet_s)
        now = cpu_seconds(pid)
        if now is None or now - last < busy_share * quiet_s:
            break
        last = now
    return time.monotonic() - started


def processes_using(path: Path) -> list[int]:
    """Pids of live processes whose command line mentions ``path`` or whose working directory is inside it
    (a leak check for the temporary home: Milvus standalone's command line names no path, its cwd does)."""
    text = str(path)
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            mentions = text.encode() in (proc / "cmdline").read_bytes()
            cwd = os.readlink(proc / "cwd").removesuffix(" (deleted)")  # a removed cwd still counts
        except OSError:
            continue
        if mentions or cwd == text or cwd.startswith(text + "/"):
            found.append(int(proc.name))
    return [pid for pid in found if pid != os.getpid()]


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM meanwhile (main thread only): cleanup cut short would leave servers running."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


class BenchHome:
    """A temporary state directory with its own ports; context manager that stops and removes what it started."""

    def __init__(self, settings: Settings):
        self.base = settings
        self.root: Path | None = None
        self.settings: Settings | None = None
        self._saved_cache: str | None = None
        self._standalone: StandaloneMilvus | None = None

    def __enter__(self) -> "BenchHome":
        self.base.paths.root.mkdir(parents=True, exist_ok=True)
        # Environments and the exported model are shared with the configured home: point the temporary home's
        # cache at them before anything asks for a path.
        self._saved_cache = os.environ.get(CACHE_ENV)
        os.environ[CACHE_ENV] = str(self.base.paths.cache)
        try:
            self.root = Path(tempfile.mkdtemp(prefix="bench-", dir=self.base.paths.root))
            http, grpc, metrics, milvus = processes.free_ports(4)
        except BaseException:
            self.close()
            raise
        triton = self.base.triton.model_copy(
            update={"url": f"127.0.0.1:{http}", "grpc_port": grpc, "metrics_port": metrics, "model_version": ""}
        )
        lite = self.base.milvus.model_copy(
            update={
                "uri": f"http://127.0.0.1:{milvus}",
                "token": "",
                "user": "",
                "password": "",
                "secure": False,
                "db_name": "",
            }
        )
        self.settings = self.base.model_copy(update={"home": self.root, "triton": triton, "milvus": lite})
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every server this home started and delete it (idempotent; a second Ctrl-C waits for it)."""
        from embedding_pipeline.index.server import stop_milvus
        from embedding_pipeline.serving.server import stop_triton

        with _signals_deferred():
            self._close(stop_triton, stop_milvus)

    def _close(self, stop_triton, stop_milvus) -> None:  # noqa: ANN001 - the service stop functions
        try:
            if self.settings is not None:
                stop_triton(self.settings)
                stop_milvus(self.settings)
            if self._standalone is not None:
                self._standalone.stop()
                self._standalone = None
        finally:
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
            if self._saved_cache is None:
                os.environ.pop(CACHE_ENV, None)
            else:
                os.environ[CACHE_ENV] = self._saved_cache

    # -- Triton ------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def triton(self) -> Iterator[Settings]:
        """The bundled Triton serving the configured model on this home's ports, stopped afterwards."""
        from embedding_pipeline.serving.server import start_triton, stop_triton

        assert self.settings is not None, "use BenchHome as a context manager"
        try:
            start_triton(self.settings)
            yield self.settings
        finally:
            stop_triton(self.settings)

    # -- Milvus ------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def milvus(self, store: str, name: str) -> Iterator[tuple[MilvusSettings, int | None]]:
        """A fresh, empty Milvus of kind ``store``: its client settings and the server's pid (None if unknown).

        A fresh server per measurement keeps one measurement's leftovers (a background index build, memory)
        out of the next one's figures.
        """
        assert self.settings is not None, "use BenchHome as a context manager"
        if store == "lite":
            with self._lite() as result:
                yield result
        elif store == "standalone":
            with self._standalone_server(name) as result:
                yield result
        else:
            raise ValueError(f"unknown store {store!r}; choose from {', '.join(STORES)}")

    @contextlib.contextmanager
    def _lite(self) -> Iterator[tuple[MilvusSettings, int | None]]:
        from embedding_pipeline.index.server import NAME, start_milvus, stop_milvus

        settings = self.settings
        assert settings is not None, "use BenchHome as a context manager"
        try:
            start_milvus(settings)
            proc = processes.read(settings.paths.run, NAME)
            yield settings.milvus, proc.pid if proc else None
        finally:
            stop_milvus(settings)
            shutil.rmtree(settings.paths.milvus_data, ignore_errors=True)

    @contextlib.contextmanager
    def _standalone_server(self, name: str) -> Iterator[tuple[MilvusSettings, int | None]]:
        try:
            from embedding_pipeline.index.standalone import StandaloneMilvus
        except ImportError:
            raise RuntimeError(
                "the 'standalone' store needs embedding_pipeline.index.standalone (Milvus 2.3.5), which this "
                "installation lacks; run with --stores lite"
            ) from None
        assert self.root is not None and self.settings is not None, "use BenchHome as a context manager"
        data_dir = self.root / f"standalone-{name}"
        server = StandaloneMilvus(self.settings.paths, data_dir)
        self._standalone = server  # stopped by close() even if start-up is interrupted half-way
        try:
            server.start()
            # No pid: Milvus standalone reports its own indexing progress, and its idle coordinators keep
            # ticking, so "CPU quiet" is neither needed nor reliable there.
            yield server.settings_for(self.settings.milvus), None
        finally:
            server.stop()
            self._standalone = None
            shutil.rmtree(data_dir, ignore_errors=True)
