"""The data plane on real services: the bad-input corpus ingested beside good images, EXIF orientation through
the real model, and re-runs that are exactly-once (nothing duplicated, nothing recomputed, fixes picked up)."""

import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from embedding_pipeline import ingest
from embedding_pipeline.index.client import ImageIndex
from embedding_pipeline.orchestration import runs
from embedding_pipeline.preprocess import kernels
from embedding_pipeline.settings import CONFIG_ENV, load_settings
from embedding_pipeline_tests.corpus import FILES, build_drop, case_of, expected, template_rows
from embedding_pipeline_tests.http_servers import TestServer

pytestmark = pytest.mark.integration

DROP = "corpus"


@pytest.fixture(scope="module")
def corpus_run(stack, tmp_path_factory):
    """The corpus drop ingested once through the real Dagster job, with both test HTTP servers up."""
    work = tmp_path_factory.mktemp("corpus")
    mp = pytest.MonkeyPatch()
    with TestServer(FILES) as server, TestServer(FILES, url_host="localhost") as private:
        # Only the allowed server's own address and port; the "private" one is refused like any intranet host.
        config = yaml.safe_load(Path(os.environ[CONFIG_ENV]).read_text())
        config["sources"] = {
            "private_allowlist": [f"127.0.0.1:{server.port}"],
            "fetch_timeout_s": 1,
            "fetch_retries": 2,
            "max_image_bytes": 1_000_000,
        }
        path = work / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        mp.setenv(CONFIG_ENV, str(path))
        settings = load_settings()
        folder = build_drop(work / DROP, server.base_url, private.base_url, work / "outside")
        summary = runs.ingest(settings, folder, DROP)
        yield settings, summary, server, private
    mp.undo()


def test_every_case_gets_its_status_and_every_good_item_lands(corpus_run):
    settings, summary, server, private = corpus_run
    assert summary["success"], summary
    report = ingest.item_report(settings, DROP)
    rows = template_rows()
    assert len(report) == len(rows)
    want = expected()
    got = {}
    for row, item in zip(rows, report):
        got[case_of(row)] = (item["status"], item["error_kind"])
        if item["status"] != "ok":
            assert item["error"] and item["error"] != item["error_kind"]
    assert got == {case: (e["status"], e["error_kind"]) for case, e in want.items()}
    assert len(want) >= 25

    good = {item["id"] for item in report if item["status"] == "ok"}
    with ImageIndex(settings.milvus) as index:
        assert index.drop_ids(DROP) == good
    assert summary["ok"] == len(good) and summary["failed"] + summary["skipped"] == len(rows) - len(good)
    assert server.requests("/flaky/2/good-photo.jpg") == 3
    assert private.requests("/files/good-photo.jpg") == 0


def test_exif_rotated_images_embed_like_the_upright_original(corpus_run):
    settings = corpus_run[0]
    ids = ["good-upright.jpg"] + [f"good-orientation-{k}.jpg" for k in range(1, 9)]
    with ImageIndex(settings.milvus) as index:
        vectors = index.vectors(ids)
    upright = vectors["good-upright.jpg"]
    cosines = {i: float(vectors[i] @ upright) for i in ids[1:]}
    assert min(cosines.values()) >= 0.99, cosines


def test_rerun_changes_nothing_and_a_fix_adds_exactly_that_item(corpus_run, tmp_path):
    settings, first, _, _ = corpus_run
    with ImageIndex(settings.milvus) as index:
        before_ids = index.drop_ids(DROP)
        before = index.vectors(sorted(before_ids))
        total = index.count()

        again = runs.ingest(settings, settings.drops / DROP, DROP)
        assert again["success"] and again["ok"] == first["ok"]
        assert index.drop_ids(DROP) == before_ids and index.count() == total
        after = index.vectors(sorted(before_ids))
        assert all(np.array_equal(before[i], after[i]) for i in before_ids)
        meta = _latest_metadata("milvus_collection")
        assert meta["upserted"] == 0 and meta["unchanged"] == len(before_ids)
        assert _latest_metadata("preprocessed_batches")["images"] == 0  # nothing decoded or embedded again

        # Fix one bad file: exactly that item is added, nothing else is recomputed.
        (settings.drops / DROP / "bad-truncated.jpg").write_bytes((FILES / "good-grey.jpg").read_bytes())
        fixed = runs.ingest(settings, settings.drops / DROP, DROP)
        assert fixed["ok"] == first["ok"] + 1
        assert index.drop_ids(DROP) == before_ids | {"bad-truncated.jpg"}
        assert index.count() == total + 1
        assert _latest_metadata("preprocessed_batches")["images"] == 1
        assert _latest_metadata("milvus_collection")["upserted"] == 1


def test_the_kernel_compiled_once_in_this_process(corpus_run):
    # Every ingest in this test process used batches of 32 at 224x224 uint8: one trace, whatever the image sizes.
    assert kernels.traces[(224, 224, "uint8", False, 32)] == 1


def _latest_metadata(asset: str) -> dict:
    from dagster import AssetKey, DagsterInstance

    event = DagsterInstance.get().get_latest_materialization_event(AssetKey(asset))
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}
