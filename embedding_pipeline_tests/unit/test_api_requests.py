"""The HTTP API's request handling with fake services (no servers): validation, error shape, auth, size limits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from embedding_pipeline.api.app import ApiServices, create_app
from embedding_pipeline.api.errors import ApiError
from embedding_pipeline.api.search import SearchOutcome, classify
from embedding_pipeline.index.client import CollectionError, Hit
from embedding_pipeline.settings import ConfigError, Settings

KEY = "s3cret-key"


class FakeSearch:
    """Records each query and answers one fixed hit."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.options: list[dict[str, Any]] = []  # min_score, offset, collapse (include_self) of each query

    def _answer(self, options: dict[str, Any], **call: Any) -> SearchOutcome:
        self.calls.append(call)
        self.options.append(options)
        hit = Hit(id="img_1", score=0.9, uri="/x/img_1.jpg", drop="d", metadata={"category": "nature"})
        return SearchOutcome([hit], call["collection"] or "image_embeddings", "image_embeddings__m", 1.5)

    def search_image(self, image, topk, filter_expr=None, collection=None, search_params=None, **options):  # noqa: ANN001
        return self._answer(options, image=image, topk=topk, filter=filter_expr, collection=collection)

    def search_vector(self, vector, topk, filter_expr=None, collection=None, search_params=None, **options):  # noqa: ANN001
        return self._answer(options, vector=vector, topk=topk, filter=filter_expr, collection=collection)

    def search_id(self, item_id, topk, filter_expr=None, collection=None, search_params=None, **options):  # noqa: ANN001
        return self._answer(options, query_id=item_id, topk=topk, filter=filter_expr, collection=collection)


class FakeCollections:
    def __init__(self) -> None:
        self.existing: set[str] = set()

    def create(self, request) -> dict[str, Any]:  # noqa: ANN001
        created = request.name not in self.existing
        self.existing.add(request.name)
        return {
            "name": request.name,
            "dim": 1280,
            "index_type": request.index_type or "HNSW",
            "metric_type": "COSINE",
            "created": created,
            "description": request.description,
            "collection": f"{request.name}__m",
            "model": "m:1",
        }


