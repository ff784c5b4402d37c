"""The original specification's Python API: ``ImageEmbeddingPipeline`` over ``ServiceConfig`` (the settings).

::

    from embedding_pipeline import ImageEmbeddingPipeline, ServiceConfig

    config = ServiceConfig.from_yaml("embedding_pipeline.yaml")
    with ImageEmbeddingPipeline(config) as pipeline:
        pipeline.create_collection(name="my_images", dim=1280, description="My image embeddings")
        pipeline.insert_images(inputs=[...], ids=[...], metadata=[...], collection_name="my_images")
        for hit in pipeline.search_images(query_input="query.jpg", topk=5, collection_name="my_images"):
            print(hit["id"], hit["score"])

The same code as the HTTP API, called in this process: a collection is created by
:func:`embedding_pipeline.collection_setup.create_collection`; an insert becomes a manifest drop and one
``ingest_drop`` run (through the Dagster webserver when one answers, else executed here in the pipeline's Dagster
instance); search is :class:`~embedding_pipeline.retrieval.ImageSearcher`. Triton and Milvus must be running
(``embedding-pipeline services start``, or ``up``).
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Mapping, Sequence

from embedding_pipeline import collection_setup
from embedding_pipeline.index.client import CollectionError, Hit
from embedding_pipeline.index.named import check_collection_name, ingest_milvus_config
from embedding_pipeline.settings import CONFIG_ENV, MilvusSettings, ServiceConfig, Settings, load_settings
from embedding_pipeline.sources import inserts
from embedding_pipeline.sources.inputs import ImageInput
from embedding_pipeline.sources.manifest import MAX_ID_CHARS
from embedding_pipeline.sources.statuses import ItemStatus

if TYPE_CHECKING:
    from embedding_pipeline.orchestration.webserver import WebserverRuns
    from embedding_pipeline.retrieval import ImageSearcher
    from embedding_pipeline.serving.client import TritonEmbedder

__all__ = ["ImageEmbeddingPipeline", "InsertFailed", "ServiceConfig"]

Launch = Literal["auto", "webserver", "process"]
LAUNCHES = ("auto", "webserver", "process")
ITEM_FIELDS = ("id", "uri", "status", "error_kind", "error")
# Milvus's own limit on top-k.
MAX_TOPK = 16384

# Runs executed here read their settings from the environment (EMBEDDING_PIPELINE_CONFIG), like every Dagster run;
# the variable is pointed at this pipeline's file for the length of one run, one run at a time.
_ENV_LOCK = threading.Lock()


class InsertFailed(RuntimeError):
    """The ingest run failed as a whole (a step failed, e.g. Triton or Milvus was unreachable); ``report`` holds
    what :meth:`ImageEmbeddingPipeline.insert_images` would have returned. Items that merely could not be read do
    not raise: they are in the report with their status and reason."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


def _strings(values: Any, what: str) -> list[str]:
    if isinstance(values, (str, bytes, Path)) or not isinstance(values, Sequence):
        raise TypeError(f"{what} must be a list, not {type(values).__name__}")
    out = []
    for n, value in enumerate(values):
        if not isinstance(value, (str, Path)):
            raise TypeError(f"{what}[{n}] must be a string, not {type(value).__name__}")
        text = str(value).strip()
        if not text or any(ord(c) < 32 or ord(c) == 127 for c in text):
            raise ValueError(f"{what}[{n}] must be non-empty and free of control characters: {value!r}")
        out.append(text)
    return out


