"""A real PostgreSQL server for the tests: Debian's binaries, a fresh cluster in a temporary folder, 127.0.0.1 only.

The ``postgres`` fixture initdb's a cluster with a password-protected role, starts it on a free loopback port (its
socket in the same folder, nothing in /var/run), creates a database, and stops and removes it all on teardown.
PostgreSQL refuses to run as root: as root, ``initdb`` and ``pg_ctl`` run as the ``postgres`` system user.

Without the binaries the fixture skips, saying how to get them, unless ``EMBEDDING_PIPELINE_REQUIRE_SYSTEM_PACKAGES=1``
(CI, after scripts/install-system-packages.sh) makes it fail instead.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from embedding_pipeline.runtime.processes import free_ports

PG_ROOT = Path("/usr/lib/postgresql")
REQUIRE_ENV = "EMBEDDING_PIPELINE_REQUIRE_SYSTEM_PACKAGES"
SERVER_USER = "postgres"  # the system user Debian's package creates; the server runs as it when we are root
# Settings for a disposable test cluster: loopback only, and no durability work (the data dies with the test).
TEST_CONF = """
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{socket_dir}'
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 32MB
max_connections = 60
"""


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    password: str
    db_name: str
    data_dir: Path

    def dagster_env(self) -> dict[str, str]:
        """The variables deploy/dagster.yaml reads."""
        return {
            "DAGSTER_PG_HOST": self.host,
            "DAGSTER_PG_PORT": str(self.port),
            "DAGSTER_PG_USER": self.user,
            "DAGSTER_PG_PASSWORD": self.password,
            "DAGSTER_PG_DB": self.db_name,
        }

    def connect(self, db_name: str | None = None):  # noqa: ANN201 - a psycopg2 connection
        import psycopg2

        return psycopg2.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=db_name or self.db_name,
            connect_timeout=10,
        )


def postgres_bin_dir() -> Path | None:
    """The newest installed ``/usr/lib/postgresql/<version>/bin`` with initdb and pg_ctl, if any."""
    if not PG_ROOT.is_dir():
        return None
    candidates = [
        p / "bin" for p in PG_ROOT.iterdir() if (p / "bin" / "initdb").is_file() and (p / "bin" / "pg_ctl").is_file()
    ]
    return max(candidates, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, default=None)


def require_postgres() -> Path:
    """The binaries folder; skips (or fails, when system packages are required) if PostgreSQL is missing."""
    found = postgres_bin_dir()
    problem = None
    if found is None:
        problem = f"PostgreSQL server binaries not found under {PG_ROOT}"
    elif os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            problem = f"running as root but there is no {SERVER_USER!r} system user to run PostgreSQL as"
    if problem is None:
        return found  # type: ignore[return-value]
    hint = "install Debian's postgresql package (scripts/install-system-packages.sh)"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{problem}; {REQUIRE_ENV}=1 requires it: {hint}")
    pytest.skip(f"{problem}: {hint}")


def _as_server_user() -> list[str]:
    return ["runuser", "-u", SERVER_USER, "--"] if os.geteuid() == 0 else []


def _run(argv: list[str], what: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}")


@contextmanager
def postgres_server(bin_dir: Path, db_name: str = "dagster", user: str = "dagster") -> Iterator[PostgresServer]:
    """A running server with role ``user`` (password auth over TCP) and database ``db_name``; stopped and removed
    when the block ends, also when starting it failed half-way."""
    # Directly under /tmp, not pytest's tmp_path: its parents are private to root, and the server user must reach
    # the data and socket folders.
    root = Path(tempfile.mkdtemp(prefix="pg-test-"))
    data, socket_dir, log = root / "data", root / "socket", root / "server.log"
    password = secrets.token_urlsafe(16)
    password_file = root / "password"
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    # Only the server user (and root) may use the socket: local connections on it need no password.
    socket_dir.mkdir(mode=0o700)
    if os.geteuid() == 0:
        server_user = pwd.getpwnam(SERVER_USER)
        for path in (root, socket_dir, password_file):
            os.chown(path, server_user.pw_uid, server_user.pw_gid)
    as_user = _as_server_user()
    started = False
    try:
        try:
            _run(
                as_user
                + [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    user,
                    f"--pwfile={password_file}",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
                "initdb",
            )
            password_file.unlink()
            port = free_ports(1)[0]
            with open(data / "postgresql.conf", "a") as conf:
                conf.write(TEST_CONF.format(port=port, socket_dir=socket_dir))
            started = True  # from here on, stop it whatever happens (stopping a server that is not up is harmless)
            _run(
                as_user + [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "start"],
                "pg_ctl start",
            )
        except RuntimeError as exc:
            tail = log.read_text()[-2000:] if log.is_file() else ""
            raise RuntimeError(f"{exc}\nserver log:\n{tail}") from exc
        server = PostgresServer("127.0.0.1", port, user, password, db_name, data)
        admin = server.connect("postgres")
        try:
            admin.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with admin.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{db_name}"')
        finally:
            admin.close()
        yield server
    finally:
        if started:
            subprocess.run(
                as_user + [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop"],
                capture_output=True,
                timeout=90,
            )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """A fresh PostgreSQL server for the test module (skips when PostgreSQL is not installed, see above)."""
    bin_dir = require_postgres()
    with postgres_server(bin_dir) as server:
        yield server
