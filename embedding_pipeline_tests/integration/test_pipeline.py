"""A drop of real photos through all four assets, real Triton, real Milvus, real Dagster execution."""

import json

import numpy as np
import pytest
from dagster import AssetKey, AssetRecordsFilter, DagsterInstance

from embedding_pipeline.index.client import ImageIndex
from embedding_pipeline.orchestration import runs
from embedding_pipeline.retrieval import ImageSearcher, search
from embedding_pipeline.sources.drops import READY_MARKER
from embedding_pipeline.sources.samples import load_photo, photo_names
from embedding_pipeline.storage import arrow, layout
from embedding_pipeline_tests.images import altered_copies

pytestmark = pytest.mark.integration

ASSETS = ["raw_image_manifest", "preprocessed_batches", "image_embeddings", "milvus_collection"]


def test_drop_materializes_all_four_assets(stack, ingested_photos):
    n = len(photo_names())
    assert n >= 10
    assert (ingested_photos["ok"], ingested_photos["failed"]) == (n, 0)
    instance = DagsterInstance.get()

    def latest(name: str):  # noqa: ANN202 - the latest materialization of the "photos" partition (other tests' drops
        # materialize the same assets in other partitions of this session's instance)
        records = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=AssetKey(name), asset_partitions=["photos"]), limit=1
        ).records
        return records[0].event_log_entry if records else None

    for name in ASSETS:
        event = latest(name)
        assert event is not None and event.run_id == ingested_photos["run_id"], name
        assert event.asset_materialization.partition == "photos"
    meta = latest("milvus_collection").asset_materialization.metadata
    assert meta["drop_rows"].value == n
    # Arrow outputs record shape, dtype and lineage.
    files = layout.drop_files(stack, "photos")
    tables = list(arrow.read_batches(files.preprocessed))
    assert sum(t.num_rows for t in tables) == n
    tensor_type = tables[0].schema.field("tensor").type
    assert list(tensor_type.shape) == [224, 224, 3] and str(tensor_type.value_type) == "uint8"
    emb = list(arrow.read_batches(files.embeddings))[0]
    assert emb.schema.field("embedding").type.list_size == 1280
    assert [m.split("@")[0] for m in set(emb.column("model").to_pylist())] == ["image_embedder:1"]


def test_milvus_holds_one_row_per_image_and_rerun_does_not_duplicate(stack, ingested_photos):
    n = len(photo_names())
    with ImageIndex(stack.milvus) as index:
        assert index.count_drop("photos") == n
        assert index.drop_ids("photos") == set(photo_names())
        assert index.describe_index()["index_type"] == "HNSW"
        summary = runs.ingest(stack, stack.drops / "photos")
        assert summary["success"] and summary["ok"] == n
        assert index.count_drop("photos") == n


def test_altered_copies_find_their_original_first(stack, ingested_photos):
    folder = stack.drops / "altered"
    folder.mkdir()
    expected = {}
    for name in photo_names():
        for kind, data in altered_copies(load_photo(name)).items():
            (folder / f"{name}-{kind}.jpg").write_bytes(data)
            expected[f"{name}-{kind}.jpg"] = name
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (folder / READY_MARKER).touch()
    summary = runs.ingest(stack, folder)
    assert summary["success"]
    assert summary["ok"] == len(expected) and summary["failed"] == 1
    assert "broken.jpg" in summary["failures"][0]["uri"]

    misses = []
    with ImageSearcher(stack) as searcher:
        for file, original in expected.items():
            hits = searcher.search(folder / file, top_k=3, filter='drop == "photos"')
            if hits[0].id != original:
                misses.append((file, [(h.id, round(h.score, 3)) for h in hits]))
    assert not misses


def test_search_api_returns_scores_uris_and_metadata(stack, ingested_photos):
    hits = search(stack.drops / "photos" / "coffee.jpg", top_k=5, settings=stack)
    assert hits[0]["id"] == "coffee" and hits[0]["score"] == pytest.approx(1.0, abs=1e-3)
    assert hits[0]["uri"].endswith("coffee.jpg")
    assert hits[0]["metadata"] == {"category": "food", "source": "sample"}
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)


def test_metadata_filter_limits_results(stack, ingested_photos):
    hits = search(load_photo("chelsea"), top_k=10, filter='metadata["category"] == "vehicles"', settings=stack)
    assert {h["id"] for h in hits} == {"rocket", "stereo_motorcycle"}


def test_stored_vectors_are_normalised(stack, ingested_photos):
    with ImageIndex(stack.milvus) as index:
        vectors = index.vectors(["chelsea", "coffee"])
    for v in vectors.values():
        assert v.shape == (1280,) and np.linalg.norm(v) == pytest.approx(1.0, abs=1e-4)


def test_manifest_drop_with_urls_and_bad_rows(stack, ingested_photos, tmp_path):
    rows = [
        {"id": "astro-copy", "uri": str(stack.drops / "photos" / "astronaut.jpg"), "metadata": {"category": "x"}},
        {"id": "nowhere", "uri": "/definitely/not/here.png"},
        {"id": "private-url", "uri": "http://127.0.0.1:1/a.jpg"},
    ]
    manifest = tmp_path / "mixed.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = runs.ingest(stack, manifest)
    assert summary["success"]
    assert (summary["ok"], summary["failed"]) == (1, 2), summary["failures"]
    errors = {f["id"]: f["error"] for f in summary["failures"]}
    assert "outside the allowed roots" in errors["nowhere"]
    assert "non-public address" in errors["private-url"]
    with ImageIndex(stack.milvus) as index:
        assert index.drop_ids("mixed.jsonl") == {"astro-copy"}
