"""A real Milvus 2.3.5 standalone server, run from the ``milvus==2.3.5`` PyPI wheel in its own environment.

The wheel carries the server binary and its libraries (xz-compressed) plus a small Python wrapper. The wrapper picks
ports by probing upwards from fixed numbers, sets only the client address of the embedded etcd (which then listens
on etcd's default ports, so two servers collide) and kills the server a second after asking it to stop; so this
launcher borrows only its unpacking code and runs the binary itself:

* every port (proxy, internal proxy, the coordinators and nodes, embedded etcd client and peer, metrics/health) is a
  free port picked at start, so several servers can run side by side;
* the server listens on all interfaces whatever its configuration says, so where the machine allows it (root) it runs
  in a network namespace of its own whose only interface is loopback, reached through a forwarder that listens on
  ``127.0.0.1`` only (:mod:`.netns`): no other host can connect to it, whatever the server binds;
* authorization is always on, and right after start the ``root`` password is changed from the well-known default to
  ``password`` (random if not given); ``start()`` returns only once the default is refused;
* data, configuration and logs live under ``data_dir``; the binaries are unpacked once into the environment;
* a restart on the same ``data_dir`` (after ``stop()`` or ``kill()``) keeps its rows and password and reuses its
  ports when they are free, so it serves again within seconds.

``StandaloneMilvus`` is what the remote-server tests and benchmarks use as "a real Milvus somewhere else"::

    with StandaloneMilvus(paths, tmp / "milvus") as server:
        index = ImageIndex(server.settings_for(settings.milvus, collection="images"))
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from embedding_pipeline.index import netns
from embedding_pipeline.runtime import processes
from embedding_pipeline.runtime.environments import ensure_env, env_dir
from embedding_pipeline.runtime.locks import file_lock
from embedding_pipeline.runtime.state import StatePaths
from embedding_pipeline.settings import MilvusSettings

ENV_NAME = "milvus-standalone"
PROCESS_NAME = "milvus-standalone"
FORWARDER_NAME = "milvus-standalone-forwarder"
ROOT_USER = "root"
DEFAULT_ROOT_PASSWORD = "Milvus"  # what every fresh Milvus accepts: never left valid
# Ports the template names (the wrapper's keys); etcd peer and metrics ports are set outside the template.
TEMPLATE_PORTS = (
    "proxy_port",
    "proxy_internal_port",
    "root_coord_port",
    "query_coord_port",
    "query_node_port",
    "index_coord_port",
    "index_node_port",
    "data_coord_port",
    "data_node_port",
    "etcd_port",
)
# Components that register an address for the others to dial; pinned to loopback (the default is the first
# non-loopback address, which is wrong on a machine whose network changes and pointless for one-machine use).
COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexCoord", "indexNode", "dataCoord", "dataNode")
PORT_NAMES = (*TEMPLATE_PORTS, "etcd_peer_port", "metrics_port")
_TEMPLATE_SLOT = re.compile(r"\{\{\s*([a-zA-Z_]+)\s*(?:\((\w+)\))?\s*(?::\s*([^}]*?))?\s*\}\}")


class StandaloneError(RuntimeError):
    """The standalone server could not be prepared, started or secured; carries the tail of its log."""


@dataclass(frozen=True)
class ServerTls:
    """One-way TLS for the proxy: the server's certificate and key, and the CA that signed the certificate."""

    cert: Path
    key: Path
    ca: Path


