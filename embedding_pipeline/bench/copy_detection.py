"""``embedding-pipeline bench quality``: how well search finds the original of an altered copy, through the real
pipeline, for each descriptor recipe the settings offer, against today's default measured in the same run.

The evaluation set is :mod:`embedding_pipeline.bench.copy_set` (distinct images that install offline, eight
alteration kinds). For each recipe the originals are ingested as one drop through the Dagster job (manifest →
decode + JAX → Triton → Milvus) in a child process with its own state directory and collection, then every altered
copy is searched through :class:`~embedding_pipeline.retrieval.ImageSearcher` (the search path of the CLI, the API
and the search job). It prints rank-1, recall@5 and mean average precision (one relevant image per query: AP is
1/rank) per alteration and overall, the ingest seconds per image and the query p50, each as a ratio to the
baseline recipe (``crop``: centre crop, today's default).

Recipes are the descriptor settings available now: ``crop`` and ``pad`` (letterbox), i.e.
``preprocess.resize_policy``.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from embedding_pipeline.bench import copy_set
from embedding_pipeline.bench.ingest import _ingest_in_child
from embedding_pipeline.settings import Settings

COLLECTION = "bench_quality"
RECIPES = {"crop": {"PREPROCESS_RESIZE_POLICY": "crop"}, "pad": {"PREPROCESS_RESIZE_POLICY": "pad"}}
BASELINE = "crop"
TOP_K = 10


def _write_originals(folder: Path, images: dict[str, Any]) -> Path:
    import json

    folder.mkdir(parents=True)
    rows = []
    for name, array in images.items():
        (folder / f"{name}.jpg").write_bytes(copy_set.encode(array))
        rows.append({"id": name, "uri": f"{name}.jpg"})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _queries(settings: Settings, recipe: str, queries: dict[str, list[tuple[str, bytes]]]) -> dict[str, Any]:
    from embedding_pipeline.retrieval import ImageSearcher

    policy = RECIPES[recipe]["PREPROCESS_RESIZE_POLICY"]
    searching = settings.model_copy(
        update={
            "milvus": settings.milvus.model_copy(update={"collection": f"{COLLECTION}_{recipe}"}),
            "preprocess": settings.preprocess.model_copy(update={"resize_policy": policy}),
        }
    )
    ranks: dict[str, list[int | None]] = {}
    latencies: list[float] = []
    with ImageSearcher(searching) as searcher:
        for kind, pairs in queries.items():
            ranks[kind] = []
            for expected, data in pairs:
                started = time.perf_counter()
                hits = searcher.search(data, top_k=TOP_K)
                latencies.append(time.perf_counter() - started)
                found = [h["id"] for h in hits]
                ranks[kind].append(found.index(expected) + 1 if expected in found else None)
    per_kind = {kind: copy_set.ranking_scores(r) for kind, r in ranks.items()}
    overall = copy_set.ranking_scores([r for rs in ranks.values() for r in rs])
    return {
        "overall": overall,
        "per_alteration": per_kind,
        "worst": min(per_kind, key=lambda k: per_kind[k]["rank1"]),
        "query_p50_ms": round(statistics.median(latencies) * 1000, 1),
    }


def run(
    settings: Settings,
    recipes: tuple[str, ...] = tuple(RECIPES),
    limit: int | None = None,
    alterations: tuple[str, ...] = copy_set.ALTERATIONS,
) -> dict[str, Any]:
    """Measure every recipe (the baseline first); ``limit`` and ``alterations`` shrink the set (the test's run)."""
    from embedding_pipeline import services
    from embedding_pipeline.index.collections import ModelCollections

    unknown = set(recipes) - set(RECIPES)
    if unknown:
        raise ValueError(f"unknown recipe(s) {sorted(unknown)}; choose from {sorted(RECIPES)}")
    recipes = (BASELINE, *[r for r in recipes if r != BASELINE])
    images = copy_set.originals()
    if limit is not None:
        images = dict(list(images.items())[:limit])
    queries: dict[str, list[tuple[str, bytes]]] = {kind: [] for kind in alterations}
    for name, array in images.items():
        for kind, data in copy_set.altered(array, alterations).items():
            queries[kind].append((name, data))
    started = services.start_services(settings)
    work = Path(tempfile.mkdtemp(prefix="bench-quality-", dir=settings.paths.root))
    results: dict[str, Any] = {}
    try:
        folder = _write_originals(work / "sources" / "originals", images)
        for recipe in recipes:
            env = {**RECIPES[recipe], "MILVUS_COLLECTION": f"{COLLECTION}_{recipe}"}
            ingested = _ingest_in_child(settings, work / f"home-{recipe}", folder, "originals", env)
            if not ingested["success"] or ingested["ok"] != len(images):
                raise RuntimeError(f"recipe {recipe}: the originals did not all ingest: {ingested}")
            results[recipe] = {
                "ingest_s_per_image": round(ingested["seconds"] / len(images), 4),
                **_queries(settings, recipe, queries),
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
        try:
            for recipe in recipes:
                milvus = settings.milvus.model_copy(update={"collection": f"{COLLECTION}_{recipe}"})
                with ModelCollections(milvus) as collections:
                    collections.drop_all()
        finally:
            services.stop_services(settings, only=started)
    base = results[BASELINE]
    for r in results.values():
        r["ingest_cost_vs_baseline"] = round(r["ingest_s_per_image"] / base["ingest_s_per_image"], 2)
        r["query_p50_vs_baseline"] = round(r["query_p50_ms"] / base["query_p50_ms"], 2)
    return {
        "images": len(images),
        "alterations": list(alterations),
        "queries": sum(len(v) for v in queries.values()),
        "baseline": BASELINE,
        "recipes": results,
        "targets": {"rank1": 0.95, "worst_rank1": 0.85, "ingest_cost_vs_baseline": 1.5, "query_p50_vs_baseline": 1.5},
    }


def render(r: dict[str, Any]) -> str:
    kinds = r["alterations"]
    lines = [
        f"Copy detection: {r['images']} originals, {r['queries']} altered copies ({len(kinds)} kinds), top-{TOP_K} "
        "through the real pipeline and search path",
        f"  {'recipe':<8} {'rank-1':>7} {'R@5':>6} {'mAP':>6} {'worst':>14}  "
        + " ".join(f"{k:>7}" for k in kinds)
        + "  ingest/img  vs base  query p50  vs base",
    ]
    for name, x in r["recipes"].items():
        o, per = x["overall"], x["per_alteration"]
        worst = f"{x['worst']} {per[x['worst']]['rank1']:.2f}"
        lines.append(
            f"  {name:<8} {o['rank1']:>7.3f} {o['recall5']:>6.3f} {o['map']:>6.3f} {worst:>14}  "
            + " ".join(f"{per[k]['rank1']:>7.2f}" for k in kinds)
            + f"  {x['ingest_s_per_image'] * 1000:>7.1f} ms  {x['ingest_cost_vs_baseline']:>6.2f}x"
            + f"  {x['query_p50_ms']:>6.1f} ms  {x['query_p50_vs_baseline']:>6.2f}x"
        )
    t = r["targets"]
    lines.append(
        f"  targets: rank-1 >= {t['rank1']}, worst kind >= {t['worst_rank1']}, ingest cost and query p50 <= "
        f"{t['ingest_cost_vs_baseline']}x the baseline"
    )
    return "\n".join(lines)
