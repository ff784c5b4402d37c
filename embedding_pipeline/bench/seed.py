"""``embedding-pipeline bench``: the three figures the project was specified with, each beside a reference
measured in the same run, on servers started for the run in a temporary home and removed afterwards.

1. Embedding extraction: photos through preprocessing + Triton, vs the model alone in ONNX Runtime.
2. Insert: vectors through ``ImageIndex.upsert``, vs a raw pymilvus bulk insert; index build timed apart.
3. Search: top-10 latency unfiltered / filtered on a declared key / filtered on a JSON path, vs numpy brute
   force; recall@10 of the configured index against exact search, on real photo embeddings.

Sections 2 and 3 run for every collection size and every store (milvus-lite, Milvus standalone), each on a
fresh server.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, Sequence

from embedding_pipeline.bench import corpus as corpus_mod
from embedding_pipeline.bench import extraction, faiss_ref, insert, search
from embedding_pipeline.bench.servers import STORES, BenchHome, peak_rss_mb, processes_using
from embedding_pipeline.index import params as index_params
from embedding_pipeline.settings import MilvusSettings, Settings

DEFAULT_SIZES = (10_000, 100_000)
DEFAULT_STORES = STORES
DEFAULT_QUERIES = 1000
DEFAULT_IMAGES = 3000
DEFAULT_BUDGET_S = 60.0
DECLARED_FILTER_FIELDS = {search.DECLARED_KEY: "VARCHAR"}


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt meanwhile, so a terminated run cleans up exactly like Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def index_overrides(milvus: MilvusSettings, index_type: str | None) -> dict[str, Any]:
    """Settings changes for ``--index-type``: none for the configured type; another type gets its own defaults
    (the configured parameters belong to the configured type)."""
    chosen = (index_type or milvus.index_type).upper()
    if chosen == milvus.index_type:
        return {}
    return {"index_type": chosen, "index_params": {}, "search_params": {}}


def _validate(sizes: Sequence[int], stores: Sequence[str], queries: int, images: int, dim: int | None) -> None:
    if not sizes or any(s < 1 for s in sizes):
        raise ValueError(f"--sizes must be positive numbers, not {list(sizes)}")
    unknown = [s for s in stores if s not in STORES]
    if not stores or unknown:
        raise ValueError(f"--stores must name {' and/or '.join(STORES)}, not {unknown or 'nothing'}")
    if queries < 1:
        raise ValueError(f"--queries must be at least 1, not {queries}")
    if images < 1:
        raise ValueError(f"--images must be at least 1, not {images}")
    if dim is not None and not 2 <= dim <= 32768:
        raise ValueError(f"--dim must be between 2 and 32768, not {dim}")


def run(
    settings: Settings,
    sizes: Sequence[int] = DEFAULT_SIZES,
    stores: Sequence[str] = DEFAULT_STORES,
    index_type: str | None = None,
    queries: int = DEFAULT_QUERIES,
    images: int = DEFAULT_IMAGES,
    dim: int | None = None,
    budget_s: float = DEFAULT_BUDGET_S,
    progress: Callable[[str], None] = _stderr,
) -> dict[str, Any]:
    """Run every section; returns all figures, the targets and whether each was met."""
    _validate(sizes, stores, queries, images, dim)
    # A bad --index-type or index parameter fails here, before any server starts.
    index_params.check_settings(settings.milvus.model_copy(update=index_overrides(settings.milvus, index_type)))
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    home = BenchHome(settings)
    with home:
        root = home.root
        assert root is not None  # set on entering the home
        progress(f"1/3 embedding extraction: {images} photo variants through preprocessing + Triton")
        with home.triton() as served:
            ext = extraction.run(served, root / "photos", images, progress)
        shutil.rmtree(root / "photos", ignore_errors=True)
        model_dim = ext.figures["dim"]
        vector_dim = dim or model_dim
        real = ext.vectors if vector_dim == model_dim else None
        for size in sizes:
            corpus = corpus_mod.build(size, vector_dim, real, ext.photos, queries)
            for store in stores:
                progress(f"2-3/3 {store}, {size:,} vectors: starting a fresh server...")
                t0 = time.perf_counter()
                with home.milvus(store, str(size)) as (milvus, pid):
                    progress(f"  server ready in {time.perf_counter() - t0:.1f} s; inserting...")
                    runs.append(
                        _index_run(
                            store, milvus, pid, corpus, index_type, queries, budget_s, ext.figures["model"], progress
                        )
                    )
                    t0 = time.perf_counter()
                progress(f"  server stopped in {time.perf_counter() - t0:.1f} s")
            del corpus  # one size's matrix at a time
    leftovers = processes_using(root)
    result: dict[str, Any] = {
        "config": {
            "sizes": list(sizes),
            "stores": list(stores),
            "queries": queries,
            "images": images,
            "dim": vector_dim,
            "metric_type": settings.milvus.metric_type,
            "top_k": search.TOP_K,
            "search_budget_s": budget_s,
        },
        "extraction": ext.figures,
        "runs": runs,
        "seconds": round(time.perf_counter() - started, 1),
        "cleanup": {"home": str(root), "home_removed": not root.exists(), "leftover_pids": leftovers},
    }
    result["targets"] = targets(result)
    result["all_targets_met"] = all(t["met"] for t in result["targets"])
    return result


def _index_run(
    store: str,
    milvus: MilvusSettings,
    pid: int | None,
    corpus: corpus_mod.Corpus,
    index_type: str | None,
    queries: int,
    budget_s: float,
    model: str,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    from embedding_pipeline.index.client import ImageIndex

    fields = {**milvus.filter_fields, **DECLARED_FILTER_FIELDS}
    ours = milvus.model_copy(
        update={
            "collection": insert.COLLECTION,
            "embedding_dim": None,
            "filter_fields": fields,
            **index_overrides(milvus, index_type),
        }
    )
    config: dict[str, Any] = {
        "index_type": ours.index_type,
        "index_params": index_params.build_params(ours),
        "search_params": index_params.search_params(ours, top_k=search.TOP_K),
    }
    with ImageIndex(ours) as index:
        try:
            inserted = insert.insert_ours(index, corpus, model)
            progress(f"  inserted in {inserted['seconds']} s; building the index...")
            built = insert.build_index(index, corpus.size, pid)
            progress(f"  index ready in {built['seconds']} s; searching...")
            searched = search.run(index, corpus, queries, budget_s, config["index_type"])
            rss = peak_rss_mb(pid)
            progress("  raw pymilvus insert (reference)...")
            raw = insert.insert_raw(ours, corpus)
        finally:
            with contextlib.suppress(Exception):  # best effort: the server and its data go away next anyway
                insert.drop(index.client, index.collection)
    progress("  FAISS directly, same vectors and parameters (reference)...")
    direct = faiss_ref.run(
        corpus,
        config["index_type"],
        config["index_params"],
        config["search_params"],
        ours.metric_type,
        queries,
        budget_s,
    )
    rate = inserted["vectors_per_s"]
    raw_ratio = rate / raw["vectors_per_s"]
    if direct is not None:
        p99 = searched["unfiltered"]["p99_ms"]
        floor = direct["search"]["p99_ms"]
        direct.update(
            search_p99_ratio=round(p99 / floor, 2) if floor else None,
            build_ratio=round(built["seconds"] / direct["build_seconds"], 2) if direct["build_seconds"] else None,
        )
    return {
        "store": store,
        "size": corpus.size,
        **config,
        "insert": {
            "ours": inserted,
            "raw_pymilvus": raw,
            "ratio_to_raw": round(raw_ratio, 3),
            "target_vectors_per_s": insert.TARGET_VECTORS_PER_S,
            "target_ratio_to_raw": insert.TARGET_RATIO_TO_RAW,
            "target_met": rate >= insert.TARGET_VECTORS_PER_S and raw_ratio >= insert.TARGET_RATIO_TO_RAW,
        },
        "index_build": built,
        "search": searched,
        "faiss_direct": direct,
        "server_peak_rss_mb": rss,
    }


SEARCH_P99_SIZE = 100_000
SEARCH_P99_TARGET_MS = 10.0
SEARCH_P99_TO_FAISS = 3.0  # the store's unfiltered p99 vs FAISS's, same vectors and parameters
BUILD_TO_FAISS = 1.5  # the store's index build vs FAISS building the same index


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of the run: what, where, the measured value, the bound and whether it was met."""
    ext = result["extraction"]
    out = [
        {
            "what": "end-to-end / model-only throughput",
            "where": "extraction",
            "value": ext["ratio_to_model_only"],
            "target": f">= {ext['target_ratio']}",
            "met": ext["target_met"],
        }
    ]
    for r in result["runs"]:
        where = f"{r['store']} {r['size']:,}"
        ins, s = r["insert"], r["search"]
        rate = ins["ours"]["vectors_per_s"]
        out.append(
            {
                "what": "insert vectors/s (ImageIndex.upsert)",
                "where": where,
                "value": rate,
                "target": f">= {ins['target_vectors_per_s']}",
                "met": rate >= ins["target_vectors_per_s"],
            }
        )
        out.append(
            {
                "what": "insert, ours / raw pymilvus",
                "where": where,
                "value": ins["ratio_to_raw"],
                "target": f">= {insert.TARGET_RATIO_TO_RAW}",
                "met": ins["ratio_to_raw"] >= insert.TARGET_RATIO_TO_RAW,
            }
        )
        out.append(
            {
                "what": "declared-key filter p99 / unfiltered p99",
                "where": where,
                "value": s["declared_filter_to_unfiltered_p99"],
                "target": f"<= {s['target_declared_filter_ratio']}",
                "met": s["declared_filter_target_met"],
            }
        )
        out.append(
            {
                "what": "undeclared-key filter p99 / unfiltered p99",
                "where": where,
                "value": s["json_filter_to_unfiltered_p99"],
                "target": f"<= {s['target_json_filter_ratio']}",
                "met": s["json_filter_target_met"],
            }
        )
        direct = r.get("faiss_direct")
        if direct and direct.get("build_ratio") is not None:
            out.append(
                {
                    "what": "index build / FAISS building the same index",
                    "where": where,
                    "value": direct["build_ratio"],
                    "target": f"<= {BUILD_TO_FAISS}",
                    "met": direct["build_ratio"] <= BUILD_TO_FAISS,
                }
            )
        if r["size"] >= SEARCH_P99_SIZE:
            p99 = s["unfiltered"]["p99_ms"]
            out.append(
                {
                    "what": "unfiltered search p99 ms at top-10",
                    "where": where,
                    "value": p99,
                    "target": f"<= {SEARCH_P99_TARGET_MS}",
                    "met": p99 <= SEARCH_P99_TARGET_MS,
                }
            )
            if direct and direct.get("search_p99_ratio") is not None:
                out.append(
                    {
                        "what": "unfiltered search p99 / FAISS p99",
                        "where": where,
                        "value": direct["search_p99_ratio"],
                        "target": f"<= {SEARCH_P99_TO_FAISS}",
                        "met": direct["search_p99_ratio"] <= SEARCH_P99_TO_FAISS,
                    }
                )
        if "target_recall" in s:
            out.append(
                {
                    "what": f"recall@10 ({r['index_type']}, real embeddings)",
                    "where": where,
                    "value": s["recall"]["recall_at_10"],
                    "target": f">= {s['target_recall']}",
                    "met": s["recall_target_met"],
                }
            )
    return out


