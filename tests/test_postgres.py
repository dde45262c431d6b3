"""A Prefect server on PostgreSQL, the database for production (SQLite struggles with concurrent runs).

``prefect server start`` is pointed at a throw-away PostgreSQL with ``PREFECT_SERVER_DATABASE_CONNECTION_URL``,
as an operator would, and a real pull runs through it: the flow run must land in PostgreSQL's tables.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import requests

from flows import PULL_FLOW
from tests.gateway_fixtures import Gateway, pull
from testsupport.images import LayerBuilder, push_image
from testsupport.postgres import RunningPostgres
from testsupport.prefect_server import PrefectServerStartError, RunningPrefectServer, send_queued_logs_and_events
from testsupport.registry import RunningRegistry


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
    try:
        server = RunningPrefectServer.start(tmp_path / "prefect-home", database_url=postgres.url)
    except PrefectServerStartError as exc:
        pytest.fail(str(exc), pytrace=False)
    with server:
        print(f"prefect server start on PostgreSQL: healthy after {time.monotonic() - started:.1f} s")
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            state, record = pull(gateway, image)
            send_queued_logs_and_events()
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
