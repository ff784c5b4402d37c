"""The rescan schedule and the drop signature it compares, against a real (temporary, SQLite) Dagster instance.

What an earlier ingest left in the instance is recorded the way the pipeline records it — a ``raw_image_manifest``
materialization with the drop signature in its metadata — plus fake run records (``add_fake_run``) standing in for
the runs that produced them.
"""

import os
import time
import uuid
from types import SimpleNamespace

import pytest
from dagster import (
    AssetMaterialization,
    Backoff,
    DagsterRun,
    DagsterRunStatus,
    DefaultScheduleStatus,
    Jitter,
    build_schedule_context,
    instance_for_test,
)

from embedding_pipeline.defs import defs
from embedding_pipeline.defs.schedules import rescan_drops
from embedding_pipeline.sources.drops import DROP_SIGNATURE_KEY, READY_MARKER, Drop, drop_signature

YESTERDAY = time.time() - 86400


@pytest.fixture
def drops_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDDING_PIPELINE_HOME", str(tmp_path))
    monkeypatch.delenv("EMBEDDING_PIPELINE_CONFIG", raising=False)
    drops = tmp_path / "drops"
    drops.mkdir()
    return drops


@pytest.fixture
def instance():
    with instance_for_test() as instance:
        yield instance


def folder_drop(drops_dir, name: str, files: dict[str, bytes]):
    folder = drops_dir / name
    folder.mkdir()
    for relative, data in files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(data)
    (folder / READY_MARKER).touch()
    return folder


def manifest_drop(drops_dir, name: str, text: str):
    path = drops_dir / name
    path.write_text(text)
    os.utime(path, (YESTERDAY, YESTERDAY))  # settled: complete without a marker
    return path


def record_ingest(instance, drops_dir, name: str, status=DagsterRunStatus.SUCCESS) -> None:
    """What an ingest run of ``name`` leaves behind: its materialization with the signature, and its run."""
    signature = drop_signature(Drop(name, drops_dir / name))
    instance.report_runless_asset_event(
        AssetMaterialization("raw_image_manifest", partition=name, metadata={DROP_SIGNATURE_KEY: signature})
    )
    add_fake_run(instance, name, status)


def add_fake_run(instance, name: str, status: DagsterRunStatus) -> None:
    instance.add_run(
        DagsterRun(
            job_name="ingest_drop",
            run_id=str(uuid.uuid4()),
            tags={"drop": name, "dagster/partition": name},
            status=status,
        )
    )


def evaluate(instance):
    """One schedule tick, resolved as the daemon resolves it (partition keys checked against the instance)."""
    context = build_schedule_context(instance=instance, repository_def=defs.get_repository_def())
    return rescan_drops.evaluate_tick(context)


def requested(data) -> dict[str, dict[str, str]]:
    return {r.partition_key: r.tags for r in data.run_requests}


def test_schedule_is_off_until_started_and_runs_on_the_configured_cron():
    assert rescan_drops.default_status == DefaultScheduleStatus.STOPPED
    assert rescan_drops.cron_schedule == "0 3 * * *"
    assert rescan_drops.job_name == "ingest_drop"
    assert defs.get_repository_def().get_schedule_def("rescan_drops") is not None


def test_new_drops_get_a_partition_and_a_tagged_run(drops_dir, instance):
    folder_drop(drops_dir, "cats", {"a.jpg": b"a"})
    manifest_drop(drops_dir, "urls.jsonl", '{"uri": "https://example.com/a.jpg"}\n')
    (drops_dir / "busy").mkdir()  # just created, no marker: still being written
    data = evaluate(instance)
    tags = requested(data)
    assert set(tags) == {"cats", "urls.jsonl"}
    assert set(instance.get_dynamic_partitions("drops")) == {"cats", "urls.jsonl"}
    signature = drop_signature(Drop("cats", drops_dir / "cats"))
    assert tags["cats"]["drop"] == "cats"
    assert tags["cats"]["trigger"] == "schedule"
    assert tags["cats"]["rescan_reason"] == "new"
    assert tags["cats"]["drop_signature"] == signature
    assert tags["cats"]["dagster/partition"] == "cats"
    keys = {r.run_key for r in data.run_requests}
    assert keys == {f"cats:{signature}", f"urls.jsonl:{tags['urls.jsonl']['drop_signature']}"}


