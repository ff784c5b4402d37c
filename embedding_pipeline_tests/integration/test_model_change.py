"""Changing the model, end to end with real processes: one collection per model behind the search alias.

A private stack serves tiny model A (32-d). Two drops are ingested; search answers from A's collection. The
config then points at model B (16-d, another file): the running Triton reloads, keeping A loaded under its archived
name, and search still answers from A's collection with A's model. A backfill of ``ingest_drop`` over every drop,
run by the real Dagster daemon, fills B's collection; the switch job refuses before that and moves the alias after
it; search then answers from B's collection with B's model. No collection ever holds two dimensions or models.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from dagster import AssetKey, DagsterInstance, DagsterRunStatus, RunsFilter

from embedding_pipeline import services
from embedding_pipeline.cli import main
from embedding_pipeline.defs import defs
from embedding_pipeline.index.collections import ModelCollections, model_collection_name
from embedding_pipeline.index.expressions import literal as quote
from embedding_pipeline.orchestration import runs
from embedding_pipeline.orchestration.instance import step_errors
from embedding_pipeline.orchestration.runs import observe_model
from embedding_pipeline.retrieval import search
from embedding_pipeline.runtime import processes
from embedding_pipeline.serving.client import TritonEmbedder
from embedding_pipeline.serving.models import file_sha256
from embedding_pipeline.serving.server import archived_model_name
from embedding_pipeline.settings import Settings, load_settings
from embedding_pipeline.sources.samples import load_photo
from embedding_pipeline_tests import tiny_model
from embedding_pipeline_tests.integration.conftest import running_stack, write_config

pytestmark = pytest.mark.integration

DROPS = {"animals-and-food": ["chelsea", "coffee", "astronaut"], "places": ["rocket", "china", "flower"]}
DIM_A, DIM_B = 32, 16
QUERIES = ["chelsea", "china"]


def _label(path: Path) -> str:
    return f"image_embedder:1@{file_sha256(path)[:12]}"


@pytest.fixture(scope="module")
def model_stack(tmp_path_factory) -> Iterator[tuple[Settings, Path, Path, Path]]:
    home = tmp_path_factory.mktemp("model_change_home")
    model_a = tiny_model.write_uint8_nhwc_model(home / "models" / "a.onnx", dim=DIM_A, seed=1)
    model_b = tiny_model.write_uint8_nhwc_model(home / "models" / "b.onnx", dim=DIM_B, seed=2)
    config = write_config(home)
    data = yaml.safe_load(config.read_text())
    data["triton"]["model_path"] = str(model_a)
    config.write_text(yaml.safe_dump(data))
    with running_stack(home, config) as settings:
        try:
            yield settings, config, model_a, model_b
        finally:
            services.stop_dagster(settings)


def _write_drop(folder: Path, names: list[str]) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    for name in names:
        Image.fromarray(load_photo(name)).convert("RGB").save(folder / f"{name}.jpg", quality=92)
    (folder / "manifest.jsonl").write_text("".join(json.dumps({"id": n, "uri": f"{n}.jpg"}) + "\n" for n in names))
    return folder


def _hits(settings: Settings, folder: Path, name: str) -> list[tuple[str, float, str]]:
    return [
        (h["id"], round(h["score"], 5), h["model"]) for h in search(folder / f"{name}.jpg", top_k=4, settings=settings)
    ]


def _models_in(collections: ModelCollections, collection: str) -> set[str]:
    with collections.index(collection) as index:
        return {row["model"] for row in index._iterate('id != ""', ["model"])}


def _wait_for_backfill(instance: DagsterInstance, backfill_id: str, count: int, timeout: float = 300.0) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = instance.get_runs(filters=RunsFilter(tags={"dagster/backfill": backfill_id}))
        if len(found) == count and all(
            r.status in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED) for r in found
        ):
            return found
        time.sleep(1)
    raise AssertionError(f"backfill {backfill_id} did not finish {count} runs in {timeout:.0f} s: {found}")


def _switch(instance: DagsterInstance, **config):
    return defs.resolve_job_def("switch_search_collection").execute_in_process(
        instance=instance, run_config={"ops": {"switch_collection": {"config": config}}}, raise_on_error=False
    )


def _stale(instance: DagsterInstance, drop: str) -> str:
    from dagster._core.definitions.data_version import CachingStaleStatusResolver
    from dagster._core.loader import LoadingContextForTest

    # What the UI shows as an asset partition's staleness, computed the way the webserver does.
    resolver = CachingStaleStatusResolver(instance, defs.resolve_asset_graph(), LoadingContextForTest(instance))
    return resolver.get_status(AssetKey("image_embeddings"), drop).value


def test_a_model_change_fills_a_new_collection_and_search_switches_atomically(model_stack, tmp_path, capsys):
    settings, config, model_a, model_b = model_stack
    label_a, label_b = _label(model_a), _label(model_b)
    alias = settings.milvus.collection
    name_a, name_b = model_collection_name(alias, label_a), model_collection_name(alias, label_b)
    folders = {drop: _write_drop(tmp_path / drop, names) for drop, names in DROPS.items()}
    instance = DagsterInstance.get()
    observe_model(instance)

    # Model A: the first drop creates A's collection and the alias pointing at it.
    for drop, folder in folders.items():
        summary = runs.ingest(settings, folder, drop)
        assert summary["success"] and summary["ok"] == len(DROPS[drop]), summary
    with ModelCollections(settings.milvus) as collections:
        assert collections.search_collection() == name_a
        assert collections.model_of(name_a) == label_a
    stored = settings.drops
    before = {
        q: _hits(settings, stored / "animals-and-food" if q == "chelsea" else stored / "places", q) for q in QUERIES
    }
    for query, hits in before.items():
        assert hits[0][:2] == (query, pytest.approx(1.0, abs=1e-4)) and {h[2] for h in hits} == {label_a}
    assert _stale(instance, "places") == "FRESH"

    # Model B configured: the running server reloads, and keeps A loaded under its archived name.
    data = yaml.safe_load(config.read_text())
    data["triton"]["model_path"] = str(model_b)
    config.write_text(yaml.safe_dump(data))
    settings_b = load_settings()
    triton_pid = processes.read(settings.paths.run, "triton").pid
    services.start_services(settings_b)
    assert processes.read(settings.paths.run, "triton").pid == triton_pid  # reloaded, not restarted
    with TritonEmbedder(settings_b.triton.url, settings_b.triton.model_name) as served:
        assert served.model_version_label() == label_b and served.input_spec().output_dim == DIM_B
    with TritonEmbedder(settings_b.triton.url, archived_model_name("image_embedder", file_sha256(model_a))) as old:
        assert old.input_spec().output_dim == DIM_A

    # Search still answers from A's collection, embedding the query with A: the same hits as before.
    after = {
        q: _hits(settings_b, stored / "animals-and-food" if q == "chelsea" else stored / "places", q) for q in QUERIES
    }
    assert after == before
    # The observed model changed: Dagster shows the embedded drops as stale.
    assert observe_model(instance) == label_b
    assert {_stale(instance, drop) for drop in DROPS} == {"STALE"}

    # Nothing of B yet: the switch refuses, naming every drop it lacks, and search stays where it is.
    refused = _switch(instance)
    assert not refused.success
    message = step_errors(refused.all_events)[0]["error"]
    assert "lacks all 2 drop(s)" in message and all(drop in message for drop in DROPS)

    # Re-embed: a backfill of ingest_drop over every drop (submitted by the CLI), executed by the real daemon.
    assert main(["reembed"]) == 0
    backfill = instance.get_backfills(limit=1)[0]
    backfill_id = backfill.backfill_id
    assert backfill_id in capsys.readouterr().out and sorted(backfill.partition_names) == sorted(DROPS)
    services.start_dagster(settings_b)
    finished = _wait_for_backfill(instance, backfill_id, len(DROPS))
    assert {r.status for r in finished} == {DagsterRunStatus.SUCCESS}
    assert {r.tags["dagster/partition"] for r in finished} == set(DROPS)
    services.stop_dagster(settings_b)
    assert {_stale(instance, drop) for drop in DROPS} == {"FRESH"}

    with ModelCollections(settings_b.milvus) as collections:
        infos = {i.name: i for i in collections.describe()}
        assert set(infos) == {name_a, name_b}
        a, b = infos[name_a], infos[name_b]
        # B holds every drop, at B's dimension, with B's label only; A is untouched.
        assert (b.model, b.dimension, b.drops) == (label_b, DIM_B, {d: len(n) for d, n in DROPS.items()})
        assert (a.model, a.dimension, a.drops) == (label_a, DIM_A, {d: len(n) for d, n in DROPS.items()})
        assert _models_in(collections, name_a) == {label_a} and _models_in(collections, name_b) == {label_b}
        # Search has not moved: the switch is pending.
        assert collections.search_collection() == name_a and (a.search, b.search) == (True, False)
    assert _hits(settings_b, stored / "places", "china") == before["china"]

    # Switch: the alias moves in one call; search now answers from B's collection, with B. Searches running all
    # through the switch get A's answer or B's, never a mix and never an error.
    answers: list[set[str]] = []
    failures: list[str] = []
    stop = threading.Event()

    def search_loop() -> None:
        while not stop.is_set():
            try:
                answers.append({h[2] for h in _hits(settings_b, stored / "places", "china")})
            except Exception as exc:  # noqa: BLE001 - recorded: any error during the switch fails the test
                failures.append(f"{type(exc).__name__}: {exc}")

    searcher = threading.Thread(target=search_loop, daemon=True)
    searcher.start()
    while len(answers) < 2 and not failures:
        time.sleep(0.05)
    assert main(["models", "switch", "--json"]) == 0
    seen = len(answers)
    while len(answers) < seen + 2 and not failures:
        time.sleep(0.05)
    stop.set()
    searcher.join(60)
    assert failures == []
    assert all(models in ({label_a}, {label_b}) for models in answers), answers
    assert answers[0] == {label_a} and answers[-1] == {label_b}
    listed = {c["collection"]: c for c in json.loads(capsys.readouterr().out)}
    assert (listed[name_b]["search"], listed[name_a]["search"]) == (True, False)
    with ModelCollections(settings_b.milvus) as collections:
        assert collections.search_collection() == name_b
        with collections.index(name_a) as index:
            assert index.count() == sum(len(n) for n in DROPS.values())
            assert index.count(f"model != {quote(label_a)}") == 0
    for query in QUERIES:
        folder = stored / ("animals-and-food" if query == "chelsea" else "places")
        hits = _hits(settings_b, folder, query)
        assert hits[0][:2] == (query, pytest.approx(1.0, abs=1e-4)) and {h[2] for h in hits} == {label_b}
