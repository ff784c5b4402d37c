"""Index integrity on the real pipeline (real Triton, real milvus-lite): no indexed image is ever lost to another
item's input, a failed re-run or another drop.

* A stateful, model-based test (Hypothesis ``RuleBasedStateMachine``) ingests, re-runs, changes and deletes drops
  in random order, with hostile ids, images shared across drops, items that fail permanently (not an image, a
  missing file) and URL items that fail transiently (their server answers 503). After every step the collection
  equals a small in-memory model: the set of ids, each row's drops and its content hash. CI runs a few short
  sequences; ``EMBEDDING_PIPELINE_EXPLORE=1`` runs many longer ones.
* The three ways rows used to be lost, as plain regression tests: an id that rewrites a delete expression, a URL
  drop re-run during an outage, and the same photo in two drops with one of them deleted.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml
from dagster import DagsterInstance
from hypothesis import HealthCheck
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from PIL import Image

from embedding_pipeline import ingest, retention
from embedding_pipeline.index.client import ImageIndex
from embedding_pipeline.index.collections import ModelCollections
from embedding_pipeline.index.expressions import equals
from embedding_pipeline.orchestration.instance import DagsterDrops
from embedding_pipeline.runtime.state import HOME_ENV
from embedding_pipeline.serving.client import TritonEmbedder
from embedding_pipeline.settings import CONFIG_ENV, load_settings
from embedding_pipeline.sources.items import content_id
from embedding_pipeline.storage import layout

pytestmark = pytest.mark.integration

EXPLORE = os.environ.get("EMBEDDING_PIPELINE_EXPLORE") == "1"
HOSTILE_IDS = ["x'] or id not in ['", "O'Brien", 'q"uote\\', "new\nline ]", "üñí-😀"]
IMAGES = 4


def _image(k: int) -> bytes:
    """A small PNG of its own (distinct content per k)."""
    rng = np.random.default_rng(1000 + k)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


PNG = [_image(k) for k in range(IMAGES)]
SHA = [hashlib.sha256(data).hexdigest() for data in PNG]


class Images(ThreadingHTTPServer):
    """A loopback image server whose images can all answer 503 at once (an outage)."""

    daemon_threads = True

    def __init__(self):
        self.down = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # noqa: ANN002
                pass

            def do_GET(self):  # noqa: N802
                k = int(self.path.rsplit("/", 1)[-1].split(".")[0])
                body = b"down" if server.down else PNG[k]
                self.send_response(503 if server.down else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, k: int) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/img/{k}.png"


@dataclass(frozen=True)
class Slot:
    """One way an item can be listed: where its bytes come from, and its id (None: derived from the content)."""

    kind: str  # local, url, not_image, missing
    image: int
    item_id: str | None

    def row_id(self) -> str | None:
        if self.kind in ("not_image", "missing"):
            return None
        return self.item_id or content_id(SHA[self.image])


SLOTS = (
    [Slot("local", k, HOSTILE_IDS[k]) for k in range(IMAGES)]
    + [Slot("local", k, None) for k in range(IMAGES)]
    + [Slot("url", k, f"url {HOSTILE_IDS[k]}") for k in range(IMAGES)]
    + [Slot("url", k, None) for k in range(IMAGES)]
    + [Slot("not_image", 0, "bad'] or true or ['"), Slot("missing", 0, "gone\\")]
)


@pytest.fixture(scope="module")
def world(stack, tmp_path_factory):
    """Settings that allow the loopback image server, the image server, and a Triton client; a state directory and
    a collection of the module's own."""
    work = tmp_path_factory.mktemp("integrity")
    mp = pytest.MonkeyPatch()
    server = Images()
    config = yaml.safe_load(Path(os.environ[CONFIG_ENV]).read_text())
    config["sources"] = {
        "private_allowlist": [f"127.0.0.1:{server.server_address[1]}"],
        "fetch_timeout_s": 1,
        "fetch_retries": 0,
    }
    config["milvus"] = {**config.get("milvus", {}), "collection": "integrity"}
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    mp.setenv(CONFIG_ENV, str(path))
    # A state directory of its own (drops, stage outputs), on the session's servers: reset() deletes every drop it
    # finds, and the other modules' drops (the session's "photos") must not be among them.
    mp.setenv(HOME_ENV, str(work / "home"))
    settings = load_settings()
    embedder = TritonEmbedder.from_settings(settings.triton)
    try:
        yield settings, server, embedder
    finally:
        embedder.close()
        server.shutdown()
        with ModelCollections(settings.milvus) as collections:
            collections.drop_all()
        mp.undo()


