"""A big drop in shards, on the real stack: the preprocess and embed stages split into parallel steps, each image
indexed exactly once, and a re-run that keeps exactly the same rows.

The drop has a few thousand small images and ``dagster.shard_items`` is set low, so the CLI's ingest picks the
sharded job (one process per step, two at a time). The Triton pool of the session's instance lets one embedding
shard talk to the server at a time; decoding shards have no pool, so two of them must overlap in time.
"""

from __future__ import annotations

import io
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from dagster import DagsterEventType, DagsterInstance
from PIL import Image

from embedding_pipeline.index.client import ImageIndex, drop_filter
from embedding_pipeline.orchestration import runs
from embedding_pipeline.orchestration.names import INGEST_SHARDED_JOB
from embedding_pipeline.settings import load_settings
from embedding_pipeline.storage import arrow, layout

pytestmark = pytest.mark.integration

IMAGES = 2000
SHARD_ITEMS = 500  # four shards per stage


def _drop(folder: Path, count: int, seed: int = 7) -> Path:
    """``count`` distinct small JPEG images (random noise), ids from their content."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for n in range(count):
        pixels = rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
        (folder / f"img-{n:05d}.jpg").write_bytes(buffer.getvalue())
    return folder


def _step_windows(run_id: str, prefix: str) -> dict[str, tuple[float, float]]:
    """step key -> (started, finished) of the run's steps whose key starts with ``prefix``."""
    instance = DagsterInstance.get()
    starts, ends = {}, {}
    for record in instance.all_logs(run_id):
        key = record.step_key or ""
        if not key.startswith(prefix) or record.dagster_event is None:
            continue
        if record.dagster_event.event_type == DagsterEventType.STEP_START:
            starts[key] = record.timestamp
        elif record.dagster_event.event_type == DagsterEventType.STEP_SUCCESS:
            ends[key] = record.timestamp
    return {key: (starts[key], ends[key]) for key in starts if key in ends}


def _most_at_once(windows: dict[str, tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in windows.values()] + [(end, -1) for _, end in windows.values()])
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


def _stored_ids(settings, drop: str) -> list[str]:
    with ImageIndex(settings.milvus) as index:
        return [row["id"] for page in index.pages(drop_filter(drop), ["id"], strong=True) for row in page]


def test_a_big_drop_runs_in_parallel_shards_and_indexes_each_image_once(stack, tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDDING_PIPELINE_SHARD_ITEMS", str(SHARD_ITEMS))  # the step processes read it too
    settings = load_settings()
    assert settings.dagster.shard_items == SHARD_ITEMS
    drop = "sharded-big"
    started = datetime.now().timestamp()
    summary = runs.ingest(settings, _drop(tmp_path / drop, IMAGES), drop)
    assert summary["success"], summary.get("errors")
    assert summary["job"] == INGEST_SHARDED_JOB
    assert (summary["items"], summary["ok"], summary["failed"]) == (IMAGES, IMAGES, 0)

    # Every stage ran as four shards; two decoding shards ran at the same moment.
    preprocess = _step_windows(summary["run_id"], "preprocessed_batches.preprocess_shard[")
    embed = _step_windows(summary["run_id"], "image_embeddings.embed_shard[")
    assert len(preprocess) == len(embed) == IMAGES // SHARD_ITEMS, (sorted(preprocess), sorted(embed))
    assert _most_at_once(preprocess) >= 2, preprocess
    assert all(start >= started for start, _ in preprocess.values())

    # One commit: the drop's embeddings hold every image once, from all four shards.
    files = layout.drop_files(settings, drop)
    ids = [i for t in arrow.read_batches(files.embeddings, columns=["id"]) for i in t.column("id").to_pylist()]
    assert len(ids) == len(set(ids)) == IMAGES
    assert {p.name.split("-batch-")[0] for p in arrow.batch_files(files.embeddings)} == {
        f"s{k:04d}" for k in range(IMAGES // SHARD_ITEMS)
    }
    # ... and the index stage wrote exactly one row per image.
    stored = _stored_ids(settings, drop)
    assert len(stored) == len(set(stored)) == IMAGES
    assert set(stored) == set(ids)

    # A re-run (the same drop, sharded again) computes nothing and leaves exactly the same rows.
    again = runs.ingest(settings, settings.drops / drop, drop)
    assert again["success"], again.get("errors")
    assert set(_stored_ids(settings, drop)) == set(stored)
    events = DagsterInstance.get().all_logs(again["run_id"], of_type=DagsterEventType.ASSET_MATERIALIZATION)
    [embedded] = [
        e.dagster_event.event_specific_data.materialization.metadata
        for e in events
        if e.dagster_event.event_specific_data.materialization.asset_key.to_user_string() == "image_embeddings"
    ]
    assert (embedded["computed"].value, embedded["reused"].value) == (0, IMAGES)


def test_a_sharded_drop_in_a_bucket_writes_its_outputs_there_and_each_row_once(stack, seaweedfs, tmp_path, monkeypatch):
    """The same on object storage: drop and outputs in SeaweedFS, four shards, one row per image."""
    images, shard_items = 600, 150
    bucket = seaweedfs.make_bucket("shards")
    for key, value in seaweedfs.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("EMBEDDING_PIPELINE_SHARD_ITEMS", str(shard_items))
    monkeypatch.setenv("EMBEDDING_PIPELINE_DROPS", f"s3://{bucket}/drops")
    monkeypatch.setenv("EMBEDDING_PIPELINE_OUTPUTS", f"s3://{bucket}/outputs")
    settings = load_settings()
    drop = "sharded-bucket"
    summary = runs.ingest(settings, _drop(tmp_path / drop, images, seed=11), drop)
    assert summary["success"], summary.get("errors")
    assert (summary["job"], summary["ok"]) == (INGEST_SHARDED_JOB, images)
    assert len(_step_windows(summary["run_id"], "image_embeddings.embed_shard[")) == images // shard_items

    files = layout.drop_files(settings, drop)
    assert str(files.embeddings).startswith(f"s3://{bucket}/outputs/")
    ids = [i for t in arrow.read_batches(files.embeddings, columns=["id"]) for i in t.column("id").to_pylist()]
    assert len(ids) == len(set(ids)) == images
    # The commit record names every shard's files with their rows; nothing of the run was written locally.
    assert sum(arrow.batch_rows(files.preprocessed)) == images
    local = settings.paths.data
    assert not any((local / kind / drop).exists() for kind in ("preprocessed", "embeddings"))
    assert not (local / "manifests" / f"{drop}.arrow").exists() and not (settings.paths.drops / drop).exists()
    stored = _stored_ids(settings, drop)
    assert len(stored) == len(set(stored)) == images and set(stored) == set(ids)
