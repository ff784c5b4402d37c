"""The four stages of ingesting one drop, as plain functions (the Dagster assets only call these).

manifest → preprocessed tensor batches → embeddings → Milvus rows. Each stage reads the previous stage's files
under ``<home>/data`` and returns a typed summary whose ``as_dict()`` becomes the asset's materialization metadata.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import time
from collections import Counter, defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import Field, dataclass, field, fields, replace
from pathlib import Path
from typing import AbstractSet, Any, Callable, ClassVar, Iterator, Protocol, Sequence, TypeVar

import numpy as np
import pyarrow as pa

from embedding_pipeline.index.client import MAX_DROPS_PER_ROW
from embedding_pipeline.preprocess.preprocessor import SourceError, for_model
from embedding_pipeline.runtime import progress
from embedding_pipeline.runtime.locks import drop_lock, membership_lock
from embedding_pipeline.runtime.objects import ObjectPath, ObjectStore, is_object_uri
from embedding_pipeline.settings import QualitySettings, Settings, object_store
from embedding_pipeline.sources.drops import find_drop
from embedding_pipeline.sources.fetch import FetchError, read_local
from embedding_pipeline.sources.items import (
    FAILED,
    OK,
    SKIPPED,
    Item,
    collect_items,
    is_transient,
    object_prefixes,
    read_object,
)
from embedding_pipeline.sources.statuses import ErrorKind
from embedding_pipeline.storage import arrow
from embedding_pipeline.storage.layout import MANIFEST_SCHEMA, drop_files
from embedding_pipeline.vectors import sound_vectors, unit_normalised

EXAMPLES = 5


class Embedder(Protocol):
    """What the embed stage needs from a model client. An ``embed_stream(batches) -> Iterator[np.ndarray]`` method
    is used when present (the Triton client has one: requests stay in flight while the next file is read)."""

    def embed(self, batch: np.ndarray) -> np.ndarray: ...

    def model_version_label(self) -> str: ...


def _failure_summary(failures: list[dict[str, str]]) -> dict[str, Any]:
    kinds = Counter(f["error_kind"] or "error" for f in failures)
    return {
        "failures_by_kind": dict(sorted(kinds.items())),
        "failure_examples": failures[:EXAMPLES],
    }


_S = TypeVar("_S")
_V = TypeVar("_V")


def _under_drop_lock(stage: Callable[..., _S]) -> Callable[..., _S]:
    """Run a stage ``stage(settings, drop_name, ...)`` holding the drop's lock: retention never deletes a drop under
    a running stage of it, whatever runs the stage (a Dagster run, the CLI, a test)."""

    @functools.wraps(stage)
    def run(settings: Settings, drop_name: str, *args: Any, **kwargs: Any) -> _S:
        with drop_lock(settings.paths.locks, drop_name):
            return stage(settings, drop_name, *args, **kwargs)

    return run


class StageSummary:
    """What a stage reports; the asset shows ``as_dict()`` as its materialization metadata, key for key, in field
    order. A field declared ``_optional()`` is left out of the dict while it is ``None``."""

    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]  # every subclass is a dataclass

    def as_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.metadata.get("optional"):
                continue
            out[f.name] = value
        return out


def _optional() -> Any:
    """A summary field that only some runs of a stage report (absent from ``as_dict()`` while ``None``)."""
    return field(default=None, metadata={"optional": True})


@dataclass(frozen=True, kw_only=True)
class ManifestSummary(StageSummary):
    """The drop's items by status, with failures by kind."""

    items: int
    ok: int
    failed: int
    skipped: int
    bytes: int  # of the ok items
    seconds: float
    failures_by_kind: dict[str, int]
    failure_examples: list[dict[str, str]]


@_under_drop_lock
def build_manifest(settings: Settings, drop_name: str) -> ManifestSummary:
    """List the drop's items, read each once, hash it, check it is an image, and record a status per item."""
    started = time.perf_counter()
    drop = find_drop(settings.drops_location, drop_name)
    files = drop_files(settings, drop_name)
    items = collect_items(drop, settings.sources, files.blobs, object_store(settings.s3))
    progress.Stage("manifest", len(items), "items").advance(len(items))
    columns: dict[str, list] = {name: [] for name in MANIFEST_SCHEMA.names}
    for item in items:
        row = item.as_row()
        row["metadata"] = json.dumps(item.metadata, sort_keys=True, default=str)
        for name in columns:
            columns[name].append(row[name])
    arrow.write_table(files.manifest, pa.Table.from_pydict(columns, schema=MANIFEST_SCHEMA))
    status = Counter(i.status for i in items)
    return ManifestSummary(
        items=len(items),
        ok=status.get(OK, 0),
        failed=status.get(FAILED, 0),
        skipped=status.get(SKIPPED, 0),
        bytes=sum(i.size for i in items if i.status == OK),
        seconds=round(time.perf_counter() - started, 3),
        **_failure_summary([_failure(i.id, i.error_kind, i.error, i.uri) for i in items if i.status == FAILED]),
    )


def _failure(item_id: str, kind: str, error: str, uri: str = "") -> dict[str, str]:
    # Plain strings: the record goes to failures.json, Dagster metadata and log lines, where a member's repr would show.
    return {"id": item_id, "error_kind": str(kind), "error": error, "uri": uri}


def read_manifest(settings: Settings, drop_name: str) -> list[Item]:
    table = arrow.read_table(drop_files(settings, drop_name).manifest)
    items = []
    for row in table.to_pylist():
        row["metadata"] = json.loads(row["metadata"])
        items.append(Item(**row))
    return items


