"""The preprocess and embed stages split into shards: the split itself, the same outputs whatever the shard size,
and the attempt that only a complete, consistent set of shards can commit."""

import hashlib
import shutil

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from embedding_pipeline import ingest
from embedding_pipeline.storage import arrow, layout
from embedding_pipeline_tests.images import encode
from embedding_pipeline_tests.unit.test_ingest_stages import MODEL_INPUT, FakeEmbedder, settings  # noqa: F401

DROP = "d1"
GOOD = 7  # images that decode
TODO = GOOD + 1  # items the manifest accepts: the good ones and a PNG cut short (fails only when decoded)


class OtherModel(FakeEmbedder):
    """Another model version: other vectors (the colour channels reversed), another label."""

    def embed(self, batch: np.ndarray) -> np.ndarray:
        return super().embed(batch)[:, ::-1].copy()

    def model_version_label(self) -> str:
        return "fake:2"


class WiderVectors(OtherModel):
    """The other model's label with 4-d vectors (a model swapped behind an unchanged label)."""

    def embed(self, batch: np.ndarray) -> np.ndarray:
        vectors = super().embed(batch)
        return np.hstack([vectors, np.zeros((len(vectors), 1), np.float32)])


class FailsOnSecondBatch(FakeEmbedder):
    def embed(self, batch: np.ndarray) -> np.ndarray:
        if self.embedded:
            raise ConnectionError("inference server went away")
        return super().embed(batch)