def check_insert(
    inputs: Any, ids: Any = None, metadata: Any = None
) -> tuple[list[str], list[str] | None, list[dict[str, Any]] | None]:
    """``inputs``, ``ids`` and ``metadata`` of an insert, checked: a non-empty list of paths or URLs, and when
    given one unique id and one mapping per input. Raises TypeError or ValueError naming the argument."""
    uris = _strings(inputs, "inputs")
    if not uris:
        raise ValueError("inputs is empty: give at least one path or URL")
    id_list = None
    if ids is not None:
        id_list = _strings(ids, "ids")
        if len(id_list) != len(uris):
            raise ValueError(f"ids has {len(id_list)} entries but inputs has {len(uris)}; one per input")
        seen: dict[str, int] = {}
        for n, item_id in enumerate(id_list):
            if len(item_id.encode()) > MAX_ID_CHARS:
                raise ValueError(f"ids[{n}] is longer than {MAX_ID_CHARS} bytes (UTF-8)")
            if item_id in seen:
                raise ValueError(f"ids[{n}] repeats ids[{seen[item_id]}] ({item_id!r}); ids must be unique")
            seen[item_id] = n
    meta_list = None
    if metadata is not None:
        if isinstance(metadata, (str, bytes, Mapping)) or not isinstance(metadata, Sequence):
            raise TypeError(f"metadata must be a list of mappings, not {type(metadata).__name__}")
        if len(metadata) != len(uris):
            raise ValueError(f"metadata has {len(metadata)} entries but inputs has {len(uris)}; one per input")
        meta_list = []
        for n, entry in enumerate(metadata):
            if not isinstance(entry, Mapping):
                raise TypeError(f"metadata[{n}] must be a mapping, not {type(entry).__name__}")
            meta_list.append(dict(entry))
    return uris, id_list, meta_list


