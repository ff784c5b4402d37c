"""The image collection on two real engines: milvus-lite (the embedded default) and a Milvus 2.3.5 standalone server
with authorization (the "remote Milvus" case): index types, declared filter fields, upserts, deletes,
read-your-writes, credentials, databases and TLS. Small vectors keep it fast; each engine runs once per session."""

from __future__ import annotations

import socket
import time
import uuid

import numpy as np
import pytest

from embedding_pipeline.index.client import CollectionError, ImageIndex
from embedding_pipeline.index.standalone import DEFAULT_ROOT_PASSWORD, ServerTls, StandaloneError, StandaloneMilvus
from embedding_pipeline.runtime.state import StatePaths
from embedding_pipeline.settings import ConfigError, MilvusSettings
from embedding_pipeline_tests.integration.milvus_servers import MilvusStore, tls_files

pytestmark = pytest.mark.integration

DIM = 8


@pytest.fixture(params=["milvus_lite", "standalone_milvus"], scope="module")
def store(request) -> MilvusStore:
    return request.getfixturevalue(request.param)


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_rows(vectors: np.ndarray, drop: str = "d1", prefix: str = "r", metadata=None) -> list[dict]:
    return [
        {
            "id": f"{prefix}{i}",
            "embedding": v,
            "uri": f"/img/{prefix}{i}.jpg",
            "sha256": f"{i:064x}",
            "drop": drop,
            "model": "m:1",
            "metadata": (metadata[i] if metadata else {"n": i}),
        }
        for i, v in enumerate(vectors)
    ]


# -- index types -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "index_type, metric, build, search",
    [
        ("FLAT", "L2", {}, {}),
        ("IVF_FLAT", "IP", {"nlist": 8}, {"nprobe": 4}),
        ("HNSW", "COSINE", {"M": 8, "efConstruction": 40}, {"ef": 24}),
    ],
)
def test_each_index_type_is_built_with_its_parameters_and_searchable(store, index_type, metric, build, search):
    overrides = {"index_params": build, "search_params": search} if build else {}
    settings = store.with_(collection=unique("types"), index_type=index_type, metric_type=metric, **overrides)
    vectors = unit_vectors(200)
    with ImageIndex(settings) as index:
        index.ensure_collection(DIM)
        described = index.describe_index()
        assert (described["index_type"], described["metric_type"], described["params"]) == (index_type, metric, build)
        assert index.upsert(make_rows(vectors)) == 200
        hits = index.search(vectors[17], top_k=5)[0]
        assert hits[0].id == "r17" and len(hits) == 5
        assert hits[0].uri == "/img/r17.jpg" and hits[0].metadata == {"n": 17}
        if search:  # a per-query override of the type's own parameter
            key = next(iter(search))
            assert index.search(vectors[3], top_k=3, search_params={key: search[key] * 2})[0][0].id == "r3"
        with pytest.raises(ConfigError, match=f"unknown key 'bogus' for index type {index_type}"):
            index.search(vectors[0], search_params={"bogus": 1})
        # Building happens once: ensuring again (every ingest does) keeps the same index.
        index.ensure_collection(DIM)
        assert index.describe_index()["params"] == build


def test_an_existing_collection_with_another_index_is_refused(store):
    name = unique("other_index")
    with ImageIndex(store.with_(collection=name, index_type="FLAT")) as index:
        index.ensure_collection(DIM)
    with ImageIndex(store.with_(collection=name, index_type="HNSW")) as index:
        with pytest.raises(CollectionError, match="FLAT/COSINE vector index but the settings ask for HNSW/COSINE"):
            index.ensure_collection(DIM)


# -- declared filter fields ----------------------------------------------------------------------------------------

