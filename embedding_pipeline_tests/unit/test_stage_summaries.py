"""Stage summaries are typed, and ``as_dict()`` is the metadata the assets have always shown: same keys, same order."""

from dataclasses import FrozenInstanceError
from types import SimpleNamespace

import pytest

from embedding_pipeline import ingest
from embedding_pipeline_tests.unit.test_ingest_stages import MODEL_INPUT, FakeEmbedder, settings  # noqa: F401

FAILURES = ["failures_by_kind", "failure_examples"]
INDEX_WRITE = [
    "upserted",
    "unchanged",
    "removed_stale",
    "kept_for_transient_failures",
    "deleted_rows",
    "kept_for_other_drops",
    "joined_shared_rows",
    "id_conflicts",
    "id_conflict_examples",
    "drop_rows",
    "collection",
    "collection_rows",
    "metadata_type_mismatches",
]


class FakeIndex:
    """One collection in memory, with the calls the index stage makes."""

    collection = "images__fake_1"

    def __init__(self):
        self.stored: dict[str, dict] = {}
        self.type_mismatches: list = []

    def exists(self):
        return bool(self.stored)

    def ensure_collection(self, dim):
        pass

    def drop_rows(self, drop):
        return {i: r for i, r in self.stored.items() if drop in r["drops"]}

    def rows(self, ids, fields):
        return {i: self.stored[i] for i in ids if i in self.stored}

    def upsert(self, rows):
        self.stored.update({r["id"]: r for r in rows})
        return len(rows)

    def release(self, drop, ids):
        for i in ids:
            del self.stored[i]
        return len(ids), 0

    def flush(self):
        pass

    def count_drop(self, drop, consistency_level=None):
        return len(self.drop_rows(drop))

    def count(self):
        return len(self.stored)

    def close(self):
        pass


class FakeCollections:
    """A model's collection behind a search alias that still points at another model's collection."""

    def __init__(self):
        self.index = FakeIndex()

    def index_for_model(self, model, dim):
        return self.index, SimpleNamespace(search_collection="images__old_1", switch_pending=True)

    def remove_drop(self, drop, keep):
        return 0

    def search_collection(self):
        return "images__old_1"


def test_stage_summaries_keep_their_keys_in_order(settings):  # noqa: F811
    manifest = ingest.build_manifest(settings, "d1")
    assert list(manifest.as_dict()) == ["items", "ok", "failed", "skipped", "bytes", "seconds", *FAILURES]
    assert manifest.as_dict()["failures_by_kind"] == manifest.failures_by_kind == {"not_image": 1}
    with pytest.raises(FrozenInstanceError):
        manifest.ok = 0  # type: ignore[misc]

    pre = ingest.preprocess_drop(settings, "d1", MODEL_INPUT, "fake:1")
    assert list(pre.as_dict()) == [
        "images",
        "reused",
        "kept_previous",
        "failed",
        "batches",
        "bytes",
        "tensor",
        "seconds",
        "images_per_s",
        "shards",
        *FAILURES,
    ]
    assert pre.as_dict()["tensor"] == pre.tensor == "HWC uint8 [16, 16, 3]"

    emb = ingest.embed_drop(settings, "d1", FakeEmbedder())
    assert list(emb.as_dict()) == [
        "embeddings",
        "computed",
        "reused",
        "kept_previous",
        "dimension",
        "model",
        "bytes",
        "seconds",
        "inference_seconds",
        "images_per_s",
        "shards",
    ]

    report = ingest.report_summary(ingest.item_report(settings, "d1"))
    assert report.as_dict() == {
        "items_total": 4,
        "items_ok": 3,
        "items_failed": 1,
        "items_skipped": 0,
        "items_reused": 0,
        "items_kept_previous": 0,
        "failures_by_kind": {"not_image": 1},
        "failure_examples": [{**manifest.failure_examples[0]}],
    }


def test_index_summary_reports_what_each_kind_of_target_knows(settings):  # noqa: F811
    ingest.build_manifest(settings, "d1")
    ingest.preprocess_drop(settings, "d1", MODEL_INPUT, "fake:1")

    collections = FakeCollections()
    empty = ingest.index_drop(settings, "d1", collections)  # nothing embedded yet
    assert list(empty.as_dict()) == [
        "upserted",
        "unchanged",
        "removed_stale",
        "drop_rows",
        "collection",
        "search_collection",
        "seconds",
    ]
    assert (empty.collection, empty.search_collection, empty.switch_pending) == ("", "images__old_1", None)

    ingest.embed_drop(settings, "d1", FakeEmbedder())
    placed = ingest.index_drop(settings, "d1", collections)
    assert list(placed.as_dict()) == [
        *INDEX_WRITE,
        "model",
        "search_collection",
        "switch_pending",
        "seconds",
        "vectors_per_s",
    ]
    assert (placed.upserted, placed.drop_rows, placed.model, placed.switch_pending) == (3, 3, "fake:1", True)

    plain = ingest.index_drop(settings, "d1", collections.index)  # one named collection: no model placement
    assert list(plain.as_dict()) == [*INDEX_WRITE, "seconds", "vectors_per_s"]
    assert (plain.upserted, plain.unchanged, plain.vectors_per_s) == (0, 3, 0.0)
