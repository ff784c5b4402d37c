"""The asset checks on real runs: real Triton, real Milvus, the real `ingest_drop` job in the session's instance.

A good drop passes all seven checks; damaged embeddings fail the blocking checks and `milvus_collection` of that run
never starts; rows deleted from Milvus fail the row-count check; re-running the drop repairs what can be repaired.
"""

import json
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from dagster import AssetCheckKey, AssetKey, DagsterEventType, DagsterInstance
from PIL import Image

from embedding_pipeline import quality
from embedding_pipeline.defs import defs
from embedding_pipeline.defs.checks import COLLECTION_CHECKS, EMBEDDING_CHECKS
from embedding_pipeline.index.client import ImageIndex
from embedding_pipeline.sources.drops import READY_MARKER
from embedding_pipeline.sources.samples import load_photo
from embedding_pipeline.storage import arrow, layout

pytestmark = pytest.mark.integration

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "coins", "flower"]
EMBEDDINGS, COLLECTION = AssetKey("image_embeddings"), AssetKey("milvus_collection")
EMBEDDING_CHECK_KEYS = {AssetCheckKey(EMBEDDINGS, name) for name in EMBEDDING_CHECKS}
COLLECTION_CHECK_KEYS = {AssetCheckKey(COLLECTION, name) for name in COLLECTION_CHECKS}


def place_drop(settings, drop: str) -> list[str]:
    """A drop of six photos and one broken file, with ids of its own (another drop may hold the same photos);
    returns the ids of the good items."""
    folder = settings.drops / drop
    folder.mkdir(parents=True)
    rows = []
    for name in PHOTOS:
        Image.fromarray(load_photo(name)).save(folder / f"{name}.jpg", quality=90)
        rows.append({"id": f"{drop}-{name}", "uri": f"{name}.jpg"})
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    rows.append({"id": f"{drop}-broken", "uri": "broken.jpg"})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / READY_MARKER).touch()
    instance = DagsterInstance.get()
    instance.add_dynamic_partitions("drops", [drop])
    return [f"{drop}-{name}" for name in PHOTOS]


def execute(drop: str, assets=None, checks=None):
    """Run the `ingest_drop` job for ``drop``, whole or only the given assets and checks, in the session's instance."""
    job = defs.resolve_job_def("ingest_drop")
    if assets is not None or checks is not None:
        job = job.get_subset(asset_selection=set(assets or ()), asset_check_selection=set(checks or ()))
    return job.execute_in_process(
        instance=DagsterInstance.get(), partition_key=drop, tags={"drop": drop}, raise_on_error=False
    )


def evaluations(result) -> dict[str, object]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def meta(evaluation) -> dict[str, object]:
    return {key: value.value for key, value in evaluation.metadata.items()}


def started_steps(result) -> set[str]:
    return {e.step_key for e in result.all_events if e.event_type == DagsterEventType.STEP_START}


def materialized(result) -> set[str]:
    return {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}


@pytest.fixture(scope="module")
def good_drop(stack):
    drop = f"qc-good-{uuid.uuid4().hex[:6]}"
    ids = place_drop(stack, drop)
    result = execute(drop)
    return drop, ids, result


def test_good_drop_passes_every_check(stack, good_drop):
    drop, ids, result = good_drop
    assert result.success
    found = evaluations(result)
    assert set(found) == set(EMBEDDING_CHECKS) | set(COLLECTION_CHECKS)
    for name, evaluation in found.items():
        assert evaluation.passed, (name, meta(evaluation))
        assert evaluation.partition == drop  # recorded per drop, not for the asset as a whole
    assert found["embeddings_match_ok_items"].blocking and not found["rows_match_embeddings"].blocking

    count = meta(found["embeddings_match_ok_items"])
    assert (count["expected"], count["actual"], count["missing_ids"]) == (6, 6, [])  # the broken file is no ok item
    dim = meta(found["dimension_matches_model"])
    assert dim["expected_dimension"] == 1280 and dim["dimensions"] == {"1280": 6}
    assert list(dim["models"]) == [dim["served_model"]] and dim["served_model"].startswith("image_embedder:1")
    assert meta(found["vectors_are_finite"])["non_finite"] == 0
    norms = meta(found["vectors_are_normalised"])
    assert norms["off_norm"] == 0 and abs(norms["norm_min"] - 1) < 1e-4 and abs(norms["norm_max"] - 1) < 1e-4

    rows = meta(found["rows_match_embeddings"])
    assert (rows["expected"], rows["actual"]) == (6, 6)
    index = meta(found["index_as_configured"])
    assert (
        index["actual"]
        == index["expected"]
        == {"index_type": "HNSW", "metric_type": "COSINE", "params": {"M": 16, "efConstruction": 256}}
    )
    retrieval = meta(found["self_retrieval"])
    assert retrieval["sampled"] == retrieval["found_at_rank_1"] == 6 and sorted(retrieval["sample_ids"]) == sorted(ids)

    # The instance keeps each check's result for the drop's partition (what the UI's check history shows).
    history = DagsterInstance.get().event_log_storage.get_asset_check_execution_history(
        AssetCheckKey(EMBEDDINGS, "vectors_are_finite"), limit=5
    )
    assert any(r.run_id == result.run_id and r.partition == drop for r in history)