FIELDS = {"category": "VARCHAR", "year": "INT64", "score": "DOUBLE", "flag": "BOOL"}
METADATA = [
    {"category": "nature", "year": 1990, "score": 0.5, "flag": True, "color": "green"},
    {"category": "urban", "year": 2005, "score": 1.5, "flag": False, "color": "grey"},
    {"category": "nature", "year": 2010, "score": 2, "flag": False},
    {"category": "nature", "year": "1999"},  # year of the wrong type: stored, typed column empty
    {"year": 1995, "color": "green"},  # no category at all
    {"category": 5, "flag": True},  # category of the wrong type
    {"category": "animals", "year": 2020, "score": -1.0, "flag": True, "color": "brown"},
]
# filter -> ids of METADATA rows it must return (whatever path the engine takes)
CASES = {
    'metadata["category"] == "nature"': {0, 2, 3},
    "metadata['category'] == 'nature'": {0, 2, 3},
    'metadata["category"] in ["nature", "animals"]': {0, 2, 3, 6},
    'metadata["category"] like "nat%"': {0, 2, 3},
    '1990 <= metadata["year"] < 2006': {0, 1, 4},
    'metadata["score"] > 1': {1, 2},
    'metadata["flag"] == true': {0, 5, 6},
    'metadata["category"] == "nature" and metadata["flag"] == false': {2},
    'metadata["color"] == "green"': {0, 4},  # undeclared: JSON path
    'metadata["category"] == "nature" and metadata["color"] == "green"': {0},  # both paths in one filter
    '(metadata["year"] > 2000 or metadata["flag"] == true) and drop == "d1"': {0, 1, 2, 5, 6},
}


@pytest.fixture(scope="module")
def filtered(store):
    """A collection with the four declared filter fields, holding METADATA; (index, vectors)."""
    settings = store.with_(collection=unique("filters"), filter_fields=FIELDS, index_type="FLAT")
    vectors = unit_vectors(len(METADATA), seed=1)
    with ImageIndex(settings) as index:
        index.ensure_collection(DIM)
        index.upsert(make_rows(vectors, metadata=METADATA))
        yield index, vectors


@pytest.mark.parametrize("expr", list(CASES))
def test_filters_return_exactly_the_matching_rows(filtered, store, expr):
    index, vectors = filtered
    expected = {f"r{i}" for i in CASES[expr]}
    assert index.ids(expr) == expected
    assert index.count(expr) == len(expected)
    hits = index.search(vectors[0], top_k=len(METADATA), filter=expr)[0]
    assert {h.id for h in hits} == expected
    declared_only = "color" not in expr and "drop" not in expr
    if declared_only:
        assert "metadata[" not in index.rewrite(expr)  # served by the typed columns
    if "color" in expr:
        # Undeclared: served by the rows' mirror of the key, not the JSON path.
        assert "metadata[" not in index.rewrite(expr) and "m__color" in index.rewrite(expr)
    # The JSON path as written agrees, where the engine takes it: milvus-lite refuses `in` on a JSON path and reads
    # a chained range as "(a <= x) < b"; the rewritten filters work there too.
    if store.server is not None or not (" in [" in expr or "<=" in expr):
        raw = index.client.query(index.collection, filter=expr, output_fields=["id"])
        assert {r["id"] for r in raw} == expected


def test_wrong_typed_values_keep_their_rows_and_are_reported(filtered):
    index, _ = filtered
    assert index.count() == len(METADATA)
    assert {(m.id, m.key) for m in index.type_mismatches} == {("r3", "year"), ("r5", "category")}
    stored = index.client.query(index.collection, filter='id in ["r3", "r5"]', output_fields=["metadata"])
    assert {r["id"]: r["metadata"] for r in stored} == {"r3": METADATA[3], "r5": METADATA[5]}


def test_scalar_indexes_are_the_ones_each_engine_takes(filtered, store):
    index, _ = filtered
    built = index.scalar_indexes()
    if store.server is None:  # milvus-lite: INVERTED for every scalar type
        assert set(built.values()) == {"INVERTED"}
    else:  # Milvus 2.3: Trie for strings, STL_SORT for numbers, nothing for BOOL
        assert built["meta_category"] == "Trie"
        assert built["meta_year"] == built["meta_score"] == "STL_SORT"
        assert built["meta_flag"] is None and built["has_meta_category"] is None
    print(f"\nscalar indexes on {store.name}: {built}")


