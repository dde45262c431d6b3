"""What an operator sees in the Prefect UI, rendered by a real browser (headless Chromium).

Prefect's test harness serves no UI, so this test starts ``prefect server start`` with it, as
``imagegw serve`` does, registers the platform's work pool and deployments as ``imagegw deploy``
does, and pulls an image against that server.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from deployments import work_pool_name
from tests.gateway_fixtures import Gateway, pull
from testsupport.chromium import ChromiumError, rendered_text
from testsupport.images import LayerBuilder, push_image
from testsupport.prefect_server import PrefectServerStartError, RunningPrefectServer, send_queued_logs_and_events
from testsupport.registry import RunningRegistry

UI = "/v2"
"""Where Prefect 3 serves the UI it opens by default (``/`` redirects there)."""


def test_the_ui_shows_the_pull_run_its_report_and_the_platform_limit(
        tmp_path: Path, registry: RunningRegistry, mongo_uri: str) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments.platforms import deploy_platforms

    # Not the `gateway` fixture: it starts the session's test server, which serves no UI.
    gateway = Gateway(root=tmp_path, config_path=tmp_path / "imagemanager.json", registry=registry,
                      mongo_uri=mongo_uri, database=f"test_ui_{os.getpid()}")
    gateway.write_config(Platforms={"mycluster": {"accesstype": "local", "local": {"imageDir": str(gateway.image_dir)},
                                                  "maxConcurrentPulls": 3}})
    built = push_image(registry, "test/ui", "1", [LayerBuilder().file("hello.txt", b"hello from the UI test\n")])
    image = gateway.image("test/ui:1")
    try:
        server = RunningPrefectServer.start(tmp_path / "prefect-home", ui=True)
    except PrefectServerStartError as exc:
        pytest.fail(str(exc), pytrace=False)
    with server:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            deploy_platforms(gateway.settings)
            state, record = pull(gateway, image)
            send_queued_logs_and_events()
        assert state.is_completed(), record["status_message"]
        artifact_id = the_run_artifact(server.api_url, state.state_details.flow_run_id)
        pages = [f"{server.ui_url}{UI}/runs", f"{server.ui_url}{UI}/artifacts/artifact/{artifact_id}",
                 f"{server.ui_url}{UI}/work-pools/work-pool/{work_pool_name('mycluster')}"]
        try:
            with ThreadPoolExecutor(len(pages)) as browsers:  # each Chromium mostly waits: render side by side
                runs, artifact, pool = browsers.map(rendered_text, pages)
        except ChromiumError as exc:
            pytest.fail(str(exc), pytrace=False)

    assert f"pull {image} for mycluster" in runs and "Completed" in runs
    assert built.manifest_digest in artifact
    assert "layers fetched 1" in artifact and str(gateway.image_dir / f"{record['id']}.squashfs") in artifact
    assert "Concurrency Limit 4" in pool  # its 3 pulls and one scheduled run


def the_run_artifact(api_url: str, flow_run_id: object) -> str:
    """The id of the one artifact the flow run left."""
    response = requests.post(f"{api_url}/artifacts/filter", timeout=10,
                             json={"artifacts": {"flow_run_id": {"any_": [str(flow_run_id)]}}})
    response.raise_for_status()
    ids = [artifact["id"] for artifact in response.json()]
    assert len(ids) == 1, response.json()
    return str(ids[0])
