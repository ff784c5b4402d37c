"""Retention planning and deletion on disk, with a fake vector store standing in for Milvus and a real ephemeral
Dagster instance for partitions and runs."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from dagster import DagsterInstance, DagsterRun, DagsterRunStatus

from embedding_pipeline import retention
from embedding_pipeline.index.collections import matching_collections
from embedding_pipeline.orchestration.instance import DagsterDrops
from embedding_pipeline.settings import load_settings
from embedding_pipeline.sources.items import blob_path
from embedding_pipeline.storage import arrow
from embedding_pipeline.storage.layout import MANIFEST_SCHEMA, drop_files

SHARED_SHA = "a" * 64  # a download both drops list
OWN_SHA = "b" * 64  # a download only drop "cats" lists
LOCAL_SHA = "c" * 64  # a local file of drop "cats"


class FakeDropRows:
    """A fake vector store: collection -> drop -> row count, in memory. Records what it was asked to delete."""

    def __init__(self, counts: dict[str, dict[str, int]]):
        self.counts = counts
        self.deleted: list[tuple[str, str]] = []

    def collections(self) -> list[str]:
        return matching_collections(self.counts, "image_embeddings")

    def count(self, collection: str, drop: str) -> int:
        return self.counts[collection].get(drop, 0)

    def delete(self, collection: str, drop: str) -> int:
        self.deleted.append((collection, drop))
        return self.counts[collection].pop(drop, 0)

    def close(self) -> None:
        pass


def _manifest(path: Path, rows: list[tuple[str, str]]) -> None:
    """A manifest with one ok item per (uri, sha256)."""
    n = len(rows)
    arrow.write_table(
        path,
        pa.Table.from_pydict(
            {
                "id": [f"id{i}" for i in range(n)],
                "uri": [u for u, _ in rows],
                "metadata": ["{}"] * n,
                "sha256": [s for _, s in rows],
                "size": [3] * n,
                "source": [""] * n,
                "file_id": [""] * n,
                "status": ["ok"] * n,
                "error": [""] * n,
                "error_kind": [""] * n,
            },
            schema=MANIFEST_SCHEMA,
        ),
    )


def _ingested(settings, drop: str, rows: list[tuple[str, str]]) -> None:
    """What an ingest run leaves on disk: the source folder, the manifest, tensor batches, embeddings, blobs."""
    files = drop_files(settings, drop)
    (settings.drops / drop).mkdir(parents=True)
    (settings.drops / drop / "photo.jpg").write_bytes(b"12345")
    _manifest(files.manifest, rows)
    for folder in (files.preprocessed, files.embeddings):
        folder.mkdir(parents=True)
        (folder / "batch-00000.arrow").write_bytes(b"x" * 100)
    for uri, sha in rows:
        if uri.startswith("http"):
            blob = blob_path(files.blobs, sha)
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(b"blob")


@pytest.fixture
def settings(tmp_path):
    s = load_settings(environ={"EMBEDDING_PIPELINE_HOME": str(tmp_path / "home")})
    _ingested(
        s,
        "cats",
        [("https://example.com/a.jpg", SHARED_SHA), ("https://example.com/b.jpg", OWN_SHA), ("photo.jpg", LOCAL_SHA)],
    )
    _ingested(s, "dogs", [("https://example.com/a.jpg", SHARED_SHA)])
    return s


@pytest.fixture
def rows():
    return FakeDropRows(
        {
            "image_embeddings": {"cats": 2, "dogs": 1},
            "image_embeddings__efficientnet_lite0": {"cats": 3},
            "other_collection": {"cats": 7},
        }
    )


@pytest.fixture
def instance():
    with DagsterInstance.ephemeral() as inst:
        inst.add_dynamic_partitions("drops", ["cats", "dogs"])
        yield inst


def test_collections_of_the_configured_name_and_its_per_model_ones():
    names = ["image_embeddings", "image_embeddings__m1", "image_embeddings_old", "x__image_embeddings", "images"]
    assert matching_collections(names, "image_embeddings") == ["image_embeddings", "image_embeddings__m1"]


def test_plan_lists_the_drops_files_blobs_rows_and_partition_and_touches_nothing(settings, rows, instance):
    files = drop_files(settings, "cats")
    # Leftovers of interrupted writes of "cats", and one of a drop whose name starts like it.
    (files.embeddings.parent / ".cats.0123abcd.staging").mkdir()
    (files.manifest.parent / "cats.89abcdef.tmp").write_bytes(b"t")
    (files.embeddings.parent / ".cats.x.0123abcd.staging").mkdir()

    plan = retention.plan_drop_deletion(settings, "cats", DagsterDrops(instance), rows=rows)

    by_kind = {}
    for p in plan.paths:
        by_kind.setdefault(p.kind, []).append(p)
    assert [p.path for p in by_kind["source"]] == [settings.drops / "cats"]
    assert by_kind["source"][0].files == 1 and by_kind["source"][0].bytes == 5
    assert [p.path for p in by_kind["manifest"]] == [files.manifest]
    assert [(p.path, p.files, p.bytes) for p in by_kind["preprocessed"]] == [(files.preprocessed, 1, 100)]
    assert [p.path for p in by_kind["embeddings"]] == [files.embeddings]
    # Only the blob no other drop lists; the shared one is kept and counted.
    assert [p.path for p in by_kind["blob"]] == [blob_path(files.blobs, OWN_SHA)]
    assert plan.shared_blobs == 1
    assert sorted(p.path.name for p in by_kind["leftover"]) == [".cats.0123abcd.staging", "cats.89abcdef.tmp"]
    # Rows in the collection and its per-model collection; an unrelated collection is not ours.
    assert plan.rows == {"image_embeddings": 2, "image_embeddings__efficientnet_lite0": 3}
    assert plan.total_rows == 5 and plan.partition and plan.runs_in_progress == []
    assert plan.files == sum(p.files for p in plan.paths) and plan.bytes == sum(p.bytes for p in plan.paths)

    table = plan.markdown()
    assert "| Milvus rows | collection `image_embeddings__efficientnet_lite0` | | | 3 |" in table
    assert f"**{plan.files}**" in table and "1 downloaded blob(s) are listed by other drops too" in table
    json.dumps(plan.as_dict())  # JSON-able, for the CLI and run metadata

    # Nothing was touched.
    assert all(p.path.exists() for p in plan.paths) and rows.deleted == []
    assert instance.has_dynamic_partition("drops", "cats")


def test_plan_refuses_invalid_and_unknown_names(settings, rows, instance):
    for bad in ["../cats", ".hidden", "a/b", ""]:
        with pytest.raises(ValueError, match="invalid drop name"):
            retention.plan_drop_deletion(settings, bad, DagsterDrops(instance), rows=rows)
    with pytest.raises(retention.UnknownDropError, match="no drop named 'birds'"):
        retention.plan_drop_deletion(settings, "birds", DagsterDrops(instance), rows=rows)


def test_a_drop_known_only_by_its_rows_can_still_be_deleted(settings, instance):
    # What an interrupted deletion leaves when Milvus was down: no files, no source, only rows and the partition.
    rows = FakeDropRows({"image_embeddings": {"gone": 4}})
    plan = retention.plan_drop_deletion(settings, "gone", rows=rows)
    assert plan.paths == [] and plan.rows == {"image_embeddings": 4}


def test_plan_names_runs_in_progress_but_not_the_callers_own(settings, rows, instance):
    instance.add_run(
        DagsterRun(
            job_name="ingest_drop", run_id="r-busy", status=DagsterRunStatus.STARTED, tags={"dagster/partition": "cats"}
        )
    )
    instance.add_run(
        DagsterRun(job_name="delete_drop", run_id="r-self", status=DagsterRunStatus.STARTED, tags={"drop": "cats"})
    )
    instance.add_run(
        DagsterRun(job_name="ingest_drop", run_id="r-done", status=DagsterRunStatus.SUCCESS, tags={"drop": "cats"})
    )
    plan = retention.plan_drop_deletion(settings, "cats", DagsterDrops(instance), rows=rows, this_run="r-self")
    assert plan.runs_in_progress == ["r-busy"]
    with pytest.raises(retention.DropBusyError, match="r-busy"):
        retention.delete_drop(settings, "cats", DagsterDrops(instance), rows=rows, this_run="r-self")
    assert (settings.drops / "cats").exists() and rows.deleted == []


def test_delete_removes_the_drop_and_leaves_the_other_drop_whole(settings, rows, instance):
    dogs_before = sorted(p for p in settings.paths.root.rglob("*") if "dogs" in str(p))
    result = retention.delete_drop(settings, "cats", DagsterDrops(instance), rows=rows)

    assert all(not p.path.exists() for p in result.plan.paths)
    assert not (settings.drops / "cats").exists()
    assert result.deleted_rows == {"image_embeddings": 2, "image_embeddings__efficientnet_lite0": 3}
    assert rows.counts["image_embeddings"] == {"dogs": 1} and rows.counts["other_collection"] == {"cats": 7}
    assert result.partition_deleted and instance.get_dynamic_partitions("drops") == ["dogs"]
    assert result.history.startswith("kept")  # SQLite event storage: no per-partition wipe in open-source Dagster
    # The other drop keeps its source, files and the blob both listed; no hidden half-deleted folder stays.
    assert sorted(p for p in settings.paths.root.rglob("*") if "dogs" in str(p)) == dogs_before
    assert blob_path(drop_files(settings, "dogs").blobs, SHARED_SHA).is_file()
    assert not [p for p in settings.paths.root.rglob(".*deleting")]
    assert not (drop_files(settings, "cats").blobs / OWN_SHA[:2]).exists()  # its emptied fan-out folder too
    # Deleted means unknown now.
    with pytest.raises(retention.UnknownDropError):
        retention.delete_drop(settings, "cats", DagsterDrops(instance), rows=rows)


def test_a_manifest_file_drop_is_removed_but_not_the_files_it_points_to(settings, rows, instance, tmp_path):
    outside = tmp_path / "library" / "photo.jpg"
    outside.parent.mkdir()
    outside.write_bytes(b"keep me")
    manifest = settings.drops / "list.jsonl"
    manifest.write_text(json.dumps({"uri": str(outside)}) + "\n")
    instance.add_dynamic_partitions("drops", ["list.jsonl"])
    result = retention.delete_drop(settings, "list.jsonl", DagsterDrops(instance), rows=rows)
    assert [(p.kind, p.path) for p in result.plan.paths] == [("source", manifest)]
    assert not manifest.exists() and outside.read_bytes() == b"keep me"


def test_cli_delete_drop_refuses_an_invalid_name_without_touching_anything(tmp_path):
    cli = str(Path(sys.executable).with_name("embedding-pipeline"))
    env = {"EMBEDDING_PIPELINE_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([cli, "delete-drop", "../etc"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "invalid drop name '../etc'" in done.stderr


def test_deleting_a_drop_takes_its_duplicate_report_and_nothing_named_like_it(settings, rows, instance):
    reports = drop_files(settings, "cats").duplicates.parent
    reports.mkdir(parents=True, exist_ok=True)
    own = [reports / "cats.parquet", reports / "cats.0123abcd.tmp"]  # the report and an interrupted write of it
    # Other drops' reports and writes whose names start like it: "cats.0123abcd" and "cats.b" are valid drop names.
    others = [
        reports / "dogs.parquet",
        reports / "cats.b.parquet",
        reports / "cats.0123abcd.parquet",
        reports / "cats.0123abcd.89abcdef.tmp",
        reports / "cats.b.0123abcd.tmp",
        reports / "xcats.parquet",
    ]
    for path in own + others:
        path.write_bytes(b"PAR1")
    plan = retention.plan_drop_deletion(settings, "cats", DagsterDrops(instance), rows=rows)
    assert {p.path for p in plan.paths if p.path.parent == reports} == set(own)
    retention.delete_drop(settings, "cats", DagsterDrops(instance), rows=rows)
    assert not any(p.exists() for p in own) and all(p.is_file() for p in others)
