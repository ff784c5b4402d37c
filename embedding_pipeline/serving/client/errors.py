"""The error every failed request to Triton raises."""

from __future__ import annotations


class TritonClientError(RuntimeError):
    """A request to Triton failed; the message names the endpoint, the model and (after retries) the attempts."""

    def __init__(self, message: str, attempts: int = 1, retryable: bool = False) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.retryable = retryable
