"""``bench integrity`` measures both guards against the unguarded way in one run and reports them in context."""

from embedding_pipeline.bench import integrity
from embedding_pipeline.settings import load_settings


def test_bench_integrity_reports_ratios_measured_in_the_same_run(tmp_path):
    settings = load_settings(environ={"EMBEDDING_PIPELINE_HOME": str(tmp_path)})
    result = integrity.run(settings, images=96, reps=2)
    read, write = result["read"], result["write"]
    assert result["images"] == 96 and write["batches"] == 3 and write["megabytes"] > 0
    assert read["plain_s"] > 0 and read["guarded_s"] > 0 and write["page_cache_s"] > 0 and write["fsync_s"] > 0
    assert abs(read["ratio"] - read["guarded_s"] / read["plain_s"]) <= 0.01 * read["ratio"] + 0.005
    assert abs(write["ratio"] - write["fsync_s"] / write["page_cache_s"]) <= 0.01 * write["ratio"] + 0.005
    # The share is what both guards add, measured in this run, over the stage (noise may make it slightly negative
    # on a drop this small; it is the arithmetic that must hold).
    added = (read["guarded_s"] - read["plain_s"]) + (write["fsync_s"] - write["page_cache_s"])
    assert result["preprocess_stage_s"] > 0
    assert abs(result["added_share_of_preprocess_stage"] - added / result["preprocess_stage_s"]) < 0.01
    assert not list(tmp_path.glob("bench-integrity-*"))  # its drop and outputs are removed
    text = integrity.render(result)
    assert "guarded reads" in text and "fsync'd writes" in text and "preprocess stage" in text
