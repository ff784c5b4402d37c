"""Coalescing concurrent calls (runtime.batching): every caller gets the answer to its own item or its own error,
batches never mix keys or exceed their size, and callers that arrive while a call runs go together in the next."""

import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedding_pipeline.runtime.batching import Coalescer


class Recorder:
    """A fake batched backend: answers item -> (key, item * 10), refuses negative items (the whole call fails, as
    an engine refusing one query of a batch does), and records each call and how many ran at once per key."""

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.calls: list[tuple[object, list[int]]] = []
        self.running: dict[object, int] = {}
        self.most_at_once: dict[object, int] = {}
        self.lock = threading.Lock()

    def __call__(self, key, items):
        with self.lock:
            self.calls.append((key, list(items)))
            self.running[key] = self.running.get(key, 0) + 1
            self.most_at_once[key] = max(self.most_at_once.get(key, 0), self.running[key])
        try:
            time.sleep(self.delay_s)
            if any(i < 0 for i in items):
                raise ValueError(f"refused: {[i for i in items if i < 0]}")
            return [(key, i * 10) for i in items]
        finally:
            with self.lock:
                self.running[key] -= 1


@settings(max_examples=40, deadline=None)
@given(
    requests=st.lists(st.tuples(st.sampled_from("ab"), st.integers(-3, 50)), min_size=1, max_size=24),
    max_batch=st.integers(1, 6),
    max_concurrent=st.integers(1, 3),
)
def test_each_caller_gets_its_own_answer_or_error(requests, max_batch, max_concurrent):
    backend = Recorder(delay_s=0.002)
    coalescer = Coalescer(backend, max_batch=max_batch, max_concurrent=max_concurrent)
    answers: dict[int, object] = {}
    start = threading.Barrier(len(requests))

    def call(n: int, key: str, item: int) -> None:
        start.wait()
        try:
            answers[n] = coalescer(key, item)
        except ValueError as exc:
            answers[n] = exc

    threads = [threading.Thread(target=call, args=(n, k, i)) for n, (k, i) in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for n, (key, item) in enumerate(requests):
        if item < 0:
            # Its own error, naming its own item only.
            assert isinstance(answers[n], ValueError) and str(answers[n]) == f"refused: [{item}]"
        else:
            assert answers[n] == (key, item * 10)
    for key, items in backend.calls:
        assert len(items) <= max_batch
        assert all(any(k == key and i == item for k, i in requests) for item in items)
    assert all(most <= max_concurrent for most in backend.most_at_once.values())
    # Nothing is left behind for the keys used.
    assert not coalescer._pending and not coalescer._running


def test_callers_arriving_during_a_call_go_together_in_the_next():
    release = threading.Event()
    calls: list[list[int]] = []

    def run(key, items):
        calls.append(list(items))
        if len(calls) == 1:
            release.wait(10)
        return [i + 1 for i in items]

    coalescer = Coalescer(run, max_batch=32, max_concurrent=1)
    results: dict[int, int] = {}
    first = threading.Thread(target=lambda: results.__setitem__(0, coalescer("k", 0)))
    first.start()
    while not calls:
        time.sleep(0.001)
    later = [threading.Thread(target=lambda n=n: results.__setitem__(n, coalescer("k", n))) for n in range(1, 6)]
    for t in later:
        t.start()
    while sum(len(q) for q in coalescer._pending.values()) < 5:
        time.sleep(0.001)
    release.set()
    for t in [first, *later]:
        t.join(10)
    assert results == {n: n + 1 for n in range(6)}
    assert calls[0] == [0] and sorted(calls[1]) == [1, 2, 3, 4, 5] and len(calls) == 2
    assert (coalescer.calls, coalescer.items) == (2, 6)


def test_a_lone_call_runs_at_once_and_bad_limits_are_refused():
    coalescer = Coalescer(lambda key, items: [i * 2 for i in items])
    assert coalescer("k", 21) == 42 and coalescer.calls == 1
    with pytest.raises(ValueError):
        Coalescer(lambda key, items: items, max_batch=0)


def test_a_backend_answering_the_wrong_count_fails_each_caller_clearly():
    coalescer = Coalescer(lambda key, items: [])
    with pytest.raises(RuntimeError, match="returned 0 results for 1 items"):
        coalescer("k", 1)
