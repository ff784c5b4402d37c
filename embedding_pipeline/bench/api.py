"""``embedding-pipeline bench api``: search latency through the HTTP API under concurrent load, on loopback.

N search requests per kind from C client threads, each with its own keep-alive HTTP session, the way several
interactive users would call ``POST /search``:

- **by vector**: a JSON body with a query vector (the API's fast path: no image work, one Milvus search);
- **by image**: a multipart upload of a 640×480 JPEG (decode, preprocessing, Triton, then the same search).

Each request is timed from sending to having read the whole answer; an error is any status but 200, a broken
connection, or an answer without ``results``. Requests per second is the kind's requests over its wall time.

Without ``--url`` the benchmark uses the configured services and the HTTP API on 127.0.0.1 (starting what is not
running, and stopping afterwards only what it started), creates its own collection through the API, fills it with
synthetic unit vectors directly in Milvus (waiting for the index to cover them), and drops it at the end. With
``--url`` it loads an API that is already running, on its existing collection; the URL must be a loopback one:
this is a local benchmark, not a load generator for other machines.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import threading
import time
from typing import Any, Callable
from urllib.parse import urlsplit

import numpy as np
import requests

from embedding_pipeline.bench import extraction
from embedding_pipeline.settings import Settings

TARGET_VECTOR_P99_MS = 25.0
TARGET_IMAGE_P99_MS = 100.0
TARGET_IMAGE_TO_MODEL = 0.6  # by-image requests/s vs the model alone on batches of MODEL_BATCH images
MODEL_BATCH = 8
MODEL_SECONDS = 5.0
COLLECTION = "bench_api"
TOP_K = 10
QUERY_IMAGES = 16  # distinct JPEGs the image queries rotate through
WARMUP_PER_CLIENT = 3  # untimed requests per client before each kind (first searches open and compile things)
REQUEST_TIMEOUT_S = 60.0
API_KEY_ENV = "EMBEDDING_PIPELINE_API_KEY"
ERROR_SAMPLES = 5


# -- where and how to call ------------------------------------------------------------------------------------


def require_loopback(url: str) -> str:
    """``url`` without a trailing slash, if it is an http URL on a loopback address; ValueError otherwise."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme != "http" or not host:
        raise ValueError(f"--url must be an http:// URL such as http://127.0.0.1:18080, not {url!r}")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(
            f"--url must point at this machine (127.0.0.1, ::1 or localhost), not {host!r}: "
            "the API benchmark runs on loopback only"
        )
    return url.rstrip("/")


def auth_headers() -> dict[str, str]:
    """The API key header when the key is set in this environment (an API started from here enforces it)."""
    key = os.environ.get(API_KEY_ENV, "")
    return {"X-API-Key": key} if key else {}


def _answer(response: requests.Response) -> str:
    try:
        error = response.json().get("error") or {}
        return f"{error.get('code')}: {error.get('message')}"
    except ValueError:
        return response.text[:300]


# -- figures --------------------------------------------------------------------------------------------------


def figures(ms: list[float], errors: int, wall_s: float, took_ms: list[float]) -> dict[str, Any]:
    """Count, errors, latency percentiles and max (ms), requests/s, and the server's own median ``took_ms``."""
    values = np.asarray(ms or [0.0], dtype=np.float64)
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    count = len(ms) + errors
    return {
        "requests": count,
        "errors": errors,
        "p50_ms": round(float(p50), 2),
        "p95_ms": round(float(p95), 2),
        "p99_ms": round(float(p99), 2),
        "max_ms": round(float(values.max()), 2),
        "mean_ms": round(float(values.mean()), 2),
        "requests_per_s": round(count / wall_s, 1) if wall_s > 0 else 0.0,
        "seconds": round(wall_s, 2),
        # The time the API spent inside the search itself: the rest of a request's latency is HTTP, JSON,
        # queueing behind the other clients and the client's own work.
        "server_took_p50_ms": round(float(np.median(took_ms)), 2) if took_ms else None,
    }


# -- the load -------------------------------------------------------------------------------------------------

Send = Callable[[requests.Session, int], requests.Response]


