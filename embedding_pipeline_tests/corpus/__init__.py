"""The bad-input corpus: checked-in files, a manifest template and the expected outcome of every case."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from embedding_pipeline_tests.corpus.make_corpus import EXPECTED, FILES, TEMPLATE, case_of


def template_rows() -> list[dict[str, Any]]:
    return [json.loads(line) for line in TEMPLATE.read_text().splitlines() if line.strip()]


def expected() -> dict[str, dict[str, Any]]:
    return json.loads(EXPECTED.read_text())


def build_drop(drop: Path, server_url: str, private_url: str, outside: Path) -> Path:
    """The corpus as a folder drop: its files, the manifest with the two servers' URLs filled in, and the
    cases that are brittle to check in (a directory, a symlink pointing into ``outside``)."""
    shutil.copytree(FILES, drop)
    (drop / "a-directory").mkdir()
    outside.mkdir(parents=True, exist_ok=True)
    shutil.copy(FILES / "good-photo.jpg", outside / "cat.jpg")
    os.symlink(outside / "cat.jpg", drop / "escape-link.jpg")
    text = TEMPLATE.read_text().replace("{server}", server_url).replace("{private}", private_url)
    (drop / "manifest.jsonl").write_text(text)
    return drop


__all__ = ["build_drop", "case_of", "expected", "template_rows", "FILES"]
