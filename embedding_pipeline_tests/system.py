"""Skipping a test for a missing system tool, honestly: where the run says everything must be there
(``EMBEDDING_PIPELINE_REQUIRE_SYSTEM_PACKAGES=1``, as CI sets it), a missing tool fails the test instead."""

from __future__ import annotations

import os

import pytest

REQUIRE_ENV = "EMBEDDING_PIPELINE_REQUIRE_SYSTEM_PACKAGES"


def missing(problem: str) -> None:
    """Skip (or, when required, fail) the calling test because of ``problem``."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{problem}, and {REQUIRE_ENV}=1 requires it")
    pytest.skip(problem)
