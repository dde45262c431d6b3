"""``python -m testsupport.screenshots [DIR]``: the Prefect UI pictures in ``docs/``, taken from real pulls.

It starts a local registry with two sample images (the second adds a layer to the first), a
Prefect server with its UI, registers the platform (``imagegw deploy``), pulls both images
(``imagegw pull``), and saves, as headless Chromium renders them: the runs page
(``prefect-ui-runs.png``), the second pull's report (``prefect-ui-pull-artifact.png``) and the
platform's work pool with its concurrency limit (``prefect-ui-work-pool.png``).
Everything else lives in a temporary directory, removed at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from deployments import work_pool_name
from testsupport.chromium import screenshot
from testsupport.images import SAMPLE_CMD, SAMPLE_ENTRYPOINT, SAMPLE_ENV, LayerBuilder, push_image, sample_image_layers
from testsupport.prefect_server import RunningPrefectServer
from testsupport.registry import RunningRegistry
from testsupport.service import terminate, wait_until_answering

CHECKOUT = Path(__file__).resolve().parent.parent
DOCS = CHECKOUT / "docs"
WORKER_START_TIMEOUT = 60.0
PLATFORM = "mycluster"
UI = "/v2"
"""Where Prefect 3 serves the UI it opens by default."""


def main(arguments: list[str]) -> int:
    output = Path(arguments[0]) if arguments else DOCS
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="imagegw-screenshots-") as temporary:
        root = Path(temporary)
        with RunningRegistry.start(root / "registry") as registry, \
                RunningPrefectServer.start(root / "prefect-server", ui=True) as server:
            _push_images(registry)
            # Before Prefect is imported (by the commands below): the flows report to this server.
            os.environ.update({"PREFECT_API_URL": server.api_url, "PREFECT_HOME": str(root / "prefect-client")})
            config = _write_config(root, registry)
            _imagegw(["deploy", "--config", str(config)])
            for image in ("demo/hello:1.0", "demo/app:2.1"):
                _imagegw(["pull", image, "--platform", PLATFORM, "--config", str(config)])
            ui = server.ui_url + UI
            shots = [
                (f"{ui}/runs", "prefect-ui-runs.png", 1400, 900),
                # Wide enough for the published path, whose cell does not wrap.
                (f"{ui}/artifacts/artifact/{_latest_artifact(server.api_url, 'demo-app-2-1')}",
                 "prefect-ui-pull-artifact.png", 1600, 1350),
                (f"{ui}/work-pools/work-pool/{work_pool_name(PLATFORM)}", "prefect-ui-work-pool.png", 1400, 800),
            ]
            with _worker(config, server.api_url):  # as on a gateway host: the pool shows ready, not "almost ready"
                for url, name, width, height in shots:
                    screenshot(url, output / name, width=width, height=height)
                    print(f"{output / name}: {url}", file=sys.stderr)
    return 0


def _push_images(registry: RunningRegistry) -> None:
    base = sample_image_layers()
    push_image(registry, "demo/hello", "1.0", base, env=SAMPLE_ENV, entrypoint=SAMPLE_ENTRYPOINT, cmd=SAMPLE_CMD)
    # Incompressible data, so the report's download and squashfs sizes are of a believable order.
    data = LayerBuilder().dir("opt").dir("opt/app").file("opt/app/model.bin", os.urandom(3_000_000))
    push_image(registry, "demo/app", "2.1", [*base, data], env=SAMPLE_ENV, entrypoint=SAMPLE_ENTRYPOINT)


def _write_config(root: Path, registry: RunningRegistry) -> Path:
    config = {
        "DefaultImageLocation": "demoreg",
        "StateDirectory": str(root / "state"),
        "Locations": {"demoreg": {"url": registry.url}},
        "Platforms": {PLATFORM: {"accesstype": "local", "local": {"imageDir": str(root / "images")},
                                 "maxConcurrentPulls": 4}},
    }
    path = root / "imagemanager.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def _imagegw(arguments: list[str]) -> None:
    from cli.main import main as imagegw  # imports Prefect, which must see PREFECT_API_URL first

    print(f"$ imagegw {' '.join(arguments)}", file=sys.stderr)
    if imagegw(arguments) != 0:
        raise SystemExit(f"imagegw {' '.join(arguments)} failed")


@contextmanager
def _worker(config: Path, api_url: str) -> Iterator[None]:
    """``imagegw worker`` on the platform's pool, from the moment the server counts it online."""
    worker = subprocess.Popen([sys.executable, "-m", "cli", "worker", "--config", str(config)], cwd=CHECKOUT,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        if not wait_until_answering(lambda: _worker_online(api_url), worker, WORKER_START_TIMEOUT, 0.5):
            raise SystemExit(f"imagegw worker was not online within {WORKER_START_TIMEOUT:.0f} s")
        yield
    finally:
        os.killpg(worker.pid, signal.SIGTERM)  # the group: the flow runs it started, too
        terminate(worker, 15)


def _worker_online(api_url: str) -> bool:
    response = requests.post(f"{api_url}/work_pools/{work_pool_name(PLATFORM)}/workers/filter", json={}, timeout=5)
    return response.ok and any(worker["status"] == "ONLINE" for worker in response.json())


def _latest_artifact(api_url: str, image_key_part: str) -> str:
    """The id of the newest artifact whose key ends with ``image_key_part``."""
    response = requests.post(f"{api_url}/artifacts/filter", json={"sort": "CREATED_DESC"}, timeout=10)
    response.raise_for_status()
    return next(str(artifact["id"]) for artifact in response.json()
                if (artifact.get("key") or "").endswith(image_key_part))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
