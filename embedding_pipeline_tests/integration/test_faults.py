"""Faults with real processes: Triton killed in the middle of a drop, Milvus killed in the middle of an upsert,
and either one not running when a run starts.

The pipeline's choice: a run whose service goes away fails (after the client's short retries) with an error that
names the service, its address and what was being done. Nothing half-written counts as done: every stage commits
its output atomically, and the index stage compares the drop's stored rows with its embeddings. Re-running the
drop once the service is back converges to exactly one row per good image.

These tests run on their own stack (own home, ports and Dagster instance) so killing servers never disturbs the
shared one.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import requests
import yaml

from embedding_pipeline import ingest, services
from embedding_pipeline.bench import synthetic
from embedding_pipeline.index.client import ImageIndex
from embedding_pipeline.orchestration import runs
from embedding_pipeline.runtime import processes
from embedding_pipeline.settings import Settings
from embedding_pipeline.storage import layout
from embedding_pipeline_tests.integration.conftest import running_stack, write_config

pytestmark = pytest.mark.integration

IMAGES = 400


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory) -> Iterator[Settings]:
    home = tmp_path_factory.mktemp("fault_home")
    config_path = write_config(home)
    config = yaml.safe_load(config_path.read_text())
    # Short waits so a dead service fails the run in seconds; tiny upserts so a kill lands mid-upsert.
    config["triton"].update(ready_timeout_s=3, retries=2, retry_backoff_s=0.2, timeout_s=10)
    config["milvus"].update(insert_batch_size=2)
    config_path.write_text(yaml.safe_dump(config))
    with running_stack(home, config_path) as settings:
        yield settings


def _kill(settings: Settings, name: str) -> None:
    proc = processes.read(settings.paths.run, name)
    assert proc is not None, f"{name} is not running"
    os.killpg(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while processes.read(settings.paths.run, name) is not None and time.monotonic() < deadline:
        time.sleep(0.05)


def _when(condition: Callable[[], bool], action: Callable[[], None], timeout_s: float = 120) -> threading.Thread:
    """Run ``action`` in the background as soon as ``condition`` holds; the thread records whether it fired."""

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                ready = condition()
            except Exception:  # noqa: BLE001 - the service may be busy or starting: just look again
                ready = False
            if ready:
                action()
                thread.fired = True  # type: ignore[attr-defined]
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.fired = False  # type: ignore[attr-defined]
    thread.start()
    return thread


def _inferences(settings: Settings) -> int:
    triton = settings.triton
    stats = requests.get(f"http://{triton.url}/v2/models/{triton.model_name}/stats", timeout=2).json()
    return int(stats["model_stats"][0]["inference_count"])


def _rows_of(settings: Settings, drop: str) -> int:
    with ImageIndex(settings.milvus) as index:
        return index.count_drop(drop) if index.exists() else 0


def _drop(settings: Settings, name: str, count: int, seed: int) -> Path:
    # A distinct seed per drop: ids default to content hashes, so drops must not share images.
    folder = settings.home / "sources" / name
    synthetic.write_drop(folder, count, seed=seed)
    return folder


def _assert_converged(settings: Settings, drop: str, expected: int) -> None:
    good = {r["id"] for r in ingest.item_report(settings, drop) if r["status"] == "ok"}
    assert len(good) == expected
    with ImageIndex(settings.milvus) as index:
        assert index.drop_ids(drop) == good
        assert index.count_drop(drop) == expected


def _error_text(summary: dict) -> str:
    assert not summary["success"], summary
    assert summary["errors"], summary
    return " ".join(e["error"] for e in summary["errors"])


def test_triton_killed_mid_drop_fails_clearly_and_a_rerun_converges(fault_stack):
    settings = fault_stack
    folder = _drop(settings, "killed-triton", IMAGES, seed=101)
    before = _inferences(settings)
    killer = _when(lambda: _inferences(settings) >= before + 64, lambda: _kill(settings, "triton"))
    summary = runs.ingest(settings, folder)
    killer.join(timeout=5)
    assert killer.fired, "Triton finished the drop before it could be killed; make the drop larger"
    error = _error_text(summary)
    assert settings.triton.url in error and settings.triton.model_name in error
    # The asset's step that failed: its shard step (a graph-backed asset's steps are "<asset>.<op>").
    assert {e["step"].split(".")[0] for e in summary["errors"]} == {"image_embeddings"}
    # Half a drop of vectors was computed before the kill; none of it may count as the drop's embeddings.
    assert not list(layout.drop_files(settings, "killed-triton").embeddings.glob("*.arrow"))
    assert _rows_of(settings, "killed-triton") == 0

    services.start_services(settings)
    again = runs.ingest(settings, settings.drops / "killed-triton")
    assert again["success"], again
    _assert_converged(settings, "killed-triton", IMAGES)


def test_milvus_killed_mid_upsert_fails_clearly_and_a_rerun_converges(fault_stack):
    settings = fault_stack
    # A drop indexed before the kill: it must come through the crash whole (this test's own, not another's).
    bystander = runs.ingest(settings, _drop(settings, "bystander", 20, seed=203))
    assert bystander["success"], bystander
    folder = _drop(settings, "killed-milvus", IMAGES, seed=202)
    killer = _when(lambda: 0 < _rows_of(settings, "killed-milvus") < IMAGES, lambda: _kill(settings, "milvus"))
    summary = runs.ingest(settings, folder)
    killer.join(timeout=5)
    assert killer.fired, "the upsert finished before Milvus could be killed"
    error = _error_text(summary)
    assert settings.milvus.uri in error
    assert {e["step"].split(".")[0] for e in summary["errors"]} == {"milvus_collection"}

    services.start_services(settings)
    # Whatever part of the upsert survived the kill, the re-run writes exactly the missing rows.
    again = runs.ingest(settings, settings.drops / "killed-milvus")
    assert again["success"], again
    _assert_converged(settings, "killed-milvus", IMAGES)
    _assert_converged(settings, "bystander", 20)


def test_milvus_stopped_under_the_running_api_answers_503_and_recovers(fault_stack):
    """The real API (in process, real Triton and Milvus clients) loses Milvus: searches answer 503 'unavailable'
    with the one error shape and no credentials, and answer again once Milvus is back."""
    from fastapi.testclient import TestClient

    from embedding_pipeline.api.app import create_app

    settings = fault_stack
    summary = runs.ingest(settings, _drop(settings, "api-under-fault", 8, seed=505))
    assert summary["success"], summary
    query = str(next(iter(sorted((settings.drops / "api-under-fault").glob("*.*")))))
    body = {"query_input": query, "topk": 3}
    with TestClient(create_app(settings, api_key=""), base_url="http://127.0.0.1") as client:
        assert client.post("/search", json=body).status_code == 200
        _kill(settings, "milvus")
        try:
            down = client.post("/search", json=body)
            assert down.status_code == 503, down.text
            error = down.json()["error"]
            assert error["code"] == "unavailable" and error["message"]
            assert "Traceback" not in down.text
        finally:
            services.start_services(settings)
        deadline = time.monotonic() + 60
        while (status := client.post("/search", json=body).status_code) != 200 and time.monotonic() < deadline:
            time.sleep(1)
        assert status == 200


@pytest.mark.parametrize("service", ["triton", "milvus"])
def test_a_service_down_at_start_fails_clearly_and_a_rerun_converges(fault_stack, service):
    settings = fault_stack
    drop = f"{service}-down"
    folder = _drop(settings, drop, 12, seed=303 if service == "triton" else 404)
    services.stop_services(settings, only=[service])
    started = time.monotonic()
    summary = runs.ingest(settings, folder)
    elapsed = time.monotonic() - started
    error = _error_text(summary)
    if service == "triton":
        assert settings.triton.url in error and settings.triton.model_name in error
    else:
        assert settings.milvus.uri in error
    assert elapsed < 90, f"failing took {elapsed:.0f} s"
    assert not list(layout.drop_files(settings, drop).embeddings.glob("*.arrow")) or service == "milvus"

    services.start_services(settings)
    assert _rows_of(settings, drop) == 0
    again = runs.ingest(settings, settings.drops / drop)
    assert again["success"], again
    _assert_converged(settings, drop, 12)