def test_a_collection_without_the_declared_fields_asks_for_a_new_one(store):
    name = unique("undeclared")
    with ImageIndex(store.with_(collection=name)) as index:
        index.ensure_collection(DIM)
    with ImageIndex(store.with_(collection=name, filter_fields={"category": "VARCHAR"})) as index:
        with pytest.raises(
            CollectionError,
            match=r"without the declared filter field\(s\) category \(VARCHAR\).*new "
            "collection",
        ):
            index.ensure_collection(DIM)


# -- writes and read-your-writes -----------------------------------------------------------------------------------


def test_upserting_the_same_ids_twice_keeps_one_row_each_with_the_latest_values(store):
    vectors = unit_vectors(10, seed=2)
    with ImageIndex(store.with_(collection=unique("upsert"))) as index:
        index.ensure_collection(DIM)
        index.upsert(make_rows(vectors))
        index.upsert(make_rows(vectors[::-1], metadata=[{"n": i, "v": 2} for i in range(10)]))
        assert index.count() == 10
        rows = index.client.query(index.collection, filter='id in ["r0", "r9"]', output_fields=["metadata"])
        assert {r["id"]: r["metadata"] for r in rows} == {"r0": {"n": 0, "v": 2}, "r9": {"n": 9, "v": 2}}
        assert np.allclose(index.vectors(["r0"])["r0"], vectors[9], atol=1e-6)


def test_deleting_a_drop_leaves_the_others_untouched(store):
    with ImageIndex(store.with_(collection=unique("drops"))) as index:
        index.ensure_collection(DIM)
        index.upsert(make_rows(unit_vectors(6, seed=3), drop="a", prefix="a"))
        index.upsert(make_rows(unit_vectors(5, seed=4), drop="b", prefix="b"))
        before = index.drop_rows("b")
        assert index.delete_drop("a") == 6
        assert index.count_drop("a") == 0 and index.drop_ids("a") == set()
        assert index.drop_rows("b") == before and index.count() == 5
        hits = index.search(unit_vectors(6, seed=3)[0], top_k=11)[0]
        assert {h.drop for h in hits} == {"b"}


def test_reads_right_after_writes_see_them_with_session_consistency(store):
    vectors = unit_vectors(40, seed=5)
    settings = store.with_(collection=unique("session"), consistency_level="Session", index_type="HNSW")
    with ImageIndex(settings) as index:
        index.ensure_collection(DIM)
        if store.server is not None:  # milvus-lite is always strongly consistent and says so
            assert index.client.describe_collection(index.collection)["consistency_level_name"] == "Session"
        index.upsert(make_rows(vectors[:30]))
        for i in (30, 31, 32):
            index.upsert(make_rows(vectors[i : i + 1], prefix=f"new{i}_"))
            started = time.perf_counter()
            assert index.search(vectors[i], top_k=1)[0][0].id == f"new{i}_0"
            first_read_s = time.perf_counter() - started
        assert index.count() == 33
        index.delete_ids(["new31_0"])
        assert index.search(vectors[31], top_k=1)[0][0].id != "new31_0"
        assert index.count() == 32 and "new31_0" not in index.ids('id like "new%"')
        # The level can also be chosen per query.
        assert index.count(consistency_level="Strong") == 32
    print(f"\n{store.name}: first search after an upsert {first_read_s * 1000:.0f} ms")


# -- remote server: credentials, databases, TLS ----------------------------------------------------------------


def test_the_default_password_and_a_wrong_token_are_refused_clearly(standalone_milvus):
    server = standalone_milvus.server
    for token in (f"root:{DEFAULT_ROOT_PASSWORD}", "root:not-the-password"):
        with pytest.raises(CollectionError) as err:
            ImageIndex(standalone_milvus.with_(token=token)).exists()
        message = str(err.value)
        assert f"Milvus at {server.uri} refused the connection: check the credentials" in message
        assert "not-the-password" not in message and server.password not in message
    # The changed password works, as a token and as user + password.
    with ImageIndex(standalone_milvus.with_(token="", user="root", password=server.password)) as index:
        assert index.exists() is False


