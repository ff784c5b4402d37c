"""``embedding-pipeline``: set up, run the local stack, ingest a drop, search."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from embedding_pipeline.settings import CONFIG_ENV, ConfigError, Settings, load_settings


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def cmd_setup(args: argparse.Namespace) -> int:
    """Build (or reuse) the serving and model-build environments and the default model."""
    from embedding_pipeline.runtime.environments import ensure_env
    from embedding_pipeline.serving.models import ensure_default_model

    paths = _settings(args).paths
    ensure_env(paths, "serving")
    print(f"model: {ensure_default_model(paths)}")
    return 0


def cmd_services(args: argparse.Namespace) -> int:
    from embedding_pipeline import services

    settings = _settings(args)
    if args.action == "start":
        services.start_services(settings)
        print(f"Triton ready at {settings.triton.url}; Milvus ready at {settings.milvus.uri}")
    elif args.action == "stop":
        print("stopped: " + (", ".join(services.stop_services(settings)) or "nothing was running"))
    else:
        print(json.dumps(services.services_status(settings), indent=2))
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from embedding_pipeline import services
    from embedding_pipeline.runtime import processes

    settings = _settings(args)
    stopping = False
    # Stop on exit only what this command started: services that were already running stay up.
    already = {name for name in services.MANAGED if processes.read(settings.paths.run, name)}

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        print("starting Milvus and Triton (the first run builds environments and exports the model)...", flush=True)
        services.start_services(settings)
        print("starting the Dagster webserver and daemon...", flush=True)
        services.start_dagster(settings)
        print("starting the HTTP API...", flush=True)
        services.start_api(settings)
        if not args.no_sample:
            folder = _sample_drop(settings)
            print(f"sample drop: {folder} (the sensor ingests it within seconds)")
        print(
            f"\nDagster UI: {services.webserver_url(settings)}\nHTTP API: {services.api_url(settings)} "
            f"(docs: {services.api_url(settings)}/docs)\ndrop folder: {settings.drops_location}"
        )
        print("Ctrl-C or `embedding-pipeline down` stops everything.", flush=True)
        while not stopping:
            # `down` from another shell stops the webserver: then this command has nothing left to hold.
            if processes.read(settings.paths.run, services.WEBSERVER) is None:
                break
            time.sleep(0.5)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stopped = services.stop_all(settings, keep=already)
        print("stopped: " + (", ".join(stopped) or "nothing"), flush=True)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from embedding_pipeline import services

    stopped = services.stop_all(_settings(args))
    print("stopped: " + (", ".join(stopped) or "nothing was running"))
    return 0


def cmd_serve_api(args: argparse.Namespace) -> int:
    """Serve the HTTP API in this process (Ctrl-C stops it)."""
    import uvicorn

    from embedding_pipeline.api.app import create_app
    from embedding_pipeline.api.guards import api_key_from_env, public_bind_problem

    settings = _settings(args)
    host = args.host or settings.api.host
    port = args.port or settings.api.port
    problem = public_bind_problem(host, bool(api_key_from_env()), args.insecure)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    if (
        public_bind_problem(host, False, False)
        and "*" not in settings.api.allowed_hosts
        and set(settings.api.allowed_hosts) <= {"127.0.0.1", "localhost", "[::1]"}
    ):
        print(
            f"note: serving on {host}, but api.allowed_hosts lists loopback names only: clients that reach this "
            "address by another name get 400; add those names to api.allowed_hosts",
            file=sys.stderr,
        )
    print(f"HTTP API on http://{host}:{port} (docs: /docs)", flush=True)
    uvicorn.run(create_app(settings), host=host, port=port, log_level=args.log_level)
    return 0


def _sample_drop(settings: Any) -> str:
    """The sample photos as a drop: written in the local drop folder, or uploaded to the drops prefix."""
    from embedding_pipeline.runtime.objects import ObjectPath
    from embedding_pipeline.sources.drops import place_drop
    from embedding_pipeline.sources.samples import write_sample_drop

    location = settings.drops_location
    if not isinstance(location, ObjectPath):
        return str(write_sample_drop(location))
    name = "sample-photos"
    if (location / name).is_dir():
        return str(location / name)
    with tempfile.TemporaryDirectory() as work:
        place_drop(location, write_sample_drop(Path(work)), name)
    return str(location / name)


def cmd_ingest(args: argparse.Namespace) -> int:
    from embedding_pipeline import services
    from embedding_pipeline.orchestration import runs
    from embedding_pipeline.runtime import progress

    settings = _settings(args)
    started = services.start_services(settings)
    if started:
        print(f"started {', '.join(started)}; `embedding-pipeline services stop` stops them", file=sys.stderr)
    bars = sys.stderr.isatty() and not args.json
    listener: Any = _ProgressBars() if bars else progress.Throttled(_print_progress, every_s=PROGRESS_EVERY_S)
    try:
        with progress.listening(listener):
            summary = runs.ingest(settings, args.path, args.drop, console_log_level=None if args.verbose else "WARNING")
    finally:
        if bars:
            listener.close()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_ingest_summary(summary)
    return 0 if summary["success"] else 1


# How often plain progress lines are printed (not on a terminal, or with --json).
PROGRESS_EVERY_S = 5.0


def _print_progress(update: Any) -> None:
    print(update.line(), file=sys.stderr, flush=True)


class _ProgressBars:
    """One tqdm bar per stage on the terminal (stderr), each with its count, rate and ETA."""

    def __init__(self) -> None:
        self._bars: dict[str, Any] = {}

    def __call__(self, update: Any) -> None:
        from tqdm import tqdm

        bar = self._bars.get(update.stage)
        if bar is None:
            bar = self._bars[update.stage] = tqdm(
                total=update.total, desc=f"{update.stage:<10}", unit=f" {update.unit}", file=sys.stderr, leave=True
            )
        bar.update(update.done - bar.n)
        if update.finished:
            bar.refresh()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()


def _print_ingest_summary(summary: dict[str, Any]) -> None:
    state = "ok" if summary["success"] else "FAILED"
    print(
        f"drop {summary['drop']} ({state}, run {summary['run_id']}): {summary['items']} items, {summary['ok']} ok, "
        f"{summary['failed']} failed, {summary['skipped']} skipped"
    )
    for error in summary.get("errors", []):
        print(f"  error in {error['step']}: {error['error']}")
    for failure in summary["failures"]:
        print(f"  {failure['status']:<8} {failure['id']}  {failure['error_kind']}: {failure['error']}")


def cmd_search(args: argparse.Namespace) -> int:
    from embedding_pipeline.index.client import UnknownItem
    from embedding_pipeline.retrieval import search

    if (args.image is None) == (args.item_id is None):
        print("error: give an image or --id, not both", file=sys.stderr)
        return 2
    collapse = None if args.collapse is None else (True if args.collapse == -1.0 else args.collapse)
    try:
        hits = search(
            args.image,
            top_k=args.top_k,
            filter=args.filter or None,
            settings=_settings(args),
            id=args.item_id,
            min_score=args.min_score,
            offset=args.offset,
            collapse=collapse,
            include_self=args.include_self,
        )
    except (UnknownItem, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([hit.as_dict() for hit in hits], indent=2))
    else:
        for rank, hit in enumerate(hits, args.offset + 1):
            folded = f"  (+{len(hit.duplicates)} near-duplicates)" if hit.duplicates else ""
            print(f"{rank:>3}  {hit.score:.4f}  {hit.id}  {hit.uri}{folded}")
    return 0


def cmd_duplicates(args: argparse.Namespace) -> int:
    """Near-duplicate groups of a drop (its images against the whole collection) or of the whole collection."""
    from embedding_pipeline import duplicates
    from embedding_pipeline.index.server import start_milvus

    settings = _settings(args)
    start_milvus(settings)  # a local Milvus is started like `ingest` does
    page = duplicates.report_page(duplicates.find_for(settings, args.drop, args.threshold))
    if args.json:
        print(json.dumps(page, indent=2))
        return 0
    scope = f"drop {args.drop!r}" if args.drop else "the collection"
    print(f"{page['total_groups']} group(s) of near-duplicates in {scope} ({page['metric']} {page['threshold']})")
    for group in page["groups"]:
        print(f"group {group['group']} ({group['size']} images)")
        for m in group["members"]:
            mark = "*" if m["representative"] else " "
            print(f"  {mark} {m['score']:.4f}  {m['id']}  {m['drop']}  {m['uri']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write the rows of drops (or of the whole collection) with their vectors to a Parquet file."""
    from embedding_pipeline.export import check_selection, export_embeddings
    from embedding_pipeline.index.server import start_milvus

    check_selection(args.drops, args.all)  # a bad command line fails before anything is loaded or started
    settings = _settings(args)
    start_milvus(settings)  # the rows are in Milvus: a local one is started like `ingest` does
    summary = export_embeddings(
        settings.milvus, Path(args.out), args.drops, all_rows=args.all, collection=args.collection
    )
    what = "every drop" if args.all else ", ".join(summary.drops)
    print(
        f"wrote {summary.rows} rows ({what}) of collection {summary.collection!r}, {summary.dimension}-d, to "
        f"{summary.path} ({summary.bytes} bytes, {summary.row_groups} row groups, {summary.seconds} s)"
    )
    return 0


