"""A query never mixes two models: the alias ``milvus.collection`` may move between any two calls a searcher makes
(a model switch while searches run), and every query must still embed (or read) its vector and search with the
same collection. Fakes stand for Milvus and Triton: collections of different dimensions, an alias that moves on
a script Hypothesis chooses, embedders that return vectors of their model's dimension."""

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedding_pipeline.index.client import Hit
from embedding_pipeline.retrieval import ImageSearcher
from embedding_pipeline.serving import client as serving_client
from embedding_pipeline.settings import Settings

DIMS = {"coll_a": 4, "coll_b": 6}
LABELS = {"coll_a": "image_embedder:1@aaaaaaaaaaaa", "coll_b": "image_embedder:1@bbbbbbbbbbbb"}
DIM_OF_LABEL = {LABELS[c]: d for c, d in DIMS.items()}


class FakeIndex:
    """One collection: a stored vector per id, and a search that refuses a query of another dimension (as the
    engine does, with an assertion deep in FAISS)."""

    def __init__(self, collection: str):
        self.collection = collection
        self.dim = DIMS[collection]
        self.settings = SimpleNamespace(metric_type="COSINE")
        self.searched: list[int] = []
        self.closed = False

    def rows(self, ids, fields, consistency_level="Strong"):
        return {i: {"id": i, "embedding": [1.0] * self.dim} for i in ids}

    def search(self, vector, top_k=10, filter=None, search_params=None):
        data = np.asarray(vector, dtype=np.float32)
        if data.shape[-1] != self.dim:
            raise AssertionError(f"{data.shape[-1]}-d query searched in {self.collection} ({self.dim}-d)")
        self.searched.append(data.shape[-1])
        return [[Hit(f"{self.collection}-hit", 1.0)]]

    def close(self):
        self.closed = True


class FakeCollections:
    """The alias, resolved from a script: each resolution takes the next target (the last one repeats)."""

    def __init__(self, script: list[str]):
        self.script = list(script)
        self.resolutions = 0

    def search_collection(self):
        target = self.script[min(self.resolutions, len(self.script) - 1)]
        self.resolutions += 1
        return target

    def model_of(self, collection):
        return LABELS[collection]

    def index(self, collection, model_label=""):
        return FakeIndex(collection)

    def close(self):
        pass


class FakeEmbedder:
    """Embeds to its model's dimension; the input it reports is a small RGB image."""

    def __init__(self, label: str):
        self.label = label
        self.dim = DIM_OF_LABEL[label]

    def input_spec(self):
        return SimpleNamespace(datatype="FP32", shape=(3, 16, 16))

    def model_version_label(self):
        return self.label

    def embed(self, tensors):
        return np.ones((len(tensors), self.dim), dtype=np.float32)

    def close(self):
        pass


@pytest.fixture(autouse=True)
def fake_triton(monkeypatch):
    monkeypatch.setattr(serving_client, "embedder_for_label", lambda triton, label: FakeEmbedder(label))


def _searcher(script: list[str]) -> ImageSearcher:
    searcher = ImageSearcher(Settings())
    searcher._collections = FakeCollections(script)  # the fake alias in place of a Milvus connection
    return searcher


scripts = st.lists(st.sampled_from(sorted(DIMS)), min_size=1, max_size=12)
queries = st.lists(st.sampled_from(["id", "vector", "image"]), min_size=1, max_size=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=scripts, kinds=queries)
def test_every_query_embeds_and_searches_in_one_collection(script, kinds, tmp_path):
    image = tmp_path / "query.png"
    if not image.exists():
        from PIL import Image

        Image.new("RGB", (20, 20), (120, 40, 200)).save(image)
    with _searcher(script) as searcher:
        for kind in kinds:
            if kind == "id":
                hits = searcher.search_by_id("item", top_k=1)
            elif kind == "image":
                hits = searcher.search(image, top_k=1)
            else:
                target = searcher.target()
                hits = searcher.search_vector(np.ones(DIMS[target.collection]), top_k=1, target=target)
            # The hit came from a search whose query had that collection's dimension (the fake refuses others).
            assert hits and hits[0].id.endswith("-hit")


def test_a_switch_between_embedding_and_searching_does_not_mix_models(tmp_path):
    """The race a model switch exposed: the alias read for the embedder said A, the one read for the search said
    B. One query resolves the alias once."""
    from PIL import Image

    image = tmp_path / "q.png"
    Image.new("RGB", (20, 20), (1, 2, 3)).save(image)
    with _searcher(["coll_a", "coll_b"]) as searcher:
        assert searcher.search(image, top_k=1)[0].id == "coll_a-hit"
        # The next query follows the switch, with B's model.
        assert searcher.search(image, top_k=1)[0].id == "coll_b-hit"
        assert searcher.embedder.model_version_label() == LABELS["coll_b"]
    with _searcher(["coll_a", "coll_b"]) as searcher:
        assert searcher.search_by_id("x", top_k=1)[0].id == "coll_a-hit"
