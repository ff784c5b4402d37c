"""One collection per model behind the search alias, without a server: names, labels, coverage, placement and
the switch rules, against an in-memory fake of the few Milvus calls involved."""

import re
from types import SimpleNamespace

import numpy as np
import pytest

from embedding_pipeline.index import client as client_module
from embedding_pipeline.index.client import MODEL_PROPERTY, CollectionError
from embedding_pipeline.index.collections import (
    NAME_MAX,
    ModelCollections,
    SwitchRefused,
    drop_model,
    embedded_counts,
    model_collection_name,
    model_slug,
)
from embedding_pipeline.serving.client import ModelLabel, same_model
from embedding_pipeline.settings import MilvusSettings
from embedding_pipeline.storage import arrow

A, B = "image_embedder:1@3f2a9c1b7d20", "image_embedder:1@00aa11bb22cc"


class FakeMilvus:
    """In-memory collections (dimension, properties, rows with drop and model) and aliases; one instance stands
    for the server, shared by every client the code opens."""

    def __init__(self):
        self.collections: dict[str, dict] = {}
        self.aliases: dict[str, str] = {}
        self.alias_moves: list[tuple[str, str]] = []

    # the calls ImageIndex and ModelCollections make
    def _name(self, name):
        return self.aliases.get(name, name)

    def list_aliases(self):
        return {"aliases": list(self.aliases)}

    def describe_alias(self, alias):
        return {"alias": alias, "collection_name": self.aliases[alias]}

    def create_alias(self, collection, alias):
        if alias in self.aliases or alias in self.collections:
            raise RuntimeError(f"alias {alias} exists")
        self.aliases[alias] = collection
        self.alias_moves.append((alias, collection))

    def alter_alias(self, collection, alias):
        self.aliases[alias] = collection
        self.alias_moves.append((alias, collection))

    def has_collection(self, name):
        return self._name(name) in self.collections

    def list_collections(self):
        return list(self.collections)

    def describe_collection(self, name):
        c = self.collections[self._name(name)]
        return {
            "collection_name": self._name(name),
            "properties": dict(c["properties"]),
            "fields": [
                {"name": "id", "type": SimpleNamespace(name="VARCHAR")},
                {"name": "embedding", "type": SimpleNamespace(name="FLOAT_VECTOR"), "params": {"dim": c["dim"]}},
            ]
            + ([{"name": "drops", "type": SimpleNamespace(name="ARRAY")}] if c.get("membership", True) else []),
        }

    def create_collection(self, name, schema, consistency_level, properties=None):
        dim = next(f.params["dim"] for f in schema.fields if f.name == "embedding")
        self.collections[name] = {"dim": dim, "properties": dict(properties or {}), "rows": {}}

    def prepare_index_params(self):
        from pymilvus import MilvusClient

        return MilvusClient.prepare_index_params()

    def create_index(self, *args, **kwargs):
        pass

    def describe_index(self, name, field):
        return {"index_type": "HNSW", "metric_type": "COSINE", "params": {}}

    def load_collection(self, name):
        pass

    def get_server_version(self):
        return "fake"

    def query(self, name, filter, output_fields, limit=None, **kwargs):
        rows = [r for r in self.collections[self._name(name)]["rows"].values() if _matches(r, filter)]
        if output_fields == ["count(*)"]:
            return [{"count(*)": len(rows)}]
        return rows[:limit] if limit else rows

    def close(self):
        pass

    # test helpers
    def add_rows(self, collection, drop, model, count):
        for i in range(count):
            self.collections[collection]["rows"][f"{drop}-{i}"] = {
                "id": f"{drop}-{i}",
                "drop": drop,
                "drops": [drop],
                "model": model,
            }


def _matches(row, expr):
    if not expr or expr == 'id != ""':
        return True
    contains = re.fullmatch(r'array_contains\((\w+), "(.*)"\)', expr)
    if contains:
        return contains.group(2) in row[contains.group(1)]
    field, op, value = re.fullmatch(r'(\w+) (==|!=) "(.*)"', expr).groups()
    return (row[field] == value) == (op == "==")


