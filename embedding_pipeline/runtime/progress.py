"""Progress of long stages: a stage says how far it is, whoever listens shows it.

The ingest stages call :func:`report` as they go (items read, images decoded, embedded, rows written). Nobody
listening costs nothing. A Dagster step listens and logs a line every few seconds; ``embedding-pipeline ingest``
listens and draws a bar per stage on a terminal, or prints plain lines otherwise. Listeners are process-wide, so
a run executed in this process (the CLI's) reaches the terminal that started it.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator


@dataclass(frozen=True)
class Progress:
    """``done`` of ``total`` units (items, images, rows) of one stage, ``elapsed_s`` after it started."""

    stage: str
    done: int
    total: int
    elapsed_s: float
    unit: str = "images"

    @property
    def rate(self) -> float:
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the rate so far; None before anything is done."""
        return (self.total - self.done) / self.rate if self.rate > 0 else None

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    def line(self) -> str:
        """``embed: 320/1000 images (32%), 41.2 images/s, ETA 17 s``."""
        share = f" ({100 * self.done // self.total}%)" if self.total else ""
        eta = "" if self.finished or self.eta_s is None else f", ETA {self.eta_s:.0f} s"
        return f"{self.stage}: {self.done}/{self.total} {self.unit}{share}, {self.rate:.1f} {self.unit}/s{eta}"


Listener = Callable[[Progress], None]

log = logging.getLogger(__name__)

_listeners: list[Listener] = []
_lock = threading.Lock()


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Call ``listener`` with every report made while the block runs (in this process)."""
    with _lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _lock:
            if listener in _listeners:  # a listener that failed was taken out already
                _listeners.remove(listener)


class Stage:
    """One stage's counter: ``advance(n)`` after each unit of work reports the new total to every listener."""

    def __init__(self, name: str, total: int, unit: str = "images"):
        self.name, self.total, self.unit = name, total, unit
        self.done = 0
        self.started = time.monotonic()
        self.advance(0)

    def advance(self, n: int = 1) -> None:
        self.done += n
        with _lock:
            listeners = list(_listeners)
        if listeners:
            update = Progress(self.name, self.done, self.total, time.monotonic() - self.started, self.unit)
            for listener in listeners:
                try:
                    listener(update)
                except Exception as exc:  # noqa: BLE001 - showing progress must never fail the work it shows
                    with _lock:
                        if listener in _listeners:
                            _listeners.remove(listener)
                    log.warning("progress display stopped: %s: %s", type(exc).__name__, exc)


class Throttled:
    """A listener that passes on at most one report per ``every_s`` per stage, plus each stage's first and last."""

    def __init__(self, listener: Listener, every_s: float = 5.0):
        self.listener, self.every_s = listener, every_s
        self._last: dict[str, float] = {}

    def __call__(self, update: Progress) -> None:
        now = time.monotonic()
        last = self._last.get(update.stage)
        if last is None or update.finished or now - last >= self.every_s:
            self._last[update.stage] = now
            self.listener(update)