def damage_embeddings(settings, drop: str) -> tuple[str, str]:
    """Rewrite the drop's embeddings file as valid Arrow with NaN in the first vector and the second row gone;
    returns (id with NaN, id removed)."""
    [path] = arrow.batch_files(layout.drop_files(settings, drop).embeddings)
    table = arrow.read_table(path)
    vectors = arrow.vectors_of(table).copy()
    ids = table.column("id").to_pylist()
    vectors[0, 7] = np.nan
    keep = [k for k in range(table.num_rows) if k != 1]
    rows = {
        name: [table.column(name)[k].as_py() for k in keep]
        for name in ("id", "drop", "sha256", "uri", "model", "metadata")
    }
    damaged = arrow.embedding_table(rows, vectors[keep], table.schema)
    tmp = Path(f"{path}.tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(damaged)
    tmp.replace(path)
    return ids[0], ids[1]


@pytest.fixture(scope="module")
def damaged_drop(stack):
    """A drop ingested once, then its embeddings damaged, then its embeddings checks and `milvus_collection` run
    together (no re-embedding, so the damage is what the checks see)."""
    drop = f"qc-damaged-{uuid.uuid4().hex[:6]}"
    ids = place_drop(stack, drop)
    assert execute(drop).success
    with ImageIndex(stack.milvus) as index:
        before = index.vectors(ids)
    nan_id, removed_id = damage_embeddings(stack, drop)
    result = execute(drop, assets=[COLLECTION], checks=EMBEDDING_CHECK_KEYS)
    return drop, ids, nan_id, removed_id, before, result


def test_damaged_embeddings_fail_the_blocking_checks_and_indexing_is_skipped(stack, damaged_drop):
    drop, ids, nan_id, removed_id, before, result = damaged_drop
    found = evaluations(result)
    assert set(found) == set(EMBEDDING_CHECKS)

    count = found["embeddings_match_ok_items"]
    assert not count.passed
    assert meta(count)["expected"] == 6 and meta(count)["actual"] == 5 and meta(count)["missing_ids"] == [removed_id]
    finite = found["vectors_are_finite"]
    assert not finite.passed and meta(finite)["non_finite_ids"] == [nan_id]
    assert nan_id in finite.description
    assert found["dimension_matches_model"].passed and found["vectors_are_normalised"].passed

    # Blocking: the check step fails, `milvus_collection` never starts and nothing is materialized.
    assert not result.success
    assert result.is_node_failed("image_embeddings_checks")
    assert "milvus_collection" not in started_steps(result) and result.is_node_untouched("milvus_collection")
    assert COLLECTION.to_user_string() not in materialized(result)
    failure = result.get_step_failure_events()[0].step_failure_data.error
    assert "blocking asset check" in failure.message
    # ... so the index still holds the drop as it was: the removed row is not deleted, no NaN was written.
    with ImageIndex(stack.milvus) as index:
        assert index.count_drop(drop) == 6
        after = index.vectors([nan_id, removed_id])
    assert np.isfinite(after[nan_id]).all()
    np.testing.assert_allclose(after[nan_id], before[nan_id], atol=1e-6)


def test_rerun_repairs_damaged_embeddings(stack, damaged_drop):
    """A damaged stored vector is never reused: a re-run computes it again and the checks pass."""
    drop = damaged_drop[0]
    result = execute(drop)
    found = evaluations(result)
    assert all(e.passed for e in found.values()), {n: e.description for n, e in found.items() if not e.passed}
    assert result.success and COLLECTION.to_user_string() in materialized(result)


def test_rerun_restores_a_removed_embedding(stack, good_drop):
    """A row missing from the embeddings (not damaged) is recomputed by a re-run: the checks pass again."""
    drop, ids, _ = good_drop
    [path] = arrow.batch_files(layout.drop_files(stack, drop).embeddings)
    table = arrow.read_table(path)
    removed = table.column("id")[0].as_py()
    tmp = Path(f"{path}.tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table.slice(1))
    tmp.replace(path)
    blocked = execute(drop, assets=[COLLECTION], checks=EMBEDDING_CHECK_KEYS)
    assert meta(evaluations(blocked)["embeddings_match_ok_items"])["missing_ids"] == [removed]
    assert "milvus_collection" not in started_steps(blocked)

    result = execute(drop)
    found = evaluations(result)
    assert result.success and all(e.passed for e in found.values()), {n: e.description for n, e in found.items()}
    assert meta(found["embeddings_match_ok_items"])["actual"] == 6


def test_deleted_milvus_rows_fail_the_row_count_check(stack, good_drop):
    drop, ids, _ = good_drop
    deleted = sorted(ids)[:2]
    with ImageIndex(stack.milvus) as index:
        assert index.delete_ids(deleted) == 2
        index.flush()
    result = execute(drop, assets=[], checks=COLLECTION_CHECK_KEYS)
    # Not blocking: the failure is recorded on the asset, the run itself succeeds (nothing downstream to stop).
    assert result.success
    found = evaluations(result)
    rows = found["rows_match_embeddings"]
    assert not rows.passed
    assert (meta(rows)["expected"], meta(rows)["actual"], meta(rows)["missing_ids"]) == (6, 4, deleted)
    assert "expected 6 row(s)" in rows.description and "holds 4" in rows.description
    # Self-retrieval samples what is stored: the four remaining rows each find themselves; the deleted ones are not
    # searched for.
    retrieval = found["self_retrieval"]
    assert retrieval.passed
    assert meta(retrieval)["sampled"] == 4 and not set(meta(retrieval)["sample_ids"]) & set(deleted)
    assert found["index_as_configured"].passed

    # A re-run of the drop writes the missing rows back.
    repaired = execute(drop)
    assert repaired.success
    assert all(e.passed for e in evaluations(repaired).values())
    assert meta(evaluations(repaired)["rows_match_embeddings"])["actual"] == 6


@pytest.mark.parametrize("engine", ["stack", "standalone_milvus"])
def test_collection_checks_on_each_engine(engine, request):
    """The collection checks against milvus-lite and a real Milvus 2.3.5: an IVF_FLAT index (the type's default
    build parameters filled in), Strong reads right after a delete, and a wrong parameter named."""
    server = request.getfixturevalue(engine)
    base = server.milvus if engine == "stack" else server.settings
    name = f"qc_{uuid.uuid4().hex[:8]}"
    settings = base.model_validate(
        {**base.model_dump(exclude_unset=True), "collection": name, "index_type": "IVF_FLAT", "metric_type": "IP"}
    )
    vectors = np.random.default_rng(7).normal(size=(40, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"v{i:02d}" for i in range(40)]
    with ImageIndex(settings) as index:
        try:
            index.ensure_collection(32)
            index.upsert([{"id": i, "embedding": v, "drop": "d", "model": "m"} for i, v in zip(ids, vectors)])
            index.flush()
            outcomes = {o.check: o for o in quality.collection_outcomes(index, "d", ids)}
            assert all(o.passed for o in outcomes.values()), {k: o.description for k, o in outcomes.items()}
            assert outcomes["index_as_configured"].metadata["actual"] == {
                "index_type": "IVF_FLAT",
                "metric_type": "IP",
                "params": {"nlist": 128},
            }
            assert outcomes["self_retrieval"].metadata["sampled"] == quality.SELF_RETRIEVAL_SAMPLE

            index.delete_ids(ids[:3])
            after = {o.check: o for o in quality.collection_outcomes(index, "d", ids)}
            assert not after["rows_match_embeddings"].passed
            assert after["rows_match_embeddings"].metadata["missing_ids"] == ids[:3]
            assert (after["rows_match_embeddings"].metadata["actual"], after["self_retrieval"].passed) == (37, True)

            other = settings.model_copy(update={"index_params": {"nlist": 64}})
            with ImageIndex(other) as reconfigured:
                wrong = quality.collection_outcomes(reconfigured, "d", ids[3:])
            assert [o.passed for o in wrong] == [True, False, True]
            assert "params.nlist is 128, configured 64" in wrong[1].description
        finally:
            index.client.drop_collection(name)
