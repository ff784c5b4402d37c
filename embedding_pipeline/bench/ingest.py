"""``embedding-pipeline bench ingest``: peak memory and throughput of ingesting a synthetic drop end to end
(manifest → JAX preprocessing → Triton → Milvus) in one pipeline process, for a small and a large drop.

Each drop runs in a fresh child process (the Dagster job executed in-process, exactly as `ingest` does) and
reports its own peak RSS, so the two figures compare like with like: flat memory means the large drop peaks
where the small one does. The runs use a temporary state directory and their own Milvus collection, which is
dropped at the end; Triton and Milvus are the configured servers (local ones started for the run and stopped
after it, unless they were already running).

``--drops-uri s3://bucket/prefix`` adds the same large drop read from that bucket with its stage outputs written
there too (under a hidden ``.bench-outputs-*`` prefix, removed after), and ``--shard-items N`` the same large drop
from local disk split into shards of N items that run in parallel processes (ingest_drop_sharded). Each is
printed as images/s and peak RSS next to the local, unsharded run of the same drop, with the ratio.
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
    """Runs inside the child: ingest one drop, print the summary with the peak RSS of this process and of the
    step processes it started (a sharded run's steps run in children)."""
    from embedding_pipeline.orchestration import runs

    started = time.perf_counter()
    summary = runs.ingest(load_settings(), path, drop)
    summary["seconds"] = time.perf_counter() - started
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    summary["peak_rss_mb"] = peak / 1024  # KiB on Linux
    summary.pop("failures", None)
    print(json.dumps(summary))


def _ingest_in_child(
    settings: Settings, home: Path, folder: Path | str, drop: str, extra_env: dict[str, str] | None = None
) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("EMBEDDING_PIPELINE_DROPS", None)
    env.pop("EMBEDDING_PIPELINE_OUTPUTS", None)
    env.update(
        EMBEDDING_PIPELINE_HOME=str(home),
        EMBEDDING_PIPELINE_CACHE=str(settings.paths.cache),
        TRITON_URL=settings.triton.url,
        MILVUS_URI=settings.milvus.uri,
        MILVUS_COLLECTION=COLLECTION,
    )
    env.update(extra_env or {})  # overrides (another collection, a resize policy, drops in a bucket)
    code = f"from embedding_pipeline.bench.ingest import _child; _child({str(folder)!r}, {drop!r})"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ingest of {drop} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(
    settings: Settings,
    images: int = 5000,
    baseline_images: int = 500,
    drops_uri: str | None = None,
    shard_items: int | None = None,
) -> dict[str, Any]:
    from embedding_pipeline import services
    from embedding_pipeline.index.collections import ModelCollections

    started = services.start_services(settings)
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=settings.paths.root))
    results: dict[Any, dict[str, Any]] = {}
    cleanup: list[Any] = []
    try:
        for count in (baseline_images, images):
            folder = synthetic.write_drop(work / "sources" / f"synthetic-{count}", count, seed=count)
            results[count] = _ingest_in_child(settings, work / f"home-{count}", folder, f"synthetic-{count}")
        source = work / "sources" / f"synthetic-{images}"
        if shard_items:
            env = {"EMBEDDING_PIPELINE_SHARD_ITEMS": str(shard_items)}
            results["sharded"] = _ingest_in_child(settings, work / "home-sharded", source, "sharded", env)
        if drops_uri:
            results["s3"] = _ingest_from_bucket(settings, work, source, drops_uri, cleanup)
    finally:
        for undo in cleanup:
            undo()
        shutil.rmtree(work, ignore_errors=True)
        # The alias and every per-model collection behind it.
        collections = ModelCollections(settings.milvus.model_copy(update={"collection": COLLECTION}))
        try:
            collections.drop_all()
        finally:
            collections.close()
            services.stop_services(settings, only=started)  # leave running what was running before
    small, large = results[baseline_images], results[images]
    out: dict[str, Any] = {
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
    for key in ("sharded", "s3"):
        if key in results:
            r = results[key]
            out[key] = {
                "success": r["success"],
                "ok": r["ok"],
                "job": r.get("job"),
                "seconds": round(r["seconds"], 1),
                "images_per_s": round(r["ok"] / r["seconds"], 1),
                "peak_rss_mb": round(r["peak_rss_mb"], 1),
                "speed_vs_local": round((r["ok"] / r["seconds"]) / out["images_per_s"], 2),
            }
            out["success"] = out["success"] and r["success"]
    if "sharded" in out:
        out["sharded"]["shard_items"] = shard_items
    if "s3" in out:
        out["s3"]["drops_uri"] = drops_uri
        out["s3"]["target_vs_local"] = 0.8
    return out


def _ingest_from_bucket(settings: Settings, work: Path, folder: Path, drops_uri: str, cleanup: list) -> dict[str, Any]:
    """The same drop uploaded under ``drops_uri``, ingested from there with its outputs in the same bucket."""
    import uuid

    from embedding_pipeline.settings import object_store
    from embedding_pipeline.sources.drops import place_drop

    tag = uuid.uuid4().hex[:8]
    store = object_store(settings.s3)
    drops = store.path(drops_uri)
    name = f"bench-{tag}"
    outputs = drops / f".bench-outputs-{tag}"
    cleanup.append(lambda: store.delete_prefix(drops.bucket, (drops / name).prefix))
    cleanup.append(lambda: store.delete_prefix(outputs.bucket, outputs.prefix))
    place_drop(drops, folder, name)  # uploaded before the clock starts, like a local drop written before it
    env = {"EMBEDDING_PIPELINE_DROPS": drops_uri, "EMBEDDING_PIPELINE_OUTPUTS": str(outputs)}
    return _ingest_in_child(settings, work / "home-s3", f"{drops_uri.rstrip('/')}/{name}", name, env)


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
            *_variant_lines(r, width),
        ]
    )


def _variant_lines(r: dict[str, Any], width: int) -> list[str]:
    lines = []
    names = {
        "sharded": f"sharded ({r.get('sharded', {}).get('shard_items')} items/shard, parallel steps)",
        "s3": f"from {r.get('s3', {}).get('drops_uri')} (outputs there too)",
    }
    for key in ("sharded", "s3"):
        if key in r:
            v = r[key]
            target = f"   (target >= {v['target_vs_local']})" if "target_vs_local" in v else ""
            lines += [
                f"  {r['images']} images {names[key]}: {v['seconds']} s, {v['images_per_s']} images/s, "
                f"{v['ok']} indexed (success: {v['success']})",
                f"  {'  images/s vs local, unsharded':<{width}} {v['speed_vs_local']:>8.2f} x{target}",
                f"  {'  peak RSS':<{width}} {v['peak_rss_mb']:>8.1f} MB",
            ]
    return lines
