"""The benchmark commands run and report coherent figures (small sizes: the figures themselves are for humans)."""

from pathlib import Path

import pytest

from embedding_pipeline.bench import ingest as bench_ingest
from embedding_pipeline.bench import preprocess as bench_preprocess
from embedding_pipeline.cli import main
from embedding_pipeline.index.client import ImageIndex

pytestmark = pytest.mark.integration


def test_bench_preprocess_reports_rates_and_ratios(stack):
    result = bench_preprocess.run(stack, count=64, seconds=1.0)
    for key in ("preprocess_images_per_s", "pillow_1_thread_images_per_s", "model_onnxruntime_images_per_s"):
        assert result[key] > 0, key
    assert result["compilations"] <= 1  # 0 when an earlier test in this process compiled the same kernel
    assert result["tensor"] == "HWC uint8 [224, 224, 3]"
    ratio = result["preprocess_images_per_s"] / result["model_onnxruntime_images_per_s"]
    assert result["ratio_preprocess_to_model"] == pytest.approx(ratio, rel=0.01)
    assert "preprocessing / model" in bench_preprocess.render(result)


def test_bench_ingest_reports_peak_memory_of_both_drops(stack, capsys):
    assert main(["bench", "ingest", "--images", "60", "--baseline-images", "20"]) == 0
    out = capsys.readouterr().out
    assert "success: True" in out and "60 indexed" in out and "peak RSS, 20 images (baseline)" in out
    with ImageIndex(stack.milvus.model_copy(update={"collection": bench_ingest.COLLECTION})) as index:
        assert not index.exists()  # the benchmark cleans up after itself


def test_bench_quality_finds_originals_of_altered_copies_through_the_pipeline(stack):
    from embedding_pipeline.bench import copy_detection

    result = copy_detection.run(stack, limit=12, alterations=("mirror", "jpeg", "crop"))
    assert (result["images"], result["queries"]) == (12, 36)
    assert list(result["recipes"]) == ["crop", "pad"]  # the baseline first
    base = result["recipes"]["crop"]
    assert set(base["per_alteration"]) == {"mirror", "jpeg", "crop"}
    assert base["ingest_cost_vs_baseline"] == base["query_p50_vs_baseline"] == 1.0
    # A mirrored copy among twelve originals is found at rank 1 (measured 1.00 on the full set).
    assert base["per_alteration"]["mirror"]["rank1"] >= 0.9
    for recipe in result["recipes"].values():
        overall = recipe["overall"]
        assert overall["queries"] == 36 and 0 <= overall["rank1"] <= overall["recall5"] <= 1
        assert overall["rank1"] <= overall["map"] <= 1
    text = copy_detection.render(result)
    assert "rank-1" in text and "targets" in text
    for recipe in ("crop", "pad"):
        with ImageIndex(stack.milvus.model_copy(update={"collection": f"{copy_detection.COLLECTION}_{recipe}"})) as i:
            assert not i.exists()  # the benchmark cleans up after itself


