"""Faults around the gateway, through the real parts: what the user sees, what the record says."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from deployments.launcher import DeploymentLauncher
from imagegw.access import AclRequest
from imagegw.errors import ServiceUnavailable
from imagegw.processes import free_port
from imagegw.service import Caller, Gateway
from imagegw.store import PullKey
from tests.api_fixtures import Api
from tests.gateway_fixtures import Gateway as GatewayFixture
from tests.gateway_fixtures import pull
from testsupport.faulty import FaultyProxy
from testsupport.images import LayerBuilder, push_image
from testsupport.munge import RunningMunged

USER = Caller(uid=1000, gid=1000)


def test_with_the_prefect_api_down_pulls_are_refused_and_lookups_keep_working(gateway: GatewayFixture) -> None:
    push_image(gateway.registry, "faults/served", "1", [LayerBuilder().file("f", b"served")])
    push_image(gateway.registry, "faults/new", "1", [LayerBuilder().file("f", b"new")])
    served, new = gateway.image("faults/served:1"), gateway.image("faults/new:1")
    assert pull(gateway, served)[0].is_completed()
    service = Gateway(gateway.settings, DeploymentLauncher(gateway.settings))

    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}):
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable) as refused:
            service.pull(USER, "mycluster", "docker", new, AclRequest())
        refused_after = time.monotonic() - started
        looked_up = service.lookup(USER, "mycluster", "docker", served)

    assert str(refused.value).startswith(f"cannot start a flow run for {new} on mycluster: ")
    assert refused_after < 30, "the user is told at once, not after a long wait"
    record = gateway.store().pull_record(PullKey("mycluster", "docker", new))
    assert record is not None and record["status"] == "FAILURE", "nothing is left INIT, waiting for nobody"
    assert looked_up["status"] == "READY" and looked_up["tag"] == [served]


def test_with_munged_stopped_the_api_answers_503_naming_it_and_recovers(api: Api, tmp_path: Path) -> None:
    with RunningMunged.start(tmp_path / "munged") as munged:
        platform = {"accesstype": "local", "local": {"imageDir": str(api.gateway.image_dir)},
                    "mungeSocketPath": munged.socket_path}
        api.reconfigure(Platforms={"mycluster": platform})

        def listing() -> Any:
            return api.call("GET", "/api/list/mycluster/", credential=munged.mint(uid=1000, gid=1000))

        assert listing().status_code == 200
        credential = munged.mint(uid=1000, gid=1000)
        munged.interrupt()
        down = api.call("GET", "/api/list/mycluster/", credential=credential)
        munged.resume()
        assert listing().status_code == 200, "recovered without restarting the gateway"
    assert down.status_code == 503
    assert down.json()["error"].startswith(f"munged is not reachable at {munged.socket_path}: ")


@pytest.fixture
def faulty(gateway: GatewayFixture) -> Iterator[FaultyProxy]:
    """The session's registry behind a proxy that fails on purpose, configured as a location."""
    with FaultyProxy(gateway.registry.url) as proxy:
        gateway.write_config(Locations={proxy.host: {"url": proxy.url}})
        yield proxy


def left_on_disk(gateway: GatewayFixture) -> list[str]:
    """Files a failed pull may not leave: layers or partial downloads, scratch, published images."""
    roots = [gateway.cache_dir / "layers", gateway.root / "expand", gateway.image_dir]
    return sorted(str(path) for root in roots if root.exists() for path in root.rglob("*") if path.is_file())


def test_a_registry_answering_503_is_retried_until_it_recovers(gateway: GatewayFixture,
                                                               faulty: FaultyProxy) -> None:
    push_image(gateway.registry, "faults/flaky", "1", [LayerBuilder().file("f", b"flaky")])
    faulty.failures = 2

    state, record = pull(gateway, f"{faulty.host}/faults/flaky:1")

    assert state.is_completed() and record["status"] == "READY", record["status_message"]
    assert faulty.failures == 0 and len(faulty.seen) > 2, "the two failures were answered, then the pull went on"


def test_a_blob_cut_short_fails_the_pull_after_its_retries_and_leaves_nothing(gateway: GatewayFixture,
                                                                              faulty: FaultyProxy) -> None:
    built = push_image(gateway.registry, "faults/cut", "1", [LayerBuilder().file("f", os.urandom(1 << 20))],
                       compression="none")
    faulty.cut_blobs_after = 100_000

    state, record = pull(gateway, f"{faulty.host}/faults/cut:1")

    assert state.is_failed() and record["status"] == "FAILURE"
    assert f"layer {built.layer_digests[0]}" in record["status_message"]
    assert "interrupted" in record["status_message"]
    assert len([seen for seen in faulty.seen if "/blobs/" + built.layer_digests[0] in seen]) == 3, \
        "tried, then retried twice"
    assert left_on_disk(gateway) == []


def test_a_blob_whose_bytes_are_not_its_digest_fails_and_is_not_cached(gateway: GatewayFixture) -> None:
    built = push_image(gateway.registry, "faults/corrupt", "1", [LayerBuilder().file("f", os.urandom(1 << 16))],
                       compression="none")
    blob = gateway.registry.blob_path(built.layer_digests[0])
    data = bytearray(blob.read_bytes())
    data[-100] ^= 0xFF  # same size, other bytes: as a broken disk under the registry would serve them
    blob.write_bytes(bytes(data))

    state, record = pull(gateway, gateway.image("faults/corrupt:1"))

    assert state.is_failed() and record["status"] == "FAILURE"
    assert f"expected {built.layer_digests[0]}" in record["status_message"]
    assert left_on_disk(gateway) == []
