"""Retention on real services: two drops ingested through Dagster (real Triton, Milvus), one deleted.

A dry run (the `delete_drop` job in the instance) lists the right things and deletes nothing; the real deletion
(the CLI, in its own process) leaves nothing of the drop — files, source, rows in every collection of the
configured name, partition — and the other drop keeps its files, rows and search hits.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dagster import DagsterEventType, DagsterInstance
from PIL import Image

from embedding_pipeline import retention
from embedding_pipeline.index.client import ImageIndex
from embedding_pipeline.index.expressions import literal as quote
from embedding_pipeline.orchestration import runs
from embedding_pipeline.orchestration.instance import DagsterDrops
from embedding_pipeline.orchestration.runs import execute_delete_drop
from embedding_pipeline.retrieval import search
from embedding_pipeline.sources.samples import load_photo
from embedding_pipeline.storage.layout import drop_files

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).with_name("embedding-pipeline"))
KEEP, GONE = "retention-keep", "retention-gone"
PHOTOS = {KEEP: ["chelsea", "coffee", "rocket"], GONE: ["astronaut", "coins", "flower"]}
EXTRA_DIM = 8  # a second, per-model collection of another dimension, as a model change leaves behind


def _write_drop(folder: Path, drop: str) -> Path:
    """Photos with ids of their own (no other test's drop shares a row id with them) and a category each."""
    folder.mkdir(parents=True)
    rows = []
    for name in PHOTOS[drop]:
        Image.fromarray(load_photo(name)).save(folder / f"{name}.jpg", quality=90)
        rows.append({"id": f"{drop}-{name}", "uri": f"{name}.jpg", "metadata": {"category": "retention"}})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _snapshot(settings, drop: str) -> dict[str, tuple[int, int]]:
    """Every file of the drop (source and data) with its size and mtime."""
    files = drop_files(settings, drop)
    roots = [settings.drops / drop, files.manifest, files.preprocessed, files.embeddings, files.index_report]
    found = {}
    for root in roots:
        for path in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
            stat = path.stat()
            found[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return found


def _strong_counts(settings, drop: str) -> dict[str, int]:
    rows = retention.MilvusDropRows(settings.milvus)
    try:
        return {c: rows.count(c, drop) for c in rows.collections()}
    finally:
        rows.close()


def _deletion_table(instance: DagsterInstance, run_id: str) -> str:
    outputs = [
        e for e in instance.all_logs(run_id, of_type=DagsterEventType.STEP_OUTPUT) if e.step_key == "delete_drop_data"
    ]
    return outputs[0].dagster_event.event_specific_data.metadata["deletion"].value


@pytest.fixture
def two_drops(stack, tmp_path):
    """Both drops ingested, plus rows of both in an extra per-model collection; all of it removed afterwards."""
    for drop in (KEEP, GONE):
        summary = runs.ingest(stack, _write_drop(tmp_path / drop, drop), drop)
        assert summary["success"] and summary["ok"] == 3, summary
    extra = stack.milvus.model_copy(update={"collection": f"{stack.milvus.collection}__retention_test_model"})
    rng = np.random.default_rng(0)
    with ImageIndex(extra) as index:
        index.ensure_collection(EXTRA_DIM)
        index.upsert(
            [
                {
                    "id": f"{drop}-x{i}",
                    "embedding": rng.standard_normal(EXTRA_DIM),
                    "drop": drop,
                    "uri": "x",
                    "sha256": "0" * 64,
                    "model": "other:1",
                }
                for drop, n in ((KEEP, 2), (GONE, 4))
                for i in range(n)
            ]
        )
        index.flush()
    try:
        yield stack, extra.collection
    finally:
        # The session's collection is shared with other tests: leave it as it was.
        instance = DagsterInstance.get()
        for drop in (KEEP, GONE):
            try:
                retention.delete_drop(stack, drop, DagsterDrops(instance))
            except retention.UnknownDropError:
                pass
        with ImageIndex(extra) as index:
            index.client.drop_collection(extra.collection)


def test_dry_run_deletes_nothing_then_deletion_leaves_nothing_of_the_drop(two_drops):
    settings, extra_collection = two_drops
    instance = DagsterInstance.get()
    gone_files = drop_files(settings, GONE)
    gone_before, keep_before = _snapshot(settings, GONE), _snapshot(settings, KEEP)
    counts_before = _strong_counts(settings, GONE)
    assert counts_before[extra_collection] == 4 and sum(counts_before.values()) == 3 + 4

    # Dry run, through the job as the UI launches it: lists the drop's things, touches none.
    dry = execute_delete_drop(settings, GONE, dry_run=True)
    assert dry["success"], dry
    plan = dry["summary"]
    assert plan["dry_run"] and plan["partition"]
    assert {(p["kind"], p["path"]) for p in plan["paths"]} == {
        ("source", str(settings.drops / GONE)),
        ("manifest", str(gone_files.manifest)),
        ("preprocessed", str(gone_files.preprocessed)),
        ("embeddings", str(gone_files.embeddings)),
        ("index", str(gone_files.index_report)),
    }
    assert plan["files"] == len(gone_before) and plan["bytes"] == sum(s for s, _ in gone_before.values())
    assert {c: n for c, n in plan["rows"].items()} == {c: n for c, n in counts_before.items() if n}
    table = _deletion_table(instance, dry["run_id"])
    assert f"collection `{extra_collection}` | | | 4 |" in table and f"`{settings.drops / GONE}`" in table
    assert _snapshot(settings, GONE) == gone_before and _strong_counts(settings, GONE) == counts_before
    assert GONE in instance.get_dynamic_partitions("drops")

    # The real deletion, from the CLI in its own process.
    done = subprocess.run(
        [CLI, "delete-drop", GONE, "--yes", "--json"], env=dict(os.environ), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert not result["dry_run"] and result["partition_deleted"]
    assert result["deleted_rows"] == {c: n for c, n in counts_before.items() if n}
    print("deleted:", json.dumps({k: result[k] for k in ("files", "bytes", "deleted_rows", "history")}))

    # Nothing of the drop remains.
    assert not any(Path(p).exists() for p in gone_before)
    assert not (settings.drops / GONE).exists() and not gone_files.manifest.exists()
    assert not gone_files.preprocessed.exists() and not gone_files.embeddings.exists()
    assert not gone_files.index_report.exists()
    assert not [p for p in settings.paths.root.rglob(f"*{GONE}*")], "a file of the deleted drop is left"
    assert set(_strong_counts(settings, GONE).values()) == {0}
    assert GONE not in DagsterInstance.get().get_dynamic_partitions("drops")
    assert (
        search(settings.drops / KEEP / "coffee.jpg", top_k=3, filter=f"drop == {quote(GONE)}", settings=settings) == []
    )

    # The other drop is untouched: its files, its rows in both collections, its search hits.
    assert _snapshot(settings, KEEP) == keep_before
    keep_counts = _strong_counts(settings, KEEP)
    assert keep_counts[extra_collection] == 2 and sum(keep_counts.values()) == 3 + 2
    assert KEEP in DagsterInstance.get().get_dynamic_partitions("drops")
    hits = search(settings.drops / KEEP / "coffee.jpg", top_k=3, filter=f"drop == {quote(KEEP)}", settings=settings)
    assert hits[0]["id"] == f"{KEEP}-coffee" and hits[0]["score"] > 0.99
    assert {h["id"] for h in hits} == {f"{KEEP}-{name}" for name in PHOTOS[KEEP]}

    # The drop is unknown now: a second deletion is refused with a clear message.
    again = subprocess.run(
        [CLI, "delete-drop", GONE], env=dict(os.environ), capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 1 and f"no drop named {GONE!r}" in again.stderr, again.stderr


def test_rows_of_a_drop_go_from_every_model_collection_on_milvus_2_3(standalone_milvus, tmp_path):
    """On a real Milvus 2.3.5: the collections behind the alias are found (the alias itself is not counted twice),
    counts are exact right after a delete, and a collection of another name is not touched."""
    from embedding_pipeline.settings import load_settings

    base = f"retention_{os.getpid()}"
    settings = standalone_milvus.with_(collection=base)
    names = {"m1": f"{base}__m1", "m2": f"{base}__m2", "other": f"{base}_other"}
    rng = np.random.default_rng(1)
    layout = {"m1": {"a": 3, "b": 2}, "m2": {"a": 1}, "other": {"a": 2}}
    for key, drops in layout.items():
        with ImageIndex(settings.model_copy(update={"collection": names[key]})) as index:
            index.ensure_collection(EXTRA_DIM)
            index.upsert(
                [
                    {"id": f"{key}-{drop}-{i}", "embedding": rng.standard_normal(EXTRA_DIM), "drop": drop}
                    for drop, n in drops.items()
                    for i in range(n)
                ]
            )
    rows = retention.MilvusDropRows(settings)
    admin = ImageIndex(settings)
    try:
        admin.client.create_alias(names["m1"], base)  # search's alias, as per-model collections use
        assert rows.collections() == [names["m1"], names["m2"]]
        home = load_settings(environ={"EMBEDDING_PIPELINE_HOME": str(tmp_path / "home")})
        plan = retention.plan_drop_deletion(home.model_copy(update={"milvus": settings}), "a", rows=rows)
        assert plan.rows == {names["m1"]: 3, names["m2"]: 1} and plan.paths == []

        assert {c: rows.delete(c, "a") for c in rows.collections()} == {names["m1"]: 3, names["m2"]: 1}
        assert [rows.count(c, "a") for c in rows.collections()] == [0, 0]
        assert rows.count(names["m1"], "b") == 2
        with ImageIndex(settings.model_copy(update={"collection": names["other"]})) as other:
            assert other.count('drop == "a"', consistency_level="Strong") == 2
    finally:
        rows.close()
        admin.client.drop_alias(base)
        for name in names.values():
            admin.client.drop_collection(name)
        admin.close()
