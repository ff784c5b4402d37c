"""Section 2 of ``embedding-pipeline bench``: inserting vectors, and building the index.

Our path is :meth:`ImageIndex.upsert` with the rows the pipeline writes (string ids, lineage fields, metadata
with a declared filter key). The reference is the plainest bulk load pymilvus offers: ``insert`` of
``{id, vector}`` rows, in batches of up to 32 MB, into a scratch collection with the same vector index on the
same server. Both collections are indexed and loaded while rows arrive, so the server does the same indexing
work in both cases and the difference is the client path and the extra fields.

The index build is timed on its own: from the last insert to a flushed, fully indexed, reloaded collection.
"""

from __future__ import annotations

import time
from typing import Any

from embedding_pipeline.bench.corpus import Corpus
from embedding_pipeline.bench.servers import wait_until_idle
from embedding_pipeline.index import params as index_params
from embedding_pipeline.index.client import ImageIndex, connect
from embedding_pipeline.settings import MilvusSettings

TARGET_VECTORS_PER_S = 5000
TARGET_RATIO_TO_RAW = 0.9  # ImageIndex.upsert vs a raw pymilvus insert on the same store
COLLECTION = "bench_seed"
RAW_COLLECTION = "bench_seed_raw"
RAW_BATCH_BYTES = 32 * 1024 * 1024
ROWS_PER_CALL = 10  # ImageIndex.upsert receives this many of its own insert batches per call
INDEX_TIMEOUT_S = 1800.0


def insert_ours(index: ImageIndex, corpus: Corpus, model: str) -> dict[str, Any]:
    """Create the collection (index defined, loaded) and upsert every row through ImageIndex; timed."""
    index.ensure_collection(corpus.dim)
    step = index.settings.insert_batch_size * ROWS_PER_CALL
    started, cpu = time.perf_counter(), time.process_time()
    done = sum(index.upsert(rows) for rows in corpus.batches(step, model))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    if done != corpus.size:
        raise RuntimeError(f"upserted {done} of {corpus.size} rows into {index.collection!r}")
    return _figures(done, elapsed, cpu, index.settings.insert_batch_size)


def _figures(rows: int, elapsed: float, cpu: float, batch_rows: int) -> dict[str, Any]:
    # The client's own CPU time tells how much of an insert is ours (building rows, packing protobuf) and how
    # much the server's (the rest of the wall time, on the same cores).
    return {
        "rows": rows,
        "seconds": round(elapsed, 2),
        "vectors_per_s": round(rows / elapsed, 1),
        "batch_rows": batch_rows,
        "client_cpu_s": round(cpu, 2),
    }


def build_index(index: ImageIndex, size: int, server_pid: int | None) -> dict[str, Any]:
    """Flush, wait until the vector index covers every row, then release and reload; timed.

    Milvus standalone reports indexing progress (``indexed_rows``). milvus-lite reports every index finished
    at once while it builds on a background thread, and searches unindexed segments by brute force meanwhile;
    so for it we also wait for the server's CPU to go quiet. Reloading makes the searches that follow use the
    finished index everywhere.
    """
    client, name = index.client, index.collection
    started = time.perf_counter()
    client.flush(name)
    deadline = time.monotonic() + INDEX_TIMEOUT_S
    while True:
        info = _vector_index(client, name)
        if int(info.get("indexed_rows", 0)) >= size and int(info.get("pending_index_rows", 0)) == 0:
            break
        if info.get("state") == "Failed" or time.monotonic() > deadline:
            raise RuntimeError(f"index on {name!r} did not finish: {info}")
        time.sleep(0.5)
    quiet_s = 0.0
    if server_pid is not None:
        wait_until_idle(server_pid)
        quiet_s = 1.0  # the quiet second that proved the build over is not build time
    client.release_collection(name)
    client.load_collection(name)
    elapsed = max(time.perf_counter() - started - quiet_s, 0.0)
    return {"seconds": round(elapsed, 2), "indexed_rows": int(info.get("indexed_rows", 0))}


def _vector_index(client, collection: str) -> dict[str, Any]:  # noqa: ANN001 - a MilvusClient
    """The embedding field's index description, whatever name the server gave the index."""
    names = client.list_indexes(collection, field_name="embedding") or ["embedding"]
    return dict(client.describe_index(collection, names[0]) or {})


def insert_raw(settings: MilvusSettings, corpus: Corpus) -> dict[str, Any]:
    """The reference: plain pymilvus ``insert`` of {id, vector} rows into a scratch collection; timed."""
    from pymilvus import DataType, MilvusClient

    client = connect(settings)
    try:
        drop(client, RAW_COLLECTION)
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=corpus.dim)
        index = client.prepare_index_params()
        # The same vector index as ours, parameters nested the way every engine reads them.
        index.add_index(
            field_name="embedding",
            index_type=settings.index_type,
            metric_type=settings.metric_type,
            params={"params": index_params.build_params(settings)},
        )
        client.create_collection(RAW_COLLECTION, schema=schema, index_params=index)
        step = max(1, RAW_BATCH_BYTES // (corpus.dim * 4))
        vectors = corpus.vectors
        started, cpu = time.perf_counter(), time.process_time()
        done = 0
        for start in range(0, corpus.size, step):
            stop = min(start + step, corpus.size)
            # pymilvus converts numpy rows itself: no list is made here.
            result = client.insert(RAW_COLLECTION, [{"id": i, "embedding": vectors[i]} for i in range(start, stop)])
            done += int(result["insert_count"])
        return _figures(done, time.perf_counter() - started, time.process_time() - cpu, step)
    finally:
        try:
            drop(client, RAW_COLLECTION)
        finally:
            client.close()


def drop(client, collection: str) -> None:  # noqa: ANN001 - a MilvusClient
    """Release, then drop ``collection`` if it exists. Milvus 2.3.5 standalone, asked to stop after a loaded
    collection was dropped, hangs until it is killed (30 s here); released first, it stops at once."""
    if client.has_collection(collection):
        client.release_collection(collection)
        client.drop_collection(collection)
