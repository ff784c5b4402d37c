"""The code location loads, and its sensor turns complete drops into partitions + run requests."""

import pytest
from dagster import AssetKey, DagsterInstance, SensorResult, SkipReason, build_sensor_context

from embedding_pipeline.defs import defs
from embedding_pipeline.defs.sensors import drop_sensor

ASSETS = ["raw_image_manifest", "preprocessed_batches", "image_embeddings", "milvus_collection"]


def test_definitions_load_with_assets_jobs_sensor():
    repo = defs.get_repository_def()
    keys = [k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()]
    assert sorted(keys) == sorted(ASSETS)
    for name in ASSETS:
        assets_def = repo.assets_defs_by_key[AssetKey(name)]
        assert assets_def.group_names_by_key[AssetKey(name)] == "image_ingest"
        assert len(assets_def.descriptions_by_key[AssetKey(name)]) > 40  # the UI shows it
        assert assets_def.partitions_def.name == "drops"
    assert {j.name for j in repo.get_all_jobs()} >= {"ingest_drop", "search_images"}
    assert repo.get_sensor_def("drop_sensor")


def test_package_exposes_definitions_for_dagster_cli():
    import embedding_pipeline

    assert embedding_pipeline.definitions is defs


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
        assert result.dynamic_partitions_requests[0].partition_keys == ["cats"]
        instance.add_dynamic_partitions("drops", ["cats"])
        again = drop_sensor(build_sensor_context(instance=instance))
        assert isinstance(again, SkipReason)


def test_sensor_reports_ignored_names(drops_env):
    (drops_env / "bad name").mkdir()
    with DagsterInstance.ephemeral() as instance:
        result = drop_sensor(build_sensor_context(instance=instance))
    assert isinstance(result, SkipReason) and "bad name" in result.skip_message