def _csv(kind, text: str) -> list:  # noqa: ANN001 - int or str
    """A comma-separated option value ("10000,100000"), each part converted by ``kind``."""
    try:
        return [kind(part.strip().replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated values, got {text!r}") from None


def cmd_bench(args: argparse.Namespace) -> int:
    settings = _settings(args)
    render: Callable[[dict[str, Any]], str]
    if args.what is None:
        from embedding_pipeline.bench import seed as bench_seed

        with bench_seed.terminate_as_interrupt():  # SIGTERM cleans up like Ctrl-C: servers stopped, temp home removed
            result = bench_seed.run(
                settings,
                sizes=args.sizes,
                stores=args.stores,
                index_type=args.index_type,
                queries=args.queries,
                images=args.images or bench_seed.DEFAULT_IMAGES,
                dim=args.dim,
                budget_s=args.search_budget_s,
            )
        render = bench_seed.render
    elif args.what == "preprocess":
        from embedding_pipeline.bench import preprocess as bench_preprocess

        result = bench_preprocess.run(settings, count=args.images or 512)
        render = bench_preprocess.render
    elif args.what == "integrity":
        from embedding_pipeline.bench import integrity as bench_integrity

        result = bench_integrity.run(settings, images=args.images or 5000)
        render = bench_integrity.render
    elif args.what == "duplicates":
        from embedding_pipeline.bench import duplicates as bench_duplicates

        result = bench_duplicates.run(settings, vectors=args.vectors)
        render = bench_duplicates.render
    elif args.what == "export":
        from embedding_pipeline.bench import export as bench_export

        result = bench_export.run(settings, rows=args.rows, dim=args.dim or bench_export.DIM)
        render = bench_export.render
    elif args.what == "quality":
        from embedding_pipeline.bench import copy_detection

        result = copy_detection.run(settings, limit=args.images)
        render = copy_detection.render
    elif args.what == "api":
        from embedding_pipeline.bench import api as bench_api

        result = bench_api.run(
            settings,
            requests_per_kind=args.requests,
            clients=args.clients,
            url=args.url,
            vectors=args.vectors,
            collection=args.collection,
        )
        render = bench_api.render
    else:
        from embedding_pipeline.bench import ingest as bench_ingest

        result = bench_ingest.run(
            settings,
            images=args.images or 5000,
            baseline_images=args.baseline_images,
            drops_uri=args.drops_uri,
            shard_items=args.shard_items,
        )
        render = bench_ingest.render
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


def cmd_items(args: argparse.Namespace) -> int:
    from embedding_pipeline import ingest
    from embedding_pipeline.sources.statuses import ItemStatus

    try:
        report = ingest.item_report(_settings(args), args.drop)
    except FileNotFoundError:
        raise FileNotFoundError(f"drop {args.drop!r} has no manifest yet (not ingested)") from None
    if args.failed:
        report = [r for r in report if r["status"] != ItemStatus.OK]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for r in report:
            detail = f"{r['error_kind']}: {r['error']}" if r["error"] else r["stage"]
            print(f"{r['status']:<8} {r['id']:<40} {detail}")
    return 0


def cmd_delete_drop(args: argparse.Namespace) -> int:
    """Delete a drop through the `delete_drop` job (a dry run without --yes), so it shows in the run history."""
    from embedding_pipeline import retention
    from embedding_pipeline.index.server import start_milvus
    from embedding_pipeline.orchestration.runs import execute_delete_drop

    settings = _settings(args)
    retention.check_name(args.drop)
    start_milvus(settings)  # its rows are in Milvus: a local one is started like `ingest` does
    outcome = execute_delete_drop(settings, args.drop, dry_run=not args.yes)
    if not outcome["success"]:
        for error in outcome["errors"]:
            print(f"error: {error['error']}", file=sys.stderr)
        return 1
    summary = outcome["summary"]
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    verb = "would delete" if summary["dry_run"] else "deleted"
    print(f"{verb} drop {args.drop!r} (run {outcome['run_id']}):")
    for p in summary["paths"]:
        print(f"  {p['kind']:<13} {p['path']}  ({p['files']} files, {p['bytes']} bytes)")
    for collection, count in sorted(summary.get("deleted_rows", summary["rows"]).items()):
        print(f"  {'milvus rows':<13} {collection}: {count}")
    print(f"  {'partition':<13} {'drops/' + args.drop if summary['partition'] else '(none)'}")
    if summary["dry_run"]:
        print("dry run: nothing was deleted; add --yes to delete")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """List the per-model collections, or switch search to one (as a run of ``switch_search_collection``)."""
    from embedding_pipeline.index.collections import ModelCollections

    settings = _settings(args)
    if args.action == "switch":
        from embedding_pipeline.orchestration.runs import switch_search

        outcome = switch_search(settings, args.to or "", args.force)
        if not outcome["success"]:
            for error in outcome["errors"]:
                print(f"error: {error['error']}", file=sys.stderr)
            return 1
    with ModelCollections(settings.milvus) as collections:
        infos = collections.describe()
    if args.json:
        print(json.dumps([i.as_dict() for i in infos], indent=2))
        return 0
    if not infos:
        print(f"no collections behind {settings.milvus.collection!r} yet")
    for info in infos:
        mark = "*" if info.search else " "
        print(
            f"{mark} {info.name}  model {info.model or '?'}  dim {info.dimension}  rows {info.rows}  "
            f"drops {len(info.drops)}"
        )
    print(f"(* = the collection search uses through {settings.milvus.collection!r})")
    return 0


def cmd_reembed(args: argparse.Namespace) -> int:
    """Submit a backfill of ingest_drop over every drop; the Dagster daemon runs it."""
    from embedding_pipeline.orchestration.backfill import launch_reembed_backfill
    from embedding_pipeline.orchestration.instance import pipeline_instance
    from embedding_pipeline.orchestration.runs import observe_model

    settings = _settings(args)
    instance = pipeline_instance(settings)
    label = observe_model(instance)  # recorded first: the UI then shows every embedded drop as stale
    backfill_id, drops = launch_reembed_backfill(instance)
    print(
        f"backfill {backfill_id}: {len(drops)} drop(s) to re-embed with {label}; the Dagster daemon runs it "
        "(`embedding-pipeline up` starts one). Then: embedding-pipeline models switch"
    )
    return 0


def cmd_model_repository(args: argparse.Namespace) -> int:
    """Write a ready-to-serve Triton model repository for the configured (or given) model."""
    from embedding_pipeline.serving.models import MODEL_PATH_SETTING, model_artifact
    from embedding_pipeline.serving.repository import write_model_repository

    settings = _settings(args)
    max_batch = settings.triton.max_batch_size if args.max_batch_size is None else args.max_batch_size
    model = Path(args.model) if args.model else settings.triton.model_path
    artifact = model_artifact(settings.paths, model, max_batch, "--model" if args.model else MODEL_PATH_SETTING)
    name = args.name or settings.triton.model_name
    write_model_repository(
        Path(args.out_dir),
        name,
        artifact.path,
        artifact.spec,
        max_batch_size=max_batch,
        parameters=artifact.parameters,
        flavour=args.flavour,
        instances=args.instances,
        gpu=not args.cpu,
        accelerator="tensorrt" if args.tensorrt else None,
        tensorrt_precision=args.tensorrt or "FP16",
    )
    image, embedding = artifact.spec.inputs[0], artifact.spec.outputs[0]
    print(f"wrote {Path(args.out_dir) / name} ({args.flavour} flavour) from {artifact.path}")
    print(
        f"  input {image.name!r} {image.datatype} {list(image.shape)}, "
        f"output {embedding.name!r} {embedding.datatype} {list(embedding.shape)}"
    )
    print(f"serve it with: tritonserver --model-repository={Path(args.out_dir).resolve()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedding-pipeline", description=__doc__)
    parser.add_argument("--config", help="YAML settings file (default: $EMBEDDING_PIPELINE_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("setup", help="build environments and the default model").set_defaults(func=cmd_setup)
    up = sub.add_parser("up", help="start Triton, Milvus and Dagster, ingest the sample drop; Ctrl-C stops")
    up.add_argument("--no-sample", action="store_true", help="don't copy the sample drop")
    up.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop everything `up` started").set_defaults(func=cmd_down)
    svc = sub.add_parser("services", help="Triton + Milvus only")
    svc.add_argument("action", choices=["start", "stop", "status"])
    svc.set_defaults(func=cmd_services)
    api = sub.add_parser("serve-api", help="serve the HTTP API (health, collections, insert, search)")
    api.add_argument("--host", help="bind address (default: api.host, 127.0.0.1)")
    api.add_argument("--port", type=int, help="port (default: api.port, 18080)")
    api.add_argument(
        "--insecure",
        action="store_true",
        help="serve a non-loopback address without an API key (anyone who reaches it can use it)",
    )
    api.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    api.set_defaults(func=cmd_serve_api)
    ing = sub.add_parser("ingest", help="ingest a folder or manifest as a drop, in the Dagster instance")
    ing.add_argument("path", help="a folder or manifest file, or an s3://bucket/prefix or manifest object")
    ing.add_argument("--drop", help="drop (partition) name; default: the file or folder name")
    ing.add_argument("--json", action="store_true", help="print the summary as JSON; progress as plain lines")
    ing.add_argument("--verbose", action="store_true", help="also print every Dagster event of the run")
    ing.set_defaults(func=cmd_ingest)
    se = sub.add_parser("search", help="search the collection by image, or by the id of an indexed item")
    se.add_argument("image", nargs="?", help="local path or http(s) URL (or give --id)")
    se.add_argument("--id", dest="item_id", help="more like this: search with the vector stored for this id")
    se.add_argument("--include-self", action="store_true", help="with --id: keep the item itself in the results")
    se.add_argument("--top-k", type=int, default=10)
    se.add_argument("--offset", type=int, default=0, help="skip this many hits (the next page)")
    se.add_argument(
        "--min-score",
        type=float,
        help="only hits at least this good (COSINE/IP: score >= it; L2: distance <= it)",
    )
    se.add_argument(
        "--collapse",
        nargs="?",
        type=float,
        const=-1.0,
        metavar="THRESHOLD",
        help="fold near-duplicates under the best of them (default threshold: duplicates.threshold)",
    )
    se.add_argument("--filter", help='Milvus expression, e.g. metadata["category"] == "nature"')
    se.add_argument("--json", action="store_true")
    se.set_defaults(func=cmd_search)
    du = sub.add_parser("duplicates", help="near-duplicate groups of a drop or of the whole collection")
    du.add_argument("drop", nargs="?", help="drop name (its images against the whole collection); default: all rows")
    du.add_argument("--threshold", type=float, help="default: duplicates.threshold, else the measured default")
    du.add_argument("--json", action="store_true")
    du.set_defaults(func=cmd_duplicates)
    it = sub.add_parser("items", help="every item of an ingested drop with its status and error")
    it.add_argument("drop")
    it.add_argument("--failed", action="store_true", help="only items that failed or were skipped")
    it.add_argument("--json", action="store_true")
    it.set_defaults(func=cmd_items)
    dd = sub.add_parser(
        "delete-drop", help="delete a drop: source, files, Milvus rows, partition (dry run without --yes)"
    )
    dd.add_argument("drop", help="drop (partition) name")
    dd.add_argument("--yes", action="store_true", help="really delete (default: only show what would go)")
    dd.add_argument("--json", action="store_true")
    dd.set_defaults(func=cmd_delete_drop)
    ex = sub.add_parser("export", help="write drops (or the whole collection) with their vectors to Parquet")
    ex.add_argument("drops", nargs="*", metavar="DROP", help="drops to export (or --all)")
    ex.add_argument("--all", action="store_true", help="export every row of the collection")
    ex.add_argument("--out", required=True, help="the Parquet file to write (replaced when complete)")
    ex.add_argument("--collection", help="collection to read (default: the one search uses, behind milvus.collection)")
    ex.set_defaults(func=cmd_export)
    mo = sub.add_parser("models", help="the collections per model behind milvus.collection; switch search")
    mo.add_argument("action", nargs="?", choices=["list", "switch"], default="list")
    mo.add_argument("--to", help="switch: a collection or model label (default: the model Triton serves now)")
    mo.add_argument("--force", action="store_true", help="switch even if the collection lacks drops")
    mo.add_argument("--json", action="store_true")
    mo.set_defaults(func=cmd_models)
    sub.add_parser(
        "reembed", help="re-embed every drop with the current model (a backfill the daemon runs)"
    ).set_defaults(func=cmd_reembed)
    mr = sub.add_parser("model-repository", help="write a ready-to-serve Triton model repository for the model")
    mr.add_argument("out_dir", help="repository folder (created; the model goes into OUT_DIR/NAME)")
    mr.add_argument(
        "--flavour",
        choices=["python", "onnxruntime"],
        default="python",
        help="python: python backend + ONNX Runtime (the bundled server); onnxruntime: NVIDIA's "
        "Triton containers' ONNX Runtime backend",
    )
    mr.add_argument("--model", help="ONNX file (default: triton.model_path, else the default model)")
    mr.add_argument("--name", help="model name (default: triton.model_name)")
    mr.add_argument("--max-batch-size", type=int, help="default: triton.max_batch_size")
    mr.add_argument("--instances", type=int, default=1, help="model instances (default 1)")
    mr.add_argument("--cpu", action="store_true", help="onnxruntime flavour: KIND_CPU instances instead of KIND_GPU")
    mr.add_argument(
        "--tensorrt",
        nargs="?",
        const="FP16",
        choices=["FP16", "FP32"],
        help="onnxruntime flavour: run through TensorRT (precision, default FP16)",
    )
    mr.set_defaults(func=cmd_model_repository)
    be = sub.add_parser(
        "bench",
        help="benchmarks that print figures against baselines measured in the same run; without a "
        "subcommand: embedding extraction, insert and search, on servers started for the run",
    )
    be.add_argument(
        "what",
        nargs="?",
        choices=["preprocess", "ingest", "api", "integrity", "duplicates", "export", "quality"],
        help="preprocess: decode + JAX vs Pillow; ingest: memory of a whole drop; api: search latency "
        "through the HTTP API under concurrent load; integrity: the guarded reader and fsync against "
        "plain reads and page-cache writes; duplicates: the near-duplicate threshold from altered photos, "
        "and group search vs brute force; export: Parquet export throughput and peak memory; quality: finding the "
        "original of altered copies per descriptor recipe (default: none of these)",
    )
    be.add_argument(
        "--images",
        type=int,
        help="photos to embed / images to process (default 3000 / 512 / 5000); quality: originals used (default all)",
    )
    be.add_argument("--baseline-images", type=int, default=500, help="ingest: the small drop compared against")
    be.add_argument(
        "--drops-uri",
        help="ingest: also ingest the large drop from this s3://bucket/prefix (outputs there too), against local",
    )
    be.add_argument(
        "--shard-items",
        type=int,
        help="ingest: also ingest the large drop in shards of this many items (parallel steps), against unsharded",
    )
    be.add_argument(
        "--sizes",
        type=lambda v: _csv(int, v),
        default=[10_000, 100_000],
        help="collection sizes, comma-separated (default 10000,100000)",
    )
    be.add_argument(
        "--stores",
        type=lambda v: _csv(str, v),
        default=["lite", "standalone"],
        help="lite (milvus-lite) and/or standalone (Milvus 2.3.5), comma-separated (default both)",
    )
    be.add_argument(
        "--index-type",
        choices=["FLAT", "IVF_FLAT", "HNSW"],
        type=str.upper,
        help="vector index (default: milvus.index_type)",
    )
    be.add_argument("--queries", type=int, default=1000, help="search queries per kind (default 1000)")
    be.add_argument(
        "--dim",
        type=int,
        help="vector dimension (default: the model's; another one skips real "
        "embeddings and measures recall on synthetic vectors)",
    )
    be.add_argument(
        "--search-budget-s",
        type=float,
        default=60.0,
        help="stop a kind of search after this many seconds (default 60; JSON-path filters are slow)",
    )
    be.add_argument("--requests", type=int, default=2000, help="api: search requests per kind (default 2000)")
    be.add_argument("--clients", type=int, default=8, help="api: concurrent clients (default 8)")
    be.add_argument(
        "--url",
        help="api: an HTTP API already running on loopback (default: the configured one, "
        "started if needed, with a collection of its own)",
    )
    be.add_argument("--rows", type=int, default=100_000, help="export: rows in its collection (default 100000)")
    be.add_argument(
        "--vectors", type=int, default=10_000, help="api, duplicates: vectors in its own collection (default 10000)"
    )
    be.add_argument("--collection", help="api with --url: the collection to search (default: the API's default)")
    be.add_argument("--json", action="store_true")
    be.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "config", None):
        # Exported (absolute) so the processes this command starts — Dagster, the API — read the same file.
        os.environ[CONFIG_ENV] = str(Path(args.config).resolve())
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # ServiceError, client errors: already say what and where
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
