"""`embedding-pipeline ingest` on the real stack: live progress per stage (bars on a terminal, plain lines
otherwise), a short summary, and none of Dagster's event lines on the console; the run's event log stays in the
instance."""

from __future__ import annotations

import io
import json

import pytest
from dagster import DagsterEventType, DagsterInstance

from embedding_pipeline import cli
from embedding_pipeline.cli import main
from embedding_pipeline.sources.samples import load_photo
from embedding_pipeline_tests.images import encode

pytestmark = pytest.mark.integration

PHOTOS = ("coffee", "rocket", "astronaut")


def _drop(folder):  # noqa: ANN001
    folder.mkdir()
    for name in PHOTOS:
        (folder / f"{name}.jpg").write_bytes(encode(load_photo(name), "JPEG", quality=90))
    return folder


def test_plain_progress_lines_and_json_summary_without_dagster_events(stack, tmp_path, capsys):
    assert main(["ingest", str(_drop(tmp_path / "progress-plain")), "--json"]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert summary["success"] and summary["ok"] == len(PHOTOS)
    for line in (
        "manifest: 3/3 items",
        "preprocess: 3/3 images (100%)",
        "embed: 3/3 images (100%)",
        "index: 3/3 rows (100%)",
    ):
        assert line in err, err
    assert "STEP_START" not in err + out and "DEBUG" not in err + out
    # The console was quiet, the instance was not: the run's events are all recorded.
    events = DagsterInstance.get().all_logs(summary["run_id"], of_type=DagsterEventType.STEP_SUCCESS)
    # The preprocess and embed stages are a plan, a step per shard (one for a small drop) and a commit.
    assert {e.step_key for e in events} >= {
        "raw_image_manifest",
        "preprocessed_batches.plan_preprocessing",
        "preprocessed_batches.preprocess_shard[shard_0000]",
        "preprocessed_batches.commit_preprocessing",
        "image_embeddings.plan_embedding",
        "image_embeddings.embed_shard[shard_0000]",
        "image_embeddings.commit_embedding",
        "milvus_collection",
    }
    # The step logs carry the progress lines too (what the UI shows while a long step runs).
    messages = [e.user_message for e in DagsterInstance.get().all_logs(summary["run_id"])]
    assert any(m.startswith("embed: 3/3 images") for m in messages)


def test_bars_on_a_terminal_and_a_readable_summary(stack, tmp_path, capsys, monkeypatch):
    class FakeTerminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = FakeTerminal()
    monkeypatch.setattr(cli.sys, "stderr", terminal)
    assert main(["ingest", str(_drop(tmp_path / "progress-bars"))]) == 0
    drawn = terminal.getvalue()
    assert "preprocess" in drawn and "3/3" in drawn and "images/s" in drawn
    assert "STEP_START" not in drawn
    out = capsys.readouterr().out
    assert out.startswith("drop progress-bars (ok, run ") and "3 items, 3 ok, 0 failed, 0 skipped" in out