def _embedded_before(folder: Path | ObjectPath, model: str, checks: QualitySettings) -> dict[str, tuple[str, str]]:
    """id -> (sha256, uri) of the rows the drop's current embeddings hold for ``model`` whose vector passes the
    embedding checks (finite, unit norm): a damaged stored vector is computed again, not carried into every later
    run."""
    done: dict[str, tuple[str, str]] = {}
    for table in arrow.read_batches(folder, columns=["id", "sha256", "uri", "model", "embedding"]):
        sound = sound_vectors(arrow.vectors_of(table), checks.norm_tolerance, checks.unit_norm)
        columns = zip(*(table.column(c).to_pylist() for c in ("id", "sha256", "uri", "model")))
        for (item_id, sha, uri, row_model), ok in zip(columns, sound):
            if row_model == model and ok:
                done[item_id] = (sha, uri)
    return done


def _kept_previous(
    failures: list[tuple[str, str, str]], previous: dict[str, tuple[str, str]], taken: set[str]
) -> dict[str, list[str]]:
    """item id -> ids of earlier rows to keep, for items that failed transiently ((id, uri, error kind) each).

    An item keeps the earlier row with its own id; when there is none (an item without an id of its own, whose
    content id is unknown when it could not be read, or an item whose id changed) it keeps the earlier rows of
    the same URI. Ids that a good item of this run embeds are
    never kept (the new vector wins)."""
    by_uri: dict[str, list[str]] = defaultdict(list)
    for row_id, (_sha, uri) in previous.items():
        by_uri[uri].append(row_id)
    kept: dict[str, list[str]] = {}
    for item_id, uri, kind in failures:
        if not is_transient(kind):
            continue
        ids = [item_id] if item_id in previous else by_uri.get(uri, [])
        ids = [i for i in ids if i not in taken]
        if ids:
            taken.update(ids)
            kept[item_id] = ids
    return kept


@dataclass(frozen=True)
class _Roots:
    """Where a drop's items may be read from now: local folders, and ``s3://`` prefixes through ``store``."""

    local: list[Path]
    prefixes: list[str]
    store: ObjectStore


def _drop_roots(settings: Settings, drop_name: str) -> _Roots:
    """Where the drop's sources may be read from now. A drop gone (or turned into a link) since it was
    listed has no root of its own: each of its local items then fails on its own (``source_changed``), and its
    downloads, which live in the blob store, still go through."""
    store = object_store(settings.s3)
    try:
        drop = find_drop(settings.drops_location, drop_name)
    except (FileNotFoundError, PermissionError):
        return _Roots(list(settings.sources.allowed_roots), object_prefixes(None, settings.sources), store)
    root = drop.root
    local = [root] if isinstance(root, Path) else []
    return _Roots([*local, *settings.sources.allowed_roots], object_prefixes(root, settings.sources), store)


def _reader(item: Item, roots: _Roots, blobs: Path, max_bytes: int) -> Callable[[], bytes]:
    """Reads an item's bytes on a decode thread through the guarded reader (roots, regular file, no link followed,
    size cap, the same file as when listed; for an object, its prefix, the cap and the ETag listed) and refuses
    bytes that no longer match its recorded hash."""

    def read() -> bytes:
        if is_object_uri(item.source):
            try:
                data, _ = read_object(roots.store, item.source, roots.prefixes, max_bytes, etag=item.file_id)
            except FetchError as exc:
                message = f"object changed since the drop was listed ({exc.kind}): {exc}"
                raise SourceError(ErrorKind.SOURCE_CHANGED, message) from None
            if hashlib.sha256(data).hexdigest() != item.sha256:
                raise SourceError(
                    ErrorKind.SOURCE_CHANGED, "source changed since the manifest was built (re-run the drop)"
                )
            return data
        downloaded = Path(item.source).parent.parent == blobs
        try:
            if downloaded:
                data = read_local(item.source, [blobs], max_bytes)
            else:
                data = read_local(item.source, roots.local, max_bytes, identity=item.file_id or None)
        except FetchError as exc:
            if exc.kind == ErrorKind.SOURCE_CHANGED:
                raise SourceError(ErrorKind.SOURCE_CHANGED, str(exc)) from None
            message = f"source changed since the drop was listed ({exc.kind}): {exc}"
            raise SourceError(ErrorKind.SOURCE_CHANGED, message) from None
        if hashlib.sha256(data).hexdigest() != item.sha256:
            # The recorded sha256 is the row's lineage: never embed other bytes under it.
            message = "source changed since the manifest was built (re-run the drop)"
            raise SourceError(ErrorKind.SOURCE_CHANGED, message)
        return data

    return read


# Bytes of objects read ahead of decoding at most (besides the batch being decoded): 50 MiB images must not pile up.
PREFETCH_BYTES = 256 * 1024 * 1024