# -- text report ---------------------------------------------------------------------------------------------------


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _params(params: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in params.items()) + "}"


def render(r: dict[str, Any]) -> str:
    e, c = r["extraction"], r["config"]
    w, h = e["image_size"]
    lines = [
        f"Embedding extraction: {e['images']} photo variants ({w}x{h} JPEG) -> {e['tensor']} -> {e['model']} "
        f"({e['dim']}-d), batch {e['batch_size']}",
        f"  pipeline (read + decode + JAX + Triton)  {e['seconds']:>8.2f} s  {e['images_per_s']:>8.1f} images/s"
        f"  {e['ms_per_image']:>6.2f} ms/image",
        f"  model only (ONNX Runtime, {e['model_only_threads']} threads)              "
        f"{e['model_only_images_per_s']:>8.1f} images/s",
        f"  end to end / model only                  {e['ratio_to_model_only']:>8.2f} x"
        f"   (target >= {e['target_ratio']}: {_met(e['target_met'])})",
    ]
    for run in r["runs"]:
        lines += [""] + _render_run(run, c)
    unmet = [t for t in r["targets"] if not t["met"]]
    lines += ["", f"Targets met: {len(r['targets']) - len(unmet)} of {len(r['targets'])}"]
    lines += [f"  NOT met: {t['what']} ({t['where']}): {t['value']} (target {t['target']})" for t in unmet]
    lines.append(f"Total {r['seconds']} s; temporary home removed: {r['cleanup']['home_removed']}")
    return "\n".join(lines)


