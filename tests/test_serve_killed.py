"""``imagegw serve`` killed outright: none of its parts may be left running, orphaned."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from imagegw.processes import free_port
from tests.serve_fixtures import (
    START_TIMEOUT,
    STOP_TIMEOUT,
    gateway_env,
    processes_mentioning,
    wait_for_line,
    write_config,
)
from testsupport.registry import RunningRegistry


def test_serve_killed_leaves_no_part_running(tmp_path: Path, registry: RunningRegistry) -> None:
    """SIGKILL gives serve no chance to stop its parts: the kernel's parent-death signal must."""
    config = write_config(tmp_path, registry)
    output = tmp_path / "serve.out"
    with open(output, "wb") as sink:
        serve = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve", "--config", str(config), "--port", str(free_port()),
             "--prefect-port", str(free_port())], stdout=sink, stderr=subprocess.STDOUT, env=gateway_env())
    try:
        wait_for_line(output, serve, "ready", START_TIMEOUT)
        assert len(processes_mentioning(str(tmp_path))) >= 4, "database, Prefect server, worker and API run"
        serve.kill()
        serve.wait()
        deadline = time.monotonic() + STOP_TIMEOUT
        while processes_mentioning(str(tmp_path)) and time.monotonic() < deadline:
            time.sleep(0.2)
        leftovers = processes_mentioning(str(tmp_path))
    finally:
        for pid in processes_mentioning(str(tmp_path)):
            os.kill(pid, signal.SIGKILL)
    assert leftovers == [], f"orphaned: {[Path(f'/proc/{pid}/cmdline').read_bytes()[:80] for pid in leftovers]}"
