"""A real ``imagegw serve`` for tests: its configuration, its start on loopback ports, its clean stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from imagegw.processes import free_port
from testsupport.munge import RunningMunged
from testsupport.registry import RunningRegistry

START_TIMEOUT = 150.0
"""A cold Prefect server alone may take ~20 s on 2 cores; serve allows it 120 s."""
STOP_TIMEOUT = 20.0
PLATFORM = "servecluster"


def write_config(root: Path, registry: RunningRegistry | None = None,
                 munged: RunningMunged | None = None, platform: dict[str, Any] | None = None,
                 **settings: Any) -> Path:
    """A configuration whose state (embedded database, Prefect home, logs) lives under ``root``;
    ``platform`` adds keys to the one platform's."""
    spec: dict[str, Any] = {"accesstype": "local", "local": {"imageDir": str(root / "images")}}
    if munged is not None:
        spec["mungeSocketPath"] = munged.socket_path
    config = root / "imagemanager.json"
    config.write_text(json.dumps({
        "StateDirectory": str(root / "state"),
        "Locations": {registry.host: {"url": registry.url}} if registry else {},
        "Platforms": {PLATFORM: {**spec, **(platform or {})}},
        **settings,
    }))
    return config


def gateway_env() -> dict[str, str]:
    """The test session's environment without its Prefect home or server, so serve chooses its own."""
    return {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "IMAGEGW_"))}


def processes_mentioning(marker: str) -> list[int]:
    """Live processes whose command line or environment names ``marker`` (every child of serve has it)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            text = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if marker.encode() in text:
            found.append(int(proc.name))
    return found


def wait_for_line(output: Path, process: subprocess.Popen[bytes], prefix: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in output.read_text().splitlines():
            if line.startswith(prefix):
                return line
        if process.poll() is not None:
            break
        time.sleep(0.2)
    pytest.fail(f"no {prefix!r} line from imagegw serve (exit {process.poll()}):\n{output.read_text()}")


@dataclass
class Served:
    """A running ``imagegw serve``: where its API and Prefect answer, its output; after the stop, what
    was left running."""

    process: subprocess.Popen[bytes]
    root: Path
    output: Path
    api_port: int
    prefect_port: int
    leftovers: list[int] = field(default_factory=list)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def prefect_api(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    def stop(self) -> None:
        """SIGINT, as Ctrl-C does; whatever outlives it is killed and kept in ``leftovers``."""
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        finally:
            self.leftovers = processes_mentioning(str(self.root))
            for pid in self.leftovers:  # so a failure here does not leak into the rest of the session
                os.kill(pid, signal.SIGKILL)


@contextmanager
def serving(root: Path, config: Path) -> Iterator[Served]:
    """``imagegw serve --config config`` on free loopback ports, ready, until the block ends."""
    output = root / "serve.out"
    api_port, prefect_port = free_port(), free_port()
    with open(output, "wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve", "--config", str(config),
             "--port", str(api_port), "--prefect-port", str(prefect_port)],
            stdout=sink, stderr=subprocess.STDOUT, env=gateway_env(),
        )
    served = Served(process, root, output, api_port, prefect_port)
    try:
        wait_for_line(output, process, "ready", START_TIMEOUT)
        yield served
    finally:
        served.stop()
