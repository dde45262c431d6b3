"""Run ``prefect server start`` on a loopback port for tests and the screenshots, as an operator runs it.

Prefect's test harness runs an *ephemeral* server, which serves the API but never the UI: a test
of what operators see in the UI, or of a server on PostgreSQL, needs this real one.
"""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
from pathlib import Path

import requests

from imagegw.processes import free_port
from testsupport.service import ChildService

START_TIMEOUT = 180.0
"""Prefect's migrations on a fresh database take ~10 s on 2 idle cores; far longer on a busy machine."""
STOP_TIMEOUT = 15.0


class PrefectServerStartError(RuntimeError):
    """The server did not become healthy; the message carries its log tail."""


class RunningPrefectServer(ChildService):
    """``prefect server start`` on a free port of 127.0.0.1, its home (and SQLite database) in ``home``.

    Attributes:
        api_url: ``http://127.0.0.1:PORT/api``, for ``PREFECT_API_URL``.
        ui_url: ``http://127.0.0.1:PORT``, where the UI is served (when started with ``ui=True``).
    """

    stop_timeout = STOP_TIMEOUT

    def __init__(self, home: Path, port: int) -> None:
        super().__init__(home / "server.log")
        self.home = home
        self.ui_url = f"http://127.0.0.1:{port}"
        self.api_url = f"{self.ui_url}/api"
        self._env: dict[str, str] = {}

    @classmethod
    def start(cls, home: Path, *, database_url: str | None = None, ui: bool = False) -> RunningPrefectServer:
        """Start the server (on ``database_url``, else SQLite in ``home``) and wait until ``/api/health`` answers."""
        home.mkdir(parents=True, exist_ok=True)
        server = cls(home, free_port())
        # None of the calling process's Prefect settings (a test session's, say): only what an operator would set.
        env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
        env.update({
            "PREFECT_HOME": str(home),
            # Through the environment, not --port: the UI reads its API address from these settings.
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": server.ui_url.rsplit(":", 1)[1],
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "true" if ui else "false",
            "PREFECT_API_BLOCKS_REGISTER_ON_START": "false",
            "DO_NOT_TRACK": "1",
        })
        if database_url is not None:
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
        server._env = env
        server.resume()
        return server

    def interrupt(self) -> None:
        """Stop the server, as an operator's restart does; its port, home and database stay for :meth:`resume`."""
        self.stop()

    def resume(self) -> None:
        """Start the server (again, after :meth:`interrupt`: same port and database) and wait until it is healthy."""
        self._spawn([sys.executable, "-m", "prefect", "server", "start"], env=self._env)
        failure = self._wait_answering(self.healthy, START_TIMEOUT, 0.2)
        if failure is not None:
            state = failure.state(f"was not healthy within {START_TIMEOUT:.0f} s")
            raise PrefectServerStartError(f"prefect server start {state}; last lines of {self.log_path}:\n"
                                          f"{failure.log_tail}")

    def healthy(self) -> bool:
        try:
            return requests.get(f"{self.api_url}/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def _terminate(self, process: subprocess.Popen[bytes]) -> None:
        """SIGTERM the server's process group (uvicorn and its services), SIGKILL after STOP_TIMEOUT s."""
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


def send_queued_logs_and_events() -> None:
    """Send this process's logs and events still queued for the Prefect server now, before it stops
    (as Prefect's test harness does): the server records task runs, for one, from those events."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        for result in (APILogWorker.drain_all(), EventsWorker.drain_all()):
            if inspect.isawaitable(result):
                await result

    run_coro_as_sync(drain())
