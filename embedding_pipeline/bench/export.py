"""``embedding-pipeline bench export``: throughput and peak memory of the Parquet export of a whole collection.

A fresh milvus-lite (a temporary home, :class:`BenchHome`) gets ``rows`` synthetic unit vectors (1280-d by default,
the default model's size) with the fields the pipeline writes; then the export runs in a child process that reports
its own memory: resident size after its imports, and the high-water mark after the export. The reference, in the
same run, is the size of the exported vectors held in memory at once (rows × dim × 4 bytes): streaming keeps the
growth a small, fixed fraction of it, whatever the collection's size.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from embedding_pipeline.bench.corpus import fill_synthetic
from embedding_pipeline.bench.seed import index_overrides
from embedding_pipeline.bench.servers import BenchHome, wait_until_idle
from embedding_pipeline.settings import MilvusSettings, Settings

DEFAULT_ROWS = 100_000
DIM = 1280
COLLECTION = "bench_export"
INSERT_CHUNK = 10_000  # rows generated and upserted per step: the parent never holds the whole collection


def _memory_kib(key: str) -> int:
    """A VmRSS / VmHWM figure of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def _child() -> None:
    """Runs inside the child: export the collection named on stdin, print the summary and this process's memory."""
    spec = json.loads(sys.stdin.read())
    import numpy  # noqa: F401 - imported before the baseline, like everything the export uses
    import pyarrow.parquet  # noqa: F401
    import pymilvus  # noqa: F401

    from embedding_pipeline.export import export_embeddings

    milvus = MilvusSettings.model_validate(spec["milvus"])
    before = _memory_kib("VmRSS")
    summary = export_embeddings(milvus, Path(spec["out"]), all_rows=True, collection=spec["collection"])
    print(json.dumps({**summary.as_dict(), "rss_before_kib": before, "hwm_after_kib": _memory_kib("VmHWM")}))


def _export_in_child(milvus: MilvusSettings, out: Path) -> dict[str, Any]:
    spec = {"milvus": milvus.model_dump(mode="json"), "out": str(out), "collection": COLLECTION}
    code = "from embedding_pipeline.bench.export import _child; _child()"
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(spec), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the export failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _insert(milvus: MilvusSettings, rows: int, dim: int) -> float:
    """Create the collection and upsert ``rows`` synthetic rows a chunk at a time; returns the seconds it took."""
    import numpy as np

    from embedding_pipeline.index.client import ImageIndex

    started = time.perf_counter()
    with ImageIndex(milvus, model_label="bench:1@synthetic") as index:
        index.ensure_collection(dim)
        for start in range(0, rows, INSERT_CHUNK):
            vectors = fill_synthetic(np.empty((min(INSERT_CHUNK, rows - start), dim), dtype=np.float32), start)
            batch = [
                {
                    "id": f"v{start + i:07d}",
                    "embedding": vector,
                    "uri": f"bench://synthetic/{start + i}",
                    "sha256": f"{start + i:064x}",
                    "drop": "bench",
                    "model": "bench:1@synthetic",
                    "metadata": {"n": start + i, "kind": "synthetic"},
                }
                for i, vector in enumerate(vectors)
            ]
            done = index.upsert(batch)
            if done != len(batch):
                raise RuntimeError(f"upserted {done} of {len(batch)} rows into {COLLECTION!r}")
        index.flush()
    return time.perf_counter() - started


def run(settings: Settings, rows: int = DEFAULT_ROWS, dim: int = DIM) -> dict[str, Any]:
    if rows < 1:
        raise ValueError(f"--rows must be positive, not {rows}")
    with BenchHome(settings) as home, home.milvus("lite", "export") as (milvus, pid):
        assert home.root is not None
        # No vector index is searched here: FLAT keeps the server from building one while the export runs.
        milvus = milvus.model_copy(update={"collection": COLLECTION, **index_overrides(milvus, "FLAT")})
        insert_s = _insert(milvus, rows, dim)
        if pid is not None:
            wait_until_idle(pid)  # background segment work after the flush would share the cores with the export
        figures = _export_in_child(milvus, home.root / "export.parquet")
    if figures["rows"] != rows:
        raise RuntimeError(f"exported {figures['rows']} of {rows} rows")
    vectors_mb = rows * dim * 4 / 2**20
    growth_mb = max(figures["hwm_after_kib"] - figures["rss_before_kib"], 0) / 1024
    return {
        "rows": rows,
        "dim": dim,
        "insert_seconds": round(insert_s, 1),
        "insert_rows_per_s": round(rows / insert_s, 1),
        "export_seconds": round(figures["seconds"], 2),
        "export_rows_per_s": round(rows / figures["seconds"], 1),
        "file_mb": round(figures["bytes"] / 2**20, 1),
        "row_groups": figures["row_groups"],
        "rss_before_mb": round(figures["rss_before_kib"] / 1024, 1),
        "peak_rss_mb": round(figures["hwm_after_kib"] / 1024, 1),
        "peak_rss_growth_mb": round(growth_mb, 1),
        "vectors_in_memory_mb": round(vectors_mb, 1),
        "memory_ratio": round(growth_mb / vectors_mb, 3),
    }


def render(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"Export benchmark: {r['rows']} rows x {r['dim']}-d, fresh milvus-lite to Parquet, in a child process",
            f"  insert (setup)            {r['insert_seconds']:>9.1f} s     {r['insert_rows_per_s']:>9.1f} rows/s",
            f"  export                    {r['export_seconds']:>9.2f} s     {r['export_rows_per_s']:>9.1f} rows/s   "
            f"({r['file_mb']} MB file, {r['row_groups']} row groups)",
            f"  peak RSS of the export    {r['peak_rss_mb']:>9.1f} MB    (after imports: {r['rss_before_mb']} MB)",
            f"  peak RSS growth           {r['peak_rss_growth_mb']:>9.1f} MB",
            f"  vectors in memory         {r['vectors_in_memory_mb']:>9.1f} MB    (reference: rows x dim x 4 bytes)",
            f"  ratio                     {r['memory_ratio']:>9.3f}       (growth / all vectors; streaming: << 1)",
        ]
    )
