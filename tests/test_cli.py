"""The imagegw command: pull prints the record and exits by outcome; lookup; images."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

from cli.main import main
from tests.gateway_fixtures import Gateway
from testsupport.images import LayerBuilder, push_image


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_pull_then_lookup_and_images(gateway: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    built = push_image(gateway.registry, "cli/app", "1", [LayerBuilder().file("app", b"app")])
    config = str(gateway.config_path)

    status, out, err = run(capsys, "pull", "cli/app:1", "--platform", "mycluster", "--config", config)

    assert status == 0, err
    record = json.loads(out)
    image_id = built.manifest_digest.removeprefix("sha256:")
    assert record["status"] == "READY" and record["id"] == image_id and record["tag"] == ["cli/app:1"]
    assert str(gateway.image_dir / f"{image_id}.squashfs") in err
    with get_client(sync_client=True) as client:
        [run_record] = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=["pull cli/app:1 for mycluster"])))
    assert run_record.tags == ["platform:mycluster"], "tagged by platform, as the deployments' runs are"

    status, out, _ = run(capsys, "lookup", "cli/app", "-p", "mycluster", "-c", config)
    assert status == 1  # "cli/app" means cli/app:latest, which was never pulled
    status, out, _ = run(capsys, "lookup", "cli/app:1", "-p", "mycluster", "-c", config)
    assert status == 0 and json.loads(out)["id"] == image_id

    status, out, _ = run(capsys, "images", "-p", "mycluster", "-c", config)
    assert status == 0
    header, row = out.splitlines()
    assert header.split()[:2] == ["TAG", "ID"] and row.split()[:2] == ["cli/app:1", image_id[:12]]


def test_failed_pull_exits_nonzero_with_the_reason(gateway: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "pull", "cli/absent:1", "-p", "mycluster", "-c", str(gateway.config_path))

    assert status == 1
    assert json.loads(out)["status"] == "FAILURE"
    assert "repository unknown" in err and "cli/absent" in err


@pytest.mark.parametrize("args, message", [
    (["pull", "x", "-p", "nowhere"], "platform 'nowhere' is not defined"),
    (["pull", "Bad/Name", "-p", "mycluster"], "lower-case"),
    (["lookup", "x", "-p", "mycluster", "-c", "/nonexistent.json"], "cannot read configuration"),
])
def test_bad_input_is_a_one_line_error(gateway: Gateway, capsys: pytest.CaptureFixture[str], args: list[str],
                                       message: str) -> None:
    if "-c" not in args:
        args = [*args, "-c", str(gateway.config_path)]

    status, out, err = run(capsys, *args)

    assert status == 2 and out == ""
    assert err.startswith("imagegw: ") and message in err and len(err.splitlines()) == 1


def test_installed_command_pulls_through_a_prefect_server(gateway: Gateway) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL

    push_image(gateway.registry, "cli/proc", "1", [LayerBuilder().file("p", b"p")])
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "IMAGEGW_CONFIG": str(gateway.config_path),
           "PREFECT_LOGGING_LEVEL": "INFO"}

    done = subprocess.run([os.path.join(os.path.dirname(sys.executable), "imagegw"), "pull", "cli/proc:1",
                           "--platform", "mycluster"], env=env, capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "READY"
    # The command exits without the interpreter's teardown: what Prefect sends at exit must still arrive.
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=["pull cli/proc:1 for mycluster"])))
        assert [run.state_type for run in runs] == [StateType.COMPLETED]
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[runs[0].id])))
    assert any("Finished in state Completed" in log.message for log in logs)


def test_installed_command_exits_with_the_pull_outcome(gateway: Gateway) -> None:
    env = {**os.environ, "IMAGEGW_CONFIG": str(gateway.config_path)}

    done = subprocess.run([os.path.join(os.path.dirname(sys.executable), "imagegw"), "pull", "cli/absent:2",
                           "--platform", "mycluster"], env=env, capture_output=True, text=True, timeout=120)

    assert done.returncode == 1
    assert json.loads(done.stdout)["status"] == "FAILURE"
    assert "repository unknown" in done.stderr
