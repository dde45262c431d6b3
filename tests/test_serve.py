"""``imagegw serve``, ``worker``, ``api`` as real processes: started, pulling through a deployment, stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from flows import EXPIRE_FLOW, PULL_FLOW, REFRESH_FLOW
from imagegw.processes import free_port
from testsupport.images import LayerBuilder, push_image
from testsupport.munge import RunningMunged
from testsupport.registry import RunningRegistry

START_TIMEOUT = 150.0
"""A cold Prefect server alone may take ~20 s on 2 cores; serve allows it 120 s."""
STOP_TIMEOUT = 20.0
COMPLETED = "COMPLETED"


def write_config(root: Path, registry: RunningRegistry | None = None,
                 munged: RunningMunged | None = None, **settings: str) -> Path:
    """A configuration whose state (embedded database, Prefect home, logs) lives under ``root``."""
    platform = {"accesstype": "local", "local": {"imageDir": str(root / "images")}}
    if munged is not None:
        platform["mungeSocketPath"] = munged.socket_path
    config = root / "imagemanager.json"
    config.write_text(json.dumps({
        "StateDirectory": str(root / "state"),
        "Locations": {registry.host: {"url": registry.url}} if registry else {},
        "Platforms": {"servecluster": platform},
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
    api_port, prefect_port = free_port(), free_port()
    output = tmp_path / "serve.out"
    with open(output, "wb") as sink:
        serve = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve", "--config", str(config),
             "--port", str(api_port), "--prefect-port", str(prefect_port)],
            stdout=sink, stderr=subprocess.STDOUT, env=gateway_env(),
        )
    try:
        wait_for_line(output, serve, "ready", START_TIMEOUT)
        lines = output.read_text()
        assert f"API http://127.0.0.1:{api_port} (docs /docs)" in lines
        assert f"Prefect UI http://127.0.0.1:{prefect_port}" in lines
        assert "(embedded)" in lines and "worker for platforms servecluster" in lines

        record = pull_until_done(f"http://127.0.0.1:{api_port}", f"{registry.host}/serve/app:1", munged, 90)

        assert record["status"] == "READY", record
        assert (tmp_path / "images" / f"{record['id']}.squashfs").is_file()
        prefect_api = f"http://127.0.0.1:{prefect_port}/api"
        deadline = time.monotonic() + 15  # the run turns COMPLETED just after the flow wrote READY
        while flow_run_states(prefect_api) != ["COMPLETED"] and time.monotonic() < deadline:
            time.sleep(0.3)
        assert flow_run_states(prefect_api) == ["COMPLETED"]

        # A watched tag pattern: a refresh run on the worker expands it and starts the pull of the new match.
        push_image(registry, "serve/team", "v1", [LayerBuilder().file("team", b"v1")])
        subprocess.run([sys.executable, "-m", "cli", "watch", "add", f"{registry.host}/serve/team:v*",
                        "-p", "servecluster", "-c", str(config)], check=True, env=gateway_env())
        run_deployment(prefect_api, REFRESH_FLOW, "servecluster")
        api = f"http://127.0.0.1:{api_port}"
        deadline = time.monotonic() + 60
        while lookup(api, f"{registry.host}/serve/team:v1", munged).get("status") != "READY":
            assert time.monotonic() < deadline, "the refresh run did not pull the watched tag"
            time.sleep(0.3)
        assert COMPLETED in flow_run_states(prefect_api, REFRESH_FLOW)

        squashfs = tmp_path / "images" / f"{record['id']}.squashfs"
        deadline = time.monotonic() + 150  # the next minute's run, once the image is 10 s old
        while squashfs.exists() and time.monotonic() < deadline:
            time.sleep(1)
        assert not squashfs.exists(), "no scheduled expire run removed the image"
        assert COMPLETED in flow_run_states(prefect_api, EXPIRE_FLOW)
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(timeout=STOP_TIMEOUT)
        finally:
            leftovers = processes_mentioning(str(tmp_path))
            for pid in leftovers:  # so a failure here does not leak into the rest of the session
                os.kill(pid, signal.SIGKILL)
    assert serve.returncode == 0, output.read_text()
    assert leftovers == [], f"processes left running: {leftovers}"


@pytest.mark.parametrize("command", ["worker", "api"])
def test_worker_and_api_need_the_prefect_server(tmp_path: Path, command: str) -> None:
    config = write_config(tmp_path)

    result = subprocess.run([sys.executable, "-m", "cli", command, "--config", str(config)],
                            env=gateway_env(), capture_output=True, text=True, timeout=60)

    assert result.returncode != 0
    assert "set PREFECT_API_URL to the Prefect server the workers use" in result.stderr
