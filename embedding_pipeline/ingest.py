"""The four stages of ingesting one drop, as plain functions (the Dagster assets only call these).

manifest → preprocessed tensor batches → embeddings → Milvus rows. Each stage reads the previous stage's files
under ``<home>/data`` and returns a summary whose values become the asset's materialization metadata.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from embedding_pipeline.preprocess.preprocessor import Preprocessor
from embedding_pipeline.preprocess.spec import TensorSpec
from embedding_pipeline.settings import Settings
from embedding_pipeline.sources.drops import find_drop
from embedding_pipeline.sources.items import OK, Item, collect_items
from embedding_pipeline.storage import arrow

EXAMPLES = 5


class Embedder(Protocol):
    def embed(self, batch: np.ndarray) -> np.ndarray: ...

    def model_version_label(self) -> str: ...


@dataclass(frozen=True)
class DropFiles:
    """Where one drop's stage outputs live."""

    data: Path
    drop: str

    @property
    def manifest(self) -> Path:
        return self.data / "manifests" / f"{self.drop}.arrow"

    @property
    def preprocessed(self) -> Path:
        return self.data / "preprocessed" / self.drop

    @property
    def embeddings(self) -> Path:
        return self.data / "embeddings" / self.drop

    @property
    def blobs(self) -> Path:
        return self.data / "blobs"


def drop_files(settings: Settings, drop: str) -> DropFiles:
    return DropFiles(settings.paths.data, drop)


def _failure_summary(errors: list[tuple[str, str]]) -> dict[str, Any]:
    kinds = Counter(msg.split(":")[0] for _, msg in errors)
    return {
        "failures_by_kind": dict(kinds),
        "failure_examples": [{"id": i, "error": e} for i, e in errors[:EXAMPLES]],
    }


MANIFEST_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("uri", pa.string()),
        ("metadata", pa.string()),
        ("sha256", pa.string()),
        ("size", pa.int64()),
        ("source", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)


def build_manifest(settings: Settings, drop_name: str) -> dict[str, Any]:
    """List the drop's items, read each once, hash it, check it is an image, and record a status per item."""
    started = time.perf_counter()
    drop = find_drop(settings.drops, drop_name)
    files = drop_files(settings, drop_name)
    items = collect_items(drop, settings.sources, files.blobs)
    columns = {name: [] for name in MANIFEST_SCHEMA.names}
    for item in items:
        row = item.as_row()
        row["metadata"] = json.dumps(item.metadata, sort_keys=True, default=str)
        for name in columns:
            columns[name].append(row[name])
    arrow.write_table(files.manifest, pa.Table.from_pydict(columns, schema=MANIFEST_SCHEMA))
    status = Counter(i.status for i in items)
    return {
        "items": len(items),
        "ok": status.get(OK, 0),
        "failed": status.get("failed", 0),
        "skipped": status.get("skipped", 0),
        "bytes": sum(i.size for i in items if i.status == OK),
        "seconds": round(time.perf_counter() - started, 3),
        **_failure_summary([(i.id, i.error) for i in items if i.status == "failed"]),
    }


def read_manifest(settings: Settings, drop_name: str) -> list[Item]:
    table = arrow.read_table(drop_files(settings, drop_name).manifest)
    items = []
    for row in table.to_pylist():
        row["metadata"] = json.loads(row["metadata"])
        items.append(Item(**row))
    return items


