"""A Prefect server on PostgreSQL, the database for production (SQLite struggles with concurrent runs).

``prefect server start`` is pointed at a throw-away PostgreSQL with ``PREFECT_SERVER_DATABASE_CONNECTION_URL``,
as an operator would, and a real pull runs through it: the flow run must land in PostgreSQL's tables.
"""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import pytest
import requests

from flows import PULL_FLOW
from imagegw.processes import free_port, log_tail
from tests.gateway_fixtures import Gateway, pull
from testsupport.images import LayerBuilder, push_image
from testsupport.postgres import RunningPostgres
from testsupport.registry import RunningRegistry
from testsupport.service import StoppedOnExit, wait_until_answering

START_TIMEOUT = 180.0
"""Prefect's migrations on a fresh database take ~10 s on 2 idle cores; far longer on a busy machine."""
STOP_TIMEOUT = 15.0


class PrefectServer(StoppedOnExit):
    """``prefect server start`` on a free loopback port, with its home in the given directory."""

    def __init__(self, home: Path, port: int, process: subprocess.Popen[bytes], log_file: IO[bytes]) -> None:
        self.home = home
        self.api_url = f"http://127.0.0.1:{port}/api"
        self.log_path = home / "server.log"
        self._process: subprocess.Popen[bytes] | None = process
        self._log_file: IO[bytes] | None = log_file

    @classmethod
    def start(cls, home: Path, database_url: str) -> PrefectServer:
        """Start the server on ``database_url`` and wait until ``/api/health`` answers."""
        home.mkdir(parents=True, exist_ok=True)
        port = free_port()
        # None of this session's Prefect settings (conftest.py): only what an operator would set.
        env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
        env.update({
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(port),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": database_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_API_BLOCKS_REGISTER_ON_START": "false",
            "DO_NOT_TRACK": "1",
        })
        log_file = open(home / "server.log", "ab")  # noqa: SIM115 - closed in stop()
        process = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start"], stdin=subprocess.DEVNULL,
                                   stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        server = cls(home, port, process, log_file)
        if not wait_until_answering(server.healthy, process, START_TIMEOUT, 0.2):
            returncode = process.poll()
            server.stop()
            state = f"exited with code {returncode}" if returncode is not None else f"not healthy in {START_TIMEOUT} s"
            pytest.fail(f"prefect server start {state}; last lines of {server.log_path}:\n"
                        f"{log_tail(server.log_path, 40)}", pytrace=False)
        return server

    def healthy(self) -> bool:
        try:
            return requests.get(f"{self.api_url}/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def stop(self) -> None:
        """SIGTERM the server's process group (uvicorn and its services), SIGKILL after 15 s. Idempotent."""
        process, self._process = self._process, None
        if process is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(timeout=STOP_TIMEOUT)
                    break
                except subprocess.TimeoutExpired:
                    continue
            process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def _drain_prefect_workers() -> None:
    """Send the logs and events still queued for the server now, before it stops (as Prefect's test harness does)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        for result in (APILogWorker.drain_all(), EventsWorker.drain_all()):
            if inspect.isawaitable(result):
                await result

    run_coro_as_sync(drain())


def test_a_pull_runs_through_a_prefect_server_on_postgresql(
    tmp_path: Path, registry: RunningRegistry, mongo_uri: str, postgres: RunningPostgres
) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # Not the `gateway` fixture: it starts the session's SQLite-backed test server, which this test does not use.
    gateway = Gateway(root=tmp_path, config_path=tmp_path / "imagemanager.json", registry=registry,
                      mongo_uri=mongo_uri, database=f"test_postgres_{os.getpid()}")
    gateway.write_config()
    built = push_image(registry, "test/postgres", "1", [LayerBuilder().file("hello.txt", b"hello from postgres\n")])
    image = gateway.image("test/postgres:1")

    started = time.monotonic()
    with PrefectServer.start(tmp_path / "prefect-home", postgres.url) as server:
        print(f"prefect server start on PostgreSQL: healthy after {time.monotonic() - started:.1f} s")
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            state, record = pull(gateway, image)
            _drain_prefect_workers()
        flow_run_id = str(state.state_details.flow_run_id)
        through_api = requests.get(f"{server.api_url}/flow_runs/{flow_run_id}", timeout=10)

    assert state.is_completed(), record["status_message"]
    assert record["status"] == "READY" and record["id"] == built.manifest_digest.removeprefix("sha256:")
    assert through_api.status_code == 200 and through_api.json()["state_type"] == "COMPLETED"
    # The server kept the run in PostgreSQL, not in a SQLite file of its home.
    rows = postgres.query(f"SELECT flow.name, flow_run.name, flow_run.state_type FROM flow_run "
                          f"JOIN flow ON flow.id = flow_run.flow_id WHERE flow_run.id = '{flow_run_id}'")
    assert rows == [[PULL_FLOW, f"pull {image} for mycluster", "COMPLETED"]]
    states = postgres.query(f"SELECT type FROM flow_run_state WHERE flow_run_id = '{flow_run_id}' ORDER BY timestamp")
    assert [row[0] for row in states][-2:] == ["RUNNING", "COMPLETED"]
    assert not list((tmp_path / "prefect-home").glob("*.db"))