@pytest.fixture
def milvus(monkeypatch):
    fake = FakeMilvus()
    monkeypatch.setattr(client_module, "connect", lambda settings, timeout=30.0: fake)
    return fake


def collections() -> ModelCollections:
    return ModelCollections(MilvusSettings(uri="http://fake:19530", collection="image_embeddings"))


# -- names and labels -----------------------------------------------------------------------------------------


def test_collection_names_follow_the_model_label_and_milvus_rules():
    assert model_slug(A) == "image_embedder_1_3f2a9c1b7d20"
    assert model_collection_name("image_embeddings", A) == "image_embeddings__image_embedder_1_3f2a9c1b7d20"
    long_a, long_b = "m" * 300 + ":1@aa", "m" * 300 + ":1@bb"
    names = {model_collection_name("images", label) for label in (long_a, long_b)}
    assert len(names) == 2 and all(len(n) <= NAME_MAX and re.fullmatch(r"[A-Za-z_]\w*", n) for n in names)
    with pytest.raises(ValueError, match="not a valid Milvus name"):
        model_collection_name("1images", A)
    with pytest.raises(ValueError, match="no letters or digits"):
        model_slug(":@")


def test_labels_parse_and_compare_by_file_when_both_record_one():
    assert ModelLabel.parse(A) == ModelLabel("image_embedder", "1", "3f2a9c1b7d20")
    assert ModelLabel.parse("remote_model:3") == ModelLabel("remote_model", "3", "")
    # The archived name serves the same file: the same model.
    assert same_model(A, "image_embedder_3f2a9c1b7d20:1@3f2a9c1b7d20")
    assert not same_model(A, B)
    assert same_model("remote_model:3", "remote_model:3") and not same_model("remote_model:3", "remote_model:4")
    with pytest.raises(ValueError, match="not a model label"):
        ModelLabel.parse("no version here")


def _write_embeddings(data, drop, model, count, dim=4):
    with arrow.DropWriter(data / "embeddings" / drop) as writer:
        if count:
            rows = {
                "id": [f"{drop}-{i}" for i in range(count)],
                "drop": [drop] * count,
                "sha256": ["s"] * count,
                "uri": ["u"] * count,
                "model": [model] * count,
                "metadata": ["{}"] * count,
            }
            vectors = np.ones((count, dim), np.float32)
            writer.write(arrow.embedding_table(rows, vectors, arrow.embedding_schema(dim, {"model": model})))
        writer.commit()


def test_embedded_counts_know_which_drops_hold_the_models_embeddings(tmp_path):
    _write_embeddings(tmp_path, "new", B, 3)
    _write_embeddings(tmp_path, "old", A, 2)
    _write_embeddings(tmp_path, "empty", B, 0)
    counts = embedded_counts(tmp_path, ["new", "old", "empty", "never"], B)
    assert counts == {"new": 3, "old": None, "empty": 0, "never": None}
    assert drop_model(tmp_path, "old") == A and drop_model(tmp_path, "empty") is None


# -- placement and switch ---------------------------------------------------------------------------------------


def test_the_first_model_creates_its_collection_and_the_alias(milvus):
    with collections() as c:
        index, placement = c.index_for_model(A, 8)
        index.close()
    name_a = model_collection_name("image_embeddings", A)
    assert milvus.aliases == {"image_embeddings": name_a}
    assert milvus.collections[name_a]["properties"][MODEL_PROPERTY] == A
    assert (placement.collection, placement.search_collection, placement.switch_pending) == (name_a, name_a, False)


def test_a_new_model_gets_its_own_collection_while_search_stays(milvus):
    with collections() as c:
        for label, dim in ((A, 8), (B, 4)):
            index, placement = c.index_for_model(label, dim)
            index.close()
        name_a, name_b = (model_collection_name("image_embeddings", x) for x in (A, B))
        assert placement.collection == name_b and placement.search_collection == name_a and placement.switch_pending
        assert (milvus.collections[name_a]["dim"], milvus.collections[name_b]["dim"]) == (8, 4)
        assert c.names() == sorted([name_a, name_b]) and c.labels() == {A, B}


