"""A bounded load on the real HTTP API (uvicorn on 127.0.0.1, real Triton and Milvus): no errors, every figure
reported, nothing left behind. Speed targets are read from the benchmark's printed figures, not asserted here."""

import json

import pytest

from embedding_pipeline import services
from embedding_pipeline.bench import api as bench_api
from embedding_pipeline.cli import main
from embedding_pipeline.runtime import processes

pytestmark = pytest.mark.integration

KINDS = ("by_vector", "by_image")


@pytest.fixture
def api_settings(stack):
    """The session's settings with the API on a free loopback port (the default port may be taken)."""
    (port,) = processes.free_ports(1)
    return stack.model_copy(update={"api": stack.api.model_copy(update={"port": port})})


def check_figures(result: dict, requests: int) -> None:
    for kind in KINDS:
        f = result[kind]
        assert f["requests"] == requests and f["errors"] == 0, (kind, f["error_samples"])
        assert 0 < f["p50_ms"] <= f["p95_ms"] <= f["p99_ms"] <= f["max_ms"], (kind, f)
        assert f["requests_per_s"] > 0 and f["seconds"] > 0, (kind, f)
        # The server's own search time is part of each request's latency.
        assert 0 < f["server_took_p50_ms"] <= f["max_ms"], (kind, f)
    assert result["errors"] == 0
    assert result["target_vector_p99_ms"] == 25.0 and result["target_image_p99_ms"] == 100.0
    assert result["vector_p99_target_met"] == (result["by_vector"]["p99_ms"] <= 25.0)
    assert result["image_p99_target_met"] == (result["by_image"]["p99_ms"] <= 100.0)


def test_load_on_its_own_api_and_collection(api_settings):
    result = bench_api.run(api_settings, requests_per_kind=300, clients=8, vectors=1000)
    check_figures(result, 300)
    assert result["clients"] == 8 and result["topk"] == 10
    assert result["vectors"] == 1000 and result["dim"] == 1280
    model = result["model_only"]
    assert model["batch"] == 8 and model["images_per_s"] > 0
    ratio = result["by_image"]["requests_per_s"] / model["images_per_s"]
    assert result["image_to_model_ratio"] == pytest.approx(ratio, rel=0.01)
    assert result["image_to_model_target_met"] == (ratio >= 0.6)
    assert result["url"] == f"http://127.0.0.1:{api_settings.api.port}" and "api" in result["started"]
    table = bench_api.render(result)
    for label in ("p50 (ms)", "p95 (ms)", "p99 (ms)", "max (ms)", "requests/s", "by vector", "by image"):
        assert label in table, label

    # It stopped the API it started and dropped its collection; the session's Triton and Milvus keep running.
    assert processes.read(api_settings.paths.run, services.API) is None
    from embedding_pipeline.index.collections import ModelCollections

    with ModelCollections(api_settings.milvus.model_copy(update={"collection": bench_api.COLLECTION})) as c:
        assert c.search_collection() is None and not c.names()
    assert services.services_status(api_settings)["triton"]["server_ready"]


def test_load_through_the_cli_on_a_running_api(api_settings, capsys):
    """--url: an API that is already running, on an existing collection; the dimension is learnt from the API."""
    import requests

    from embedding_pipeline.bench import corpus
    from embedding_pipeline.index.client import ImageIndex
    from embedding_pipeline.index.collections import ModelCollections

    services.start_api(api_settings)
    url = services.api_url(api_settings)
    try:
        bench_api._wait_until_serving(url, {})
        created = requests.post(f"{url}/collections/create", json={"name": "load_cli"}, timeout=60).json()
        vectors = corpus.build(200, created["dim"], real=None, photos=None, queries=10)
        with ImageIndex(
            api_settings.milvus.model_copy(update={"collection": created["collection"]}), model_label=created["model"]
        ) as index:
            assert index.upsert(vectors.rows(0, 200, created["model"])) == 200
        argv = [
            "bench",
            "api",
            "--url",
            url,
            "--collection",
            "load_cli",
            "--requests",
            "40",
            "--clients",
            "4",
            "--json",
        ]
        assert main(argv) == 0
        result = json.loads(capsys.readouterr().out)
        check_figures(result, 40)
        assert result["dim"] == 1280 and result["started"] == [] and result["collection"] == "load_cli"
        assert main(argv[:-1]) == 0  # the table
        assert "target: p99 <= 25 ms by vector" in capsys.readouterr().out
    finally:
        services.stop_api(api_settings)
        with ModelCollections(api_settings.milvus.model_copy(update={"collection": "load_cli"})) as c:
            c.drop_all()


@pytest.mark.parametrize("url", ["http://10.1.2.3:18080", "https://127.0.0.1:18080", "http://example.com", "ftp://x"])
def test_only_loopback_http_urls_are_loaded(url):
    with pytest.raises(ValueError, match="--url must"):
        bench_api.require_loopback(url)
    assert bench_api.require_loopback("http://127.0.0.1:1/") == "http://127.0.0.1:1"
    assert bench_api.require_loopback("http://[::1]:1") == "http://[::1]:1"