def write_drop(settings, server: Images, drop: str, slots: list[Slot]) -> None:
    folder = settings.drops / drop
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    rows = []
    for n, slot in enumerate(slots):
        row: dict = {"metadata": {"slot": n}}
        if slot.item_id is not None:
            row["id"] = slot.item_id
        if slot.kind == "url":
            row["uri"] = server.url(slot.image)
        elif slot.kind == "missing":
            row["uri"] = "no-such-file.png"
        else:
            name = f"item{n}.png"
            (folder / name).write_bytes(PNG[slot.image] if slot.kind == "local" else b"plain text, not an image\n")
            row["uri"] = name
        rows.append(row)
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_stages(settings, embedder: TritonEmbedder, drop: str) -> ingest.IndexSummary:
    """The four stages of the ingest job, in this process (what the Dagster assets call)."""
    ingest.build_manifest(settings, drop)
    spec = embedder.input_spec()
    ingest.preprocess_drop(settings, drop, (spec.datatype, tuple(spec.shape)), embedder.model_version_label())
    ingest.embed_drop(settings, drop, embedder)
    with ModelCollections(settings.milvus) as collections:
        return ingest.index_drop(settings, drop, collections)


def delete(settings, drop: str) -> None:
    retention.delete_drop(settings, drop, DagsterDrops(DagsterInstance.ephemeral()))


def reset(settings) -> None:
    """Delete every drop the tests of this module made (sources, files, rows), through retention."""
    names = (
        {p.name for p in settings.drops.iterdir() if not p.name.startswith(".")} if settings.drops.exists() else set()
    )
    manifests = layout.drop_files(settings, "x").manifest.parent
    names |= {p.stem for p in manifests.glob("*.arrow")} if manifests.exists() else set()
    for drop in sorted(names):
        delete(settings, drop)
    assert stored(settings) == {}


def stored(settings) -> dict[str, tuple[tuple[str, ...], str]]:
    """id -> (sorted drops, sha256) of every row of the search collection (Strong)."""
    with ModelCollections(settings.milvus) as collections:
        name = collections.search_collection()
    if name is None:
        return {}
    with ImageIndex(settings.milvus.model_copy(update={"collection": name})) as index:
        rows = index._iterate('id != ""', ["id", "drops", "drop", "sha256"], strong=True)
        out = {}
        for r in rows:
            assert r["drop"] in r["drops"], r  # the display drop is always a member
            out[r["id"]] = (tuple(sorted(r["drops"])), r["sha256"])
        return out


class Model:
    """What should be indexed: per drop, the rows it holds (id -> uri of the item that put it there)."""

    def __init__(self):
        self.held: dict[str, dict[str, str]] = {}

    def ingest(self, drop: str, slots: list[Slot], urls_down: bool, url_of) -> None:  # noqa: ANN001
        before = self.held.get(drop, {})
        now: dict[str, str] = {}
        transient: list[Slot] = []
        for slot in slots:
            if slot.row_id() is None:
                continue  # fails permanently: holds nothing
            if slot.kind == "url" and urls_down:
                transient.append(slot)
                continue
            uri = url_of(slot.image) if slot.kind == "url" else ""
            now.setdefault(slot.row_id(), uri)
        for slot in transient:
            # The earlier row with the item's own id; when there is none (no id of its own, or a new one), the
            # earlier rows of the same URI.
            if slot.item_id is not None and slot.item_id in before:
                keep = [slot.item_id]
            else:
                keep = [i for i, uri in before.items() if uri == url_of(slot.image)]
            for row_id in keep:
                now.setdefault(row_id, before[row_id])
        self.held[drop] = now

    def expected(self) -> dict[str, tuple[tuple[str, ...], str]]:
        rows: dict[str, set[str]] = {}
        for drop, held in self.held.items():
            for row_id in held:
                rows.setdefault(row_id, set()).add(drop)
        return {row_id: (tuple(sorted(drops)), _sha_of(row_id)) for row_id, drops in rows.items()}