def _prefetched(
    readers: list[list[Callable[[], bytes]]],
    remote: list[list[bool]],
    sizes: list[list[int]],
    pool: ThreadPoolExecutor,
    ahead: int = 2,
    max_bytes: int = PREFETCH_BYTES,
) -> Iterator[list[Callable[[], bytes]]]:
    """The readers chunk by chunk, with the reads of objects in a bucket started up to ``ahead`` chunks early on
    ``pool`` (and no more than ``max_bytes`` of them by their listed sizes): a request's latency is spent while
    earlier chunks decode, not on a decode thread. Local files are read where they are decoded, as before. A failed
    read raises when its chunk calls it, like a direct read."""
    started: deque = deque()
    held: deque = deque()
    following = 0

    def remote_bytes(k: int) -> int:
        return sum(size for size, is_remote in zip(sizes[k], remote[k]) if is_remote)

    def start_next() -> None:
        nonlocal following
        out: list[Callable[[], bytes]] = []
        for read, is_remote in zip(readers[following], remote[following]):
            out.append(pool.submit(read).result if is_remote else read)
        started.append(out)
        held.append(remote_bytes(following))
        following += 1

    for _ in range(len(readers)):
        if not started:
            start_next()
        while following < len(readers) and len(started) <= ahead and sum(held) + remote_bytes(following) <= max_bytes:
            start_next()
        held.popleft()
        yield started.popleft()


@dataclass(frozen=True, kw_only=True)
class PreprocessSummary(StageSummary):
    """Images decoded into model inputs; ``reused`` and ``kept_previous`` count rows carried from earlier runs."""

    images: int  # decoded and written this run
    reused: int
    kept_previous: int
    failed: int
    batches: int
    bytes: int
    tensor: str
    seconds: float
    images_per_s: float
    shards: int
    failures_by_kind: dict[str, int]
    failure_examples: list[dict[str, str]]


