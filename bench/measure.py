"""Run a command and measure it: wall time, CPU of its whole (waited-for) process tree, and the peak
of the summed resident memory of the process and all its descendants, sampled from /proc."""

from __future__ import annotations

import os
import resource
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

PAGE = os.sysconf("SC_PAGE_SIZE")
SAMPLE_INTERVAL = 0.05


@dataclass
class Measured:
    command: list[str]
    wall: float
    user: float
    sys: float
    peak_rss: int
    """Bytes: the largest sum of RSS over the process tree seen by the sampler."""
    max_rss: int
    """Bytes: the kernel's ru_maxrss, the largest single process of the tree."""
    returncode: int
    stdout: str
    log: Path | None

    @property
    def cpu(self) -> float:
        return self.user + self.sys

    def check(self) -> Measured:
        if self.returncode != 0:
            tail = self.log.read_text(errors="replace")[-3000:] if self.log and self.log.exists() else ""
            raise RuntimeError(f"{' '.join(self.command)} exited with {self.returncode}:\n{tail}")
        return self


class _Process(NamedTuple):
    ppid: int
    rss_pages: int
    cpu_ticks: int


def _proc_table() -> dict[int, _Process]:
    """Every process (threads are not listed in /proc) with its parent, RSS and CPU time."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                data = handle.read()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2:].split()
        # after the command: state(0) ppid(1) ... utime(11) stime(12) ... rss(21)
        table[int(name)] = _Process(int(fields[1]), int(fields[21]), int(fields[11]) + int(fields[12]))
    return table


def _tree(root: int) -> list[_Process]:
    """``root`` and all its live descendants."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, process in table.items():
        children.setdefault(process.ppid, []).append(pid)
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        if pid in table:
            found.append(table[pid])
        stack.extend(children.get(pid, ()))
    return found


def tree_rss(root: int) -> int:
    """Bytes of RSS of ``root`` and all its descendants now."""
    return sum(process.rss_pages for process in _tree(root)) * PAGE


def tree_cpu(root: int) -> float:
    """Seconds of user+system CPU of ``root`` and its live descendants."""
    return sum(process.cpu_ticks for process in _tree(root)) / os.sysconf("SC_CLK_TCK")


class TreeSampler:
    """Samples ``tree_rss(pid)`` every 50 ms in a thread; ``peak`` is the largest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, tree_rss(self.pid))
            except (OSError, ValueError, IndexError):
                pass
            self._stop.wait(SAMPLE_INTERVAL)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def measure(command: list[str | Path], *, log: Path | None = None, env: dict[str, str] | None = None,
            cwd: Path | None = None, stdin: Any = subprocess.DEVNULL, stdout_file: Path | None = None) -> Measured:
    """Run ``command`` to its end; its stderr (and stdout unless ``stdout_file``) go to ``log``."""
    command = [str(part) for part in command]
    log_handle = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    out_handle = open(stdout_file, "wb") if stdout_file else subprocess.PIPE  # noqa: SIM115
    try:
        started = time.monotonic()
        process = subprocess.Popen(command, stdin=stdin, stdout=out_handle, stderr=log_handle, env=env, cwd=cwd)
        sampler = TreeSampler(process.pid)
        stdout = b""
        if process.stdout is not None:
            stdout = process.stdout.read()  # the pulls print a small JSON record
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.monotonic() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        peak = sampler.stop()
    finally:
        if log:
            log_handle.close()  # type: ignore[union-attr]
        if stdout_file:
            out_handle.close()  # type: ignore[union-attr]
    return Measured(command, wall, usage.ru_utime, usage.ru_stime, peak, usage.ru_maxrss * 1024,
                    process.returncode, stdout.decode(errors="replace"), log)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
