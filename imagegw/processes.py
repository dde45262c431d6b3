"""Small facts about this host's processes: a free loopback port, a listening one, a log's end; children
that do not outlive their parent."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def listening(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def log_tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a log file; empty if it cannot be read."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def dying_with_this_process() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel SIGTERM the child when this process dies, even by SIGKILL, so
    that no part of the gateway is left orphaned; None off the main thread (the kernel ties the signal to
    the thread that forks, and other threads may end before the process does) or where prctl is missing.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_parent_death_signal() -> None:
        # Runs in the child between fork and exec: only system calls, nothing that could take a lock.
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return set_parent_death_signal


def die_with_parent() -> None:
    """Have the kernel SIGTERM this process when its parent dies, even by SIGKILL (at once if it already has):
    for a child forked without an exec, where no ``preexec_fn`` runs. Nothing where prctl is missing."""
    parent = os.getppid()
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


BATCH_NICENESS = 19
"""How much lower than the API a pull's work runs: lookups at job start must not wait behind a conversion."""


def run_as_batch_work() -> None:
    """Lower this process's CPU priority, for it and the threads and programs it starts from now on (tar2sqfs
    among them): the kernel then gives a conversion's CPU to the API's lookups when both want it."""
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if current < BATCH_NICENESS:
        os.setpriority(os.PRIO_PROCESS, 0, BATCH_NICENESS)


def descendants(pid: int) -> set[int]:
    """Every process below ``pid``, from Linux's /proc children lists."""
    found: set[int] = set()
    pending = [pid]
    while pending:
        parent = pending.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = {int(child) for child in (task / "children").read_text().split()}
            except OSError:  # exited meanwhile
                continue
            pending.extend(children - found)
            found |= children
    return found
