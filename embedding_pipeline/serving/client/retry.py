"""Retry policy: which failures another attempt may fix, and exponential backoff between attempts."""

from __future__ import annotations

import http.client
import logging
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from embedding_pipeline.serving.client.errors import TritonClientError

# One logger for the whole client, named after the package.
log = logging.getLogger(__package__)

T = TypeVar("T")

# A single backoff never exceeds this, however many retries are configured.
MAX_BACKOFF_S = 30.0
# gRPC status codes worth another attempt: the server or the path to it was down, slow or broken.
_RETRYABLE_GRPC = {
    "StatusCode.UNAVAILABLE",
    "StatusCode.DEADLINE_EXCEEDED",
    "StatusCode.INTERNAL",
    "StatusCode.ABORTED",
}
# 5xx codes that mean "this server will never do that", not "try again".
_PERMANENT_5XX = {"501", "505"}


def is_retryable(exc: BaseException) -> bool:
    """True for failures another attempt may fix: connection errors, timeouts, 5xx, gRPC UNAVAILABLE & co."""
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, InferenceServerException):
        status = str(exc.status() or "")
        if status.startswith("StatusCode."):
            return status in _RETRYABLE_GRPC
        return len(status) == 3 and status.startswith("5") and status not in _PERMANENT_5XX
    # OSError covers refused/reset connections and socket timeouts; HTTPException a response cut off mid-way.
    return isinstance(exc, (OSError, http.client.HTTPException))


def describe_error(exc: BaseException) -> str:
    """A one-line account of a failure: ``HTTP 503: ...``, ``gRPC UNAVAILABLE: ...`` or ``TimeoutError: ...``."""
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, InferenceServerException):
        status = str(exc.status() or "")
        message = str(exc.message() or "").strip()
        if status.startswith("StatusCode."):
            return f"gRPC {status.removeprefix('StatusCode.')}: {message}"
        return f"HTTP {status}: {message}" if status else message
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class RetryPolicy:
    """Attempt an action up to ``retries + 1`` times, sleeping ``backoff_s * 2**n`` (at most 30 s) in between."""

    retries: int = 3
    backoff_s: float = 0.5
    sleep: Callable[[float], None] = time.sleep

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (0-based)."""
        return min(self.backoff_s * 2**attempt, MAX_BACKOFF_S)

    def run(self, action: Callable[[], T], what: str, where: str) -> T:
        """``action()``, retried on retryable failures; raises :class:`TritonClientError` naming ``where``."""
        for attempt in range(self.retries + 1):
            try:
                return action()
            except Exception as exc:  # noqa: BLE001 - classified below, re-raised as TritonClientError
                retryable = is_retryable(exc)
                if not retryable or attempt == self.retries:
                    tries = attempt + 1
                    raise TritonClientError(
                        f"{what} failed for {where} after {tries} attempt{'s' if tries > 1 else ''}: "
                        f"{describe_error(exc)}",
                        attempts=tries,
                        retryable=retryable,
                    ) from exc
                log.info("%s failed for %s (attempt %d), retrying: %s", what, where, attempt + 1, describe_error(exc))
                self.sleep(self.delay(attempt))
        raise AssertionError("unreachable")