def test_a_database_chosen_in_the_settings_is_used(standalone_milvus):
    db, name = unique("db"), unique("in_db")
    with ImageIndex(standalone_milvus.settings) as root:
        root.client.create_database(db)
    with ImageIndex(standalone_milvus.with_(db_name=db, collection=name)) as index:
        index.ensure_collection(DIM)
        index.upsert(make_rows(unit_vectors(3)))
        assert index.count() == 3
    with ImageIndex(standalone_milvus.with_(collection=name)) as default_db:
        assert not default_db.exists()
    with pytest.raises(CollectionError, match="database 'missing_db' does not exist on Milvus at http://127.0.0.1"):
        ImageIndex(standalone_milvus.with_(db_name="missing_db")).exists()


def test_tls_server_kill_and_restart(tmp_path):
    """A second 2.3.5 server with one-way TLS: only a client that trusts its CA gets in; killed and restarted on
    the same data it keeps its rows and its password."""
    tls = tls_files(tmp_path / "certs")
    server = StandaloneMilvus(StatePaths(tmp_path), tmp_path / "milvus", tls=tls)
    try:
        server.start()
        assert server.uri.startswith("https://127.0.0.1:")
        settings = server.settings_for(MilvusSettings(), collection="tls_images")
        with ImageIndex(settings) as index:
            index.ensure_collection(DIM)
            index.upsert(make_rows(unit_vectors(4)))
            assert index.count() == 4
        for right in ({"server_name": "localhost"}, {"uri": server.uri.replace("https", "http"), "secure": True}):
            with ImageIndex(settings.model_copy(update=right)) as index:
                assert index.exists()
        other_ca = tls_files(tmp_path / "other").ca
        for wrong in (
            {"ca_pem_path": str(other_ca)},
            {"uri": server.uri.replace("https", "http"), "secure": False, "ca_pem_path": ""},
        ):
            with pytest.raises(CollectionError, match="refused the connection"):
                ImageIndex(settings.model_copy(update=wrong), connect_timeout=3).exists()

        server.kill()
        assert server.pid is None
        server.start()
        with ImageIndex(settings) as index:
            assert index.count() == 4
    finally:
        server.stop()
        server.stop()  # idempotent


def test_a_start_that_fails_raises_with_the_cause_and_the_log_tail(tmp_path):
    missing = ServerTls(cert=tmp_path / "missing.pem", key=tmp_path / "missing.key", ca=tmp_path / "missing-ca.pem")
    server = StandaloneMilvus(StatePaths(tmp_path), tmp_path / "milvus", tls=missing)
    with pytest.raises(StandaloneError) as err:
        server.start(timeout_s=60)
    message = str(err.value)
    assert "panic: open " + str(tmp_path / "missing.pem") + ": no such file or directory" in message
    assert "process exited during start-up" in message and "last lines of" in message
    assert server.pid is None


def test_the_standalone_server_is_reachable_on_loopback_only(standalone_milvus):
    """Its binary binds every interface: it runs in a network namespace of its own, and the only sockets of it in
    this namespace are the loopback forwards (checked with ss, as an operator would)."""
    import subprocess

    from embedding_pipeline.index import netns

    server = standalone_milvus.server
    if not netns.available():
        from embedding_pipeline_tests.system import missing

        missing("network namespaces are not available here (root, unshare and ip are needed)")
    assert server.isolated
    listening = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout.splitlines()
    ours = [line for line in listening if f"pid={server.pid}," in line]
    assert ours == [], ours  # the server's own sockets are not in this namespace at all
    forwards = [
        line.split()[3]
        for line in listening
        if f":{server.port} " in line + " " or f":{server.ports['metrics_port']} " in line + " "
    ]
    assert sorted(forwards) == sorted([f"127.0.0.1:{server.port}", f"127.0.0.1:{server.ports['metrics_port']}"])
    # Another interface of this machine gets no answer on the proxy port.
    addresses = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    for address in [a for a in addresses if ":" not in a][:2]:
        with pytest.raises(OSError):
            socket.create_connection((address, server.port), timeout=2).close()


