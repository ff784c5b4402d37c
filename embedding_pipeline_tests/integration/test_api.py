"""The HTTP API as users call it: `embedding-pipeline serve-api` (uvicorn on 127.0.0.1) in front of a real Triton,
Milvus, and Dagster webserver + daemon that run the inserts.

The curl examples of docs/http-api.md are taken from that page and run with the real `curl`; only the server
address, the image paths and the example URL are replaced (by this test's server, photos and local web server).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import requests

from embedding_pipeline import services
from embedding_pipeline.runtime.processes import free_ports, http_ok
from embedding_pipeline.settings import Settings
from embedding_pipeline.sources.samples import load_photo
from embedding_pipeline_tests.http_servers import TestServer
from embedding_pipeline_tests.images import altered_copies, encode
from embedding_pipeline_tests.integration.conftest import REPO_ROOT, running_stack, write_config

pytestmark = pytest.mark.integration

API_DOC = REPO_ROOT / "docs" / "http-api.md"
# What the examples say, and what stands in for it here.
README_BASE = "http://127.0.0.1:18080"
README_PATHS = "/path/to/"
README_URL = "https://example.com/image2.jpg"
KEY = "test-api-key-7f3c"


@dataclass
class Api:
    settings: Settings
    base: str
    photos: Path
    web: TestServer

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.post(self.base + path, timeout=120, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.base + path, timeout=60, **kwargs)


def readme_curl_examples() -> list[str]:
    """The curl commands of docs/http-api.md, in order."""
    return [
        block
        for block in re.findall(r"```bash\n(.*?)```", API_DOC.read_text(), re.S)
        if block.lstrip().startswith("curl")
    ]


def no_proxy_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return {**env, **extra}


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Iterator[Api]:
    home = tmp_path_factory.mktemp("api_home")
    photos = home / "photos"  # outside the drop folder: reachable through sources.allowed_roots
    photos.mkdir()
    flower = load_photo("flower")
    (photos / "image1.jpg").write_bytes(encode(flower, "JPEG", quality=92))
    (photos / "image2.jpg").write_bytes(encode(load_photo("china"), "JPEG", quality=92))
    (photos / "query.jpg").write_bytes(altered_copies(flower)["flip"])
    (photos / "coffee.jpg").write_bytes(encode(load_photo("coffee"), "JPEG", quality=92))
    (photos / "chelsea.jpg").write_bytes(encode(load_photo("chelsea"), "JPEG", quality=92))
    (photos / "chelsea-crop.jpg").write_bytes(altered_copies(load_photo("chelsea"))["crop"])
    with TestServer(files_dir=photos) as web:
        config = write_config(home)
        config.write_text(
            config.read_text() + f"sources:\n  allowed_roots: ['{photos}']\n"
            f"  private_allowlist: ['127.0.0.1:{web.port}']\n"
        )
        with running_stack(home, config) as settings:
            try:
                services.start_dagster(settings)
                services.start_api(settings)  # `embedding-pipeline serve-api`, a managed process like `up` starts
                yield Api(settings, services.api_url(settings), photos, web)
            finally:
                services.stop_api(settings)
                services.stop_dagster(settings)


@pytest.fixture(scope="module")
def my_images(api) -> str:
    """``my_images`` holding the documented two images (img_1 nature, img_2 urban), inserted by this fixture through
    the API (idempotent: the same ids and bytes), so a test never depends on what the test before it inserted."""
    answer = api.post(
        "/insert",
        json={
            "inputs": [str(api.photos / "image1.jpg"), api.web.url("/files/image2.jpg")],
            "ids": ["img_1", "img_2"],
            "metadata": [{"category": "nature"}, {"category": "urban"}],
            "collection_name": "my_images",
            "wait": True,
            "timeout_s": 300,
        },
    )
    assert answer.status_code == 200 and answer.json()["ok"] == 2, answer.text
    return "my_images"


def run_curl(api: Api, command: str, **env: str) -> dict[str, Any]:
    adapted = (
        command.replace(README_BASE, api.base)
        .replace(README_URL, api.web.url("files/image2.jpg"))
        .replace(README_PATHS, f"{api.photos}/")
    )
    done = subprocess.run(["bash", "-c", adapted], capture_output=True, text=True, timeout=120, env=no_proxy_env(**env))
    assert done.returncode == 0, f"{adapted}\n{done.stderr}"
    return json.loads(done.stdout)


def wait_for_run(api: Api, run_id: str, timeout_s: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        report = api.get(f"/runs/{run_id}").json()
        if report["status"] in ("SUCCESS", "FAILURE", "CANCELED"):
            return report
        assert time.monotonic() < deadline, f"run {run_id} not finished after {timeout_s:.0f} s: {report}"
        time.sleep(1)


def test_readme_curl_examples_insert_then_search(api):
    examples = readme_curl_examples()
    by_kind = {
        "health": [c for c in examples if "/health" in c],
        "create": [c for c in examples if "/collections/create" in c],
        "insert": [c for c in examples if "/insert" in c],
        "run": [c for c in examples if "/runs/" in c],
        "search": [c for c in examples if "/search" in c and "query_input" in c and "filter_expr" not in c],
        "filter": [c for c in examples if "filter_expr" in c],
        "upload": [c for c in examples if "/search" in c and " -F " in c],
    }
    assert all(len(found) == 1 for found in by_kind.values()), {k: len(v) for k, v in by_kind.items()}
    (health,), (create,), (insert,), (run,), (search,), (filtered,), (upload,) = by_kind.values()

    answer = run_curl(api, health)
    assert answer["status"] == "ok", answer
    assert answer["triton"]["model_ready"] and answer["milvus"]["reachable"]

    created = run_curl(api, create)
    assert created["created"] is True and created["dim"] == 1280 and created["name"] == "my_images", created

    accepted = run_curl(api, insert)
    assert accepted["status_url"] == f"/runs/{accepted['run_id']}", accepted
    assert (api.settings.drops / accepted["drop"]).is_file()  # the manifest drop
    report = wait_for_run(api, accepted["run_id"])
    assert report["status"] == "SUCCESS" and report["ok"] == 2 and report["failed"] == 0, report
    assert run_curl(api, run, RUN_ID=accepted["run_id"])["ok"] == 2

    hits = run_curl(api, search)["results"]
    assert [h["id"] for h in hits][:2] == ["img_1", "img_2"], hits
    assert hits[0]["metadata"] == {"category": "nature"} and hits[0]["uri"] == str(api.photos / "image1.jpg")
    assert hits[0]["score"] > hits[1]["score"]

    only_nature = run_curl(api, filtered)["results"]
    assert [h["id"] for h in only_nature] == ["img_1"], only_nature

    uploaded = run_curl(api, upload)
    assert uploaded["results"][0]["id"] == "img_1" and uploaded["collection"] == "my_images", uploaded


def test_insert_wait_upload_and_vector_search(api, my_images):
    answer = api.post(
        "/insert",
        json={
            "inputs": [str(api.photos / "coffee.jpg"), str(api.photos / "chelsea.jpg"), str(api.photos / "nope.jpg")],
            "ids": ["coffee", "chelsea", "missing"],
            "metadata": [{"category": "food"}, {"category": "animals"}, {}],
            "collection_name": "my_images",
            "wait": True,
            "timeout_s": 180,
        },
    )
    assert answer.status_code == 200, answer.text
    report = answer.json()
    assert report["status"] == "SUCCESS" and report["ok"] == 2 and report["failed"] == 1, report
    assert report["failures"][0]["id"] == "missing" and report["failures"][0]["error_kind"] == "not_found"

    with open(api.photos / "chelsea-crop.jpg", "rb") as f:
        upload = api.post(
            "/search", files={"file": ("q.jpg", f, "image/jpeg")}, data={"topk": "3", "collection_name": "my_images"}
        )
    assert upload.status_code == 200, upload.text
    assert upload.json()["results"][0]["id"] == "chelsea"

    # The stored vector of "coffee" finds itself first, at cosine ~1.
    from embedding_pipeline.index.client import ImageIndex

    resolved = upload.json()["resolved_collection"]
    with ImageIndex(api.settings.milvus.model_copy(update={"collection": resolved})) as index:
        vector = index.vectors(["coffee"])["coffee"]
    hits = api.post("/search", json={"vector": vector.tolist(), "topk": 2, "collection_name": "my_images"})
    assert hits.status_code == 200, hits.text
    assert hits.json()["results"][0]["id"] == "coffee" and hits.json()["results"][0]["score"] > 0.999

    either = 'metadata["category"] == "food" or metadata["category"] == "animals"'
    filtered = api.post(
        "/search", json={"vector": vector.tolist(), "topk": 10, "collection_name": "my_images", "filter_expr": either}
    )
    assert filtered.status_code == 200, filtered.text
    assert {h["id"] for h in filtered.json()["results"]} == {"coffee", "chelsea"}


def test_concurrent_searches_share_the_warm_clients(api, my_images):
    """Eight clients at once, by image and by vector: every answer right (the searcher is shared by threads)."""
    query = (api.photos / "query.jpg").read_bytes()
    vector = np.full(1280, 0.03).tolist()
    answers: list[tuple[str, int, Any]] = []

    def client(n: int) -> None:
        with requests.Session() as session:
            for i in range(6):
                if (n + i) % 2:
                    r = session.post(
                        api.base + "/search",
                        files={"file": ("q.jpg", query, "image/jpeg")},
                        data={"topk": "1", "collection_name": "my_images"},
                        timeout=120,
                    )
                    answers.append(("image", r.status_code, r.json()))
                else:
                    r = session.post(
                        api.base + "/search",
                        json={"vector": vector, "topk": 1, "collection_name": "my_images"},
                        timeout=120,
                    )
                    answers.append(("vector", r.status_code, r.json()))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(answers) == 48
    assert all(status == 200 for _, status, _ in answers), [a for a in answers if a[1] != 200][:3]
    assert all(body["results"][0]["id"] == "img_1" for kind, _, body in answers if kind == "image")
    assert len({body["results"][0]["id"] for kind, _, body in answers if kind == "vector"}) == 1


def test_bad_requests_against_the_real_services(api, my_images):
    bad_filter = api.post(
        "/search",
        json={
            "query_input": str(api.photos / "query.jpg"),
            "collection_name": "my_images",
            "filter_expr": 'metadata["category"] === "nature',
        },
    )
    assert bad_filter.status_code == 422 and bad_filter.json()["error"]["code"] == "invalid_filter", bad_filter.text
    assert bad_filter.json()["error"]["details"]["filter_expr"]

    short = api.post("/search", json={"vector": [0.1] * 512, "collection_name": "my_images"})
    assert short.status_code == 422 and short.json()["error"]["code"] == "dimension_mismatch", short.text
    assert short.json()["error"]["details"] == {"got": 512, "expected": 1280}

    wrong_dim = api.post("/collections/create", json={"name": "other", "dim": 512})
    assert wrong_dim.status_code == 422 and wrong_dim.json()["error"]["details"]["model_dim"] == 1280

    unknown = api.post("/search", json={"vector": [0.1] * 1280, "collection_name": "no_such_collection"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found", unknown.text
    assert api.settings.milvus.uri not in unknown.text  # no server address (or credentials in it) for callers

    outside = api.post("/search", json={"query_input": "/etc/hostname", "collection_name": "my_images"})
    assert outside.status_code == 422 and outside.json()["error"]["code"] == "outside_roots"

    not_image = api.post(
        "/search",
        files={"file": ("q.jpg", b"not an image at all", "image/jpeg")},
        data={"collection_name": "my_images"},
    )
    assert not_image.status_code == 422 and not_image.json()["error"]["code"] == "bad_image", not_image.text


def test_api_key_enforced_when_set(api, my_images):
    import uvicorn

    from embedding_pipeline.api.app import create_app

    (port,) = free_ports(1)
    server = uvicorn.Server(
        uvicorn.Config(create_app(api.settings, api_key=KEY), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "API did not start"
            time.sleep(0.1)
        body = {"vector": np.full(1280, 0.03).tolist(), "topk": 1, "collection_name": "my_images"}
        assert http_ok(f"{base}/health")  # open, like /docs and /openapi.json
        refused = requests.post(f"{base}/search", json=body, timeout=30)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
        assert requests.post(f"{base}/search", json=body, headers={"X-API-Key": "nope"}, timeout=30).status_code == 401
        for header in ({"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY}"}):
            allowed = requests.post(f"{base}/search", json=body, headers=header, timeout=30)
            assert allowed.status_code == 200 and len(allowed.json()["results"]) == 1, allowed.text
    finally:
        server.should_exit = True
        thread.join(timeout=30)