def _sha_of(row_id: str) -> str:
    for slot in SLOTS:
        if slot.row_id() == row_id:
            return SHA[slot.image]
    raise KeyError(row_id)


DROPS = ("drop-a", "drop-b", "drop-c")


class IndexIntegrity(RuleBasedStateMachine):
    """Random sequences of ingests, re-runs and deletions against the model (one world per test, rows reset)."""

    world = None  # set by the test

    @initialize()
    def start_empty(self):
        settings, _, _ = self.world
        reset(settings)
        self.model = Model()
        self.listed: dict[str, list[Slot]] = {}

    def _ingest(self, drop: str, slots: list[Slot], urls_down: bool) -> None:
        settings, server, embedder = self.world
        server.down = urls_down
        write_drop(settings, server, drop, slots)
        run_stages(settings, embedder, drop)
        self.listed[drop] = slots
        self.model.ingest(drop, slots, urls_down, server.url)

    @rule(
        drop=st.sampled_from(DROPS),
        slots=st.lists(st.sampled_from(SLOTS), min_size=1, max_size=5, unique=True),
        urls_down=st.booleans(),
    )
    def ingest_drop(self, drop, slots, urls_down):
        self._ingest(drop, slots, urls_down)

    @precondition(lambda self: bool(self.listed))
    @rule(data=st.data(), urls_down=st.booleans())
    def rerun_drop(self, data, urls_down):
        drop = data.draw(st.sampled_from(sorted(self.listed)))
        self._ingest(drop, self.listed[drop], urls_down)

    @precondition(lambda self: bool(self.listed))
    @rule(data=st.data())
    def delete_drop(self, data):
        settings, _, _ = self.world
        drop = data.draw(st.sampled_from(sorted(self.listed)))
        delete(settings, drop)
        del self.listed[drop]
        self.model.held.pop(drop, None)

    @invariant()
    def collection_equals_model(self):
        if not hasattr(self, "model"):
            return
        settings, _, _ = self.world
        assert stored(settings) == self.model.expected()
        with ModelCollections(settings.milvus) as collections:
            name = collections.search_collection()
        if name is not None:
            with ImageIndex(settings.milvus.model_copy(update={"collection": name})) as index:
                for drop, held in self.model.held.items():
                    # A filter on the drop sees exactly the rows the drop holds, shared ones included.
                    assert index.count(equals("drop", drop), consistency_level="Strong") == len(held)


def test_random_ingests_reruns_and_deletions_keep_the_index_equal_to_the_model(world):
    IndexIntegrity.world = world
    runner = IndexIntegrity.TestCase
    runner.settings = hyp_settings(
        max_examples=60 if EXPLORE else 12,
        stateful_step_count=25 if EXPLORE else 10,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        derandomize=not EXPLORE,
    )
    runner().runTest()


# -- the three ways rows were lost, as plain regression tests ----------------------------------------------------


def test_an_id_that_rewrites_the_delete_expression_deletes_only_its_own_row(world):
    settings, server, embedder = world
    reset(settings)
    write_drop(settings, server, "keep-me", [Slot("local", 1, "plain-id")])
    run_stages(settings, embedder, "keep-me")
    write_drop(settings, server, "hostile", [Slot("local", 0, "x'] or id not in ['"), Slot("local", 2, "O'Brien")])
    run_stages(settings, embedder, "hostile")
    assert set(stored(settings)) == {"plain-id", "x'] or id not in ['", "O'Brien"}
    # A re-run that drops the hostile item, then deleting the drop: only its own rows go.
    write_drop(settings, server, "hostile", [Slot("local", 2, "O'Brien")])
    summary = run_stages(settings, embedder, "hostile")
    assert summary.removed_stale == 1 and set(stored(settings)) == {"plain-id", "O'Brien"}
    delete(settings, "hostile")
    assert set(stored(settings)) == {"plain-id"}
    delete(settings, "keep-me")
    assert stored(settings) == {}


