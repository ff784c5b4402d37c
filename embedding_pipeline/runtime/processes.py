"""Background processes with a pid file and a log file each, stopped by the same code that started them.

Every server the pipeline runs (Triton, Milvus, the Dagster webserver and daemon) is started through
:func:`start`, in its own session so that :func:`stop` can signal the whole process group (servers spawn
children: Triton its python-backend stubs, Dagster its code servers).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence


class ServiceError(RuntimeError):
    """A service could not be started, or did not become ready."""


@dataclass(frozen=True)
class Managed:
    """A process started by :func:`start`, as recorded in its pid file."""

    name: str
    pid: int
    start_ticks: int
    log: Path

    def alive(self) -> bool:
        # Comparing the kernel's start time guards against a recycled pid pointing at a stranger.
        return _start_ticks(self.pid) == self.start_ticks


def _start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime) counted after the ")" that closes the command name, which may contain spaces.
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


# Popen handles of children started by this process, so they can be reaped (no zombies in `status`).
_children: dict[int, subprocess.Popen] = {}


@contextlib.contextmanager
def _default_stop_signals() -> Iterator[None]:
    """Children inherit ignored signals: a parent started from a non-interactive shell may ignore SIGINT, and
    servers that copy that disposition never stop (seen with Dagster). Un-ignore them around the spawn."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) == signal.SIG_IGN:
            saved[sig] = signal.signal(sig, signal.SIG_DFL)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _pid_file(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.json"


def read(run_dir: Path, name: str) -> Managed | None:
    """The recorded process ``name`` if it is still running, else None (a stale pid file is removed)."""
    path = _pid_file(run_dir, name)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    proc = Managed(name, int(data["pid"]), int(data["start_ticks"]), Path(data["log"]))
    if proc.alive():
        return proc
    path.unlink(missing_ok=True)
    return None


# Environment variables that hold secrets: servers that need none of them (Triton, the Milvus servers) never get them.
_SECRET_WORDS = ("PASSWORD", "TOKEN", "SECRET", "API_KEY", "ACCESS_KEY", "PRIVATE_KEY", "CREDENTIAL")


def is_secret_variable(name: str) -> bool:
    upper = name.upper()
    return any(word in upper for word in _SECRET_WORDS)


def without_secrets(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` less every variable that holds a secret (see :func:`is_secret_variable`)."""
    return {k: v for k, v in env.items() if not is_secret_variable(k)}


def start(
    run_dir: Path,
    log_dir: Path,
    name: str,
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Managed:
    """Start ``argv`` detached, logging to ``log_dir/name.log``; refuses if ``name`` already runs."""
    existing = read(run_dir, name)
    if existing is not None:
        raise ServiceError(f"{name} is already running (pid {existing.pid})")
    run_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"

    # No preexec_fn: running Python between fork and exec is unsafe in a process with gRPC threads (a
    # Milvus client's): a webserver spawned that way died with a gRPC epoll error before serving. Signal
    # dispositions are fixed up in the parent instead.
    with open(log, "ab") as out, _default_stop_signals():
        out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n".encode())
        out.flush()
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=str(cwd) if cwd else None,
            start_new_session=True,
        )
    ticks = _start_ticks(popen.pid)
    if ticks is None:
        popen.wait()
        raise ServiceError(f"{name} exited at once (code {popen.returncode}); see {log}")
    proc = Managed(name, popen.pid, ticks, log)
    _pid_file(run_dir, name).write_text(json.dumps({"pid": proc.pid, "start_ticks": ticks, "log": str(log)}))
    _children[proc.pid] = popen
    return proc


def stop(run_dir: Path, name: str, timeout: float = 20.0) -> bool:
    """Stop ``name`` and its process group: SIGTERM, then SIGKILL after ``timeout``. True if it was running."""
    proc = read(run_dir, name)
    if proc is None:
        return False
    _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(proc.pid)
        if not proc.alive() and not _group_alive(proc.pid):
            break
        time.sleep(0.1)
    else:
        _signal_group(proc.pid, signal.SIGKILL)
        time.sleep(0.2)
        _reap(proc.pid)
    _pid_file(run_dir, name).unlink(missing_ok=True)
    return True


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg(0) also succeeds for zombies; look for a live member.
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _reap(pid: int) -> None:
    popen = _children.get(pid)
    if popen is not None and popen.poll() is not None:
        _children.pop(pid, None)


def wait_until(check: Callable[[], bool], timeout: float, what: str, proc: Managed | None = None) -> None:
    """Poll ``check`` until it is true; fail early with the log's tail if ``proc`` dies meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not ready yet, whatever the reason
            pass
        if proc is not None:
            _reap(proc.pid)
            if not proc.alive():
                raise ServiceError(f"{what}: process exited during start-up.\n{log_tail(proc.log)}")
        if time.monotonic() > deadline:
            tail = log_tail(proc.log) if proc is not None else ""
            raise ServiceError(f"{what}: not ready after {timeout:.0f} s.\n{tail}")
        time.sleep(0.2)


def log_tail(log: Path, lines: int = 30) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return f"--- last lines of {log}:\n" + "\n".join(text[-lines:])


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True if GET ``url`` answers 2xx."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback health URLs
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_ports(count: int) -> list[int]:
    """Distinct loopback ports free right now: every socket stays open until all are picked, so the ports differ."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
