"""The API's service helpers without servers: drop names, manifest rows, index settings, dimension checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedding_pipeline.api.collections import CollectionService
from embedding_pipeline.api.errors import ApiError
from embedding_pipeline.api.health import healthy
from embedding_pipeline.api.ingest import drop_name, manifest_rows
from embedding_pipeline.api.models import CreateCollectionRequest, InsertRequest
from embedding_pipeline.api.search import collection_settings
from embedding_pipeline.index import params
from embedding_pipeline.settings import MilvusSettings, Settings
from embedding_pipeline.sources.drops import DROP_NAME, MANIFEST_SUFFIXES


def test_drop_names_are_valid_manifest_drops_and_unique():
    names = {drop_name() for _ in range(50)}
    assert len(names) == 50
    assert all(DROP_NAME.match(n) and n.endswith(MANIFEST_SUFFIXES) and n.startswith("api-") for n in names)


def test_manifest_rows_carry_ids_and_metadata_and_refuse_large_metadata(tmp_path: Path):
    settings = Settings(home=tmp_path)
    request = InsertRequest(
        inputs=["https://e.com/a.jpg", str(settings.drops / "b.jpg")], ids=["a", "b"], metadata=[{"k": 1}, {"k": 2}]
    )
    assert manifest_rows(settings, request) == [
        {"uri": "https://e.com/a.jpg", "id": "a", "metadata": {"k": 1}},
        {"uri": str(settings.drops / "b.jpg"), "id": "b", "metadata": {"k": 2}},
    ]
    big = InsertRequest(inputs=["https://e.com/a.jpg"], metadata=[{"text": "x" * 70_000}])
    with pytest.raises(ApiError) as caught:
        manifest_rows(settings, big)
    assert caught.value.status == 422 and caught.value.details["index"] == 0


def test_collection_settings_follow_the_collections_own_index():
    base = MilvusSettings()  # HNSW, COSINE, ef 64
    ivf = collection_settings(base, "my_images", {"index_type": "IVF_FLAT", "metric_type": "L2", "params": {}})
    assert (ivf.collection, ivf.index_type, ivf.metric_type) == ("my_images", "IVF_FLAT", "L2")
    # The HNSW defaults of the settings are not sent to an IVF index; its own defaults apply.
    assert params.search_params(ivf) == {"nprobe": 16}
    same = collection_settings(base, "my_images", {"index_type": "HNSW", "metric_type": "COSINE"})
    assert params.search_params(same, top_k=10) == {"ef": 64}
    assert collection_settings(base, "x", None).index_type == "HNSW"


class FakeServedModel(CollectionService):
    """Answers a fixed model instead of asking Triton."""

    def served_model(self) -> tuple[str, int]:
        return "image_embedder:1@abc", 1280


def test_create_refuses_another_dimension_and_bad_index_params(tmp_path: Path):
    service = FakeServedModel(Settings(home=tmp_path))
    with pytest.raises(ApiError) as caught:
        service.create(CreateCollectionRequest(name="my_images", dim=512))
    assert caught.value.code == "dimension_mismatch"
    assert caught.value.details == {"dim": 512, "model_dim": 1280, "model": "image_embedder:1@abc"}
    with pytest.raises(ApiError) as caught:
        service._milvus(CreateCollectionRequest(name="x", index_type="IVF_FLAT", index_params={"M": 16}))
    assert caught.value.code == "invalid_index_params" and "'M'" in caught.value.message


def test_health_is_down_when_any_service_is():
    up = {
        "triton": {"server_ready": True, "model_ready": True},
        "milvus": {"reachable": True},
        "dagster": {"instance_reachable": True, "webserver_reachable": True},
    }
    assert healthy(up)
    for section, key in (("triton", "model_ready"), ("milvus", "reachable"), ("dagster", "webserver_reachable")):
        down = {k: dict(v) for k, v in up.items()}
        down[section][key] = False
        assert not healthy(down), section


def test_insert_without_a_webserver_is_503_and_leaves_nothing_behind(tmp_path: Path, monkeypatch):
    from embedding_pipeline.api.ingest import DagsterRuns
    from embedding_pipeline.orchestration import instance as orchestration_instance
    from embedding_pipeline.runtime.processes import free_ports

    settings = Settings(home=tmp_path / "home")
    (settings.dagster.webserver_port,) = free_ports(1)  # nothing listens there
    orchestration_instance.prepare_dagster_home(settings)
    monkeypatch.setenv("DAGSTER_HOME", str(settings.paths.dagster_home))
    settings.drops.mkdir(parents=True)
    runs = DagsterRuns(settings)
    try:
        request = InsertRequest(inputs=["https://e.com/a.jpg"])
        with pytest.raises(ApiError) as caught:
            runs.insert(request, manifest_rows(settings, request))
        assert caught.value.status == 503 and "did not launch" in caught.value.message
        assert list(settings.drops.iterdir()) == []
        assert runs.instance.get_dynamic_partitions("drops") == []
        assert runs.report("0123-no-such-run") is None
        assert runs.reachable()["webserver_reachable"] is False
    finally:
        runs.close()
