"""``embedding-pipeline bench ingest``: peak memory and throughput of ingesting a synthetic drop end to end
(manifest → JAX preprocessing → Triton → Milvus) in one pipeline process, for a small and a large drop.

Each drop runs in a fresh child process (the Dagster job executed in-process, exactly as `ingest` does) and
reports its own peak RSS, so the two figures compare like with like: flat memory means the large drop peaks
where the small one does. The runs use a temporary state directory and their own Milvus collection, which is
dropped at the end; Triton and Milvus are the configured servers (local ones started for the run and stopped
after it, unless they were already running).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from embedding_pipeline.bench import synthetic
from embedding_pipeline.settings import Settings, load_settings

COLLECTION = "bench_ingest"


def _child(path: str, drop: str) -> None:
    """Runs inside the child: ingest one drop, print the summary with this process's peak RSS."""
    from embedding_pipeline.orchestration import runs

    started = time.perf_counter()
    summary = runs.ingest(load_settings(), Path(path), drop)
    summary["seconds"] = time.perf_counter() - started
    summary["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    summary.pop("failures", None)
    print(json.dumps(summary))


def _ingest_in_child(settings: Settings, home: Path, folder: Path, drop: str) -> dict[str, Any]:
    env = dict(os.environ)
    env.update(
        EMBEDDING_PIPELINE_HOME=str(home),
        EMBEDDING_PIPELINE_CACHE=str(settings.paths.cache),
        TRITON_URL=settings.triton.url,
        MILVUS_URI=settings.milvus.uri,
        MILVUS_COLLECTION=COLLECTION,
    )
    env.pop("EMBEDDING_PIPELINE_DROPS", None)
    code = f"from embedding_pipeline.bench.ingest import _child; _child({str(folder)!r}, {drop!r})"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ingest of {drop} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(settings: Settings, images: int = 5000, baseline_images: int = 500) -> dict[str, Any]:
    from embedding_pipeline import services
    from embedding_pipeline.index.collections import ModelCollections

    started = services.start_services(settings)
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=settings.paths.root))
    results = {}
    try:
        for count in (baseline_images, images):
            folder = synthetic.write_drop(work / "sources" / f"synthetic-{count}", count, seed=count)
            results[count] = _ingest_in_child(settings, work / f"home-{count}", folder, f"synthetic-{count}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        # The alias and every per-model collection behind it.
        collections = ModelCollections(settings.milvus.model_copy(update={"collection": COLLECTION}))
        try:
            collections.drop_all()
        finally:
            collections.close()
            services.stop_services(settings, only=started)  # leave running what was running before
    small, large = results[baseline_images], results[images]
    return {
        "images": images,
        "baseline_images": baseline_images,
        "ok": large["ok"],
        "success": large["success"] and small["success"],
        "seconds": round(large["seconds"], 1),
        "images_per_s": round(large["ok"] / large["seconds"], 1),
        "peak_rss_mb": round(large["peak_rss_mb"], 1),
        "baseline_peak_rss_mb": round(small["peak_rss_mb"], 1),
        "rss_ratio": round(large["peak_rss_mb"] / small["peak_rss_mb"], 2),
        "limit_mb": 1536,
    }


def render(r: dict[str, Any]) -> str:
    big, small = f"{r['images']} images", f"{r['baseline_images']} images (baseline)"
    width = max(len(big), len(small)) + 12
    return "\n".join(
        [
            f"Ingest benchmark: synthetic 640x480 JPEG drops, one pipeline process each (success: {r['success']})",
            f"  {r['images']} images: {r['seconds']} s end to end, {r['images_per_s']} images/s, {r['ok']} indexed",
            f"  {'peak RSS, ' + big:<{width}} {r['peak_rss_mb']:>8.1f} MB   (limit {r['limit_mb']} MB)",
            f"  {'peak RSS, ' + small:<{width}} {r['baseline_peak_rss_mb']:>8.1f} MB",
            f"  {'ratio':<{width}} {r['rss_ratio']:>8.2f} x    (flat memory: ~1)",
        ]
    )
