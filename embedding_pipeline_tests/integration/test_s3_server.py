"""The SeaweedFS fixture itself: objects round-trip with the admin identity, and the reader identity is confined to
its bucket (what the object-storage tests rely on to produce AccessDenied)."""

import secrets

import boto3
import pytest
from botocore.exceptions import ClientError

from embedding_pipeline_tests.integration.s3_server import S3Server

pytestmark = pytest.mark.integration


def test_put_list_get_round_trip(seaweedfs: S3Server, monkeypatch, tmp_path) -> None:
    bucket = seaweedfs.make_bucket("roundtrip")
    assert bucket.startswith("roundtrip-") and bucket == bucket.lower()
    objects = {"drop/a.jpg": b"\xff\xd8a", "drop/b.jpg": b"\xff\xd8bb", "drop/c/d.jpg": b"", "other/e.txt": b"e"}
    for key, data in objects.items():
        seaweedfs.put(bucket, key, data)

    client = seaweedfs.client()
    assert bucket in {b["Name"] for b in client.list_buckets()["Buckets"]}
    listed = client.list_objects_v2(Bucket=bucket, Prefix="drop/")
    assert [(o["Key"], o["Size"]) for o in listed["Contents"]] == [
        ("drop/a.jpg", 3),
        ("drop/b.jpg", 4),
        ("drop/c/d.jpg", 0),
    ]
    after = client.list_objects_v2(Bucket=bucket, Prefix="drop/", StartAfter="drop/a.jpg")
    assert [o["Key"] for o in after["Contents"]] == ["drop/b.jpg", "drop/c/d.jpg"]
    paged = client.list_objects_v2(Bucket=bucket, MaxKeys=2)
    assert paged["IsTruncated"] and paged["KeyCount"] == 2
    rest = client.list_objects_v2(Bucket=bucket, ContinuationToken=paged["NextContinuationToken"])
    assert [o["Key"] for o in paged["Contents"] + rest["Contents"]] == sorted(objects)
    for key, data in objects.items():
        assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == data

    with pytest.raises(ClientError) as missing:
        client.get_object(Bucket=bucket, Key="drop/nope.jpg")
    assert missing.value.response["Error"]["Code"] == "NoSuchKey"
    with pytest.raises(ClientError) as no_bucket:
        client.put_object(Bucket=f"{bucket}-missing", Key="k", Body=b"v")
    assert no_bucket.value.response["Error"]["Code"] == "NoSuchBucket"

    client.delete_object(Bucket=bucket, Key="other/e.txt")
    assert [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="other/").get("Contents", [])] == []

    # The standard variables alone reach the server (what child processes and the pipeline's own code get).
    env = seaweedfs.env()
    assert env["AWS_ENDPOINT_URL"] == seaweedfs.endpoint and env["AWS_REGION"] == "us-east-1"
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    from_env = boto3.session.Session().client("s3", region_name=env["AWS_REGION"])
    assert from_env.get_object(Bucket=bucket, Key="drop/b.jpg")["Body"].read() == b"\xff\xd8bb"


def test_reader_is_confined_to_its_bucket(seaweedfs: S3Server) -> None:
    shared = f"shared-{secrets.token_hex(4)}/"  # the reader's bucket is the session's: other tests may use it too
    seaweedfs.put(seaweedfs.reader_bucket, f"{shared}readme.txt", b"for readers")
    other = seaweedfs.make_bucket("private")
    seaweedfs.put(other, "secret.txt", b"not for readers")
    reader = seaweedfs.reader_client()

    assert reader.get_object(Bucket=seaweedfs.reader_bucket, Key=f"{shared}readme.txt")["Body"].read() == b"for readers"
    listed = reader.list_objects_v2(Bucket=seaweedfs.reader_bucket, Prefix=shared)
    assert [o["Key"] for o in listed["Contents"]] == [f"{shared}readme.txt"]

    denied = [
        lambda: reader.get_object(Bucket=other, Key="secret.txt"),
        lambda: reader.head_object(Bucket=other, Key="secret.txt"),
        lambda: reader.list_objects_v2(Bucket=other),
        lambda: reader.put_object(Bucket=seaweedfs.reader_bucket, Key=f"{shared}new.txt", Body=b"x"),
        lambda: reader.delete_object(Bucket=seaweedfs.reader_bucket, Key=f"{shared}readme.txt"),
        lambda: reader.create_bucket(Bucket=f"{other}-mine"),
    ]
    for call in denied:
        with pytest.raises(ClientError) as refused:
            call()
        # HEAD responses have no body: botocore reports the bare status code there.
        assert refused.value.response["Error"]["Code"] in ("AccessDenied", "403")
        assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403

    # The refused writes changed nothing.
    admin = seaweedfs.client()
    listed = admin.list_objects_v2(Bucket=seaweedfs.reader_bucket, Prefix=shared)
    assert [o["Key"] for o in listed["Contents"]] == [f"{shared}readme.txt"]
    assert admin.get_object(Bucket=other, Key="secret.txt")["Body"].read() == b"not for readers"
    assert f"{other}-mine" not in {b["Name"] for b in admin.list_buckets()["Buckets"]}