def test_rescanning_an_unchanged_directory_requests_nothing(drops_dir, instance):
    folder_drop(drops_dir, "cats", {"a.jpg": b"a", "sub/b.jpg": b"bb"})
    manifest_drop(drops_dir, "urls.jsonl", '{"uri": "https://example.com/a.jpg"}\n')
    evaluate(instance)
    record_ingest(instance, drops_dir, "cats")
    record_ingest(instance, drops_dir, "urls.jsonl")
    for _ in range(2):
        data = evaluate(instance)
        assert data.run_requests == []
        assert "2 drop(s) up to date" in data.skip_message


def test_files_added_to_a_folder_or_an_edited_manifest_are_changes(drops_dir, instance):
    folder_drop(drops_dir, "cats", {"a.jpg": b"a"})
    manifest = manifest_drop(drops_dir, "urls.jsonl", '{"uri": "https://example.com/a.jpg"}\n')
    evaluate(instance)
    record_ingest(instance, drops_dir, "cats")
    record_ingest(instance, drops_dir, "urls.jsonl")
    before = drop_signature(Drop("cats", drops_dir / "cats"))

    (drops_dir / "cats" / "b.jpg").write_bytes(b"b")
    manifest.write_text('{"uri": "https://example.com/a.jpg"}\n{"uri": "https://example.com/b.jpg"}\n')
    os.utime(manifest, (YESTERDAY + 60, YESTERDAY + 60))
    data = evaluate(instance)
    tags = requested(data)
    assert {k: v["rescan_reason"] for k, v in tags.items()} == {"cats": "changed", "urls.jsonl": "changed"}
    assert tags["cats"]["drop_signature"] != before
    assert instance.get_dynamic_partitions("drops") == ["cats", "urls.jsonl"]  # no duplicate partitions

    record_ingest(instance, drops_dir, "cats")
    record_ingest(instance, drops_dir, "urls.jsonl")
    assert evaluate(instance).run_requests == []


def test_failed_or_canceled_last_runs_are_retried_and_running_ones_left_alone(drops_dir, instance):
    for name in ("failed", "canceled", "running", "ok"):
        folder_drop(drops_dir, name, {"a.jpg": name.encode()})
    evaluate(instance)
    record_ingest(instance, drops_dir, "failed", DagsterRunStatus.FAILURE)
    record_ingest(instance, drops_dir, "canceled", DagsterRunStatus.CANCELED)
    record_ingest(instance, drops_dir, "ok")
    add_fake_run(instance, "running", DagsterRunStatus.STARTED)
    tags = requested(evaluate(instance))
    assert {k: v["rescan_reason"] for k, v in tags.items()} == {
        "failed": "last run failed",
        "canceled": "last run canceled",
    }
    # A later successful run of the failed drop settles it.
    add_fake_run(instance, "failed", DagsterRunStatus.SUCCESS)
    assert set(requested(evaluate(instance))) == {"canceled"}


def test_a_partition_never_materialized_is_ingested(drops_dir, instance):
    """E.g. a daemon stopped between adding a drop's partition and creating its run."""
    folder_drop(drops_dir, "orphan", {"a.jpg": b"a"})
    instance.add_dynamic_partitions("drops", ["orphan"])
    assert {k: v["rescan_reason"] for k, v in requested(evaluate(instance)).items()} == {"orphan": "never ingested"}