def test_bench_runs_every_section_on_both_stores_and_leaves_nothing_running(tmp_path, monkeypatch, capsys):
    """The full benchmark at small sizes, through the CLI, on fresh servers in a temporary home of its own."""
    import json

    from embedding_pipeline.bench import seed
    from embedding_pipeline.bench.servers import processes_using
    from embedding_pipeline.runtime.state import HOME_ENV
    from embedding_pipeline.settings import CONFIG_ENV

    config = tmp_path / "embedding_pipeline.yaml"
    config.write_text("{}\n")  # defaults only, whatever configuration the developer has lying around
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "home"))
    monkeypatch.setenv(CONFIG_ENV, str(config))
    argv = ["bench", "--sizes", "2000", "--queries", "100", "--images", "128", "--stores", "lite,standalone", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"config", "extraction", "runs", "targets", "all_targets_met", "cleanup", "seconds"} <= set(result)

    ext = result["extraction"]
    assert ext["images"] == 128 and ext["dim"] == 1280 and ext["tensor"] == "HWC uint8 [224, 224, 3]"
    for key in ("seconds", "images_per_s", "ms_per_image", "model_only_images_per_s"):
        assert ext[key] > 0, key
    assert ext["ratio_to_model_only"] == pytest.approx(ext["images_per_s"] / ext["model_only_images_per_s"], rel=0.01)
    assert ext["ms_per_image"] == pytest.approx(1000 / ext["images_per_s"], rel=0.01)

    assert [(r["store"], r["size"]) for r in result["runs"]] == [("lite", 2000), ("standalone", 2000)]
    for run in result["runs"]:
        where = run["store"]
        assert run["index_type"] == "HNSW" and run["index_params"] == {"M": 16, "efConstruction": 256}, where
        ours, raw = run["insert"]["ours"], run["insert"]["raw_pymilvus"]
        assert ours["rows"] == raw["rows"] == 2000, where
        assert ours["vectors_per_s"] > 0 and raw["vectors_per_s"] > 0 and run["index_build"]["seconds"] >= 0, where
        assert run["index_build"]["indexed_rows"] >= 2000, where
        s = run["search"]
        for kind in ("unfiltered", "filtered_declared", "filtered_json_path", "numpy_brute_force"):
            f = s[kind]
            assert f["queries"] == 100, (where, kind)
            assert 0 < f["p50_ms"] <= f["p95_ms"] <= f["p99_ms"] and f["avg_ms"] > 0, (where, kind)
        assert s["unfiltered"]["short_results"] == 0, where  # 10 hits every time
        m = s["more_like_this"]  # by id against by the same vector, same collection, same queries
        assert m["by_id"]["queries"] == m["by_vector"]["queries"] == 100, where
        ratio = m["by_id"]["p50_ms"] / m["by_vector"]["p50_ms"]
        assert m["by_id_to_by_vector_p50"] == pytest.approx(ratio, rel=0.01), where
        for kind in ("filtered_declared", "filtered_json_path"):
            # An engine may return fewer than 10 filtered hits (Milvus 2.3's HNSW sometimes does): counted, reported.
            assert 0 <= s[kind]["short_results"] <= 100, (where, kind)
        # Every filtered hit really carries the value asked for.
        assert s["filtered_declared"]["wrong_hits"] == 0 and s["filtered_json_path"]["wrong_hits"] == 0, where
        # The declared key runs on its typed column, the undeclared one on its mirror.
        assert "meta_category" in s["filtered_declared"]["run_as"], where
        assert "m__group" in s["filtered_json_path"]["run_as"], where
        # 8 queries per call, and FAISS on the same vectors and parameters beside every figure.
        assert s["batched"]["batch"] == 8 and 0 < s["batched"]["p50_ms"] <= s["batched"]["p99_ms"], where
        direct = run["faiss_direct"]
        assert direct["index_type"] == "HNSW" and direct["build_seconds"] > 0 and direct["search"]["queries"] == 100
        assert direct["search_p99_ratio"] > 0 and direct["build_ratio"] >= 0, where
        # The embedded server's memory high-water mark (the standalone server runs behind a forwarder: not read).
        assert run["server_peak_rss_mb"] > 0 if where == "lite" else run["server_peak_rss_mb"] is None, where
        recall = s["recall"]
        # HNSW (M 16, ef 64) on 2,000 rows against exact search: anything below 0.9 is a broken index or search.
        assert 0.9 <= recall["recall_at_10"] <= 1.0, where
        assert recall["vectors"] == "real photo embeddings" and recall["queries"] == 25, where
        assert recall["real_rows"] == 128 - 25 and recall["synthetic_rows"] == 2000 - 103, where
        # Real embeddings: a photo variant's nearest stored neighbour is mostly a variant of the same photo.
        assert recall["same_photo_top1"] >= 0.8, where

    # One extraction target, then per run: insert rate and ratio, both filter ratios, build ratio, recall; each says
    # whether it was met (the search p99 targets start at 100k vectors).
    assert len(result["targets"]) == 1 + 6 * len(result["runs"])
    assert all(isinstance(t["met"], bool) and t["target"] for t in result["targets"])
    assert result["all_targets_met"] == all(t["met"] for t in result["targets"])

    # Nothing left behind: no process using the temporary home, the home itself gone.
    home = result["cleanup"]["home"]
    assert result["cleanup"] == {"home": home, "home_removed": True, "leftover_pids": []}
    assert not Path(home).exists() and processes_using(Path(home)) == []
    assert not list((tmp_path / "home").glob("bench-*"))

    text = seed.render(result)
    assert "end to end / model only" in text and "recall@10 vs exact" in text and "Targets met:" in text
