"""Property-based fuzz of the HTTP API: whatever the request, never a 5xx, and every error in the one error shape.

Two layers, both over ASGI in this process (no sockets) against real back-ends of their own — Triton, Milvus
(with the default collection created and filled) and a Dagster webserver without the daemon, so an accepted
insert's run stays queued and nothing executes:

- schemathesis generates valid and invalid requests for every operation of the published OpenAPI schema;
- Hypothesis drives the fields a schema cannot make meaningful — query vectors of the collection's dimension with
  extreme values, filter expressions, search parameters, uploads, inputs that exist — deep into the engines.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance

from embedding_pipeline import services
from embedding_pipeline.runtime import processes
from embedding_pipeline.settings import Settings
from embedding_pipeline_tests.integration.conftest import running_stack, write_config

pytestmark = pytest.mark.integration

# Examples per test: enough to reach every validator and back-end call, few enough that the file runs in well
# under a minute on two cores.
EXAMPLES = 40
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
ROWS = 200
CATEGORIES = ("nature", "city", "animal")

# Every operation of the published schema (checked below, so a new endpoint cannot go unfuzzed). One test per
# operation through Hypothesis directly: schemathesis' lazy pytest loader does not work with pytest 9.
OPERATIONS = [
    ("GET", "/health"),
    ("POST", "/collections/create"),
    ("POST", "/insert"),
    ("GET", "/runs/{run_id}"),
    ("POST", "/search"),
    ("GET", "/duplicates"),
]


@dataclass
class FuzzedApi:
    app: Any
    schema: Any
    settings: Settings
    dim: int
    photo: str  # an image inside the drop folder (an allowed root)


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    from schemathesis.python import asgi

    from embedding_pipeline.api.app import create_app
    from embedding_pipeline.sources.samples import write_sample_drop

    home = tmp_path_factory.mktemp("fuzz_home")
    with running_stack(home, write_config(home)) as stack:
        try:
            services.start_dagster(stack)
            # Runs are queued by the webserver and started by the daemon: without it no fuzzed insert executes.
            processes.stop(stack.paths.run, services.DAEMON)
            # Schemathesis's in-process transport sends "Host: testserver".
            api = stack.api.model_copy(update={"allowed_hosts": [*stack.api.allowed_hosts, "testserver"]})
            app = create_app(stack.model_copy(update={"api": api}), api_key="")
            schema = schemathesis.openapi.from_asgi("/openapi.json", app)  # starts the app's lifespan
            dim = fill_default_collection(stack, app)
            photo = sorted(write_sample_drop(stack.drops, "fuzz-photos").glob("*.jpg"))[0]
            yield FuzzedApi(app, schema, stack, dim, str(photo))
        finally:
            # The app's lifespan holds Triton and Milvus clients: close them before the servers stop (an open
            # Triton client holds up the server's shutdown).
            asgi.shutdown_lifespans()
            services.stop_dagster(stack)


def fill_default_collection(stack: Settings, app) -> int:  # noqa: ANN001 - the ASGI app
    """Create the default collection through the API and put synthetic unit vectors with categories into it."""
    from embedding_pipeline.bench import corpus
    from embedding_pipeline.index.client import ImageIndex

    with client(app) as http:
        response = http.post("/collections/create", json={"name": stack.milvus.collection})
        assert response.status_code == 201, response.text
        created = response.json()
    rows = corpus.build(ROWS, created["dim"], real=None, photos=None, queries=1).rows(0, ROWS, created["model"])
    for n, row in enumerate(rows):
        row["metadata"] = {"category": CATEGORIES[n % len(CATEGORIES)], "n": n}
    with ImageIndex(
        stack.milvus.model_copy(update={"collection": created["collection"]}), model_label=created["model"]
    ) as index:
        assert index.upsert(rows) == ROWS
    return created["dim"]


def client(app):  # noqa: ANN001, ANN201 - an ASGI app; a requests.Session that calls it in process
    from schemathesis.python import asgi

    return asgi.get_client(app)


# -- the checks -----------------------------------------------------------------------------------------------


def check_answer(response, what: str) -> None:  # noqa: ANN001 - a requests.Response
    """No 5xx; an error is JSON ``{"error": {"code": snake_case, "message": text, "details": any}}`` only."""
    seen = f"{what} -> {response.status_code} {response.text[:500]}"
    assert response.status_code < 500, seen
    if response.status_code < 400:
        return
    assert response.headers.get("content-type", "").startswith("application/json"), seen
    body = response.json()
    assert set(body) == {"error"}, seen
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"code", "message", "details"}, seen
    assert isinstance(error["code"], str) and error["code"].isidentifier() and error["code"] == error["code"].lower(), (
        seen
    )
    assert isinstance(error["message"], str) and error["message"], seen


# -- schemathesis: every operation of the schema --------------------------------------------------------------


def test_every_operation_is_fuzzed(api):
    published = {(result.ok().method.upper(), result.ok().path) for result in api.schema.get_all_operations()}
    assert published == set(OPERATIONS)


@pytest.mark.parametrize("method, path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_schema_fuzz_finds_no_server_error(api, method, path):
    operation = api.schema[path][method]
    # Valid requests (reach the back-ends) and invalid ones (reach the validators and error handlers).
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))

    @given(case=cases)
    @FUZZ
    def fuzz(case) -> None:  # noqa: ANN001 - a schemathesis Case
        response = case.call(timeout=60)
        check_answer(_as_requests(response), f"reproduce with: {case.as_curl_command()}")
        if response.status_code < 400:
            # Successful answers match the schema the API publishes.
            case.validate_response(response, checks=[response_schema_conformance])

    fuzz()


def _as_requests(response):  # noqa: ANN001, ANN202
    """A schemathesis Response read like a requests.Response (status_code, headers.get, text, json)."""

    class View:
        status_code = response.status_code
        text = response.content.decode("utf-8", "replace")
        headers = {k: v[0] for k, v in response.headers.items()}

        @staticmethod
        def json() -> Any:
            return json.loads(response.content)

    return View()


# -- Hypothesis: the fields that reach the engines ------------------------------------------------------------

finite = st.floats(width=32, allow_nan=False, allow_infinity=False)
any_float = st.floats(width=32)  # NaN and infinities too: JSON from Python can carry them
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), finite, st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
# Filter expressions: well-formed ones on the declared key, the JSON column and the id, and fragments of them.
_FILTER_PARTS = [
    'metadata["category"]',
    'metadata["n"]',
    "id",
    "uri",
    "drop",
    "==",
    "!=",
    ">",
    "<=",
    "in",
    "like",
    "and",
    "or",
    "not",
    "(",
    ")",
    "[",
    "]",
    '"nature"',
    '"c%"',
    "1",
    "-1e308",
    "2.5",
    "true",
    "null",
    "exists",
    "json_contains",
    ",",
    "'",
    '"',
    "\\",
    "%",
]
filters = st.one_of(
    st.none(),
    st.sampled_from(
        [
            'metadata["category"] == "nature"',
            'metadata["n"] > 10',
            'id in ["v0000001"]',
            'metadata["category"] like "na%"',
            'not (metadata["n"] < 5)',
            'id != ""',
            'metadata["missing"] == 1',
        ]
    ),
    st.lists(st.sampled_from(_FILTER_PARTS), min_size=1, max_size=6).map(" ".join),
    st.text(max_size=40),
)
search_params = st.one_of(
    st.none(),
    st.dictionaries(
        st.sampled_from(["ef", "nprobe", "radius", "range_filter", "level", "metric_type", "params", "offset", "limit"])
        | st.text(max_size=6),
        json_values,
        max_size=3,
    ),
)


def vectors(dim: int):  # noqa: ANN201 - a strategy
    """Query vectors: mostly the collection's dimension (to reach Milvus), sometimes another one."""
    random = st.builds(
        lambda seed, scale: (np.random.default_rng(seed).standard_normal(dim) * scale).tolist(),
        st.integers(0, 2**32 - 1),
        st.sampled_from([1e-30, 1e-6, 1.0, 1.0, 1e6, 1e30]),
    )
    right = st.one_of(
        random,
        random,
        random,
        st.lists(finite, min_size=dim, max_size=dim).filter(any),
        st.just([0.0] * dim),
        st.lists(any_float, min_size=dim, max_size=dim),
    )
    return st.one_of(right, right, right, st.lists(any_float, min_size=1, max_size=8))