class FakeRuns:
    """Launches nothing: remembers the manifest rows and reports a finished run (or never finishes)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.finishes = True

    def insert(self, request, rows) -> dict[str, Any]:  # noqa: ANN001
        self.rows = rows
        return {
            "drop": "api-x.jsonl",
            "run_id": "run-1",
            "status_url": "/runs/run-1",
            "collection": request.collection_name or "image_embeddings",
        }

    def report(self, run_id: str) -> dict[str, Any] | None:
        if run_id != "run-1":
            return None
        return {
            "run_id": run_id,
            "status": "SUCCESS",
            "drop": "api-x.jsonl",
            "items": 1,
            "ok": 1,
            "failed": 0,
            "failures": [],
        }

    def wait(self, run_id: str, timeout_s: float) -> dict[str, Any]:
        if not self.finishes:
            raise ApiError(504, "timeout", "not finished", {"run_id": run_id})
        return self.report(run_id)


def fake_health(down: bool = False):  # noqa: ANN201
    def report() -> dict[str, Any]:
        return {
            "triton": {"server_ready": True, "model_ready": not down, "model": "m"},
            "milvus": {"reachable": True, "collection": "image_embeddings", "loaded": True},
            "dagster": {"instance_reachable": True, "webserver_reachable": True},
        }

    return report


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    settings = Settings(home=tmp_path / "home")
    settings.api.max_inputs = 3
    settings.api.max_topk = 50
    settings.api.max_request_bytes = 64 * 1024
    settings.drops.mkdir(parents=True)
    return settings


@pytest.fixture
def fakes() -> ApiServices:
    return ApiServices(FakeSearch(), FakeCollections(), FakeRuns(), fake_health())


@pytest.fixture
def client(settings: Settings, fakes: ApiServices):  # noqa: ANN201
    with TestClient(create_app(settings, fakes, api_key=""), base_url="http://127.0.0.1") as c:
        yield c


def assert_error(response, status: int, code: str) -> dict[str, Any]:  # noqa: ANN001
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    return body["error"]


# -- health, docs ---------------------------------------------------------------------------------------------


def test_health_ok_and_503_with_the_same_shape(settings, fakes):
    with TestClient(create_app(settings, fakes, api_key=""), base_url="http://127.0.0.1") as c:
        ok = c.get("/health")
    assert ok.status_code == 200 and ok.json()["status"] == "ok"
    assert set(ok.json()) == {"status", "triton", "milvus", "dagster"}
    fakes.health = fake_health(down=True)
    with TestClient(create_app(settings, fakes, api_key=""), base_url="http://127.0.0.1") as c:
        down = c.get("/health")
    assert down.status_code == 503 and down.json()["status"] == "unavailable"
    assert down.json()["triton"]["model_ready"] is False


def test_openapi_lists_every_endpoint_and_both_search_bodies(client):
    schema = client.get("/openapi.json").json()
    assert {"/health", "/collections/create", "/insert", "/runs/{run_id}", "/search"} <= set(schema["paths"])
    content = schema["paths"]["/search"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(content)
    assert client.get("/docs").status_code == 200


def test_unknown_route_and_wrong_method_use_the_error_shape(client):
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/search"), 405, "method_not_allowed")


# -- collections ----------------------------------------------------------------------------------------------


def test_create_collection_201_then_200_when_it_exists(client):
    body = {"name": "my_images", "dim": 1280, "description": "My image embeddings"}
    first = client.post("/collections/create", json=body)
    assert first.status_code == 201 and first.json()["created"] is True
    again = client.post("/collections/create", json=body)
    assert again.status_code == 200 and again.json()["created"] is False


@pytest.mark.parametrize(
    "body, where",
    [
        ({"name": "1bad"}, "name"),
        ({"name": "has-dash"}, "name"),
        ({"name": "ok", "dim": 0}, "dim"),
        ({"name": "ok", "index_type": "ANNOY"}, "index_type"),
        ({"name": "ok", "dimension": 5}, "dimension"),  # unknown key
        ({}, "name"),
    ],
)
def test_create_collection_validation(client, body, where):
    error = assert_error(client.post("/collections/create", json=body), 422, "invalid_request")
    assert any(where in [str(p) for p in e["loc"]] for e in error["details"]), error


def test_malformed_json_is_a_422_in_the_error_shape(client):
    response = client.post("/collections/create", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(response, 422, "invalid_request")


# -- insert ---------------------------------------------------------------------------------------------------


def test_insert_202_writes_rows_for_paths_in_the_drop_folder_and_urls(client, settings, fakes):
    image = settings.drops / "images" / "a.jpg"
    image.parent.mkdir()
    image.write_bytes(b"x")
    response = client.post(
        "/insert",
        json={
            "inputs": [str(image), "https://example.com/b.jpg"],
            "ids": ["img_1", "img_2"],
            "metadata": [{"category": "nature"}, {"category": "urban"}],
            "collection_name": "my_images",
        },
    )
    assert response.status_code == 202, response.text
    assert response.json() == {
        "drop": "api-x.jsonl",
        "run_id": "run-1",
        "status_url": "/runs/run-1",
        "collection": "my_images",
    }
    assert fakes.runs.rows == [
        {"uri": str(image), "id": "img_1", "metadata": {"category": "nature"}},
        {"uri": "https://example.com/b.jpg", "id": "img_2", "metadata": {"category": "urban"}},
    ]


def test_insert_path_in_an_allowed_root_is_accepted(client, settings, tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    settings.sources.allowed_roots = [root]
    assert client.post("/insert", json={"inputs": [str(root / "p.jpg")]}).status_code == 202


@pytest.mark.parametrize(
    "inputs, code",
    [
        (["/etc/passwd"], "outside_roots"),
        (["relative/a.jpg"], "bad_input"),
        (["ftp://example.com/a.jpg"], "bad_input"),
        (["file:///etc/passwd"], "bad_input"),
        (["https://e.com/1", "https://e.com/2", "https://e.com/3", "https://e.com/4"], "too_many_inputs"),
    ],
)
def test_insert_refuses_inputs_outside_the_rules(client, inputs, code):
    assert_error(client.post("/insert", json={"inputs": inputs}), 422, code)


def test_insert_refuses_a_symlink_out_of_the_drop_folder(client, settings, tmp_path):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"x")
    link = settings.drops / "link.jpg"
    link.symlink_to(secret)
    assert_error(client.post("/insert", json={"inputs": [str(link)]}), 422, "outside_roots")


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": []},
        {"inputs": ["https://e.com/a"], "ids": ["a", "b"]},
        {"inputs": ["https://e.com/a", "https://e.com/b"], "ids": ["a", "a"]},
        {"inputs": ["https://e.com/a"], "ids": [""]},
        {"inputs": ["https://e.com/a"], "ids": ["x" * 513]},
        {"inputs": ["https://e.com/a"], "metadata": [{"a": 1}, {"b": 2}]},
        {"inputs": ["https://e.com/a"], "metadata": ["not an object"]},
        {"inputs": ["https://e.com/a"], "collection_name": "bad name"},
        {"inputs": ["https://e.com/a\n"]},
        {"inputs": "https://e.com/a"},
    ],
)
def test_insert_validation(client, body):
    assert_error(client.post("/insert", json=body), 422, "invalid_request")


def test_insert_wait_returns_the_report_or_504_with_the_run(client, fakes):
    done = client.post("/insert", json={"inputs": ["https://e.com/a"], "wait": True})
    assert done.status_code == 200 and done.json()["status"] == "SUCCESS" and done.json()["ok"] == 1
    fakes.runs.finishes = False
    error = assert_error(
        client.post("/insert", json={"inputs": ["https://e.com/a"], "wait": True, "timeout_s": 1}), 504, "timeout"
    )
    assert error["details"]["run_id"] == "run-1"


def test_runs_report_and_unknown_run(client):
    assert client.get("/runs/run-1").json()["ok"] == 1
    assert_error(client.get("/runs/nope"), 404, "not_found")
    assert_error(client.get("/runs/..%2F..%2Fetc"), 404, "not_found")


# -- search ---------------------------------------------------------------------------------------------------


def test_search_by_path_in_the_drop_folder_reads_the_file(client, settings, fakes):
    query = settings.drops / "q.jpg"
    query.write_bytes(b"jpeg bytes")
    response = client.post(
        "/search",
        json={
            "query_input": str(query),
            "topk": 5,
            "filter_expr": 'metadata["category"] == "nature"',
            "collection_name": "my_images",
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["results"] == [
        {"id": "img_1", "score": 0.9, "uri": "/x/img_1.jpg", "metadata": {"category": "nature"}, "drop": "d"}
    ]
    assert body["collection"] == "my_images" and body["took_ms"] == 1.5
    assert fakes.search.calls == [
        {"image": b"jpeg bytes", "topk": 5, "filter": 'metadata["category"] == "nature"', "collection": "my_images"}
    ]


def test_search_by_vector(client, fakes):
    assert client.post("/search", json={"vector": [0.5, 0.5], "topk": 3}).status_code == 200
    assert fakes.search.calls[0]["vector"] == [0.5, 0.5]


def test_search_by_upload(client, fakes):
    response = client.post(
        "/search",
        files={"file": ("q.jpg", b"uploaded", "image/jpeg")},
        data={"topk": "4", "filter_expr": 'drop == "d"'},
    )
    assert response.status_code == 200, response.text
    assert fakes.search.calls == [{"image": b"uploaded", "topk": 4, "filter": 'drop == "d"', "collection": None}]


@pytest.mark.parametrize(
    "body",
    [
        {"topk": 5},
        {"query_input": "/a.jpg", "vector": [1.0]},
        {"vector": [1.0], "topk": 0},
        {"vector": [1.0], "topk": 51},
        {"vector": []},
        {"vector": ["x"]},
        {"vector": [1.0], "top_k": 5},
        {"vector": [1.0], "collection_name": "a;drop"},
    ],
)
def test_search_validation(client, body):
    assert_error(client.post("/search", json=body), 422, "invalid_request")


def test_search_vector_with_nan_is_refused(client):
    response = client.post("/search", content=b'{"vector": [NaN, 1.0]}', headers={"content-type": "application/json"})
    assert_error(response, 422, "invalid_request")


def test_search_query_outside_the_roots_or_missing(client, settings):
    assert_error(client.post("/search", json={"query_input": "/etc/hostname"}), 422, "outside_roots")
    missing = assert_error(
        client.post("/search", json={"query_input": str(settings.drops / "none.jpg")}), 422, "unreadable_input"
    )
    assert missing["details"] == {"kind": "not_found"}


def test_search_upload_problems(client):
    assert_error(client.post("/search", data={"topk": "3"}, files={"other": ("a", b"x")}), 422, "invalid_request")
    assert_error(client.post("/search", files={"file": ("q.jpg", b"", "image/jpeg")}), 422, "bad_image")
    assert_error(
        client.post("/search", files={"file": ("q.jpg", b"x", "image/jpeg")}, data={"topk": "zero"}),
        422,
        "invalid_request",
    )
    assert_error(
        client.post("/search", content=b"x", headers={"content-type": "text/plain"}), 415, "unsupported_media_type"
    )


def test_engine_errors_map_to_api_errors():
    bad = CollectionError("search failed (filter 'metadata[') on Milvus at http://127.0.0.1:1: cannot parse")
    assert classify(bad, "metadata[").code == "invalid_filter"
    assert classify(bad, "metadata[").status == 422
    down = CollectionError("cannot connect to Milvus at http://127.0.0.1:1: nothing answers at 127.0.0.1:1")
    assert classify(down, "x == 1").status == 503
    assert classify(CollectionError("nothing to search yet: no collection")).status == 404
    assert classify(ConfigError("search_params: unknown key 'nprob'")).code == "invalid_search_params"
    assert classify(ValueError("query image: not an image")).code == "bad_image"


# -- auth and limits ------------------------------------------------------------------------------------------


def test_api_key_required_on_everything_but_health_and_docs(settings, fakes):
    with TestClient(create_app(settings, fakes, api_key=KEY), base_url="http://127.0.0.1") as c:
        assert c.get("/health").status_code == 200
        assert c.get("/openapi.json").status_code == 200
        assert c.get("/docs").status_code == 200
        assert_error(c.post("/search", json={"vector": [1.0]}), 401, "unauthorized")
        assert_error(c.post("/search", json={"vector": [1.0]}, headers={"X-API-Key": "wrong"}), 401, "unauthorized")
        assert_error(c.get("/runs/run-1", headers={"Authorization": "Basic " + KEY}), 401, "unauthorized")
        assert c.post("/search", json={"vector": [1.0]}, headers={"X-API-Key": KEY}).status_code == 200
        assert c.get("/runs/run-1", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_api_key_from_the_environment(settings, fakes, monkeypatch):
    monkeypatch.setenv("EMBEDDING_PIPELINE_API_KEY", KEY)
    with TestClient(create_app(settings, fakes), base_url="http://127.0.0.1") as c:
        assert_error(c.get("/runs/run-1"), 401, "unauthorized")
        assert c.get("/runs/run-1", headers={"X-API-Key": KEY}).status_code == 200


def test_request_body_over_the_limit_is_413(client, settings):
    big = {"vector": [0.123456789] * 10_000}
    assert len(json.dumps(big)) > settings.api.max_request_bytes
    assert_error(client.post("/search", json=big), 413, "request_too_large")

    def chunked():  # noqa: ANN202 - no Content-Length: the limit applies while reading
        for _ in range(100):
            yield b" " * 1024

    assert_error(
        client.post("/search", content=chunked(), headers={"content-type": "application/json"}),
        413,
        "request_too_large",
    )


# -- trust nobody by default ------------------------------------------------------------------------------------


def test_a_rebinding_host_header_is_refused(settings, fakes):
    with TestClient(create_app(settings, fakes, api_key=""), base_url="http://attacker.example") as c:
        refused = c.get("/health")
        assert refused.status_code == 400
        # Loopback names and addresses are answered.
        for host in ("127.0.0.1:18080", "localhost", "[::1]:18080"):
            assert c.get("/health", headers={"host": host}).status_code == 200, host


def test_an_unexpected_error_never_reaches_the_client_as_text(settings, fakes):
    class Exploding(FakeSearch):
        def search_vector(self, *args, **kwargs):  # noqa: ANN002, ANN003
            raise RuntimeError("secret at http://root:hunter2@10.0.0.5:19530 /srv/private/path")

    fakes.search = Exploding()
    with TestClient(
        create_app(settings, fakes, api_key=""), base_url="http://127.0.0.1", raise_server_exceptions=False
    ) as c:
        response = c.post("/search", json={"vector": [1.0] + [0.0] * 1279, "topk": 3})
    error = assert_error(response, 500, "internal_error")
    assert (
        "hunter2" not in response.text
        and "/srv/private" not in response.text
        and "RuntimeError" not in error["message"]
    )


def test_insert_waits_are_capped(client):
    response = client.post("/insert", json={"inputs": ["/x.jpg"], "wait": True, "timeout_s": 86400})
    assert_error(response, 422, "invalid_request")


@pytest.mark.parametrize(
    "host, key, insecure, refused",
    [
        ("127.0.0.1", False, False, False),
        ("::1", False, False, False),
        ("localhost", False, False, False),
        ("0.0.0.0", False, False, True),
        ("192.168.1.5", False, False, True),
        ("api.example", False, False, True),
        ("0.0.0.0", True, False, False),
        ("0.0.0.0", False, True, False),
    ],
)
def test_a_public_bind_needs_a_key_or_insecure(host, key, insecure, refused):
    from embedding_pipeline.api.guards import public_bind_problem

    assert (public_bind_problem(host, key, insecure) is not None) == refused


def test_serve_api_refuses_a_public_bind_without_a_key(monkeypatch, capsys):
    from embedding_pipeline import cli

    monkeypatch.delenv("EMBEDDING_PIPELINE_API_KEY", raising=False)
    assert cli.main(["serve-api", "--host", "0.0.0.0"]) == 2
    assert "without an API key" in capsys.readouterr().err


def test_requests_beyond_the_in_flight_bound_get_503_busy_and_health_still_answers(settings, fakes):
    import threading

    release = threading.Event()
    entered = threading.Semaphore(0)

    class Slow(FakeSearch):
        def search_vector(self, *args, **kwargs):  # noqa: ANN002, ANN003
            entered.release()
            release.wait(30)
            return super().search_vector(*args, **kwargs)

    fakes.search = Slow()
    limited = settings.model_copy(update={"api": settings.api.model_copy(update={"max_in_flight": 2})})
    body = {"vector": [1.0] + [0.0] * 1279, "topk": 1}
    with TestClient(create_app(limited, fakes, api_key=""), base_url="http://127.0.0.1") as c:
        results: list[int] = []
        workers = [
            threading.Thread(target=lambda: results.append(c.post("/search", json=body).status_code)) for _ in range(2)
        ]
        for w in workers:
            w.start()
        assert entered.acquire(timeout=30) and entered.acquire(timeout=30)
        busy = c.post("/search", json=body)
        assert busy.headers["retry-after"] == "1"
        assert_error(busy, 503, "busy")
        assert c.get("/health").status_code == 200
        release.set()
        for w in workers:
            w.join(30)
    assert results == [200, 200]


def test_health_answers_from_a_short_cache(settings, fakes):
    calls = []
    report = fakes.health

    def counting():  # noqa: ANN202
        calls.append(1)
        return report()

    fakes.health = counting
    with TestClient(create_app(settings, fakes, api_key=""), base_url="http://127.0.0.1") as c:
        for _ in range(20):
            assert c.get("/health").status_code == 200
    assert len(calls) == 1
