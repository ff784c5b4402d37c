"""s3:// URIs without a server: parsing, the prefix allow-list, path arithmetic, settings and the API's input check.

The store itself is exercised against a real SeaweedFS server in integration/test_object_storage.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedding_pipeline.runtime.objects import ObjectError, ObjectPath, ObjectStore, split_uri
from embedding_pipeline.settings import Settings
from embedding_pipeline.sources.drops import ignored_key
from embedding_pipeline.sources.inserts import InputRefused, check_input
from embedding_pipeline.sources.items import object_allowed

STORE = ObjectStore()  # never contacted: no request is made by the code under test here
SEGMENT = st.text(alphabet="abcxyz019._-", min_size=1, max_size=6).filter(lambda s: s not in (".", ".."))


def test_split_uri_accepts_buckets_and_keys_and_refuses_the_rest():
    assert split_uri("s3://images/drops/cats/a.jpg") == ("images", "drops/cats/a.jpg")
    assert split_uri("S3://images") == ("images", "")
    for bad in ("s3://", "s3:///key", "s3://UPPER/key", "s3://a/key", "s3://bu_cket/k", "http://b/k", "/local/path"):
        with pytest.raises(ObjectError) as err:
            split_uri(bad)
        assert err.value.kind == "bad_url", bad
    for sneaky in ("s3://images/drops/../secrets/x", "s3://images/./x", "s3://images/a/..", "s3://images/a\x00b"):
        with pytest.raises(ObjectError, match="not allowed"):
            split_uri(sneaky)


@given(st.lists(SEGMENT, min_size=1, max_size=3), st.lists(SEGMENT, min_size=1, max_size=4))
def test_an_object_is_allowed_only_under_a_whole_prefix(prefix_parts, key_parts):
    prefix = "s3://images/" + "/".join(prefix_parts) + "/"
    uri = "s3://images/" + "/".join(key_parts)
    # Under the prefix exactly when the key's leading segments are the prefix's: "cats" never admits "cats.b".
    inside = key_parts[: len(prefix_parts)] == prefix_parts and len(key_parts) > len(prefix_parts)
    assert object_allowed(uri, [prefix]) == inside
    assert not object_allowed(uri.replace("s3://images/", "s3://other/"), [prefix])
    assert not object_allowed(uri, [])


def test_object_paths_do_path_arithmetic_without_a_request():
    root = ObjectPath(STORE, "images", "drops")
    cats = root / "cats"
    photo = cats / "sub/a.JPG"
    assert str(photo) == "s3://images/drops/cats/sub/a.JPG"
    assert (photo.name, photo.suffix, photo.parent.key, cats.prefix) == (
        "a.JPG",
        ".JPG",
        "drops/cats/sub",
        "drops/cats/",
    )
    assert photo.relative_to(cats) == "sub/a.JPG"
    with pytest.raises(ValueError):
        (root / "cats.b" / "a.jpg").relative_to(cats)
    assert ObjectPath(STORE, "images", "").prefix == "" and (ObjectPath(STORE, "images", "") / "x").key == "x"
    with pytest.raises(TypeError):
        open(photo)  # noqa: SIM115 - an object is never opened as a local file


def test_keys_of_a_drop_that_are_left_out():
    assert ignored_key("_READY") and ignored_key(".hidden/a.jpg") and ignored_key("a/.b.jpg")
    assert ignored_key("upload.jpg.part") and ignored_key("dir/x.tmp") and ignored_key("a//b.jpg")
    assert not ignored_key("a.jpg") and not ignored_key("sub/_READY") and not ignored_key("x/y/z.png")


def test_settings_take_bucket_locations_and_refuse_bad_ones(tmp_path):
    settings = Settings(home=tmp_path, drops_dir="s3://images/drops/", outputs_uri="s3://images/out")
    assert str(settings.drops_location) == "s3://images/drops"
    assert str(settings.outputs) == "s3://images/out"
    local = Settings(home=tmp_path)
    assert local.drops_location == local.drops == (tmp_path / "drops").resolve()
    assert local.outputs == local.paths.data
    with pytest.raises(ValueError, match="outputs_uri"):
        Settings(home=tmp_path, outputs_uri=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="drops_dir"):
        Settings(home=tmp_path, drops_dir="s3://images/../etc")
    with pytest.raises(ValueError, match="allowed_prefixes"):
        Settings(home=tmp_path, sources={"allowed_prefixes": ["s3://Bad_Bucket/x"]})
    with pytest.raises(ValueError, match="endpoint_url"):
        Settings(home=tmp_path, s3={"endpoint_url": "ftp://host"})
    with pytest.raises(ValueError, match="credentials"):
        Settings(home=tmp_path, s3={"endpoint_url": "http://user:secret@127.0.0.1:9000"})
    # Outputs inside the drops prefix would be scanned as a drop (and the other way round, written over).
    for drops, outputs in (("s3://media/ingest", "s3://media/ingest/pipeline"), ("s3://media/a/drops", "s3://media/a")):
        with pytest.raises(ValueError, match="must not contain each other"):
            Settings(home=tmp_path, drops_dir=drops, outputs_uri=outputs)
    assert Settings(home=tmp_path, drops_dir="s3://media/ingest", outputs_uri="s3://media/ingest-out").outputs_uri


def test_the_api_takes_objects_under_the_allowed_prefixes_only(tmp_path):
    settings = Settings(
        home=tmp_path, drops_dir="s3://images/drops", sources={"allowed_prefixes": ["s3://library/public"]}
    )
    check_input(settings, "s3://images/drops/cats/a.jpg", "inputs[0]")
    check_input(settings, "s3://library/public/b.jpg", "inputs[1]")
    for refused, kind in (
        ("s3://library/public.b/c.jpg", "outside_roots"),
        ("s3://library/private/c.jpg", "outside_roots"),
        ("s3://images/other/c.jpg", "outside_roots"),
        ("s3://images/drops/../other/c.jpg", "bad_input"),
    ):
        with pytest.raises(InputRefused) as err:
            check_input(settings, refused, "inputs[2]")
        assert err.value.code == kind, refused
    # With local drops, only the listed prefixes are open.
    with pytest.raises(InputRefused):
        check_input(Settings(home=tmp_path), "s3://images/drops/cats/a.jpg", "inputs[0]")


class FakePool:
    """Records which reads were submitted, and runs each when its result is asked for."""

    def __init__(self):
        self.submitted: list[tuple[int, int]] = []

    def submit(self, read):
        self.submitted.append(read.key)
        return SimpleNamespace(result=read)


@given(
    st.lists(st.lists(st.tuples(st.integers(0, 120), st.booleans()), min_size=1, max_size=4), max_size=7),
    st.integers(0, 3),
    st.integers(0, 300),
)
def test_object_reads_ahead_of_decoding_are_bounded_and_in_order(chunks, ahead, max_bytes):
    from embedding_pipeline.ingest import _prefetched

    def reader(key):
        def read():
            return key

        read.key = key
        return read

    readers = [[reader((k, i)) for i in range(len(chunk))] for k, chunk in enumerate(chunks)]
    remote = [[is_remote for _, is_remote in chunk] for chunk in chunks]
    sizes = [[size for size, _ in chunk] for chunk in chunks]
    pool = FakePool()
    for k, got in enumerate(_prefetched(readers, remote, sizes, pool, ahead, max_bytes)):
        assert [read() for read in got] == [(k, i) for i in range(len(chunks[k]))]
        # Reads started for later chunks: at most `ahead` chunks and `max_bytes` of objects.
        later = {key[0] for key in pool.submitted if key[0] > k}
        assert all(j <= k + ahead for j in later)
        assert sum(sizes[j][i] for j, i in pool.submitted if j > k) <= max_bytes
    # Every object was read through the pool exactly once; local files never were.
    assert sorted(pool.submitted) == [(k, i) for k, c in enumerate(chunks) for i, (_, r) in enumerate(c) if r]