HOSTILE = [
    "x'] or id not in ['",
    'x"] or id not in ["',
    "O'Brien",
    "back\\slash\\",
    "]",
    "a\nb\rc\td",
    "üñí 😀 中文",
    "a" * 512,
    "\x01\x1b[31m\x7f",
    '") or true or ("',
]


def test_hostile_ids_round_trip_and_delete_only_themselves(store):
    """Every id-bearing call (read, list, delete, membership release) with ids built to rewrite expressions."""
    from hypothesis import given
    from hypothesis import settings as hyp_settings
    from hypothesis import strategies as st

    with ImageIndex(store.with_(collection=unique("hostile"))) as index:
        index.ensure_collection(DIM)
        rows = make_rows(unit_vectors(len(HOSTILE) + 1, seed=9), drop="d", prefix="p")
        for row, hostile in zip(rows, HOSTILE):
            row["id"] = hostile
        index.upsert(rows)
        everything = {r["id"] for r in rows}
        assert index.drop_ids("d") == everything and set(index.vectors(HOSTILE)) == set(HOSTILE)
        for hostile in HOSTILE:
            assert index.delete_ids([hostile]) == 1
            everything.discard(hostile)
            assert index.drop_ids("d") == everything, hostile

        @given(
            st.text(
                alphabet=st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), min_size=1, max_size=40
            )
        )
        @hyp_settings(max_examples=25, deadline=None, database=None)
        def one_id(value):
            index.upsert([{**make_rows(unit_vectors(1, seed=1), drop="h", prefix="q")[0], "id": value}])
            assert index.rows([value], ["id"]).keys() == {value}
            assert index.delete_drop("h") == 1
            assert index.drop_ids("h") == set() and index.drop_ids("d") == everything

        one_id()


def test_releasing_a_drop_touches_only_rows_it_lists(store):
    """Membership release, with a drop name built to widen an expression: shared rows lose only that drop, rows it
    does not list are never deleted or rewritten, whatever ids the caller passes."""
    hostile = 'a") or true or ("'
    with ImageIndex(store.with_(collection=unique("release"))) as index:
        index.ensure_collection(DIM)
        vectors = unit_vectors(3, seed=5)
        rows = make_rows(vectors, drop=hostile, prefix="r")
        rows[0]["drops"], rows[1]["drops"] = [hostile, "b"], [hostile]
        rows[2].update(drop="b", drops=["b"])
        index.upsert(rows)
        assert index.release(hostile, ["r0", "r1", "r2", "missing"]) == (1, 1)
        assert index.rows(["r0", "r1", "r2"], ["id", "drops", "drop"]) == {
            "r0": {"id": "r0", "drops": ["b"], "drop": "b"},
            "r2": {"id": "r2", "drops": ["b"], "drop": "b"},
        }
        assert index.release(hostile, ["r0", "r2"]) == (0, 0)  # not listed by it any more: untouched
        assert index.count() == 2 and index.drop_ids("b") == {"r0", "r2"}
        np.testing.assert_allclose(index.vectors(["r0"])["r0"], vectors[0], atol=1e-6)


def test_pages_list_every_row_in_key_order_whatever_order_it_was_stored_in(store):
    """Paging by key must see the smallest keys first on every engine, even when they were stored after larger
    ones (in a newer segment or still in memory): a skipped key would be a row a drop deletion never removes."""
    name = unique("paging")
    vectors = iter(unit_vectors(30, seed=7))
    with ImageIndex(store.with_(collection=name)) as index:
        try:
            index.ensure_collection(DIM)
            for prefix in ("m", "z", "a"):  # flushed, flushed, then still in memory
                index.upsert(make_rows(np.stack([next(vectors) for _ in range(10)]), prefix=prefix))
                if prefix != "a":
                    index.flush()
            pages = list(index.pages('id != ""', ["drop"], page_rows=4, strong=True))
            ids = [r["id"] for page in pages for r in page]
            assert ids == sorted(ids) and len(ids) == 30 == len(set(ids))
            assert all(len(page) == 4 for page in pages[:-1])
        finally:
            index.client.drop_collection(name)