def test_a_collection_recorded_for_another_model_is_never_written(milvus):
    name = model_collection_name("image_embeddings", A)
    milvus.collections[name] = {"dim": 8, "properties": {MODEL_PROPERTY: "someone_else:1"}, "rows": {}}
    with collections() as c, pytest.raises(CollectionError, match="was made for model someone_else:1"):
        c.index_for_model(A, 8)


def test_the_switch_refuses_until_every_drop_is_there_then_moves_the_alias(milvus):
    with collections() as c:
        for label, dim in ((A, 8), (B, 4)):
            c.index_for_model(label, dim)[0].close()
        name_a, name_b = (model_collection_name("image_embeddings", x) for x in (A, B))
        milvus.add_rows(name_b, "cats", B, 3)
        expected = {"cats": 3, "dogs": 2, "birds": None}
        with pytest.raises(SwitchRefused) as refused:
            c.switch(name_b, expected)
        assert "lacks 2 of 3 drop(s)" in str(refused.value)
        assert "dogs (0 of 2 rows)" in str(refused.value) and "birds (not embedded" in str(refused.value)
        assert c.search_collection() == name_a

        forced = c.switch(name_b, expected, force=True)
        assert forced["forced"] and (forced["from"], forced["to"], forced["model"]) == (name_a, name_b, B)
        assert c.search_collection() == name_b

        milvus.add_rows(name_a, "cats", A, 3)
        back = c.switch(c.resolve_target(A), {"cats": 3})  # by label
        assert not back["forced"] and back["missing"] == [] and c.search_collection() == name_a
    assert milvus.alias_moves[-2:] == [("image_embeddings", name_b), ("image_embeddings", name_a)]


def test_switching_to_a_collection_that_does_not_exist_lists_every_drop(milvus):
    with collections() as c:
        c.index_for_model(A, 8)[0].close()
        with pytest.raises(SwitchRefused, match=r"does not exist yet: it lacks all 2 drop\(s\) \(cats, dogs\)"):
            c.switch(model_collection_name("image_embeddings", B), {"cats": 1, "dogs": 1}, force=True)
        with pytest.raises(CollectionError, match="no collection of 'image_embeddings' for 'nope:1'"):
            c.resolve_target("nope:1")


def test_a_legacy_collection_is_used_while_its_model_matches_and_refused_otherwise(milvus):
    milvus.collections["image_embeddings"] = {"dim": 8, "properties": {}, "rows": {}}
    milvus.add_rows("image_embeddings", "cats", A, 2)
    with collections() as c:
        assert c.is_legacy() and c.names() == ["image_embeddings"] and c.model_of("image_embeddings") == A
        index, placement = c.index_for_model(A, 8)
        index.close()
        assert placement.legacy and placement.collection == "image_embeddings" and not placement.switch_pending
        with pytest.raises(CollectionError, match=r"plain collection .* holding vectors of model " + re.escape(A)):
            c.index_for_model(B, 4)
        with pytest.raises(CollectionError, match="not an alias: there is nothing to switch"):
            c.switch("image_embeddings", {})
    assert milvus.aliases == {}


def test_a_drops_rows_are_found_in_the_collection_of_its_embeddings_model(milvus, tmp_path):
    from embedding_pipeline.index.collections import index_for_drop
    from embedding_pipeline.settings import Settings

    settings = Settings(home=tmp_path)
    milvus_settings = MilvusSettings(uri="http://fake:19530", collection="image_embeddings")
    with collections() as c:
        for label, dim in ((A, 4), (B, 4)):
            c.index_for_model(label, dim)[0].close()
    _write_embeddings(settings.paths.data, "cats", B, 2)
    with index_for_drop(settings, milvus_settings, "cats") as index:
        assert index.collection == model_collection_name("image_embeddings", B)
    with index_for_drop(settings, milvus_settings, "never-embedded") as index:
        assert index.collection == "image_embeddings"  # the alias: it holds none of the drop's rows
