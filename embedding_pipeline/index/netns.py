"""Keep a server that binds every interface off the network: run it in a private network namespace and forward
chosen loopback ports to it.

The Milvus 2.3.5 standalone binary listens on all interfaces whatever its configuration says, and published
advisories for that line mean its authorization does not protect it. Started through :func:`isolated_argv`, it gets
a network namespace of its own whose only interface is loopback: nothing outside the machine — and nothing on the
machine but this forwarder — can open a connection to it. The forwarder (``python -m
embedding_pipeline.index.netns PID PORT...``) listens on ``127.0.0.1:PORT`` in the host namespace, joins the
server's namespace, and relays each connection to the same port there.

Creating a network namespace needs root (or user namespaces); where it is not possible, :func:`available` says so
and callers fall back to the server's own listening (with authorization on and a random password).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from functools import lru_cache

CLONE_NEWNET = 0x40000000
_BUFFER = 256 * 1024


@lru_cache(maxsize=1)
def available() -> bool:
    """True if this process can start a server in a new network namespace and join it later."""
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("ip")):
        return False
    try:
        probe = subprocess.run(
            ["unshare", "--net", "--", "ip", "link", "set", "lo", "up"],
            capture_output=True,
            timeout=10,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def isolated_argv(argv: list[str]) -> list[str]:
    """``argv`` run in a new network namespace with its loopback interface up (the same pid: everything execs)."""
    return ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', *argv]


def forwarder_argv(pid: int, ports: list[int]) -> list[str]:
    return [sys.executable, "-m", "embedding_pipeline.index.netns", str(pid), *map(str, ports)]


def _join(pid: int, timeout_s: float = 30.0) -> None:
    """Join the network namespace of ``pid`` once it has one of its own (``unshare`` may not have run yet)."""
    ours = os.stat("/proc/self/ns/net").st_ino
    deadline = time.monotonic() + timeout_s
    while os.stat(f"/proc/{pid}/ns/net").st_ino == ours:
        if time.monotonic() > deadline:
            raise RuntimeError(f"pid {pid} never left this network namespace")
        time.sleep(0.02)
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into the network namespace of pid {pid}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _pump(source: socket.socket, target: socket.socket) -> None:
    try:
        while True:
            data = source.recv(_BUFFER)
            if not data:
                break
            target.sendall(data)
    except OSError:
        pass
    finally:
        for sock, how in ((target, socket.SHUT_WR), (source, socket.SHUT_RD)):
            try:
                sock.shutdown(how)
            except OSError:
                pass


def _relay(client: socket.socket, port: int) -> None:
    try:
        upstream = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError:
        client.close()
        return
    upstream.settimeout(None)
    for sock in (client, upstream):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    back.start()
    _pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def _serve(listener: socket.socket, port: int) -> None:
    while True:
        try:
            client, _ = listener.accept()
        except OSError:  # out of descriptors, say: wait and go on serving rather than die silently
            time.sleep(0.1)
            continue
        threading.Thread(target=_relay, args=(client, port), daemon=True).start()


def main(args: list[str]) -> int:
    pid, ports = int(args[0]), [int(p) for p in args[1:]]
    listeners = []
    for port in ports:  # in the host namespace, loopback only
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(128)
        listeners.append((listener, port))
    # From here on this thread, and every thread it starts, connects inside the server's namespace; the listening
    # sockets made above stay in the host's.
    _join(pid)
    for listener, port in listeners:
        threading.Thread(target=_serve, args=(listener, port), daemon=True).start()
    while os.path.exists(f"/proc/{pid}"):
        time.sleep(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
