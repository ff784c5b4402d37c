"""Triton *system shared memory* regions: tensors handed to a server on this host without going through a socket.

A region is a POSIX shared memory object (``/dev/shm``) that the client creates and fills, and registers with the
server under a name; a request then says "input X is N bytes at offset 0 of region R" instead of carrying the
bytes. Only a server that can open the same ``/dev/shm`` (same host, same IPC namespace) can use it, which is why
registration doubles as the check that shared memory works at all.

Each region belongs to one client connection, lives as long as that connection, and is unregistered and unlinked
on close. Names carry the process id and a random token, so several pipelines (and several embedders in one
process) never collide on one server. Should the process die, Python's resource tracker unlinks the memory; the
server's stale registration costs nothing and goes with the server.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import time
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

_PREFIX = "embedding_pipeline"
_TOKEN = secrets.token_hex(4)
_COUNTER = itertools.count()


class RegistersSharedMemory(Protocol):
    """The two calls a region needs from a Triton client (HTTP and gRPC clients both have them)."""

    def register_system_shared_memory(self, name: str, key: str, byte_size: int) -> Any: ...

    def unregister_system_shared_memory(self, name: str) -> Any: ...


def unique_region_name(role: str) -> str:
    """A region name no other process or embedder uses, e.g. ``embedding_pipeline_4242_1a2b3c4d_7_input``."""
    return f"{_PREFIX}_{os.getpid()}_{_TOKEN}_{next(_COUNTER)}_{role}"


class SharedMemoryRegion:
    """One registered system shared memory region of at least ``byte_size`` bytes.

    ``create`` makes the memory and registers it with ``client``; any failure leaves nothing behind (the memory
    is unlinked again) and raises. ``close`` unregisters (best effort: the server may be gone) and unlinks.
    """

    def __init__(self, name: str, handle: Any, byte_size: int) -> None:
        self.name = name
        self.key = f"/{name}"
        self.byte_size = byte_size
        self._handle = handle
        self._client: RegistersSharedMemory | None = None

    @classmethod
    def create(cls, client: RegistersSharedMemory, byte_size: int, role: str) -> "SharedMemoryRegion":
        import tritonclient.utils.shared_memory as shm

        name = unique_region_name(role)
        # create_only: never adopt (and later unlink) memory that someone else made under this name.
        handle = shm.create_shared_memory_region(name, f"/{name}", byte_size, create_only=True)
        region = cls(name, handle, byte_size)
        try:
            client.register_system_shared_memory(name, region.key, byte_size)
        except BaseException:
            region._destroy()
            raise
        region._client = client
        return region

    def write(self, array: np.ndarray) -> int:
        """Copy ``array`` to the start of the region; returns its size in bytes."""
        import tritonclient.utils.shared_memory as shm

        if array.nbytes > self.byte_size:
            raise ValueError(f"{array.nbytes} bytes do not fit shared memory region {self.name} ({self.byte_size})")
        shm.set_shared_memory_region(self._handle, [np.ascontiguousarray(array)])
        return array.nbytes

    def read(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """A copy of the region's first bytes as an array (a copy: the region is reused by the next request)."""
        import tritonclient.utils.shared_memory as shm

        view = shm.get_contents_as_numpy(self._handle, np.dtype(dtype), list(shape))
        out = np.array(view, copy=True)
        del view  # a live view would keep the mapping from closing
        return out

    def close(self) -> None:
        """Unregister from the server (if it still answers) and unlink the memory; safe to call twice."""
        client, self._client = self._client, None
        attempts = 3 if client is not None else 0
        for attempt in range(attempts):
            assert client is not None  # attempts is 0 without one
            try:
                client.unregister_system_shared_memory(self.name)
                break
            except Exception as exc:  # noqa: BLE001 - the server may be gone; the memory is still ours to free
                # Tried again: a busy server can miss a call, and a region left registered outlives us there.
                last = attempt == attempts - 1
                (log.warning if last else log.debug)(
                    "could not unregister shared memory region %s (attempt %d): %s", self.name, attempt + 1, exc
                )
                if not last:
                    time.sleep(0.2 * (attempt + 1))
        self._destroy()

    def _destroy(self) -> None:
        import tritonclient.utils.shared_memory as shm

        handle, self._handle = self._handle, None
        if handle is not None:
            shm.destroy_shared_memory_region(handle)