def test_signature_follows_what_ingest_reads(tmp_path):
    folder = tmp_path / "d"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jpg").write_bytes(b"a")
    (folder / "sub" / "b.png").write_bytes(b"b")
    drop = Drop("d", folder)
    first = drop_signature(drop)
    assert len(first) == 16 and drop_signature(drop) == first

    # Not content: the marker, hidden and in-flight names.
    (folder / READY_MARKER).touch()
    (folder / ".DS_Store").write_bytes(b"x")
    (folder / "c.jpg.part").write_bytes(b"x")
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "x.jpg").write_bytes(b"x")
    assert drop_signature(drop) == first

    # Content: a new file, a size change, an mtime change (same size), a rename, a link's target.
    changes = []
    (folder / "c.jpg").write_bytes(b"c")
    changes.append(drop_signature(drop))
    (folder / "c.jpg").write_bytes(b"cc")
    changes.append(drop_signature(drop))
    os.utime(folder / "c.jpg", (YESTERDAY, YESTERDAY))
    changes.append(drop_signature(drop))
    (folder / "c.jpg").rename(folder / "d.jpg")
    changes.append(drop_signature(drop))
    (folder / "link.jpg").symlink_to(folder / "a.jpg")
    changes.append(drop_signature(drop))
    (folder / "link.jpg").unlink()
    (folder / "link.jpg").symlink_to(folder / "sub" / "b.png")
    changes.append(drop_signature(drop))
    assert len({first, *changes}) == len(changes) + 1


def test_retry_policy_comes_from_settings(tmp_path, monkeypatch):
    from embedding_pipeline.defs.assets import _retry_policy

    config = tmp_path / "embedding_pipeline.yaml"
    config.write_text("dagster:\n  step_retries: 4\n  step_retry_delay_s: 0.5\n")
    monkeypatch.setenv("EMBEDDING_PIPELINE_CONFIG", str(config))
    policy = _retry_policy()
    assert (policy.max_retries, policy.delay) == (4, 0.5)
    assert (policy.backoff, policy.jitter) == (Backoff.EXPONENTIAL, Jitter.PLUS_MINUS)


def test_server_facing_assets_retry_with_exponential_backoff_and_use_pools():
    from dagster import AssetKey

    from embedding_pipeline.defs.assets import RETRY

    # The sharded stages are graphs: their steps are the plan, one step per shard, and the commit.
    ops = {
        node.name if node_name == node.name else f"{node_name}.{node.name}": node.definition
        for node_name in ("raw_image_manifest", "preprocessed_batches", "image_embeddings", "milvus_collection")
        for node in _nodes(defs.get_assets_def(AssetKey(node_name)))
    }
    assert ops["raw_image_manifest"].retry_policy is None  # reads its sources once: nothing transient to wait out
    server_facing = [name for name in ops if name != "raw_image_manifest"]
    assert sorted(server_facing) == [
        "image_embeddings.commit_embedding",
        "image_embeddings.embed_shard",
        "image_embeddings.plan_embedding",
        "milvus_collection",
        "preprocessed_batches.commit_preprocessing",
        "preprocessed_batches.plan_preprocessing",
        "preprocessed_batches.preprocess_shard",
    ]
    for name in server_facing:
        # The policy is fixed when the code location loads (from the settings of that moment: see the test above).
        assert ops[name].retry_policy == RETRY, name
        assert RETRY.max_retries >= 1 and RETRY.backoff == Backoff.EXPONENTIAL
    # One step at a time talks to each server: the embedding shards share the Triton pool, the index the Milvus one.
    assert {name: op.pool for name, op in ops.items() if op.pool} == {
        "image_embeddings.embed_shard": "triton",
        "milvus_collection": "milvus",
    }


def _nodes(assets_def):
    """The op nodes of an asset: itself, or the nodes of its graph."""
    from dagster import GraphDefinition

    node_def = assets_def.node_def
    if isinstance(node_def, GraphDefinition):
        return [SimpleNamespace(name=n.name, definition=n.definition) for n in node_def.nodes]
    return [SimpleNamespace(name=assets_def.key.path[-1], definition=node_def)]
