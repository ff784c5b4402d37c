"""The ingest stages as plain functions, with a fake embedder standing in for Triton."""

import numpy as np
import pytest

from embedding_pipeline import ingest
from embedding_pipeline.settings import load_settings
from embedding_pipeline.storage import arrow, layout
from embedding_pipeline_tests.images import encode

MODEL_INPUT = ("UINT8", (16, 16, 3))


class FakeEmbedder:
    """Mean colour per image, L2-normalised like a real model's output, as a 3-d 'embedding' (a fake: no model,
    no server). Counts what it embeds."""

    def __init__(self):
        self.embedded = 0

    def embed(self, batch: np.ndarray) -> np.ndarray:
        self.embedded += len(batch)
        colours = batch.reshape(len(batch), -1, 3).mean(axis=1).astype(np.float32)
        return colours / np.linalg.norm(colours, axis=1, keepdims=True)

    def model_version_label(self) -> str:
        return "fake:1"


@pytest.fixture
def settings(tmp_path):
    s = load_settings(environ={"EMBEDDING_PIPELINE_HOME": str(tmp_path)})
    s = s.model_copy(update={"preprocess": s.preprocess.model_copy(update={"batch_size": 2})})
    drop = s.drops / "d1"
    drop.mkdir(parents=True)
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        (drop / f"img{i}.png").write_bytes(encode(np.full((30 + i, 40, 3), colour, np.uint8)))
    (drop / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return s


def test_stages_write_arrow_with_lineage_and_report_failures(settings):
    manifest = ingest.build_manifest(settings, "d1")
    assert (manifest.items, manifest.ok, manifest.failed) == (4, 3, 1)
    assert manifest.failure_examples[0]["error"]

    pre = ingest.preprocess_drop(settings, "d1", MODEL_INPUT, "fake:1")
    assert (pre.images, pre.batches, pre.failed) == (3, 2, 0)
    emb = ingest.embed_drop(settings, "d1", FakeEmbedder())
    assert (emb.embeddings, emb.dimension, emb.model) == (3, 3, "fake:1")

    tables = list(arrow.read_batches(layout.drop_files(settings, "d1").embeddings))
    vectors = np.concatenate([arrow.vectors_of(t) for t in tables])
    uris = sum((t.column("uri").to_pylist() for t in tables), [])
    # Each row's vector is its own image's colour: rows and tensors stayed aligned through the stages.
    for uri, v in zip(uris, vectors):
        assert np.argmax(v) == int(uri[-5])
    assert all(t.column("drop").to_pylist() == ["d1"] * t.num_rows for t in tables)


def test_a_file_changed_after_the_manifest_is_not_embedded_under_the_old_hash(settings):
    ingest.build_manifest(settings, "d1")
    (settings.drops / "d1" / "img0.png").write_bytes(encode(np.zeros((20, 20, 3), np.uint8)))
    pre = ingest.preprocess_drop(settings, "d1", MODEL_INPUT, "fake:1")
    assert pre.images == 2 and pre.failed == 1
    # Rewritten in place: its modification time no longer matches the listing (the hash check stands behind it).
    assert "since the drop was listed" in pre.failure_examples[0]["error"]
    assert pre.failures_by_kind == {"source_changed": 1}


def test_rerun_reuses_vectors_and_recomputes_only_changed_items(settings):
    ingest.build_manifest(settings, "d1")
    ingest.preprocess_drop(settings, "d1", MODEL_INPUT, "fake:1")
    first = FakeEmbedder()
    ingest.embed_drop(settings, "d1", first)
    assert first.embedded == 3

    # Unchanged drop: nothing is decoded or embedded again, every vector is carried over.
    ingest.build_manifest(settings, "d1")
    pre = ingest.preprocess_drop(settings, "d1", MODEL_INPUT, "fake:1")
    again = FakeEmbedder()
    emb = ingest.embed_drop(settings, "d1", again)
    assert (pre.images, pre.reused, again.embedded, emb.embeddings) == (0, 3, 0, 3)

    # Fix the broken file: only that one is computed.
    (settings.drops / "d1" / "bad.png").write_bytes(encode(np.full((20, 20, 3), 128, np.uint8)))
    ingest.build_manifest(settings, "d1")
    pre = ingest.preprocess_drop(settings, "d1", MODEL_INPUT, "fake:1")
    fixed = FakeEmbedder()
    emb = ingest.embed_drop(settings, "d1", fixed)
    assert (pre.images, pre.reused, fixed.embedded, emb.embeddings) == (1, 3, 1, 4)

    # Another model version: everything is recomputed.
    pre = ingest.preprocess_drop(settings, "d1", MODEL_INPUT, "fake:2")
    assert (pre.images, pre.reused) == (4, 0)

    report = {r["id"]: r for r in ingest.item_report(settings, "d1")}
    assert len(report) == 4 and all(r["status"] == "ok" for r in report.values())


def test_a_file_swapped_for_a_fifo_between_stages_fails_its_item_at_once(settings):
    import os
    import time

    ingest.build_manifest(settings, "d1")
    source = settings.drops / "d1" / "img1.png"
    source.unlink()
    os.mkfifo(source)  # opening it for reading without O_NONBLOCK would wait for a writer forever
    started = time.monotonic()
    pre = ingest.preprocess_drop(settings, "d1", MODEL_INPUT, "fake:1")
    assert time.monotonic() - started < 60
    assert pre.images == 2 and pre.failures_by_kind == {"source_changed": 1}
    assert "not_a_file" in pre.failure_examples[0]["error"]


def test_a_file_replaced_by_a_link_out_of_the_drop_or_by_another_file_is_refused(settings, tmp_path):
    ingest.build_manifest(settings, "d1")
    outside = tmp_path / "secret.png"
    drop = settings.drops / "d1"
    outside.write_bytes((drop / "img0.png").read_bytes())  # the very same bytes: only the path gives it away
    (drop / "img0.png").unlink()
    (drop / "img0.png").symlink_to(outside)
    # Same bytes again under a new inode: the file listed is not the file read.
    data = (drop / "img2.png").read_bytes()
    (drop / "img2.png").unlink()
    (drop / "img2.png").write_bytes(data)
    pre = ingest.preprocess_drop(settings, "d1", MODEL_INPUT, "fake:1")
    assert pre.images == 1 and pre.failures_by_kind == {"source_changed": 2}
    errors = " ".join(f["error"] for f in pre.failure_examples)
    assert "outside_roots" in errors and "replaced since the drop was listed" in errors


def test_a_damaged_blob_is_written_again(tmp_path):
    import hashlib

    from embedding_pipeline.sources.items import _blob_intact, blob_path

    data = encode(np.zeros((8, 8, 3), np.uint8))
    sha = hashlib.sha256(data).hexdigest()
    path = blob_path(tmp_path, sha)
    assert not _blob_intact(path, sha, len(data))
    path.parent.mkdir(parents=True)
    path.write_bytes(data[:-1] + b"\x00")
    assert not _blob_intact(path, sha, len(data))
    path.write_bytes(data)
    assert _blob_intact(path, sha, len(data))


def test_a_stage_waits_for_the_drops_lock_held_by_a_deletion(settings):
    import threading
    import time

    from embedding_pipeline.runtime.locks import drop_lock

    done = threading.Event()
    with drop_lock(settings.paths.locks, "d1"):  # what retention holds while it deletes the drop
        worker = threading.Thread(target=lambda: (ingest.build_manifest(settings, "d1"), done.set()))
        worker.start()
        time.sleep(0.5)
        assert not done.is_set()  # the stage waits
    worker.join(30)
    assert done.is_set() and layout.drop_files(settings, "d1").manifest.is_file()
