"""Near-duplicate groups without servers: union-find, metric direction, thresholds, the search over a fake index,
the written table and its checks, and pagination (in the module and through the HTTP API)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from embedding_pipeline import duplicates
from embedding_pipeline.api.app import ApiServices, create_app
from embedding_pipeline.api.duplicates import DuplicatesService
from embedding_pipeline.index import expressions
from embedding_pipeline.index.client import Hit, drop_filter
from embedding_pipeline.settings import MilvusSettings, Settings
from embedding_pipeline.storage import layout

# -- grouping ------------------------------------------------------------------------------------------------


def test_groups_are_connected_components_whatever_the_order():
    pairs = [("c", "d"), ("a", "b"), ("b", "c"), ("x", "y")]
    assert duplicates.group_pairs(pairs) == [["a", "b", "c", "d"], ["x", "y"]]
    assert duplicates.group_pairs(reversed(pairs)) == [["a", "b", "c", "d"], ["x", "y"]]


def test_a_chain_is_one_group_and_no_pair_is_no_group():
    assert duplicates.group_pairs([(f"i{k}", f"i{k + 1}") for k in range(50)]) == [sorted(f"i{k}" for k in range(51))]
    assert duplicates.group_pairs([]) == []


def test_union_find_roots_are_the_smallest_id():
    sets = duplicates.UnionFind()
    sets.union("m", "z")
    sets.union("z", "b")
    assert sets.find("z") == sets.find("m") == "b"


def test_a_pair_is_recorded_once_with_its_closest_score():
    pairs: duplicates.Pairs = {}
    duplicates.add_pair(pairs, "b", "a", 0.91, "COSINE")
    duplicates.add_pair(pairs, "a", "b", 0.95, "COSINE")
    duplicates.add_pair(pairs, "a", "a", 1.0, "COSINE")
    assert pairs == {("a", "b"): 0.95}
    l2: duplicates.Pairs = {}
    duplicates.add_pair(l2, "a", "b", 0.2, "L2")
    duplicates.add_pair(l2, "b", "a", 0.1, "L2")
    assert l2 == {("a", "b"): 0.1}


# -- metric direction and thresholds -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metric, score, threshold, expected",
    [
        ("COSINE", 0.95, 0.94, True),
        ("COSINE", 0.94, 0.94, True),  # a tie is a duplicate
        ("COSINE", 0.9399, 0.94, False),
        ("IP", 0.99, 0.94, True),
        ("L2", 0.10, 0.12, True),
        ("L2", 0.12, 0.12, True),
        ("L2", 0.13, 0.12, False),
    ],
)
def test_passes_knows_which_way_is_closer(metric, score, threshold, expected):
    assert duplicates.passes(score, threshold, metric) is expected


def test_closer_and_unknown_metric():
    assert duplicates.closer(0.9, 0.8, "COSINE") and not duplicates.closer(0.9, 0.8, "L2")
    with pytest.raises(ValueError, match="unknown metric"):
        duplicates.passes(0.5, 0.5, "HAMMING")


def test_default_threshold_per_metric_and_settings_override():
    cosine = duplicates.default_threshold("COSINE")
    assert duplicates.default_threshold("IP") == cosine
    assert duplicates.default_threshold("L2") == pytest.approx(2 - 2 * cosine)
    settings = Settings()
    assert duplicates.threshold_for(settings, "COSINE") == cosine
    settings.duplicates.threshold = 0.8
    assert duplicates.threshold_for(settings, "COSINE") == 0.8
    assert duplicates.threshold_for(settings, "COSINE", 0.99) == 0.99


def test_pair_scores_match_the_engines_definitions():
    a = np.array([[3.0, 4.0]], dtype=np.float32)
    b = np.array([[3.0, 4.0], [0.0, 1.0]], dtype=np.float32)
    assert duplicates.pair_scores(a, b, "COSINE") == pytest.approx(np.array([[1.0, 0.8]]))
    assert duplicates.pair_scores(a, b, "IP") == pytest.approx(np.array([[25.0, 4.0]]))
    assert duplicates.pair_scores(a, b, "L2") == pytest.approx(np.array([[0.0, 18.0]]))  # squared, as Milvus


# -- the search over a fake index ----------------------------------------------------------------------------


def unit(v: Sequence[float]) -> np.ndarray:
    x = np.asarray(v, dtype=np.float32)
    return x / np.linalg.norm(x)


class FakeIndex:
    """An in-memory stand-in for ImageIndex: exact top-k search, rows with drop membership."""

    def __init__(self, rows: dict[str, tuple[np.ndarray, list[str]]], metric: str = "COSINE"):
        self.rows = rows
        self.settings = MilvusSettings(metric_type=metric)  # type: ignore[arg-type]
        self.searches = 0
        self.filters: list[str] = []

    def has_membership(self) -> bool:
        return True

    def scan(self, filter: str, fields: Sequence[str], strong: bool = False) -> Iterator[dict[str, Any]]:
        self.filters.append(filter)
        for i in sorted(self.rows):
            vector, drops = self.rows[i]
            if filter.startswith("array_contains") and expressions.unquote(filter.split(", ", 1)[1][:-1]) not in drops:
                continue
            yield {"id": i, "uri": f"file://{i}.jpg", "drop": drops[0], "embedding": vector.tolist()}

    def search(self, vectors: Any, top_k: int = 10, **_: Any) -> list[list[Hit]]:
        self.searches += 1
        ids = sorted(self.rows)
        matrix = np.stack([self.rows[i][0] for i in ids])
        scores = duplicates.pair_scores(np.asarray(vectors), matrix, self.settings.metric_type)
        out = []
        for row in scores:
            order = np.argsort(-row if self.settings.metric_type != "L2" else row, kind="stable")[:top_k]
            out.append([Hit(ids[k], float(row[k]), f"file://{ids[k]}.jpg", self.rows[ids[k]][1][0]) for k in order])
        return out

    def vectors(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        return {i: self.rows[i][0] for i in ids if i in self.rows}


def planted_rows() -> dict[str, tuple[np.ndarray, list[str]]]:
    rng = np.random.default_rng(3)
    base = {name: unit(rng.standard_normal(64)) for name in ("cat", "dog", "car", "tree", "sea")}

    def near(v: np.ndarray, scale: float) -> np.ndarray:
        return unit(v + scale * unit(rng.standard_normal(64)))

    return {
        "cat": (base["cat"], ["old"]),  # an older drop's image...
        "cat-copy": (near(base["cat"], 0.1), ["new"]),  # ...and its copy in the new drop
        "dog": (base["dog"], ["new"]),
        "dog-flip": (near(base["dog"], 0.1), ["new"]),
        "dog-crop": (near(base["dog"], 0.12), ["new"]),
        "car": (base["car"], ["new"]),
        "tree": (base["tree"], ["old"]),
        "tree-copy": (near(base["tree"], 0.1), ["old"]),  # a group among older rows only
        "sea": (base["sea"], ["new"]),
    }


def test_a_drops_rows_against_the_whole_collection():
    index = FakeIndex(planted_rows())
    report = duplicates.find_duplicates(index, "new", threshold=0.9, top_k=4, batch_size=2)
    assert index.filters == [drop_filter("new")]  # the queries: the drop's rows; candidates: everything
    groups = duplicates.group_list(report.table)
    assert [sorted(m["id"] for m in g["members"]) for g in groups] == [
        ["dog", "dog-crop", "dog-flip"],
        ["cat", "cat-copy"],  # the older image is in the group
    ]
    assert report.queries == 6 and index.searches == 3
    assert report.drop == "new" and report.metric == "COSINE"
    cat = {m["id"]: m for m in groups[1]["members"]}
    assert cat["cat"]["drop"] == "old"
    assert not duplicates.table_problems(report.table, 0.9, "COSINE", set(index.rows))


def test_the_whole_collection_and_no_group_among_distinct_images():
    rows = planted_rows()
    report = duplicates.find_duplicates(FakeIndex(rows), threshold=0.9, top_k=4)
    assert report.groups == 3  # the older-only pair is found too
    distinct = {k: v for k, v in rows.items() if k in ("cat", "dog", "car", "tree", "sea")}
    assert duplicates.find_duplicates(FakeIndex(distinct), threshold=0.9).groups == 0


def test_representative_scores_and_links():
    report = duplicates.find_duplicates(FakeIndex(planted_rows()), "new", threshold=0.9, top_k=4)
    for group in duplicates.group_list(report.table):
        rep = group["members"][0]
        assert rep["representative"] and rep["id"] == group["representative"]
        assert rep["score"] == pytest.approx(1.0, abs=1e-5)
        assert sum(m["representative"] for m in group["members"]) == 1
        assert all(m["link_score"] >= 0.9 for m in group["members"])


def test_l2_collections_group_by_small_distances():
    rows = planted_rows()
    report = duplicates.find_duplicates(FakeIndex(rows, "L2"), "new", threshold=0.12, top_k=4)
    assert report.groups == 2
    assert all(m["score"] <= 0.12 * 4 for g in duplicates.group_list(report.table) for m in g["members"])
    assert not duplicates.table_problems(report.table, 0.12, "L2")


def test_threshold_edges():
    rows = planted_rows()
    assert duplicates.find_duplicates(FakeIndex(rows), threshold=1.01).groups == 0  # nothing is that close
    # Looser than cosine 0.5 joins nearly everything into one group: refused, naming the bound, in every metric.
    with pytest.raises(ValueError, match="at least 0.5"):
        duplicates.find_duplicates(FakeIndex(rows), threshold=-1.0, top_k=len(rows))
    with pytest.raises(ValueError, match="at least 0.5"):
        duplicates.find_duplicates(FakeIndex(rows), threshold=float("nan"))
    assert duplicates.check_threshold(1.0, "L2") == 1.0
    with pytest.raises(ValueError, match="at most 1.0"):
        duplicates.check_threshold(1.5, "L2")
    loosest = duplicates.find_duplicates(FakeIndex(rows), threshold=0.5, top_k=len(rows))
    assert loosest.groups >= 1
    with pytest.raises(ValueError, match="top_k"):
        duplicates.find_duplicates(FakeIndex(rows), top_k=1)


def test_a_group_larger_than_top_k_still_forms_through_its_links():
    rng = np.random.default_rng(5)
    base = unit(rng.standard_normal(32))
    rows = {f"c{k:02d}": (unit(base + 0.05 * unit(rng.standard_normal(32))), ["d"]) for k in range(12)}
    report = duplicates.find_duplicates(FakeIndex(rows), "d", threshold=0.9, top_k=3)
    assert report.groups == 1 and report.members == 12


def test_brute_force_agrees_with_the_search():
    rows = planted_rows()
    ids = sorted(rows)
    vectors = np.stack([rows[i][0] for i in ids])
    reference = duplicates.group_pairs(duplicates.brute_force_pairs(ids, vectors, 0.9, "COSINE", chunk=3))
    report = duplicates.find_duplicates(FakeIndex(rows), threshold=0.9, top_k=4)
    found = sorted(sorted(m["id"] for m in g["members"]) for g in duplicates.group_list(report.table))
    assert found == sorted(reference)


# -- the written table and its checks ------------------------------------------------------------------------


def test_the_report_is_written_as_parquet_atomically(tmp_path: Path):
    report = duplicates.find_duplicates(FakeIndex(planted_rows()), "new", threshold=0.9, top_k=4)
    path = layout.DropFiles(tmp_path, "new").duplicates
    duplicates.write_report(path, report)
    assert path == tmp_path / "duplicates" / "new.parquet"
    assert [p.name for p in path.parent.iterdir()] == ["new.parquet"]  # no temporary file left
    table = pq.read_table(path)
    assert table.column_names == duplicates.SCHEMA.names
    assert table.schema.metadata[b"threshold"] == b"0.9" and table.schema.metadata[b"metric"] == b"COSINE"


def test_table_problems_names_each_kind():
    report = duplicates.find_duplicates(FakeIndex(planted_rows()), "new", threshold=0.9, top_k=4)
    rows = report.table.to_pylist()
    rows.append({**rows[0], "group": 1, "representative": False})  # the same id in a second group
    rows.append({**rows[0], "id": "lonely", "group": 7, "link_score": 0.2, "representative": True})  # alone, far
    rows += [{**rows[0], "id": f"leaderless-{k}", "group": 8, "representative": False} for k in range(2)]
    broken = duplicates.pa.Table.from_pylist(rows, schema=duplicates.SCHEMA)
    known = {r["id"] for r in rows} - {"lonely"}
    problems = duplicates.table_problems(broken, 0.9, "COSINE", known_ids=known)
    assert problems["in_two_groups"] == [rows[0]["id"]]
    assert problems["groups_of_one"] == [7]
    assert problems["below_threshold"][0]["id"] == "lonely"
    assert problems["unknown_ids"] == ["lonely"]
    assert problems["not_one_representative"] == [8]
    assert not duplicates.table_problems(report.table, 0.9, "COSINE", known_ids=known)


# -- pagination ----------------------------------------------------------------------------------------------


def many_groups(count: int) -> duplicates.DuplicateReport:
    rng = np.random.default_rng(9)
    rows = {}
    for g in range(count):
        v = unit(rng.standard_normal(128))
        rows[f"g{g:02d}-a"] = (v, ["d"])
        rows[f"g{g:02d}-b"] = (unit(v + 0.05 * unit(rng.standard_normal(128))), ["d"])
    return duplicates.find_duplicates(FakeIndex(rows), "d", threshold=0.9, top_k=3)


def test_group_list_pages_never_overlap_and_cover_every_group():
    report = many_groups(7)
    pages = [duplicates.group_list(report.table, offset, 3) for offset in (0, 3, 6, 9)]
    assert [len(p) for p in pages] == [3, 3, 1, 0]
    numbers = [g["group"] for page in pages for g in page]
    assert numbers == list(range(7))
    with pytest.raises(ValueError):
        duplicates.group_list(report.table, -1, 3)
    page = duplicates.report_page(report, 6, 3)
    assert page["total_groups"] == 7 and page["offset"] == 6 and len(page["groups"]) == 1


class FakeDuplicates(DuplicatesService):
    """The real service's checks and paging over a report computed once (no Milvus)."""

    def __init__(self, settings: Settings, report: duplicates.DuplicateReport):
        super().__init__(settings)
        self.fixed = report
        self.asked: list[tuple[str | None, float | None]] = []

    def report(self, drop: str | None, threshold: float | None) -> duplicates.DuplicateReport:
        self.asked.append((drop, threshold))
        return self.fixed


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[TestClient, FakeDuplicates]]:
    settings = Settings(home=tmp_path / "home")
    files = layout.drop_files(settings, "d")
    files.manifest.parent.mkdir(parents=True)
    files.manifest.touch()
    fake = FakeDuplicates(settings, many_groups(5))
    services = ApiServices(None, None, None, lambda: {}, fake)
    with TestClient(create_app(settings, services, api_key=""), base_url="http://127.0.0.1") as client:
        yield client, fake


