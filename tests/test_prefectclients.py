"""The Prefect API clients of the gateway's processes (``deployments.prefectclients``), checked against the installed
Prefect: its client module must still build its TLS context and its httpx clients the way the tuning expects."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import certifi

from deployments.prefectclients import QUICK_RETRY_DELAYS, tune_prefect_clients
from testsupport.service import LoopbackHttpServer, answer_json

SCRIPT = """
from prefect.client.orchestration import get_client
from deployments.prefectclients import tune_prefect_clients

def context(client):
    return client._client._transport._pool._ssl_context

before = context(get_client(sync_client=True)) is context(get_client(sync_client=True))
tune_prefect_clients()
after = context(get_client(sync_client=True)) is context(get_client(sync_client=True)) is context(get_client())
print(before, after)
"""


def sharing_seen(**environment: str) -> list[str]:
    """Whether two clients shared a context before and after ``tune_prefect_clients``, in a process of their own."""
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120,
                            env={"PREFECT_API_URL": "http://127.0.0.1:9/api", "PATH": "/usr/bin:/bin", **environment})
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_clients_share_one_context_once_asked_to() -> None:
    assert sharing_seen() == ["False", "True"]


def test_a_context_that_skips_verification_is_never_shared() -> None:
    assert sharing_seen(PREFECT_API_TLS_INSECURE_SKIP_VERIFY="true") == ["False", "False"]


MADE_BEFOREHAND = """
from prefect.client.orchestration import get_client
from deployments.prefectclients import make_tls_context, tune_prefect_clients

tune_prefect_clients()
made = make_tls_context()
print(get_client(sync_client=True)._client._transport._pool._ssl_context is made)
"""


def test_the_context_made_beforehand_is_the_one_clients_use(tmp_path: Path) -> None:
    # A fork server makes it once for all the processes it forks.
    bundle = tmp_path / "site-ca.pem"
    bundle.write_text(Path(certifi.where()).read_text())
    for environment in ({}, {"PREFECT_API_SSL_CERT_FILE": str(bundle)}):
        result = subprocess.run([sys.executable, "-c", MADE_BEFOREHAND], capture_output=True, text=True, timeout=120,
                                env={"PREFECT_API_URL": "http://127.0.0.1:9/api", "PATH": "/usr/bin:/bin",
                                     **environment})
        assert result.stdout.split() == ["True"], result.stderr


class BusyServer(LoopbackHttpServer):
    """Answers ``GET /api/hello`` with 503 (as Prefect's server does when its SQLite database was taken) the first
    ``refusals`` times, then with 200."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.answers: list[int] = []
        super().__init__(_Hello)


class _Hello(BaseHTTPRequestHandler):
    def log_message(self, *_: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        server: BusyServer = self.server.owner  # type: ignore[attr-defined]
        status = 503 if len(server.answers) < server.refusals else 200
        server.answers.append(status)
        answer_json(self, status, b'"hello"' if status == 200 else b'{"exception_message": "Service Unavailable"}')


def test_sync_and_async_clients_try_a_503_again_within_a_moment_not_after_seconds() -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    tune_prefect_clients()
    refusals = len(QUICK_RETRY_DELAYS)

    async def hello_async() -> int:
        async with get_client() as client:
            return (await client.hello()).status_code

    for hello in (lambda: get_client(sync_client=True).hello().status_code, lambda: asyncio.run(hello_async())):
        with BusyServer(refusals) as server, temporary_settings({PREFECT_API_URL: f"{server.url}/api"}):
            started = time.monotonic()
            assert hello() == 200
            # Prefect's own back-off waits 2 s, 4 s and 8 s after three 503s.
            assert time.monotonic() - started < 2 * sum(QUICK_RETRY_DELAYS) + 1
            assert server.answers == [503] * refusals + [200]
