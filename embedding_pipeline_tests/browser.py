"""Debian's headless Chromium, driven by Playwright, for checking what the Dagster UI really renders.

Playwright only drives the system browser (``/usr/bin/chromium``); it never downloads one. The browser runs with
a fresh profile and resolves no host but 127.0.0.1, so a page can only talk to the local webserver.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import requests

CHROMIUM = Path("/usr/bin/chromium")
# Set in CI, where the system packages are installed on purpose: a missing browser is then a failure, not a skip.
REQUIRE_ENV = "EMBEDDING_PIPELINE_REQUIRE_SYSTEM_PACKAGES"
ARTIFACTS_ENV = "EMBEDDING_PIPELINE_ARTIFACTS"
REPO_ROOT = Path(__file__).resolve().parents[1]

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Nothing but the local webserver resolves: a page cannot reach the network, whatever it links to.
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]


def require_chromium() -> Path:
    """The browser binary; skips the test when it is missing, unless system packages are required."""
    missing = None
    if not CHROMIUM.is_file():
        missing = f"{CHROMIUM} is missing (install Debian's chromium package)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            missing = "the playwright package is missing (pip install -e '.[test]')"
    if missing is not None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{missing}, and {REQUIRE_ENV}=1 requires it")
        pytest.skip(missing)
    return CHROMIUM


def artifacts_dir(name: str) -> Path:
    """Where screenshots go: ``$EMBEDDING_PIPELINE_ARTIFACTS/<name>`` or ``test-artifacts/<name>`` at the repo root."""
    root = Path(os.environ.get(ARTIFACTS_ENV) or REPO_ROOT / "test-artifacts")
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def dismiss_welcome(base_url: str) -> None:
    """Mark the UI's first-visit modal as seen; it covers every page on a fresh instance otherwise."""
    answer = requests.post(f"{base_url}/graphql", json={"query": "mutation { setNuxSeen }"}, timeout=30)
    answer.raise_for_status()
    assert answer.json()["data"]["setNuxSeen"] is True, answer.text


@contextmanager
def chromium_page(width: int = 1440, height: int = 1000) -> Iterator["Page"]:  # noqa: F821 - playwright's Page
    """A page of a headless Chromium with a throw-away profile; the browser and profile go when the block ends."""
    from playwright.sync_api import sync_playwright

    binary = require_chromium()
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                profile,
                executable_path=str(binary),
                headless=True,
                args=CHROMIUM_FLAGS,
                viewport={"width": width, "height": height},
            )
            try:
                page = context.pages[0] if context.pages else context.new_page()
                page.set_default_timeout(60_000)
                yield page
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def rendered_images(page, within: str = "body") -> list[dict]:
    """The <img> elements under ``within`` with their alt text, natural size and whether they finished loading."""
    return page.locator(within).first.evaluate(
        """root => Array.from(root.querySelectorAll('img')).map(img => ({
            alt: img.alt, naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight,
            complete: img.complete, dataUri: img.src.startsWith('data:image/')}))"""
    )
