"""Real Milvus servers for the integration tests, one of each per session, on free loopback ports.

* ``milvus_lite``: the embedded default, a milvus-lite server process (what ``embedding-pipeline up`` runs);
* ``standalone_milvus``: a real Milvus 2.3.5 standalone server with authorization on and root's password changed
  (what "a remote Milvus" means in the tests), from the ``milvus==2.3.5`` wheel in its own environment.

Both yield :class:`MilvusStore`: the base settings to connect with and a name for test ids. ``tls_files`` makes a
throw-away CA and a server certificate for 127.0.0.1 with ``openssl``.
"""

from __future__ import annotations

import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from embedding_pipeline.index.standalone import ServerTls, StandaloneMilvus
from embedding_pipeline.runtime.processes import free_ports
from embedding_pipeline.runtime.state import HOME_ENV, StatePaths
from embedding_pipeline.settings import MilvusSettings, Settings, load_settings


@dataclass(frozen=True)
class MilvusStore:
    name: str
    settings: MilvusSettings
    server: StandaloneMilvus | None = None

    def with_(self, **overrides) -> MilvusSettings:
        """The store's settings with ``overrides`` (validated like a configuration file's values)."""
        return MilvusSettings.model_validate({**self.settings.model_dump(exclude_unset=True), **overrides})


def lite_settings(home: Path) -> Settings:
    (port,) = free_ports(1)
    return load_settings(environ={HOME_ENV: str(home), "MILVUS_URI": f"http://127.0.0.1:{port}"})


@pytest.fixture(scope="session")
def milvus_lite(tmp_path_factory) -> Iterator[MilvusStore]:
    """A fresh milvus-lite server for the session (independent of the ``stack`` fixture, no Triton needed)."""
    from embedding_pipeline.index.server import start_milvus, stop_milvus

    settings = lite_settings(tmp_path_factory.mktemp("milvus_lite_home"))
    try:
        start_milvus(settings)
        yield MilvusStore("milvus-lite", settings.milvus)
    finally:
        stop_milvus(settings)


@pytest.fixture(scope="session")
def standalone_milvus(tmp_path_factory) -> Iterator[MilvusStore]:
    """A Milvus 2.3.5 standalone server with authorization, root's password changed, for the session."""
    home = tmp_path_factory.mktemp("milvus_standalone")
    server = StandaloneMilvus(StatePaths(home), home / "milvus", password=secrets.token_urlsafe(12))
    try:
        server.start()
        yield MilvusStore("milvus-2.3.5", server.settings_for(MilvusSettings()), server)
    finally:
        server.stop()


def tls_files(folder: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> ServerTls:
    """A new CA and a server certificate it signed, valid for ``hosts`` (IP addresses and DNS names)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    names = ",".join(f"IP:{h}" if h.replace(".", "").isdigit() else f"DNS:{h}" for h in hosts)
    ext = folder / "san.ext"
    ext.write_text(
        f"subjectAltName={names}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
    )
    for argv in (
        [
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            ca_key,
            "-out",
            ca,
            "-days",
            "2",
            "-subj",
            "/CN=embedding-pipeline test CA",
        ],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={hosts[0]}"],
        [
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            ca,
            "-CAkey",
            ca_key,
            "-CAcreateserial",
            "-out",
            cert,
            "-days",
            "2",
            "-extfile",
            ext,
        ],
    ):
        subprocess.run(["openssl", *map(str, argv)], check=True, capture_output=True)
    return ServerTls(cert=cert, key=key, ca=ca)
