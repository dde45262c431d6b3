"""``/healthz``: up or down for anyone (a load balancer); why, with URLs and paths, only for admins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prefect.settings import PREFECT_API_URL, temporary_settings

from api.app import create_app
from imagegw.config import load_settings
from imagegw.processes import free_port
from tests.api_fixtures import Api
from testsupport.munge import RunningMunged


def test_everything_up_is_200_with_up_or_down_only(api: Api) -> None:
    response = api.client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"healthy": True, "checks": {"mongodb": "up", "prefect": "up", "munge:mycluster": "up"}}


def test_what_is_down_is_named_but_where_it_is_only_to_admins(tmp_path: Path, munged: RunningMunged,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMAGEGW_MONGODB_URI", raising=False)  # the session's embedded server exported it
    mongo_port, prefect_port = free_port(), free_port()  # nothing listens on either
    missing_socket = tmp_path / "no-munged" / "socket"
    config = tmp_path / "imagemanager.json"
    config.write_text(json.dumps({
        "StateDirectory": str(tmp_path / "state"),
        "MongoDBURI": f"mongodb://127.0.0.1:{mongo_port}",
        "Platforms": {
            "upcluster": {"accesstype": "local", "local": {"imageDir": str(tmp_path / "images")},
                          "mungeSocketPath": munged.socket_path, "admins": ["root"]},
            "downcluster": {"accesstype": "local", "local": {"imageDir": str(tmp_path / "images")},
                            "mungeSocketPath": str(missing_socket)},
        },
    }))
    client = TestClient(create_app(load_settings(config)))
    prefect_url = f"http://127.0.0.1:{prefect_port}/api"

    with temporary_settings(updates={PREFECT_API_URL: prefect_url}):
        anonymous = client.get("/healthz")
        garbage = client.get("/healthz", headers={"authentication": "MUNGE:garbage:"})
        user = client.get("/healthz", headers={"authentication": munged.mint(uid=1000, gid=1000)})
        admin = client.get("/healthz", headers={"authentication": munged.mint(uid=0, gid=0)})

    summary = {"healthy": False, "checks": {"mongodb": "down", "prefect": "down", "munge:upcluster": "up",
                                            "munge:downcluster": "down"}}
    for response in (anonymous, garbage, user):
        assert response.status_code == 503
        assert response.json() == summary
        for secret in ("127.0.0.1", str(mongo_port), str(prefect_port), "mongodb://", "http", str(tmp_path), "/"):
            assert secret not in response.text
    answer = admin.json()
    details = answer.pop("details")
    assert admin.status_code == 503 and answer == summary
    assert set(details) == {"mongodb", "prefect", "munge:downcluster"}
    assert str(mongo_port) in details["mongodb"]
    assert str(prefect_port) in details["prefect"]
    assert str(missing_socket) in details["munge:downcluster"]
