"""Filters on metadata keys nobody declared, served by the rows' mirrors (``index.filters``), on both real engines.

Differential: Hypothesis writes filters over a fixed set of rows whose metadata mixes types on purpose (strings,
integers, floats, booleans, nulls, lists, objects, missing keys, keys that cannot be names), and each filter must
select exactly the rows the JSON path as written selects on the same engine (filters the engine refuses on the JSON
path, such as comparisons of a boolean with a number, are not compared)."""

from __future__ import annotations

import json
import random
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from embedding_pipeline.index.client import ImageIndex
from embedding_pipeline.index.filters import MIRROR_PREFIX, mirrored_values
from embedding_pipeline_tests.integration.milvus_servers import MilvusStore

pytestmark = pytest.mark.integration

DIM = 8
KEYS = ["color", "size", "score", "flag", "tag"]
STRINGS = ["red", "green", "Green", "re", "", "10", "true"]


def _value(rng: random.Random):
    kind = rng.choice(["str", "int", "float", "bool", "none", "list", "obj", "missing", "missing"])
    return {
        "str": lambda: rng.choice(STRINGS),
        "int": lambda: rng.choice([-3, 0, 1, 2, 10, 2**40]),
        "float": lambda: rng.choice([-0.5, 0.0, 1.0, 1.5, 2.25, 1e10]),
        "bool": lambda: rng.choice([True, False]),
        "none": lambda: None,
        "list": lambda: [1, "red"],
        "obj": lambda: {"color": "red"},
        "missing": lambda: ...,
    }[kind]()


def _metadata(seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(80):
        meta = {}
        for key in KEYS:
            value = _value(rng)
            if value is not ...:
                meta[key] = value
        if rng.random() < 0.2:
            meta["not a name"] = rng.choice(STRINGS)  # no mirror: stays on the JSON path
        rows.append(meta)
    return rows


METADATA = _metadata(7)


@pytest.fixture(params=["milvus_lite", "standalone_milvus"], scope="module")
def store(request) -> MilvusStore:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def mirrored(store):
    settings_ = store.with_(collection=f"mirrors_{uuid.uuid4().hex[:8]}", index_type="FLAT")
    vectors = np.random.default_rng(3).normal(size=(len(METADATA), DIM)).astype(np.float32)
    rows = [
        {
            "id": f"r{i}",
            "embedding": v,
            "uri": f"/img/{i}.jpg",
            "sha256": "",
            "drop": "d1",
            "model": "m:1",
            "metadata": m,
        }
        for i, (v, m) in enumerate(zip(vectors, METADATA))
    ]
    with ImageIndex(settings_) as index:
        index.ensure_collection(DIM)
        index.upsert(rows)
        yield index, vectors


literals = st.one_of(
    st.sampled_from(STRINGS).map(json.dumps),
    st.sampled_from(["0", "1", "2", "10", "-3", "1.5", "2.25", "-0.5", "1099511627776"]),
    st.sampled_from(["true", "false"]),
)
keys = st.sampled_from(KEYS + ["absent"])


@st.composite
def comparisons(draw) -> str:
    key = draw(keys)
    ref = f'metadata["{key}"]'
    form = draw(st.sampled_from(["cmp", "cmp_left", "in", "like", "range", "ne"]))
    if form == "cmp":
        return f"{ref} {draw(st.sampled_from(['==', '<', '<=', '>', '>=']))} {draw(literals)}"
    if form == "cmp_left":
        return f"{draw(literals)} {draw(st.sampled_from(['==', '<', '>']))} {ref}"
    if form == "in":
        return f"{ref} in [{', '.join(draw(st.lists(literals, min_size=1, max_size=3)))}]"
    if form == "like":
        return f"{ref} like {json.dumps(draw(st.sampled_from(['re%', '%en', 'g%', '%'])))}"
    if form == "range":
        low, high = sorted(draw(st.lists(st.sampled_from([-1, 0, 1, 2, 5]), min_size=2, max_size=2)))
        return f"{low} <= {ref} < {high}"
    return f"{ref} != {draw(literals)}"


filters = st.recursive(
    comparisons(),
    lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from(["and", "or"]), inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        inner.map(lambda e: f"not ({e})"),
    ),
    max_leaves=3,
)


def _raw_ids(index: ImageIndex, expr: str) -> set[str] | None:
    """The rows the JSON path as written selects, or None if the engine refuses it there."""
    try:
        rows = index.client.query(index.collection, filter=expr, output_fields=["id"], limit=1000)
    except Exception:  # noqa: BLE001 - refused on the JSON path: compared with nothing
        return None
    return {r["id"] for r in rows}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(expr=filters)
def test_undeclared_keys_select_the_rows_the_json_path_selects(mirrored, expr):
    index, vectors = mirrored
    expected = _raw_ids(index, expr)
    assume(expected is not None)
    assert expected is not None
    assert index.ids(expr) == expected, index.rewrite(expr)
    hits = index.search(vectors[0], top_k=len(METADATA), filter=expr)[0]
    assert {h.id for h in hits} == expected


def test_mirrors_serve_plain_comparisons_and_hold_the_values_as_given(mirrored):
    index, _ = mirrored
    assert index.has_mirrors()
    rewritten = index.rewrite('metadata["color"] == "red" and metadata["size"] in [1, 2] and 0 < metadata["score"] < 2')
    assert "metadata[" not in rewritten and f"{MIRROR_PREFIX}color" in rewritten
    # Keys that cannot be names, and comparisons that are not positive, keep the JSON path.
    assert index.rewrite('metadata["not a name"] == "red"') == 'metadata["not a name"] == "red"'
    assert "metadata[" in index.rewrite('metadata["color"] != "red"')
    # What the rows carry: each mirror is its key's value, as given.
    stored = index.client.query(index.collection, filter='id in ["r0", "r1", "r2"]', output_fields=["*"])
    for row in stored:
        meta = METADATA[int(row["id"][1:])]
        mirrors = {k: v for k, v in row.items() if k.startswith(MIRROR_PREFIX)}
        assert mirrors == mirrored_values(meta)
