"""The code location loads, and its sensor turns complete drops into partitions + run requests."""

import pytest
from dagster import AssetKey, DagsterInstance, SensorResult, SkipReason, build_sensor_context

from embedding_pipeline.defs import defs
from embedding_pipeline.defs.sensors import drop_sensor

ASSETS = ["raw_image_manifest", "preprocessed_batches", "image_embeddings", "milvus_collection"]


def test_definitions_load_with_assets_jobs_sensor():
    repo = defs.get_repository_def()
    keys = [k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()]
    # The four drop-partitioned stages, the observed model that makes embeddings stale when it changes, and the
    # near-duplicate groups (on demand, outside the ingest group).
    assert sorted(keys) == sorted(ASSETS + ["embedding_model", "near_duplicates"])
    for name in ASSETS:
        assets_def = repo.assets_defs_by_key[AssetKey(name)]
        assert assets_def.group_names_by_key[AssetKey(name)] == "image_ingest"
        assert len(assets_def.descriptions_by_key[AssetKey(name)]) > 40  # the UI shows it
        assert assets_def.partitions_def.name == "drops"
    assert {j.name for j in repo.get_all_jobs()} >= {
        "ingest_drop",
        "search_images",
        "find_duplicates",
        "collection_duplicates",
        "export_embeddings",
    }
    assert repo.get_sensor_def("drop_sensor")
    assert repo.get_schedule_def("rescan_drops")


def test_package_exposes_definitions_for_dagster_cli():
    import embedding_pipeline

    assert embedding_pipeline.definitions is defs


def test_asset_checks_run_per_drop_in_ingest_drop_and_gate_indexing():
    from embedding_pipeline.defs.checks import quality_checks

    specs = {(s.asset_key.to_user_string(), s.name): s for checks in quality_checks for s in checks.check_specs}
    # The ingest job's own checks; the near-duplicate check belongs to the on-demand asset.
    assert set(specs) == {
        ("image_embeddings", "embeddings_match_ok_items"),
        ("image_embeddings", "dimension_matches_model"),
        ("image_embeddings", "vectors_are_finite"),
        ("image_embeddings", "vectors_are_normalised"),
        ("milvus_collection", "rows_match_embeddings"),
        ("milvus_collection", "index_as_configured"),
        ("milvus_collection", "self_retrieval"),
    }
    for (asset, _), spec in specs.items():
        assert spec.partitions_def.name == "drops"  # one result per drop
        assert spec.blocking == (asset == "image_embeddings")
        assert spec.description
    job = defs.resolve_job_def("ingest_drop")
    assert {spec.key for spec in specs.values()} <= set(job.asset_layer.asset_graph.asset_check_keys)
    # Blocking in practice: the indexing step waits on the embeddings checks' step.
    upstream = job.graph.dependency_structure.all_upstream_outputs_from_node("milvus_collection")
    assert {o.node_name for o in upstream} == {"image_embeddings", "image_embeddings_checks"}


@pytest.fixture
def drops_env(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDDING_PIPELINE_HOME", str(tmp_path))
    monkeypatch.delenv("EMBEDDING_PIPELINE_CONFIG", raising=False)
    drops = tmp_path / "drops"
    drops.mkdir()
    return drops


def test_sensor_requests_one_run_per_complete_new_drop(drops_env):
    (drops_env / "cats").mkdir()
    (drops_env / "cats" / "_READY").touch()
    (drops_env / "busy").mkdir()  # just changed, no marker: not complete yet
    with DagsterInstance.ephemeral() as instance:
        result = drop_sensor(build_sensor_context(instance=instance))
        assert isinstance(result, SensorResult)
        assert [r.partition_key for r in result.run_requests] == ["cats"]
        assert result.run_requests[0].tags["drop"] == "cats"
        assert result.run_requests[0].tags["trigger"] == "sensor"
        assert result.run_requests[0].run_key.startswith("cats:")
        assert result.dynamic_partitions_requests[0].partition_keys == ["cats"]
        instance.add_dynamic_partitions("drops", ["cats"])
        again = drop_sensor(build_sensor_context(instance=instance))
        assert isinstance(again, SkipReason)


def test_sensor_reports_ignored_names(drops_env):
    (drops_env / "bad name").mkdir()
    with DagsterInstance.ephemeral() as instance:
        result = drop_sensor(build_sensor_context(instance=instance))
    assert isinstance(result, SkipReason) and "bad name" in result.skip_message


def test_near_duplicates_run_on_demand_not_in_every_ingest():
    repo = defs.get_repository_def()
    key = AssetKey("near_duplicates")
    assets_def = repo.assets_defs_by_key[key]
    assert assets_def.partitions_def.name == "drops"
    assert AssetKey("milvus_collection") in assets_def.asset_deps[key]
    ingest = defs.resolve_job_def("ingest_drop")
    assert key not in ingest.asset_layer.executable_asset_keys
    find = defs.resolve_job_def("find_duplicates")
    assert key in find.asset_layer.executable_asset_keys
    assert any(k.name == "duplicate_groups_sound" for k in find.asset_layer.asset_graph.asset_check_keys)
