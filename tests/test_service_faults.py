"""Faults of the services a pull depends on, through the real parts: a registry that stalls, the Prefect
server restarted and the image index (MongoDB) stopped while a pull runs. Each test checks what the user
sees, what the pull's record says, and what is left on disk."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymongo
import pytest
import requests
from prefect.settings import PREFECT_API_URL, temporary_settings

from imagegw.store import ImageStore, PullKey
from tests.gateway_fixtures import Gateway as GatewayFixture
from tests.gateway_fixtures import pull, record_once
from testsupport.faulty import FaultyProxy
from testsupport.images import LayerBuilder, push_image
from testsupport.prefect_server import RunningPrefectServer, send_queued_logs_and_events
from testsupport.secantus import RunningSecantus
from testsupport.throttle import ThrottlingProxy

REGISTRY_TIMEOUT = 2
"""RegistryTimeout in these tests: a stalled blob fails in 2 s, not the default 60."""


@pytest.fixture
def stalling(gateway: GatewayFixture) -> Iterator[FaultyProxy]:
    """The session's registry behind a proxy that can stall blobs, configured as a location with a short timeout."""
    with FaultyProxy(gateway.registry.url) as proxy:
        gateway.write_config(Locations={proxy.host: {"url": proxy.url}}, RegistryTimeout=REGISTRY_TIMEOUT)
        proxy.stall_blobs_after = 100_000  # in the middle of the layer; the image config, smaller, gets through
        yield proxy


def left_on_disk(gateway: GatewayFixture) -> list[str]:
    """Files a failed pull may not leave: layers or partial downloads, scratch, published images."""
    roots = [gateway.cache_dir / "layers", gateway.root / "expand", gateway.image_dir]
    return sorted(str(path) for root in roots if root.exists() for path in root.rglob("*") if path.is_file())


def test_a_registry_stalling_mid_blob_fails_the_pull_after_its_retries_naming_it(
        gateway: GatewayFixture, stalling: FaultyProxy) -> None:
    built = push_image(gateway.registry, "faults/stall", "1", [LayerBuilder().file("f", os.urandom(1 << 20))],
                       compression="none")
    stalling.stalls = 100

    state, record = pull(gateway, f"{stalling.host}/faults/stall:1")

    assert state.is_failed() and record["status"] == "FAILURE"
    message = record["status_message"]
    assert f"layer {built.layer_digests[0]} of {stalling.host}/faults/stall" in message, message
    assert f"no answer within {REGISTRY_TIMEOUT} s (RegistryTimeout)" in message, message
    assert stalling.stalled == 3, "tried, then retried twice"
    assert left_on_disk(gateway) == []


def test_a_registry_stalling_once_is_retried_and_the_pull_succeeds(gateway: GatewayFixture,
                                                                   stalling: FaultyProxy) -> None:
    push_image(gateway.registry, "faults/pause", "1", [LayerBuilder().file("f", os.urandom(1 << 20))],
               compression="none")
    stalling.stalls = 1

    state, record = pull(gateway, f"{stalling.host}/faults/pause:1")

    assert state.is_completed() and record["status"] == "READY", record["status_message"]
    assert stalling.stalled == 1
    assert (gateway.image_dir / f"{record['id']}.squashfs").is_file()


SLOW_RATE = 1 << 20
"""Bytes a second the registry sends while a fault is set up: the pull is caught in its download."""
SLOW_LAYER = 8 << 20
"""Random, so it does not compress: 8 s at SLOW_RATE, time enough to stop a service under it."""
DATABASE_DOWN = 6.0
"""Seconds the database stays stopped: past one attempt of a stage (pymongo waits 5 s for a server), within
the retries of the stages that write the record (2 and 8 s apart)."""


def files_under(directory: Path) -> list[str]:
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*") if path.is_file()) \
        if directory.exists() else []


def downloading(record: dict[str, Any]) -> bool:
    return record.get("status_message", "").startswith("Pulling layers: 0/1 done, ") \
        and not record["status_message"].startswith("Pulling layers: 0/1 done, 0.0 of")


@pytest.fixture
def database(gateway: GatewayFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningSecantus]:
    """The gateway's image index on a SecantusDB of the test's own, which it may stop and start again."""
    with RunningSecantus.start(tmp_path / "mongo") as server:
        monkeypatch.delenv("IMAGEGW_MONGODB_URI", raising=False)  # the session's server exported it
        gateway.mongo_uri = server.uri
        yield server


@pytest.fixture
def slow_registry(gateway: GatewayFixture, database: RunningSecantus) -> Iterator[ThrottlingProxy]:
    """The session's registry behind a relay sending SLOW_RATE bytes a second, configured as a location."""
    with ThrottlingProxy(gateway.registry.host, SLOW_RATE) as proxy:
        gateway.write_config(MongoDBURI=database.uri, Locations={proxy.host: {"url": proxy.url}})
        yield proxy


