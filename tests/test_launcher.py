"""Creating a pull's flow run while Prefect's server answers 503 (its SQLite database locked by another writer).

A proxy in front of the real Prefect server turns the first tries at creating a run into 503s, as the server
does when an insert finds the database taken; everything else reaches the server.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from uuid import UUID

import pytest
import requests

from deployments.launcher import DeploymentLauncher
from deployments.platforms import deploy_platforms
from imagegw.store import PullKey
from tests.gateway_fixtures import Gateway
from testsupport.service import LoopbackHttpServer, answer_json

CREATE_RUN = re.compile(r"/api/deployments/[^/]+/create_flow_run")


class RefusingProxy(LoopbackHttpServer):
    """Answers the first ``refusals`` run creations with ``status``; relays everything else to ``upstream``."""

    def __init__(self, upstream: str, status: int, refusals: int) -> None:
        self.upstream = upstream
        self.status = status
        self.refusals = refusals
        self.creation_keys: list[str | None] = []
        """The idempotency key of each try at creating a run."""
        super().__init__(_Relay)


class _Relay(BaseHTTPRequestHandler):
    def log_message(self, *_: object) -> None:
        pass

    def _relay(self) -> None:
        proxy: RefusingProxy = self.server.owner  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.command == "POST" and CREATE_RUN.fullmatch(self.path):
            proxy.creation_keys.append(json.loads(body).get("idempotency_key"))
            if len(proxy.creation_keys) <= proxy.refusals:
                answer_json(self, proxy.status, b'{"exception_message": "Service Unavailable"}')
                return
        headers = {name: value for name, value in self.headers.items() if name.lower() != "host"}
        answer = requests.request(self.command, proxy.upstream + self.path, data=body, headers=headers, timeout=30)
        answer_json(self, answer.status_code, answer.content)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _relay  # noqa: N815 - http.server naming


StartProxy = Callable[[int, int], RefusingProxy]
"""(status, refusals) → a proxy answering that many run creations with that status."""


@pytest.fixture
def proxy_for(prefect_api: None) -> Iterator[StartProxy]:
    from prefect.settings import PREFECT_API_URL

    upstream = str(PREFECT_API_URL.value()).removesuffix("/api")
    started: list[RefusingProxy] = []

    def start(status: int, refusals: int) -> RefusingProxy:
        started.append(RefusingProxy(upstream, status, refusals))
        return started[-1]

    yield start
    for proxy in started:
        proxy.stop()


@contextmanager
def prefect_through(proxy: RefusingProxy) -> Iterator[None]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: f"{proxy.url}/api"}):
        yield


def test_a_run_refused_with_503_is_created_once_without_prefects_two_second_waits(
        gateway: Gateway, proxy_for: StartProxy) -> None:
    from prefect.client.orchestration import get_client

    deploy_platforms(gateway.settings)
    proxy = proxy_for(503, 2)
    launch = DeploymentLauncher(gateway.settings)

    started = time.monotonic()
    with prefect_through(proxy):
        run_id = launch(PullKey("mycluster", "docker", "busy/app:1"), "pull-id-1")

    # Prefect's client waits 2 s, then 4, after a 503: two of them cost it 6 s.
    assert time.monotonic() - started < 2
    assert proxy.creation_keys == ["pull-id-1"] * 3, "each try names the pull, so no try makes a second run"
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(run_id))
    assert run.parameters["image"] == "busy/app:1"
    assert run.idempotency_key == "pull-id-1"


def test_an_error_other_than_503_is_not_tried_again(gateway: Gateway, proxy_for: StartProxy) -> None:
    from prefect.exceptions import PrefectHTTPStatusError

    deploy_platforms(gateway.settings)
    proxy = proxy_for(500, 1)
    launch = DeploymentLauncher(gateway.settings)

    with prefect_through(proxy), pytest.raises(PrefectHTTPStatusError, match="500"):
        launch(PullKey("mycluster", "docker", "broken/app:1"), "pull-id-2")
    assert proxy.creation_keys == ["pull-id-2"]


def test_a_deployment_made_again_after_the_first_pull_still_gets_the_next_pulls(gateway: Gateway,
                                                                              prefect_api: None) -> None:
    from prefect.client.orchestration import get_client

    deploy_platforms(gateway.settings)
    launch = DeploymentLauncher(gateway.settings)
    launch(PullKey("mycluster", "docker", "first/app:1"), "pull-id-3")
    with get_client(sync_client=True) as client:
        removed = client.read_deployment_by_name("pull-image/mycluster").id
        client.delete_deployment(removed)
    deploy_platforms(gateway.settings)

    run_id = launch(PullKey("mycluster", "docker", "second/app:1"), "pull-id-4")

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(run_id))
        remade = client.read_deployment_by_name("pull-image/mycluster").id
    assert remade != removed
    assert run.deployment_id == remade and run.parameters["image"] == "second/app:1"