def test_a_rerun_during_an_outage_keeps_every_row_indexed_before(world):
    settings, server, embedder = world
    reset(settings)
    slots = [Slot("url", 0, None), Slot("url", 1, "url-with-id"), Slot("local", 3, "local-one")]
    server.down = False
    write_drop(settings, server, "urls", slots)
    run_stages(settings, embedder, "urls")
    before = stored(settings)
    assert len(before) == 3
    server.down = True
    try:
        summary = run_stages(settings, embedder, "urls")
    finally:
        server.down = False
    assert summary.removed_stale == 0 and stored(settings) == before
    report = {r["uri"]: r for r in ingest.item_report(settings, "urls")}
    failed = report[server.url(0)]
    assert failed["status"] == "failed" and failed["error_kind"] == "http_unavailable"
    assert failed["kept_previous"] == [content_id(SHA[0])]
    # Every item failing transiently: still nothing removed.
    write_drop(settings, server, "urls", slots[:2])
    server.down = True
    try:
        run_stages(settings, embedder, "urls")
    finally:
        server.down = False
    assert set(stored(settings)) == {content_id(SHA[0]), "url-with-id"}
    delete(settings, "urls")
    assert stored(settings) == {}


def test_an_image_in_two_drops_survives_deleting_either(world):
    settings, server, embedder = world
    reset(settings)
    shared = content_id(SHA[2])
    for drop in ("drop-c", "drop-d"):
        write_drop(settings, server, drop, [Slot("local", 2, None)])
        run_stages(settings, embedder, drop)
    assert stored(settings) == {shared: (("drop-c", "drop-d"), SHA[2])}
    delete(settings, "drop-d")
    assert stored(settings) == {shared: (("drop-c",), SHA[2])}
    delete(settings, "drop-c")
    assert stored(settings) == {}


def test_one_id_for_two_different_images_keeps_the_first_and_reports_the_second(world):
    settings, server, embedder = world
    reset(settings)
    write_drop(settings, server, "first", [Slot("local", 0, "same-id")])
    run_stages(settings, embedder, "first")
    write_drop(settings, server, "second", [Slot("local", 1, "same-id")])
    summary = run_stages(settings, embedder, "second")
    assert summary.id_conflicts == 1 and summary.id_conflict_examples[0]["held_by"] == ["first"]
    assert stored(settings) == {"same-id": (("first",), SHA[0])}  # the first drop's image is not overwritten
    (item,) = ingest.item_report(settings, "second")
    assert (item["status"], item["error_kind"], item["stage"]) == ("failed", "id_conflict", "index")
    # A drop that shared the id with the same image, then changes it to another image, leaves the row.
    write_drop(settings, server, "second", [Slot("local", 0, "same-id")])
    run_stages(settings, embedder, "second")
    assert stored(settings) == {"same-id": (("first", "second"), SHA[0])}
    write_drop(settings, server, "second", [Slot("local", 1, "same-id")])
    run_stages(settings, embedder, "second")
    assert stored(settings) == {"same-id": (("first",), SHA[0])}
    delete(settings, "first")
    assert stored(settings) == {}
    run_stages(settings, embedder, "second")  # the id is free now: the second drop's image is indexed
    assert stored(settings) == {"same-id": (("second",), SHA[1])}
    delete(settings, "second")


def test_an_outage_when_no_earlier_vector_can_be_carried_still_removes_nothing(world):
    """After a model change the drop's earlier vectors are another model's and cannot be carried into the new
    embeddings: the rows of transiently failing items must stay anyway (here the embeddings are simply gone)."""
    settings, server, embedder = world
    reset(settings)
    slots = [Slot("url", 0, None), Slot("url", 1, "url-with-id")]
    server.down = False
    write_drop(settings, server, "outage", slots)
    run_stages(settings, embedder, "outage")
    before = stored(settings)
    assert len(before) == 2
    shutil.rmtree(layout.drop_files(settings, "outage").embeddings)
    server.down = True
    try:
        run_stages(settings, embedder, "outage")
    finally:
        server.down = False
    assert stored(settings) == before
    # A permanent failure does leave: the listing now names a missing file instead of the second URL.
    shutil.rmtree(layout.drop_files(settings, "outage").embeddings)
    write_drop(settings, server, "outage", [Slot("url", 0, None), Slot("missing", 0, "gone\\\\")])
    server.down = True
    try:
        run_stages(settings, embedder, "outage")
    finally:
        server.down = False
    assert set(stored(settings)) == {content_id(SHA[0])}
    delete(settings, "outage")
