"""Time a re-pull of a READY image through the REST API, in process.

``python bench/api_repull.py CONFIG PLATFORM IMAGE [N]`` builds the gateway's FastAPI app,
replaces only the MUNGE authentication by a fixed caller (root), and sends N times
``POST /api/pull/PLATFORM/docker/IMAGE/`` through Starlette's test client. A launcher that
refuses to start flow runs shows whether any request would have started one. Prints JSON:
the first request's seconds (new connections), the median of the others, and the answers' status.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> int:
    config, platform, image = sys.argv[1:4]
    count = int(sys.argv[4]) if len(sys.argv) > 4 else 20
    from fastapi.testclient import TestClient

    from api.app import create_app
    from imagegw.config import load_settings
    from imagegw.service.identity import Caller

    launched: list[object] = []

    def launcher(key: object) -> str:
        launched.append(key)
        raise RuntimeError("the benchmark's API does not start flow runs")

    app = create_app(load_settings(config), launcher)
    root = Caller(uid=0, gid=0)
    for route in app.routes:
        for dependency in getattr(getattr(route, "dependant", None), "dependencies", []):
            if getattr(dependency.call, "__name__", "") == "caller":
                app.dependency_overrides[dependency.call] = lambda: root
    client = TestClient(app)
    times, statuses = [], []
    for _ in range(count):
        started = time.monotonic()
        response = client.post(f"/api/pull/{platform}/docker/{image}/")
        times.append(time.monotonic() - started)
        statuses.append(response.json().get("status") if response.status_code == 200 else response.status_code)
    print(json.dumps({"first": times[0], "median": statistics.median(times[1:] or times),
                      "statuses": sorted(set(map(str, statuses))), "launched": len(launched)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
