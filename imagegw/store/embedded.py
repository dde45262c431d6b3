"""The embedded SecantusDB: the gateway's MongoDB when ``MongoDBURI`` names none.

The gateway runs SecantusDB (a MongoDB wire-compatible server from PyPI) on a loopback
port, its data under the state directory. One embedded server serves every gateway
process on the host: the first one starts it and stops it when it exits; later ones find
it through ``server.json`` and reuse it.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from imagegw.config import MONGODB_URI_ENV
from imagegw.errors import IndexUnavailable
from imagegw.processes import alive, dying_with_this_process, free_port, listening, log_tail

_START_TIMEOUT = 30.0
_closers: dict[str, Callable[[], None]] = {}


@dataclass(frozen=True)
class EmbeddedServer:
    """A running SecantusDB on a loopback port; ``owned`` when this process started it."""

    port: int
    pid: int
    owned: bool

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}"


# The servers this process found or started, by home. The store is opened for every API request:
# while such a server's process lives, it is trusted without the lock, the file and a connection.
_known: dict[Path, EmbeddedServer] = {}


def ensure_embedded_server(state_dir: Path) -> EmbeddedServer:
    """Reuse the host's embedded SecantusDB, or start one owned by this process.

    The started server's URI is exported as ``IMAGEGW_MONGODB_URI`` so that
    flow runs and workers started from this process use the same server.
    """
    home = state_dir / "mongo"
    known = _known.get(home)
    if known is not None and alive(known.pid):
        return known
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        server = _running_server(home)
        if server is None:
            server = _start_server(home)
            atexit.register(stop_embedded_server, server, home)
    _known[home] = server
    os.environ[MONGODB_URI_ENV] = server.uri
    return server


def stop_embedded_server(server: EmbeddedServer, home: Path) -> None:
    """Stop a server this process started (a reused one is left to its owner)."""
    if not server.owned:
        return
    _known.pop(home, None)
    closer = _closers.pop(server.uri, None)
    if closer is not None:
        closer()
    try:
        os.kill(server.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    else:
        _wait_for_exit(server, 10.0)
    (home / "server.json").unlink(missing_ok=True)


def _running_server(home: Path) -> EmbeddedServer | None:
    try:
        recorded = json.loads((home / "server.json").read_text())
    except (OSError, ValueError):
        return None
    pid, port = recorded.get("pid"), recorded.get("port")
    if not isinstance(pid, int) or not isinstance(port, int) or not alive(pid) or not listening("127.0.0.1", port):
        return None
    return EmbeddedServer(port=port, pid=pid, owned=False)


def _start_server(home: Path) -> EmbeddedServer:
    port = free_port()
    log_path = home / "secantus.log"
    data = home / "data"
    data.mkdir(exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "secantus", "--host", "127.0.0.1", "--port", str(port),
             "--storage-path", str(data)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=dying_with_this_process(),
        )
    deadline = time.monotonic() + _START_TIMEOUT
    while not listening("127.0.0.1", port):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            tail = " | ".join(log_tail(log_path, 5).splitlines()) or "(no log)"
            raise IndexUnavailable(f"the embedded database (SecantusDB) did not start; see {log_path}: {tail}")
        time.sleep(0.05)
    (home / "server.json").write_text(json.dumps({"pid": process.pid, "port": port}))
    return EmbeddedServer(port=port, pid=process.pid, owned=True)


def _wait_for_exit(server: EmbeddedServer, timeout: float) -> None:
    """Wait until the server, sent SIGTERM, has exited; kill it after ``timeout``.

    SecantusDB's stop closes its listening socket, then waits up to 2 s for its accept thread, which a closed
    socket does not wake on Linux. A connection does: the wait knocks at the port (each stop 2.05 -> 0.1 s). The
    server stops when its owner exits, once this process's own client is closed (``before_stop``) and any other
    part of the gateway it served has stopped.
    """
    deadline = time.monotonic() + timeout
    while not _reaped(server.pid):
        if time.monotonic() > deadline:
            os.kill(server.pid, signal.SIGKILL)
            return
        listening("127.0.0.1", server.port)
        time.sleep(0.02)


def _reaped(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:  # not this process's child
        return not alive(pid)


def before_stop(uri: str, close: Callable[[], None]) -> None:
    """Have ``close`` (a client's) run before this process stops the server at ``uri``.

    A client left open would keep polling a server that is gone while the process exits.
    """
    _closers[uri] = close