def _render_run(run: dict[str, Any], config: dict[str, Any]) -> list[str]:
    ins, s, quality = run["insert"], run["search"], run["search"]["recall"]
    ours, raw = ins["ours"], ins["raw_pymilvus"]
    lines = [
        f"{run['store']}, {run['size']:,} vectors x {config['dim']}-d ({quality['real_rows']:,} real photo embeddings"
        f" + {quality['synthetic_rows']:,} synthetic); {run['index_type']} {_params(run['index_params'])},"
        f" search {_params(run['search_params'])}",
        f"  insert, ImageIndex.upsert             {ours['seconds']:>8.2f} s  {ours['vectors_per_s']:>9.1f} vectors/s"
        f"   client CPU {ours['client_cpu_s']:.2f} s   (target >= {ins['target_vectors_per_s']}:"
        f" {_met(ins['target_met'])})",
        f"  insert, raw pymilvus (reference)      {raw['seconds']:>8.2f} s  {raw['vectors_per_s']:>9.1f} vectors/s"
        f"   client CPU {raw['client_cpu_s']:.2f} s   ours/raw {ins['ratio_to_raw']:.2f}",
        f"  index build (flush -> indexed -> loaded) {run['index_build']['seconds']:>5.2f} s",
    ]
    direct = run.get("faiss_direct")
    if direct:
        ratio = direct.get("build_ratio")
        lines.append(
            f"  index build, FAISS directly (ref)     {direct['build_seconds']:>8.2f} s"
            + (f"   store / FAISS {ratio:.2f} x   (target <= {BUILD_TO_FAISS})" if ratio is not None else "")
        )
    if run.get("server_peak_rss_mb") is not None:
        lines.append(f"  server peak RSS                       {run['server_peak_rss_mb']:>8.1f} MiB")
    lines.append(f"  search, top-{s['top_k']}                 queries    avg ms    p50 ms    p95 ms    p99 ms")
    rows = [
        ("unfiltered", s["unfiltered"]),
        ("filter, declared key", s["filtered_declared"]),
        ("filter, undeclared key", s["filtered_json_path"]),
    ]
    if "batched" in s:
        rows.append((f"{s['batched']['batch']} queries per call", s["batched"]))
    if direct:
        rows.append(("FAISS directly (ref)", direct["search"]))
    rows.append(("numpy brute force (ref)", s["numpy_brute_force"]))
    for label, f in rows:
        cut = " (time budget)" if f.get("budget_exhausted") else ""
        if f.get("short_results"):
            cut += f" ({f['short_results']} with fewer than {s['top_k']} hits)"
        lines.append(
            f"    {label:<26} {f['queries']:>7} {f['avg_ms']:>9.2f} {f['p50_ms']:>9.2f} {f['p95_ms']:>9.2f}"
            f" {f['p99_ms']:>9.2f}{cut}"
        )
    if "more_like_this" in s:
        m = s["more_like_this"]
        for label, key in (("by id (more like this)", "by_id"), ("by the same vector (ref)", "by_vector")):
            f = m[key]
            lines.append(
                f"    {label:<26} {f['queries']:>7} {f['avg_ms']:>9.2f} {f['p50_ms']:>9.2f} {f['p95_ms']:>9.2f}"
                f" {f['p99_ms']:>9.2f}"
            )
        lines.append(
            f"  by id / by vector                 p50 {m['by_id_to_by_vector_p50']:>6.2f} x   p99 "
            f"{m['by_id_to_by_vector_p99']:>6.2f} x   (target <= {m['target_by_id_ratio']}: "
            f"{_met(m['by_id_target_met'])})"
        )
    lines.append(
        f"  declared filter / unfiltered (p99)    {s['declared_filter_to_unfiltered_p99']:>8.2f} x"
        f"   (target <= {s['target_declared_filter_ratio']}: {_met(s['declared_filter_target_met'])})"
    )
    lines.append(
        f"  undeclared filter / unfiltered (p99)  {s['json_filter_to_unfiltered_p99']:>8.2f} x"
        f"   (target <= {s['target_json_filter_ratio']}: {_met(s['json_filter_target_met'])})"
    )
    if direct and direct.get("search_p99_ratio") is not None:
        lines.append(
            f"  unfiltered p99 / FAISS p99            {direct['search_p99_ratio']:>8.2f} x"
            f"   (target <= {SEARCH_P99_TO_FAISS} at {SEARCH_P99_SIZE:,}+)"
        )
    recall_line = (
        f"  recall@10 vs exact ({quality['queries']} {quality['vectors']} queries)  {quality['recall_at_10']:.4f}"
    )
    if "target_recall" in s:
        recall_line += f"   (target >= {s['target_recall']}: {_met(s['recall_target_met'])})"
    if "same_photo_top1" in quality:
        recall_line += f"; nearest neighbour from the same photo: {quality['same_photo_top1']:.1%}"
    lines.append(recall_line)
    return lines
