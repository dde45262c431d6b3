"""A worker's doorbell: a pull's request reaches the platform's workers on this host at once, not at their next poll.

A Prefect worker learns of a new flow run by polling the server every ``PREFECT_WORKER_QUERY_SECONDS`` (1 s here),
so a pull waited half a poll on average before its run was submitted, and a whole one at worst. Each worker of a
platform on this host also listens on a loopback UDP port, named by a file under the state directory; the launcher
that created a run sends an empty datagram to each worker of the run's platform, and each polls at once. Workers on
other hosts find the run at their next poll, as before. A datagram lost, or sent to a worker that died, costs only
that wait, and a datagram from anyone else only a poll.

Plain sockets and files: the worker's side is driven by ``deployments.platforms``, the sender is the launcher.
"""

from __future__ import annotations

import contextlib
import glob
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from imagegw.processes import alive

DOORBELLS = "doorbells"
"""The directory, under the state directory, of the files naming each local worker's port."""


def _bell(directory: Path, platform: str, pid: int) -> Path:
    # A platform name is a configuration key; the pid after the last "@" tells the workers of one platform apart.
    return directory / f"{platform}@{pid}"


@contextlib.contextmanager
def hung(state_dir: Path, platform: str, port: int) -> Iterator[None]:
    """Name ``port`` as this process's doorbell for ``platform`` while the block runs."""
    directory = state_dir / DOORBELLS
    directory.mkdir(parents=True, exist_ok=True)
    bell = _bell(directory, platform, os.getpid())
    written = bell.with_name(f".{bell.name}.new")  # a name no sender's pattern matches
    written.write_text(str(port))
    written.replace(bell)  # whole before it has its name: a sender never reads half a port
    try:
        yield
    finally:
        bell.unlink(missing_ok=True)


def ring(state_dir: Path, platform: str) -> int:
    """Ring the doorbell of each live worker of ``platform`` on this host; how many were rung. Never raises: a
    worker that misses it still polls."""
    rung = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for bell in (state_dir / DOORBELLS).glob(f"{glob.escape(platform)}@*"):
            pid = bell.name.rpartition("@")[2]
            try:
                if not pid.isdigit() or not alive(int(pid)):
                    bell.unlink(missing_ok=True)  # a worker killed outright left it
                    continue
                sender.sendto(b"", ("127.0.0.1", int(bell.read_text())))
            except (OSError, ValueError):
                continue
            rung += 1
    return rung
