"""Fixtures for running the gateway against real parts: SecantusDB, a Prefect API, a registry."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pymongo
import pytest

from imagegw.config import Settings, load_settings
from imagegw.store import ImageStore, PullKey
from imagegw.store.embedded import ensure_embedded_server, stop_embedded_server
from testsupport.registry import RunningRegistry


@pytest.fixture(scope="session")
def mongo_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The gateway's own embedded SecantusDB, started the way the gateway starts it."""
    state = tmp_path_factory.mktemp("mongo-state")
    server = ensure_embedded_server(state)
    yield server.uri
    stop_embedded_server(server, state / "mongo")


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """A real Prefect API server (temporary database) that the flows in this process report to."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@dataclass
class Gateway:
    """A gateway configuration in a temporary directory, with its own database name."""

    root: Path
    config_path: Path
    registry: RunningRegistry
    mongo_uri: str
    database: str

    @property
    def settings(self) -> Settings:
        return load_settings(self.config_path)

    @property
    def image_dir(self) -> Path:
        return self.root / "images"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    def store(self) -> ImageStore:
        return ImageStore(pymongo.MongoClient(self.mongo_uri)[self.database], 3600)

    def image(self, repository_and_tag: str) -> str:
        """An image name on the test registry, e.g. ``127.0.0.1:PORT/test/app:1``."""
        return f"{self.registry.host}/{repository_and_tag}"

    def write_config(self, **overrides: Any) -> None:
        config: dict[str, Any] = {
            "DefaultImageLocation": "testreg",
            "MongoDBURI": self.mongo_uri,
            "MongoDB": self.database,
            "StateDirectory": str(self.root / "state"),
            "CacheDirectory": str(self.cache_dir),
            "ExpandDirectory": str(self.root / "expand"),
            "ImageExpirationTimeout": "1:00:00:00",
            "Locations": {
                "testreg": {"url": self.registry.url},
                self.registry.host: {"url": self.registry.url},
            },
            "Platforms": {
                "mycluster": {"accesstype": "local", "local": {"imageDir": str(self.image_dir)}},
                "armcluster": {"accesstype": "local", "local": {"imageDir": str(self.root / "arm-images")},
                               "arch": "arm64", "variant": "v8", "Compression": "zstd:3"},
            },
        }
        config.update(overrides)
        self.config_path.write_text(json.dumps(config, indent=2))


@pytest.fixture
def gateway(tmp_path: Path, registry: RunningRegistry, mongo_uri: str, prefect_api: None) -> Gateway:
    """A fresh gateway (own image dir, cache and database) pulling from the session's registry."""
    gateway = Gateway(root=tmp_path, config_path=tmp_path / "imagemanager.json", registry=registry,
                      mongo_uri=mongo_uri, database=f"test_{uuid.uuid4().hex[:12]}")
    gateway.write_config()
    return gateway


def pull(gateway: Gateway, image: str, platform: str = "mycluster"):
    """Run the flow; return (state, pull record)."""
    from flows.pull import pull_image  # imports Prefect, which conftest.py has configured by now

    state = asyncio.run(pull_image(image, platform, str(gateway.config_path), return_state=True))
    record = gateway.store().pull_record(PullKey(platform, "docker", image if ":" in image.rsplit("/", 1)[-1]
                                                 else image + ":latest"))
    return state, record


def record_once(read: Callable[[], dict[str, Any]], accept: Callable[[dict[str, Any]], bool], what: str,
                timeout: float) -> dict[str, Any]:
    """What ``read`` returns, once ``accept`` takes it; fails naming ``what`` and the last state seen."""
    deadline = time.monotonic() + timeout
    while not accept(record := read()):
        assert time.monotonic() < deadline, \
            f"not {what} within {timeout:.0f} s: {record.get('status')} {record.get('status_message')!r}"
        time.sleep(0.2)
    return record
