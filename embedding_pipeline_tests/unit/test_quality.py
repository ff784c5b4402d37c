"""The data-quality checks on small in-memory embeddings and a fake index."""

from dataclasses import dataclass

import numpy as np
import pytest

from embedding_pipeline import quality
from embedding_pipeline.settings import MilvusSettings
from embedding_pipeline.storage import arrow
from embedding_pipeline.vectors import sound_vectors, unit_normalised

MODEL = "image_embedder:1@abc"


def unit_vectors(n: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def table(ids: list[str], vectors: np.ndarray, model: str = MODEL):
    rows = {
        "id": ids,
        "drop": ["d"] * len(ids),
        "sha256": ["0" * 64] * len(ids),
        "uri": [f"/{i}" for i in ids],
        "model": [model] * len(ids),
        "metadata": ["{}"] * len(ids),
    }
    return arrow.embedding_table(rows, vectors, arrow.embedding_schema(vectors.shape[1]))


def test_sound_embeddings_pass_every_check():
    ids = [f"img{i}" for i in range(6)]
    stats = quality.stats_of_tables([table(ids[:4], unit_vectors(4)), table(ids[4:], unit_vectors(2, seed=1))])
    outcomes = quality.embedding_outcomes(stats, ids, 8, MODEL)
    assert [o.check for o in outcomes] == [
        "embeddings_match_ok_items",
        "dimension_matches_model",
        "vectors_are_finite",
        "vectors_are_normalised",
    ]
    assert all(o.passed for o in outcomes), [o.description for o in outcomes if not o.passed]
    assert stats.files == 2 and stats.rows == 6
    assert outcomes[0].metadata["expected"] == outcomes[0].metadata["actual"] == 6
    assert outcomes[3].metadata["norm_min"] == pytest.approx(1.0, abs=1e-6)


def test_count_check_names_missing_unexpected_and_duplicate_ids():
    stats = quality.stats_of_tables([table(["a", "b", "b", "x"], unit_vectors(4))])
    outcome = quality.count_matches_items(stats, ["a", "b", "c"])
    assert not outcome.passed
    assert outcome.metadata == {
        "expected": 3,
        "actual": 4,
        "missing_ids": ["c"],
        "unexpected_ids": ["x"],
        "duplicate_ids": ["b"],
    }
    assert "expected 3 embedding(s)" in outcome.description and "found 4" in outcome.description


def test_empty_drop_passes_with_zero_embeddings():
    stats = quality.stats_of_tables([])
    outcomes = quality.embedding_outcomes(stats, [], 1280, MODEL)
    assert all(o.passed for o in outcomes)
    assert outcomes[0].metadata["actual"] == 0


def test_nan_and_inf_vectors_are_named():
    vectors = unit_vectors(4)
    vectors[1, 3] = np.nan
    vectors[2, 0] = np.inf
    stats = quality.stats_of_tables([table(["a", "b", "c", "d"], vectors)])
    finite = quality.vectors_are_finite(stats)
    assert not finite.passed
    assert finite.metadata == {"non_finite": 2, "non_finite_ids": ["b", "c"]}
    # The norm check judges the finite vectors only: the bad ones are reported once, by the finite check.
    assert quality.vectors_are_normalised(stats).passed


def test_vectors_off_unit_norm_fail_with_their_norms():
    vectors = unit_vectors(3)
    vectors[0] *= 2.0
    vectors[2] *= 1.0005  # within the tolerance
    outcome = quality.vectors_are_normalised(quality.stats_of_tables([table(["a", "b", "c"], vectors)]))
    assert not outcome.passed
    assert outcome.metadata["off_norm_ids"] == {"a": pytest.approx(2.0, abs=1e-5)}
    assert outcome.metadata["norm_max"] == pytest.approx(2.0, abs=1e-5)
    assert "a (2)" in outcome.description


def test_a_model_that_does_not_normalise_fails_only_on_zero_vectors():
    vectors = unit_vectors(3) * np.array([[2.0], [0.5], [0.0]], dtype=np.float32)
    stats = quality.stats_of_tables([table(["a", "b", "zero"], vectors)])
    strict = quality.vectors_are_normalised(stats)
    assert not strict.passed and "set quality.unit_norm: false" in strict.description
    relaxed = quality.vectors_are_normalised(stats, unit_norm=False)
    assert not relaxed.passed
    assert relaxed.metadata["zero_norm_ids"] == ["zero"] and relaxed.metadata["off_norm"] == 0
    fine = quality.stats_of_tables([table(["a", "b"], vectors[:2])])
    assert quality.vectors_are_normalised(fine, unit_norm=False).passed


def test_sound_vectors_marks_nan_and_unnormalised_rows():
    vectors = unit_vectors(4)
    vectors[1] *= 3
    vectors[3, 0] = np.nan
    assert sound_vectors(vectors).tolist() == [True, False, True, False]
    assert sound_vectors(vectors, unit_norm=False).tolist() == [True, True, True, False]
    assert sound_vectors(np.zeros((1, 4)), unit_norm=False).tolist() == [False]


def test_dimension_check_against_model_and_settings():
    stats = quality.stats_of_tables([table(["a"], unit_vectors(1, dim=8)), table(["b"], unit_vectors(1, dim=4))])
    outcome = quality.dimension_matches_model(stats, 8, MODEL)
    assert not outcome.passed
    assert outcome.metadata["dimensions"] == {"4": 1, "8": 1} and outcome.metadata["expected_dimension"] == 8
    assert "1 vector(s) are not 8-d" in outcome.description

    same = quality.stats_of_tables([table(["a"], unit_vectors(1, dim=8))])
    assert quality.dimension_matches_model(same, 8, MODEL).passed
    wrong_setting = quality.dimension_matches_model(same, 8, MODEL, configured_dimension=512)
    assert not wrong_setting.passed and "milvus.embedding_dim is 512" in wrong_setting.description


def test_dimension_check_refuses_vectors_of_another_model():
    stats = quality.stats_of_tables([table(["a", "b"], unit_vectors(2), model="old_model:1")])
    outcome = quality.dimension_matches_model(stats, 8, MODEL)
    assert not outcome.passed
    assert outcome.metadata["models"] == {"old_model:1": 2} and outcome.metadata["served_model"] == MODEL
    assert "re-run the drop" in outcome.description


def test_embedding_stats_reads_a_drop_folder(tmp_path):
    folder = tmp_path / "embeddings" / "d"
    with arrow.DropWriter(folder) as writer:
        writer.write(table(["a", "b"], unit_vectors(2)))
        writer.commit()
    stats = quality.embedding_stats(folder)
    assert (stats.files, stats.rows, set(stats.ids)) == (1, 2, {"a", "b"})
    assert quality.embedding_stats(tmp_path / "missing").rows == 0


def test_ok_item_ids_keeps_only_ok_items():
    report = [{"id": "a", "status": "ok"}, {"id": "b", "status": "failed"}, {"id": "c", "status": "skipped"}]
    assert quality.ok_item_ids(report) == ["a"]


# -- collection ------------------------------------------------------------------------------------------------


def test_row_count_check_reports_expected_and_actual():
    assert quality.rows_match_embeddings(3, {"a", "b", "c"}, ["a", "b", "c"]).passed
    outcome = quality.rows_match_embeddings(2, {"a", "z"}, ["a", "b", "c"])
    assert not outcome.passed
    assert outcome.metadata == {"expected": 3, "actual": 2, "missing_ids": ["b", "c"], "unexpected_ids": ["z"]}
    assert "expected 3 row(s)" in outcome.description and "holds 2" in outcome.description
    # Too many rows to list: counts alone decide.
    assert not quality.rows_match_embeddings(2, None, ["a", "b", "c"]).passed
    assert quality.rows_match_embeddings(3, None, ["a", "b", "c"]).passed


def test_index_check_fills_in_the_type_defaults():
    ivf = MilvusSettings(index_type="IVF_FLAT")
    expected = quality.expected_index(ivf)
    assert expected == {"index_type": "IVF_FLAT", "metric_type": "COSINE", "params": {"nlist": 128}}
    # Engines report parameters as text; they compare as numbers.
    described = {"index_type": "IVF_FLAT", "metric_type": "COSINE", "params": {"nlist": "128"}, "state": "Finished"}
    assert quality.index_as_configured(described, expected).passed


def test_index_check_names_each_difference():
    expected = quality.expected_index(MilvusSettings())
    described = {"index_type": "HNSW", "metric_type": "L2", "params": {"M": 8, "efConstruction": 256}}
    outcome = quality.index_as_configured(described, expected)
    assert not outcome.passed
    assert "metric_type is 'L2', configured 'COSINE'" in outcome.description
    assert "params.M is 8, configured 16" in outcome.description
    assert outcome.metadata["expected"]["params"] == {"M": 16, "efConstruction": 256}
    assert outcome.metadata["actual"]["metric_type"] == "L2"
    missing = quality.index_as_configured(None, expected)
    assert not missing.passed and "does not exist" in missing.description


@dataclass(frozen=True)
class FakeHit:
    id: str
    score: float


class FakeIndex:
    """A fake vector index: exact inner-product search over a dict of vectors, optionally with a broken search
    that always answers with one fixed id (what a wrong index or metric looks like from outside)."""

    def __init__(self, vectors: dict[str, np.ndarray], broken: bool = False):
        self.stored = vectors
        self.broken = broken
        self.search_kwargs: dict = {}

    def vectors(self, ids):
        return {i: self.stored[i] for i in ids if i in self.stored}

    def search(self, vectors, top_k=10, **kwargs):
        self.search_kwargs = kwargs
        ids = list(self.stored)
        matrix = np.stack([self.stored[i] for i in ids])
        results = []
        for query in np.atleast_2d(vectors):
            if self.broken:
                results.append([FakeHit("always_this", 0.5)])
                continue
            scores = matrix @ query
            order = np.argsort(-scores)[:top_k]
            results.append([FakeHit(ids[k], float(scores[k])) for k in order])
        return results


def test_self_retrieval_passes_on_an_exact_index_and_samples_deterministically():
    ids = [f"img{i:03d}" for i in range(40)]
    index = FakeIndex(dict(zip(ids, unit_vectors(40, dim=16))))
    outcome = quality.self_retrieval(index, ids, consistency_level="Strong")
    assert outcome.passed, outcome.description
    assert outcome.metadata["sampled"] == outcome.metadata["found_at_rank_1"] == quality.SELF_RETRIEVAL_SAMPLE
    assert outcome.metadata["sample_ids"] == quality.sample_ids(reversed(ids))  # order-independent
    assert outcome.metadata["sample_ids"][0] == "img000" and outcome.metadata["sample_ids"][-1] != "img015"
    assert index.search_kwargs == {"consistency_level": "Strong"}


def test_self_retrieval_counts_an_identical_twin_as_rank_1():
    vectors = unit_vectors(3, dim=16)
    index = FakeIndex({"a": vectors[0], "a_copy": vectors[0].copy(), "b": vectors[1], "c": vectors[2]})
    outcome = quality.self_retrieval(index, ["a", "a_copy", "b"])
    assert outcome.passed, outcome.description
    assert outcome.metadata["ties_at_rank_1"] == 2


def test_self_retrieval_accepts_a_full_list_of_ties():
    # More identical copies than candidates asked for: the own id may be ranked just beyond the list.
    vector = unit_vectors(1, dim=16)[0]
    index = FakeIndex({f"copy{i:02d}": vector.copy() for i in range(quality.SELF_RETRIEVAL_TOP_K + 3)})
    outcome = quality.self_retrieval(index, ["copy12"])
    assert outcome.passed and outcome.metadata["ties_at_rank_1"] == 1


def test_self_retrieval_fails_on_a_broken_index_and_shows_what_came_back():
    ids = ["a", "b", "c"]
    outcome = quality.self_retrieval(FakeIndex(dict(zip(ids, unit_vectors(3))), broken=True), ids)
    assert not outcome.passed
    assert outcome.metadata["misses"]["a"] == [["always_this", 0.5]]
    assert "3 of 3 sampled vector(s) did not find their own id" in outcome.description


def test_self_retrieval_skips_ids_the_index_no_longer_has():
    index = FakeIndex({"a": unit_vectors(1)[0]})
    outcome = quality.self_retrieval(index, ["a", "gone"])
    assert outcome.passed
    assert outcome.metadata["sampled"] == 1 and outcome.metadata["not_in_index"] == ["gone"]
    assert quality.self_retrieval(index, []).metadata["sampled"] == 0


class FakeCollection(FakeIndex):
    """A fake collection client: the fake index plus counts by drop and a described index."""

    def __init__(self, vectors, drops: dict[str, str], described: dict | None, exists: bool = True):
        super().__init__(vectors)
        self.drops, self.described, self.present = drops, described, exists
        self.settings = MilvusSettings()
        self.filters: list[tuple[str, str | None]] = []

    def exists(self):
        return self.present

    def count(self, filter="", consistency_level=None):
        self.filters.append((filter, consistency_level))
        return len(self.ids(filter))

    def ids(self, filter="", consistency_level=None, limit=16384):
        drop = filter.split("==")[1].strip().strip('"')
        return {i for i, d in self.drops.items() if d == drop}

    def describe_index(self):
        return self.described


HNSW_DEFAULT = {"index_type": "HNSW", "metric_type": "COSINE", "params": {"M": 16, "efConstruction": 256}}


def test_collection_outcomes_read_strongly_and_pass_on_a_consistent_drop():
    ids = ["a", "b", "c"]
    index = FakeCollection(dict(zip(ids, unit_vectors(3))), {i: "d" for i in ids}, HNSW_DEFAULT)
    outcomes = quality.collection_outcomes(index, "d", ids)
    assert [o.check for o in outcomes] == ["rows_match_embeddings", "index_as_configured", "self_retrieval"]
    assert all(o.passed for o in outcomes)
    assert index.filters == [('drop == "d"', "Strong")] and index.search_kwargs == {"consistency_level": "Strong"}


def test_collection_outcomes_without_a_collection():
    empty = FakeCollection({}, {}, None, exists=False)
    assert all(o.passed for o in quality.collection_outcomes(empty, "d", []))
    missing = quality.collection_outcomes(empty, "d", ["a"])
    assert [o.passed for o in missing] == [False, False, True]
    assert missing[0].metadata["missing_ids"] == ["a"]


def test_unit_normalised_scales_rows_and_leaves_broken_ones_for_the_checks():
    vectors = np.array([[3.0, 4.0], [0.0, 0.0], [np.nan, 1.0]], dtype=np.float32)
    out = unit_normalised(vectors)
    np.testing.assert_allclose(out[0], [0.6, 0.8], rtol=1e-6)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[1], [0.0, 0.0])  # a zero vector has no direction: the norm check fails it
    assert np.isnan(out[2, 0])  # non-finite stays non-finite: the finite check names it
    assert sound_vectors(out).tolist() == [True, False, False]