class ImageEmbeddingPipeline:
    """Create collections, insert images and search them, with clients kept open until :meth:`close` (or the end
    of the ``with`` block).

    ``launch`` says where inserts run: ``"webserver"`` submits each run through the Dagster webserver (the daemon
    runs it under the instance's limits, as the HTTP API's inserts), ``"process"`` executes it here in the
    pipeline's Dagster instance (as ``embedding-pipeline ingest``), and ``"auto"`` (default) uses the webserver when
    one answers at ``dagster.webserver_host``/``webserver_port`` and this process otherwise.
    """

    def __init__(self, config: Settings | None = None, launch: Launch = "auto"):
        if config is None:
            config = load_settings()
        if not isinstance(config, Settings):
            raise TypeError(
                f"config must be a ServiceConfig (ServiceConfig.from_yaml(path)), not {type(config).__name__}"
            )
        if launch not in LAUNCHES:
            raise ValueError(f"launch must be one of {', '.join(LAUNCHES)}, not {launch!r}")
        self.settings = config
        self.launch = launch
        self._lock = threading.Lock()
        self._embedder: TritonEmbedder | None = None
        self._searchers: dict[str, ImageSearcher] = {}
        self._runs: WebserverRuns | None = None
        self._closed = False

    # -- lifetime ---------------------------------------------------------------------------------------------

    def __enter__(self) -> "ImageEmbeddingPipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every client this pipeline opened (Triton, Milvus, the Dagster instance)."""
        with self._lock:
            self._closed = True
            searchers, self._searchers = list(self._searchers.values()), {}
            embedder, self._embedder = self._embedder, None
            runs, self._runs = self._runs, None
        for searcher in searchers:
            searcher.close()
        if embedder is not None:
            embedder.close()
        if runs is not None:
            runs.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this ImageEmbeddingPipeline is closed")

    # -- collections ------------------------------------------------------------------------------------------

    def create_collection(
        self,
        name: str,
        dim: int | None = None,
        description: str = "",
        *,
        index_type: str | None = None,
        metric_type: str | None = None,
        index_params: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Create collection name ``name`` for the model Triton serves (an alias over one collection per model,
        like ``POST /collections/create``); a name that exists with the same shape is found, not re-created
        (``"created": False``).

        ``dim`` must be the served model's output dimension (1280 for the default model) or None for the model's:
        vectors of another length cannot come out of the model, so another ``dim`` raises
        :class:`~embedding_pipeline.collection_setup.DimensionMismatch` (a ValueError naming both). A name that
        exists with another index, metric or model raises ``CollectionConflict``.
        """
        self._check_open()
        check_collection_name(name)
        if name is None:
            raise ValueError("name is required")
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise ValueError(f"dim must be a positive integer or None, not {dim!r}")
        if not isinstance(description, str):
            raise TypeError(f"description must be a string, not {type(description).__name__}")
        model = collection_setup.served_model(self._model_client())
        return collection_setup.create_collection(
            self.settings,
            name,
            model,
            dim=dim,
            description=description,
            index_type=index_type,
            metric_type=metric_type,
            index_params=index_params,
        )

    def _model_client(self) -> TritonEmbedder:
        from embedding_pipeline.serving.client import TritonEmbedder

        with self._lock:
            if self._embedder is None:
                self._embedder = TritonEmbedder.from_settings(self.settings.triton)
            return self._embedder

    # -- inserts ----------------------------------------------------------------------------------------------

    def insert_images(
        self,
        inputs: Sequence[str | Path],
        ids: Sequence[str] | None = None,
        metadata: Sequence[Mapping[str, Any]] | None = None,
        collection_name: str | None = None,
        *,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Insert images (absolute local paths inside the drop folder or ``sources.allowed_roots``, or http(s)
        URLs) into ``collection_name`` (default ``milvus.collection``) as one manifest drop and its ingest run;
        returns when the run has ended.

        The report: ``drop``, ``run_id``, ``collection``, ``launched`` (``"webserver"`` or ``"process"``),
        ``status`` (the run's), the counts ``items``, ``ok``, ``failed``, ``skipped``, and ``statuses``: one
        ``{id, uri, status, error_kind, error}`` per input in order. An input that cannot be read fails alone (its
        status says why); a run that fails as a whole raises :class:`InsertFailed`. ``timeout_s`` bounds the wait
        for a run launched through the webserver (default ``api.insert_timeout_s``).
        """
        self._check_open()
        uris, id_list, meta_list = check_insert(inputs, ids, metadata)
        check_collection_name(collection_name)
        rows = inserts.manifest_rows(self.settings, uris, id_list, meta_list)
        name = collection_name or self.settings.milvus.collection
        run_config = {"resources": {"milvus": {"config": ingest_milvus_config(self.settings.milvus, name)}}}
        drop = inserts.drop_name(prefix="python")
        if self._through_webserver():
            report = self._insert_through_webserver(drop, rows, run_config, timeout_s)
        else:
            report = self._insert_here(drop, rows, run_config)
        report["collection"] = name
        if report["status"] != "SUCCESS":
            errors = "; ".join(str(e) for e in report.get("errors") or []) or "see the run in the Dagster UI"
            raise InsertFailed(
                f"the ingest run {report['run_id']} of drop {drop} ended {report['status']}: {errors}", report
            )
        return report

    def _through_webserver(self) -> bool:
        if self.launch != "auto":
            return self.launch == "webserver"
        from embedding_pipeline.runtime.processes import http_ok
        from embedding_pipeline.services import webserver_url

        return http_ok(f"{webserver_url(self.settings)}/server_info")

    def _insert_through_webserver(
        self, drop: str, rows: list[dict[str, Any]], run_config: dict[str, Any], timeout_s: float | None
    ) -> dict[str, Any]:
        from embedding_pipeline.orchestration.webserver import WebserverRuns

        with self._lock:
            if self._runs is None:
                self._runs = WebserverRuns(self.settings)
            runs = self._runs
        run_id = runs.launch_manifest_drop(drop, rows, run_config, trigger="python")
        finished = runs.wait(run_id, self.settings.api.insert_timeout_s if timeout_s is None else timeout_s)
        return self._report(drop, run_id, "webserver", finished["status"], finished.get("errors") or [])

    def _insert_here(self, drop: str, rows: list[dict[str, Any]], run_config: dict[str, Any]) -> dict[str, Any]:
        import json

        from embedding_pipeline.orchestration import runs

        with tempfile.TemporaryDirectory(prefix="python-insert-") as tmp:
            manifest = Path(tmp) / drop
            manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            with _settings_for_runs(self.settings):
                summary = runs.ingest(self.settings, manifest, drop, run_config=run_config)
        status = "SUCCESS" if summary["success"] else "FAILURE"
        return self._report(drop, summary["run_id"], "process", status, summary.get("errors") or [])

    def _report(self, drop: str, run_id: str, launched: str, status: str, errors: list[Any]) -> dict[str, Any]:
        from embedding_pipeline import ingest as stages

        try:
            items = stages.item_report(self.settings, drop)
        except (OSError, ValueError):
            items = []  # the run failed before the manifest stage
        counts = Counter(item["status"] for item in items)
        return {
            "drop": drop,
            "run_id": run_id,
            "launched": launched,
            "status": status,
            "items": len(items),
            "ok": counts.get(ItemStatus.OK, 0),
            "failed": counts.get(ItemStatus.FAILED, 0),
            "skipped": counts.get(ItemStatus.SKIPPED, 0),
            "statuses": [{k: item.get(k) for k in ITEM_FIELDS} for item in items],
            "errors": errors,
        }

    # -- search -----------------------------------------------------------------------------------------------

    def search_images(
        self,
        query_input: ImageInput,
        topk: int = 10,
        collection_name: str | None = None,
        filter_expr: str | None = None,
        *,
        search_params: dict[str, Any] | None = None,
    ) -> list[Hit]:
        """The ``topk`` images of ``collection_name`` (default ``milvus.collection``) most similar to
        ``query_input`` (a path, http(s) URL, encoded bytes, HxWx3 uint8 array or PIL image), best first, each
        readable as ``hit["id"]``, ``hit["score"]``, ``hit["uri"]``, ``hit["metadata"]``, ``hit["drop"]`` ...
        ``filter_expr`` is a Milvus boolean expression (``'metadata["category"] == "nature"'``)."""
        self._check_open()
        if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= MAX_TOPK:
            raise ValueError(f"topk must be an integer from 1 to {MAX_TOPK}, not {topk!r}")
        if filter_expr is not None and not isinstance(filter_expr, str):
            raise TypeError(f"filter_expr must be a string or None, not {type(filter_expr).__name__}")
        check_collection_name(collection_name)
        name = collection_name or self.settings.milvus.collection
        searcher = self._searcher(name)
        try:
            hits = searcher.search(query_input, top_k=topk, filter=filter_expr or None, search_params=search_params)
        except CollectionError as exc:
            if "nothing to search yet" in str(exc):
                self._forget(name)  # opened before the collection existed: its index settings are the defaults
            raise
        return list(hits)  # Hit: read as hit["id"], hit["score"] ... or hit.score

    def _searcher(self, name: str) -> ImageSearcher:
        from embedding_pipeline.retrieval import ImageSearcher

        with self._lock:
            searcher = self._searchers.get(name)
        if searcher is not None:
            return searcher
        # The collection's own index type and metric, so search parameters fit the index it really has.
        config = ingest_milvus_config(self.settings.milvus, name)
        milvus = MilvusSettings.model_validate({**self.settings.milvus.model_dump(exclude_unset=True), **config})
        searcher = ImageSearcher(self.settings.model_copy(update={"milvus": milvus}))
        with self._lock:
            if self._closed:
                searcher.close()
                raise RuntimeError("this ImageEmbeddingPipeline is closed")
            kept = self._searchers.setdefault(name, searcher)
        if kept is not searcher:
            searcher.close()
        return kept

    def _forget(self, name: str) -> None:
        with self._lock:
            searcher = self._searchers.pop(name, None)
        if searcher is not None:
            searcher.close()


@contextmanager
def _settings_for_runs(settings: Settings) -> Iterator[None]:
    """Point ``EMBEDDING_PIPELINE_CONFIG`` at the file ``settings`` came from while a run executes here (its steps
    read their settings as every Dagster run does), and refuse to run when they would read other settings."""
    with _ENV_LOCK:
        saved = os.environ.get(CONFIG_ENV)
        if settings.config_file is not None:
            os.environ[CONFIG_ENV] = str(settings.config_file)
        try:
            home = os.environ.get("DAGSTER_HOME")
            if home and Path(home).resolve() != settings.paths.dagster_home.resolve():
                # The process already uses another pipeline's instance: its partitions and runs would land there.
                raise ValueError(
                    f"this process uses the Dagster instance at DAGSTER_HOME={home!r}, not this pipeline's "
                    f"({settings.paths.dagster_home}); run inserts of another state directory in their own process, "
                    "or through its webserver (launch='webserver')"
                )
            seen = load_settings()
            ours, theirs = settings.model_dump(), seen.model_dump()
            if ours != theirs:
                differ = sorted(k for k in ours if ours[k] != theirs.get(k))
                raise ValueError(
                    "an ingest run in this process reads its settings from the YAML file and the environment "
                    f"(EMBEDDING_PIPELINE_CONFIG={os.environ.get(CONFIG_ENV, '')!r}), and they differ from this "
                    f"pipeline's in {', '.join(differ)}; build the config with ServiceConfig.from_yaml(path) and "
                    "change settings in that file, or run inserts through the webserver (launch='webserver')"
                )
            yield
        finally:
            if saved is None:
                os.environ.pop(CONFIG_ENV, None)
            else:
                os.environ[CONFIG_ENV] = saved
