"""ImageIndex without a server: connection settings, upsert batching, typed columns, and what it never does."""

from types import SimpleNamespace

import numpy as np
import pytest

from embedding_pipeline.index import client as client_module
from embedding_pipeline.index.client import (
    CollectionError,
    ImageIndex,
    _batches,
    _normalise_index,
    connection_kwargs,
    redact,
)
from embedding_pipeline.settings import ConfigError, MilvusSettings


class FakeMilvusClient:
    """Records calls; answers describe_collection with a schema that declares ``category`` (VARCHAR)."""

    def __init__(self, declared: bool = True):
        self.calls: list[tuple[str, int]] = []
        self.rows: dict[str, dict] = {}
        self.declared = declared

    def describe_collection(self, name):
        fields = [
            {"name": "id", "type": SimpleNamespace(name="VARCHAR")},
            {"name": "embedding", "type": SimpleNamespace(name="FLOAT_VECTOR"), "params": {"dim": 4}},
        ]
        if self.declared:
            fields += [
                {"name": "meta_category", "type": SimpleNamespace(name="VARCHAR")},
                {"name": "has_meta_category", "type": SimpleNamespace(name="BOOL")},
            ]
        return {"fields": fields}

    def has_collection(self, name):
        return True

    def upsert(self, name, rows):
        self.calls.append(("upsert", len(rows)))
        self.rows.update({r["id"]: r for r in rows})
        return {"upsert_count": len(rows)}

    def create_index(self, *args, **kwargs):
        self.calls.append(("create_index", 0))

    def query(self, name, filter, output_fields, **kwargs):
        self.calls.append(("query", 0))
        self.last_filter = filter
        return [{"count(*)": 0}]


def fake_index(settings: MilvusSettings, fake: FakeMilvusClient) -> ImageIndex:
    index = ImageIndex(settings)
    index._client = fake
    return index


def rows(n: int, dim: int = 4, metadata=None):
    return [
        {
            "id": f"r{i}",
            "embedding": np.ones(dim, np.float32),
            "uri": f"u{i}",
            "drop": "d",
            "metadata": metadata if metadata is not None else {"category": "nature"},
        }
        for i in range(n)
    ]


def test_batches_respect_rows_and_bytes():
    data = rows(10, dim=1000)  # ~4 KB a row
    assert [len(b) for b in _batches(data, 4, 10**9)] == [4, 4, 2]
    assert [len(b) for b in _batches(data, 100, 9000)] == [2, 2, 2, 2, 2]
    # A row over the byte budget still goes, alone (the engine's own limit is far higher).
    assert [len(b) for b in _batches(data, 100, 10)] == [1] * 10


def test_upsert_splits_by_bytes_and_never_builds_indexes(monkeypatch):
    monkeypatch.setattr(client_module, "MAX_UPSERT_BYTES", 50_000)
    fake = FakeMilvusClient()
    index = fake_index(MilvusSettings(filter_fields={"category": "VARCHAR"}), fake)
    assert index.upsert(rows(30, dim=1000)) == 30
    assert [c for c in fake.calls if c[0] == "upsert"] == [("upsert", 12), ("upsert", 12), ("upsert", 6)]
    assert not [c for c in fake.calls if c[0] == "create_index"]
    stored = fake.rows["r0"]
    assert stored["meta_category"] == "nature" and stored["has_meta_category"] is True
    assert stored["metadata"] == {"category": "nature"}


def test_wrong_typed_values_keep_the_row_and_are_reported():
    fake = FakeMilvusClient()
    index = fake_index(MilvusSettings(filter_fields={"category": "VARCHAR"}), fake)
    assert index.upsert(rows(2, metadata={"category": 7})) == 2
    assert fake.rows["r1"]["has_meta_category"] is False and fake.rows["r1"]["metadata"] == {"category": 7}
    assert [m.as_dict() for m in index.type_mismatches][0] == {
        "id": "r0",
        "key": "category",
        "declared": "VARCHAR",
        "reason": "expected a string, got int",
    }


def test_collection_declared_fields_are_used_even_if_settings_omit_them():
    fake = FakeMilvusClient()
    index = fake_index(MilvusSettings(), fake)
    index.count('metadata["category"] == "a"')
    assert fake.last_filter == '(has_meta_category == true and (meta_category == "a"))'


def test_declared_key_missing_from_the_collection_is_refused():
    index = fake_index(MilvusSettings(filter_fields={"year": "INT64"}), FakeMilvusClient(declared=False))
    with pytest.raises(CollectionError, match="without the declared filter field.*year \\(INT64\\).*new collection"):
        index.upsert(rows(1))


def test_bad_consistency_level_is_named():
    index = fake_index(MilvusSettings(), FakeMilvusClient())
    with pytest.raises(ValueError, match="consistency_level must be one of Strong, Session"):
        index.count("", consistency_level="strong-ish")


def test_redact_hides_passwords_only():
    assert redact("https://alice:s3cret@db.example.com:19530/x") == "https://alice:***@db.example.com:19530/x"
    assert redact("http://127.0.0.1:19530") == "http://127.0.0.1:19530"


def test_credentials_and_tls_settings(tmp_path):
    kw = connection_kwargs(MilvusSettings(uri="http://h:1", user="u", password="p", db_name="imgs"))
    assert kw["token"] == "u:p" and kw["db_name"] == "imgs" and "secure" not in kw
    assert connection_kwargs(MilvusSettings(uri="https://h:1", token="t"))["secure"] is True
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    kw = connection_kwargs(MilvusSettings(uri="http://h:1", secure=True, ca_pem_path=str(ca), server_name="db"))
    assert kw["secure"] is True and kw["server_pem_path"] == str(ca) and kw["server_name"] == "db"


@pytest.mark.parametrize(
    "values, needle",
    [
        ({"token": "t", "user": "u", "password": "hunter2-secret"}, "either milvus.token or milvus.user"),
        ({"user": "u"}, "milvus.user and milvus.password must be set together"),
        ({"ca_pem_path": "/x.pem"}, "TLS is off"),
        ({"secure": True, "ca_pem_path": "/nonexistent/ca.pem"}, "milvus.ca_pem_path: no certificate file at"),
    ],
)
def test_inconsistent_connection_settings_fail_before_connecting(values, needle):
    with pytest.raises(ConfigError) as err:
        ImageIndex(MilvusSettings(uri="http://h:1", **values))
    assert needle in str(err.value)
    assert "hunter2-secret" not in str(err.value)


def test_describe_index_shapes_are_normalised():
    nested = {"index_type": "HNSW", "metric_type": "COSINE", "params": {"M": 8, "efConstruction": 64}}
    flat = {"index_type": "HNSW", "metric_type": "COSINE", "M": "8", "efConstruction": "64", "state": "Finished"}
    as_text = {"index_type": "HNSW", "metric_type": "COSINE", "params": '{"M": 8, "efConstruction": 64}'}
    for raw in (nested, flat, as_text):
        assert _normalise_index(raw)["params"] == {"M": 8, "efConstruction": 64}
