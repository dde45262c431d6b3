"""``imagegw serve``, ``worker``, ``api`` as real processes: started, pulling through a deployment, stopped."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from flows import EXPIRE_FLOW, PULL_FLOW, REFRESH_FLOW
from tests.serve_fixtures import gateway_env, serving, write_config
from testsupport.images import LayerBuilder, push_image
from testsupport.munge import RunningMunged
from testsupport.registry import RunningRegistry

COMPLETED = "COMPLETED"


def pull_until_done(api: str, image: str, munged: RunningMunged, timeout: float) -> dict[str, Any]:
    """Pull through the REST API as shifterimg does: re-POST until the record is READY or FAILURE."""
    deadline = time.monotonic() + timeout
    while True:
        response = requests.post(f"{api}/api/pull/servecluster/docker/{image}/",
                                 headers={"authentication": munged.mint(uid=1000, gid=1000)}, timeout=10)
        record = response.json()
        if record.get("status") in ("READY", "FAILURE") or time.monotonic() > deadline:
            return record
        time.sleep(0.5)


def flow_run_states(prefect_api: str, flow: str = PULL_FLOW) -> list[str]:
    """The states of one flow's runs (by default the pull flow's, not the expire flow's scheduled ones)."""
    response = requests.post(f"{prefect_api}/flow_runs/filter", json={"flows": {"name": {"any_": [flow]}}},
                             timeout=10)
    return [run["state_type"] for run in response.json()]


def run_deployment(prefect_api: str, flow: str, platform: str) -> None:
    """Start a run of a deployment, as an operator's Run button does."""
    deployment = requests.get(f"{prefect_api}/deployments/name/{flow}/{platform}", timeout=10).json()
    requests.post(f"{prefect_api}/deployments/{deployment['id']}/create_flow_run", json={},
                  timeout=10).raise_for_status()


def lookup(api: str, image: str, munged: RunningMunged) -> dict[str, Any]:
    return requests.get(f"{api}/api/lookup/servecluster/docker/{image}/",
                        headers={"authentication": munged.mint(uid=1000, gid=1000)}, timeout=10).json()


def test_serve_pulls_through_the_deployment_and_stops_everything(
        tmp_path: Path, registry: RunningRegistry, munged: RunningMunged) -> None:
    push_image(registry, "serve/app", "1", [LayerBuilder().file("x", b"x")])
    # Images live 10 s, and the expire flow runs every minute: the pulled image is expired by a scheduled run.
    config = write_config(tmp_path, registry, munged, ImageExpirationTimeout="0:00:00:10", ExpireSchedule="* * * * *")
    with serving(tmp_path, config) as served:
        lines = served.output.read_text()
        assert f"API {served.api} (docs /docs)" in lines
        assert f"Prefect UI http://127.0.0.1:{served.prefect_port}" in lines
        assert "(embedded)" in lines and "worker for platforms servecluster" in lines

        record = pull_until_done(served.api, f"{registry.host}/serve/app:1", munged, 90)

        assert record["status"] == "READY", record
        assert (tmp_path / "images" / f"{record['id']}.squashfs").is_file()
        prefect_api = served.prefect_api
        deadline = time.monotonic() + 15  # the run turns COMPLETED just after the flow wrote READY
        while flow_run_states(prefect_api) != ["COMPLETED"] and time.monotonic() < deadline:
            time.sleep(0.3)
        assert flow_run_states(prefect_api) == ["COMPLETED"]

        # A watched tag pattern: a refresh run on the worker expands it and starts the pull of the new match.
        push_image(registry, "serve/team", "v1", [LayerBuilder().file("team", b"v1")])
        subprocess.run([sys.executable, "-m", "cli", "watch", "add", f"{registry.host}/serve/team:v*",
                        "-p", "servecluster", "-c", str(config)], check=True, env=gateway_env())
        run_deployment(prefect_api, REFRESH_FLOW, "servecluster")
        deadline = time.monotonic() + 60
        while lookup(served.api, f"{registry.host}/serve/team:v1", munged).get("status") != "READY":
            assert time.monotonic() < deadline, "the refresh run did not pull the watched tag"
            time.sleep(0.3)
        assert COMPLETED in flow_run_states(prefect_api, REFRESH_FLOW)
        # The access log keeps the lookups that failed and the pulls, not the ones that found their image.
        lookup(served.api, f"{registry.host}/serve/absent:1", munged)
        logged = (tmp_path / "state" / "logs" / "api.log").read_text().splitlines()
        assert any('serve/absent%3A1/ HTTP/1.1" 404' in line for line in logged)
        assert any('"POST /api/pull/' in line and '" 200' in line for line in logged)
        assert not any('"GET /api/lookup/' in line and '" 200' in line for line in logged)

        squashfs = tmp_path / "images" / f"{record['id']}.squashfs"
        deadline = time.monotonic() + 150  # the next minute's run, once the image is 10 s old
        while squashfs.exists() and time.monotonic() < deadline:
            time.sleep(1)
        assert not squashfs.exists(), "no scheduled expire run removed the image"
        deadline = time.monotonic() + 30  # the run ends a moment after it removed the files (on a busy host, later)
        while COMPLETED not in flow_run_states(prefect_api, EXPIRE_FLOW) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert COMPLETED in flow_run_states(prefect_api, EXPIRE_FLOW)
    assert served.process.returncode == 0, served.output.read_text()
    assert served.leftovers == [], f"processes left running: {served.leftovers}"


@pytest.mark.parametrize("command", ["worker", "api"])
def test_worker_and_api_need_the_prefect_server(tmp_path: Path, command: str) -> None:
    config = write_config(tmp_path)

    result = subprocess.run([sys.executable, "-m", "cli", command, "--config", str(config)],
                            env=gateway_env(), capture_output=True, text=True, timeout=60)

    assert result.returncode != 0
    assert "set PREFECT_API_URL to the Prefect server the workers use" in result.stderr
