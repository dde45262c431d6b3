"""``./run demo``: a pull on the embedded defaults, from a local registry this script starts.

It builds a small sample image in Python, pushes it to Debian's docker-registry
on a loopback port, writes a configuration under ``.state/demo``, and runs
``imagegw pull`` on it, printing the record and where the squashfs is.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cli.main import main as imagegw
from testsupport.images import SAMPLE_CMD, SAMPLE_ENTRYPOINT, SAMPLE_ENV, push_image, sample_image_layers
from testsupport.registry import RunningRegistry

DEMO_ROOT = Path(".state/demo").resolve()


def main() -> int:
    DEMO_ROOT.mkdir(parents=True, exist_ok=True)
    with RunningRegistry.start(DEMO_ROOT / "registry") as registry:
        print(f"demo registry: {registry.url}", file=sys.stderr)
        push_image(registry, "demo/hello", "1.0", sample_image_layers(),
                   env=SAMPLE_ENV, entrypoint=SAMPLE_ENTRYPOINT, cmd=SAMPLE_CMD)
        config = _write_config(registry)
        print(f"configuration: {config}", file=sys.stderr)
        print(f"$ imagegw pull demo/hello:1.0 --platform demo --config {config}", file=sys.stderr)
        return imagegw(["pull", "demo/hello:1.0", "--platform", "demo", "--config", str(config)])


def _write_config(registry: RunningRegistry) -> Path:
    config = {
        "DefaultImageLocation": "demoreg",
        "StateDirectory": str(DEMO_ROOT / "state"),
        "Locations": {"demoreg": {"url": registry.url}},
        "Platforms": {"demo": {"accesstype": "local", "local": {"imageDir": str(DEMO_ROOT / "images")}}},
    }
    path = DEMO_ROOT / "imagemanager.json"
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


if __name__ == "__main__":
    sys.exit(main())