def test_search_by_vector_on_a_filled_collection(api):
    # Weighted towards requests Milvus gets to run (each axis alone is fuzzed, not every axis at once).
    @given(
        vector=vectors(api.dim),
        topk=st.one_of(st.integers(1, 20), st.integers(1, 20), st.integers(-3, 1100)),
        filter_expr=st.one_of(st.none(), st.none(), filters),
        params=st.one_of(st.none(), st.none(), search_params),
        collection=st.sampled_from([None, None, None, api.settings.milvus.collection, "missing_one", "1bad"]),
    )
    @settings(parent=FUZZ, max_examples=60)
    def fuzz(vector, topk, filter_expr, params, collection) -> None:  # noqa: ANN001
        body: dict[str, Any] = {"vector": vector, "topk": topk, "filter_expr": filter_expr, "search_params": params}
        if collection is not None:
            body["collection_name"] = collection
        data = json.dumps(body, allow_nan=True)  # NaN/Infinity tokens, as a careless client sends them
        with client(api.app) as http:
            response = http.post("/search", data=data, headers={"Content-Type": "application/json"})
        check_answer(response, f"POST /search {data[:300]}")
        if response.status_code == 200:
            hits = response.json()["results"]
            assert len(hits) <= topk
            if filter_expr == 'metadata["category"] == "nature"':
                assert all(h["metadata"]["category"] == "nature" for h in hits)

    fuzz()