def shard_count(items: int, shard_items: int) -> int:
    """How many shards a stage of ``items`` items is split into: one per ``shard_items`` (at least one)."""
    return max(1, -(-items // max(1, shard_items)))


def _split(values: Sequence[_V], shards: int) -> list[list[_V]]:
    """``values`` in ``shards`` contiguous parts of near-equal size (order kept)."""
    size, extra = divmod(len(values), shards)
    parts, start = [], 0
    for k in range(shards):
        end = start + size + (1 if k < extra else 0)
        parts.append(list(values[start:end]))
        start = end
    return parts


@dataclass(frozen=True)
class StagePlan:
    """A planned stage run: its write attempt and how many shards it has. The plan's details are stored with the
    attempt (see storage/arrow.write_plan), so shards in other processes read the same plan."""

    attempt: str
    shards: int


@_under_drop_lock
def plan_preprocess(settings: Settings, drop_name: str, model: str = "", shard_items: int | None = None) -> StagePlan:
    """Decide what the preprocess stage decodes: the drop's good items that have no sound embedding of ``model``
    with the same sha256 yet, split into shards of ``shard_items`` (``dagster.shard_items`` by default)."""
    files = drop_files(settings, drop_name)
    arrow.discard_attempts(files.preprocessed)
    previous = _embedded_before(files.embeddings, model, settings.quality) if model else {}
    todo: list[dict[str, Any]] = []
    reused: list[str] = []
    manifest_failures: list[tuple[str, str, str]] = []
    for item in read_manifest(settings, drop_name):
        if item.status == FAILED:
            manifest_failures.append((item.id, item.uri, item.error_kind))
        if item.status != OK:
            continue
        if previous.get(item.id, ("", ""))[0] == item.sha256:
            reused.append(item.id)
        else:
            todo.append(item.as_row())
    shards = shard_count(len(todo), shard_items or settings.dagster.shard_items)
    attempt = arrow.new_attempt(files.preprocessed)
    plan = {
        "model": model,
        "started": time.time(),
        "shards": _split(todo, shards),
        "reused": reused,
        "manifest_failures": manifest_failures,
        "previous": previous,
    }
    arrow.write_plan(files.preprocessed, attempt, plan)
    return StagePlan(attempt, shards)


@dataclass(frozen=True, kw_only=True)
class ShardSummary(StageSummary):
    """What one shard of a stage did (the commit adds the shards up)."""

    shard: int
    rows: int
    batches: int
    bytes: int
    seconds: float
    failures: list[dict[str, str]] = field(default_factory=list)
    tensor: str = ""  # preprocess: the tensor written
    model: str = ""  # embed: the model label, its vectors' size and the time spent waiting for them
    dimension: int = 0
    inference_seconds: float = 0.0
    file_rows: list[int] = field(default_factory=list)  # rows per file written, in order


def preprocess_shard(
    settings: Settings, drop_name: str, attempt: str, shard: int, model_input: tuple[str, Sequence[int]]
) -> ShardSummary:
    """Decode shard ``shard`` of the planned attempt into tensor batches (files of this shard only)."""
    started = time.perf_counter()
    with drop_lock(settings.paths.locks, drop_name, shared=True):
        files = drop_files(settings, drop_name)
        plan = arrow.read_plan(files.preprocessed, attempt)
        items = [Item(**row) for row in plan["shards"][shard]]
        prep = for_model(settings, model_input[0], model_input[1])
        spec = prep.spec
        schema = arrow.tensor_schema(spec.shape, spec.dtype, {"drop": drop_name, "layout": spec.layout})
        failures: list[dict[str, str]] = []
        written = 0
        file_rows: list[int] = []
        chunks = [items[i : i + prep.batch_size] for i in range(0, len(items), prep.batch_size)]
        roots = _drop_roots(settings, drop_name)
        max_bytes = settings.sources.max_image_bytes
        stage = progress.Stage("preprocess", len(items))
        readers = [[_reader(item, roots, files.blobs, max_bytes) for item in chunk] for chunk in chunks]
        remote = [[is_object_uri(item.source) for item in chunk] for chunk in chunks]
        sizes = [[item.size for item in chunk] for chunk in chunks]
        with (
            arrow.open_writer(files.preprocessed, attempt=attempt, shard=shard) as writer,
            ThreadPoolExecutor(settings.sources.fetch_workers * 2) as fetches,
        ):
            sources = _prefetched(readers, remote, sizes, fetches)
            for chunk, prepared in zip(chunks, prep.stream(sources)):
                stage.advance(len(chunk))
                for item, err in zip(chunk, prepared.errors):
                    if err is not None:
                        failures.append(_failure(item.id, err.kind, err.message, item.uri))
                good = [chunk[i] for i in prepared.ok_positions]
                if good:
                    rows = {
                        "id": [i.id for i in good],
                        "drop": [drop_name] * len(good),
                        "sha256": [i.sha256 for i in good],
                        "uri": [i.uri for i in good],
                    }
                    writer.write(arrow.tensor_table(rows, prepared.tensors, schema))
                    written += len(good)
                    file_rows.append(len(good))
    return ShardSummary(
        shard=shard,
        rows=written,
        batches=len(writer.files),
        bytes=writer.bytes,
        seconds=round(time.perf_counter() - started, 3),
        failures=failures,
        tensor=spec.describe(),
        file_rows=file_rows,
    )


@_under_drop_lock
def commit_preprocess(
    settings: Settings, drop_name: str, attempt: str, shards: Sequence[ShardSummary]
) -> PreprocessSummary:
    """Put the shards' batches in place as the drop's tensor batches, with the side files the embed stage reads
    (``failures.json``, ``reused.json``, ``kept.json``): one atomic commit for the whole stage."""
    files = drop_files(settings, drop_name)
    plan = arrow.read_plan(files.preprocessed, attempt)
    if sorted(s.shard for s in shards) != list(range(len(plan["shards"]))):
        raise RuntimeError(f"preprocess attempt {attempt} of drop {drop_name!r}: not every shard finished")
    failures = [f for s in sorted(shards, key=lambda s: s.shard) for f in s.failures]
    failed_ids = {f["id"] for f in failures}
    previous = {k: tuple(v) for k, v in plan["previous"].items()}
    embedded = set(plan["reused"]) | {
        row["id"] for part in plan["shards"] for row in part if row["id"] not in failed_ids
    }
    later = [(f["id"], f["uri"], f["error_kind"]) for f in failures]
    kept = _kept_previous([tuple(f) for f in plan["manifest_failures"]] + later, previous, embedded)
    with arrow.open_writer(files.preprocessed, attempt=attempt) as writer:
        writer.add_json("failures.json", failures)
        writer.add_json("reused.json", plan["reused"])
        writer.add_json("kept.json", kept)
        ordered = sorted(shards, key=lambda s: s.shard)
        writer.commit(shard_files=sum(s.batches for s in shards), rows=[n for s in ordered for n in s.file_rows])
    elapsed = max(time.time() - plan["started"], 1e-9)
    written = sum(s.rows for s in shards)
    return PreprocessSummary(
        images=written,
        reused=len(plan["reused"]),
        kept_previous=sum(len(ids) for ids in kept.values()),
        failed=len(failures),
        batches=len(writer.files),
        bytes=writer.bytes,
        tensor=shards[0].tensor if shards else "",
        seconds=round(elapsed, 3),
        images_per_s=round(written / elapsed, 1),
        shards=len(shards),
        **_failure_summary(failures),
    )


def preprocess_drop(
    settings: Settings,
    drop_name: str,
    model_input: tuple[str, Sequence[int]],
    model: str = "",
    shard_items: int | None = None,
) -> PreprocessSummary:
    """Decode the drop's good items into exactly the model's input, one Arrow file per batch: the plan, every shard
    in turn, and the commit, in this process (the Dagster asset runs the shards as parallel steps instead).

    ``model_input`` is the model's (datatype, shape) from Triton. Items whose id and sha256 already have an
    embedding from ``model`` in the drop's current embeddings are not recomputed: they are listed in
    ``reused.json`` and carried over by :func:`embed_drop`.
    """
    plan = plan_preprocess(settings, drop_name, model, shard_items)
    done = [preprocess_shard(settings, drop_name, plan.attempt, k, model_input) for k in range(plan.shards)]
    return commit_preprocess(settings, drop_name, plan.attempt, done)


@dataclass(frozen=True, kw_only=True)
class EmbedSummary(StageSummary):
    """Vectors computed and carried over, and the model that made them."""

    embeddings: int  # computed + carried over
    computed: int
    reused: int
    kept_previous: int
    dimension: int
    model: str
    bytes: int
    seconds: float
    inference_seconds: float
    images_per_s: float
    shards: int = 1


def _same_source(preprocessed: Path | ObjectPath, plan: dict[str, Any], drop_name: str) -> None:
    """Refuse to embed (or commit) other tensor batches than the plan was made for: a shard of an old run
    re-executed after another run re-committed the drop's batches would mix two item lists."""
    if arrow.commit_id(preprocessed) != plan.get("source"):
        raise RuntimeError(
            f"drop {drop_name!r}: its tensor batches were committed again since this embed stage was planned; "
            "re-run the drop"
        )


@_under_drop_lock
def plan_embed(settings: Settings, drop_name: str, shard_items: int | None = None) -> StagePlan:
    """Split the drop's tensor batches into shards of about ``shard_items`` images (whole batch files each)."""
    files = drop_files(settings, drop_name)
    arrow.discard_attempts(files.embeddings)
    counts = arrow.batch_rows(files.preprocessed)
    shards = min(max(1, len(counts)), shard_count(sum(counts), shard_items or settings.dagster.shard_items))
    attempt = arrow.new_attempt(files.embeddings)
    plan = {
        "started": time.time(),
        "shards": _split(list(range(len(counts))), shards),
        "rows": counts,
        # The tensor batches this plan is for: every shard and the commit check they still read these.
        "source": arrow.commit_id(files.preprocessed),
    }
    arrow.write_plan(files.embeddings, attempt, plan)
    return StagePlan(attempt, shards)


def embed_shard(settings: Settings, drop_name: str, attempt: str, shard: int, embedder: Embedder) -> ShardSummary:
    """Send the tensor batches of shard ``shard`` through the model; store the vectors with lineage and model."""
    started = time.perf_counter()
    with drop_lock(settings.paths.locks, drop_name, shared=True):
        files = drop_files(settings, drop_name)
        plan = arrow.read_plan(files.embeddings, attempt)
        mine = plan["shards"][shard]
        _same_source(files.preprocessed, plan, drop_name)
        sources = arrow.batch_files(files.preprocessed)
        if len(sources) != len(plan["rows"]):
            raise RuntimeError(f"drop {drop_name!r}: its tensor batches changed since the embed stage was planned")
        metadata = {
            i.id: json.dumps(i.metadata, sort_keys=True, default=str) for i in read_manifest(settings, drop_name)
        }
        model = embedder.model_version_label()
        count, dim, infer_s = 0, 0, 0.0
        tables: deque = deque()

        def tensor_batches():
            # Pulled by the embedder's stream, so the next file is read while earlier batches are being inferred.
            for index in mine:
                table = arrow.read_batch(sources[index])
                tables.append(table)
                yield arrow.tensors_of(table)

        stage = progress.Stage("embed", sum(plan["rows"][i] for i in mine))
        stream = getattr(embedder, "embed_stream", None)  # an embedder without one is called batch by batch
        results = stream(tensor_batches()) if stream else map(embedder.embed, tensor_batches())
        with arrow.open_writer(files.embeddings, attempt=attempt, shard=shard) as writer:
            try:
                while True:
                    t0 = time.perf_counter()
                    vectors = next(results, None)
                    infer_s += time.perf_counter() - t0
                    if vectors is None:
                        break
                    table = tables.popleft()  # results come in order, one per table
                    if settings.quality.unit_norm:
                        vectors = unit_normalised(vectors)
                    dim = int(vectors.shape[1])
                    rows = table.select(["id", "drop", "sha256", "uri"]).to_pydict()
                    rows["model"] = [model] * table.num_rows
                    rows["metadata"] = [metadata.get(i, "{}") for i in rows["id"]]
                    writer.write(arrow.embedding_table(rows, vectors, arrow.embedding_schema(dim, {"model": model})))
                    count += table.num_rows
                    stage.advance(table.num_rows)
            finally:
                getattr(results, "close", lambda: None)()  # cancels batches still queued if writing failed
    return ShardSummary(
        shard=shard,
        rows=count,
        batches=len(writer.files),
        bytes=writer.bytes,
        seconds=round(time.perf_counter() - started, 3),
        model=model,
        dimension=dim,
        inference_seconds=round(infer_s, 3),
    )


@_under_drop_lock
def commit_embed(
    settings: Settings, drop_name: str, attempt: str, shards: Sequence[ShardSummary], model: str
) -> EmbedSummary:
    """Put the shards' vectors in place as the drop's embeddings, with the rows carried over from its previous
    embeddings: vectors of items the preprocess stage marked as reused (same id, sha256 and model; with the item's
    current metadata) and rows kept for items that failed transiently (as they were). One atomic commit."""
    files = drop_files(settings, drop_name)
    plan = arrow.read_plan(files.embeddings, attempt)
    if sorted(s.shard for s in shards) != list(range(len(plan["shards"]))):
        raise RuntimeError(f"embed attempt {attempt} of drop {drop_name!r}: not every shard finished")
    models = {s.model for s in shards if s.rows}
    if models - {model}:
        raise RuntimeError(f"the model changed while drop {drop_name!r} was embedded ({sorted(models)}); re-run it")
    _same_source(files.preprocessed, plan, drop_name)
    if sum(s.rows for s in shards) != sum(plan["rows"]):
        raise RuntimeError(
            f"embed attempt {attempt} of drop {drop_name!r}: the shards embedded {sum(s.rows for s in shards)} "
            f"images, the plan has {sum(plan['rows'])}; re-run the drop"
        )
    dims = {s.dimension for s in shards if s.rows}
    if len(dims) > 1:
        raise RuntimeError(f"shards of drop {drop_name!r} returned vectors of different sizes {sorted(dims)}; re-run")
    dim = dims.pop() if dims else None
    metadata = {i.id: json.dumps(i.metadata, sort_keys=True, default=str) for i in read_manifest(settings, drop_name)}
    reused = set(arrow.read_json(files.preprocessed, "reused.json", []))
    kept = {i for ids in arrow.read_json(files.preprocessed, "kept.json", {}).values() for i in ids}
    carry = reused | kept
    carried = 0
    with arrow.open_writer(files.embeddings, attempt=attempt) as writer:
        if carry:
            # The old embeddings are still in place: the writer swaps them out only at commit.
            for table in arrow.read_batches(files.embeddings):
                keep = [k for k, i in enumerate(table.column("id").to_pylist()) if i in carry]
                if not keep:
                    continue
                old = table.take(keep)
                if dim is not None and old.schema.field("embedding").type.list_size != dim:
                    raise RuntimeError(f"model {model} now returns {dim}-d vectors but kept ones are not; re-run")
                dim = old.schema.field("embedding").type.list_size
                rows = old.select(["id", "drop", "sha256", "uri", "model", "metadata"]).to_pydict()
                # A reused item takes its current metadata; a kept row stays as it was.
                rows["metadata"] = [
                    metadata.get(i, "{}") if i in reused else m for i, m in zip(rows["id"], rows["metadata"])
                ]
                writer.write(
                    arrow.embedding_table(rows, arrow.vectors_of(old), arrow.embedding_schema(dim, {"model": model}))
                )
                carried += old.num_rows
            if carried != len(carry):
                raise RuntimeError(
                    f"{len(carry) - carried} embedding(s) to keep were not found (the drop's embeddings changed "
                    "during this run); re-run the drop"
                )
        writer.commit(shard_files=sum(s.batches for s in shards))
    elapsed = max(time.time() - plan["started"], 1e-9)
    count = sum(s.rows for s in shards)
    infer_s = sum(s.inference_seconds for s in shards)
    return EmbedSummary(
        embeddings=count + carried,
        computed=count,
        reused=len(reused),
        kept_previous=len(kept),
        dimension=dim or 0,
        model=model,
        bytes=writer.bytes,
        seconds=round(elapsed, 3),
        inference_seconds=round(infer_s, 3),
        images_per_s=round(count / infer_s, 1) if infer_s else 0.0,
        shards=len(shards),
    )


def embed_drop(settings: Settings, drop_name: str, embedder: Embedder, shard_items: int | None = None) -> EmbedSummary:
    """Send every tensor batch through the model and store the vectors with their lineage and model version: the
    plan, every shard in turn, and the commit, in this process (the Dagster asset runs shards as parallel steps).

    Vectors of items the preprocess stage marked as reused are copied from the drop's previous embeddings
    (same id, sha256 and model), with the item's current metadata; rows kept for items that failed transiently are
    copied as they were.
    """
    plan = plan_embed(settings, drop_name, shard_items)
    done = [embed_shard(settings, drop_name, plan.attempt, k, embedder) for k in range(plan.shards)]
    return commit_embed(settings, drop_name, plan.attempt, done, embedder.model_version_label())


def embeddings_version(settings: Settings, drop_name: str, model: str) -> str:
    """The data version of a drop's embeddings: the model label and a digest of the (id, sha256) pairs embedded,
    so it changes with the model or the content and with nothing else."""
    digest = hashlib.sha256()
    for table in arrow.read_batches(drop_files(settings, drop_name).embeddings, columns=["id", "sha256"]):
        for item_id, sha in zip(table.column("id").to_pylist(), table.column("sha256").to_pylist()):
            digest.update(f"{item_id}\0{sha}\n".encode())
    return f"{model}#{digest.hexdigest()[:16]}"


@dataclass(frozen=True, kw_only=True)
class IndexSummary(StageSummary):
    """The optional fields are reported when the drop had embeddings to write (the write counts) or when it went
    to a collection chosen by its model (``model``, ``switch_pending``; ``search_collection`` also when nothing was
    embedded)."""

    upserted: int
    unchanged: int
    removed_stale: int
    kept_for_transient_failures: int | None = _optional()
    deleted_rows: int | None = _optional()
    kept_for_other_drops: int | None = _optional()
    joined_shared_rows: int | None = _optional()
    # Ids this drop gives to another image than the drop(s) already holding them: not written (see docs).
    id_conflicts: int | None = _optional()
    id_conflict_examples: list[dict[str, Any]] | None = _optional()
    drop_rows: int
    collection: str
    collection_rows: int | None = _optional()
    # Values that did not fit a declared filter field's type: the rows are stored, the typed column is empty.
    metadata_type_mismatches: list[dict[str, str]] | None = _optional()
    model: str | None = _optional()
    search_collection: str | None = _optional()
    # Search stays on another model's collection until the switch (see the switch_search_collection job).
    switch_pending: bool | None = _optional()
    seconds: float = 0.0
    vectors_per_s: float | None = _optional()


@_under_drop_lock
def index_drop(settings: Settings, drop_name: str, target) -> IndexSummary:
    """Upsert the drop's new or changed rows by id and take the drop out of rows it no longer lists.

    ``target`` is a :class:`~embedding_pipeline.index.collections.ModelCollections` (the drop goes into the
    collection of the model that embedded it, behind the alias search uses) or an ``ImageIndex`` of one named
    collection. Rows already in Milvus with the same sha256, model, URI and metadata that list the drop are left
    alone, so re-running a drop writes nothing.

    Membership: a row lists every drop holding its image (``drops``). A row the drop no longer holds (the item left
    the listing or failed permanently; transient failures were kept by the earlier stages) loses the drop, and is
    deleted only when no other drop lists it. Reads that decide this are Strong, under the membership lock.
    """
    started = time.perf_counter()
    files = drop_files(settings, drop_name)
    tables = arrow.read_batches(files.embeddings)
    first = next(tables, None)
    placement = None
    with membership_lock(settings.paths.locks):
        protected = _protected(settings, drop_name)
        if first is None:
            if hasattr(target, "index_for_model"):
                # Nothing embedded: the drop leaves every row of every model's collection, except those of items
                # that failed for a passing reason (an outage right after a model change, say).
                removed = target.remove_drop(drop_name, keep=protected.kept)
                arrow.write_json(files.index_report, {"id_conflicts": []})
                return IndexSummary(
                    upserted=0,
                    unchanged=0,
                    removed_stale=removed,
                    drop_rows=0,
                    collection="",
                    search_collection=target.search_collection() or "",
                    seconds=round(time.perf_counter() - started, 3),
                )
            index = target
        else:
            dim = first.schema.field("embedding").type.list_size
            model = str(first.column("model")[0].as_py())
            if hasattr(target, "index_for_model"):
                index, placement = target.index_for_model(model, dim)
            else:
                index = target
                index.ensure_collection(dim)
        try:
            total = sum(t.num_rows for t in arrow.read_batches(files.embeddings, columns=["id"]))
            summary, conflicts = _write_drop(drop_name, index, first, tables, protected, total)
        finally:
            if placement is not None:
                index.close()
        arrow.write_json(files.index_report, {"id_conflicts": conflicts})
    if placement is not None:
        summary = replace(
            summary,
            model=model,
            search_collection=placement.search_collection or "",
            switch_pending=placement.switch_pending,
        )
    seconds = round(time.perf_counter() - started, 3)
    return replace(
        summary,
        seconds=seconds,
        vectors_per_s=round(summary.upserted / seconds, 1) if seconds and summary.upserted else 0.0,
    )


@dataclass(frozen=True)
class Protected:
    """Rows a drop keeps although its embeddings lack them: those of items that failed this run for a passing
    reason, by the same rule as :func:`_kept_previous` (the item's id; when no earlier row has it, its URI). The
    embed stage carries such rows when it can (same model); this covers the rest: a model change, or a collection
    of another model."""

    failures: tuple[tuple[str, str, str], ...] = ()

    def kept(self, rows: dict[str, dict[str, Any]], taken: AbstractSet[str] = frozenset()) -> set[str]:
        """The ids among ``rows`` (id -> stored row) to keep; ``taken`` ids are this run's own rows."""
        previous = {row_id: (row.get("sha256", ""), row.get("uri", "")) for row_id, row in rows.items()}
        return {i for ids in _kept_previous(list(self.failures), previous, set(taken)).values() for i in ids}


def _protected(settings: Settings, drop_name: str) -> Protected:
    later = arrow.read_json(drop_files(settings, drop_name).preprocessed, "failures.json", [])
    failed = [(f["id"], f["uri"], f["error_kind"]) for f in later]
    try:
        failed += [(i.id, i.uri, i.error_kind) for i in read_manifest(settings, drop_name) if i.status == FAILED]
    except (OSError, pa.ArrowInvalid):
        pass
    return Protected(tuple(f for f in failed if is_transient(f[2])))


def _write_drop(
    drop_name: str, index, first, tables, protected: Protected = Protected(), total: int = 0
) -> tuple[IndexSummary, list[dict[str, Any]]]:
    """The drop's rows written to ``index``: the summary (without timings) and every id conflict."""
    present = first is not None or index.exists()
    stored = index.drop_rows(drop_name) if present else {}
    model = str(first.column("model")[0].as_py()) if first is not None else None
    ids: set[str] = set()
    upserted = unchanged = shared = 0
    conflicts: list[dict[str, Any]] = []
    stage = progress.Stage("index", total, "rows")
    for table in itertools.chain([first] if first is not None else [], tables):
        stage.advance(table.num_rows)
        vectors = arrow.vectors_of(table)
        cols = table.select(["id", "sha256", "uri", "model", "metadata"]).to_pydict()
        if any(m != model for m in cols["model"]):
            # The embed stage writes one model per drop; anything else would mix models in one collection.
            raise RuntimeError(f"drop {drop_name!r}: its embeddings come from more than one model; re-run the drop")
        # Rows of these ids that other drops hold: this drop joins their membership instead of taking them over.
        elsewhere = index.rows([i for i in cols["id"] if i not in stored], ["id", "drop", "drops", "sha256"])
        rows = []
        for k, item_id in enumerate(cols["id"]):
            row = {
                "id": item_id,
                "sha256": cols["sha256"][k],
                "uri": cols["uri"][k],
                "drop": drop_name,
                "model": cols["model"][k],
                "metadata": json.loads(cols["metadata"][k]),
            }
            mine = stored.get(item_id)
            if mine is not None and fingerprint(mine) == fingerprint(row):
                ids.add(item_id)
                unchanged += 1
                continue
            existing = mine or elsewhere.get(item_id)
            others = [d for d in (existing or {}).get("drops") or [] if d != drop_name]
            if others and existing["sha256"] != row["sha256"]:
                # The same id names another image in another drop: the row stays that drop's image (the first
                # holder keeps it); this item is reported, never written over it.
                # A drop that held it with the old image leaves it (the id is not this drop's any more).
                conflicts.append(
                    {
                        "id": item_id,
                        "held_by": others[:EXAMPLES],
                        "sha256": row["sha256"],
                        "held_sha256": existing["sha256"],
                    }
                )
                continue
            ids.add(item_id)
            if existing is not None:
                members = list(existing.get("drops") or [])
                if drop_name not in members and len(members) >= MAX_DROPS_PER_ROW:
                    # Milvus caps an array's length: the image stays indexed for the drops that list it already.
                    conflicts.append(
                        {
                            "id": item_id,
                            "held_by": members[:EXAMPLES],
                            "sha256": row["sha256"],
                            "held_sha256": existing["sha256"],
                            "reason": "drops_full",
                        }
                    )
                    continue
                shared += int(item_id in elsewhere)
                row["drops"] = members if drop_name in members else [*members, drop_name]
                # The row keeps the drop it is shown with while that drop still lists it.
                row["drop"] = existing["drop"] if existing.get("drop") in row["drops"] else drop_name
            else:
                row["drops"] = [drop_name]
            rows.append({**row, "embedding": vectors[k]})
        upserted += index.upsert(rows) if rows else 0
    stale = set(stored) - ids - protected.kept(stored, ids)
    deleted, still_listed = index.release(drop_name, stale) if stale else (0, 0)
    if upserted or stale:
        index.flush()
    summary = IndexSummary(
        upserted=upserted,
        unchanged=unchanged,
        removed_stale=len(stale),
        kept_for_transient_failures=len(set(stored) - ids) - len(stale),
        deleted_rows=deleted,
        kept_for_other_drops=still_listed,
        joined_shared_rows=shared,
        id_conflicts=len(conflicts),
        id_conflict_examples=conflicts[:EXAMPLES],
        drop_rows=index.count_drop(drop_name, consistency_level="Strong") if present else 0,
        collection=index.collection,
        collection_rows=index.count() if present else 0,
        metadata_type_mismatches=[
            {"id": m.id, "key": m.key, "declared": m.declared, "reason": m.reason}
            for m in getattr(index, "type_mismatches", [])[:EXAMPLES]
        ],
    )
    return summary, conflicts


def fingerprint(row: dict[str, Any]) -> tuple:
    """What makes a stored row current (the vector follows from sha256 + model)."""
    return (row["sha256"], row["model"], row["uri"], json.dumps(row.get("metadata") or {}, sort_keys=True, default=str))


def item_report(settings: Settings, drop_name: str) -> list[dict[str, Any]]:
    """Every item of the drop with its final status, error kind and error, across all stages run so far.

    ``stage`` says where an item stopped: ``manifest`` or ``preprocess`` for failures, ``embedded`` for good
    items (``reused`` when an earlier run's vector was kept). ``kept_previous`` lists, for an item that failed
    transiently, the ids of the rows an earlier run indexed for it and that stay indexed.
    """
    files = drop_files(settings, drop_name)
    later = {f["id"]: f for f in arrow.read_json(files.preprocessed, "failures.json", [])}
    reused = set(arrow.read_json(files.preprocessed, "reused.json", []))
    kept = arrow.read_json(files.preprocessed, "kept.json", {})
    conflicts = {c["id"]: c for c in (_read_json_file(files.index_report) or {}).get("id_conflicts", [])}
    report = []
    for item in read_manifest(settings, drop_name):
        row = {
            "id": item.id,
            "uri": item.uri,
            "status": item.status,
            "error_kind": item.error_kind,
            "error": item.error,
            "stage": "manifest",
            "sha256": item.sha256,
            # Earlier rows this failed item keeps (a transient failure never removes what was indexed).
            "kept_previous": list(kept.get(item.id, [])),
        }
        if item.status == OK:
            failure = later.get(item.id)
            if failure is not None:
                row.update(status=FAILED, error_kind=failure["error_kind"], error=failure["error"], stage="preprocess")
            elif item.id in conflicts:
                held = ", ".join(conflicts[item.id]["held_by"])
                if conflicts[item.id].get("reason") == "drops_full":
                    error = (
                        f"the image is listed by {MAX_DROPS_PER_ROW} drops already (Milvus caps a row's drop "
                        "list); it stays searchable for those drops"
                    )
                else:
                    error = (
                        f"id {item.id!r} already names another image, held by drop(s) {held}; give this image "
                        "another id (the other drop's image is kept)"
                    )
                row.update(status=FAILED, error_kind=ErrorKind.ID_CONFLICT, stage="index", error=error)
            else:
                row["stage"] = "reused" if item.id in reused else "embedded"
        report.append(row)
    return report


def _read_json_file(path: Path | ObjectPath) -> Any:
    if isinstance(path, ObjectPath):
        return arrow.read_json_file(path)  # none yet: None; a store that does not answer raises
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def index_conflicts(settings: Settings, drop_name: str) -> set[str]:
    """Ids the index stage could not write for the drop (held by another drop's image)."""
    report = _read_json_file(drop_files(settings, drop_name).index_report) or {}
    return {c["id"] for c in report.get("id_conflicts", [])}


@dataclass(frozen=True, kw_only=True)
class ReportSummary(StageSummary):
    """End-to-end counts of a drop's item report."""

    items_total: int
    items_ok: int
    items_failed: int
    items_skipped: int
    items_reused: int
    items_kept_previous: int
    failures_by_kind: dict[str, int]
    failure_examples: list[dict[str, str]]


def report_summary(report: list[dict[str, Any]]) -> ReportSummary:
    """End-to-end counts for the drop (what the last asset shows in the UI)."""
    status = Counter(r["status"] for r in report)
    failures = [_failure(r["id"], r["error_kind"], r["error"], r["uri"]) for r in report if r["status"] == FAILED]
    summary = ReportSummary(
        items_total=len(report),
        items_ok=status.get(OK, 0),
        items_failed=status.get(FAILED, 0),
        items_skipped=status.get(SKIPPED, 0),
        items_reused=sum(1 for r in report if r["stage"] == "reused"),
        items_kept_previous=sum(1 for r in report if r.get("kept_previous")),
        **_failure_summary(failures),
    )
    return summary