def test_the_database_stopped_under_a_pull_and_back_within_its_retries_ends_ready(
        gateway: GatewayFixture, database: RunningSecantus, slow_registry: ThrottlingProxy) -> None:
    push_image(gateway.registry, "faults/index", "1", [LayerBuilder().file("noise", os.urandom(SLOW_LAYER))],
               compression="none")
    push_image(gateway.registry, "faults/after", "1", [LayerBuilder().file("f", b"after")])
    tag = f"{slow_registry.host}/faults/index:1"
    # A client of the test's own, patient enough to wait out the stop.
    watcher = ImageStore(pymongo.MongoClient(database.uri, serverSelectionTimeoutMS=30_000)[gateway.database], 3600)
    stopped: list[float] = []

    def stop_the_database_mid_download() -> None:
        record_once(lambda: watcher.pull_record(PullKey("mycluster", "docker", tag)) or {}, downloading, "downloading",
                    60)
        database.interrupt()
        stopped.append(time.monotonic())
        slow_registry.rate = None  # the download ends while the database is away: the next stage meets it
        time.sleep(DATABASE_DOWN)
        database.resume()
        stopped.append(time.monotonic())

    outage = threading.Thread(target=stop_the_database_mid_download, daemon=True)
    outage.start()
    state, record = pull(gateway, tag)
    ended = time.monotonic()
    outage.join(timeout=60)

    assert len(stopped) == 2, "the database was not stopped and started again while the pull ran"
    assert ended > stopped[1], "the pull ended before the database came back: it never met the outage"
    assert state.is_completed() and record["status"] == "READY", record["status_message"]
    assert record["status_message"] == "Image ready"
    assert files_under(gateway.image_dir) == sorted([f"{record['id']}.meta", f"{record['id']}.squashfs"]), \
        "no partial or temporary file"
    assert files_under(gateway.root / "expand") == []
    assert [name for name in files_under(gateway.cache_dir) if name.endswith(".partial")] == []
    image = watcher.lookup(PullKey("mycluster", "docker", tag))
    assert image is not None and image["status"] == "READY", "the image index holds the image"

    state, record = pull(gateway, f"{slow_registry.host}/faults/after:1")
    assert state.is_completed() and record["status"] == "READY", record["status_message"]


PREFECT_DOWN = 3.0
"""Seconds the Prefect server stays stopped before it starts again (which itself takes seconds)."""


@pytest.fixture
def prefect_server(tmp_path: Path) -> Iterator[RunningPrefectServer]:
    """A Prefect server of the test's own (the session's is shared), which it may restart; this process's
    flow runs report to it."""
    with RunningPrefectServer.start(tmp_path / "prefect") as server, \
            temporary_settings({PREFECT_API_URL: server.api_url}):
        yield server
        send_queued_logs_and_events()


def test_the_prefect_server_restarted_under_a_pull_and_new_pulls_work_once_it_is_back(
        gateway: GatewayFixture, prefect_server: RunningPrefectServer, tmp_path: Path) -> None:
    push_image(gateway.registry, "faults/prefect", "1", [LayerBuilder().file("noise", os.urandom(4 * SLOW_LAYER))],
               compression="none")
    push_image(gateway.registry, "faults/later", "1", [LayerBuilder().file("f", b"later")])
    with ThrottlingProxy(gateway.registry.host, SLOW_RATE) as slow_registry:
        gateway.write_config(Locations={slow_registry.host: {"url": slow_registry.url}})
        tag = f"{slow_registry.host}/faults/prefect:1"
        store = gateway.store()
        restarted: list[float] = []

        def restart_prefect_mid_download() -> None:
            record_once(lambda: store.pull_record(PullKey("mycluster", "docker", tag)) or {}, downloading,
                        "downloading", 60)
            prefect_server.interrupt()
            restarted.append(time.monotonic())
            slow_registry.rate = None  # the pull's later stages start while the server is away
            time.sleep(PREFECT_DOWN)
            prefect_server.resume()
            restarted.append(time.monotonic())

        restart = threading.Thread(target=restart_prefect_mid_download, daemon=True)
        restart.start()
        state, record = pull(gateway, tag)
        ended = time.monotonic()
        restart.join(timeout=90)

        assert len(restarted) == 2, "the Prefect server was not restarted while the pull ran"
        assert ended > restarted[1], "the pull ended before the server was back: it never met the restart"
        assert state.is_completed() and record["status"] == "READY", record["status_message"]
        assert files_under(gateway.image_dir) == sorted([f"{record['id']}.meta", f"{record['id']}.squashfs"])
        assert files_under(gateway.root / "expand") == []
        reports = requests.post(f"{prefect_server.api_url}/artifacts/filter", json={}, timeout=10).json()
        assert [report["key"] for report in reports if "faults-prefect" in (report["key"] or "")], \
            "the pull's report, written once the server was back"

        state, record = pull(gateway, f"{slow_registry.host}/faults/later:1")
        assert state.is_completed() and record["status"] == "READY", record["status_message"]
