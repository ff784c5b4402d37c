"""Calls that arrive together, made as one: concurrent single queries become one batched call.

A search engine or a model server answers eight queries in one call for little more than the price of one (the
embedded Milvus spends most of a search on per-call work that does not depend on how many queries the call
carries; a Triton model runs a batch of eight in about the time of two single images). :class:`Coalescer` turns
concurrent callers into such calls without a timer: a call runs at once when a slot is free, and the callers
that arrive while all slots are busy wait and are then taken together by the next caller that gets a slot (what
databases call group commit). A lone caller therefore never waits for company, and the batches grow exactly as
far as the load makes them.

Only calls with the same key share a batch (the key says what must agree: top-k, filter, parameters; the input's
shape). One bad item must not fail the others: when a batched call raises, each item of it is retried alone, so
every caller gets its own answer or its own error.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class _Waiting(Generic[Item, Result]):
    __slots__ = ("item", "taken", "answered", "done", "result", "error")

    def __init__(self, item: Item):
        self.item = item
        self.taken = False
        self.answered = False  # result or error set
        self.done = threading.Event()
        self.result: Result | None = None
        self.error: BaseException | None = None


class Coalescer(Generic[Item, Result]):
    """``coalescer(key, item)`` returns ``run(key, items)[k]`` for its item, made in one call with the items of
    callers that waited with it. At most ``max_concurrent`` calls per key run at once, each with at most
    ``max_batch`` items. ``run`` must return one result per item, in order."""

    def __init__(
        self,
        run: Callable[[Hashable, list[Item]], Sequence[Result]],
        max_batch: int = 32,
        max_concurrent: int = 1,
    ):
        if max_batch < 1 or max_concurrent < 1:
            raise ValueError("max_batch and max_concurrent must be at least 1")
        self._run = run
        self.max_batch = max_batch
        self.max_concurrent = max_concurrent
        self._cond = threading.Condition()
        self._pending: dict[Hashable, deque[_Waiting[Item, Result]]] = {}
        self._running: dict[Hashable, int] = {}
        self.calls = 0  # calls made, for figures and tests
        self.items = 0  # items answered by them

    def __call__(self, key: Hashable, item: Item) -> Result:
        me: _Waiting[Item, Result] = _Waiting(item)
        with self._cond:
            self._pending.setdefault(key, deque()).append(me)
        while True:
            with self._cond:
                while not me.taken and self._running.get(key, 0) >= self.max_concurrent:
                    self._cond.wait()
                if me.taken:
                    break
                queue = self._pending[key]
                batch = [queue.popleft() for _ in range(min(len(queue), self.max_batch))]
                for waiting in batch:
                    waiting.taken = True
                self._running[key] = self._running.get(key, 0) + 1
            try:
                self._execute(key, batch)
            finally:
                with self._cond:
                    self._running[key] -= 1
                    if not self._running[key]:
                        del self._running[key]
                        if not self._pending.get(key, True):
                            del self._pending[key]
                    self._cond.notify_all()
            if me.taken:
                break
        me.done.wait()
        if me.error is not None:
            raise me.error
        return me.result  # type: ignore[return-value]  # set with done, unless error is

    def _execute(self, key: Hashable, batch: list[_Waiting[Item, Result]]) -> None:
        try:
            try:
                results = self._run(key, [w.item for w in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"a batched call returned {len(results)} results for {len(batch)} items")
                for waiting, result in zip(batch, results):
                    waiting.result, waiting.answered = result, True
                with self._cond:
                    self.calls += 1
                    self.items += len(batch)
            except Exception as exc:  # noqa: BLE001 - handed to the caller(s) below
                if len(batch) == 1:
                    batch[0].error, batch[0].answered = exc, True
                else:
                    # One bad item must not fail the others: each alone, with its own answer or error.
                    for waiting in batch:
                        try:
                            waiting.result = self._run(key, [waiting.item])[0]
                        except Exception as alone:  # noqa: BLE001 - this caller's own error
                            waiting.error = alone
                        waiting.answered = True
        except BaseException as exc:  # interrupted: no caller may wait forever
            for waiting in batch:
                if not waiting.answered:
                    waiting.error, waiting.answered = exc, True
            raise
        finally:
            for waiting in batch:
                waiting.done.set()
