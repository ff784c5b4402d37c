"""Drops, items, stage outputs, retention and placement in an S3-compatible bucket, against a real SeaweedFS server.

No Triton or Milvus: settings are built directly, the vector store and the Dagster registry are fakes, and the
preprocess stage gets a fixed model input. Every test works in a bucket of its own (the reader identity's bucket is
shared by the session, so tests there use a unique prefix).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from botocore.exceptions import ClientError
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from embedding_pipeline import ingest, retention
from embedding_pipeline import settings as settings_module
from embedding_pipeline.runtime.objects import ObjectPath, ObjectStore
from embedding_pipeline.settings import ObjectStoreSettings, PreprocessSettings, Settings, SourceSettings, object_store
from embedding_pipeline.sources import drops
from embedding_pipeline.sources.items import collect_items, content_id, is_transient
from embedding_pipeline.storage import arrow
from embedding_pipeline.storage.layout import MANIFEST_SCHEMA, drop_files
from embedding_pipeline_tests.images import encode
from embedding_pipeline_tests.integration.s3_server import S3Server
from embedding_pipeline_tests.unit.test_retention import FakeDropRows

pytestmark = pytest.mark.integration

MODEL_INPUT = ("UINT8", (16, 16, 3))
READER_PROFILE = "reader"


def solid(colour: tuple[int, int, int], fmt: str = "PNG", side: int = 16) -> bytes:
    """A small one-colour image (well under 2 KiB)."""
    return encode(np.full((side, side, 3), colour, np.uint8), fmt)


def noise(seed: int, side: int = 64) -> bytes:
    """A noisy PNG of ``side``² pixels: incompressible, so over 2 KiB from 32 pixels a side."""
    return encode(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def aws(seaweedfs: S3Server, monkeypatch, tmp_path) -> S3Server:
    """The admin identity in the standard variables, a ``reader`` profile for the reader identity, nothing read
    from the developer's own AWS files, and a fresh store cache (a store holds the credentials it was made with)."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    credentials = tmp_path / "aws-credentials"
    credentials.write_text(
        f"[{READER_PROFILE}]\naws_access_key_id = {seaweedfs.reader_access_key}\n"
        f"aws_secret_access_key = {seaweedfs.reader_secret_key}\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    env = seaweedfs.env()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.setattr(settings_module, "_STORES", {})
    return seaweedfs


@pytest.fixture
def bucket(aws: S3Server) -> str:
    return aws.make_bucket("objects")


def make_settings(
    server: S3Server,
    home: Path,
    drops_dir: str | None = None,
    outputs_uri: str | None = None,
    profile: str = "",
    **sources,
) -> Settings:
    return Settings(
        home=home,
        drops_dir=drops_dir,
        outputs_uri=outputs_uri,
        s3=ObjectStoreSettings(endpoint_url=server.endpoint, region=server.region, profile=profile, max_attempts=2),
        sources=SourceSettings(**sources),
    )


def keys(server: S3Server, bucket: str, prefix: str = "") -> list[str]:
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def etag(server: S3Server, bucket: str, key: str) -> str:
    return server.client().head_object(Bucket=bucket, Key=key)["ETag"].strip('"')


def modified(server: S3Server, bucket: str, key: str) -> float:
    return server.client().head_object(Bucket=bucket, Key=key)["LastModified"].timestamp()


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


# -- drops as prefixes and manifest objects ----------------------------------------------------------------------


def test_scan_finds_prefix_and_manifest_drops_and_skips_invalid_hidden_and_in_flight_names(aws, bucket, tmp_path):
    for key in [
        "drops/",  # folder markers, as consoles create them
        "drops/cats/",
        "drops/cats/a.png",
        "drops/cats/nested/b.png",
        "drops/dogs/a.png",
        "drops/dogs/_READY",
        "drops/list.jsonl",
        "drops/Table.CSV",
        "drops/notes.txt",  # an object that is no manifest
        "drops/bad name/x.png",
        "drops/-dash/x.png",
        "drops/.hidden/x.png",
        "drops/.DS_Store",
        "drops/upload.jsonl.part",
        "drops/copying.tmp/x.png",
        "drops-old/stale/x.png",  # beside the drops prefix, not under it
        "elsewhere/x.png",
    ]:
        aws.put(bucket, key, b"x")
    settings = make_settings(aws, tmp_path / "home", f"s3://{bucket}/drops")
    location = settings.drops_location
    assert isinstance(location, ObjectPath) and str(location) == f"s3://{bucket}/drops"

    found, invalid = drops.scan(location)
    assert [d.name for d in found] == ["Table.CSV", "cats", "dogs", "list.jsonl"]
    assert invalid == ["-dash", "bad name", "notes.txt"]
    by_name = {d.name: d for d in found}
    assert [by_name[n].is_manifest for n in ("Table.CSV", "cats", "dogs", "list.jsonl")] == [True, False, False, True]
    assert str(by_name["cats"].path) == f"s3://{bucket}/drops/cats"
    assert str(by_name["cats"].root) == f"s3://{bucket}/drops/cats"
    assert str(by_name["list.jsonl"].root) == f"s3://{bucket}/drops"  # relative rows name objects beside it

    # An empty or missing drops prefix has no drops.
    assert drops.scan(object_store(settings.s3).path(f"s3://{bucket}/nothing-here")) == ([], [])


def test_completeness_by_ready_marker_and_by_settle_time(aws, bucket, tmp_path):
    aws.put(bucket, "drops/cats/a.png", b"a")
    aws.put(bucket, "drops/cats/sub/b.png", b"b")
    aws.put(bucket, "drops/dogs/a.png", b"a")
    aws.put(bucket, "drops/dogs/_READY", b"")
    aws.put(bucket, "drops/list.jsonl", b"{}\n")
    location = make_settings(aws, tmp_path / "home", f"s3://{bucket}/drops").drops_location
    cats, dogs, listed = (drops.find_drop(location, n) for n in ("cats", "dogs", "list.jsonl"))
    newest = max(modified(aws, bucket, k) for k in ("drops/cats/a.png", "drops/cats/sub/b.png"))
    written = modified(aws, bucket, "drops/list.jsonl")

    # The marker completes a folder drop whatever the time.
    assert drops.is_complete(dogs, settle_s=3600, now=newest)
    # Without a marker: complete once its newest object is settle_s old (LastModified, no sleeping).
    assert not drops.is_complete(cats, settle_s=10, now=newest + 5)
    assert drops.is_complete(cats, settle_s=10, now=newest + 10)
    assert not drops.is_complete(listed, settle_s=10, now=written + 5)
    assert drops.is_complete(listed, settle_s=10, now=written + 10)

    # complete_drops: drops already known are skipped; a long settle time leaves only marked drops.
    assert [d.name for d in drops.complete_drops(location, settle_s=3600)] == ["dogs"]
    assert [d.name for d in drops.complete_drops(location, settle_s=0)] == ["cats", "dogs", "list.jsonl"]
    assert [d.name for d in drops.complete_drops(location, settle_s=0, known={"cats", "list.jsonl"})] == ["dogs"]
    aws.put(bucket, "drops/cats/_READY", b"")
    assert [d.name for d in drops.complete_drops(location, settle_s=3600)] == ["cats", "dogs"]
    assert [d.name for d in drops.complete_drops(location, settle_s=3600, known={"dogs"})] == ["cats"]


def test_drop_signature_follows_the_objects_but_not_the_marker_or_ignored_names(aws, bucket, tmp_path):
    aws.put(bucket, "drops/cats/a.png", b"a" * 10)
    aws.put(bucket, "drops/cats/sub/b.png", b"b" * 10)
    aws.put(bucket, "drops/list.jsonl", b'{"uri": "x"}\n')
    location = make_settings(aws, tmp_path / "home", f"s3://{bucket}/drops").drops_location
    cats = drops.find_drop(location, "cats")
    listed = drops.find_drop(location, "list.jsonl")

    first = drops.drop_signature(cats)
    assert first == drops.drop_signature(cats) and len(first) == 16
    # The marker, hidden objects and in-flight uploads are not part of what the drop holds.
    aws.put(bucket, "drops/cats/_READY", b"")
    aws.put(bucket, "drops/cats/.hidden.png", b"h")
    aws.put(bucket, "drops/cats/.cache/c.png", b"c")
    aws.put(bucket, "drops/cats/d.png.part", b"d")
    aws.put(bucket, "drops/cats.b/other.png", b"o")  # a neighbour whose name starts the same
    assert drops.drop_signature(cats) == first
    # A rewrite of the same size with other bytes is a change (the ETag), and so are additions and removals.
    aws.put(bucket, "drops/cats/a.png", b"A" * 10)
    rewritten = drops.drop_signature(cats)
    assert rewritten != first
    aws.put(bucket, "drops/cats/new.png", b"n")
    added = drops.drop_signature(cats)
    assert added not in (first, rewritten)
    aws.client().delete_object(Bucket=bucket, Key="drops/cats/new.png")
    assert drops.drop_signature(cats) == rewritten

    manifest_first = drops.drop_signature(listed)
    aws.put(bucket, "drops/list.jsonl", b'{"uri": "y"}\n')
    assert drops.drop_signature(listed) != manifest_first


def test_find_drop_in_a_bucket(aws, bucket, tmp_path):
    aws.put(bucket, "drops/cats/a.png", b"a")
    aws.put(bucket, "drops/list.jsonl", b"")
    aws.put(bucket, "drops/notes.txt", b"n")
    location = make_settings(aws, tmp_path / "home", f"s3://{bucket}/drops").drops_location
    cats = drops.find_drop(location, "cats")
    assert cats == drops.Drop("cats", location / "cats") and not cats.is_manifest
    listed = drops.find_drop(location, "list.jsonl")
    assert listed.is_manifest and listed.path.key == "drops/list.jsonl"
    for missing in ["dogs", "notes.txt", "../cats", "cats/a.png", ".hidden", "bad name", "cat"]:
        with pytest.raises(FileNotFoundError, match="no drop named"):
            drops.find_drop(location, missing)


# -- items ---------------------------------------------------------------------------------------------------------


def test_items_of_a_prefix_drop(aws, bucket, tmp_path):
    images = {
        "drops/mixed/a.png": solid((200, 0, 0)),
        "drops/mixed/b.jpg": solid((0, 200, 0), "JPEG"),
        "drops/mixed/nested/c.png": solid((0, 0, 200)),
    }
    for key, data in images.items():
        aws.put(bucket, key, data)
    aws.put(bucket, "drops/mixed/notes.txt", b"not an image")
    aws.put(bucket, "drops/mixed/fake.png", b"just some text named like an image")
    aws.put(bucket, "drops/mixed/data.csv", b"name,value\nx,1\n")  # no uri column: data, not a manifest
    manifest = [
        {"uri": "a.png", "id": "alpha", "metadata": {"colour": "red"}},
        {"uri": "missing.png", "id": "gone"},
    ]
    aws.put(bucket, "drops/mixed/list.jsonl", jsonl(manifest) + b"{not json\n")
    for key in ["drops/mixed/.hidden.png", "drops/mixed/.cache/d.png", "drops/mixed/nested/e.png.part"]:
        aws.put(bucket, key, solid((9, 9, 9)))
    aws.put(bucket, "drops/mixed/_READY", b"")
    aws.put(bucket, "drops/mixed/nested/", b"")  # a folder marker
    settings = make_settings(aws, tmp_path / "home", f"s3://{bucket}/drops")
    drop = drops.find_drop(settings.drops_location, "mixed")

    items = collect_items(drop, settings.sources, tmp_path / "blobs", object_store(settings.s3))

    assert len(items) == 8  # the manifest's object is its item only, not a loose one too
    prefix = f"s3://{bucket}/drops/mixed/"
    by_uri = {i.uri.removeprefix(prefix): i for i in items}
    assert sorted(by_uri) == [
        "",  # the unparseable manifest row has no uri
        "a.png",
        "b.jpg",
        "data.csv",
        "fake.png",
        "missing.png",
        "nested/c.png",
        "notes.txt",
    ]
    for key, data in images.items():
        item = by_uri[key.removeprefix("drops/mixed/")]
        assert (item.status, item.error_kind, item.error) == ("ok", "", "")
        assert item.sha256 == sha(data) and item.size == len(data)
        assert item.file_id == etag(aws, bucket, key) and item.file_id
        assert item.source == item.uri == f"s3://{bucket}/{key}"
    # The manifest's row gives its item an id and metadata; loose objects get content ids.
    assert by_uri["a.png"].id == "alpha" and by_uri["a.png"].metadata == {"colour": "red"}
    assert by_uri["b.jpg"].id == content_id(by_uri["b.jpg"].sha256)
    kinds = {uri: (i.status, i.error_kind) for uri, i in by_uri.items()}
    assert kinds["notes.txt"] == ("skipped", "ignored")
    assert kinds["data.csv"] == ("skipped", "ignored")
    assert kinds["fake.png"] == ("failed", "not_image")
    assert kinds["missing.png"] == ("failed", "not_found")
    assert kinds[""] == ("failed", "bad_row")
    assert not (tmp_path / "blobs").exists()  # objects are not copied into the local blob store


def test_manifest_object_listing_s3_items_within_and_outside_the_allowed_prefixes(aws, bucket, tmp_path):
    good_own, good_lib = solid((10, 20, 30)), solid((30, 20, 10), "JPEG")
    aws.put(bucket, "drops/photos/own.png", good_own)
    aws.put(bucket, "library/ok.jpg", good_lib)
    aws.put(bucket, "library/big.png", noise(1))
    aws.put(bucket, "library/text.png", b"plain text")
    aws.put(bucket, "library.b/x.png", solid((1, 2, 3)))
    aws.put(bucket, "private/x.png", solid((4, 5, 6)))
    assert len(noise(1)) > 2048
    rows = [
        {"uri": "photos/own.png", "id": "own"},  # relative: beside the manifest, inside the drop's own prefix
        {"uri": f"s3://{bucket}/library/ok.jpg", "id": "lib", "metadata": {"k": 1}},
        {"uri": f"s3://{bucket}/library.b/x.png", "id": "lookalike"},
        {"uri": f"s3://{bucket}/private/x.png", "id": "private"},
        {"uri": f"s3://{bucket}/library/../private/x.png", "id": "dotdot"},
        {"uri": "../private/x.png", "id": "relative-dotdot"},
        {"uri": f"s3://{bucket}/library/missing.png", "id": "missing"},
        {"uri": f"s3://{bucket}/library/big.png", "id": "big"},
        {"uri": f"s3://{bucket}/library/text.png", "id": "text"},
        {"uri": "s3://NO_SUCH/x.png", "id": "bad-bucket"},
        {"uri": "/etc/hostname", "id": "local-file"},  # a manifest in a bucket reads no local files
        {"uri": "file:///etc/hostname", "id": "file-url"},
    ]
    aws.put(bucket, "drops/list.jsonl", jsonl(rows))
    settings = make_settings(
        aws,
        tmp_path / "home",
        f"s3://{bucket}/drops",
        allowed_prefixes=[f"s3://{bucket}/library"],
        max_image_bytes=2048,
    )
    drop = drops.find_drop(settings.drops_location, "list.jsonl")

    items = {i.id: i for i in collect_items(drop, settings.sources, tmp_path / "blobs", object_store(settings.s3))}

    assert {k: (i.status, i.error_kind) for k, i in items.items()} == {
        "own": ("ok", ""),
        "lib": ("ok", ""),
        "lookalike": ("failed", "outside_roots"),
        "private": ("failed", "outside_roots"),
        "dotdot": ("failed", "bad_url"),
        "relative-dotdot": ("failed", "bad_url"),
        "missing": ("failed", "not_found"),
        "big": ("failed", "too_large"),
        "text": ("failed", "not_image"),
        "bad-bucket": ("failed", "bad_url"),
        "local-file": ("failed", "outside_roots"),
        "file-url": ("failed", "bad_url"),
    }
    assert items["own"].uri == f"s3://{bucket}/drops/photos/own.png"
    for item_id, key, data in [("own", "drops/photos/own.png", good_own), ("lib", "library/ok.jpg", good_lib)]:
        item = items[item_id]
        assert item.sha256 == sha(data) and item.size == len(data) and item.file_id == etag(aws, bucket, key)
    assert items["lib"].metadata == {"k": 1}
    assert "2048" in items["big"].error
    assert not any(is_transient(i.error_kind) for i in items.values() if i.status == "failed")


def test_objects_the_credentials_may_not_read_fail_as_access_denied_which_is_transient(aws, tmp_path):
    """The reader identity may read its own bucket only: an object in another bucket is ``access_denied``, for a
    manifest in a bucket and for a local manifest alike, and the readable items still land."""
    private = aws.make_bucket("private")
    aws.put(private, "secret.png", solid((7, 7, 7)))
    shared = f"t-{secrets.token_hex(4)}"  # the reader's bucket is the session's
    readable = solid((70, 80, 90))
    aws.put(aws.reader_bucket, f"{shared}/drops/own.png", readable)
    aws.put(aws.reader_bucket, f"{shared}/lib/ok.png", readable)
    rows = [
        {"uri": "own.png", "id": "own"},
        {"uri": f"s3://{aws.reader_bucket}/{shared}/lib/ok.png", "id": "lib"},
        {"uri": f"s3://{private}/secret.png", "id": "secret"},
    ]
    aws.put(aws.reader_bucket, f"{shared}/drops/list.jsonl", jsonl(rows))
    allowed = [f"s3://{aws.reader_bucket}/{shared}/lib", f"s3://{private}"]
    settings = make_settings(
        aws,
        tmp_path / "home",
        f"s3://{aws.reader_bucket}/{shared}/drops",
        profile=READER_PROFILE,
        allowed_prefixes=allowed,
    )
    store = object_store(settings.s3)
    with pytest.raises(ClientError):  # the profile's store is the reader's, not the admin's of the environment
        store.client.list_objects_v2(Bucket=private)

    drop = drops.find_drop(settings.drops_location, "list.jsonl")
    items = {i.id: i for i in collect_items(drop, settings.sources, tmp_path / "blobs", store)}
    assert {k: (i.status, i.error_kind) for k, i in items.items()} == {
        "own": ("ok", ""),
        "lib": ("ok", ""),
        "secret": ("failed", "access_denied"),
    }
    assert is_transient(items["secret"].error_kind)
    assert f"s3://{private}/secret.png" in items["secret"].error
    for item_id in ("own", "lib"):
        assert items[item_id].sha256 == sha(readable) and items[item_id].file_id

    # A local manifest drop listing objects: the same outcome, through the store handed in.
    local_drops = tmp_path / "local-drops"
    folder = local_drops / "mixed"
    folder.mkdir(parents=True)
    local_image = solid((90, 80, 70))
    (folder / "local.png").write_bytes(local_image)
    (folder / "list.jsonl").write_bytes(jsonl(rows[1:] + [{"uri": "local.png", "id": "local"}]))
    local = collect_items(drops.find_drop(local_drops, "mixed"), settings.sources, tmp_path / "blobs", store)
    by_id = {i.id: i for i in local}
    assert {k: (i.status, i.error_kind) for k, i in by_id.items()} == {
        "lib": ("ok", ""),
        "secret": ("failed", "access_denied"),
        "local": ("ok", ""),
    }
    assert by_id["local"].sha256 == sha(local_image) and by_id["lib"].file_id == items["lib"].file_id
    # Without the prefix among sources.allowed_prefixes a local manifest may not read the bucket at all.
    narrow = settings.sources.model_copy(update={"allowed_prefixes": []})
    refused = {i.id: i for i in collect_items(drops.find_drop(local_drops, "mixed"), narrow, tmp_path / "b", store)}
    assert refused["lib"].error_kind == "outside_roots" and refused["secret"].error_kind == "outside_roots"


def test_the_standard_variables_alone_reach_the_store(aws, bucket, tmp_path, monkeypatch):
    """An empty ``s3`` section: boto3 takes the endpoint and credentials from AWS_* (a store of its own config)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws.endpoint)
    aws.put(bucket, "drops/cats/a.png", b"a")
    settings = Settings(home=tmp_path / "home", drops_dir=f"s3://{bucket}/drops")
    assert settings.s3 == ObjectStoreSettings()
    assert [d.name for d in drops.scan(settings.drops_location)[0]] == ["cats"]


# -- stage outputs ---------------------------------------------------------------------------------------------------


def table_of(values: list[int]) -> pa.Table:
    return pa.table({"v": pa.array(values, pa.int64()), "s": pa.array([str(v) for v in values], pa.string())})


def attempts(server: S3Server, folder: ObjectPath) -> set[str]:
    found = {k[len(folder.prefix) :].split("/")[0] for k in keys(server, folder.bucket, folder.prefix)}
    return found - {arrow.COMMIT}


def test_object_writer_commits_and_readers_see_only_commits(aws, bucket, tmp_path):
    store = object_store(make_settings(aws, tmp_path / "home").s3)
    folder = store.path(f"s3://{bucket}/out/preprocessed/cats")
    assert not arrow.folder_exists(folder) and arrow.batch_files(folder) == []
    assert arrow.read_json(folder, "failures.json", "none") == "none"

    first = arrow.open_writer(folder)
    assert isinstance(first, arrow.ObjectDropWriter)
    tables = [table_of([1, 2, 3]), table_of([4]), table_of([])]
    for t in tables:
        first.write(t)
    first.add_json("failures.json", [{"id": "x", "error_kind": "not_image"}])
    # Written but not committed: nothing to read yet.
    assert attempts(aws, folder) == {first.attempt}
    assert list(arrow.read_batches(folder)) == [] and not arrow.folder_exists(folder)
    files = first.commit()
    assert [p.name for p in files] == ["batch-00000.arrow", "batch-00001.arrow", "batch-00002.arrow"]
    assert arrow.folder_exists(folder)
    assert [t.equals(u) for t, u in zip(arrow.read_batches(folder), tables)] == [True] * 3
    assert [t.column_names for t in arrow.read_batches(folder, columns=["v"])] == [["v"]] * 3
    assert arrow.read_json(folder, "failures.json") == [{"id": "x", "error_kind": "not_image"}]
    assert arrow.read_json(folder, "reused.json", []) == []  # not part of the commit
    committed = json.loads((folder / arrow.COMMIT).read_bytes())
    assert committed["attempt"] == first.attempt and committed["previous"] is None
    assert committed["files"] == [p.name for p in files] and committed["side"] == ["failures.json"]

    # A second attempt is interrupted after writing: its objects are there, but readers see the first commit.
    second = arrow.open_writer(folder)
    second.write(table_of([99]))
    second.add_json("failures.json", [])
    del second
    assert len(attempts(aws, folder)) == 2
    assert [t.equals(u) for t, u in zip(arrow.read_batches(folder), tables)] == [True] * 3
    assert len(arrow.batch_files(folder)) == 3
    assert arrow.read_json(folder, "failures.json") == [{"id": "x", "error_kind": "not_image"}]
    # An attempt that fails inside the writer's block removes its own objects.
    with pytest.raises(RuntimeError), arrow.open_writer(folder) as failing:
        failing.write(table_of([7]))
        raise RuntimeError("stage failed")
    assert failing.attempt not in attempts(aws, folder)
    assert [t.equals(u) for t, u in zip(arrow.read_batches(folder), tables)] == [True] * 3

    third = arrow.open_writer(folder)
    third.write(table_of([5, 6]))
    third.commit()
    assert [t.column("v").to_pylist() for t in arrow.read_batches(folder)] == [[5, 6]]
    assert arrow.read_json(folder, "failures.json", "none") == "none"
    # The interrupted attempt went with this commit; the one it replaced stays for readers still on it.
    assert attempts(aws, folder) == {first.attempt, third.attempt}

    fourth = arrow.open_writer(folder)
    fourth.write(table_of([8]))
    fourth.add_json("kept.json", {"a": ["b"]})
    fourth.commit()
    assert [t.column("v").to_pylist() for t in arrow.read_batches(folder)] == [[8]]
    assert arrow.read_json(folder, "kept.json") == {"a": ["b"]}
    assert attempts(aws, folder) == {third.attempt, fourth.attempt}
    # A neighbour whose name starts the same is never touched by the clean-up.
    assert keys(aws, bucket, "out/preprocessed/cats.b/") == []


def test_single_file_tables_and_json_round_trip_in_a_bucket(aws, bucket, tmp_path):
    store = object_store(make_settings(aws, tmp_path / "home").s3)
    out = store.path(f"s3://{bucket}/out")
    table = table_of([3, 1, 2])
    arrow.write_table(out / "manifests" / "cats.arrow", table)
    assert arrow.read_table(out / "manifests" / "cats.arrow").equals(table)
    arrow.write_parquet(out / "duplicates" / "cats.parquet", table)
    assert arrow.read_parquet(out / "duplicates" / "cats.parquet").equals(table)
    arrow.write_json(out / "index" / "cats.json", {"id_conflicts": [1]})
    assert arrow.read_json_file(out / "index" / "cats.json") == {"id_conflicts": [1]}
    assert arrow.read_json_file(out / "index" / "dogs.json") is None
    assert sorted(keys(aws, bucket)) == [
        "out/duplicates/cats.parquet",
        "out/index/cats.json",
        "out/manifests/cats.arrow",
    ]


def test_object_writer_model(aws, bucket, tmp_path):
    """Any sequence of attempts (written, committed, abandoned with or without clean-up) and reads: a reader
    always sees exactly the last commit, and after a commit only it and the one it replaced remain."""
    store = object_store(make_settings(aws, tmp_path / "home").s3)

    class ObjectWriterMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.folder = store.path(f"s3://{bucket}/model/{uuid.uuid4().hex[:12]}")
            self.writer: arrow.ObjectDropWriter | None = None
            self.pending: list[list[int]] = []
            self.pending_side: dict[str, object] = {}
            self.committed: list[list[int]] = []
            self.committed_side: dict[str, object] = {}
            self.current: str | None = None
            self.previous: str | None = None
            self.stored: set[str] = set()  # attempts that put objects (an empty attempt leaves no prefix)

        @precondition(lambda self: self.writer is None)
        @rule()
        def start(self) -> None:
            self.writer = arrow.open_writer(self.folder)
            self.pending, self.pending_side = [], {}

        @precondition(lambda self: self.writer is not None)
        @rule(values=st.lists(st.integers(-(2**40), 2**40), max_size=4))
        def write(self, values: list[int]) -> None:
            self.writer.write(table_of(values))
            self.pending.append(values)
            self.stored.add(self.writer.attempt)

        @precondition(lambda self: self.writer is not None)
        @rule(name=st.sampled_from(["failures.json", "kept.json"]), value=st.integers() | st.text(max_size=4))
        def side(self, name: str, value: object) -> None:
            self.writer.add_json(name, value)
            self.pending_side[name] = value
            self.stored.add(self.writer.attempt)

        @precondition(lambda self: self.writer is not None)
        @rule()
        def commit(self) -> None:
            self.writer.commit()
            self.previous, self.current = self.current, self.writer.attempt
            self.committed, self.committed_side = self.pending, self.pending_side
            self.writer = None
            assert attempts(aws, self.folder) == {self.current, self.previous} & self.stored

        @precondition(lambda self: self.writer is not None)
        @rule(clean_up=st.booleans())
        def abandon(self, clean_up: bool) -> None:
            if clean_up:
                self.writer.abort()
                assert self.writer.attempt not in attempts(aws, self.folder)
            self.writer = None  # otherwise its objects stay, as after a crash

        @invariant()
        def reads_equal_the_last_commit(self) -> None:
            assert [t.column("v").to_pylist() for t in arrow.read_batches(self.folder)] == self.committed
            for name in ("failures.json", "kept.json"):
                assert arrow.read_json(self.folder, name, "absent") == self.committed_side.get(name, "absent")
            assert arrow.folder_exists(self.folder) == (self.current is not None)

    run_state_machine_as_test(
        ObjectWriterMachine, settings=hypothesis_settings(max_examples=15, stateful_step_count=8, deadline=None)
    )


# -- retention -----------------------------------------------------------------------------------------------------


class FakeRegistry:
    """A fake Dagster registry: the set of partitions, no runs in progress, history kept."""

    def __init__(self, partitions: set[str]):
        self.partitions = set(partitions)

    def is_partition(self, drop: str) -> bool:
        return drop in self.partitions

    def runs_in_progress(self, drop: str, this_run: str | None = None) -> list[str]:
        return []

    def wipe_history(self, drop: str) -> str:
        return "kept (fake registry)"

    def delete_partition(self, drop: str) -> None:
        self.partitions.discard(drop)


def _ingested_in_bucket(settings: Settings, drop: str) -> None:
    """What an ingest run leaves in the bucket: the source prefix and every stage output."""
    source = settings.drops_location / drop
    (source / "photo.jpg").write_bytes(b"12345")
    (source / "_READY").write_bytes(b"")
    files = drop_files(settings, drop)
    n = 2
    arrow.write_table(
        files.manifest,
        pa.Table.from_pydict(
            {
                "id": [f"{drop}-{i}" for i in range(n)],
                "uri": [f"{source}/photo.jpg"] * n,
                "metadata": ["{}"] * n,
                "sha256": ["c" * 64] * n,
                "size": [5] * n,
                "source": [str(source)] * n,
                "file_id": ["etag"] * n,
                "status": ["ok"] * n,
                "error": [""] * n,
                "error_kind": [""] * n,
            },
            schema=MANIFEST_SCHEMA,
        ),
    )
    for folder in (files.preprocessed, files.embeddings):
        writer = arrow.open_writer(folder)
        writer.write(table_of([1, 2]))
        writer.add_json("failures.json", [])
        writer.commit()
    arrow.write_json(files.index_report, {"id_conflicts": []})
    arrow.write_parquet(files.duplicates, table_of([1]))


def test_retention_removes_a_drop_in_the_bucket_and_nothing_named_like_it(aws, bucket, tmp_path):
    settings = make_settings(aws, tmp_path / "home", f"s3://{bucket}/drops", f"s3://{bucket}/out")
    for name in ("cats", "cats.b", "xcats"):
        _ingested_in_bucket(settings, name)
    aws.put(bucket, "drops/cats.jsonl", b'{"uri": "cats/photo.jpg"}\n')  # a manifest drop of its own
    before = set(keys(aws, bucket))
    own = {
        k
        for k in before
        if k.startswith(("drops/cats/", "out/preprocessed/cats/", "out/embeddings/cats/"))
        or k in ("out/manifests/cats.arrow", "out/index/cats.json", "out/duplicates/cats.parquet")
    }
    rows = FakeDropRows({"image_embeddings": {"cats": 2, "xcats": 1}, "image_embeddings__m": {"cats": 3}})
    registry = FakeRegistry({"cats", "cats.b", "xcats", "cats.jsonl"})

    plan = retention.plan_drop_deletion(settings, "cats", registry, rows=rows)
    by_kind = {p.kind: p for p in plan.paths}
    assert list(by_kind) == ["source", "manifest", "preprocessed", "embeddings", "index", "duplicates"]
    assert str(by_kind["source"].path) == f"s3://{bucket}/drops/cats"
    assert (by_kind["source"].files, by_kind["source"].bytes) == (2, 5)
    assert by_kind["manifest"].files == 1
    assert by_kind["preprocessed"].files == 3  # the commit, its batch and its side file
    assert plan.files == len(own)
    assert plan.rows == {"image_embeddings": 2, "image_embeddings__m": 3} and plan.partition
    json.dumps(plan.as_dict())
    assert set(keys(aws, bucket)) == before and rows.deleted == []  # planning touches nothing

    result = retention.delete_drop(settings, "cats", registry, rows=rows)
    assert set(keys(aws, bucket)) == before - own
    assert result.deleted_rows == {"image_embeddings": 2, "image_embeddings__m": 3}
    assert result.partition_deleted and registry.partitions == {"cats.b", "xcats", "cats.jsonl"}
    assert rows.counts == {"image_embeddings": {"xcats": 1}, "image_embeddings__m": {}}
    # The neighbours are whole: their outputs still read back.
    for name in ("cats.b", "xcats"):
        assert [t.column("v").to_pylist() for t in arrow.read_batches(drop_files(settings, name).embeddings)] == [
            [1, 2]
        ]
    assert drops.find_drop(settings.drops_location, "cats.jsonl").is_manifest
    assert not (tmp_path / "home" / "data").exists()
    with pytest.raises(retention.UnknownDropError):
        retention.plan_drop_deletion(settings, "cats", registry, rows=rows)

    # A manifest drop is its one object.
    remaining = set(keys(aws, bucket))
    result = retention.delete_drop(settings, "cats.jsonl", registry, rows=rows)
    assert [(p.kind, str(p.path), p.files) for p in result.plan.paths] == [
        ("source", f"s3://{bucket}/drops/cats.jsonl", 1)
    ]
    assert set(keys(aws, bucket)) == remaining - {"drops/cats.jsonl"}


# -- the manifest and preprocess stages ----------------------------------------------------------------------------


class FakeEmbedder:
    """Mean colour per image as a 3-d vector (a fake: no model, no server)."""

    def embed(self, batch: np.ndarray) -> np.ndarray:
        colours = batch.reshape(len(batch), -1, 3).mean(axis=1).astype(np.float32) + 1e-3
        return colours / np.linalg.norm(colours, axis=1, keepdims=True)

    def model_version_label(self) -> str:
        return "fake:1"


def test_manifest_and_preprocess_stages_read_from_and_write_to_the_bucket(aws, bucket, tmp_path):
    home = tmp_path / "home"
    settings = make_settings(aws, home, f"s3://{bucket}/drops", f"s3://{bucket}/out").model_copy(
        update={"preprocess": PreprocessSettings(batch_size=2)}
    )
    images = {f"img{i}.png": solid(colour) for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)])}
    for name, data in images.items():
        aws.put(bucket, f"drops/photos/{name}", data)
    aws.put(bucket, "drops/photos/broken.png", b"\x89PNG\r\n\x1a\n truncated")
    aws.put(bucket, "drops/photos/notes.txt", b"n")
    aws.put(bucket, "drops/photos/_READY", b"")

    manifest = ingest.build_manifest(settings, "photos")
    assert (manifest.items, manifest.ok, manifest.failed, manifest.skipped) == (5, 3, 1, 1)
    assert manifest.bytes == sum(len(d) for d in images.values())
    items = {i.uri.rsplit("/", 1)[-1]: i for i in ingest.read_manifest(settings, "photos")}
    for name, data in images.items():
        assert items[name].sha256 == sha(data) and items[name].file_id == etag(aws, bucket, f"drops/photos/{name}")

    pre = ingest.preprocess_drop(settings, "photos", MODEL_INPUT, "fake:1")
    assert (pre.images, pre.batches, pre.failed) == (3, 2, 0)
    folder = drop_files(settings, "photos").preprocessed
    assert isinstance(folder, ObjectPath)
    tables = list(arrow.read_batches(folder))
    assert sum(t.num_rows for t in tables) == 3
    assert {u.rsplit("/", 1)[-1] for t in tables for u in t.column("uri").to_pylist()} == set(images)
    assert arrow.tensors_of(tables[0]).shape[1:] == MODEL_INPUT[1]
    assert arrow.read_json(folder, "failures.json") == []

    # Outputs only under outputs_uri; nothing under the local data or drops folders.
    outside = [k for k in keys(aws, bucket) if not k.startswith(("drops/", "out/"))]
    assert outside == []
    written = keys(aws, bucket, "out/")
    assert "out/manifests/photos.arrow" in written and "out/preprocessed/photos/_COMMIT.json" in written
    assert not (home / "data").exists() and not (home / "drops").exists()

    # Objects replaced or removed after the manifest stage are refused, never embedded under their old hash.
    aws.put(bucket, "drops/photos/img0.png", solid((1, 1, 1)))
    aws.client().delete_object(Bucket=bucket, Key="drops/photos/img1.png")
    pre = ingest.preprocess_drop(settings, "photos", MODEL_INPUT, "fake:1")
    assert (pre.images, pre.failed) == (1, 2)
    assert pre.failures_by_kind == {"source_changed": 2}
    failures = {f["uri"].rsplit("/", 1)[-1]: f for f in arrow.read_json(folder, "failures.json")}
    assert sorted(failures) == ["img0.png", "img1.png"]
    # The read is pinned to the listed version (ETag): the store itself refuses the new one.
    assert "changed since the drop was listed (source_changed)" in failures["img0.png"]["error"]
    assert "changed since the drop was listed (not_found)" in failures["img1.png"]["error"]
    assert [u for t in arrow.read_batches(folder) for u in t.column("uri").to_pylist()] == [
        f"s3://{bucket}/drops/photos/img2.png"
    ]
    # A new manifest picks the new object up; split into shards, the stage commits all of their files at once.
    assert ingest.build_manifest(settings, "photos").ok == 2
    sharded = ingest.preprocess_drop(settings, "photos", MODEL_INPUT, "fake:1", shard_items=1)
    assert (sharded.images, sharded.shards, sharded.batches) == (2, 2, 2)
    assert sorted(p.name for p in arrow.batch_files(folder)) == ["s0000-batch-00000.arrow", "s0001-batch-00000.arrow"]

    # The embed stage reads the tensors from the bucket and commits its vectors there too.
    embedded = ingest.embed_drop(settings, "photos", FakeEmbedder())
    assert (embedded.embeddings, embedded.computed, embedded.model) == (2, 2, "fake:1")
    tables = list(arrow.read_batches(drop_files(settings, "photos").embeddings))
    vectors = {
        u.rsplit("/", 1)[-1]: v for t in tables for u, v in zip(t.column("uri").to_pylist(), arrow.vectors_of(t))
    }
    assert sorted(vectors) == ["img0.png", "img2.png"]
    assert int(np.argmax(vectors["img2.png"])) == 2  # each row's vector is its own image's (blue)
    assert keys(aws, bucket, "out/embeddings/photos/_COMMIT.json")
    assert not (home / "data").exists() and not (home / "drops").exists()


# -- placing drops ---------------------------------------------------------------------------------------------------


class Recorder:
    """Records the store's writes and copies, in order."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[str, str]] = []
        put, copy = ObjectStore.put, ObjectStore.copy

        def recording_put(store, bucket, key, data, content_type="application/octet-stream"):
            self.calls.append(("put", key))
            return put(store, bucket, key, data, content_type)

        def recording_copy(store, source_bucket, source_key, bucket, key):
            self.calls.append(("copy", key))
            return copy(store, source_bucket, source_key, bucket, key)

        def no_get(store, bucket, key, *args, **kwargs):
            raise AssertionError(f"s3://{bucket}/{key} was read through this process")

        monkeypatch.setattr(ObjectStore, "put", recording_put)
        monkeypatch.setattr(ObjectStore, "copy", recording_copy)
        self.forbid_reads = lambda: monkeypatch.setattr(ObjectStore, "get", no_get)


def test_place_a_local_folder_and_manifest_into_a_bucket(aws, bucket, tmp_path, monkeypatch):
    settings = make_settings(aws, tmp_path / "home", f"s3://{bucket}/drops")
    location = settings.drops_location
    source = tmp_path / "cats"
    (source / "nested").mkdir(parents=True)
    files = {"a.png": solid((1, 2, 3)), "nested/b.png": solid((3, 2, 1)), "z.png": solid((5, 5, 5))}
    for relative, data in files.items():
        (source / relative).write_bytes(data)
    (source / ".hidden.png").write_bytes(b"h")
    (source / "upload.png.part").write_bytes(b"p")
    (source / "_READY").write_bytes(b"")  # the source's own marker is not copied before the files
    recorder = Recorder(monkeypatch)

    assert drops.place_drop(location, source) == "cats"

    assert recorder.calls[-1] == ("put", "drops/cats/_READY")
    assert sorted(key for _, key in recorder.calls[:-1]) == sorted(f"drops/cats/{r}" for r in files)
    assert sorted(keys(aws, bucket)) == sorted([*(f"drops/cats/{r}" for r in files), "drops/cats/_READY"])
    for relative, data in files.items():
        assert aws.client().get_object(Bucket=bucket, Key=f"drops/cats/{relative}")["Body"].read() == data
    cats = drops.find_drop(location, "cats")
    assert drops.is_complete(cats, settle_s=3600)
    with pytest.raises(FileExistsError, match="already exists"):
        drops.place_drop(location, source)

    manifest = tmp_path / "list.jsonl"
    manifest.write_bytes(jsonl([{"uri": "cats/a.png"}]))
    assert drops.place_drop(location, manifest) == "list.jsonl"
    assert aws.client().get_object(Bucket=bucket, Key="drops/list.jsonl")["Body"].read() == manifest.read_bytes()
    assert drops.find_drop(location, "list.jsonl").is_manifest
    assert "drops/list.jsonl/_READY" not in keys(aws, bucket)
    with pytest.raises(ValueError, match="manifest drop"):
        drops.place_drop(location, manifest, "renamed")
    with pytest.raises(ValueError, match="invalid drop name"):
        drops.place_drop(location, source, "../escape")
    with pytest.raises(FileNotFoundError):
        drops.place_drop(location, tmp_path / "missing")


def test_place_a_prefix_into_another_bucket_location_by_server_side_copy(aws, bucket, tmp_path, monkeypatch):
    settings = make_settings(aws, tmp_path / "home", f"s3://{bucket}/drops")
    location = settings.drops_location
    files = {"a.png": solid((1, 2, 3)), "nested/b.png": solid((3, 2, 1))}
    for relative, data in files.items():
        aws.put(bucket, f"staging/cats/{relative}", data)
    aws.put(bucket, "staging/cats/.hidden", b"h")
    aws.put(bucket, "staging/cats/_READY", b"")
    aws.put(bucket, "staging/cats.b/other.png", b"o")
    aws.put(bucket, "staging/list.jsonl", b'{"uri": "x.png"}\n')
    store = object_store(settings.s3)
    recorder = Recorder(monkeypatch)
    recorder.forbid_reads()  # a server-side copy: the bytes never pass through this process

    assert drops.place_drop(location, store.path(f"s3://{bucket}/staging/cats")) == "cats"
    assert recorder.calls[-1] == ("put", "drops/cats/_READY")
    assert sorted(recorder.calls[:-1]) == [("copy", f"drops/cats/{r}") for r in sorted(files)]
    assert sorted(keys(aws, bucket, "drops/")) == sorted([*(f"drops/cats/{r}" for r in files), "drops/cats/_READY"])
    for relative in files:
        assert etag(aws, bucket, f"drops/cats/{relative}") == etag(aws, bucket, f"staging/cats/{relative}")
    # A manifest object is copied as one object; the drop already in place is used where it is.
    assert drops.place_drop(location, store.path(f"s3://{bucket}/staging/list.jsonl")) == "list.jsonl"
    assert drops.find_drop(location, "list.jsonl").is_manifest
    assert drops.place_drop(location, location / "cats") == "cats"
    with pytest.raises(FileExistsError, match="already exists"):
        drops.place_drop(location, store.path(f"s3://{bucket}/staging/cats"))
    with pytest.raises(FileNotFoundError):
        drops.place_drop(location, store.path(f"s3://{bucket}/staging/missing"))
    assert keys(aws, bucket, "staging/cats/")  # the source stays


def test_place_a_prefix_and_a_manifest_object_into_a_local_drop_folder(aws, bucket, tmp_path):
    settings = make_settings(aws, tmp_path / "home", f"s3://{bucket}/drops")
    store = object_store(settings.s3)
    files = {"a.png": solid((1, 2, 3)), "nested/b.png": solid((3, 2, 1))}
    for relative, data in files.items():
        aws.put(bucket, f"staging/cats/{relative}", data)
    aws.put(bucket, "staging/cats/.hidden", b"h")
    aws.put(bucket, "staging/cats/_READY", b"")
    aws.put(bucket, "staging/list.jsonl", b'{"uri": "cats/a.png"}\n')
    local = tmp_path / "local-drops"

    assert drops.place_drop(local, store.path(f"s3://{bucket}/staging/cats")) == "cats"
    placed = sorted(p.relative_to(local / "cats").as_posix() for p in (local / "cats").rglob("*") if p.is_file())
    assert placed == sorted(files)
    for relative, data in files.items():
        assert (local / "cats" / relative).read_bytes() == data
    assert [p.name for p in local.iterdir()] == ["cats"]  # no staging folder left behind
    assert drops.place_drop(local, store.path(f"s3://{bucket}/staging/list.jsonl")) == "list.jsonl"
    assert (local / "list.jsonl").read_bytes() == b'{"uri": "cats/a.png"}\n'
    assert [d.name for d in drops.scan(local)[0]] == ["cats", "list.jsonl"]
    with pytest.raises(FileExistsError, match="already exists"):
        drops.place_drop(local, store.path(f"s3://{bucket}/staging/cats"))
