"""Worker threads, each owning its own client connection and shared memory region."""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable, TypeVar

from embedding_pipeline.serving.client.errors import TritonClientError
from embedding_pipeline.serving.client.transport import _Endpoint, _Transport
from embedding_pipeline.serving.shared_memory import SharedMemoryRegion

# One logger for the whole client, named after the package.
log = logging.getLogger(__package__)

T = TypeVar("T")


class _Worker:
    """State owned by one worker thread: its client and its shared memory region. Never touched elsewhere."""

    def __init__(self, pool: "_WorkerPool") -> None:
        self.pool = pool
        self._transport: _Transport | None = None
        self.region: SharedMemoryRegion | None = None

    @property
    def transport(self) -> _Transport:
        if self._transport is None:
            self._transport = self.pool.endpoint.connect()
        return self._transport

    def drop_region(self) -> None:
        region, self.region = self.region, None
        if region is not None:
            region.close()

    def close(self) -> None:
        try:
            self.drop_region()
        finally:
            transport, self._transport = self._transport, None
            if transport is not None:
                transport.close()


_STOP = object()


def _release_gevent_hub() -> None:
    """Free this thread's gevent hub, if it has one.

    ``tritonclient.http`` runs on gevent, which gives every thread that uses it a hub with its own event loop;
    gevent does not free it when the thread ends (two file descriptors per finished worker otherwise).
    """
    import sys

    if "gevent" not in sys.modules:
        return
    from gevent._hub_local import get_hub_if_exists

    hub = get_hub_if_exists()
    if hub is not None:
        hub.destroy(destroy_loop=True)


class _WorkerPool:
    """Up to ``size`` threads taking tasks ``fn(worker)`` from one queue; threads start only as work needs them.

    Holds no reference to the embedder, so an embedder that is garbage-collected unclosed still stops its
    workers (and closes their clients) through a finalizer.
    """

    def __init__(self, endpoint: _Endpoint, size: int) -> None:
        self.endpoint = endpoint
        self.size = size
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable[[_Worker], T]) -> "Future[T]":
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise TritonClientError(f"the client for Triton at {self.endpoint.label} is closed")
            self._tasks.put((future, fn))
            if self._idle > 0:
                self._idle -= 1  # an idle worker takes this task; count it busy now so the next submit can tell
            elif len(self._threads) < self.size:
                thread = threading.Thread(target=self._run, name=f"triton-worker-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()
        return future

    def run(self, fn: Callable[[_Worker], T]) -> T:
        return self.submit(fn).result()

    def _run(self) -> None:
        worker = _Worker(self)
        try:
            while True:
                task = self._tasks.get()
                if task is _STOP:
                    return
                future, fn = task
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(worker))
                    except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                        future.set_exception(exc)
                # The task's closure refers to the embedder: holding it while idle would keep it alive.
                del task, future, fn
                with self._lock:
                    self._idle += 1
        finally:
            try:
                worker.close()
            except Exception as exc:  # noqa: BLE001 - closing must not hide anything else
                log.warning("closing a Triton client for %s failed: %s", self.endpoint.label, exc)
            _release_gevent_hub()

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop every worker after the work already queued; each closes its client and shared memory."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._tasks.put(_STOP)
        deadline = time.monotonic() + timeout_s
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("a Triton worker for %s is still busy after %.0f s", self.endpoint.label, timeout_s)
