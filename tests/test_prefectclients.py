"""The Prefect API clients of the gateway's processes (``deployments.prefectclients``), checked against the installed
Prefect: its client module must still build its TLS context and its httpx clients the way the tuning expects."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import certifi
import pytest

from deployments.prefectclients import QUICK_RETRY_DELAYS, check_prefect_server_version, tune_prefect_clients
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


class AdminServer(LoopbackHttpServer):
    """Answers Prefect's ``GET /api/admin/version`` with ``version`` and ``GET /api/admin/storage`` with no default
    storage, counting the requests of each since the last ``GET /count-from-now``."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.asked: Counter[str] = Counter()
        super().__init__(_Admin)


class _Admin(BaseHTTPRequestHandler):
    def log_message(self, *_: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        server: AdminServer = self.server.owner  # type: ignore[attr-defined]
        answers = {"/api/admin/version": json.dumps(server.version).encode(),
                   "/api/admin/storage": b'{"default_result_storage_block_id": null}'}
        if self.path == "/count-from-now":
            server.asked.clear()
            answer_json(self, 200, b"0")
        elif self.path in answers:
            server.asked[self.path] += 1
            answer_json(self, 200, answers[self.path])
        else:
            answer_json(self, 404, b'{"detail": "Not Found"}')


FORKED_AFTER_THE_CHECK = """
import asyncio, logging, os, sys, urllib.request
from prefect._internal.version_checking import check_server_version
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL
from deployments.prefectclients import check_prefect_server_version

if sys.argv[1] == "checked":
    check_prefect_server_version()
urllib.request.urlopen(PREFECT_API_URL.value().removesuffix("/api") + "/count-from-now").read()
child = os.fork()
if child == 0:  # a run's process, as the fork server forks it: its HTTP and its event clients check, once checked
    with get_client(sync_client=True) as client:
        client.raise_for_api_version_mismatch_once()
    asyncio.run(check_server_version(PREFECT_API_URL.value(), logging.getLogger()))
    os._exit(0)
os.waitpid(child, 0)
"""


def asked_for_the_version_after_the_fork(server: AdminServer, how: str) -> int:
    result = subprocess.run([sys.executable, "-c", FORKED_AFTER_THE_CHECK, how], capture_output=True, text=True,
                            timeout=120, env={"PREFECT_API_URL": f"{server.url}/api", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    return server.asked["/api/admin/version"]


def test_a_process_forked_after_the_check_does_not_ask_the_server_its_version_again() -> None:
    from prefect import __version__

    with AdminServer(__version__) as server:
        assert asked_for_the_version_after_the_fork(server, "unchecked") == 2  # by the HTTP and the event clients
        assert asked_for_the_version_after_the_fork(server, "checked") == 0


def test_a_server_of_another_major_version_is_refused_by_the_check() -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with AdminServer("2.20.0") as server, temporary_settings({PREFECT_API_URL: f"{server.url}/api"}):
        with pytest.raises(RuntimeError, match="Found incompatible versions: client: 3.+, server: 2.20.0"):
            check_prefect_server_version()


def test_the_pull_flow_starts_without_asking_the_server_for_a_result_storage() -> None:
    from prefect import __version__, flow
    from prefect.results import get_result_store
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.pull import pull_image

    @flow
    def naming_no_storage() -> None:
        pass

    with AdminServer(__version__) as server, temporary_settings({PREFECT_API_URL: f"{server.url}/api"}):
        get_result_store().update_for_flow(naming_no_storage)
        assert server.asked["/api/admin/storage"] == 1  # what Prefect does for a flow naming none
        server.asked.clear()
        get_result_store().update_for_flow(pull_image)
        assert server.asked["/api/admin/storage"] == 0
