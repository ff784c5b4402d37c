import json
import os
import time

import numpy as np

from embedding_pipeline.settings import SourceSettings
from embedding_pipeline.sources import drops
from embedding_pipeline.sources.items import collect_items, content_id
from embedding_pipeline_tests.images import encode

RED = encode(np.full((40, 60, 3), (200, 10, 10), dtype=np.uint8))
BLUE = encode(np.full((50, 30, 3), (10, 10, 200), dtype=np.uint8), "JPEG")


def _drop(path):
    return drops.Drop(path.name, path)


def test_folder_drop_items_ids_and_errors(tmp_path):
    d = tmp_path / "drop-a"
    (d / "sub").mkdir(parents=True)
    (d / "red.png").write_bytes(RED)
    (d / "sub" / "blue.jpg").write_bytes(BLUE)
    (d / "red-again.png").write_bytes(RED)  # same content, no id: one row
    (d / "notes.txt").write_text("not an image")
    (d / "notes.jpg").write_text("a text file named like an image is still an item")
    (d / "table.csv").write_text("a,b\n1,2\n")  # no uri column: data, not a manifest
    (d / ".hidden.png").write_bytes(RED)
    items = {i.uri.split("/")[-1]: i for i in collect_items(_drop(d), SourceSettings(), tmp_path / "blobs")}
    assert set(items) == {"red.png", "blue.jpg", "red-again.png", "notes.txt", "notes.jpg", "table.csv"}
    assert items["red.png"].id == content_id(items["red.png"].sha256) == items["red-again.png"].id
    pair = sorted([items["red.png"], items["red-again.png"]], key=lambda i: i.status)
    assert [(i.status, i.error_kind) for i in pair] == [("ok", ""), ("skipped", "duplicate")]
    for name in ("notes.txt", "table.csv"):
        assert (items[name].status, items[name].error_kind) == ("skipped", "ignored")
    assert (items["notes.jpg"].status, items["notes.jpg"].error_kind) == ("failed", "not_image")
    assert items["notes.jpg"].error == "text, not an image"
    assert items["blue.jpg"].status == "ok"


def test_manifest_rows_ids_metadata_and_per_row_errors(tmp_path):
    d = tmp_path / "drop-b"
    d.mkdir()
    (d / "red.png").write_bytes(RED)
    (d / "blue.jpg").write_bytes(BLUE)
    rows = [
        json.dumps({"id": "r1", "uri": "red.png", "metadata": {"category": "nature"}, "owner": "ann"}),
        "{not json",
        json.dumps({"id": "r1", "uri": "blue.jpg"}),  # duplicate id
        json.dumps({"id": "gone", "uri": "missing.png"}),
        json.dumps({"id": "escape", "uri": "../../etc/passwd"}),
        json.dumps({"id": "nouri"}),
    ]
    (d / "m.jsonl").write_text("\n".join(rows) + "\n")
    items = collect_items(_drop(d), SourceSettings(), tmp_path / "blobs")
    first = items[0]
    assert (first.id, first.status) == ("r1", "ok")
    assert first.metadata == {"category": "nature", "owner": "ann"}
    failed = {i.error_kind: i.error for i in items if i.status == "failed"}
    assert set(failed) == {"bad_row", "duplicate_id", "not_found", "outside_roots"}
    assert "duplicate id 'r1'" in failed["duplicate_id"]
    assert "file not found" in failed["not_found"]
    assert "outside the allowed roots" in failed["outside_roots"]
    bad_rows = sorted(i.error for i in items if i.error_kind == "bad_row")
    assert "invalid JSON on line 2" in bad_rows[0] and bad_rows[1] == "missing 'uri'"
    # blue.jpg is listed by the manifest, so it is not also a loose file.
    assert len(items) == 6


def test_csv_manifest_with_json_metadata(tmp_path):
    d = tmp_path / "drop-c"
    d.mkdir()
    (d / "red.png").write_bytes(RED)
    (d / "m.csv").write_text('id,uri,metadata,source\nx1,red.png,"{""category"": ""urban""}",cam\nx2,red.png,{bad,\n')
    items = {i.id: i for i in collect_items(_drop(d), SourceSettings(), tmp_path / "blobs")}
    assert items["x1"].metadata == {"category": "urban", "source": "cam"}
    assert items["x2"].status == "failed" and "metadata is not valid JSON" in items["x2"].error
    assert items["x2"].error_kind == "bad_metadata"


def test_urls_to_private_addresses_are_refused_by_default(tmp_path):
    d = tmp_path / "drop-d"
    d.mkdir()
    (d / "m.jsonl").write_text(json.dumps({"id": "u", "uri": "http://127.0.0.1:9/x.png"}) + "\n")
    (item,) = collect_items(_drop(d), SourceSettings(), tmp_path / "blobs")
    assert (item.status, item.error_kind) == ("failed", "refused_address")
    assert "non-public address (127.0.0.1)" in item.error


def test_drop_completeness(tmp_path):
    root = tmp_path / "drops"
    (root / "ready").mkdir(parents=True)
    (root / "ready" / "a.png").write_bytes(RED)
    (root / "ready" / drops.READY_MARKER).touch()
    (root / "fresh").mkdir()
    (root / "fresh" / "a.png").write_bytes(RED)
    (root / "old.jsonl").write_text("")
    past = time.time() - 3600
    os.utime(root / "old.jsonl", (past, past))
    (root / "bad name!").mkdir()
    (root / ".copying.tmp").mkdir()
    found, invalid = drops.scan(root)
    assert {d.name for d in found} == {"ready", "fresh", "old.jsonl"}
    assert invalid == ["bad name!"]
    assert {d.name for d in drops.complete_drops(root, settle_s=60)} == {"ready", "old.jsonl"}
    assert {d.name for d in drops.complete_drops(root, settle_s=0)} == {"ready", "fresh", "old.jsonl"}


def test_rows_milvus_cannot_hold_fail_alone(tmp_path):
    d = tmp_path / "drop-big"
    d.mkdir()
    (d / "red.png").write_bytes(RED)
    rows = [
        {"id": "x" * 600, "uri": "red.png"},
        {"id": "huge", "uri": "red.png", "metadata": {"blob": "y" * 70_000}},
        {"id": "fine", "uri": "red.png"},
    ]
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = collect_items(_drop(d), SourceSettings(), tmp_path / "blobs")
    assert [(i.status, i.error_kind) for i in items] == [("failed", "bad_row"), ("failed", "bad_metadata"), ("ok", "")]
    assert len(items[0].id) < 100 and "longer than 512" in items[0].error
