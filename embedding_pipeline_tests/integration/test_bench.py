"""The benchmark commands run and report coherent figures (small sizes: the figures themselves are for humans)."""

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
