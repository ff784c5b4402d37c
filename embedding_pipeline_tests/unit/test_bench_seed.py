"""The benchmark's own arithmetic, without servers: corpus layout, exact neighbours, recall, percentiles, options."""

import numpy as np
import pytest

from embedding_pipeline.bench import corpus, search, seed
from embedding_pipeline.cli import build_parser
from embedding_pipeline.settings import MilvusSettings


def _real(count: int, dim: int = 16, seed_: int = 1) -> np.ndarray:
    return corpus.normalise(np.random.default_rng(seed_).random((count, dim), dtype=np.float32))


def test_corpus_holds_real_rows_first_and_holds_out_queries():
    real = _real(50)
    photos = np.arange(50) % 5
    c = corpus.build(200, 16, real, photos, queries=100)
    assert c.size == 200 and c.real == 40 and len(c.queries) == 10  # a fifth of the real ones held out
    np.testing.assert_allclose(c.vectors[:40], real[:40], rtol=1e-6)
    np.testing.assert_allclose(c.queries, real[40:], rtol=1e-6)
    assert list(c.photos) == list(photos[:40]) and list(c.query_photos) == list(photos[40:])
    np.testing.assert_allclose(np.linalg.norm(c.vectors, axis=1), 1.0, rtol=1e-5)
    rows = c.rows(39, 41, "m:1")
    assert [r["metadata"]["kind"] for r in rows] == ["photo", "synthetic"]
    assert rows[0]["id"] == "v0000039" and rows[0]["metadata"]["category"] == "c9"


def test_synthetic_rows_sit_where_the_real_ones_do():
    """Distractors drawn around the real embeddings compete with them; plain Gaussian ones would not."""
    real = _real(200, dim=64)
    shaped = corpus.synthetic(500, 64, seed=0, like=real)
    plain = corpus.synthetic(500, 64, seed=0)
    assert float((shaped @ real.T).mean()) > 0.5
    assert abs(float((plain @ real.T).mean())) < 0.1


def test_corpus_of_another_dimension_is_synthetic_throughout():
    c = corpus.build(100, 8, _real(50), None, queries=20)
    assert c.real == 0 and c.query_kind == "synthetic" and len(c.queries) == 20 and c.dim == 8


def test_exact_neighbours_and_recall():
    vectors = _real(30)
    queries = corpus.normalise(vectors[[4, 7]] + 0.01)  # near rows 4 and 7
    c = corpus.Corpus(
        vectors, 30, queries, "real photo embeddings", photos=np.arange(30) % 3, query_photos=np.array([1, 0])
    )
    exact = search.exact_neighbours(c)
    assert exact.shape == (2, 10) and list(exact[:, 0]) == [4, 7]
    scores = queries @ vectors.T
    assert set(exact[0]) == set(np.argsort(-scores[0])[:10])
    perfect = [[c.row_id(int(r)) for r in exact[i]] for i in range(2)]
    assert search.recall(c, perfect)["recall_at_10"] == pytest.approx(1.0)
    outside = [c.row_id(i) for i in range(30) if i not in set(exact[1])][:5]
    figures = search.recall(c, [perfect[0], perfect[1][:5] + outside])
    assert figures["recall_at_10"] == pytest.approx(0.75) and figures["queries"] == 2
    assert figures["same_photo_top1"] == 0.5  # row 4 is photo 1 (asked), row 7 is photo 1 (query 2 says 0)


def test_latency_percentiles():
    figures = search.latency(list(range(1, 101)))
    assert figures["queries"] == 100 and figures["avg_ms"] == 50.5
    assert figures["p50_ms"] == pytest.approx(50.5) and figures["p99_ms"] == pytest.approx(99.01)


def test_filters_select_each_value_in_turn():
    make = search.filter_for("category")
    assert make(3) == ('metadata["category"] == "c3"', "c3")
    assert {search.filter_for("group")(i)[1] for i in range(10)} == set(corpus.KEY_VALUES["group"])


def test_index_type_override_takes_that_types_defaults():
    assert seed.index_overrides(MilvusSettings(), None) == {}
    assert seed.index_overrides(MilvusSettings(), "hnsw") == {}
    assert seed.index_overrides(MilvusSettings(), "IVF_FLAT") == {
        "index_type": "IVF_FLAT",
        "index_params": {},
        "search_params": {},
    }


def test_bad_options_are_refused_naming_the_option():
    with pytest.raises(ValueError, match="--stores"):
        seed.run(None, stores=["lite", "cloud"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="--sizes"):
        seed.run(None, sizes=[0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="--queries"):
        seed.run(None, queries=0)  # type: ignore[arg-type]


def test_bench_command_line():
    args = build_parser().parse_args(["bench", "--sizes", "10_000,100000", "--stores", "lite", "--index-type", "flat"])
    assert args.what is None and args.sizes == [10000, 100000] and args.stores == ["lite"]
    assert args.index_type == "FLAT" and args.queries == 1000
    assert build_parser().parse_args(["bench", "preprocess"]).what == "preprocess"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--sizes", "ten"])


def test_every_store_at_100k_and_more_is_held_to_the_search_targets():
    from embedding_pipeline.bench.seed import targets

    def run(store, size, p99, faiss_p99=2.0, build_ratio=1.2):
        return {
            "store": store,
            "size": size,
            "index_type": "HNSW",
            "insert": {
                "ours": {"vectors_per_s": 6000.0},
                "ratio_to_raw": 0.95,
                "target_vectors_per_s": 5000,
                "target_met": True,
            },
            "search": {
                "unfiltered": {"p99_ms": p99},
                "declared_filter_to_unfiltered_p99": 1.1,
                "target_declared_filter_ratio": 1.5,
                "declared_filter_target_met": True,
                "json_filter_to_unfiltered_p99": 2.5,
                "target_json_filter_ratio": 3.0,
                "json_filter_target_met": True,
            },
            "faiss_direct": {"search_p99_ratio": round(p99 / faiss_p99, 2), "build_ratio": build_ratio},
        }

    def named(result, what):
        return {t["where"]: (t["value"], t["met"]) for t in targets(result) if t["what"].startswith(what)}

    extraction = {"ratio_to_model_only": 0.8, "target_ratio": 0.6, "target_met": True}
    result = {
        "extraction": extraction,
        "runs": [run("lite", 10_000, 3.0), run("lite", 100_000, 60.0), run("standalone", 100_000, 8.5)],
    }
    assert named(result, "unfiltered search p99 ms") == {
        "lite 100,000": (60.0, False),
        "standalone 100,000": (8.5, True),
    }
    assert named(result, "unfiltered search p99 / FAISS") == {
        "lite 100,000": (30.0, False),
        "standalone 100,000": (4.25, False),
    }
    assert named(result, "index build / FAISS")["lite 10,000"] == (1.2, True)
    assert named(result, "insert, ours / raw")["lite 10,000"] == (0.95, True)
    assert named(result, "undeclared-key filter")["lite 10,000"] == (2.5, True)
    small = {"extraction": extraction, "runs": [run("lite", 10_000, 3.0)]}
    assert not named(small, "unfiltered search p99")