@pytest.fixture
def sharded(settings):  # noqa: F811
    """Drop d1 of the shared fixture (3 images and a file that is no image) with four more images and a PNG cut
    short: its header passes the manifest, its pixels fail to decode (a preprocess failure)."""
    drop = settings.drops / DROP
    for i in range(3, GOOD):
        (drop / f"img{i}.png").write_bytes(encode(np.full((24 + i, 20, 3), (40 * i, 200 - 25 * i, 90), np.uint8)))
    noise = encode(np.random.default_rng(7).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    (drop / "cut.png").write_bytes(noise[: len(noise) // 2])
    manifest = ingest.build_manifest(settings, DROP)
    assert (manifest.items, manifest.ok, manifest.failed) == (GOOD + 2, TODO, 1)
    return settings


def _files(config):
    return layout.drop_files(config, DROP)


def _stagings(folder):
    return sorted(p.name for p in folder.parent.glob(f".{folder.name}.*.staging"))


def _embedded(config) -> dict[str, tuple]:
    """id -> (sha256, uri, model, vector) of the committed embeddings (each id once)."""
    rows: dict[str, tuple] = {}
    for table in arrow.read_batches(_files(config).embeddings):
        columns = table.select(["id", "sha256", "uri", "model"]).to_pydict()
        for k, vector in enumerate(arrow.vectors_of(table)):
            item_id = columns["id"][k]
            assert item_id not in rows, f"{item_id} embedded twice"
            rows[item_id] = (columns["sha256"][k], columns["uri"][k], columns["model"][k], tuple(vector.tolist()))
    return rows


def _tensors(folder) -> dict[str, bytes]:
    """id -> the bytes of its model input, for the committed (or staged) batch files of ``folder``."""
    out: dict[str, bytes] = {}
    for table in arrow.read_batches(folder):
        for item_id, tensor in zip(table.column("id").to_pylist(), arrow.tensors_of(table)):
            assert item_id not in out, f"{item_id} preprocessed twice"
            out[item_id] = tensor.tobytes()
    return out


def _folder_state(folder) -> dict[str, str]:
    """Every file of a committed folder with a digest of its content."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _todo_ids(config) -> list[str]:
    return [i.id for i in ingest.read_manifest(config, DROP) if i.status == "ok"]


def _run(config, shard_items, model=FakeEmbedder):
    pre = ingest.preprocess_drop(config, DROP, MODEL_INPUT, model().model_version_label(), shard_items)
    emb = ingest.embed_drop(config, DROP, model(), shard_items)
    return pre, emb


# --- the split -------------------------------------------------------------------------------------------------


@hypothesis_settings(max_examples=300, deadline=None)
@given(values=st.lists(st.integers(), max_size=120), shards=st.integers(1, 40))
def test_split_gives_contiguous_ordered_parts_of_near_equal_size(values, shards):
    parts = ingest._split(values, shards)
    assert len(parts) == shards
    assert all(isinstance(p, list) for p in parts)
    # Contiguous and in order: the parts, concatenated, are the input.
    assert [v for part in parts for v in part] == values
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the longer parts come first
    # A tuple (any sequence) splits the same way.
    assert ingest._split(tuple(values), shards) == parts


@hypothesis_settings(max_examples=300, deadline=None)
@given(items=st.integers(0, 10**6), shard_items=st.integers(1, 10**4))
def test_shard_count_is_items_over_shard_size_rounded_up(items, shard_items):
    count = ingest.shard_count(items, shard_items)
    assert count == max(1, (items + shard_items - 1) // shard_items)
    assert count >= 1
    if items:
        assert (count - 1) * shard_items < items <= count * shard_items
    # No shard of the split holds more than shard_items items.
    if items <= 2000:
        assert max(len(p) for p in ingest._split(range(items), count)) <= shard_items


def test_shard_count_edges():
    assert ingest.shard_count(0, 5) == 1  # an empty stage still has its one (empty) shard
    assert ingest.shard_count(1, 5) == 1
    assert ingest.shard_count(5, 5) == 1
    assert ingest.shard_count(6, 5) == 2
    assert ingest.shard_count(3, 0) == 3  # a size below 1 counts as 1
    assert ingest._split([], 3) == [[], [], []]


# --- same outputs whatever the shard size ------------------------------------------------------------------------


@pytest.mark.parametrize("shard_items", [1, 2, 3, 5])
def test_sharded_stages_write_what_one_shard_writes(sharded, shard_items):
    files = _files(sharded)
    whole_pre, whole_emb = _run(sharded, None)
    assert (whole_pre.shards, whole_emb.shards) == (1, 1)
    whole_rows = _embedded(sharded)
    whole_tensors = _tensors(files.preprocessed)
    whole_failures = arrow.read_json(files.preprocessed, "failures.json")
    assert len(whole_rows) == GOOD and len(whole_failures) == 1
    assert whole_failures[0]["uri"].endswith("cut.png")
    assert whole_failures[0]["error_kind"] in {"truncated", "decode_error"}

    # The same drop from scratch, in shards.
    shutil.rmtree(files.preprocessed)
    shutil.rmtree(files.embeddings)
    counter = FakeEmbedder()
    pre = ingest.preprocess_drop(sharded, DROP, MODEL_INPUT, "fake:1", shard_items)
    emb = ingest.embed_drop(sharded, DROP, counter, shard_items)

    assert _embedded(sharded) == whole_rows  # the same (id, sha256) rows, with the same vectors
    assert _tensors(files.preprocessed) == whole_tensors
    assert arrow.read_json(files.preprocessed, "failures.json") == whole_failures
    assert arrow.read_json(files.preprocessed, "reused.json") == []
    assert arrow.read_json(files.preprocessed, "kept.json") == {}
    for name in ("images", "reused", "kept_previous", "failed", "tensor", "failures_by_kind"):
        assert getattr(pre, name) == getattr(whole_pre, name), name
    for name in ("embeddings", "computed", "reused", "kept_previous", "dimension", "model"):
        assert getattr(emb, name) == getattr(whole_emb, name), name
    assert (pre.images, pre.failed, emb.embeddings, emb.computed, counter.embedded) == (GOOD, 1, GOOD, GOOD, GOOD)

    # The split: one preprocess shard per shard_items items, each read in chunks of its own (batch_size 2); a
    # chunk's decoded images make one file.
    shards = ingest.shard_count(TODO, shard_items)
    assert pre.shards == shards
    failed_id = whole_failures[0]["id"]
    parts = ingest._split(_todo_ids(sharded), shards)
    expected = []
    for k, part in enumerate(parts):
        chunks = [part[i : i + 2] for i in range(0, len(part), 2)]
        written = [c for c in chunks if set(c) - {failed_id}]
        expected += [f"s{k:04d}-batch-{n:05d}.arrow" for n in range(len(written))]
    assert sorted(p.name for p in files.preprocessed.glob("*.arrow")) == expected
    assert pre.batches == len(expected)
    # Embed: whole tensor files per shard, never more shards than files.
    assert emb.shards == min(len(expected), ingest.shard_count(GOOD, shard_items))
    embedded_files = sorted(p.name for p in files.embeddings.glob("*.arrow"))
    assert len(embedded_files) == len(expected)
    assert {name[:5] for name in embedded_files} == {f"s{k:04d}" for k in range(emb.shards)}
    # Committed folders hold no plan and no stagings are left behind.
    assert not (files.preprocessed / arrow.PLAN).exists() and not (files.embeddings / arrow.PLAN).exists()
    assert _stagings(files.preprocessed) == _stagings(files.embeddings) == []


# --- re-runs -------------------------------------------------------------------------------------------------------


def test_rerun_with_another_shard_size_reuses_everything(sharded):
    files = _files(sharded)
    _run(sharded, 2)
    rows = _embedded(sharded)
    failures = arrow.read_json(files.preprocessed, "failures.json")

    counter = FakeEmbedder()
    pre = ingest.preprocess_drop(sharded, DROP, MODEL_INPUT, "fake:1", 3)
    emb = ingest.embed_drop(sharded, DROP, counter, 3)
    # Only the broken item is decoded again (it has no embedding); every good one is carried over.
    assert (pre.images, pre.reused, pre.failed, pre.shards) == (0, GOOD, 1, 1)
    assert (emb.computed, emb.reused, emb.embeddings, counter.embedded) == (0, GOOD, GOOD, 0)
    assert _embedded(sharded) == rows
    assert arrow.read_json(files.preprocessed, "failures.json") == failures
    assert sorted(arrow.read_json(files.preprocessed, "reused.json")) == sorted(rows)


def test_rerun_in_shards_computes_only_changed_items(sharded):
    _run(sharded, None)
    before = _embedded(sharded)
    drop = sharded.drops / DROP
    for i in (0, 4, 6):  # new content: new ids (content ids), the old rows leave the drop
        (drop / f"img{i}.png").write_bytes(encode(np.full((18, 18, 3), (10 + i, 120, 240 - i), np.uint8)))
    ingest.build_manifest(sharded, DROP)

    counter = FakeEmbedder()
    pre = ingest.preprocess_drop(sharded, DROP, MODEL_INPUT, "fake:1", 1)
    emb = ingest.embed_drop(sharded, DROP, counter, 1)
    assert (pre.images, pre.reused, pre.failed, pre.shards) == (3, GOOD - 3, 1, 4)  # 3 changed + the broken one
    assert (emb.computed, emb.reused, emb.embeddings, emb.shards, counter.embedded) == (3, GOOD - 3, GOOD, 3, 3)
    after = _embedded(sharded)
    assert len(after) == GOOD
    assert len(set(after) & set(before)) == GOOD - 3
    assert all(after[i] == before[i] for i in set(after) & set(before))


# --- interrupted attempts ------------------------------------------------------------------------------------------


def test_an_interrupted_sharded_attempt_is_never_read_and_goes_at_the_next_plan(sharded):
    files = _files(sharded)
    _run(sharded, None)
    rows = _embedded(sharded)
    tensors = _tensors(files.preprocessed)
    pre_state = _folder_state(files.preprocessed)
    emb_state = _folder_state(files.embeddings)

    # Another model: every item is decoded again, in 4 shards; only 2 of them run and nothing commits.
    plan = ingest.plan_preprocess(sharded, DROP, "fake:2", shard_items=2)
    assert plan.shards == 4
    for k in (0, 1):
        ingest.preprocess_shard(sharded, DROP, plan.attempt, k, MODEL_INPUT)
    staged = arrow.staging_of(files.preprocessed, plan.attempt)
    staged_names = {p.name for p in staged.iterdir()}
    assert arrow.PLAN in staged_names
    assert {n[:5] for n in staged_names if n.endswith(".arrow")} == {"s0000", "s0001"}
    # An embed attempt over the committed tensors, 1 of its shards run, by the other model.
    eplan = ingest.plan_embed(sharded, DROP, shard_items=1)
    assert eplan.shards == len([n for n in pre_state if n.endswith(".arrow")]) > 1
    ingest.embed_shard(sharded, DROP, eplan.attempt, 0, OtherModel())
    estaged = arrow.staging_of(files.embeddings, eplan.attempt)
    assert any(p.name.startswith("s0000-") for p in estaged.iterdir())

    # Readers see the committed outputs only.
    assert _tensors(files.preprocessed) == tensors
    assert _embedded(sharded) == rows
    assert {r[2] for r in rows.values()} == {"fake:1"}
    assert _folder_state(files.preprocessed) == pre_state
    assert _folder_state(files.embeddings) == emb_state
    assert ingest.embeddings_version(sharded, DROP, "fake:1").startswith("fake:1#")
    assert _stagings(files.preprocessed) == [staged.name] and _stagings(files.embeddings) == [estaged.name]

    # The next run's plan discards the stale staging; the run then commits normally.
    again = ingest.plan_preprocess(sharded, DROP, "fake:2", shard_items=3)
    assert not staged.exists()
    assert _stagings(files.preprocessed) == [arrow.staging_of(files.preprocessed, again.attempt).name]
    done = [ingest.preprocess_shard(sharded, DROP, again.attempt, k, MODEL_INPUT) for k in range(again.shards)]
    pre = ingest.commit_preprocess(sharded, DROP, again.attempt, done)
    assert (pre.images, pre.reused, pre.failed, pre.shards) == (GOOD, 0, 1, 3)
    emb = ingest.embed_drop(sharded, DROP, OtherModel(), shard_items=3)
    assert not estaged.exists()
    assert (emb.computed, emb.embeddings, emb.model) == (GOOD, GOOD, "fake:2")
    assert _stagings(files.preprocessed) == _stagings(files.embeddings) == []

    after = _embedded(sharded)
    assert set(after) == set(rows)
    for item_id, (sha, uri, model, vector) in after.items():
        assert (sha, uri, model) == (rows[item_id][0], rows[item_id][1], "fake:2")
        # The other model's vector of the same image (its channels reversed).
        np.testing.assert_allclose(vector, rows[item_id][3][::-1], rtol=1e-6)


def test_a_commit_needs_every_shard_of_its_attempt(sharded):
    files = _files(sharded)
    _run(sharded, None)
    pre_state = _folder_state(files.preprocessed)
    emb_state = _folder_state(files.embeddings)

    plan = ingest.plan_preprocess(sharded, DROP, "fake:2", shard_items=2)
    done = {k: ingest.preprocess_shard(sharded, DROP, plan.attempt, k, MODEL_INPUT) for k in (0, 2, 3)}
    for shards in ([done[0], done[2], done[3]], [done[0], done[0], done[2], done[3]], []):
        with pytest.raises(RuntimeError, match="not every shard finished"):
            ingest.commit_preprocess(sharded, DROP, plan.attempt, shards)
    assert _folder_state(files.preprocessed) == pre_state
    # A refused commit leaves the attempt as it was: the missing shard runs and the commit goes through.
    done[1] = ingest.preprocess_shard(sharded, DROP, plan.attempt, 1, MODEL_INPUT)
    pre = ingest.commit_preprocess(sharded, DROP, plan.attempt, [done[k] for k in (3, 1, 0, 2)])
    assert (pre.images, pre.failed, pre.shards) == (GOOD, 1, 4)
    assert len(_tensors(files.preprocessed)) == GOOD

    # The tensors committed above are embedded by the other model next; until then the old vectors stay.
    eplan = ingest.plan_embed(sharded, DROP, shard_items=2)
    assert eplan.shards == 4
    edone = [ingest.embed_shard(sharded, DROP, eplan.attempt, k, OtherModel()) for k in range(eplan.shards)]
    with pytest.raises(RuntimeError, match="not every shard finished"):
        ingest.commit_embed(sharded, DROP, eplan.attempt, edone[:-1], "fake:2")
    # Vectors of another model than the one the commit is for.
    with pytest.raises(RuntimeError, match="model changed"):
        ingest.commit_embed(sharded, DROP, eplan.attempt, edone, "fake:1")
    # Shards that disagree on the model (the server's model changed between steps).
    mixed = [*edone[:-1], ingest.embed_shard(sharded, DROP, eplan.attempt, eplan.shards - 1, FakeEmbedder())]
    assert mixed[-1].model == "fake:1" and mixed[-1].rows
    for model in ("fake:1", "fake:2"):
        with pytest.raises(RuntimeError, match="model changed"):
            ingest.commit_embed(sharded, DROP, eplan.attempt, mixed, model)
    # Same label, other vector size.
    wider = [*edone[:-1], ingest.embed_shard(sharded, DROP, eplan.attempt, eplan.shards - 1, WiderVectors())]
    with pytest.raises(RuntimeError, match="different sizes"):
        ingest.commit_embed(sharded, DROP, eplan.attempt, wider, "fake:2")
    assert _folder_state(files.embeddings) == emb_state

    edone[-1] = ingest.embed_shard(sharded, DROP, eplan.attempt, eplan.shards - 1, OtherModel())
    emb = ingest.commit_embed(sharded, DROP, eplan.attempt, edone, "fake:2")
    assert (emb.embeddings, emb.computed, emb.model, emb.dimension, emb.shards) == (GOOD, GOOD, "fake:2", 3, 4)
    assert {r[2] for r in _embedded(sharded).values()} == {"fake:2"}


# --- retried shards ------------------------------------------------------------------------------------------------


def test_a_retried_preprocess_shard_starts_over(sharded):
    files = _files(sharded)
    plan = ingest.plan_preprocess(sharded, DROP, "fake:1", shard_items=4)
    assert plan.shards == 2
    staging = arrow.staging_of(files.preprocessed, plan.attempt)
    other = ingest.preprocess_shard(sharded, DROP, plan.attempt, 1, MODEL_INPUT)
    other_files = {p.name: p.read_bytes() for p in staging.glob("s0001-*")}
    assert len(other_files) == other.batches == 2

    # A first try of shard 0 that wrote one file per image (batch size 1), then was lost; the retry batches by 2.
    one_by_one = sharded.model_copy(update={"preprocess": sharded.preprocess.model_copy(update={"batch_size": 1})})
    first = ingest.preprocess_shard(one_by_one, DROP, plan.attempt, 0, MODEL_INPUT)
    assert first.batches == first.rows == 3  # the cut PNG is in shard 0
    retry = ingest.preprocess_shard(sharded, DROP, plan.attempt, 0, MODEL_INPUT)
    assert (retry.batches, retry.rows) == (2, 3)
    assert retry.failures == first.failures and len(retry.failures) == 1

    assert sorted(p.name for p in staging.glob("s0000-*")) == ["s0000-batch-00000.arrow", "s0000-batch-00001.arrow"]
    assert {p.name: p.read_bytes() for p in staging.glob("s0001-*")} == other_files  # the other shard's stay
    assert len(_tensors(staging)) == GOOD  # each image once

    # Running the same shard twice in a row also leaves the files of one run.
    again = ingest.preprocess_shard(sharded, DROP, plan.attempt, 0, MODEL_INPUT)
    assert (again.batches, again.rows) == (2, 3)
    assert len(_tensors(staging)) == GOOD

    pre = ingest.commit_preprocess(sharded, DROP, plan.attempt, [again, other])
    assert (pre.images, pre.failed, pre.batches) == (GOOD, 1, 4)
    assert sorted(_tensors(files.preprocessed)) == sorted(set(_todo_ids(sharded)) - {retry.failures[0]["id"]})


def test_a_failed_embed_shard_removes_only_its_own_files_and_its_retry_completes(sharded):
    files = _files(sharded)
    ingest.preprocess_drop(sharded, DROP, MODEL_INPUT, "fake:1")
    rows = [t.num_rows for t in arrow.read_batches(files.preprocessed, columns=["id"])]
    assert len(rows) == 4 and sum(rows) == GOOD
    plan = ingest.plan_embed(sharded, DROP, shard_items=4)
    assert plan.shards == 2  # whole tensor files: 2 per shard
    staging = arrow.staging_of(files.embeddings, plan.attempt)
    other = ingest.embed_shard(sharded, DROP, plan.attempt, 1, FakeEmbedder())
    other_files = {p.name: p.read_bytes() for p in staging.glob("s0001-*")}
    assert other.batches == len(other_files) == 2

    with pytest.raises(ConnectionError):
        ingest.embed_shard(sharded, DROP, plan.attempt, 0, FailsOnSecondBatch())
    assert list(staging.glob("s0000-*")) == []  # its first batch was written, then removed
    assert {p.name: p.read_bytes() for p in staging.glob("s0001-*")} == other_files
    assert (staging / arrow.PLAN).is_file()

    retry = ingest.embed_shard(sharded, DROP, plan.attempt, 0, FakeEmbedder())
    assert (retry.rows, retry.batches) == (rows[0] + rows[1], 2)
    emb = ingest.commit_embed(sharded, DROP, plan.attempt, [retry, other], "fake:1")
    assert (emb.embeddings, emb.computed, emb.shards) == (GOOD, GOOD, 2)
    assert len(_embedded(sharded)) == GOOD


# --- failures around a commit ----------------------------------------------------------------------------------


def test_a_failure_after_the_swap_keeps_the_committed_outputs(sharded):
    """The writer's block fails after its commit swapped the files in: nothing of the published output goes."""
    _run(sharded, None)
    folder = _files(sharded).embeddings
    before = _embedded(sharded)
    with pytest.raises(RuntimeError, match="after the commit"):
        with arrow.open_writer(folder, attempt=arrow.new_attempt(folder)) as writer:
            for table in arrow.read_batches(folder):
                writer.write(table)
            writer.commit()
            raise RuntimeError("failed after the commit")
    # The new attempt is what the folder holds now, whole (the same rows, in this writer's file names).
    assert arrow.commit_id(folder) == writer.attempt
    assert sorted(p.name for p in arrow.batch_files(folder)) == [p.name for p in writer.files]
    assert _embedded(sharded) == before and len(before) == GOOD


def test_a_failed_commit_keeps_its_plan_and_shards_so_a_retry_commits(sharded):
    plan = ingest.plan_preprocess(sharded, DROP, "", shard_items=2)
    done = [ingest.preprocess_shard(sharded, DROP, plan.attempt, k, MODEL_INPUT) for k in range(plan.shards)]
    # The commit refuses (one shard reported a file it does not have): the attempt stays as it was.
    broken = [*done[:-1], ingest.ShardSummary(**{**done[-1].as_dict(), "batches": done[-1].batches + 1})]
    with pytest.raises(RuntimeError, match="batch file"):
        ingest.commit_preprocess(sharded, DROP, plan.attempt, broken)
    summary = ingest.commit_preprocess(sharded, DROP, plan.attempt, done)  # the retried commit
    assert summary.images == TODO - 1 and summary.shards == plan.shards


def test_embed_shards_refuse_tensor_batches_committed_after_their_plan(sharded):
    ingest.preprocess_drop(sharded, DROP, MODEL_INPUT, "", 2)
    plan = ingest.plan_embed(sharded, DROP, shard_items=2)
    first = ingest.embed_shard(sharded, DROP, plan.attempt, 0, FakeEmbedder())
    ingest.preprocess_drop(sharded, DROP, MODEL_INPUT, "", 2)  # another run re-commits the drop's batches
    with pytest.raises(RuntimeError, match="committed again"):
        ingest.embed_shard(sharded, DROP, plan.attempt, 1, FakeEmbedder())
    with pytest.raises(RuntimeError, match="committed again"):
        every = [ingest.ShardSummary(**{**first.as_dict(), "shard": k}) for k in range(plan.shards)]
        ingest.commit_embed(sharded, DROP, plan.attempt, every, FakeEmbedder().model_version_label())