def load(send: Send, total: int, clients: int, headers: dict[str, str]) -> dict[str, Any]:
    """``total`` calls of ``send(session, i)`` spread over ``clients`` threads with one session each; figures."""
    counter = itertools.count()  # next() on it is atomic: each request number goes to exactly one thread
    lock = threading.Lock()
    ms: list[float] = []
    took: list[float] = []
    samples: list[str] = []
    errors = 0
    start = threading.Barrier(clients + 1)

    def client() -> None:
        nonlocal errors
        with requests.Session() as session:
            session.headers.update(headers)
            for i in range(WARMUP_PER_CLIENT):  # also opens the keep-alive connection
                try:
                    _ = send(session, i).content  # read the body, as the measured requests do
                except requests.RequestException:
                    pass  # counted when it happens in the measured part
            start.wait()
            while (i := next(counter)) < total:
                t0 = time.perf_counter()
                problem = None
                try:
                    response = send(session, i)
                    body = response.content
                    elapsed = (time.perf_counter() - t0) * 1000
                    if response.status_code != 200:
                        problem = f"HTTP {response.status_code}: {_answer(response)}"
                    else:
                        answer = json.loads(body)
                        if not isinstance(answer.get("results"), list):
                            problem = f"HTTP 200 without results: {body[:200]!r}"
                except (requests.RequestException, ValueError) as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                with lock:
                    if problem is None:
                        ms.append(elapsed)
                        if isinstance(answer.get("took_ms"), (int, float)):
                            took.append(float(answer["took_ms"]))
                    else:
                        errors += 1
                        if len(samples) < ERROR_SAMPLES:
                            samples.append(problem)

    threads = [threading.Thread(target=client, name=f"bench-api-client-{n}", daemon=True) for n in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    t0 = time.perf_counter()
    for thread in threads:
        thread.join()
    result = figures(ms, errors, time.perf_counter() - t0, took)
    result["error_samples"] = samples
    return result


def vector_sender(url: str, queries: np.ndarray, collection: str | None, topk: int) -> Send:
    """Search by vector: JSON bodies encoded once up front, so the clients measure the API, not json.dumps."""
    bodies = []
    for vector in queries:
        body: dict[str, Any] = {"vector": [float(v) for v in vector], "topk": topk}
        if collection:
            body["collection_name"] = collection
        bodies.append(json.dumps(body).encode())

    def send(session: requests.Session, i: int) -> requests.Response:
        return session.post(
            f"{url}/search",
            data=bodies[i % len(bodies)],
            timeout=REQUEST_TIMEOUT_S,
            headers={"Content-Type": "application/json"},
        )

    return send


def image_sender(url: str, images: list[bytes], collection: str | None, topk: int) -> Send:
    """Search by image: a multipart upload (field ``file``) of one of the query JPEGs in turn."""
    form = {"topk": str(topk)}
    if collection:
        form["collection_name"] = collection

    def send(session: requests.Session, i: int) -> requests.Response:
        files = {"file": (f"query-{i % len(images)}.jpg", images[i % len(images)], "image/jpeg")}
        return session.post(f"{url}/search", data=form, files=files, timeout=REQUEST_TIMEOUT_S)

    return send


def query_images(count: int = QUERY_IMAGES) -> list[bytes]:
    from embedding_pipeline.bench import synthetic

    return list(synthetic.jpegs(count, seed=7))


# -- the collection -------------------------------------------------------------------------------------------


def probe_dimension(url: str, collection: str | None, headers: dict[str, str]) -> int:
    """The vector dimension of ``collection`` as the API reports it: a one-component query is refused with
    ``dimension_mismatch`` naming the expected size (the API has no endpoint that describes a collection)."""
    body: dict[str, Any] = {"vector": [1.0], "topk": 1}
    if collection:
        body["collection_name"] = collection
    response = requests.post(f"{url}/search", json=body, headers=headers, timeout=REQUEST_TIMEOUT_S)
    if response.status_code == 200:
        return 1
    error = (response.json() if response.headers.get("content-type", "").startswith("application/json") else {}).get(
        "error"
    ) or {}
    details = error.get("details") or {}
    if error.get("code") == "dimension_mismatch" and isinstance(details.get("expected"), int):
        return details["expected"]
    raise RuntimeError(
        f"cannot search collection {collection or '(default)'} at {url}: HTTP "
        f"{response.status_code} {_answer(response)} (ingest something into it first, or run "
        "without --url to let the benchmark make its own collection)"
    )


def fill_collection(settings: Settings, url: str, vectors: int, headers: dict[str, str]) -> dict[str, Any]:
    """Create the benchmark's collection through the API and fill it with ``vectors`` synthetic unit vectors
    (straight into Milvus: ingest through Dagster is not what is measured); waits until they are indexed."""
    from embedding_pipeline.bench import corpus as corpus_mod
    from embedding_pipeline.bench.insert import build_index
    from embedding_pipeline.index.client import ImageIndex
    from embedding_pipeline.index.server import NAME as MILVUS
    from embedding_pipeline.runtime import processes

    response = requests.post(
        f"{url}/collections/create", json={"name": COLLECTION}, headers=headers, timeout=REQUEST_TIMEOUT_S
    )
    if response.status_code not in (200, 201):
        raise RuntimeError(f"cannot create collection {COLLECTION!r}: HTTP {response.status_code} {_answer(response)}")
    created = response.json()
    corpus = corpus_mod.build(vectors, created["dim"], real=None, photos=None, queries=1000)
    milvus = settings.milvus.model_copy(update={"collection": created["collection"]})
    with ImageIndex(milvus, model_label=created["model"]) as index:
        step = index.settings.insert_batch_size
        done = sum(index.upsert(rows) for rows in corpus.batches(step, created["model"]))
        # milvus-lite builds its index in the background after a flush: wait for its CPU to go quiet so the
        # measured searches use the finished index (and do not share the cores with the build).
        server = processes.read(settings.paths.run, MILVUS)
        build_index(index, done, server.pid if server else None)
    return {
        "collection": COLLECTION,
        "resolved_collection": created["collection"],
        "vectors": done,
        "dim": created["dim"],
        "index_type": created["index_type"],
        "queries": corpus.queries,
    }


def drop_collection(settings: Settings) -> None:
    from embedding_pipeline.index.collections import ModelCollections

    collections = ModelCollections(settings.milvus.model_copy(update={"collection": COLLECTION}))
    try:
        collections.drop_all()
    finally:
        collections.close()


# -- the benchmark --------------------------------------------------------------------------------------------


def measure(
    url: str,
    queries: np.ndarray,
    collection: str | None,
    requests_per_kind: int,
    clients: int,
    topk: int,
    headers: dict[str, str],
) -> dict[str, Any]:
    by_vector = load(vector_sender(url, queries, collection, topk), requests_per_kind, clients, headers)
    by_image = load(image_sender(url, query_images(), collection, topk), requests_per_kind, clients, headers)
    return {
        "by_vector": by_vector,
        "by_image": by_image,
        "target_vector_p99_ms": TARGET_VECTOR_P99_MS,
        "vector_p99_target_met": by_vector["errors"] == 0 and by_vector["p99_ms"] <= TARGET_VECTOR_P99_MS,
        "target_image_p99_ms": TARGET_IMAGE_P99_MS,
        "image_p99_target_met": by_image["errors"] == 0 and by_image["p99_ms"] <= TARGET_IMAGE_P99_MS,
        "errors": by_vector["errors"] + by_image["errors"],
    }


def with_model_ratio(result: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    """``result`` with the model-only figure and the by-image throughput ratio to it, against its target."""
    ratio = result["by_image"]["requests_per_s"] / model["images_per_s"] if model["images_per_s"] else 0.0
    return {
        **result,
        "model_only": model,
        "image_to_model_ratio": round(ratio, 3),
        "target_image_to_model_ratio": TARGET_IMAGE_TO_MODEL,
        "image_to_model_target_met": ratio >= TARGET_IMAGE_TO_MODEL,
    }


def run(
    settings: Settings,
    requests_per_kind: int = 2000,
    clients: int = 8,
    url: str | None = None,
    vectors: int = 10_000,
    collection: str | None = None,
    topk: int = TOP_K,
) -> dict[str, Any]:
    """Every figure of the API benchmark; see the module docstring for what is started and measured."""
    if requests_per_kind < 1 or clients < 1 or vectors < 1:
        raise ValueError("--requests, --clients and --vectors must be positive")
    if not 1 <= topk <= settings.api.max_topk:
        raise ValueError(f"topk must be 1..{settings.api.max_topk}")
    headers = auth_headers()
    config = {"requests_per_kind": requests_per_kind, "clients": clients, "topk": topk}
    if url is not None:
        url = require_loopback(url)
        dim = probe_dimension(url, collection, headers)
        from embedding_pipeline.bench import corpus as corpus_mod

        queries = corpus_mod.synthetic(1000, dim, seed=11)
        result = measure(url, queries, collection, requests_per_kind, clients, topk, headers)
        return {
            "url": url,
            "collection": collection or "(the API's default)",
            "dim": dim,
            "started": [],
            **config,
            **result,
        }
    return _run_own(settings, requests_per_kind, clients, vectors, topk, headers, config)


def _run_own(
    settings: Settings,
    requests_per_kind: int,
    clients: int,
    vectors: int,
    topk: int,
    headers: dict[str, str],
    config: dict[str, Any],
) -> dict[str, Any]:
    from embedding_pipeline import services
    from embedding_pipeline.runtime import processes

    if settings.api.host not in ("127.0.0.1", "::1", "localhost"):
        raise ValueError(f"api.host is {settings.api.host!r}: the API benchmark runs the API on loopback only")
    started = services.start_services(settings)
    api_started = False
    try:
        if processes.read(settings.paths.run, services.API) is None:
            services.start_api(settings)
            api_started = True
            started.append(services.API)
        url = services.api_url(settings)
        _wait_until_serving(url, headers)
        try:
            filled = fill_collection(settings, url, vectors, headers)
            queries = filled.pop("queries")
            result = measure(url, queries, COLLECTION, requests_per_kind, clients, topk, headers)
            result = with_model_ratio(result, extraction.served_model_only(settings, MODEL_BATCH, MODEL_SECONDS))
        finally:
            if api_started:  # the API holds a searcher on the collection: stop it before dropping
                services.stop_api(settings)
                api_started = False
            drop_collection(settings)
    finally:
        if api_started:
            services.stop_api(settings)
        # Leave running what was running before.
        services.stop_services(settings, only=[name for name in started if name != services.API])
    return {"url": url, **filled, "started": started, **config, **result}


def _wait_until_serving(url: str, headers: dict[str, str], timeout_s: float = 60.0) -> None:
    """The API's port opens before its application has started up: wait for an answer to a real request."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if requests.get(f"{url}/openapi.json", headers=headers, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the HTTP API at {url} does not answer GET /openapi.json")
        time.sleep(0.2)


def render(r: dict[str, Any]) -> str:
    """The figures as a table."""
    where = f"{r['collection']} at {r['url']}"
    if "vectors" in r:
        where += f" ({r['vectors']:,} vectors, {r['dim']}-d, {r['index_type']})"
    rows = [("", "by vector", "by image")]
    for label, key in (
        ("requests", "requests"),
        ("errors", "errors"),
        ("p50 (ms)", "p50_ms"),
        ("p95 (ms)", "p95_ms"),
        ("p99 (ms)", "p99_ms"),
        ("max (ms)", "max_ms"),
        ("requests/s", "requests_per_s"),
        ("server took, p50 (ms)", "server_took_p50_ms"),
    ):
        rows.append((label, str(r["by_vector"][key]), str(r["by_image"][key])))
    width = max(len(row[0]) for row in rows) + 2
    lines = [
        f"HTTP API search benchmark: {where}",
        f"  {r['requests_per_kind']} requests per kind from {r['clients']} concurrent "
        f"client{'s' if r['clients'] != 1 else ''}, top-{r['topk']}",
    ]
    lines += [f"  {a:<{width}}{b:>12}{c:>12}" for a, b, c in rows]
    met = "met" if r["vector_p99_target_met"] else "NOT met"
    lines.append(f"  target: p99 <= {r['target_vector_p99_ms']:g} ms by vector with no errors: {met}")
    if "target_image_p99_ms" in r:
        met = "met" if r["image_p99_target_met"] else "NOT met"
        lines.append(f"  target: p99 <= {r['target_image_p99_ms']:g} ms by image with no errors: {met}")
    if "model_only" in r:
        m = r["model_only"]
        met = "met" if r["image_to_model_target_met"] else "NOT met"
        lines.append(
            f"  model alone, batches of {m['batch']}: {m['images_per_s']} images/s; by-image requests/s / that "
            f"{r['image_to_model_ratio']:.2f} (target >= {r['target_image_to_model_ratio']:g}: {met})"
        )
    for kind in ("by_vector", "by_image"):
        for sample in r[kind]["error_samples"]:
            lines.append(f"  error ({kind.replace('_', ' ')}): {sample}")
    return "\n".join(lines)