def test_api_pages_across_a_boundary(api):
    client, fake = api
    first = client.get("/duplicates", params={"drop": "d", "limit": 2})
    second = client.get("/duplicates", params={"drop": "d", "offset": 2, "limit": 2})
    last = client.get("/duplicates", params={"drop": "d", "offset": 4, "limit": 2, "threshold": 0.9})
    assert first.status_code == second.status_code == last.status_code == 200, first.text
    groups = [g["group"] for r in (first, second, last) for g in r.json()["groups"]]
    assert groups == [0, 1, 2, 3, 4]
    assert first.json()["total_groups"] == 5 and len(last.json()["groups"]) == 1
    assert fake.asked == [("d", None), ("d", None), ("d", 0.9)]
    member = first.json()["groups"][0]["members"][0]
    assert set(member) == {"id", "uri", "drop", "representative", "score", "link_score"}


def test_api_refuses_bad_parameters_in_the_error_shape(api):
    client, _ = api
    for params, status, code in (
        ({"limit": 0}, 422, "invalid_request"),
        ({"limit": 101}, 422, "invalid_request"),
        ({"offset": -1}, 422, "invalid_request"),
        ({"threshold": "nan"}, 422, "invalid_request"),
        ({"drop": "../etc"}, 422, "invalid_request"),
        ({"drop": "never-ingested"}, 404, "not_found"),
    ):
        response = client.get("/duplicates", params=params)
        assert response.status_code == status, (params, response.text)
        assert response.json()["error"]["code"] == code


def test_the_route_is_in_the_openapi_document(api):
    client, _ = api
    spec = client.get("/openapi.json").json()
    parameters = {p["name"] for p in spec["paths"]["/duplicates"]["get"]["parameters"]}
    assert parameters == {"drop", "threshold", "offset", "limit"}