def _jpeg(seed: int, size: tuple[int, int]) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG")
    return out.getvalue()


uploads = st.one_of(
    st.builds(_jpeg, st.integers(0, 1000), st.tuples(st.integers(1, 300), st.integers(1, 300))),
    st.binary(max_size=64),  # not an image
    st.builds(lambda seed: _jpeg(seed, (64, 64))[:40], st.integers(0, 9)),  # a truncated JPEG
)


def test_search_by_upload(api):
    @given(
        image=uploads,
        topk=st.one_of(st.none(), st.integers(-1, 1100).map(str), st.text(max_size=5)),
        filter_expr=filters,
        extra=st.booleans(),
    )
    @settings(parent=FUZZ, max_examples=25)
    def fuzz(image, topk, filter_expr, extra) -> None:  # noqa: ANN001
        form = {k: v for k, v in (("topk", topk), ("filter_expr", filter_expr)) if v is not None}
        if extra:
            form["unexpected"] = "1"
        with client(api.app) as http:
            response = http.post("/search", data=form, files={"file": ("q.jpg", image, "image/jpeg")})
        check_answer(response, f"POST /search multipart {form} with {len(image)} bytes {image[:16]!r}")

    fuzz()


def test_search_by_path_or_url(api):
    inputs = st.one_of(
        st.just(api.photo),
        st.just(api.photo + "/../" + api.photo.rsplit("/", 1)[1]),
        st.sampled_from(
            [
                "/etc/passwd",
                "relative.jpg",
                "file:///etc/passwd",
                "ftp://127.0.0.1/x.jpg",
                "http://127.0.0.1:1/x.jpg",
                str(api.settings.drops / "nothing-here.jpg"),
                str(api.settings.drops),
            ]
        ),
        st.text(min_size=1, max_size=30),
    )

    @given(query_input=inputs, filter_expr=filters)
    @settings(parent=FUZZ, max_examples=25)
    def fuzz(query_input, filter_expr) -> None:  # noqa: ANN001
        body = {"query_input": query_input, "topk": 3, "filter_expr": filter_expr}
        with client(api.app) as http:
            response = http.post("/search", json=body)
        check_answer(response, f"POST /search {body}")

    fuzz()


def test_insert_with_inputs_that_exist(api):
    """Accepted inserts go all the way to a queued Dagster run through the webserver; their status reads back."""
    ids = st.one_of(st.none(), st.text(min_size=1, max_size=70))
    metadata = st.one_of(st.none(), st.dictionaries(st.text(max_size=10), json_values, max_size=4))

    @given(
        items=st.lists(
            st.tuples(st.sampled_from([api.photo, "http://127.0.0.1:1/x.jpg", "/etc/hosts"]), ids, metadata),
            min_size=1,
            max_size=3,
        ),
        collection=st.sampled_from([None, api.settings.milvus.collection, "fresh_one"]),
        timeout=st.one_of(st.none(), st.floats(0.01, 0.5)),
    )
    @settings(parent=FUZZ, max_examples=20)
    def fuzz(items, collection, timeout) -> None:  # noqa: ANN001
        body: dict[str, Any] = {"inputs": [i[0] for i in items]}
        if all(i[1] is not None for i in items):
            body["ids"] = [i[1] for i in items]
        if all(i[2] is not None for i in items):
            body["metadata"] = [i[2] for i in items]
        if collection:
            body["collection_name"] = collection
        if timeout is not None:  # without wait=true it changes nothing (waiting could only end in a 504 here)
            body["timeout_s"] = timeout
        with client(api.app) as http:
            response = http.post("/insert", json=body)
            check_answer(response, f"POST /insert {json.dumps(body)[:400]}")
            if response.status_code == 202:
                status = http.get(response.json()["status_url"])
                check_answer(status, f"GET {response.json()['status_url']}")
                assert status.status_code == 200 and status.json()["status"] in ("QUEUED", "NOT_STARTED"), status.text

    fuzz()
