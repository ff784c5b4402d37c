"""The configuration the pipeline sets on the embedded milvus-lite server it starts, observed on real servers:
the memtable limit reaches the engine, and decides how many segments a drop's rows become (each segment is
indexed on its own, and merged segments are indexed again)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embedding_pipeline.index.client import ImageIndex
from embedding_pipeline.index.server import NAME, start_milvus, stop_milvus
from embedding_pipeline.runtime import processes
from embedding_pipeline_tests.integration.milvus_servers import lite_settings

pytestmark = pytest.mark.integration

DIM = 1280
ROWS = 6000  # about 31 MB of vectors: more than a 16 MiB memtable holds, far less than the default


def _segments(data: Path, collection: str) -> list[Path]:
    return [p for p in data.rglob("*.parquet") if collection in str(p) and "/data/" in str(p)]


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


@pytest.mark.parametrize("memtable_mb, at_least, at_most", [(16, 2, ROWS), (1024, 1, 1)])
def test_the_memtable_limit_reaches_the_engine_and_sets_how_a_drop_is_cut(tmp_path, memtable_mb, at_least, at_most):
    base = lite_settings(tmp_path / "home")
    settings = base.model_copy(update={"milvus": base.milvus.model_copy(update={"lite_memtable_mb": memtable_mb})})
    start_milvus(settings)
    try:
        pid = processes.read(settings.paths.run, NAME).pid
        env = _environ(pid)
        limit = memtable_mb * 1024 * 1024
        assert env["MILVUS_LITE_MEMTABLE_MEMORY_LIMIT_BYTES"] == str(limit)
        assert env["MILVUS_LITE_WAL_SIZE_LIMIT_BYTES"] == str(2 * limit)
        vectors = np.random.default_rng(1).normal(size=(ROWS, DIM)).astype(np.float32)
        rows = [
            {"id": f"r{i}", "embedding": v, "uri": "", "sha256": "", "drop": "d", "model": "m", "metadata": {"n": i}}
            for i, v in enumerate(vectors)
        ]
        name = "engine_config"
        with ImageIndex(settings.milvus.model_copy(update={"collection": name, "index_type": "FLAT"})) as index:
            index.ensure_collection(DIM)
            assert index.upsert(rows) == ROWS
            index.flush()  # what the index stage does at the end of a drop
            assert index.count(consistency_level="Strong") == ROWS
            segments = _segments(settings.paths.milvus_data, name)
            assert at_least <= len(segments) <= at_most, [p.name for p in segments]
            # Every row is found whatever the cut: the last one, by its own vector.
            assert index.search(vectors[-1], top_k=1)[0][0].id == f"r{ROWS - 1}"
    finally:
        stop_milvus(settings)
