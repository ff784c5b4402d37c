"""The search options every surface shares (retrieval.ranked): minimum score, offset pages, collapsed
near-duplicates, the item itself left out; and Hit read both ways. Runs on a fake index that ranks exactly."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedding_pipeline.index import params
from embedding_pipeline.index.client import Hit, UnknownItem
from embedding_pipeline.retrieval import ranked, stored_vector
from embedding_pipeline.settings import MilvusSettings


class FakeIndex:
    """An exact (brute-force) index over given vectors, ranking as Milvus does for its metric, with the same
    ``search``/``rows`` calls as ImageIndex; counts the searches and the largest limit asked for."""

    def __init__(self, vectors: dict[str, np.ndarray], metric: str = "COSINE"):
        self.vectors = vectors
        self.settings = MilvusSettings(metric_type=metric)
        self.collection = "fake"
        self.searches: list[int] = []
        self.reads: list[tuple[str, list[str]]] = []
        self.fresh: set[str] = set()

    def search(self, vector: Any, top_k: int = 10, **_: Any) -> list[list[Hit]]:
        self.searches.append(top_k)
        ids = list(self.vectors)
        if not ids:
            return [[]]
        metric = self.settings.metric_type
        matrix = np.stack([self.vectors[i] for i in ids])
        scores = params.pair_scores(matrix, np.asarray(vector).reshape(1, -1), metric)[:, 0]
        order = sorted(
            range(len(ids)), key=lambda k: (-scores[k] if params.higher_is_better(metric) else scores[k], ids[k])
        )
        return [[Hit(id=ids[k], score=float(scores[k])) for k in order[:top_k]]]

    def rows(self, ids: Any, fields: Any, consistency_level: str = "Strong") -> dict[str, dict[str, Any]]:
        self.reads.append((consistency_level, sorted(ids)))
        # Rows written "moments ago" are seen only by a Strong read.
        seen = {i for i in self.vectors if consistency_level == "Strong" or i not in self.fresh}
        return {i: {"id": i, "embedding": self.vectors[i].tolist()} for i in ids if i in seen}


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


def _random_index(n: int, dim: int = 8, seed: int = 0, metric: str = "COSINE") -> FakeIndex:
    rng = np.random.default_rng(seed)
    return FakeIndex({f"i{k:03d}": _unit(rng.standard_normal(dim)) for k in range(n)}, metric)


def test_hit_reads_as_attributes_and_as_a_read_only_mapping():
    hit = Hit(id="a", score=0.5, uri="/x/a.jpg", drop="d", metadata={"k": 1})
    assert hit["id"] == hit.id == "a" and hit.get("uri") == "/x/a.jpg" and hit.get("nope") is None
    assert dict(hit) == hit.as_dict() and hit == hit.as_dict() and "score" in hit
    assert json.dumps(dict(hit)) == json.dumps(hit.as_dict())
    assert "duplicates" not in hit
    with pytest.raises(TypeError):
        hit["id"] = "b"


@pytest.mark.parametrize("metric", ["COSINE", "IP", "L2"])
def test_min_score_means_at_least_as_good_for_every_metric(metric):
    index = _random_index(50, metric=metric)
    query = index.vectors["i000"]
    everything = ranked(index, query, 50)
    cut = everything[10].score  # the 11th best score
    kept = ranked(index, query, 50, min_score=cut)
    assert [h.id for h in kept] == [h.id for h in everything[: len(kept)]] and len(kept) >= 11
    assert all(params.passes(metric, h.score, cut) for h in kept)
    assert not any(params.passes(metric, h.score, cut) for h in everything[len(kept) :])


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 40),
    top_k=st.integers(1, 12),
    quantile=st.one_of(st.none(), st.floats(0, 1)),
    exclude=st.booleans(),
    metric=st.sampled_from(["COSINE", "IP", "L2"]),
)
def test_pages_tile_the_cut_ranking_exactly(n, top_k, quantile, exclude, metric):
    index = _random_index(n, seed=n, metric=metric)
    query = _unit(np.ones(8, dtype=np.float32))
    skip = "i000" if exclude and n else None
    full = [h for h in index.search(query, max(n, 1))[0] if h.id != skip]
    min_score = None
    if quantile is not None and full:
        min_score = full[int(quantile * (len(full) - 1))].score
        full = [h for h in full if params.passes(metric, h.score, min_score)]
    pages: list[Hit] = []
    offset = 0
    while True:
        page = ranked(index, query, top_k, min_score=min_score, offset=offset, exclude=skip)
        assert len(page) <= top_k
        pages += page
        if len(page) < top_k:
            break
        offset += top_k
    assert [h.id for h in pages] == [h.id for h in full]


def test_collapse_folds_planted_near_copies_and_still_returns_top_k_distinct():
    rng = np.random.default_rng(3)
    vectors: dict[str, np.ndarray] = {}
    for k in range(12):
        base = _unit(rng.standard_normal(16))
        vectors[f"photo{k:02d}"] = base
        for c in range(3):  # three near-copies of each photo
            vectors[f"photo{k:02d}-copy{c}"] = _unit(base + 0.02 * rng.standard_normal(16).astype(np.float32))
    index = FakeIndex(vectors)
    query = vectors["photo00"]
    plain = ranked(index, query, 5)
    assert [h.id.split("-")[0] for h in plain].count("photo00") == 4  # the copies fill the top of the ranking
    folded = ranked(index, query, 5, collapse=0.95)
    assert len(folded) == 5 and len({h.id.split("-")[0] for h in folded}) == 5
    assert folded[0].id.startswith("photo00") and len(folded[0].duplicates or ()) == 3
    assert all(
        h.duplicates is not None and all(d.split("-")[0] == h.id.split("-")[0] for d in h.duplicates) for h in folded
    )
    # Page 2 of the collapsed ranking continues it: no photo twice across pages.
    second = ranked(index, query, 5, offset=5, collapse=0.95)
    assert not {h.id.split("-")[0] for h in second} & {h.id.split("-")[0] for h in folded}
    assert folded[0].as_dict()["duplicates"] == list(folded[0].duplicates or ())


def test_collapse_fetches_more_candidates_until_enough_distinct_hits():
    rng = np.random.default_rng(5)
    base = _unit(rng.standard_normal(16))
    # 200 copies of one photo, then 5 distinct photos: the first window is all copies.
    vectors = {f"copy{k:03d}": _unit(base + 0.001 * rng.standard_normal(16).astype(np.float32)) for k in range(200)}
    vectors.update({f"other{k}": _unit(rng.standard_normal(16)) for k in range(5)})
    index = FakeIndex(vectors)
    hits = ranked(index, base, 3, collapse=0.95)
    assert len(hits) == 3 and hits[0].id.startswith("copy") and len(hits[0].duplicates or ()) == 199
    assert len(index.searches) > 1 and max(index.searches) <= params.MAX_RESULT_WINDOW


def test_the_item_itself_is_left_out_of_a_search_by_its_id_unless_asked():
    index = _random_index(20)
    vector = stored_vector(index, "i007")
    assert ranked(index, vector, 3)[0].id == "i007"
    assert "i007" not in [h.id for h in ranked(index, vector, 3, exclude="i007")]
    assert len(ranked(index, vector, 3, exclude="i007")) == 3
    with pytest.raises(UnknownItem, match="'nope'"):
        stored_vector(index, "nope")


def test_search_reads_are_bounded_and_only_ids_not_seen_are_read_again_strong():
    index = _random_index(10)
    index.fresh = {"i003"}  # written moments ago: a Bounded read does not see it yet
    assert stored_vector(index, "i001").shape == (8,)
    assert index.reads == [("Bounded", ["i001"])]  # found: no Strong read
    index.reads.clear()
    assert stored_vector(index, "i003").shape == (8,)
    assert index.reads == [("Bounded", ["i003"]), ("Strong", ["i003"])]
    index.reads.clear()
    with pytest.raises(UnknownItem):
        stored_vector(index, "nope")
    assert index.reads == [("Bounded", ["nope"]), ("Strong", ["nope"])]  # unknown only after a Strong read
    index.reads.clear()
    hits = ranked(index, index.vectors["i000"], 5, collapse=0.99)
    assert hits and index.reads[0][0] == "Bounded" and all(r[0] == "Bounded" or r[1] == ["i003"] for r in index.reads)


def test_window_and_argument_limits():
    index = _random_index(3)
    with pytest.raises(ValueError, match="offset"):
        ranked(index, index.vectors["i000"], 10, offset=-1)
    with pytest.raises(ValueError, match="at most 16384"):
        ranked(index, index.vectors["i000"], 10, offset=16380)
    assert ranked(index, index.vectors["i000"], 10, offset=5) == []


@pytest.mark.parametrize("metric", ["COSINE", "IP", "L2"])
def test_pair_scores_follow_the_metric(metric):
    a = np.array([1.0, 0.0], dtype=np.float32)
    b = np.array([[0.6, 0.8], [2.0, 0.0]], dtype=np.float32)
    scores = params.pair_scores(b, a[None, :], metric)[:, 0]
    expected = {"COSINE": [0.6, 1.0], "IP": [0.6, 2.0], "L2": [0.16 + 0.64, 1.0]}[metric]
    assert np.allclose(scores, expected)
    assert params.passes(metric, 0.5, 0.5) and params.higher_is_better(metric) == (metric != "L2")
