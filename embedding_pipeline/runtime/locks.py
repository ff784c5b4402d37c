"""Advisory file locks across processes (runtime layer: every other layer may use them).

Dagster runs each step in its own process, the CLI and retention run in others: whatever must not interleave takes
one of these. They are ``flock`` locks on files under the state directory, so they hold on one machine; a
deployment whose runs are spread over several machines serialises the index writes with the ``milvus`` concurrency
pool instead (see docs/operations.md).
"""

from __future__ import annotations

import fcntl
import hashlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def file_lock(path: Path, shared: bool = False) -> Iterator[None]:
    """Exclusive (or, with ``shared``, shared) advisory lock on ``path`` across processes (created with its folder
    when missing). Shared holders exclude exclusive ones, not each other."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def membership_lock(locks_dir: Path):  # noqa: ANN201 - a context manager
    """Held while rows' drop membership is read and rewritten (the index stage, deleting a drop): two drops listing
    the same image must not each read the row, add or remove themselves, and write back over the other."""
    return file_lock(locks_dir / "membership.lock")


def drop_lock(locks_dir: Path, drop: str, shared: bool = False):  # noqa: ANN201 - a context manager
    """Held by every ingest stage of ``drop`` while it reads and writes the drop's files and rows, and by retention
    while it deletes the drop: a deletion never interleaves with a stage of the same drop, whether the stage runs
    in a Dagster run, the CLI or a test.

    The lock file is named by a hash of the drop's name: it holds nothing of the drop and outlives its deletion
    (removing a lock file that others may be waiting on would let two holders in).

    ``shared``: the shards of one stage, running in parallel processes, hold it together; retention (exclusive)
    still waits for all of them."""
    digest = hashlib.sha256(drop.encode()).hexdigest()[:24]
    return file_lock(locks_dir / "drops" / f"{digest}.lock", shared)
