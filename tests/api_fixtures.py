"""An API client on a real configuration: real munged, registry, SecantusDB and Prefect API.

Pulls start flow runs through ``ThreadLauncher``, which runs the real flow in a background
thread of the test process (the deployment/worker path is tested in test_serve.py).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from imagegw.config import load_settings
from imagegw.store import PullKey
from tests.gateway_fixtures import Gateway
from testsupport.munge import RunningMunged


@dataclass
class ThreadLauncher:
    """Runs each launched pull's flow in a thread; remembers what it launched."""

    config_path: str
    launched: list[PullKey] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, key: PullKey, pull_id: str) -> str:
        from flows.pull import pull_image

        run = pull_image(key.tag, key.system, self.config_path, pull_id, return_state=True)
        thread = threading.Thread(target=asyncio.run, args=(run,), daemon=True)
        with self.lock:
            self.launched.append(key)
            self.threads.append(thread)
        thread.start()
        return uuid.uuid4().hex

    def end_dead_run(self, flow_run_id: str, reason: str) -> None:
        raise AssertionError(f"no pull was expected to be taken over ({flow_run_id}: {reason})")

    def wait(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        for thread in list(self.threads):
            thread.join(max(0.0, deadline - time.monotonic()))


@dataclass
class Api:
    """A client for the gateway's API plus what tests need to act as several users."""

    client: TestClient
    gateway: Gateway
    munged: RunningMunged
    launcher: ThreadLauncher

    def reconfigure(self, **overrides: Any) -> None:
        """Rewrite the configuration and serve the API from it, as a restarted gateway would."""
        self.gateway.write_config(**overrides)
        self.client = TestClient(create_app(load_settings(self.gateway.config_path), self.launcher))

    def call(self, method: str, path: str, *, uid: int = 1000, gid: int = 1000, payload: bytes = b"",
             credential: str | None = None, **options: Any):
        headers = {"authentication": credential if credential is not None else
                   self.munged.mint(uid=uid, gid=gid, payload=payload)}
        return self.client.request(method, path, headers=headers, **options)

    def pull(self, image: str, **options: Any):
        return self.call("POST", f"/api/pull/mycluster/docker/{image}/", **options)

    def lookup(self, image: str, **options: Any):
        return self.call("GET", f"/api/lookup/mycluster/docker/{image}/", **options)

    def pull_until_ready(self, image: str, timeout: float = 60, **options: Any) -> dict[str, Any]:
        """Pull as shifterimg does: re-POST until the record is READY (or FAILURE)."""
        deadline = time.monotonic() + timeout
        while True:
            record = self.pull(image, **options).json()
            if record.get("status") in ("READY", "FAILURE") or time.monotonic() > deadline:
                return record
            time.sleep(0.3)


def logins(**locations: str) -> bytes:
    """A MUNGE payload as shifterimg login makes it."""
    return json.dumps({"authorized_locations": locations}).encode()


@pytest.fixture
def api(gateway: Gateway, munged: RunningMunged) -> Iterator[Api]:
    platform = {"accesstype": "local", "local": {"imageDir": str(gateway.image_dir)},
                "mungeSocketPath": munged.socket_path, "admins": ["root"]}
    gateway.write_config(Platforms={"mycluster": platform}, Metrics=True, ImportUsers=["root"])
    launcher = ThreadLauncher(str(gateway.config_path))
    with TestClient(create_app(load_settings(gateway.config_path), launcher)) as client:
        yield Api(client, gateway, munged, launcher)
    launcher.wait()