def preprocess_drop(settings: Settings, drop_name: str, spec: TensorSpec) -> dict[str, Any]:
    """Decode the drop's good items and turn them into the model's input, one Arrow file per batch."""
    started = time.perf_counter()
    files = drop_files(settings, drop_name)
    items = [i for i in read_manifest(settings, drop_name) if i.status == OK]
    size = settings.preprocess.batch_size
    prep = Preprocessor(spec, settings.preprocess.resize_size, size, settings.paths.jax_cache)
    schema = arrow.tensor_schema(spec.shape, spec.dtype, {"drop": drop_name, "layout": _layout(spec)})
    errors: list[tuple[str, str]] = []
    written = 0
    kernel_s = 0.0
    with arrow.DropWriter(files.preprocessed) as writer:
        for start in range(0, len(items), size):
            chunk = items[start : start + size]
            blobs, vanished = [], {}
            for item in chunk:
                try:
                    data = Path(item.source).read_bytes()
                except OSError as exc:
                    data = b""
                    vanished[item.id] = f"source vanished since the manifest was built: {exc.strerror}"
                if data and hashlib.sha256(data).hexdigest() != item.sha256:
                    # The recorded sha256 is the row's lineage: never embed other bytes under it.
                    data = b""
                    vanished[item.id] = "source changed since the manifest was built (re-run the drop)"
                blobs.append(data)
            t0 = time.perf_counter()
            prepared = prep.prepare(blobs)
            kernel_s += time.perf_counter() - t0
            for item, err in zip(chunk, prepared.errors):
                if err is not None:
                    errors.append((item.id, vanished.get(item.id, err)))
            good = [chunk[i] for i in prepared.ok_positions]
            if good:
                rows = {"id": [i.id for i in good], "drop": [drop_name] * len(good),
                        "sha256": [i.sha256 for i in good], "uri": [i.uri for i in good]}
                writer.write(arrow.tensor_table(rows, prepared.tensors, schema))
                written += len(good)
        writer.commit()
    (files.preprocessed / "failures.json").write_text(json.dumps([{"id": i, "error": e} for i, e in errors]))
    elapsed = time.perf_counter() - started
    return {
        "images": written,
        "failed": len(errors),
        "batches": len(writer.files),
        "bytes": writer.bytes,
        "tensor": f"{_layout(spec)} {spec.dtype} {list(spec.shape)}",
        "seconds": round(elapsed, 3),
        "images_per_s": round(written / elapsed, 1) if elapsed else 0.0,
        "decode_and_kernel_seconds": round(kernel_s, 3),
        **_failure_summary(errors),
    }


def _layout(spec: TensorSpec) -> str:
    return "CHW" if spec.channels_first else "HWC"


def embed_drop(settings: Settings, drop_name: str, embedder: Embedder) -> dict[str, Any]:
    """Send every tensor batch through the model and store the vectors with their lineage and model version."""
    started = time.perf_counter()
    files = drop_files(settings, drop_name)
    metadata = {i.id: json.dumps(i.metadata, sort_keys=True, default=str) for i in read_manifest(settings, drop_name)}
    model = embedder.model_version_label()
    count, dim, infer_s = 0, None, 0.0
    with arrow.DropWriter(files.embeddings) as writer:
        for table in arrow.read_batches(files.preprocessed):
            t0 = time.perf_counter()
            vectors = embedder.embed(arrow.tensors_of(table))
            infer_s += time.perf_counter() - t0
            dim = int(vectors.shape[1])
            rows = table.select(["id", "drop", "sha256", "uri"]).to_pydict()
            rows["model"] = [model] * table.num_rows
            rows["metadata"] = [metadata.get(i, "{}") for i in rows["id"]]
            writer.write(arrow.embedding_table(rows, vectors, arrow.embedding_schema(dim, {"model": model})))
            count += table.num_rows
        writer.commit()
    elapsed = time.perf_counter() - started
    return {
        "embeddings": count,
        "dimension": dim or 0,
        "model": model,
        "bytes": writer.bytes,
        "seconds": round(elapsed, 3),
        "inference_seconds": round(infer_s, 3),
        "images_per_s": round(count / elapsed, 1) if elapsed else 0.0,
    }


def index_drop(settings: Settings, drop_name: str, index) -> dict[str, Any]:
    """Upsert the drop's vectors by id and remove rows of this drop that are no longer in it."""
    started = time.perf_counter()
    files = drop_files(settings, drop_name)
    ids: set[str] = set()
    upserted = 0
    ensured = False
    for table in arrow.read_batches(files.embeddings):
        vectors = arrow.vectors_of(table)
        if not ensured:
            index.ensure_collection(int(vectors.shape[1]))
            ensured = True
        cols = table.select(["id", "drop", "sha256", "uri", "model", "metadata"]).to_pydict()
        rows = [
            {"id": cols["id"][k], "embedding": vectors[k], "uri": cols["uri"][k], "sha256": cols["sha256"][k],
             "drop": drop_name, "model": cols["model"][k], "metadata": json.loads(cols["metadata"][k])}
            for k in range(table.num_rows)
        ]
        upserted += index.upsert(rows)
        ids.update(cols["id"])
    # A drop with no good image still removes its old rows, if the collection exists at all.
    present = ensured or index.exists()
    stale = index.delete_ids(index.drop_ids(drop_name) - ids) if present else 0
    elapsed = time.perf_counter() - started
    return {
        "upserted": upserted,
        "removed_stale": stale,
        "drop_rows": index.count_drop(drop_name) if present else 0,
        "collection": index.collection,
        "collection_rows": index.count() if present else 0,
        "seconds": round(elapsed, 3),
        "vectors_per_s": round(upserted / elapsed, 1) if elapsed else 0.0,
    }