class StandaloneMilvus:
    """One Milvus 2.3.5 standalone server with authorization on; a context manager that stops it on exit."""

    def __init__(
        self,
        paths: StatePaths,
        data_dir: Path,
        port: int | None = None,
        password: str | None = None,
        tls: ServerTls | None = None,
        isolate: bool | None = None,
    ):
        """``isolate``: run in a private network namespace (default: wherever the machine allows it)."""
        self.paths = paths
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        if password == DEFAULT_ROOT_PASSWORD:
            raise ValueError(f"the root password must not be Milvus's well-known default {DEFAULT_ROOT_PASSWORD!r}")
        self.password = password or secrets.token_urlsafe(18)
        self.tls = tls
        self.isolated = netns.available() if isolate is None else isolate
        self.ports: dict[str, int] = {}
        self._proc: processes.Managed | None = None

    # -- what clients need ---------------------------------------------------------------------------------

    @property
    def uri(self) -> str:
        if self.port is None:
            raise StandaloneError("the server has no port yet: call start() first")
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        return f"{ROOT_USER}:{self.password}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.alive() else None

    @property
    def alias(self) -> str:
        """The server's name for its pid file, which it locks in a machine-wide folder (/run/milvus): one alias per
        data dir lets servers of different dirs run side by side and refuses two on the same dir."""
        return "ep-" + hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:16]

    @property
    def log(self) -> Path:
        return self.data_dir / "logs" / f"{PROCESS_NAME}.log"

    def settings_for(self, base: MilvusSettings, **overrides: Any) -> MilvusSettings:
        """``base`` pointed at this server (root's token; TLS files when TLS is on), then ``overrides``."""
        values: dict[str, Any] = {"uri": self.uri, "token": self.token, "user": "", "password": ""}
        if self.tls:
            values.update(secure=True, ca_pem_path=str(self.tls.ca), server_name="")
        values.update(overrides)
        # Validated like a configuration file; unset fields stay unset so per-index-type defaults still apply.
        return type(base).model_validate({**base.model_dump(exclude_unset=True), **values})

    # -- life cycle ----------------------------------------------------------------------------------------

    def start(self, timeout_s: float = 180) -> "StandaloneMilvus":
        """Start the server, wait until it serves, and replace root's default password. Raises with the log tail."""
        if self.pid is not None:
            return self
        binary = self._binary()
        deadline = time.monotonic() + timeout_s
        # A port picked as free can be taken by someone else before the server binds it: try once more then.
        for attempt in range(2):
            self._launch(binary)
            try:
                self._wait_serving(deadline)
                break
            except StandaloneError:
                port_clash = "address already in use" in _tail(self.log, 200).lower()
                self.stop()
                if attempt == 1 or not port_clash:
                    raise
        try:
            self._secure_root(deadline)
        except Exception:
            self.stop()
            raise
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the whole process group gracefully (SIGTERM, SIGKILL after ``timeout_s``); idempotent."""
        proc = self._proc or processes.read(self.data_dir / "run", PROCESS_NAME)
        processes.stop(self.data_dir / "run", PROCESS_NAME, timeout=timeout_s)
        processes.stop(self.data_dir / "run", FORWARDER_NAME, timeout=5)
        self._proc = None
        self._remove_machine_files(proc.pid if proc else None)

    def kill(self) -> None:
        """SIGKILL the whole process group at once, as a crash would (for fault tests)."""
        proc = self._proc or processes.read(self.data_dir / "run", PROCESS_NAME)
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            # Reap it and drop the pid file, so a later start() or stop() sees a stopped server.
            processes.stop(self.data_dir / "run", PROCESS_NAME, timeout=5)
        processes.stop(self.data_dir / "run", FORWARDER_NAME, timeout=5)
        self._proc = None
        self._remove_machine_files(proc.pid if proc else None)

    def _remove_machine_files(self, pid: int | None) -> None:
        """Files the server keeps outside its data dir (fixed paths in the binary), left behind by a crash or by a
        stop that panics on the way out: its pid file and its per-process server-id file."""
        for folder in (Path("/run/milvus"), Path("/tmp/milvus")):  # the server's own choice, and its fallback
            (folder / f"standalone-{self.alias}.pid").unlink(missing_ok=True)
        if pid is not None:
            Path(f"/tmp/milvus/server_id_{pid}").unlink(missing_ok=True)

    def __enter__(self) -> "StandaloneMilvus":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals -----------------------------------------------------------------------------------------

    def _binary(self) -> Path:
        """The server binary, unpacked from the wheel once per environment (the unpacking skips unchanged files)."""
        python = ensure_env(self.paths, ENV_NAME)
        root = env_dir(self.paths, ENV_NAME) / "server"
        binary, done = root / "bin" / "milvus", root / ".unpacked"
        with file_lock(self.paths.envs / f".{ENV_NAME}-unpack.lock"):
            if not done.exists():  # written last, so an interrupted unpacking is redone
                root.mkdir(parents=True, exist_ok=True)
                result = subprocess.run(
                    [str(python), "-c", "import sys, milvus; milvus._initialize_data_files(sys.argv[1])", str(root)],
                    capture_output=True,
                    text=True,
                    stdin=subprocess.DEVNULL,
                    check=False,
                )
                if result.returncode != 0 or not binary.exists():
                    raise StandaloneError(f"unpacking the Milvus binaries into {root} failed:\n{result.stderr[-2000:]}")
                done.write_text("ok\n")
        return binary

    def _wheel_data(self) -> Path:
        """The wheel's ``milvus/data`` folder: the configuration template and glog.conf."""
        python = ensure_env(self.paths, ENV_NAME)
        found = subprocess.run(
            [str(python), "-c", "import milvus, os; print(os.path.dirname(milvus.__file__))"],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            check=True,
        )
        return Path(found.stdout.strip()) / "data"

    def _launch(self, binary: Path) -> None:
        for sub in ("configs", "logs", "data", "run"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
        self.ports = self._pick_ports()
        self.port = self.ports["proxy_port"]
        config_dir = self.data_dir / "configs"
        wheel_data = self._wheel_data()
        (config_dir / "milvus.yaml").write_text(self._config((wheel_data / "config.yaml.template").read_text()))
        (config_dir / "embed_etcd.yaml").write_text(yaml.safe_dump(self._etcd_config()))
        # The knowhere engine reads its logging setup from here and the server dies without it.
        shutil.copy(wheel_data / "glog.conf", config_dir / "glog.conf")
        env = {
            **processes.without_secrets(os.environ),
            "DEPLOY_MODE": "STANDALONE",
            "METRICS_PORT": str(self.ports["metrics_port"]),
            "MILVUSCONF": str(config_dir),
            "MILVUS_RUN_DIR": str(self.data_dir / "run"),
            "LD_LIBRARY_PATH": ":".join(p for p in (str(binary.parent), os.environ.get("LD_LIBRARY_PATH", "")) if p),
        }
        argv = [str(binary), "run", "standalone", "-alias", self.alias]
        run, logs = self.data_dir / "run", self.data_dir / "logs"
        self._proc = processes.start(
            run, logs, PROCESS_NAME, netns.isolated_argv(argv) if self.isolated else argv, env=env, cwd=self.data_dir
        )
        if self.isolated:
            # Clients reach the proxy and the health endpoint through loopback-only forwards; nothing else is
            # reachable from outside the server's namespace.
            forwarded = [self.ports["proxy_port"], self.ports["metrics_port"]]
            processes.start(
                run,
                logs,
                FORWARDER_NAME,
                netns.forwarder_argv(self._proc.pid, forwarded),
                env=processes.without_secrets(os.environ),
            )

    def _pick_ports(self) -> dict[str, int]:
        """The previous start's ports on this data dir when they are all free again, else new free ones.

        The server's etcd remembers each component by address: started on new ports, a restarted server waits
        about a minute for the old registrations to expire; on the same ports it is up in seconds.
        """
        record = self.data_dir / "configs" / "ports.json"
        try:
            saved = {name: int(port) for name, port in json.loads(record.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            saved = {}
        reusable = (
            set(saved) == set(PORT_NAMES)
            and self.port in (None, saved["proxy_port"])
            and all(port_free(port) for port in saved.values())
        )
        if reusable:
            ports = saved
        else:
            fresh = iter(processes.free_ports(len(PORT_NAMES)))
            ports = {name: self.port if name == "proxy_port" and self.port else next(fresh) for name in PORT_NAMES}
        record.write_text(json.dumps(ports))
        return ports

    def _config(self, template: str) -> str:
        """The wheel's configuration template, filled in, with etcd, addresses, security and shutdown adjusted."""
        data = self.data_dir / "data"
        values: dict[str, Any] = {
            **{name: self.ports[name] for name in TEMPLATE_PORTS},
            "etcd_data_dir": str(data / "etcd.data"),
            "etcd_log_path": str(self.data_dir / "logs" / "etcd.log"),
            "etcd_log_level": "warn",
            "local_storage_dir": str(data),
            "rocksmq_data_dir": str(data / "rocksmq"),
            # Empty: the server logs to stdout only, which processes.start sends to the log file.
            "system_log_path": "",
            "authorization_enabled": True,
            "tls_mode": 1 if self.tls else 0,
            "server_pem_path": str(self.tls.cert) if self.tls else "",
            "server_key_path": str(self.tls.key) if self.tls else "",
            "ca_pem_path": str(self.tls.ca) if self.tls else "",
        }
        config = yaml.safe_load(render_template(template, values))
        config["etcd"]["config"] = {"path": str(self.data_dir / "configs" / "embed_etcd.yaml")}
        for component in COMPONENTS:
            config.setdefault(component, {})["ip"] = "127.0.0.1"
        config["log"]["level"] = "warn"
        # The default graceful stop may wait 30 minutes. Writes are in the write-ahead log (rocksmq) when
        # acknowledged, so a short grace loses nothing: a restart replays it (the kill test shows it).
        config["common"]["gracefulStopTimeout"] = 3
        # After a crash the old components' registrations live until their lease expires, and the restarted ones
        # wait for that before serving the collections again (30 s by default).
        config["common"]["session"]["ttl"] = 10
        return yaml.safe_dump(config, sort_keys=False)

    def _etcd_config(self) -> dict[str, Any]:
        client = f"http://127.0.0.1:{self.ports['etcd_port']}"
        peer = f"http://127.0.0.1:{self.ports['etcd_peer_port']}"
        return {
            "name": "standalone",
            "listen-client-urls": client,
            "advertise-client-urls": client,
            "listen-peer-urls": peer,
            "initial-advertise-peer-urls": peer,
            "initial-cluster": f"standalone={peer}",
            "initial-cluster-state": "new",
        }

    def _wait_serving(self, deadline: float) -> None:
        health = f"http://127.0.0.1:{self.ports['metrics_port']}/healthz"

        def serving() -> bool:
            return processes.http_ok(health, timeout=2) and _client_works(self, DEFAULT_ROOT_PASSWORD, self.password)

        try:
            processes.wait_until(
                serving, max(1.0, deadline - time.monotonic()), f"Milvus standalone at {self.uri}", self._proc
            )
        except processes.ServiceError as exc:
            raise StandaloneError(f"{startup_problem(self.log)}{exc}") from None

    def _secure_root(self, deadline: float) -> None:
        """Swap root's default password for ours; on a reused data dir, check ours is the one in force."""
        if _client_works(self, self.password) and not _client_works(self, DEFAULT_ROOT_PASSWORD):
            return
        client = None
        while True:
            try:
                client = _client(self, DEFAULT_ROOT_PASSWORD)
                client.update_password(ROOT_USER, DEFAULT_ROOT_PASSWORD, self.password)
                break
            except Exception as exc:  # noqa: BLE001 - right after start the proxy may still refuse calls
                if time.monotonic() > deadline:
                    raise StandaloneError(
                        f"could not change root's password on Milvus at {self.uri}: {exc}\n{_tail(self.log)}"
                    ) from None
                time.sleep(0.5)
            finally:
                if client is not None:
                    client.close()
                    client = None
        # The proxy caches credentials briefly; wait until the new password is the one that works.
        while not (_client_works(self, self.password) and not _client_works(self, DEFAULT_ROOT_PASSWORD)):
            if time.monotonic() > deadline:
                raise StandaloneError(f"root's new password did not take effect on Milvus at {self.uri}")
            time.sleep(0.2)


def render_template(template: str, values: dict[str, Any]) -> str:
    """Fill the wheel's ``{{ key(type): default }}`` slots with ``values`` (a slot without a value keeps its
    default); refuses a slot that has neither, naming it."""

    def fill(match: re.Match[str]) -> str:
        key, _type, default = match.group(1), match.group(2), match.group(3)
        if key in values:
            value = values[key]
        elif default is not None:
            value = default
        else:
            raise StandaloneError(f"the Milvus configuration template needs a value for {key!r}")
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)

    return _TEMPLATE_SLOT.sub(fill, template)


def startup_problem(log: Path, limit: int = 6) -> str:
    """The lines of the server log that say why it failed: panics, fatal errors and the errors just before them.

    A Go panic ends the log with a dump of every goroutine, so the plain tail rarely shows the cause.
    """
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    picked = []
    for line in lines:
        if line.startswith("panic:") or "[FATAL]" in line or "[ERROR]" in line and "retry func failed" not in line:
            picked.append(line.split(" [stack=", 1)[0][:400])
        if line.startswith("panic:"):
            break
    return ("Errors in the server log:\n" + "\n".join(picked[-limit:]) + "\n") if picked else ""


def port_free(port: int) -> bool:
    """True if nothing listens on ``port`` on any interface (the server binds all of them). SO_REUSEADDR as in the
    server itself, so connections of a killed predecessor lingering in TIME_WAIT don't count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def _client(server: StandaloneMilvus, password: str, timeout: float = 5.0):
    from pymilvus import MilvusClient

    from embedding_pipeline.index.client import GRPC_OPTIONS

    kwargs: dict[str, Any] = {"grpc_options": GRPC_OPTIONS}
    if server.tls:
        kwargs.update(secure=True, server_pem_path=str(server.tls.ca))
    # dedicated: a shared connection is keyed by address + token, and these probes must not reuse one.
    return MilvusClient(uri=server.uri, token=f"{ROOT_USER}:{password}", timeout=timeout, dedicated=True, **kwargs)


def _client_works(server: StandaloneMilvus, *passwords: str) -> bool:
    """True if root can list collections with any of ``passwords``."""
    for password in passwords:
        client = None
        try:
            client = _client(server, password)
            client.list_collections()
            return True
        except Exception:  # noqa: BLE001 - refused, not up yet, or wrong password: all mean "not with this one"
            continue
        finally:
            if client is not None:
                client.close()
    return False


def _tail(log: Path, lines: int = 40) -> str:
    return processes.log_tail(log, lines)
