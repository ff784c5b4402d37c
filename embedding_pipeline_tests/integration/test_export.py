"""The Parquet export on real services: drops ingested through Dagster (real Triton, Milvus), exported by the CLI (one
drop, then ``--all``) and by the ``export_embeddings`` job, read back with pyarrow and checked row by row, every vector
included, against what Milvus holds."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from embedding_pipeline.index.client import ImageIndex
from embedding_pipeline.index.collections import ModelCollections
from embedding_pipeline.orchestration import runs
from embedding_pipeline.sources.samples import load_photo

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).with_name("embedding-pipeline"))
OTHER = "export-other"
FIELDS = ["id", "embedding", "uri", "drop", "drops", "sha256", "model", "metadata"]


@pytest.fixture(scope="module")
def two_drops(stack, ingested_photos, tmp_path_factory):
    """The session's ``photos`` drop and a second small drop with ids of its own."""
    folder = tmp_path_factory.mktemp("export") / OTHER
    folder.mkdir()
    rows = []
    for name in ("chelsea", "rocket"):
        Image.fromarray(load_photo(name)).save(folder / f"{name}.jpg", quality=90)
        rows.append({"id": f"{OTHER}-{name}", "uri": f"{name}.jpg", "metadata": {"category": "export", "n": 1}})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = runs.ingest(stack, folder, OTHER)
    assert summary["success"] and summary["ok"] == 2, summary
    return stack


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, "export", *args], capture_output=True, text=True, env=dict(os.environ), timeout=300)


def _stored(settings, ids=None) -> dict[str, dict]:
    """id -> row (vector included) of the collection search uses: the given ids, or every row."""
    with ModelCollections(settings.milvus) as collections:
        name = collections.search_collection()
    assert name
    with ImageIndex(settings.milvus.model_copy(update={"collection": name})) as index:
        if ids is None:
            ids = [r["id"] for r in index._iterate('id != ""', ["id"], strong=True)]
        return index.rows(ids, FIELDS)


def _check_against_milvus(settings, path: Path, expected_ids: set[str]) -> pa.Table:
    table = pq.read_table(path)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 1280)
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids
    stored = _stored(settings, ids)
    assert set(stored) == expected_ids
    vectors = np.asarray(table.column("embedding").combine_chunks().flatten(), dtype=np.float32).reshape(-1, 1280)
    for i, row in enumerate(table.to_pylist()):
        milvus = stored[row["id"]]
        assert np.allclose(vectors[i], np.asarray(milvus["embedding"], dtype=np.float32), rtol=0, atol=1e-7), row["id"]
        assert row["uri"] == milvus["uri"]
        assert json.loads(row["metadata"]) == milvus["metadata"]
        assert row["drops"] == list(milvus["drops"])
        assert (row["drop"], row["sha256"], row["model"]) == (milvus["drop"], milvus["sha256"], milvus["model"])
    return table


def test_cli_exports_a_drop_and_the_whole_collection_with_every_vector_as_stored(two_drops, tmp_path):
    settings = two_drops
    everything = _stored(settings)
    photos = {i for i, r in everything.items() if "photos" in r["drops"]}
    other = {i for i, r in everything.items() if OTHER in r["drops"]}
    assert len(photos) >= 10 and other == {f"{OTHER}-chelsea", f"{OTHER}-rocket"}

    out = tmp_path / "drop" / "photos.parquet"
    done = _cli("photos", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert f"wrote {len(photos)} rows" in done.stdout
    table = _check_against_milvus(settings, out, photos)
    assert all("photos" in drops for drops in table.column("drops").to_pylist())

    out_all = tmp_path / "all.parquet"
    done = _cli("--all", "--out", str(out_all))
    assert done.returncode == 0, done.stderr
    _check_against_milvus(settings, out_all, set(everything))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.parquet", "drop"]  # no temporary file left


def test_cli_refuses_an_unknown_drop_by_name_and_writes_nothing(two_drops, tmp_path):
    out = tmp_path / "x.parquet"
    done = _cli("photos", "no-such-drop", "--out", str(out))
    assert done.returncode != 0
    assert "no-such-drop" in done.stderr and "'photos'" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_export_job_writes_the_file_and_records_rows_bytes_and_path(two_drops, tmp_path):
    from dagster import DagsterInstance

    from embedding_pipeline.defs import defs

    out = two_drops.paths.root / "exports" / "job.parquet"
    job = defs.get_job_def("export_embeddings")
    config = {"ops": {"export_parquet": {"config": {"drops": [OTHER], "out": "job.parquet"}}}}
    with DagsterInstance.ephemeral() as instance:
        result = job.execute_in_process(run_config=config, instance=instance)
    assert result.success
    _check_against_milvus(two_drops, out, {f"{OTHER}-chelsea", f"{OTHER}-rocket"})
    meta = result.output_for_node("export_parquet")
    assert (meta["rows"], meta["bytes"], meta["path"]) == (2, out.stat().st_size, str(out))
    [materialized] = [e for e in result.all_node_events if e.is_successful_output and e.step_key == "export_parquet"]
    recorded = materialized.event_specific_data.metadata
    assert recorded["rows"].value == 2 and recorded["bytes"].value == out.stat().st_size
    assert recorded["path"].value == str(out)


def test_pages_never_skip_smaller_keys_stored_after_larger_ones(stack):
    """milvus-lite returns a limited query in storage order unless asked for key order: rows flushed first (large
    keys) then rows in the memtable (small keys) must still all be listed, in key order, page by page."""
    milvus = stack.milvus.model_copy(
        update={"collection": "export_paging", "index_type": "FLAT", "index_params": {}, "search_params": {}}
    )
    rng = np.random.default_rng(0)

    def rows(prefix: str) -> list[dict]:
        return [
            {
                "id": f"{prefix}{i}",
                "embedding": rng.standard_normal(8).astype(np.float32),
                "uri": f"{prefix}{i}.jpg",
                "sha256": "",
                "drop": "paging",
                "model": "m",
                "metadata": {},
            }
            for i in range(5)
        ]

    with ImageIndex(milvus) as index:
        try:
            index.ensure_collection(8)
            index.upsert(rows("c"))
            index.flush()
            index.upsert(rows("a"))
            pages = list(index.pages('id != ""', ["embedding"], page_rows=3))
            ids = [r["id"] for page in pages for r in page]
            assert ids == [f"a{i}" for i in range(5)] + [f"c{i}" for i in range(5)]
            assert [len(p) for p in pages] == [3, 3, 3, 1]
        finally:
            index.client.drop_collection("export_paging")
